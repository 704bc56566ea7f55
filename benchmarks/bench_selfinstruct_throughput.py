"""Instructions per minute at 1 vs 8 concurrent requests, against a local server with fixed latency.

    python benchmarks/bench_selfinstruct_throughput.py
    python benchmarks/bench_selfinstruct_throughput.py --latency_s=1.0 --num_instructions=400

The server is the project's scripted OpenAI-compatible server on 127.0.0.1 (every reply waits
``latency_s``, then lists 12 generated-style tasks); the script runs end to end (prompts, parsing,
filters, journal) through ``generate``. The outputs of the two runs are checked to be identical.
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # the scripted test server: helpers.scripted_server

from helpers.scripted_server import ScriptedOpenAIServer, synthetic_responder  # noqa: E402

from alpaca.selfinstruct.pipeline import generate  # noqa: E402
from alpaca.selfinstruct.settings import SelfInstructConfig  # noqa: E402


def run(
    concurrency: int, latency_s: float, num_instructions: int, output_dir: Path
) -> tuple[float, dict, list]:
    with ScriptedOpenAIServer(synthetic_responder, latency_s=latency_s) as server:
        config = SelfInstructConfig(
            output_dir=str(output_dir),
            seed_tasks_path=str(REPO / "data" / "seed_tasks_sample.jsonl"),
            num_instructions_to_generate=num_instructions,
            request_batch_size=8,
            base_url=server.base_url,
            max_concurrent_requests=concurrency,
            seed=0,
            progress=False,
        )
        started = time.perf_counter()
        summary = generate(config)
        elapsed = time.perf_counter() - started
    return elapsed, summary, json.loads((output_dir / "regen.json").read_text())


def main(latency_s: float = 0.5, num_instructions: int = 250) -> None:
    """Print kept instructions per minute at 1 and 8 requests in flight.

    Args:
        latency_s: the server's fixed latency per request.
        num_instructions: the target of each run.
    """
    os.environ.setdefault("OPENAI_API_KEY", "not-needed")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for concurrency in (1, 8):
            with open(os.devnull, "w") as quiet:
                stdout, sys.stdout = sys.stdout, quiet
                try:
                    elapsed, summary, records = run(
                        concurrency, latency_s, num_instructions, Path(folder) / str(concurrency)
                    )
                finally:
                    sys.stdout = stdout
            rows.append((concurrency, elapsed, summary, records))
    assert rows[0][3] == rows[1][3], "outputs differ between concurrency levels"
    print(f"server latency {latency_s}s per request; target {num_instructions}; outputs identical")
    print(f"{'concurrent':>10} {'requests':>8} {'kept':>5} {'seconds':>8} {'instructions/min':>17}")
    for concurrency, elapsed, summary, _ in rows:
        print(
            f"{concurrency:>10} {summary['requests']:>8} {summary['kept']:>5} {elapsed:>8.2f} "
            f"{summary['kept'] / elapsed * 60:>17.0f}"
        )
    print(f"speed-up: {rows[0][1] / rows[1][1]:.1f}x")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
