"""The HTTP layer of the OpenAI-compatible API: a stdlib `ThreadingHTTPServer`, 127.0.0.1 by default.

The socket is bound before the model loads, so a client gets 503 ("loading", with Retry-After) rather
than a refused connection; `attach` makes it serve. Each request runs in its own thread, which waits
for its job while the scheduler thread generates; a client that goes away (seen as an end of file on
its socket, or a failed write while streaming) cancels its job, which frees its rows at the next token.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import os
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from alpaca.inference.decoding import GenerationLimits, max_input_chars
from alpaca.inference.generation import ResponseGenerator
from alpaca.inference.settings import GenerateConfig
from alpaca.serving.batching import BatchScheduler, QueueFull
from alpaca.serving.openai_protocol import (
    CHAT_FORMATS,
    APIError,
    OpenAIBackend,
    ServingConfig,
    new_request_id,
)

logger = logging.getLogger(__name__)

API_KEY_ENV = "ALPACA_API_KEY"
POLL_S = 0.1


def server_api_key(api_key: str = "") -> str | None:
    """`--api_key`, else $ALPACA_API_KEY (which keeps it out of the shell history); None: no key."""
    key = api_key or os.environ.get(API_KEY_ENV, "")
    if not isinstance(key, str):
        raise ValueError("--api_key must be text; quote it: --api_key='\"...\"' or set ALPACA_API_KEY")
    return key or None


def request_body_limit(limits: GenerationLimits) -> int:
    """The largest request body read, in bytes: text at the character bound of `--max_input_tokens`,
    each character JSON-escaped (up to 12 bytes), plus 64 KiB for settings and message framing."""
    return max_input_chars(limits) * 12 + 64 * 1024


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True


class ApiServer:
    """An OpenAI-compatible server: listening from construction (503 until `attach`).

    Args:
        host: address to bind; 127.0.0.1 keeps the API on this machine.
        port: port to bind (0 picks a free one).
        api_key: when set, every request (but /health) needs `Authorization: Bearer <api_key>`.
        max_request_bytes: larger request bodies are refused unread (413).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        max_request_bytes: int = 1 << 20,
    ):
        try:
            self.httpd = _HTTPServer((host, port), _Handler)
        except OSError as err:
            reason = "permission denied" if err.errno == errno.EACCES else "already in use"
            raise ValueError(
                f"--server_port={port}: port {port} on {host} is {reason}; pick another --server_port"
            ) from err
        self.httpd.api = self
        self.host, self.port = host, self.httpd.server_address[1]
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.backend: OpenAIBackend | None = None
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="api-http", daemon=True
        )
        self._thread.start()
        if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
            logger.warning(
                "the API listens on %s without --api_key: anyone who can reach it can use it", host
            )

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def attach(self, backend: OpenAIBackend) -> None:
        self.backend = backend

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        if self.backend is not None:
            self.backend.scheduler.close()


def launch_api(
    generator: ResponseGenerator,
    server: ApiServer | None = None,
    model_id: str = "",
    chat_format: str = GenerateConfig.chat_format,
    default_max_tokens: int = GenerateConfig.max_new_tokens,
    max_batch_size: int = GenerateConfig.max_batch_size,
    max_queue_size: int = GenerateConfig.max_queue_size,
    max_wait_ms: float = GenerateConfig.max_wait_ms,
    **server_kwargs,
) -> ApiServer:
    """Serve `generator` on `server` (or a new `ApiServer(**server_kwargs)`); returns it, serving."""
    config = ServingConfig(
        model_id=model_id or generator.name, chat_format=chat_format, default_max_tokens=default_max_tokens
    )
    scheduler = BatchScheduler(generator, max_batch_size, max_queue_size, max_wait_ms)
    try:
        backend = OpenAIBackend(generator, scheduler, config)
    except ValueError:
        scheduler.close()
        raise
    server = server or ApiServer(**server_kwargs)
    server.attach(backend)
    return server


def check_api_flags(
    chat_format: str,
    max_batch_size: int,
    max_wait_ms: float,
    input_file: str = "",
    served_model_name: str = "",
) -> None:
    """Collect every problem with the API's flags into one ValueError (before the model loads)."""
    problems = []
    if chat_format not in CHAT_FORMATS:
        problems.append(f"--chat_format must be one of {', '.join(CHAT_FORMATS)}, got {chat_format!r}")
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        problems.append(f"--max_batch_size must be a whole number of at least 1, got {max_batch_size!r}")
    if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, int | float) or max_wait_ms < 0:
        problems.append(f"--max_wait_ms must be a number of milliseconds, 0 or more, got {max_wait_ms!r}")
    if input_file:
        problems.append("--api serves requests; --input_file is batch mode: choose one")
    if not isinstance(served_model_name, str):
        problems.append(f"--served_model_name must be text, got {served_model_name!r}")
    if problems:
        raise ValueError("; ".join(problems))


def start_api(server_name: str, server_port: int, api_key: str, limits: GenerationLimits) -> ApiServer:
    """Bind the API's port before the model loads (requests get 503 until `serve_api`); a busy port
    is an error now rather than after a long load."""
    return ApiServer(server_name, server_port, server_api_key(api_key), request_body_limit(limits))


def serve_api(
    server: ApiServer,
    generator: ResponseGenerator,
    default_max_tokens: int = GenerateConfig.max_new_tokens,
    chat_format: str = GenerateConfig.chat_format,
    served_model_name: str = "",
    max_batch_size: int = GenerateConfig.max_batch_size,
    max_queue_size: int = GenerateConfig.max_queue_size,
    max_wait_ms: float = GenerateConfig.max_wait_ms,
) -> None:
    """Serve `generator` on `server` until Ctrl-C, logging each request line and status to stderr."""
    try:
        launch_api(
            generator,
            server,
            model_id=served_model_name,
            chat_format=chat_format,
            default_max_tokens=default_max_tokens,
            max_batch_size=max_batch_size,
            max_queue_size=max_queue_size,
            max_wait_ms=max_wait_ms,
        )
    except ValueError:
        server.close()
        raise
    log = logging.getLogger("alpaca.serving")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    print(
        f"OpenAI-compatible API on {server.base_url} serving {server.backend.config.model_id!r}", flush=True
    )
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "alpaca-api"
    # Seconds a client may take to send its request or accept a write; a stalled client holds a thread.
    timeout = 120

    def log_message(self, format, *args):
        # The request line and status only: headers (the key) are never logged.
        logger.info("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        api: ApiServer = self.server.api
        self._body_read = False
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == "/health" and method == "GET":
                self._send_json(200, {"status": "ok" if api.backend else "loading"})
                return
            self._check_key(api.api_key)
            routes = {
                ("GET", "/v1/models"): lambda: self._send_json(200, self._backend().models_body()),
                ("POST", "/v1/completions"): lambda: self._generate("completions"),
                ("POST", "/v1/chat/completions"): lambda: self._generate("chat"),
                ("GET", "/stats"): lambda: self._send_json(200, self._stats()),
            }
            if (method, path) in routes:
                routes[(method, path)]()
            elif method == "GET" and path.startswith("/v1/models/"):
                self._send_json(200, self._model(unquote(path[len("/v1/models/") :])))
            elif any(route_path == path for _, route_path in routes):
                raise APIError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
            else:
                raise APIError(404, f"Unknown request URL: {method} {path}", code="unknown_url")
        except APIError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as err:  # the server keeps serving; the traceback goes to the log only
            logger.exception("request failed")
            self._send_error(APIError(500, f"internal error ({type(err).__name__})", type="server_error"))

    def _backend(self) -> OpenAIBackend:
        backend = self.server.api.backend
        if backend is None:
            raise APIError(
                503,
                "The model is loading; retry shortly",
                type="server_error",
                code="model_loading",
                headers={"Retry-After": "2"},
            )
        return backend

    def _model(self, model_id: str) -> dict:
        backend = self._backend()
        if model_id != backend.config.model_id:
            raise APIError(
                404, f"The model {model_id!r} does not exist", param="model", code="model_not_found"
            )
        return backend.model_card()

    def _stats(self) -> dict:
        return dict(self._backend().scheduler.stats.__dict__)

    def _check_key(self, key: str | None) -> None:
        if key is None:
            return
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(
                401,
                "Incorrect or missing API key: send it as 'Authorization: Bearer <key>' (the server's "
                f"--api_key or ${API_KEY_ENV})",
                code="invalid_api_key",
            )

    def _read_json(self):
        limit = self.server.api.max_request_bytes
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise APIError(
                411,
                "Send the request body with a Content-Length (chunked bodies are not accepted)",
                code="length_required",
            )
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise APIError(411, "The request needs a Content-Length header", code="length_required") from None
        if length > limit:
            raise APIError(
                413,
                f"The request body is {length} bytes, over this server's limit of {limit} bytes "
                "(set by --max_input_tokens)",
                code="request_too_large",
            )
        data = self.rfile.read(max(length, 0))
        self._body_read = True
        try:
            return json.loads(data.decode("utf-8"))
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

    def _generate(self, kind: str) -> None:
        backend = self._backend()
        body = self._read_json()
        job = backend.start(kind, body)
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
        request_id = new_request_id(kind)
        try:
            if job.stream:
                self._stream(backend, kind, job, request_id, body)
                return
            while not job.done.wait(POLL_S):
                if self._client_gone():
                    self.close_connection = True
                    return
            if job.error:
                raise APIError(500, job.error, type="server_error", code="generation_failed")
            self._send_json(200, backend.response_body(kind, job, request_id))
        finally:
            # A no-op once the job is done; otherwise the client left: free its rows.
            job.cancel()

    def _stream(self, backend: OpenAIBackend, kind: str, job, request_id: str, body: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        for chunk in backend.chunks(kind, job, request_id, include_usage, POLL_S):
            if chunk is None:
                if self._client_gone():
                    return
                continue
            self._send_event(json.dumps(chunk, ensure_ascii=False))
        self._send_event("[DONE]")

    def _send_event(self, data: str) -> None:
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """True when the client closed its connection (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: APIError) -> None:
        if self.command == "POST" and not self._body_read:
            # The body was not read: it cannot stay on a kept-alive connection.
            self.close_connection = True
        try:
            self._send_json(err.status, err.body(), err.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
