"""transformers' own continuous batching (`generate_batch`) against the API's scheduler, on the CPU, with
a LoRA adapter: are greedy replies those of `generate` alone, and which decodes more tokens per second?

    OMP_NUM_THREADS=1 python benchmarks/bench_transformers_cb.py                  # tiny LLaMA, then SmolLM2
    python benchmarks/bench_transformers_cb.py --base_models=tiny --requests=16

Each model is loaded with a LoRA adapter (a random one on q_proj/v_proj, as in the tests) through
`load_generators`, as `generate.py --api` loads it. The same `--requests` Alpaca prompts (greedy, at most
`--max_tokens` new tokens, EOS ends a reply) go all at once to (a) `BatchScheduler` (no HTTP; at most 8
rows together) and (b) `model.generate_batch` (at most 8 requests per batch; its paged cache sized for
the work, since its default sizes the cache from free memory and took 25-50 s to set up on the tiny
model). Both are compared with `model.generate` on each prompt alone. See docs/api.md ("Why not
transformers' continuous batching").
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # helpers.adapters: the tests' random LoRA adapter

from prompts import PROMPTS  # noqa: E402  (benchmarks/ is on the path when run as a script)


def alone(generator, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    import torch

    eos = generator.tokenizer.eos_token_id
    replies = []
    for ids in prompts:
        with torch.no_grad():
            out = generator.model.generate(
                input_ids=torch.tensor([ids]),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                max_new_tokens=max_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        replies.append([t for t in out[0, len(ids) :].tolist() if t != eos])
    return replies


def with_scheduler(generator, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    from alpaca.serving.rows import Job, RowSettings
    from alpaca.serving.scheduler import BatchScheduler

    scheduler = BatchScheduler(generator, max_batch_size=8, max_queue_size=len(prompts), max_wait_ms=0)
    settings = RowSettings(
        max_tokens=max_tokens, stop_token_ids=frozenset({generator.tokenizer.eos_token_id})
    )
    try:
        jobs = [Job() for _ in prompts]
        start = time.perf_counter()
        for job, ids in zip(jobs, prompts):
            job.add_row(ids, settings)
            scheduler.submit(job)
        for job in jobs:
            job.done.wait()
        seconds = time.perf_counter() - start
    finally:
        scheduler.close()
    return seconds, [job.rows[0].token_ids for job in jobs]


def with_generate_batch(
    generator, prompts: list[list[int]], max_tokens: int
) -> tuple[float, list[list[int]]]:
    import torch
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    eos = generator.tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    page_size = 32
    pages = 8 * (-(-(max(map(len, prompts)) + max_tokens) // page_size) + 1)
    batching = ContinuousBatchingConfig(page_size=page_size, num_blocks=pages, max_requests_per_batch=8)
    with torch.no_grad():
        start = time.perf_counter()
        out = generator.model.generate_batch(
            inputs=prompts,
            generation_config=config,
            continuous_batching_config=batching,
            progress_bar=False,
            warmup=False,
        )
        seconds = time.perf_counter() - start
    replies = [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]
    return seconds, [[t for t in reply if t != eos] for reply in replies]


def bench_model(base_model: str, adapter: str, requests: int, max_tokens: int) -> dict:
    from alpaca.inference.loading import load_generators

    generator = load_generators(base_model, lora_weights=adapter)[0]
    tokenizer, prompter = generator.tokenizer, generator.prompter
    prompts = [
        tokenizer(prompter.generate_prompt(PROMPTS[i % len(PROMPTS)]))["input_ids"] for i in range(requests)
    ]
    reference = alone(generator, prompts, max_tokens)
    figures = {"model": generator.name, "requests": requests, "max_tokens": max_tokens}
    for name, run in (("scheduler", with_scheduler), ("generate_batch", with_generate_batch)):
        run(generator, prompts[:2], 4)  # warm-up
        seconds, replies = run(generator, prompts, max_tokens)
        tokens = sum(map(len, replies))
        same = sum(reply == ref for reply, ref in zip(replies, reference))
        figures[name] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "equal_to_alone": same}
    return figures


def main(base_models: str = "tiny,smollm2", requests: int = 32, max_tokens: int = 48, num_threads: int = 1):
    """Print, per model, each engine's generated tokens/s and how many greedy replies equal `generate`'s.

    Args:
        base_models: comma-separated model folders; "tiny" builds the tiny random LLaMA, "smollm2" is
            the real default model (`python -m alpaca.default_model`).
        requests: prompts sent at once.
        max_tokens: the most tokens per reply.
        num_threads: torch CPU threads.
    """
    import torch
    from helpers.adapters import make_random_adapter

    from alpaca.default_model import default_model_folder
    from alpaca.tiny import ensure_tiny_model

    torch.set_num_threads(num_threads)
    names = base_models.split(",") if isinstance(base_models, str) else list(base_models)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = {
                "tiny": lambda: str(ensure_tiny_model(Path(tmp) / "llama")),
                "smollm2": lambda: str(default_model_folder(install=False)),
            }.get(name, lambda name=name: name)()
            adapter = str(make_random_adapter(folder, Path(tmp) / f"lora-{len(os.listdir(tmp))}"))
            figures = bench_model(folder, adapter, requests, max_tokens)
            print(f"\n{figures['model']}: {requests} greedy requests at once, max_tokens={max_tokens}")
            for engine in ("scheduler", "generate_batch"):
                row = figures[engine]
                print(
                    f"  {engine:15s} {row['tokens_per_s']:8.1f} generated tokens/s ({row['seconds']:.2f} s); "
                    f"{row['equal_to_alone']}/{requests} replies equal to generate alone"
                )


if __name__ == "__main__":
    import fire

    fire.Fire(main)
