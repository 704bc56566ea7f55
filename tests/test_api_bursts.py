"""The API (`generate.py --api`) under a burst of clients and against hostile bodies, on the tiny model,
over real sockets to 127.0.0.1 (issue 22, items 3 and 5)."""

import asyncio
import json
import socket
import time

import pytest

from alpaca.inference.loading import load_generators
from alpaca.serving.server import ApiServer, launch_api

# server tests: an HTTP server on a real port (make test-fast skips them)
pytestmark = pytest.mark.slow

SMALL_REQUEST = json.dumps({"prompt": "Hi", "max_tokens": 2, "temperature": 0}).encode()


@pytest.fixture(scope="module")
def generator(tiny_llama):
    return load_generators(tiny_llama, lora_weights="")[0]


@pytest.fixture(scope="module")
def server(generator):
    api = launch_api(generator, model_id="tiny", port=0, max_queue_size=256)
    yield api
    api.close()


def raw_request(body: bytes, path: str = "/v1/completions", length: int | None = None) -> bytes:
    length = len(body) if length is None else length
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


def parse_reply(data: bytes) -> tuple[int, dict, dict]:
    """(status, lower-cased headers, JSON body) of a whole HTTP/1.1 reply (plain or chunked)."""
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])
    }
    if headers.get("transfer-encoding") == "chunked":
        chunks, rest = [], body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            size = int(size, 16)
            if size == 0:
                break
            chunks.append(rest[:size])
            rest = rest[size + 2 :]
        body = b"".join(chunks)
    return status, headers, json.loads(body)


def burst(port: int, clients: int, body: bytes, timeout_s: float = 120) -> list:
    """`clients` connections opened at the same moment, each sending `body` as soon as it is connected;
    returns each client's (status, headers, body), or the exception it got."""

    async def main():
        start = asyncio.Event()

        async def one():
            await start.wait()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(raw_request(body))
                await writer.drain()
                return parse_reply(await reader.read())
            finally:
                writer.close()

        tasks = [asyncio.ensure_future(one()) for _ in range(clients)]
        await asyncio.sleep(0)  # every task waits at the start line
        start.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout_s)

    return asyncio.run(main())


def test_a_burst_of_50_then_200_clients_is_answered(server):
    for clients in (50, 200):
        replies = burst(server.port, clients, SMALL_REQUEST)
        failures = [reply for reply in replies if isinstance(reply, BaseException)]
        assert not failures, f"{len(failures)} of {clients} clients got no reply: {failures[:3]}"
        assert [status for status, _, _ in replies] == [200] * clients
        assert all(data["usage"]["completion_tokens"] == 2 for _, _, data in replies)


def test_a_burst_over_the_queue_limit_gets_429_with_retry_after(generator):
    api = launch_api(generator, model_id="tiny", port=0, max_batch_size=4, max_queue_size=8)
    try:
        replies = burst(api.port, 200, SMALL_REQUEST)
        failures = [reply for reply in replies if isinstance(reply, BaseException)]
        assert not failures, f"{len(failures)} of 200 clients got no reply: {failures[:3]}"
        statuses = [status for status, _, _ in replies]
        assert set(statuses) <= {200, 429} and 200 in statuses
        for status, headers, data in replies:
            if status == 429:
                assert headers["retry-after"] == "1" and data["error"]["code"] == "queue_full"
    finally:
        api.close()


def send(port: int, request: bytes) -> tuple[int, dict, dict]:
    """One raw request on its own connection; the whole reply, parsed (the server closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return parse_reply(data)


def post(port: int, body: bytes, path: str = "/v1/completions") -> tuple[int, dict, dict]:
    return send(port, raw_request(body, path))


NUMERIC_FIELDS = [
    ("/v1/completions", {"prompt": "x"}, name)
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "max_tokens",
        "n",
        "seed",
        "logprobs",
        "best_of",
        "presence_penalty",
        "frequency_penalty",
    )
] + [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True}, name)
    for name in ("max_completion_tokens", "top_logprobs", "temperature", "seed")
]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("path, body, field", NUMERIC_FIELDS)
def test_nan_and_infinity_are_refused_with_400_naming_the_field(server, path, body, field, value):
    raw = json.dumps(body)[:-1] + f', "{field}": {value}}}'
    status, _, data = post(server.port, raw.encode(), path)
    assert (status, data["error"]["param"]) == (400, field), data
    assert field in data["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000,
        b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"prompt": "x", "user": ' + b"[" * 500 + b"]" * 500 + b"}",
    ],
)
def test_a_deeply_nested_body_gets_400(server, body):
    status, _, data = post(server.port, body)
    assert status == 400 and data["error"]["code"] == "invalid_json", data
    assert post(server.port, SMALL_REQUEST)[0] == 200


def test_a_body_shorter_than_its_length_gets_408_after_a_short_read_timeout(server):
    start = time.monotonic()
    status, _, body = send(server.port, raw_request(b'{"prompt": "x"', length=100))
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert time.monotonic() - start < 10
    assert post(server.port, SMALL_REQUEST)[0] == 200


def test_the_read_timeout_is_configurable(generator):
    api = launch_api(generator, model_id="tiny", port=0, read_timeout_s=0.5)
    try:
        start = time.monotonic()
        status, _, _ = send(api.port, raw_request(b"{", "/v1/chat/completions", length=50))
        assert status == 408 and time.monotonic() - start < 3
    finally:
        api.close()
    loading = ApiServer(port=0, read_timeout_s=0.5)
    try:  # while the model loads, a request is refused before its body is read
        assert send(loading.port, raw_request(b"{", length=50))[0] == 503
    finally:
        loading.close()


def test_a_plain_request_abandoned_while_it_waits_is_cancelled(server):
    scheduler = server.backend.scheduler
    before = dict(scheduler.stats.__dict__)
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
    sock.sendall(raw_request(body))
    deadline = time.monotonic() + 30
    while scheduler.stats.generated_tokens - before["generated_tokens"] < 5:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    sock.close()
    while scheduler.stats.cancelled_rows == before["cancelled_rows"] or scheduler.stats.active_rows:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert scheduler.stats.generated_tokens - before["generated_tokens"] < 200
