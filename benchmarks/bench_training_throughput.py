"""Training throughput: upstream's padded batches against ours, without and with packing.

    python benchmarks/bench_training_throughput.py                       # about 2 minutes on 2 CPU cores
    python benchmarks/bench_training_throughput.py --steps=20 --repeats=3 --hidden_size=512 --num_layers=4
    python benchmarks/bench_training_throughput.py --base_model=./my-llama --threads=8
    python benchmarks/bench_training_throughput.py --base_model=... --precision=bf16 --pipelines=ours,ours+packing

Three pipelines train the same model (same initial weights, LoRA on q_proj/v_proj by default) on the
same records in the same order, `micro_batch_size` records per optimizer step:

  upstream        Alpaca-LoRA's finetune.py: its tokenization, pad id 0 on the left, and
                  `DataCollatorForSeq2Seq(pad_to_multiple_of=8)`: every batch padded to its longest
                  example (Stanford's train.py pads the same way, without the multiple of 8).
  ours            finetune.py's data pipeline and PaddingCollator (right padding, multiple of 8).
  ours+packing    finetune.py --packing: PackingCollator, one row per micro-batch, no padding.

Each pipeline runs in a fresh process, so its peak memory is its own: peak RSS on the CPU (and how
much it rose during training), `torch.cuda.max_memory_allocated` on a GPU. Throughput counts trained
tokens only (labels that are predicted, i.e. not -100 after the causal shift), so padding earns
nothing. With `--repeats` above 1 the pipelines take turns and every step keeps its fastest repeat
(the batches are the same in each), which filters out bursts of other work on a shared machine.
With one thread on the CPU the ratios use the process's CPU time, which other processes sharing the
core barely affect; wall-clock throughput is printed next to it.

Real lengths: `../shared/data/gsm8k_train_alpaca.json` when it exists, else `data/alpaca_sample.json`.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_DIR.parent / "shared" / "data" / "gsm8k_train_alpaca.json"
SAMPLE_DATA = REPO_DIR / "data" / "alpaca_sample.json"
PIPELINES = ("upstream", "ours", "ours+packing")
IGNORE_INDEX = -100

# The package is not installed; this lets the script run from any folder, like the top-level scripts.
sys.path.insert(0, str(REPO_DIR))


def default_data_path() -> str:
    return str(SHARED_DATA if SHARED_DATA.is_file() else SAMPLE_DATA)


def build_model(output_dir: Path, hidden_size: int, num_layers: int, seed: int) -> Path:
    """A small LLaMA (head size 64, LLaMA's MLP ratio) with the project's tiny tokenizer, saved to disk."""
    import torch
    from transformers import AutoModelForCausalLM

    from alpaca.tiny import build_tokenizer, tiny_config

    tokenizer = build_tokenizer(output_dir)
    config = tiny_config("llama", len(tokenizer))
    heads = max(1, hidden_size // 64)
    config.hidden_size = hidden_size
    config.intermediate_size = int(hidden_size * 8 / 3 / 16 + 0.5) * 16
    config.num_hidden_layers = num_layers
    config.num_attention_heads = heads
    config.num_key_value_heads = heads
    config.head_dim = hidden_size // heads
    config.max_position_embeddings = 2048
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(output_dir)
    return output_dir


def pick_records(data_path: str, count: int, seed: int) -> list[dict]:
    """`count` records drawn at random (fixed seed), the same list for every pipeline."""
    from alpaca.finetune.data import load_records

    records = load_records(data_path)
    random.Random(seed).shuffle(records)
    return records[:count]


def upstream_pipeline(base_model: str, records: list[dict], cutoff_len: int, micro_batch_size: int):
    """Alpaca-LoRA's data path, as its finetune.py does it (train_on_inputs=True, its default)."""
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    from alpaca.core.prompter import Prompter

    tokenizer = AutoTokenizer.from_pretrained(base_model)
    tokenizer.pad_token_id = 0
    tokenizer.padding_side = "left"
    prompter = Prompter("alpaca")

    def tokenize(record):
        prompt = prompter.generate_prompt(record["instruction"], record.get("input"), record["output"])
        result = tokenizer(prompt, truncation=True, max_length=cutoff_len, padding=False, return_tensors=None)
        if result["input_ids"][-1] != tokenizer.eos_token_id and len(result["input_ids"]) < cutoff_len:
            result["input_ids"].append(tokenizer.eos_token_id)
            result["attention_mask"].append(1)
        result["labels"] = result["input_ids"].copy()
        return dict(result)

    collator = DataCollatorForSeq2Seq(tokenizer, pad_to_multiple_of=8, return_tensors="pt", padding=True)
    examples = [tokenize(r) for r in records]
    return [collator(examples[i : i + micro_batch_size]) for i in range(0, len(examples), micro_batch_size)]


def our_pipeline(config, tokenizer, records: list[dict], packing: bool):
    """finetune.py's data path: build_datasets, then PaddingCollator or PackingCollator."""
    from alpaca.core.prompter import Prompter
    from alpaca.finetune.data import PaddingCollator, build_datasets
    from alpaca.finetune.packing import PackingCollator

    train, _, _ = build_datasets(
        records,
        tokenizer,
        Prompter(config.prompt_template_name),
        config.cutoff_len,
        config.train_on_inputs,
        0,
        0,
    )
    collator = PackingCollator() if packing else PaddingCollator(tokenizer.pad_token_id)
    size = config.micro_batch_size
    return [collator(train[i : i + size]) for i in range(0, len(train), size)]


def load_model(pipeline: str, base_model: str, use_lora: bool, cutoff_len: int, micro_batch_size: int):
    """The model as each pipeline prepares it; ours goes through finetune.py's own functions."""
    import torch

    from alpaca.finetune.model import add_lora, prepare_tokenizer_and_model
    from alpaca.finetune.resolve import resolve_config

    flags = dict(
        base_model=base_model,
        data_path=str(SAMPLE_DATA),
        output_dir=tempfile.mkdtemp(),
        use_lora=use_lora,
        cutoff_len=cutoff_len,
        micro_batch_size=micro_batch_size,
        batch_size=micro_batch_size,
        train_on_inputs=True,
        lora_dropout=0.05,
    )
    config = resolve_config(flags, {})
    if pipeline != "upstream":
        return config, *prepare_tokenizer_and_model(config, torch.float32)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    model = add_lora(model, config) if use_lora else model
    model.config.use_cache = False  # upstream sets this after building its Trainer
    return config, None, model


def measure(
    pipeline: str,
    base_model: str,
    data_path: str,
    steps: int,
    warmup_steps: int,
    micro_batch_size: int,
    cutoff_len: int,
    use_lora: bool,
    learning_rate: float,
    seed: int,
    precision: str = "fp32",
) -> dict:
    """Train one pipeline for `warmup_steps + steps` optimizer steps; time the last `steps`.

    `precision="bf16"`: bf16 autocast over fp32 weights, as finetune.py --precision=bf16 does on a CPU
    with native bf16 (on a GPU finetune.py keeps a LoRA base in bf16 instead; this measures autocast)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    config, tokenizer, model = load_model(pipeline, base_model, use_lora, cutoff_len, micro_batch_size)
    # A few spare records, since ours skips a record whose prompt alone fills cutoff_len.
    records = pick_records(data_path, (warmup_steps + steps + 2) * micro_batch_size, seed)
    if pipeline == "upstream":
        batches = upstream_pipeline(base_model, records, cutoff_len, micro_batch_size)
    else:
        batches = our_pipeline(config, tokenizer, records, packing=pipeline == "ours+packing")
    batches = batches[: warmup_steps + steps]
    if len(batches) < warmup_steps + steps:
        raise ValueError(f"--data_path={data_path!r} holds too few usable records for {steps} steps")
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trained = computed = 0
    step_seconds, step_cpu_seconds, losses = [], [], []
    for step, batch in enumerate(batches):
        start, cpu_start = time.perf_counter(), time.process_time()
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())  # waits for the GPU, so the step's time is all in
        if step >= warmup_steps:
            step_seconds.append(time.perf_counter() - start)
            step_cpu_seconds.append(time.process_time() - cpu_start)
            trained += int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
            computed += batch["input_ids"].numel()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "pipeline": pipeline,
        "device": device,
        "step_seconds": step_seconds,
        "step_cpu_seconds": step_cpu_seconds,
        "trained_tokens": trained,
        "computed_tokens": computed,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else peak_rss,
        "training_rise_mib": None if device == "cuda" else peak_rss - rss_before,
        "final_loss": losses[-1],
        "losses": losses,
        "precision": precision,
    }


def run_in_subprocess(pipeline: str, options: dict) -> dict:
    """`measure` in a fresh interpreter, so peak memory belongs to this pipeline alone."""
    args = [f"--{key}={value}" for key, value in options.items()] + [f"--only={pipeline}"]
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False, env=dict(os.environ)
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"pipeline {pipeline} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def combine_repeats(runs: list[dict]) -> dict:
    """One result from several runs of the same batches: each step's fastest time, summed.

    Every repeat trains the same batches, so a step's fastest time is its least disturbed one; on a
    shared machine this filters out bursts of other work better than keeping the fastest whole run.
    """
    combined = dict(runs[0])
    for key in ("seconds", "cpu_seconds"):
        steps = zip(*(r[f"step_{key}"] for r in runs))
        combined[key] = sum(min(times) for times in steps)
        combined[f"tokens_per_{key[:-1]}"] = combined["trained_tokens"] / combined[key]
    combined["peak_mib"] = max(r["peak_mib"] for r in runs)
    if combined["training_rise_mib"] is not None:
        combined["training_rise_mib"] = max(r["training_rise_mib"] for r in runs)
    return combined


def print_table(results: dict, repeats: int, by_cpu_time: bool) -> None:
    """One line per pipeline; the ratio uses CPU time or wall time (see the module docstring)."""
    key = "tokens_per_cpu_second" if by_cpu_time else "tokens_per_second"
    first = next(iter(results))
    base = results[first][key]
    header = (
        f"{'pipeline':<14}{'trained tok':>12}{'computed tok':>13}{'padding':>9}{'tok/CPU-s':>11}"
        f"{'tok/wall-s':>12}{'vs ' + first:>13}{'peak MiB':>10}{'train +MiB':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        padding = 1 - r["trained_tokens"] / r["computed_tokens"]
        rise = "" if r["training_rise_mib"] is None else f"{r['training_rise_mib']:.0f}"
        print(
            f"{name:<14}{r['trained_tokens']:>12}{r['computed_tokens']:>13}{padding:>9.0%}"
            f"{r['tokens_per_cpu_second']:>11.0f}{r['tokens_per_second']:>12.0f}{r[key] / base:>12.2f}x"
            f"{r['peak_mib']:>10.0f}{rise:>11}"
        )
    print(
        f"(trained tokens per second of CPU time and of wall time, each step's fastest of {repeats} "
        f"repeat(s); ratios by {'CPU' if by_cpu_time else 'wall'} time; 'padding' counts every position that is not a trained label, so it includes each "
        "example's first token and masked prompts)"
    )


def main(
    base_model: str = "",
    data_path: str = "",
    steps: int = 4,
    warmup_steps: int = 1,
    micro_batch_size: int = 4,
    cutoff_len: int = 512,
    hidden_size: int = 1024,
    num_layers: int = 2,
    use_lora: bool = True,
    learning_rate: float = 3e-4,
    repeats: int = 2,
    threads: int = 1,
    seed: int = 0,
    precision: str = "fp32",
    pipelines: str = ",".join(PIPELINES),
    only: str = "",
) -> None:
    """Measure trained tokens per second and peak memory of the three pipelines; print a table.

    Args:
        base_model: a LLaMA-type model folder; empty builds a small random LLaMA with the tiny tokenizer.
        data_path: Alpaca-format records; default GSM8K from ../shared/data, else data/alpaca_sample.json.
        steps: timed optimizer steps per pipeline (one micro-batch each).
        warmup_steps: untimed steps first (allocator and thread-pool warm-up).
        micro_batch_size: records per step, the same for every pipeline.
        cutoff_len: maximum tokens per record (Stanford's 512 keeps GSM8K whole).
        hidden_size: width of the built model (head size 64); ignored with --base_model. At 1024 the
            attention over a packed row is ~15% of a layer's work (LLaMA-7B: ~4%); narrower models
            overweight it (see docs/packing.md).
        num_layers: depth of the built model; ignored with --base_model.
        use_lora: LoRA on q_proj/v_proj (Alpaca-LoRA); False trains every weight (Stanford).
        learning_rate: AdamW learning rate.
        repeats: runs per pipeline, taken in turns; each step keeps its fastest time.
        threads: torch CPU threads (OMP_NUM_THREADS); 1 is steadiest on a shared 2-core machine.
        seed: weights, record choice and order.
        precision: fp32, or bf16 (autocast over fp32 weights, finetune.py's CPU bf16).
        pipelines: comma-separated subset of upstream, ours, ours+packing.
        only: internal: measure this one pipeline in this process and print JSON.
    """
    if only:
        import torch

        torch.set_num_threads(threads)
        options = dict(steps=steps, warmup_steps=warmup_steps, micro_batch_size=micro_batch_size)
        options.update(cutoff_len=cutoff_len, use_lora=use_lora, learning_rate=learning_rate, seed=seed)
        result = measure(only, base_model, data_path, precision=precision, **options)
        print(json.dumps(result))
        return
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    data_path = data_path or default_data_path()
    with tempfile.TemporaryDirectory() as tmp:
        if not base_model:
            base_model = str(build_model(Path(tmp) / "llama", hidden_size, num_layers, seed))
        options = dict(
            base_model=base_model,
            data_path=data_path,
            steps=steps,
            warmup_steps=warmup_steps,
            micro_batch_size=micro_batch_size,
            cutoff_len=cutoff_len,
            use_lora=use_lora,
            learning_rate=learning_rate,
            threads=threads,
            seed=seed,
            precision=precision,
        )
        chosen = (
            [name.strip() for name in pipelines.split(",") if name.strip()]
            if isinstance(pipelines, str)
            else list(pipelines)
        )
        unknown = sorted(set(chosen) - set(PIPELINES))
        if unknown or not chosen:
            raise ValueError(f"--pipelines={pipelines!r}: choose among {', '.join(PIPELINES)}")
        from transformers import AutoConfig

        model_config = AutoConfig.from_pretrained(base_model)
        print(
            f"model {model_config.model_type}: hidden {model_config.hidden_size}, "
            f"{model_config.num_hidden_layers} layers, vocab {model_config.vocab_size}; "
            f"{'LoRA q_proj,v_proj' if use_lora else 'full fine-tuning'}; data {data_path}; "
            f"{steps} timed steps of {micro_batch_size} records, cutoff_len {cutoff_len}; "
            f"{precision}; {threads} thread(s); load average before: {os.getloadavg()[0]:.1f}",
            flush=True,
        )
        runs: dict = {name: [] for name in chosen}
        for repeat in range(repeats):
            order = chosen if repeat % 2 == 0 else chosen[::-1]
            for name in order:
                result = run_in_subprocess(name, options)
                runs[name].append(result)
                wall, cpu = sum(result["step_seconds"]), sum(result["step_cpu_seconds"])
                print(
                    f"  repeat {repeat + 1} {name}: {result['trained_tokens'] / cpu:.0f} trained tok per "
                    f"CPU-second, {result['trained_tokens'] / wall:.0f} per wall-second",
                    flush=True,
                )
        results = {name: combine_repeats(found) for name, found in runs.items()}
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    by_cpu_time = threads == 1 and next(iter(results.values()))["device"] == "cpu"
    print_table(results, repeats, by_cpu_time)


if __name__ == "__main__":
    import fire

    fire.Fire(main)
