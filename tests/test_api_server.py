"""The OpenAI-compatible API (`generate.py --api`) on the tiny model, through the real `openai` client,
raw HTTP and curl, against a server on 127.0.0.1."""

import asyncio
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers.optional import import_or_skip
from helpers.ports import free_port

from alpaca.inference.batch import run_batch
from alpaca.inference.decoding import make_settings
from alpaca.inference.loading import load_generators
from alpaca.serving.server import ApiServer, launch_api

openai = import_or_skip("openai", "pip install -r requirements.txt")

# server tests: an HTTP server on a real port (make test-fast skips them)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL_ID = "tiny-alpaca"
RECORDS = [
    {"instruction": "Tell me about alpacas."},
    {"instruction": "Translate the sentence into French.", "input": "Good morning, my friend."},
    {"instruction": "List three prime numbers."},
    {"instruction": "Summarize the text.", "input": "The quick brown fox jumps over the lazy dog."},
    {"instruction": "Write a haiku about the sea."},
    {"instruction": "What is the capital of France?"},
    {"instruction": "Classify the word as noun or verb.", "input": "run"},
    {"instruction": "Explain why the sky is blue in one sentence."},
]
MAX_TOKENS = 24


def messages_of(record: dict) -> list[dict]:
    """A record as chat turns: with an input, the instruction is the system message."""
    if record.get("input"):
        return [
            {"role": "system", "content": record["instruction"]},
            {"role": "user", "content": record["input"]},
        ]
    return [{"role": "user", "content": record["instruction"]}]


@pytest.fixture(scope="module")
def generator(tiny_llama):
    return load_generators(tiny_llama, lora_weights="")[0]


@pytest.fixture(scope="module")
def server(generator):
    # A longer wait than the default makes the batching assertions independent of thread timing.
    api = launch_api(generator, model_id=MODEL_ID, host="127.0.0.1", port=0, max_wait_ms=50)
    yield api
    api.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def stats(server) -> dict:
    return dict(server.backend.scheduler.stats.__dict__)


def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request(
        "POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})}
    )
    response = connection.getresponse()
    data = json.loads(response.read())
    connection.close()
    return response.status, data, dict(response.getheaders())


def test_models_and_loopback_bind(server, client):
    assert [model.id for model in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout.split("\n")
    local = {
        line.split()[3] for line in listening if line.split() and line.split()[3].endswith(f":{server.port}")
    }
    assert local == {f"127.0.0.1:{server.port}"}


def test_greedy_chat_equals_batch_mode_alone_and_concurrently(server, client, generator, tmp_path):
    input_file, output_file = tmp_path / "in.json", tmp_path / "out.json"
    input_file.write_text(json.dumps(RECORDS))
    greedy = make_settings(temperature=0, num_beams=1, max_new_tokens=MAX_TOKENS)
    batch = [
        r["output"] for r in run_batch(generator, str(input_file), str(output_file), greedy, progress=False)
    ]

    def ask(record):
        reply = client.chat.completions.create(
            model=MODEL_ID, messages=messages_of(record), max_tokens=MAX_TOKENS, temperature=0
        )
        return reply.choices[0].message.content

    alone = [ask(record) for record in RECORDS]
    assert alone == batch
    before = stats(server)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, RECORDS))
    after = stats(server)
    assert together == batch
    # Shared forward passes: 8 requests in fewer batches and far fewer steps than one at a time.
    assert after["largest_batch"] >= 4
    assert after["batches"] - before["batches"] <= 3
    assert after["steps"] - before["steps"] <= 3 * MAX_TOKENS

    async def stream_all():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)

        async def one(record):
            chunks = await aclient.chat.completions.create(
                model=MODEL_ID,
                messages=messages_of(record),
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
            )
            return "".join([chunk.choices[0].delta.content or "" async for chunk in chunks if chunk.choices])

        try:
            return await asyncio.gather(*(one(record) for record in RECORDS))
        finally:
            await aclient.close()

    assert asyncio.run(stream_all()) == batch


def test_completion_parameters_are_honoured(server, client, generator):
    prompt = "Alpacas are"
    plain = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
    choice = plain.choices[0]
    assert plain.object == "text_completion" and choice.finish_reason == "length"
    prompt_tokens = len(generator.tokenizer(prompt)["input_ids"])
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens, plain.usage.total_tokens) == (
        prompt_tokens,
        12,
        prompt_tokens + 12,
    )
    # stop: the text ends before the stop string, which is left out.
    stop = choice.text[5:9]
    stopped = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0, stop=[stop]
    )
    assert stopped.choices[0].text == choice.text[: choice.text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # top_p that keeps only the most likely token is greedy, at any temperature.
    narrow = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=1.5, top_p=1e-6
    )
    assert narrow.choices[0].text == choice.text
    # seed: the same seed gives the same sample, n gives n choices, other seeds other samples.
    sampled = [
        client.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=1.0, seed=seed, n=2
        )
        for seed in (7, 7, 8)
    ]
    texts = [[c.text for c in sorted(reply.choices, key=lambda c: c.index)] for reply in sampled]
    assert texts[0] == texts[1] and texts[0] != texts[2] and texts[0][0] != texts[0][1]
    assert sampled[0].usage.completion_tokens == 24
    # logprobs: greedy tokens are the most likely ones, and their texts make up the reply.
    scored = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0, logprobs=2
    )
    logprobs = scored.choices[0].logprobs
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.token_logprobs) == 12 and all(lp < 0 for lp in logprobs.token_logprobs)
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert (
            len(top) == 2
            and max(top.values()) == pytest.approx(logprob)
            and top[token] == pytest.approx(logprob)
        )
    # a list of prompts: one choice per prompt, in order.
    two = client.completions.create(model=MODEL_ID, prompt=[prompt, "Hello"], max_tokens=12, temperature=0)
    assert [c.index for c in two.choices] == [0, 1] and two.choices[0].text == choice.text


def test_async_streaming_completion_equals_the_plain_reply(server, client):
    plain = client.completions.create(model=MODEL_ID, prompt="The sea", max_tokens=16, temperature=0)

    async def stream():
        aclient = openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        try:
            chunks = await aclient.completions.create(
                model=MODEL_ID,
                prompt="The sea",
                max_tokens=16,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            return [chunk async for chunk in chunks]
        finally:
            await aclient.close()

    chunks = asyncio.run(stream())
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16 and len(chunks) > 3


def test_curl_streams_server_sent_events(server):
    body = json.dumps(
        {"model": MODEL_ID, "messages": messages_of(RECORDS[0]), "max_tokens": 8, "stream": True}
    )
    result = subprocess.run(
        [
            "curl",
            "-sN",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
            f"{server.base_url}/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    events = [line[len("data: ") :] for line in result.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert (
        chunks[0]["object"] == "chat.completion.chunk"
        and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    )
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    bad = subprocess.run(
        ["curl", "-s", "-w", "\n%{http_code}", "-d", "{not json", f"{server.base_url}/completions"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    text, status = bad.stdout.rsplit("\n", 1)
    assert status == "400" and json.loads(text)["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", b'{"model": "tiny-alpaca", "prompt": ', 400, None),
        ("/v1/completions", b"\xff\xfe", 400, None),
        ("/v1/completions", b'["a list"]', 400, None),
        ("/v1/completions", json.dumps({"model": "gpt-4", "prompt": "x"}).encode(), 404, "model"),
        ("/v1/completions", json.dumps({"prompt": "x", "temperature": 3}).encode(), 400, "temperature"),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 100000}).encode(), 400, "max_tokens"),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": "8"}).encode(), 400, "max_tokens"),
        ("/v1/completions", json.dumps({"prompt": "x", "echo": True}).encode(), 400, "echo"),
        (
            "/v1/completions",
            json.dumps({"prompt": "x", "logprobs": 1, "stream": True}).encode(),
            400,
            "logprobs",
        ),
        ("/v1/completions", json.dumps({"prompt": "word " * 2000}).encode(), 400, "prompt"),
        ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, "messages"),
        (
            "/v1/chat/completions",
            json.dumps({"messages": [{"role": "assistant", "content": "x"}]}).encode(),
            400,
            "messages",
        ),
        (
            "/v1/chat/completions",
            json.dumps({"messages": [{"role": "user", "content": "x"}], "n": 0}).encode(),
            400,
            "n",
        ),
        ("/v1/nowhere", b"{}", 404, None),
    ],
)
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(
    server, client, path, body, status, param
):
    got, data, _ = post(server, path, body)
    assert got == status
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["param"] == param
    assert client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2).choices[0].finish_reason


def test_oversized_body_is_refused_unread_with_413(server, client):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Content-Length", str(server.max_request_bytes + 1))
    connection.endheaders()
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    assert client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def open_stream(server, body: dict) -> tuple[socket.socket, io.BufferedReader]:
    """A streaming completion request on a plain socket, its status line read; the caller closes it."""
    data = json.dumps({"stream": True, **body}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"HTTP/1.1 200")
    return sock, reader


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, client):
    before = stats(server)
    sock, reader = open_stream(server, {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0})
    events = []
    for _ in range(3):
        line = reader.readline()
        while not line.startswith(b"data: "):
            line = reader.readline()
        events.append(line)
    assert all(event.startswith(b"data: {") for event in events)
    reader.close()
    sock.close()
    wait_until(lambda: stats(server)["cancelled_rows"] == before["cancelled_rows"] + 1)
    wait_until(lambda: stats(server)["active_rows"] == 0)
    assert stats(server)["generated_tokens"] - before["generated_tokens"] < 200
    assert client.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=3).usage.completion_tokens == 3


def test_a_request_joins_the_running_batch_and_neither_reply_changes(server, client):
    """Continuous batching: a request sent while a long one is being generated joins its batch at the next
    step and comes back before the long one ends; both replies are exactly what each gives alone."""
    long_prompt, short_prompt = "Once upon a time", "The capital of France is"

    def ask(prompt, max_tokens):
        return client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0)

    long_alone, short_alone = ask(long_prompt, 300).choices[0].text, ask(short_prompt, 8).choices[0].text
    before = stats(server)
    finished = {}

    def stream_long():
        parts = []
        for chunk in client.completions.create(
            model=MODEL_ID, prompt=long_prompt, max_tokens=300, temperature=0, stream=True
        ):
            parts.append(chunk.choices[0].text if chunk.choices else "")
        finished["long"] = time.monotonic()
        return "".join(parts)

    with ThreadPoolExecutor(1) as pool:
        long_future = pool.submit(stream_long)
        wait_until(lambda: stats(server)["generated_tokens"] - before["generated_tokens"] >= 5)
        short = ask(short_prompt, 8).choices[0].text
        finished["short"] = time.monotonic()
        assert not long_future.done()  # the long reply is still being generated
        long_text = long_future.result(timeout=120)
    after = stats(server)
    assert finished["short"] < finished["long"]
    assert after["joins"] - before["joins"] == 1 and after["batches"] - before["batches"] == 1
    assert after["largest_batch"] >= 2
    assert short == short_alone and long_text == long_alone


def test_a_full_queue_gets_429_and_loading_gets_503(generator):
    api = launch_api(generator, model_id=MODEL_ID, port=0, max_batch_size=1, max_queue_size=2)
    try:
        sock, reader = open_stream(api, {"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0})
        wait_until(lambda: api.backend.scheduler.stats.active_rows == 1)
        waiting = ThreadPoolExecutor(2)
        queued = [
            waiting.submit(post, api, "/v1/completions", b'{"prompt": "Hi", "max_tokens": 1}') for _ in "ab"
        ]
        wait_until(lambda: api.backend.scheduler.stats.queued_rows == 2)
        status, data, headers = post(api, "/v1/completions", b'{"prompt": "Hi", "max_tokens": 1}')
        assert status == 429 and data["error"]["code"] == "queue_full" and headers["Retry-After"] == "1"
        reader.close()
        sock.close()
        assert [future.result()[0] for future in queued] == [200, 200]
    finally:
        api.close()
    loading = ApiServer(port=0)
    try:
        status, data, headers = post(loading, "/v1/chat/completions", b"{}")
        assert status == 503 and data["error"]["code"] == "model_loading" and "Retry-After" in headers
    finally:
        loading.close()


def test_the_key_is_required_when_set_and_never_logged(generator, caplog):
    key = "sk-local-SECRET-4242"
    api = launch_api(generator, model_id=MODEL_ID, port=0, api_key=key)
    caplog.set_level("INFO", logger="alpaca.serving")
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            status, data, _ = post(api, "/v1/completions", b'{"prompt": "Hi", "max_tokens": 1}', headers)
            assert status == 401 and data["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=api.base_url, api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=api.base_url, api_key=key, max_retries=0)
        assert (
            keyed.completions.create(model=MODEL_ID, prompt="Hi", max_tokens=2).usage.completion_tokens == 2
        )
    finally:
        api.close()
    assert (
        '"POST /v1/completions HTTP/1.1" 401' in caplog.text
        and '"POST /v1/completions HTTP/1.1" 200' in caplog.text
    )
    assert key not in caplog.text


def test_generate_py_api_binds_loopback_requires_the_key_and_never_logs_it(tiny_llama, tmp_path):
    """The real command line: `generate.py --api` with the key in ALPACA_API_KEY, stopped with Ctrl-C."""
    key = "sk-local-SECRET-9876"
    port = free_port()
    log = open(tmp_path / "server.log", "w+")
    process = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "generate.py"),
            "--api",
            f"--base_model={tiny_llama}",
            "--lora_weights=",
            f"--server_port={port}",
            "--served_model_name=tiny",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "ALPACA_API_KEY": key},
    )
    try:
        base = f"http://127.0.0.1:{port}"

        def curl(*args) -> tuple[str, str]:
            result = subprocess.run(
                ["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True
            )
            body, _, status = result.stdout.rpartition("\n")
            return status, body

        wait_until(lambda: curl(f"{base}/health") == ("200", '{"status": "ok"}'), timeout_s=60)
        status, body = curl(f"{base}/v1/models")
        assert status == "401" and json.loads(body)["error"]["code"] == "invalid_api_key"
        chat = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        status, body = curl("-H", f"Authorization: Bearer {key}", "-d", chat, f"{base}/v1/chat/completions")
        assert status == "200" and json.loads(body)["usage"]["completion_tokens"] == 4
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
        assert {
            line.split()[3] for line in listening.splitlines() if line.split()[3].endswith(f":{port}")
        } == {f"127.0.0.1:{port}"}
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
        log.close()
    output = (tmp_path / "server.log").read_text()
    assert '"GET /v1/models HTTP/1.1" 401' in output and '"POST /v1/chat/completions HTTP/1.1" 200' in output
    assert key not in output


def test_api_flag_mistakes_are_named(tiny_llama):
    import generate

    with pytest.raises(
        ValueError, match="--chat_format must be one of template, tokenizer.*--max_batch_size"
    ):
        generate.main(
            base_model=tiny_llama, lora_weights="", api=True, chat_format="chatml", max_batch_size=0
        )
    with pytest.raises(
        ValueError, match="--chat_format=tokenizer: the tokenizer of --base_model has no chat"
    ):
        generate.main(
            base_model=tiny_llama, lora_weights="", api=True, chat_format="tokenizer", server_port=free_port()
        )


def test_a_lora_adapter_is_served_with_its_own_replies(tiny_llama, tiny_llama_adapter, server, client):
    """Base + LoRA through the same loading path: the API answers with the adapter switched on."""
    adapted = load_generators(tiny_llama, lora_weights=tiny_llama_adapter)[0]
    api = launch_api(adapted, port=0)
    try:
        lora_client = openai.OpenAI(base_url=api.base_url, api_key="unused", max_retries=0)
        model = lora_client.models.list().data[0].id
        assert model == adapted.name and model.endswith("lora")
        messages = messages_of(RECORDS[0])
        reply = lora_client.chat.completions.create(
            model=model, messages=messages, max_tokens=16, temperature=0
        )
        greedy = make_settings(temperature=0, num_beams=1, max_new_tokens=16)
        assert reply.choices[0].message.content == adapted.generate(RECORDS[0]["instruction"], None, greedy)
        base = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=16, temperature=0)
        assert base.choices[0].message.content != reply.choices[0].message.content
    finally:
        api.close()
