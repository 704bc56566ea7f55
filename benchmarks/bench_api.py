"""Throughput of the OpenAI-compatible API with 1, 4 and 8 concurrent clients, and time to first token.

    OMP_NUM_THREADS=1 python benchmarks/bench_api.py                       # tiny model, then SmolLM2
    python benchmarks/bench_api.py --base_models=./tiny-models/llama --max_tokens=64

For each model, one server (the same code as `generate.py --api`, in this process, on 127.0.0.1) is
asked the same greedy chat requests by 1, 4 and 8 clients, each sending its requests one after the
other (plain HTTP, no client library, so the clients cost little); each measurement is repeated
`--repeats` times and the fastest run kept. Every request's reply is checked
against the one-client run: batching must not change greedy outputs. Tokens are the `usage` counts
(replies that end early at EOS or a stop string count only what was generated). Time to first token
is measured on streamed requests, alone and with 8 streaming clients at once.
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prompts import PROMPTS  # noqa: E402  (benchmarks/ is on the path when run as a script)


def chat(port: int, prompt: str, max_tokens: int, stream: bool = False) -> tuple[str, int, float]:
    """One greedy chat request: (reply, completion tokens, seconds to the first content chunk)."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    connection.request("POST", "/v1/chat/completions", body=json.dumps(body))
    response = connection.getresponse()
    if not stream:
        data = json.loads(response.read())
        connection.close()
        return data["choices"][0]["message"]["content"], data["usage"]["completion_tokens"], 0.0
    text, tokens, first = "", 0, None
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        chunk = json.loads(line[len(b"data: ") :])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content")
            if piece and first is None:
                first = time.perf_counter() - start
            text += piece or ""
    connection.close()
    return text, tokens, first if first is not None else time.perf_counter() - start


def run_clients(port: int, clients: int, requests_per_client: int, max_tokens: int, stream: bool = False):
    """`clients` threads, each sending its requests one after another; returns (seconds, results)."""
    results: dict[int, tuple[str, int, float]] = {}

    def client(number: int) -> None:
        for step in range(requests_per_client):
            index = (number * requests_per_client + step) % len(PROMPTS)
            results[number * requests_per_client + step] = (
                index,
                *chat(port, PROMPTS[index], max_tokens, stream),
            )

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start, list(results.values())


def bench_model(
    base_model: str, max_tokens: int, requests_per_client: int, repeats: int, precision: str = "auto"
) -> dict:
    from alpaca.inference.loading import load_generators
    from alpaca.serving.server import launch_api

    (generator,) = load_generators(base_model, lora_weights="", precision=precision)
    server = launch_api(generator, host="127.0.0.1", port=0, max_batch_size=8)
    figures = {"model": generator.name, "max_tokens": max_tokens}
    try:
        chat(server.port, PROMPTS[0], 4)  # warm-up
        expected = {}
        for clients in (1, 4, 8):
            stats = server.backend.scheduler.stats
            runs = []
            for _ in range(repeats):
                steps, batches = stats.steps, stats.batches
                seconds, results = run_clients(server.port, clients, requests_per_client, max_tokens)
                runs.append((seconds, results, stats.steps - steps, stats.batches - batches))
                for index, text, _, _ in results:
                    assert expected.setdefault(index, text) == text, (
                        f"prompt {index}: reply changed by batching"
                    )
            # The fastest of the repeats: the machine may be shared, and noise only ever slows a run.
            seconds, results, steps, batches = min(runs, key=lambda run: run[0])
            tokens = sum(result[2] for result in results)
            figures[f"{clients}_clients"] = {
                "requests": len(results),
                "requests_per_s": len(results) / seconds,
                "generated_tokens_per_s": tokens / seconds,
                "generated_tokens": tokens,
                "forward_steps": steps,
                "batches": batches,
            }
        alone = [run_clients(server.port, 1, 1, max_tokens, stream=True)[1][0][3] for _ in range(3 * repeats)]
        crowd = [
            result[3]
            for _ in range(repeats)
            for result in run_clients(server.port, 8, 1, max_tokens, True)[1]
        ]
        figures["ttft_ms_alone_median"] = statistics.median(alone) * 1000
        figures["ttft_ms_8_streams_median"] = statistics.median(crowd) * 1000
        figures["ttft_ms_8_streams_max"] = max(crowd) * 1000
        figures["speedup_8_vs_1"] = (
            figures["8_clients"]["generated_tokens_per_s"] / figures["1_clients"]["generated_tokens_per_s"]
        )
    finally:
        server.close()
    return figures


def main(
    base_models: str = "tiny,smollm2",
    max_tokens: int = 48,
    requests_per_client: int = 8,
    repeats: int = 3,
    num_threads: int = 1,
    precision: str = "auto",
):
    """Print requests/s and generated tokens/s at 1, 4 and 8 clients, and time to first token.

    Args:
        base_models: comma-separated model folders; "tiny" builds the tiny random LLaMA, "smollm2" is
            the real default model (`python -m alpaca.default_model`).
        max_tokens: the most tokens per reply.
        requests_per_client: requests each client sends, one after another.
        repeats: runs of each measurement; the fastest is reported (time to first token: medians).
        num_threads: torch CPU threads.
        precision: the served model's precision, as generate.py's --precision (bf16 on a CPU with
            native bf16 loads bf16 weights). Measured on SmolLM2: with bf16 weights a batched greedy
            reply can differ from the same prompt alone (bf16 sums depend on the batch shape), and
            the benchmark stops there, since its figures assume identical replies.
    """
    import torch

    from alpaca.default_model import default_model_folder
    from alpaca.tiny import ensure_tiny_model

    torch.set_num_threads(num_threads)
    names = base_models.split(",") if isinstance(base_models, str) else list(base_models)
    all_figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            folder = {
                "tiny": lambda: str(ensure_tiny_model(Path(tmp) / "llama")),
                "smollm2": lambda: str(default_model_folder(install=False)),
            }.get(name, lambda name=name: name)()
            figures = bench_model(folder, max_tokens, requests_per_client, repeats, precision)
            all_figures.append(figures)
            print(
                f"\n{figures['model']} (greedy chat, max_tokens={max_tokens}, {torch.get_num_threads()} thread(s), "
                f"precision {precision})"
            )
            for clients in (1, 4, 8):
                row = figures[f"{clients}_clients"]
                print(
                    f"  {clients} client(s): {row['requests_per_s']:6.2f} requests/s "
                    f"{row['generated_tokens_per_s']:8.1f} generated tokens/s  ({row['requests']} requests, "
                    f"{row['batches']} batches, {row['forward_steps']} forward steps)"
                )
            print(f"  8 clients vs 1: {figures['speedup_8_vs_1']:.2f}x tokens/s; greedy replies identical")
            print(
                f"  time to first token (streaming): {figures['ttft_ms_alone_median']:.0f} ms alone, "
                f"{figures['ttft_ms_8_streams_median']:.0f} ms (median; {figures['ttft_ms_8_streams_max']:.0f} ms max) "
                "with 8 streams started at once"
            )
    print(json.dumps(all_figures, indent=2))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
