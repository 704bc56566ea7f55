"""The real Gradio server on 127.0.0.1 with the tiny LLaMA and a trained tiny adapter, called through
`gradio_client`, as a user's script would."""

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers.optional import import_or_skip
from helpers.ports import free_port
from helpers.tiny_trained import TRAINED_ANSWERS

from alpaca.inference.decoding import DecodingSettings, GenerationLimits, make_settings

gr = import_or_skip("gradio", "pip install -r requirements.txt")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError, AuthenticationError  # noqa: E402

from alpaca.inference.page import (  # noqa: E402
    EXAMPLE_INSTRUCTIONS,
    build_demo,
    check_port_free,
    launch_demo,
    parse_auth,
    request_body_limit,
)

# server tests: a Gradio server on a real port (make test-fast skips them)
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LIMITS = GenerationLimits(max_input_tokens=160, max_new_tokens=64)
# Instruction, Input, Temperature, Top p, Top k, Beams, Max tokens, Stream output, Seed
GREEDY = (0, 0.75, 40, 1, 24, False, -1)


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port`, from the kernel's socket tables."""
    addresses = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        if not os.path.exists(table):
            continue
        with open(table) as file:
            for line in file.readlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].split(":")
                if fields[3] == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    if width == 8:
                        addresses.add(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
                    else:
                        addresses.add("ipv6:" + address)
    return addresses


def connect(url: str, **kwargs) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=False, **kwargs)


@pytest.fixture(scope="module")
def server(generators):
    demo = build_demo(generators, DecodingSettings(), LIMITS)
    launch_demo(
        demo,
        server_name="127.0.0.1",
        server_port=free_port(),
        concurrency_limit=4,
        block=False,
        max_request_bytes=request_body_limit(LIMITS),
    )
    try:
        yield demo
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server):
    return connect(server.local_url)


def page_components(demo) -> dict:
    return {c.get("props", {}).get("label"): c["props"] for c in demo.config["components"]}


def test_page_has_upstream_inputs_and_defaults(generators):
    demo = build_demo(generators[:1], DecodingSettings(), GenerationLimits())
    components = page_components(demo)
    expected = {"Temperature": 0.1, "Top p": 0.75, "Top k": 40, "Beams": 4, "Max tokens": 128}
    for label, value in expected.items():
        assert components[label]["value"] == value, label
    assert {"Instruction", "Input", "Stream output", "Output", "Seed"} <= set(components)
    assert components["Stream output"]["value"] is False
    examples = next(c for c in demo.config["components"] if c.get("type") == "dataset")
    assert [row[0] for row in examples["props"]["samples"]] == EXAMPLE_INSTRUCTIONS
    assert "Compare" not in str(demo.config)  # one model: no comparison tab
    # The server's limit caps the Max tokens slider.
    capped = page_components(build_demo(generators[:1], DecodingSettings(), LIMITS))["Max tokens"]
    assert capped["maximum"] == capped["value"] == LIMITS.max_new_tokens


def test_binds_loopback_only(server):
    assert server.server_name == "127.0.0.1"
    assert listening_addresses(server.server_port) == {"127.0.0.1"}


def test_plain_reply_is_the_trained_answer_and_repeats(client):
    for instruction, input, answer in TRAINED_ANSWERS:
        assert client.predict(instruction, input, *GREEDY, api_name="/evaluate") == answer
    assert client.predict(TRAINED_ANSWERS[0][0], "", *GREEDY, api_name="/evaluate") == TRAINED_ANSWERS[0][2]


def test_input_may_be_omitted(client):
    instruction, _, answer = TRAINED_ANSWERS[0]
    reply = client.predict(
        instruction=instruction, temperature=0, num_beams=1, max_new_tokens=24, api_name="/evaluate"
    )
    assert reply == answer


def post(server, body, chunked=False) -> tuple[int, bytes]:
    """POST `body` to the queue endpoint, with a Content-Length or (chunked) without one."""
    connection = http.client.HTTPConnection("127.0.0.1", server.server_port, timeout=60)
    try:
        path = "/gradio_api/queue/join"
        headers = {"Content-Type": "application/json"}
        if chunked:
            pieces = (body[i : i + 65536] for i in range(0, len(body), 65536))
            connection.request("POST", path, body=pieces, headers=headers, encode_chunked=True)
        else:
            connection.request("POST", path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    except (BrokenPipeError, ConnectionResetError):  # refused before the whole body was sent
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_oversized_request_bodies_are_refused_unread(server, client):
    """Gradio has no body limit of its own: a 4 MB instruction was read, queued and tokenized."""
    limit = request_body_limit(LIMITS)
    body = b'{"data": ["' + b"word " * 800_000 + b'"], "fn_index": 0, "session_hash": "x"}'
    assert len(body) > limit
    for chunked in (False, True):
        status, answer = post(server, body, chunked=chunked)
        assert status == 413 and b"--max_input_tokens" in answer, (chunked, status, answer[:200])
    # A chunked body under the limit reaches the app whole.
    join = {"data": ["Hi", "", *GREEDY], "fn_index": 0, "session_hash": "chunked", "event_data": None}
    status, answer = post(server, json.dumps(join).encode(), chunked=True)
    assert status == 200 and b"event_id" in answer, answer[:200]
    assert client.predict(*TRAINED_ANSWERS[0][:2], *GREEDY, api_name="/evaluate") == TRAINED_ANSWERS[0][2]


def test_long_text_under_the_body_limit_is_refused_by_characters(client):
    with pytest.raises(AppError, match=r"characters long, far over the limit of 160 tokens"):
        client.predict("word " * 2000, "", *GREEDY, api_name="/evaluate")


def test_a_port_in_use_is_named(server, generators):
    port = server.server_port
    with pytest.raises(
        ValueError, match=rf"--server_port={port}: port {port} on 127.0.0.1 is already in use"
    ):
        check_port_free("127.0.0.1", port)
    with pytest.raises(ValueError, match=rf"--server_port={port}: .*pick another with --server_port"):
        launch_demo(build_demo(generators[:1], DecodingSettings(), LIMITS), server_port=port, block=False)
    check_port_free("127.0.0.1", free_port())


def test_analytics_are_off_unless_the_user_turns_them_on():
    code = (
        "import os; os.environ.pop('GRADIO_ANALYTICS_ENABLED', None); import alpaca.inference.page, gradio as gr; "
        "print(os.environ['GRADIO_ANALYTICS_ENABLED'], gr.Blocks().analytics_enabled)"
    )
    env = {key: value for key, value in os.environ.items() if key != "GRADIO_ANALYTICS_ENABLED"}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "False"]


def test_streamed_reply_grows_to_the_answer(client):
    instruction, input, answer = TRAINED_ANSWERS[0]
    job = client.submit(instruction, input, 0, 0.75, 40, 4, 24, True, -1, api_name="/evaluate")
    final = job.result(timeout=60)
    updates = [update for update in job.outputs() if update]
    assert final == answer == updates[-1]
    assert len(updates) > 3 and all(later.startswith(earlier) for earlier, later in zip(updates, updates[1:]))


def test_sampling_follows_the_seed(client):
    def sample(seed):
        return client.predict("Hi", "", 1.0, 1.0, 0, 1, 24, False, seed, api_name="/evaluate")

    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) == 3


def test_eight_concurrent_clients_are_all_answered(server, generators):
    requests = [(instruction, input) for instruction, input, _ in TRAINED_ANSWERS] + [
        (text, "") for text in EXAMPLE_INSTRUCTIONS[1:6]
    ]
    settings = make_settings(*GREEDY[:5], limits=LIMITS)
    expected = [generators[0].generate(instruction, input, settings) for instruction, input in requests]

    def ask(request):
        return connect(server.local_url).predict(*request, *GREEDY, api_name="/evaluate")

    with ThreadPoolExecutor(max_workers=8) as pool:
        replies = list(pool.map(ask, requests))
    assert len(requests) == 8 and replies == expected


def test_compare_tab_answers_with_every_model(client, generators):
    outputs = client.predict(TRAINED_ANSWERS[0][0], "", *GREEDY[:5], -1, api_name="/compare")
    assert len(outputs) == len(generators) == 3
    assert outputs[0] == TRAINED_ANSWERS[0][2]
    assert outputs[1] != outputs[0] and outputs[2] not in outputs[:2]  # random adapter; base alone
    settings = make_settings(*GREEDY[:5], limits=LIMITS)
    assert list(outputs) == [g.generate(TRAINED_ANSWERS[0][0], "", settings) for g in generators]


@pytest.mark.parametrize(
    "args, message",
    [
        (("   ", "", *GREEDY), "the instruction is empty"),
        (("Tell me about alpacas.", "word " * 200, *GREEDY), "over the limit of 160 tokens"),
        # gradio itself checks a slider's range; our own check names the flag
        (("Hi", "", 0, 0.75, 40, 1, 500, False, -1), r"(maximum value 64|from 1 to 64)"),
        (("Hi", "", 0, 0.75, 40, 9, 24, False, -1), r"(maximum value 4|Beams)"),
        (("Hi", "", 0, 0.75, 40, 1.5, 24, False, -1), "whole number from 1 to 4"),
    ],
)
def test_bad_requests_get_a_message_and_the_server_lives_on(client, args, message):
    with pytest.raises(AppError, match=message) as err:
        client.predict(*args, api_name="/evaluate")
    assert "Traceback" not in str(err.value)
    assert client.predict(*TRAINED_ANSWERS[0][:2], *GREEDY, api_name="/evaluate") == TRAINED_ANSWERS[0][2]


def test_unexpected_failure_is_one_line_in_the_page(client, generators, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("device lost\n  File 'secret.py', line 1")

    monkeypatch.setattr(generators[0], "generate", broken)
    with pytest.raises(AppError) as err:
        client.predict("Hi", "", *GREEDY, api_name="/evaluate")
    assert "Generation failed (RuntimeError: device lost)" in str(err.value)
    assert "secret.py" not in str(err.value)
    monkeypatch.undo()
    assert client.predict(*TRAINED_ANSWERS[0][:2], *GREEDY, api_name="/evaluate") == TRAINED_ANSWERS[0][2]


def test_auth_is_required_when_set(generators, monkeypatch):
    monkeypatch.setenv("ALPACA_DEMO_AUTH", "alpaca:s3cret")
    auth = parse_auth("")
    assert auth == ("alpaca", "s3cret")
    with pytest.raises(ValueError, match="user:password"):
        parse_auth("no-colon")
    demo = launch_demo(
        build_demo(generators[:1], DecodingSettings(), LIMITS),
        server_port=free_port(),
        auth=auth,
        block=False,
    )
    try:
        with pytest.raises((AuthenticationError, ValueError)):
            connect(demo.local_url)
        with pytest.raises((AuthenticationError, ValueError)):
            connect(demo.local_url, auth=("alpaca", "wrong"))
        reply = connect(demo.local_url, auth=auth).predict(
            *TRAINED_ANSWERS[0][:2], *GREEDY, api_name="/evaluate"
        )
        assert reply == TRAINED_ANSWERS[0][2]
    finally:
        demo.close()


def test_generate_py_serves_on_loopback_by_default(tiny_llama, trained_adapter):
    """The real command line: `python generate.py --base_model=... --lora_weights=...`."""
    port = free_port()
    command = [
        sys.executable,
        "generate.py",
        f"--base_model={tiny_llama}",
        f"--lora_weights={trained_adapter}",
        f"--server_port={port}",
    ]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 90
        while not listening_addresses(port):
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "generate.py did not start serving in 90 s"
            time.sleep(0.25)
        assert listening_addresses(port) == {"127.0.0.1"}
        client = connect(f"http://127.0.0.1:{port}/")
        assert client.predict(*TRAINED_ANSWERS[1][:2], *GREEDY, api_name="/evaluate") == TRAINED_ANSWERS[1][2]
    finally:
        process.terminate()
        process.wait(timeout=30)
