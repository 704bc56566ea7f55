"""The API's HTTP routes, as a Starlette app (served by uvicorn, see `server.py`).

Each request is a coroutine on uvicorn's event loop: a burst of clients costs sockets and coroutines,
not threads, and a client that stalls while sending its body is answered 408 after `read_timeout_s`.
The work that can take a while off the loop (parsing and tokenizing a body, decoding log-probabilities)
runs in Starlette's thread pool. A request's job tells the loop of each event through
`JobEvents.listener`, and a task watching the connection cancels the job when the client goes away,
which frees its rows at the next token.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Protocol

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from alpaca.serving.limits import RequestBodyLimit
from alpaca.serving.openai_protocol import APIError, OpenAIBackend, new_request_id
from alpaca.serving.rows import Job
from alpaca.serving.scheduler import QueueFull

logger = logging.getLogger(__name__)

API_KEY_ENV = "ALPACA_API_KEY"
# Bodies up to this size are parsed and tokenized on the event loop (well under a millisecond, less
# than a hop to a worker thread and back); larger ones in the thread pool, so as not to stall the loop.
INLINE_BYTES = 16 * 1024
# Deeper JSON is refused: Python's parser recurses once per level (10^5 levels: RecursionError), and
# no OpenAI request needs more than a few.
MAX_JSON_DEPTH = 64


def json_response(status: int, body: dict, headers: dict | None = None) -> Response:
    response = Response(json.dumps(body, ensure_ascii=False), status, media_type="application/json")
    # Added as given: Starlette lower-cases header names, and some clients read `Retry-After` verbatim.
    response.raw_headers += [
        (name.encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()
    ]
    return response


def error_response(err: APIError, request: Request | None = None) -> Response:
    headers = dict(err.headers)
    if request is not None and request.method == "POST" and not getattr(request.state, "body_read", False):
        headers["Connection"] = "close"  # the body was not read: it cannot stay on a kept-alive connection
    return json_response(err.status, err.body(), headers)


def too_large(size: int | None, limit: int) -> dict:
    what = f"{size} bytes" if size is not None else "over the limit"
    return APIError(
        413,
        f"The request body is {what}, over this server's limit of {limit} bytes (set by --max_input_tokens)",
        code="request_too_large",
    ).body()


def json_depth(value) -> int:
    """How deeply `value` nests lists and objects (without recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def parse_json(data: bytes):
    """A request body -> its JSON value; an APIError (400 `invalid_json`) says what is wrong."""
    too_deep = APIError(
        400, f"The JSON body nests more than {MAX_JSON_DEPTH} levels deep", code="invalid_json"
    )
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise APIError(
            400, f"The request body is not UTF-8 (byte {err.start})", code="invalid_json"
        ) from None
    except json.JSONDecodeError as err:
        raise APIError(
            400,
            f"We could not parse the JSON body of your request ({err.msg} at line "
            f"{err.lineno} column {err.colno}); send valid JSON",
            code="invalid_json",
        ) from None
    except RecursionError:
        raise too_deep from None
    if json_depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def start_job(backend: OpenAIBackend, kind: str, data: bytes) -> tuple[dict, Job]:
    """A request body -> (its JSON, its checked job, not yet submitted)."""
    body = parse_json(data)
    return body, backend.start(kind, body)


class AccessLog:
    """ASGI middleware: one log line per request, with its request line and status (never the
    headers, which hold the key)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = "-"

        async def logged_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            target = scope.get("raw_path") or scope["path"].encode()
            if scope.get("query_string"):
                target += b"?" + scope["query_string"]
            client = (scope.get("client") or ("-",))[0]
            request_line = f"{scope['method']} {target.decode('latin-1')} HTTP/{scope['http_version']}"
            logger.info('%s "%s" %s', client, request_line, status)


class JobResponse(Response):
    """The reply to a generation request: JSON when the job is done, or server-sent events as it runs.
    A client that goes away cancels the job."""

    def __init__(self, backend: OpenAIBackend, kind: str, job: Job, wake: asyncio.Event, include_usage: bool):
        self.backend, self.kind, self.job, self.wake = backend, kind, job, wake
        self.include_usage = include_usage
        self.request_id = new_request_id(kind)
        self.gone = asyncio.Event()

    async def __call__(self, scope, receive, send):
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            if self.job.stream:
                await self._stream(send)
            else:
                await self._reply(scope, receive, send)
        finally:
            watcher.cancel()
            self.job.cancel()  # a no-op once the job is done; otherwise the client left: free its rows

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone.set()
        self.wake.set()

    async def _wait(self) -> None:
        await self.wake.wait()
        self.wake.clear()

    async def _reply(self, scope, receive, send) -> None:
        while not self.job.done.is_set() and not self.gone.is_set():
            await self._wait()
        if self.gone.is_set():
            return
        if self.job.error:
            err = APIError(500, self.job.error, type="server_error", code="generation_failed")
            return await error_response(err)(scope, receive, send)
        if any(row.settings.logprobs is not None for row in self.job.rows):  # decoding each token's text
            body = await run_in_threadpool(self.backend.response_body, self.kind, self.job, self.request_id)
        else:
            body = self.backend.response_body(self.kind, self.job, self.request_id)
        await json_response(200, body)(scope, receive, send)

    async def _stream(self, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        chunks = self.backend.chunks(self.kind, self.job, self.request_id, self.include_usage, poll_s=0)
        events = []
        for chunk in chunks:
            if chunk is not None:
                events.append(f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n")
                continue
            if events:  # every event that was waiting, in one write
                await send(
                    {"type": "http.response.body", "body": "".join(events).encode(), "more_body": True}
                )
                events = []
            await self._wait()
            if self.gone.is_set():
                return
        events.append("data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": "".join(events).encode()})


class ServedApi(Protocol):
    """What the routes read from the server (`server.ApiServer`), named here so that this module does
    not import the one that imports it."""

    api_key: str | None
    max_request_bytes: int
    read_timeout_s: float
    backend: OpenAIBackend | None


class ApiRoutes:
    """The endpoints, over an `ApiServer`'s settings and backend (None while the model loads)."""

    def __init__(self, api: ServedApi):
        self.api = api

    def app(self) -> Starlette:
        guarded = {
            "/v1/models": (self.models, ["GET"]),
            "/v1/models/{model_id:path}": (self.model, ["GET"]),
            "/v1/completions": (self.completions, ["POST"]),
            "/v1/chat/completions": (self.chat, ["POST"]),
            "/stats": (self.stats, ["GET"]),
        }
        routes = [Route("/health", self.health, methods=["GET"])]
        routes += [
            Route(path, self._guard(endpoint), methods=methods)
            for path, (endpoint, methods) in guarded.items()
        ]
        middleware = [
            Middleware(AccessLog),
            Middleware(
                RequestBodyLimit, max_bytes=self.api.max_request_bytes, refusal=too_large, read_chunked=False
            ),
        ]
        return Starlette(
            routes=routes, middleware=middleware, exception_handlers={HTTPException: self.not_routed}
        )

    def _guard(self, endpoint):
        """`endpoint` behind the key check, with its errors in OpenAI's shape."""

        async def guarded(request: Request) -> Response:
            try:
                self._check_key(request)
                return await endpoint(request)
            except APIError as err:
                return error_response(err, request)
            except ClientDisconnect:
                return Response(status_code=499)  # never sent: the client is gone
            except Exception as err:  # the server keeps serving; the traceback goes to the log only
                logger.exception("request failed")
                return error_response(
                    APIError(500, f"internal error ({type(err).__name__})", type="server_error"), request
                )

        return guarded

    async def not_routed(self, request: Request, exc: HTTPException) -> Response:
        try:
            self._check_key(request)
            path = request.url.path
            if exc.status_code == 405:
                raise APIError(405, f"{request.method} is not allowed on {path}", code="method_not_allowed")
            raise APIError(404, f"Unknown request URL: {request.method} {path}", code="unknown_url")
        except APIError as err:
            return error_response(err, request)

    def _check_key(self, request: Request) -> None:
        key = self.api.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key: send it as 'Authorization: Bearer <key>' (the server's "
                f"--api_key or ${API_KEY_ENV})",
                code="invalid_api_key",
            )

    def _backend(self) -> OpenAIBackend:
        backend = self.api.backend
        if backend is None:
            raise APIError(
                503,
                "The model is loading; retry shortly",
                type="server_error",
                code="model_loading",
                headers={"Retry-After": "2"},
            )
        return backend

    async def health(self, request: Request) -> Response:
        return json_response(200, {"status": "ok" if self.api.backend else "loading"})

    async def models(self, request: Request) -> Response:
        return json_response(200, self._backend().models_body())

    async def model(self, request: Request) -> Response:
        backend, model_id = self._backend(), request.path_params["model_id"]
        if model_id != backend.config.model_id:
            raise APIError(
                404, f"The model {model_id!r} does not exist", param="model", code="model_not_found"
            )
        return json_response(200, backend.model_card())

    async def stats(self, request: Request) -> Response:
        return json_response(200, dict(self._backend().scheduler.stats.__dict__))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completions")

    async def chat(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def _read_body(self, request: Request) -> bytes:
        if "chunked" in request.headers.get("transfer-encoding", "").lower():
            raise APIError(
                411,
                "Send the request body with a Content-Length (chunked bodies are not accepted)",
                code="length_required",
            )
        if not request.headers.get("content-length", "").isdigit():
            raise APIError(411, "The request needs a Content-Length header", code="length_required")
        timeout = self.api.read_timeout_s
        try:
            data = await asyncio.wait_for(request.body(), timeout)
        except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
            raise APIError(
                408,
                f"The request body did not arrive within {timeout:g} s (the server's --read_timeout_s); "
                "send the whole body at once",
                code="request_timeout",
                headers={"Connection": "close"},
            ) from None
        request.state.body_read = True
        return data

    async def _generate(self, request: Request, kind: str) -> Response:
        backend = self._backend()
        data = await self._read_body(request)
        if len(data) <= INLINE_BYTES:
            body, job = start_job(backend, kind, data)
        else:
            body, job = await run_in_threadpool(start_job, backend, kind, data)
        loop, wake = asyncio.get_running_loop(), asyncio.Event()

        def listener() -> None:  # called from the scheduler's thread
            try:
                loop.call_soon_threadsafe(wake.set)
            except RuntimeError:  # the loop has closed: the server is shutting down
                pass

        job.events.listener = listener
        try:
            backend.scheduler.submit(job)
        except QueueFull as err:
            raise APIError(
                429,
                f"The server is busy: {err}",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return JobResponse(backend, kind, job, wake, include_usage)
