"""Our training and generation against the reference tools, on the same model, data and settings.

    # benchmark-only dependencies, kept out of the project's environment (requirements.txt never has them):
    pip install --no-deps --target ../bench_venvs/trl_pkgs trl==1.16.0      # its dependencies are ours already
    python3 -m venv --system-site-packages ../bench_venvs/llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON" ../bench_venvs/llamacpp/bin/pip install llama-cpp-python==0.3.36  # ~5-15 CPU-min

    python benchmarks/bench_peers.py training     # ours (upstream, padded, packed; fp32, bf16) vs TRL SFTTrainer
    python benchmarks/bench_peers.py generation --lora_weights=./lora-alpaca  # our batch mode (fp32, bf16;
                                                  # batch 1, 8) vs llama.cpp f16, f32, both on the merged model

Default model: SmolLM2-135M-Instruct (`python -m alpaca.default_model`); data: GSM8K from ../shared/data
when present, else data/alpaca_sample.json. Every measurement runs in a fresh process (peak RSS is its
own), one torch / llama.cpp thread unless --threads says otherwise.

Training: LoRA r=8, alpha=16, dropout 0.05 on q_proj,v_proj, the same records in the same order,
`micro_batch_size` records per optimizer step, every token trained (Alpaca-LoRA's train_on_inputs=True,
and TRL's default on a plain-text dataset), AdamW at a constant learning rate. Trained tokens are labels
that are predicted. Ours goes through benchmarks/bench_training_throughput.py (finetune.py's own data
and model code). TRL's SFTTrainer runs in its fastest CPU configuration: activation checkpointing off
(SFTConfig turns it on by default), `padding_free=True` (the same padding-free batches as our
--packing: the micro-batch's examples concatenated, with per-example position ids), and plain padding
for reference; bf16 is TrainingArguments' bf16=True (accelerate's CPU autocast, as ours).

Generation: greedy, 32 new tokens per prompt, the 8 prompts of bench_generation.py in the Alpaca
template, stop strings off. Ours: generate.py's ResponseGenerator on the merged HF folder; llama.cpp:
llama-cpp-python on our own GGUF export of the same weights (export_gguf.py, f16 and f32), one sequence
at a time (its high-level API does not batch sequences), f32 KV cache. Tokens are counted from the
outputs on both sides, so a reply that ends early at EOS counts only what it generated.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
BENCH_VENVS = REPO_DIR.parent / "bench_venvs"
TRL_PATH = BENCH_VENVS / "trl_pkgs"
LLAMACPP_PYTHON = BENCH_VENVS / "llamacpp" / "bin" / "python"
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"])

sys.path.insert(0, str(REPO_DIR))
sys.path.insert(0, str(REPO_DIR / "benchmarks"))


def default_model() -> str:
    from alpaca.default_model import default_gguf
    from alpaca.modeling import resolve_base_model

    return resolve_base_model(str(default_gguf()))[0]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_json(command: list[str], env: dict | None = None) -> dict:
    """Run `command`, return the last JSON line it printed (raise with its stderr if none)."""
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{' '.join(command[:4])} ... failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    return json.loads(lines[-1])


# Training ---------------------------------------------------------------------------------------


def measure_trl(
    base_model: str,
    data_path: str,
    steps: int,
    warmup_steps: int,
    micro_batch_size: int,
    cutoff_len: int,
    learning_rate: float,
    seed: int,
    precision: str,
    mode: str,
) -> dict:
    """TRL's SFTTrainer on the records bench_training_throughput draws; time the last `steps` steps."""
    import torch
    import trl
    from bench_training_throughput import pick_records
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from alpaca.core.prompter import Prompter

    prompter = Prompter("alpaca")
    records = pick_records(data_path, (warmup_steps + steps) * micro_batch_size, seed)
    texts = [prompter.generate_prompt(r["instruction"], r.get("input"), r["output"]) for r in records]
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32)
    config = SFTConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=warmup_steps + steps,
        per_device_train_batch_size=micro_batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_length=None
        if mode == "padding_free"
        else cutoff_len,  # TRL refuses to truncate padding-free batches
        padding_free=mode == "padding_free",
        activation_checkpointing=False,
        use_cpu=not torch.cuda.is_available(),
        bf16=precision == "bf16",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=seed,
        data_seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trained_per_batch: list[int] = []
    step_seconds: list[float] = []
    losses: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_seconds.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list([{"text": t} for t in texts]),
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
        callbacks=[Timer()],
    )
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        trained_per_batch.append(int((batch["labels"][..., 1:] != -100).sum()))
        return batch

    trainer.data_collator = counting_collator
    rss_before = peak_rss_mib()
    trainer.train()
    # accelerate may fetch one batch ahead: the first len(step_seconds) batches are the ones trained
    timed = slice(warmup_steps, len(step_seconds))
    return {
        "pipeline": f"trl {mode}",
        "trl_version": trl.__version__,
        "precision": precision,
        "trained_tokens": sum(trained_per_batch[timed]),
        "seconds": sum(step_seconds[timed]),
        "peak_mib": peak_rss_mib(),
        "training_rise_mib": peak_rss_mib() - rss_before,
        "losses": losses,
    }


def training(
    base_model: str = "",
    data_path: str = "",
    steps: int = 4,
    warmup_steps: int = 1,
    micro_batch_size: int = 4,
    cutoff_len: int = 512,
    learning_rate: float = 3e-4,
    threads: int = 1,
    seed: int = 0,
    precisions: str = "fp32,bf16",
    trl_modes: str = "padding_free,padded",
) -> list[dict]:
    """Trained tokens/s and peak RSS: upstream's padded pipeline, ours (padded, packed), TRL's SFTTrainer."""
    from bench_training_throughput import default_data_path, run_in_subprocess

    base_model = base_model or default_model()
    data_path = data_path or default_data_path()
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    common = dict(steps=steps, warmup_steps=warmup_steps, micro_batch_size=micro_batch_size)
    common.update(cutoff_len=cutoff_len, learning_rate=learning_rate, seed=seed)
    print(
        f"model {base_model}; data {data_path}; {steps} timed steps of {micro_batch_size} records; {threads} thread(s)"
    )
    results = []
    for precision in split(precisions):
        for pipeline in ("upstream", "ours", "ours+packing"):
            if pipeline == "upstream" and precision != "fp32":
                continue  # upstream trains in fp16 on a GPU; on the CPU it has fp32 only
            options = dict(
                base_model=base_model, data_path=data_path, use_lora=True, threads=threads, **common
            )
            result = run_in_subprocess(pipeline, {**options, "precision": precision})
            result["seconds"] = sum(result["step_seconds"])
            results.append(report(result, precision))
        for mode in split(trl_modes):
            if not TRL_PATH.is_dir():
                print(f"TRL skipped: {TRL_PATH} not found (see the install command at the top)")
                break
            args = [
                f"--{k}={v}" for k, v in {**common, "base_model": base_model, "data_path": data_path}.items()
            ]
            command = [sys.executable, __file__, "trl", *args, f"--precision={precision}", f"--mode={mode}"]
            result = run_json(command, env={**env, "PYTHONPATH": str(TRL_PATH)})
            results.append(report(result, precision))
    return results


def report(result: dict, precision: str) -> dict:
    row = {
        "pipeline": result["pipeline"],
        "precision": precision,
        "trained_tokens": result["trained_tokens"],
        "tokens_per_s": round(result["trained_tokens"] / result["seconds"], 1),
        "peak_rss_mib": round(result["peak_mib"]),
        "first_loss": round(result["losses"][0], 4) if result.get("losses") else None,
    }
    print(json.dumps(row), flush=True)
    return row


# Generation -------------------------------------------------------------------------------------


def measure_ours(model_folder: str, precision: str, batch_size: int, max_new_tokens: int) -> dict:
    import torch
    from bench_generation import PROMPTS

    from alpaca.inference.decoding import DecodingSettings
    from alpaca.inference.loading import load_generators

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    (generator,) = load_generators(model_folder, lora_weights="", precision=precision, stop_strings=())
    settings = DecodingSettings(temperature=0, num_beams=1, max_new_tokens=max_new_tokens)
    requests = [(prompt, None) for prompt in PROMPTS]
    generator.generate_replies(requests[:batch_size], settings)  # warm-up
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(requests), batch_size):
        tokens += sum(
            r.num_tokens for r in generator.generate_replies(requests[i : i + batch_size], settings)
        )
    seconds = time.perf_counter() - start
    return {
        "engine": "ours",
        "precision": generator.source["precision"],
        "batch_size": batch_size,
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1),
        "peak_rss_mib": round(peak_rss_mib()),
    }


LLAMACPP_SCRIPT = r"""
import json, resource, sys, time
from llama_cpp import Llama
path, threads, max_new_tokens, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
llm = Llama(model_path=path, n_ctx=1024, n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0,
            verbose=False, seed=0)
run = lambda p: llm.create_completion(p, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
run(prompts[0])  # warm-up
start, tokens, texts = time.perf_counter(), 0, []
for prompt in prompts:
    out = run(prompt)
    tokens += out["usage"]["completion_tokens"]
    texts.append(out["choices"][0]["text"])
seconds = time.perf_counter() - start
print(json.dumps({"tokens": tokens, "tokens_per_s": round(tokens / seconds, 1), "texts": texts,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
"""


def generation(
    lora_weights: str,
    base_model: str = "",
    max_new_tokens: int = 32,
    threads: int = 1,
    work_dir: str = "",
    precisions: str = "fp32,bf16",
    batch_sizes: str = "1,8",
    outtypes: str = "f32,f16",
) -> list[dict]:
    """Generated tokens/s: our batch mode (fp32, bf16; batch 1, 8) vs llama.cpp on our GGUF export.

    Both run `lora_weights` merged into `base_model`: ours from export_hf_checkpoint.py's folder (fp32),
    llama.cpp from export_gguf.py's file, so both compute with the same weights and no LoRA overhead.
    """
    from bench_generation import PROMPTS

    from alpaca.core.prompter import Prompter

    base_model = base_model or default_model()
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    os.environ.update(env)
    work = Path(work_dir or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    merged = work / "merged-fp32"
    if not (merged / "config.json").is_file():
        export = [sys.executable, str(REPO_DIR / "export_hf_checkpoint.py"), f"--base_model={base_model}"]
        export += [f"--lora_weights={lora_weights}", f"--output_dir={merged}", "--dtype=fp32", "--overwrite"]
        subprocess.run(export, check=True, capture_output=True)
    results = []
    for precision in split(precisions):
        for batch_size in split(batch_sizes):
            command = [
                sys.executable,
                __file__,
                "ours",
                f"--model_folder={merged}",
                f"--precision={precision}",
            ]
            command += [f"--batch_size={batch_size}", f"--max_new_tokens={max_new_tokens}"]
            results.append(run_json(command, env))
            print(json.dumps(results[-1]), flush=True)
    if not LLAMACPP_PYTHON.is_file():
        print(f"llama.cpp skipped: {LLAMACPP_PYTHON} not found (see the install command at the top)")
        return results
    prompter = Prompter("alpaca")
    prompts = [prompter.generate_prompt(p) for p in PROMPTS]
    for outtype in split(outtypes):
        gguf = work / f"merged-{outtype}.gguf"
        if not gguf.is_file():
            export = [sys.executable, str(REPO_DIR / "export_gguf.py"), f"--base_model={base_model}"]
            export += [f"--lora_weights={lora_weights}", f"--output_file={gguf}", f"--outtype={outtype}"]
            subprocess.run(export, check=True, capture_output=True)
        command = [str(LLAMACPP_PYTHON), "-c", LLAMACPP_SCRIPT, str(gguf), str(threads), str(max_new_tokens)]
        result = run_json([*command, json.dumps(prompts)])
        result.pop("texts")
        results.append({"engine": f"llama.cpp {outtype}", "batch_size": 1, **result})
        print(json.dumps(results[-1]), flush=True)
    return results


def split(value) -> list:
    return [
        v.strip() if isinstance(v, str) else v
        for v in (value.split(",") if isinstance(value, str) else value)
    ]


if __name__ == "__main__":
    import fire

    def print_json(result):
        print(json.dumps(result))

    fire.Fire(
        {
            "training": lambda **kw: print_json(training(**kw)),
            "generation": lambda **kw: print_json(generation(**kw)),
            "trl": lambda **kw: print_json(measure_trl(**kw)),
            "ours": lambda **kw: print_json(measure_ours(**kw)),
        }
    )
