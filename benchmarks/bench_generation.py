"""Generation speed: a batch of 8 against one at a time, and streaming's cost.

    OMP_NUM_THREADS=1 python benchmarks/bench_generation.py                 # builds a tiny LLaMA
    python benchmarks/bench_generation.py --base_model=./tiny-models/llama --max_new_tokens=64
    # the real model (a folder or its .gguf file); --stop="" measures without stop strings
    python benchmarks/bench_generation.py --base_model="$(python -m alpaca.default_model)"

Both measurements run in the same process on the same prompts, greedy, each repeated `--repeats`
times (best time kept, after one warm-up). Tokens are counted from the outputs (EOS and padding
excluded), so a reply that stops early is not counted as work. On the tiny model the figures measure
per-step overhead (Python, kernel launches), which is what batching amortizes; on a 7B model on a GPU
the batch gain is larger still, since one step of 8 rows costs about as much as one step of 1.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prompts import PROMPTS  # noqa: E402  (benchmarks/ is on the path when run as a script)


def best_of(repeats: int, run) -> tuple[float, object]:
    """Best wall time of `repeats` calls of `run` (after one warm-up call) and the last result."""
    result = run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def main(
    base_model: str = "",
    max_new_tokens: int = 32,
    repeats: int = 3,
    num_threads: int = 1,
    stop: str | None = None,
) -> None:
    """Print generated tokens per second for batch-of-8 vs one-at-a-time, and streaming vs plain.

    Args:
        base_model: a model folder or .gguf file; "" builds the tiny random LLaMA in a temporary folder.
        max_new_tokens: tokens generated per prompt (at most).
        repeats: timed repetitions of each measurement; the best is reported.
        num_threads: torch CPU threads.
        stop: stop strings as in generate.py; default the template's markers, "" none.
    """
    import torch

    from alpaca.inference.decoding import DecodingSettings, parse_stop_strings
    from alpaca.inference.loading import load_generators
    from alpaca.tiny import ensure_tiny_model

    torch.set_num_threads(num_threads)
    with tempfile.TemporaryDirectory() as tmp:
        base_model = base_model or str(ensure_tiny_model(Path(tmp) / "llama"))
        stop_strings = None if stop is None else parse_stop_strings(stop)
        (generator,) = load_generators(base_model, lora_weights="", stop_strings=stop_strings)
        settings = DecodingSettings(temperature=0, num_beams=1, max_new_tokens=max_new_tokens)
        requests = [(prompt, None) for prompt in PROMPTS]

        batch_s, batch_replies = best_of(repeats, lambda: generator.generate_replies(requests, settings))
        single_s, single_replies = best_of(
            repeats, lambda: [generator.generate_replies([request], settings)[0] for request in requests]
        )
        assert [r.text for r in batch_replies] == [r.text for r in single_replies], "batched != one at a time"
        tokens = sum(reply.num_tokens for reply in batch_replies)

        plain_s, plain = best_of(repeats, lambda: generator.generate(PROMPTS[0], None, settings))
        stream_s, streamed = best_of(repeats, lambda: list(generator.stream(PROMPTS[0], None, settings))[-1])
        assert streamed == plain, "streamed reply differs from the plain reply"
        stream_tokens = generator.generate_replies([(PROMPTS[0], None)], settings)[0].num_tokens

    results = {
        "device": str(generator.model.device),
        "torch_threads": torch.get_num_threads(),
        "prompts": len(PROMPTS),
        "generated_tokens": tokens,
        "batch8_tokens_per_s": tokens / batch_s,
        "one_at_a_time_tokens_per_s": tokens / single_s,
        "batch_speedup": single_s / batch_s,
        "plain_ms": plain_s * 1000,
        "stream_ms": stream_s * 1000,
        "stream_tokens": stream_tokens,
        "stream_overhead_pct": (stream_s / plain_s - 1) * 100,
    }
    print(f"model: {base_model} on {results['device']}, {results['torch_threads']} torch thread(s)")
    print(f"stop strings: {list(generator.stop_strings)}")
    print(f"batch of 8:     {results['batch8_tokens_per_s']:8.1f} generated tokens/s ({tokens} tokens)")
    print(f"one at a time:  {results['one_at_a_time_tokens_per_s']:8.1f} generated tokens/s")
    print(f"batching speed-up: {results['batch_speedup']:.2f}x (outputs identical)")
    print(
        f"plain generate: {results['plain_ms']:7.1f} ms, streaming: {results['stream_ms']:7.1f} ms "
        f"for {stream_tokens} tokens -> streaming costs {results['stream_overhead_pct']:+.1f}%"
    )


if __name__ == "__main__":
    import fire

    fire.Fire(main)
