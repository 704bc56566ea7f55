"""The fast ROUGE-L filter against the rouge_score package: scores, decisions and metadata."""

import json
import random
from pathlib import Path

import numpy as np
from helpers.scripted_server import synthetic_instruction
from rouge_score import rouge_scorer

from alpaca.selfinstruct.similarity import SimilarityIndex, rouge_tokens

SEED_FILE = Path(__file__).resolve().parents[1] / "data" / "seed_tasks_sample.jsonl"
WORDS = "the a of to in write explain describe list name story poem text summary why how is it and".split()


def seed_instructions() -> list[str]:
    return [json.loads(line)["instruction"] for line in SEED_FILE.read_text().splitlines()]


def reference_score(candidate: str, pool_text: str) -> float:
    """What upstream computed: rouge_score's tokens and its _score_lcs, candidate as the target."""
    return rouge_scorer._score_lcs(rouge_tokens(candidate), rouge_tokens(pool_text)).fmeasure


def random_text(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.45:
        return synthetic_instruction(rng)
    if kind < 0.9:
        # Short texts from a small vocabulary: many repeated tokens, many equal scores (ties).
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 14)))
    # Punctuation, digits, non-ASCII and empty token lists exercise the tokenizer.
    return rng.choice(["", "!!!", "¿Qué es esto?", "3.5 x 2 = 7", "Déjà vu, again: 42%", "C++ vs. C#?"])


def test_scores_match_rouge_score_exactly_on_thousands_of_pairs():
    rng = random.Random(0)
    pool = seed_instructions() + [random_text(rng) for _ in range(1500)]
    index = SimilarityIndex()
    index.add(pool)
    pairs = 0
    for _ in range(4):
        candidate = random_text(rng)
        ours = index.scores(candidate)
        expected = np.array([reference_score(candidate, text) for text in pool], dtype=np.float64)
        # Bit-identical, not merely close (the issue asks for 1e-9).
        assert np.array_equal(ours, expected)
        pairs += len(pool)
    assert pairs >= 6000


def tie_pair(rng: random.Random, target_length: int, prediction_length: int, lcs: int) -> tuple[str, str]:
    """Two texts whose rouge tokens have exactly these lengths and this LCS length."""
    target = [f"t{i}" for i in range(target_length)]
    kept = sorted(rng.sample(range(target_length), lcs))
    prediction = [target[i] for i in kept] + [f"p{i}" for i in range(prediction_length - lcs)]
    rng.shuffle(prediction[lcs:])
    # Spread the non-matching tokens through the prediction without changing the LCS.
    mixed = prediction[:lcs]
    for extra in prediction[lcs:]:
        mixed.insert(rng.randint(0, len(mixed)), extra)
    return " ".join(target), " ".join(mixed)


def test_decisions_match_exactly_at_the_threshold():
    """2*lcs/(m+n) == 0.7, where rouge_score's float expression gives 0.7 or 0.7000000000000001."""
    rng = random.Random(1)
    cases = [(m, n, 7 * (m + n) // 20) for m in range(1, 60) for n in range(1, 60) if (m + n) % 20 == 0]
    cases = [(m, n, lcs) for m, n, lcs in cases if lcs <= min(m, n)]
    above, equal = 0, 0
    for m, n, lcs in cases * 3:
        target, prediction = tie_pair(rng, m, n, lcs)
        index = SimilarityIndex()
        index.add([prediction])
        verdict = index.filter_batch([target])[0]
        expected = reference_score(target, prediction)
        assert verdict.max_score == expected
        assert verdict.keep == (not expected > 0.7)
        above += expected > 0.7
        equal += expected == 0.7
    # Both roundings occur, so the exact expression (not 2*lcs/(m+n) <= 0.7) is what decides.
    assert above > 0 and equal > 0


def upstream_filter(pool: list[str], candidates: list[str]) -> list[dict | None]:
    """Upstream's loop, one candidate at a time, with rouge_score (the reference)."""
    all_instructions = list(pool)
    all_tokens = [rouge_tokens(text) for text in pool]
    results = []
    for candidate in candidates:
        tokens = rouge_tokens(candidate)
        scores = [rouge_scorer._score_lcs(tokens, other).fmeasure for other in all_tokens]
        if max(scores) > 0.7:
            results.append(None)
            continue
        most_similar = {all_instructions[i]: scores[i] for i in np.argsort(scores, kind="stable")[-10:][::-1]}
        results.append({"most_similar": most_similar, "avg": float(np.mean(scores))})
        all_instructions.append(candidate)
        all_tokens.append(tokens)
    return results


def test_stream_of_batches_matches_upstream_loop_including_metadata():
    rng = random.Random(2)
    pool = seed_instructions() + [random_text(rng) for _ in range(300)]
    candidates = [random_text(rng) for _ in range(240)]
    # Near-duplicates of the pool and of earlier candidates in the same batch.
    candidates[10] = pool[5] + " please"
    candidates[20] = "Describe the water cycle to a ten-year-old in simple words."
    candidates[21] = candidates[20].upper()
    index = SimilarityIndex(workers=2)
    index.add(pool)
    ours = []
    for start in range(0, len(candidates), 17):
        ours += index.filter_batch(candidates[start : start + 17])
    expected = upstream_filter(pool, candidates)
    assert [verdict.keep for verdict in ours] == [result is not None for result in expected]
    assert not ours[10].keep and not ours[21].keep
    for verdict, result in zip(ours, expected):
        if result is not None:
            # json.dumps compares key order (the stable tie order) and int/float zeros.
            assert json.dumps(verdict.most_similar_instructions) == json.dumps(result["most_similar"])
            assert verdict.avg_similarity_score == result["avg"]
    assert len(index) == len(pool) + sum(verdict.keep for verdict in ours)


def test_most_similar_indices_equals_a_stable_full_sort():
    from alpaca.selfinstruct.similarity import most_similar_indices

    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(1, 400))
        # few distinct values, so ties at and around the 10th place are common
        scores = rng.integers(0, int(rng.integers(1, 12)), size=n) / 7.0
        expected = np.argsort(scores, kind="stable")[-10:][::-1]
        assert most_similar_indices(scores, 10).tolist() == expected.tolist(), trial


def test_unicode_tokens():
    from alpaca.selfinstruct.tokens import unicode_tokens

    assert unicode_tokens("请写一首诗。") == ["请", "写", "一", "首", "诗"]
    assert unicode_tokens("Écrivez un poème sur l'été, s'il vous plaît!") == [
        "écrivez", "un", "poème", "sur", "l", "été", "s", "il", "vous", "plaît",
    ]  # fmt: skip
    assert unicode_tokens("ＡＢＣ１２３ und ﬁnden") == ["abc123", "und", "finden"]  # NFKC
    assert unicode_tokens("कविता लिखिए") == ["कविता", "लिखिए"]  # vowel signs stay in their word
    assert unicode_tokens("東京タワーについて説明してください") == list("東京タワーについて説明してください")
    assert unicode_tokens("Напишите 3 совета_по сну") == ["напишите", "3", "совета", "по", "сну"]
    assert unicode_tokens("") == [] and unicode_tokens("!!! ?") == []


def test_unicode_tokens_equal_rouge_score_tokens_on_ascii():
    from alpaca.selfinstruct.tokens import unicode_tokens

    rng = random.Random(3)
    printable = [chr(code) for code in range(32, 127)] + ["\t", "\n"]
    texts = [random_text(rng) for _ in range(500)]
    texts += ["".join(rng.choice(printable) for _ in range(rng.randint(0, 60))) for _ in range(500)]
    for text in filter(str.isascii, texts):
        assert unicode_tokens(text) == rouge_tokens(text), text


def reference_lcs(a: list[str], b: list[str]) -> int:
    """The textbook dynamic-programming LCS length."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def reference_unicode_score(candidate: str, pool_text: str) -> float:
    """ROUGE-L F-measure on Unicode tokens, written out plainly (rouge_score's float expression)."""
    from alpaca.selfinstruct.tokens import unicode_tokens

    target, prediction = unicode_tokens(candidate), unicode_tokens(pool_text)
    if not target or not prediction:
        return 0  # rouge_score's int zero, which upstream's JSON shows as 0
    lcs = reference_lcs(target, prediction)
    precision, recall = lcs / len(prediction), lcs / len(target)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


PHRASES = (
    "请 写 一首 关于 秋天 的 诗",
    "请写一首关于秋天的诗",
    "解释 为什么 天空 是 蓝色 的",
    "東京タワーについて説明してください",
    "Écrivez un poème sur l'été",
    "Expliquez pourquoi le ciel est bleu",
    "Напишите короткий рассказ о зиме",
    "कविता लिखिए और समझाइए",
    "اكتب قصيدة عن البحر",
    "Describe the water cycle",
    "ＡＢＣ and ﬁnd 😀",
)


def multilingual_text(rng: random.Random) -> str:
    words = " ".join(rng.choice(PHRASES) for _ in range(rng.randint(1, 3))).split()
    rng.shuffle(words)
    return " ".join(words[: rng.randint(0, len(words))]) if rng.random() < 0.5 else rng.choice(PHRASES)


def test_unicode_scores_match_a_reference_lcs_exactly():
    rng = random.Random(4)
    pool = list(PHRASES) + [multilingual_text(rng) for _ in range(400)]
    index = SimilarityIndex(tokenizer="unicode")
    index.add(pool)
    for _ in range(8):
        candidate = multilingual_text(rng)
        expected = np.array([reference_unicode_score(candidate, text) for text in pool], dtype=np.float64)
        assert np.array_equal(index.scores(candidate), expected)


def test_unicode_filter_matches_a_reference_loop_and_catches_chinese_duplicates():
    rng = random.Random(5)
    pool = list(PHRASES[:4]) + [multilingual_text(rng) for _ in range(100)]
    candidates = [multilingual_text(rng) for _ in range(120)] + [
        "请写一首关于秋天的诗。",
        "请写一首关于冬天的诗",
    ]
    index = SimilarityIndex(tokenizer="unicode")
    index.add(pool)
    ours = index.filter_batch(candidates[:60]) + index.filter_batch(candidates[60:])
    current = list(pool)
    for candidate, verdict in zip(candidates, ours):
        scores = [reference_unicode_score(candidate, text) for text in current]
        assert verdict.keep == (max(scores) <= 0.7) and verdict.max_score == max(scores)
        if verdict.keep:
            top = np.argsort(scores, kind="stable")[-10:][::-1]
            expected = {current[i]: scores[i] for i in top}
            assert json.dumps(verdict.most_similar_instructions) == json.dumps(expected)
            assert verdict.avg_similarity_score == float(np.mean(scores))
            current.append(candidate)
    # The same Chinese instruction with a full stop scores 1.0 (rouge_score's tokenizer: 0, kept).
    assert not ours[-2].keep and ours[-2].max_score == 1.0 and ours[-1].max_score == 0.9
    upstream = SimilarityIndex()
    upstream.add(["请写一首关于秋天的诗"])
    assert upstream.filter_batch(["请写一首关于秋天的诗"])[0].keep
