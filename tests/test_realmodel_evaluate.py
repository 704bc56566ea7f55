"""Real-model tier for evaluate.py: SmolLM2-135M-Instruct, served by `generate.py --api`, judges a few pairs.

A 135M judge cannot tell good answers from bad ones (it mostly names Output (a) whatever is shown, so
pairs come out as ties): these numbers are only a pipeline check of `evaluate.py pairwise` against a
real local model behind a real OpenAI-compatible server, never a measure of quality.
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.ports import free_port

REPO = Path(__file__).resolve().parent.parent
PIPELINE_NOTE = (
    "NOTE: the judge is SmolLM2-135M: its win rate is only a pipeline check, not a measure of quality."
)

PAIRS = [
    ("What is the capital of France?", "", "The capital of France is Paris.", "Bananas are yellow."),
    ("Add the two numbers.", "12 and 30", "12 + 30 = 42.", "The numbers are big."),
    ("Give a synonym for 'happy'.", "", "Joyful.", "Sad."),
]


def wait_for_models(base_url: str, process: subprocess.Popen, timeout_s: float = 240.0) -> list[str]:
    """The model ids of the server once it answers /v1/models (it answers 503 while loading)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"generate.py --api exited with {process.returncode}"
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=5) as reply:
                return [model["id"] for model in json.loads(reply.read())["data"]]
        except OSError:
            time.sleep(0.5)
    raise AssertionError("generate.py --api did not start serving in time")


@pytest.mark.realmodel
def test_smollm2_served_by_generate_api_judges_a_few_pairs(smollm2, tmp_path):
    model = [
        {"instruction": i, "input": x, "output": good, "generator": "good-answers"} for i, x, good, _ in PAIRS
    ]
    reference = [
        {"instruction": i, "input": x, "output": bad, "generator": "bad-answers"} for i, x, _, bad in PAIRS
    ]
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "reference.json").write_text(json.dumps(reference))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    server = subprocess.Popen(
        [
            sys.executable,
            "generate.py",
            "--api",
            f"--base_model={smollm2}",
            "--lora_weights=",
            f"--server_port={port}",
            "--chat_format=tokenizer",
            "--served_model_name=smollm2-judge",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_models(base_url, server) == ["smollm2-judge"]
        started = time.monotonic()
        result = subprocess.run(
            [
                sys.executable,
                "evaluate.py",
                "pairwise",
                f"--model_outputs={tmp_path / 'model.json'}",
                f"--reference_outputs={tmp_path / 'reference.json'}",
                f"--output_dir={tmp_path / 'judged'}",
                f"--base_url={base_url}",
                "--judge_model=smollm2-judge",
                "--max_tokens=8",
                "--progress=False",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        seconds = time.monotonic() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    print(result.stdout)
    print(PIPELINE_NOTE)
    print(f"judging took {seconds:.1f}s")
    results = json.loads((tmp_path / "judged" / "results.json").read_text())
    annotations = json.loads((tmp_path / "judged" / "annotations.json").read_text())
    counts = [results[key] for key in ("n_wins", "n_losses", "n_ties", "n_unparseable")]
    assert results["complete"] and results["n_pairs"] == 3 and sum(counts) == 3
    assert (
        results["judge_model"] == "smollm2-judge" and results["cost"]["usd"] is None
    )  # a local model has no price
    assert results["cost"]["prompt_tokens"] > 0 and results["cost"]["completion_tokens"] > 0
    for record in annotations:
        assert all(isinstance(text, str) and text.strip() for text in record["raw_completion"].values())
        assert record["preference"] in (1.0, 1.5, 2.0, None)
    journal = (tmp_path / "judged" / "judge_journal.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 6  # the header, then both orders of the three pairs, each once
