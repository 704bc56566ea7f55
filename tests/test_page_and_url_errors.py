"""Mistakes named up front: a malformed --base_url is refused before any request, and the page's API
answers a slider out of range, a missing value or NaN with an error that names the field."""

import json
import re
import time
from pathlib import Path

import pytest
from helpers.optional import import_or_skip
from helpers.ports import free_port

from alpaca.inference.decoding import DecodingSettings, GenerationLimits
from alpaca.inference.loading import load_generators

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "url", ["notaurl", "127.0.0.1:8000/v1", "ftp://host/v1", "http://", "http://host:99999/v1"]
)
def test_a_malformed_base_url_is_refused_before_any_request(tmp_path, url):
    import generate_instruction
    from alpaca.evaluation.pairwise import PairwiseConfig, run_pairwise

    started = time.monotonic()
    with pytest.raises(ValueError, match=f"--base_url={url!r} is not"):
        generate_instruction.generate_instruction_following_data(
            output_dir=str(tmp_path / "regen"),
            seed_tasks_path=str(REPO / "data" / "seed_tasks_sample.jsonl"),
            base_url=url,
            initial_retry_delay=1.0,
        )
    outputs = tmp_path / "outputs.json"
    outputs.write_text('[{"instruction": "a", "output": "b"}]')
    with pytest.raises(ValueError, match=f"--base_url={url!r} is not"):
        run_pairwise(
            PairwiseConfig(
                model_outputs=str(outputs),
                reference_outputs=str(outputs),
                output_dir=str(tmp_path / "eval"),
                base_url=url,
            )
        )
    assert time.monotonic() - started < 5  # no retries
    assert not (tmp_path / "regen").exists() and not (tmp_path / "eval").exists()


@pytest.fixture(scope="module")
def page(tiny_llama):
    import_or_skip("gradio", "pip install -r requirements.txt")
    from gradio_client import Client

    from alpaca.inference.page import build_demo, launch_demo

    limits = GenerationLimits(max_input_tokens=160, max_new_tokens=64)
    generators = load_generators(tiny_llama, lora_weights="", limits=limits)
    demo = build_demo(generators, DecodingSettings(), limits)
    launch_demo(demo, server_name="127.0.0.1", server_port=free_port(), block=False)
    try:
        yield (
            demo.local_url,
            Client(demo.local_url, verbose=False, analytics_enabled=False, download_files=False),
        )
    finally:
        demo.close()


def call_raw(url: str, args: list) -> str:
    """Call /evaluate through Gradio's HTTP API with `args` as JSON (NaN included, which
    gradio_client refuses to send); returns the event stream of the reply."""
    import urllib.request

    request = urllib.request.Request(
        url.rstrip("/") + "/gradio_api/call/evaluate",
        data=json.dumps({"data": args}).encode(),
        headers={"Content-Type": "application/json"},
    )
    event_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    with urllib.request.urlopen(
        f"{url.rstrip('/')}/gradio_api/call/evaluate/{event_id}", timeout=60
    ) as reply:
        return reply.read().decode()


# Instruction, Input, Temperature, Top p, Top k, Beams, Max tokens, Stream output, Seed
GREEDY = ("Hi", "", 0, 0.75, 40, 1, 8, False, -1)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({3: 5}, r"Top p must be a number from 0\.01 to 1, got 5"),
        ({2: -1}, r"Temperature must be a number from 0 to 1, got -1"),
        ({4: 1000}, r"Top k must be a whole number from 0 to 100, got 1000"),
        ({6: 0}, r"Max tokens must be a whole number from 1 to 64, got 0"),
        ({8: float("nan")}, r"Seed must be a whole number \(or -1 for a random seed\), got nan"),
        ({3: float("nan")}, r"Top p must be a number from 0\.01 to 1, got nan"),
        ({2: "hot"}, r"Temperature must be a number from 0 to 1, got 'hot'"),
        ({i: None for i in range(9)}, r"Temperature must be a number from 0 to 1, got None"),
    ],
)
def test_bad_page_values_get_an_error_naming_the_field(page, changes, message):
    url, client = page
    args = [changes.get(i, value) for i, value in enumerate(GREEDY)]
    for stream in (False, True):
        if 7 not in changes:
            args[7] = stream
        events = call_raw(url, args)
        assert "event: error" in events, events
        data = [line[len("data: ") :] for line in events.splitlines() if line.startswith("data: ")]
        error = json.loads(data[-1])
        assert isinstance(error, dict) and re.search(message, error["error"] or ""), events
    assert isinstance(client.predict(*GREEDY, api_name="/evaluate"), str)
