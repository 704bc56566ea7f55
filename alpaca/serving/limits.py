"""The request-body limit of both servers (the Gradio page and the API): one formula, one ASGI middleware.

No dependency beyond the standard library: the page imports it without loading the API.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from alpaca.inference.decoding import GenerationLimits, max_input_chars


def request_body_limit(limits: GenerationLimits) -> int:
    """The largest request body a server reads, in bytes: room for two texts (the page's instruction
    and input; the API's prompts or messages together) at the character bound of `--max_input_tokens`,
    each character JSON-escaped (up to 12 bytes for a non-ASCII one), plus 64 KiB for the settings and
    framing. Anything larger is refused unread, before a prompt-length check can run."""
    return 2 * max_input_chars(limits) * 12 + 64 * 1024


def page_refusal(size: int | None, max_bytes: int) -> dict:
    return {"error": f"request body over {max_bytes} bytes (the limit follows --max_input_tokens)"}


class RequestBodyLimit:
    """ASGI middleware: answer 413 to a request whose body is over `max_bytes`.

    Gradio 6 has no limit of its own on request bodies (`max_file_size` covers uploads only), so
    without it a 50 MB instruction was read, queued and tokenized by the page.
    A declared Content-Length over the limit is refused before the body is read. A chunked body is
    read here up to the limit before the app sees it (with `read_chunked`; else the app gets it unread,
    to refuse it itself).

    Args:
        app: the ASGI app.
        max_bytes: the largest body passed on (see `request_body_limit`).
        refusal: (declared size or None, max_bytes) -> the JSON body of the 413.
        read_chunked: read and bound chunked bodies here; False leaves them to the app.
    """

    def __init__(
        self,
        app,
        max_bytes: int,
        refusal: Callable[[int | None, int], dict] = page_refusal,
        read_chunked: bool = True,
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.refusal = refusal
        self.read_chunked = read_chunked

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        if declared.isdigit():
            # The server reads no more than the declared length, so checking it is enough.
            if int(declared) > self.max_bytes:
                return await self._refuse(send, int(declared))
            return await self.app(scope, receive, send)
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        if not chunked or not self.read_chunked:
            return await self.app(scope, receive, send)
        # A chunked body has no declared length: read it here, up to the limit, then replay it.
        # (Raising from inside `receive` does not work: Gradio's body parser swallows it as a 400.)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._refuse(send, None)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send, size: int | None):
        body = json.dumps(self.refusal(size, self.max_bytes)).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),  # the body stays unread: the connection cannot be reused
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})
