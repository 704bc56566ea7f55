"""The API's server: uvicorn, in a background thread, serving the Starlette app of `app.py`; 127.0.0.1
by default.

The socket is bound before the model loads, so a client gets 503 ("loading", with Retry-After) rather
than a refused connection; `attach` makes it serve. `launch_api` builds the scheduler and protocol
backend around a loaded generator; `start_api` / `serve_api` are `generate.py --api`'s two steps.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time

from alpaca.inference.decoding import GenerationLimits
from alpaca.inference.generation import ResponseGenerator
from alpaca.inference.settings import GenerateConfig
from alpaca.serving.app import API_KEY_ENV, ApiRoutes
from alpaca.serving.limits import request_body_limit
from alpaca.serving.openai_protocol import CHAT_FORMATS, OpenAIBackend, ServingConfig
from alpaca.serving.scheduler import BatchScheduler

logger = logging.getLogger(__name__)


def server_api_key(api_key: str = "") -> str | None:
    """`--api_key`, else $ALPACA_API_KEY (which keeps it out of the shell history); None: no key."""
    key = api_key or os.environ.get(API_KEY_ENV, "")
    if not isinstance(key, str):
        raise ValueError("--api_key must be text; quote it: --api_key='\"...\"' or set ALPACA_API_KEY")
    return key or None


# Connections the kernel queues before the server accepts them (http.server's 5 reset a burst of clients);
# the kernel caps it at net.core.somaxconn (4096 on current Linux).
BACKLOG = 2048


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on `host`:`port`; a ValueError naming the port when it is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn and http.server do
    try:
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as err:
        sock.close()
        reason = "permission denied" if err.errno == errno.EACCES else "already in use"
        raise ValueError(
            f"--server_port={port}: port {port} on {host} is {reason}; pick another --server_port"
        ) from err
    return sock


class ApiServer:
    """An OpenAI-compatible server (uvicorn, in a background thread): listening from construction
    (503 until `attach`).

    Args:
        host: address to bind; 127.0.0.1 keeps the API on this machine.
        port: port to bind (0 picks a free one).
        api_key: when set, every request (but /health) needs `Authorization: Bearer <api_key>`.
        max_request_bytes: larger request bodies are refused unread (413; see `request_body_limit`).
        read_timeout_s: a request body that has not all arrived after this many seconds gets 408.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        api_key: str | None = None,
        max_request_bytes: int = 1 << 20,
        read_timeout_s: float = GenerateConfig.read_timeout_s,
    ):
        import uvicorn

        sock = bind_socket(host, port)
        self.host, self.port = host, sock.getsockname()[1]
        self.api_key = api_key
        self.max_request_bytes = max_request_bytes
        self.read_timeout_s = read_timeout_s
        self.backend: OpenAIBackend | None = None
        config = uvicorn.Config(
            ApiRoutes(self).app(),
            loop="asyncio",
            http="h11",
            lifespan="off",
            log_config=None,  # the process's logging stays as it is; requests are logged by AccessLog
            access_log=False,
            backlog=BACKLOG,
            timeout_keep_alive=5,
            timeout_graceful_shutdown=2,
        )
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._uvicorn.run, kwargs={"sockets": [sock]}, name="api-http", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._uvicorn.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._uvicorn.started:
            self.close()
            raise RuntimeError(f"the API server on {host}:{self.port} did not start")
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
        """Stop accepting, end the requests in flight (their jobs fail) and stop the scheduler."""
        self._uvicorn.should_exit = True
        if self.backend is not None:
            self.backend.scheduler.close()
        self._thread.join(timeout=30)


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
    read_timeout_s: float = GenerateConfig.read_timeout_s,
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
    if (
        isinstance(read_timeout_s, bool)
        or not isinstance(read_timeout_s, int | float)
        or not read_timeout_s > 0
    ):
        problems.append(f"--read_timeout_s must be a number of seconds above 0, got {read_timeout_s!r}")
    if problems:
        raise ValueError("; ".join(problems))


def start_api(
    server_name: str,
    server_port: int,
    api_key: str,
    limits: GenerationLimits,
    read_timeout_s: float = GenerateConfig.read_timeout_s,
) -> ApiServer:
    """Bind the API's port before the model loads (requests get 503 until `serve_api`); a busy port
    is an error now rather than after a long load."""
    return ApiServer(
        server_name, server_port, server_api_key(api_key), request_body_limit(limits), read_timeout_s
    )


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
