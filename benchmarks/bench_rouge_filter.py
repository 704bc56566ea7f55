"""ROUGE-L de-duplication: this project's filter against rouge_score, measured in the same run.

    python benchmarks/bench_rouge_filter.py                       # pools of 1K, 5K and 20K
    python benchmarks/bench_rouge_filter.py --pool_sizes=1000,5000 --candidates=30

The pool is the real 175 seed tasks (../shared/data/seed_tasks.jsonl, else the project's sample) plus
generated-style instructions, itself built through the filter, as a real run builds it. Each candidate
costs what upstream paid per candidate: tokenize, score against the whole pool, decide, and for kept
ones the top-10 and mean. The reference is rouge_score's own ``_score_lcs`` in a serial loop (faster
than upstream's per-candidate process pool); ours runs single-threaded (workers=1), in batches of one
reply's candidates, as the script does. Decisions and metadata are checked to be identical.
"""

import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from rouge_score import rouge_scorer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from alpaca.selfinstruct.similarity import SimilarityIndex, rouge_tokens  # noqa: E402

REAL_SEEDS = REPO.parent / "shared" / "data" / "seed_tasks.jsonl"
SAMPLE_SEEDS = REPO / "data" / "seed_tasks_sample.jsonl"
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train_alpaca.json"
CANDIDATES_PER_REPLY = 15


def load_seed_instructions() -> tuple[list[str], Path]:
    path = REAL_SEEDS if REAL_SEEDS.exists() else SAMPLE_SEEDS
    return [json.loads(line)["instruction"] for line in path.read_text().splitlines() if line.strip()], path


class InstructionGenerator:
    """Generated-style instructions with real English statistics.

    Lengths follow the seed instructions' word counts; the first word is a seed instruction's first
    word (mostly verbs and question words); the rest is drawn from word frequencies of the seed tasks
    (and GSM8K's problems when ../shared/data has them). ROUGE-L's cost depends on token counts and
    how many tokens repeat, which this reproduces; the texts are not meant to read well.
    """

    def __init__(self, seeds: list[str], rng: random.Random):
        self.rng = rng
        texts = list(seeds)
        if GSM8K.exists():
            texts += [record["instruction"] for record in json.loads(GSM8K.read_text())]
        words = [word for text in texts for word in text.split()]
        counts: dict[str, int] = {}
        for word in words:
            counts[word] = counts.get(word, 0) + 1
        self.vocabulary, self.weights = list(counts), list(counts.values())
        self.lengths = [len(text.split()) for text in seeds]
        self.first_words = [text.split()[0] for text in seeds if text.split()]

    def __call__(self) -> str:
        length = max(4, self.rng.choice(self.lengths))
        rest = self.rng.choices(self.vocabulary, self.weights, k=length - 1)
        return " ".join([self.rng.choice(self.first_words), *rest])


def build_pool(seeds: list[str], size: int, generate) -> list[str]:
    """Seeds plus generated instructions kept by the filter, until the pool has ``size``."""
    index = SimilarityIndex()
    index.add(seeds)
    pool = list(seeds)
    for _ in range(10 * size):
        if len(pool) >= size:
            break
        batch = [generate() for _ in range(200)]
        pool += [text for text, verdict in zip(batch, index.filter_batch(batch)) if verdict.keep]
    if len(pool) < size:
        raise RuntimeError(f"could not build a pool of {size} distinct instructions")
    return pool[:size]


def near_duplicate(text: str, generate: InstructionGenerator) -> str:
    """A light edit of an existing instruction, as models often produce (one word changed or added)."""
    words = text.split()
    position = generate.rng.randrange(len(words))
    if generate.rng.random() < 0.5:
        words[position] = generate.rng.choice(generate.vocabulary)
    else:
        words.insert(position, generate.rng.choice(generate.vocabulary))
    return " ".join(words)


def rouge_score_filter(pool: list[str], candidates: list[str]) -> tuple[float, list]:
    """Upstream's per-candidate work with rouge_score; returns seconds per candidate and the results."""
    texts, tokens = list(pool), [rouge_tokens(text) for text in pool]
    results = []
    start = time.perf_counter()
    for candidate in candidates:
        candidate_tokens = rouge_tokens(candidate)
        scores = [rouge_scorer._score_lcs(candidate_tokens, other).fmeasure for other in tokens]
        if max(scores) > 0.7:
            results.append(None)
            continue
        results.append(
            (
                {texts[i]: scores[i] for i in np.argsort(scores, kind="stable")[-10:][::-1]},
                float(np.mean(scores)),
            )
        )
        texts.append(candidate)
        tokens.append(candidate_tokens)
    return (time.perf_counter() - start) / len(candidates), results


def fast_filter(pool: list[str], candidates: list[str], repeats: int, workers: int) -> tuple[float, list]:
    """This project's filter; the pool is tokenized before timing (upstream also did that once)."""
    timings = []
    for _ in range(repeats):
        index = SimilarityIndex(workers=workers)
        index.add(pool)
        verdicts = []
        start = time.perf_counter()
        for offset in range(0, len(candidates), CANDIDATES_PER_REPLY):
            verdicts += index.filter_batch(candidates[offset : offset + CANDIDATES_PER_REPLY])
        timings.append((time.perf_counter() - start) / len(candidates))
    results = [(v.most_similar_instructions, v.avg_similarity_score) if v.keep else None for v in verdicts]
    return statistics.median(timings), results


def main(
    pool_sizes: str = "1000,5000,20000",
    candidates: int = 45,
    near_duplicate_share: float = 0.3,
    repeats: int = 5,
    workers: int = 1,
    seed: int = 0,
) -> None:
    """Print rouge_score's and this filter's time per candidate, and their ratio, at each pool size.

    Two candidate streams per pool: "new" (every candidate is kept: the worst case here, since each
    kept one needs upstream's full argsort) and "mixed" (``near_duplicate_share`` of the candidates
    are light edits of pool instructions and get rejected, as in a real run).

    Args:
        pool_sizes: comma-separated pool sizes.
        candidates: candidates per stream at the largest pool (more at smaller ones).
        near_duplicate_share: share of near-duplicates in the mixed stream.
        repeats: timing repeats of the fast filter (median reported).
        workers: threads for the fast filter (1 compares like with like against serial rouge_score).
        seed: seed of the generated instructions.
    """
    seeds, seed_path = load_seed_instructions()
    # fire turns "1000,5000" into a tuple and "5000" into an int.
    sizes = [
        int(size)
        for size in (pool_sizes.split(",") if isinstance(pool_sizes, str) else np.atleast_1d(pool_sizes))
    ]
    print(f"seeds: {len(seeds)} from {seed_path}; fast filter threads: {workers}")
    print(
        f"{'pool':>7} {'stream':>6} {'candidates':>10} {'kept':>5} {'rouge_score ms':>15} {'ours ms':>9} {'ratio':>8}"
    )
    for size in sizes:
        generate = InstructionGenerator(seeds, random.Random(seed))
        started = time.perf_counter()
        pool = build_pool(seeds, size, generate)
        print(f"(pool of {size} built in {time.perf_counter() - started:.1f}s)", file=sys.stderr)
        count = max(candidates, min(4 * candidates, int(candidates * max(sizes) / size)))
        for stream_name, share in (("new", 0.0), ("mixed", near_duplicate_share)):
            stream = [
                near_duplicate(generate.rng.choice(pool), generate)
                if generate.rng.random() < share
                else generate()
                for _ in range(count)
            ]
            reference_time, reference = rouge_score_filter(pool, stream)
            ours_time, ours = fast_filter(pool, stream, repeats, workers)
            for mine, theirs in zip(ours, reference):
                assert (mine is None) == (theirs is None), "keep/drop decisions differ"
                if mine is not None:
                    assert json.dumps(mine[0]) == json.dumps(theirs[0]) and mine[1] == theirs[1], (
                        "metadata differs"
                    )
            kept = sum(result is not None for result in reference)
            print(
                f"{size:>7} {stream_name:>6} {count:>10} {kept:>5} {reference_time * 1e3:>15.2f} "
                f"{ours_time * 1e3:>9.3f} {reference_time / ours_time:>7.0f}x",
                flush=True,
            )
    print("decisions, top-10 lists and averages identical to rouge_score for every candidate")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
