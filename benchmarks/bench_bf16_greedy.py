"""Greedy generations in bf16 vs fp32 on the demo's held-out instructions: how many differ, and where.

    flock /tmp/realmodel.lock python benchmarks/bench_bf16_greedy.py          # SmolLM2, about 1 minute
    python benchmarks/bench_bf16_greedy.py --base_model=./tiny-models/llama

The 15 held-out records of `make demo` (alpaca.quickstart.split_records of data/alpaca_sample.json),
the base model without adapter, greedy, batches of 8, generate.py's own loading: --precision=fp32, then
--precision=bf16 (bf16 weights on a CPU with native bf16; fp32 with a warning elsewhere, and then every
answer is the same). Prints how many answers are identical and, for each that differs, after how many
words it diverges.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def common_words(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a.split(), b.split()):
        if x != y:
            break
        count += 1
    return count


def main(base_model: str = "", max_new_tokens: int = 96, batch_size: int = 8) -> dict:
    """Compare greedy answers in fp32 and bf16; print and return the summary.

    Args:
        base_model: a model folder or .gguf file; default SmolLM2 (python -m alpaca.default_model).
        max_new_tokens: the most tokens per answer (the demo's default).
        batch_size: records generated together.
    """
    import torch

    from alpaca.inference.decoding import DecodingSettings
    from alpaca.inference.loading import load_generators
    from alpaca.quickstart import SAMPLE_DATA, split_records

    if not base_model:
        from alpaca.default_model import default_gguf

        base_model = str(default_gguf())
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    _, held_out = split_records(json.loads(SAMPLE_DATA.read_text(encoding="utf-8")))
    requests = [(r["instruction"], r.get("input") or None) for r in held_out]
    settings = DecodingSettings(temperature=0.0, num_beams=1, max_new_tokens=max_new_tokens)
    runs = {}
    for precision in ("fp32", "bf16"):
        (generator,) = load_generators(base_model, lora_weights="", precision=precision)
        start = time.perf_counter()
        replies = []
        for i in range(0, len(requests), batch_size):
            replies += generator.generate_replies(requests[i : i + batch_size], settings)
        runs[precision] = {
            "precision": generator.source["precision"],
            "tokens": sum(r.num_tokens for r in replies),
            "seconds": round(time.perf_counter() - start, 1),
            "texts": [r.text for r in replies],
        }
        del generator
    fp32, bf16 = runs["fp32"].pop("texts"), runs["bf16"].pop("texts")
    differ = {i: common_words(a, b) for i, (a, b) in enumerate(zip(fp32, bf16)) if a != b}
    summary = {
        "held_out": len(fp32),
        "identical": len(fp32) - len(differ),
        "differ": len(differ),
        "common_words_before_divergence": differ,
        **runs,
    }
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    import fire

    fire.Fire(lambda **kw: main(**kw) and None)
