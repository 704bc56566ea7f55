"""The offline loop of issue 11 on the real model: self-instruct from generate.py --api, fine-tune on
what was kept, generate with base and base + LoRA, judge them with the same local server, leaderboard.
A 135M teacher and judge make this a pipeline check; the test asserts on the files each step writes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.realmodel
def test_offline_loop_runs_end_to_end(smollm2, tmp_path):
    from alpaca.default_model import default_gguf

    out = tmp_path / "loop"
    result = subprocess.run(
        [sys.executable, "-m", "alpaca.offline_loop", f"--output_dir={out}", "--num_instructions=2"]
        + ["--num_eval=4", "--max_new_tokens=32", f"--base_model={default_gguf()}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "they are not a measure of quality" in result.stdout
    regen = json.loads((out / "selfinstruct" / "regen.json").read_text())
    assert len(regen) >= 1 and all(r["instruction"].strip() and "output" in r for r in regen)
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    eval_set = json.loads((out / "eval_instructions.json").read_text())
    for name in ("base", "lora"):
        outputs = json.loads((out / f"outputs_{name}.json").read_text())
        assert [o["instruction"] for o in outputs] == [e["instruction"] for e in eval_set]
        assert {o["generator"] for o in outputs} == {f"smollm2-{name}"}
    results = json.loads((out / "judged-lora-vs-base" / "results.json").read_text())
    assert results["n_pairs"] == 4
    counts = ("n_wins", "n_losses", "n_ties", "n_unparseable")
    assert sum(results[k] for k in counts) == 4
    assert "smollm2-lora" in (out / "leaderboard.md").read_text()
    summary = json.loads((out / "loop_summary.json").read_text())
    assert summary["self_instructed"] == len(regen) and summary["n_pairs"] == 4
