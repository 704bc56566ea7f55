"""The OpenAI-compatible API on the real SmolLM2-135M-Instruct: greedy replies equal batch mode's under
concurrency, and the self-instruct generator runs against it end to end, on both endpoints."""

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers.optional import import_or_skip

import generate_instruction
from alpaca.inference.batch import run_batch
from alpaca.inference.decoding import make_settings
from alpaca.inference.loading import load_generators
from alpaca.serving.server import launch_api

pytestmark = pytest.mark.realmodel

openai = import_or_skip("openai", "pip install -r requirements.txt")

REPO = Path(__file__).resolve().parents[1]
RECORDS = [
    {"instruction": "Tell me about alpacas."},
    {"instruction": "Translate the sentence into French.", "input": "Good morning, my friend."},
    {"instruction": "List three prime numbers."},
    {"instruction": "What is the capital of France?"},
]


@pytest.fixture(scope="module")
def generator(smollm2):
    return load_generators(smollm2, lora_weights="")[0]


@pytest.fixture(scope="module")
def server(generator):
    api = launch_api(generator, model_id="smollm2", port=0)
    yield api
    api.close()


def test_concurrent_greedy_chat_equals_batch_mode(server, generator, tmp_path):
    input_file, output_file = tmp_path / "in.json", tmp_path / "out.json"
    input_file.write_text(json.dumps(RECORDS))
    greedy = make_settings(temperature=0, num_beams=1, max_new_tokens=32)
    expected = [
        r["output"] for r in run_batch(generator, str(input_file), str(output_file), greedy, progress=False)
    ]
    client = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)

    def ask(record):
        messages = [{"role": "user", "content": record["instruction"]}]
        if record.get("input"):
            messages = [
                {"role": "system", "content": record["instruction"]},
                {"role": "user", "content": record["input"]},
            ]
        reply = client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=32, temperature=0
        )
        return reply.choices[0].message.content

    with ThreadPoolExecutor(len(RECORDS)) as pool:
        assert list(pool.map(ask, RECORDS)) == expected
    assert all(expected) and "alpaca" in expected[0].lower()


def run_self_instruct(server, output_dir, **flags) -> tuple[dict, list[dict]]:
    """generate_instruction.py's entry function against the server; returns (summary, regen.json)."""
    settings = dict(
        output_dir=str(output_dir),
        seed_tasks_path=str(REPO / "data" / "seed_tasks_sample.jsonl"),
        model_name="smollm2",
        base_url=server.base_url,
        num_instructions_to_generate=1,
        temperature=0.7,
        top_p=1.0,
        seed=1,
        progress=False,
        request_timeout=300,
    )
    try:
        generate_instruction.generate_instruction_following_data(**(settings | flags))
    except SystemExit as stop:  # a stall (nothing kept by --max_requests_without_new requests) is saved
        assert "kept no new instruction" in str(stop)
    summary = json.loads((output_dir / "generate_instruction_summary.json").read_text())
    regen = json.loads((output_dir / "regen.json").read_text())
    return summary, regen


def test_self_instruct_runs_against_the_api_on_both_endpoints(server, tmp_path, monkeypatch):
    from alpaca.selfinstruct.filters import rejection_reason

    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-unused")
    rows_before = server.backend.scheduler.stats.rows
    # Completions: SmolLM2 continues the numbered list; with this seed, request 1 keeps one (each request
    # carries its own seed, so its sample does not depend on what shares its batch).
    summary, regen = run_self_instruct(
        server,
        tmp_path / "completions",
        api="completions",
        num_prompt_instructions=3,
        max_tokens=200,
        request_batch_size=2,
        max_concurrent_requests=2,
        max_requests_without_new=8,
    )
    assert summary["failed_replies"] == 0 and summary["retries"] == 0
    assert summary["kept"] >= 1 and len(regen) == summary["kept"]
    for record in regen:
        assert rejection_reason(record["instruction"]) is None and set(record) >= {
            "instruction",
            "input",
            "output",
        }
    # Chat: the replies are parsed as chat replies; a 135M model rarely keeps the list format there, so
    # this checks the run end to end (every reply usable, what was kept is in regen.json), not a count.
    summary, regen = run_self_instruct(
        server,
        tmp_path / "chat",
        api="chat",
        num_prompt_instructions=2,
        max_tokens=64,
        request_batch_size=2,
        max_concurrent_requests=2,
        max_requests_without_new=2,
    )
    assert summary["failed_replies"] == 0 and summary["requests"] >= 2 and summary["completion_tokens"] > 0
    assert len(regen) == summary["kept"]
    assert server.backend.scheduler.stats.rows - rows_before >= summary["requests"] + 4
