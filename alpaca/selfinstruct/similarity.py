"""The ROUGE-L de-duplication filter: rouge_score's scores, exactly, computed hundreds of times faster.

Upstream scored each candidate against every seed and kept instruction with rouge_score's pure-Python
LCS table (in a new process pool per candidate): about a second per candidate at a pool of 20K. Here
each instruction is tokenized once with rouge_score's own tokenizer (or, opted into, the Unicode one
in ``tokens``), its tokens are mapped to integer
ids and stored as a string whose characters are those ids, and rapidfuzz's bit-parallel LCS
(``process.cdist`` with ``LCSseq``) computes the LCS lengths of a whole batch against the whole pool
in C++. The F-measure is then computed with rouge_score's own float expression, vectorised, so every
score is bit-identical to ``rouge_scorer._score_lcs(...).fmeasure`` and so is every keep/drop
decision, including the pairs that land exactly on the 0.7 threshold.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import LCSseq

from alpaca.selfinstruct.tokens import rouge_tokens
from alpaca.selfinstruct.tokens import tokenizer as tokenizer_function

ROUGE_THRESHOLD = 0.7
NUM_MOST_SIMILAR = 10

# Token ids become code points; the surrogate block is skipped so every string is valid text.
_SURROGATES_START, _SURROGATES_SIZE = 0xD800, 0x800
_MAX_TOKEN_IDS = 0x110000 - _SURROGATES_SIZE


__all__ = ["SimilarityIndex", "Verdict", "most_similar_indices", "rouge_fmeasure", "rouge_tokens"]


def rouge_fmeasure(lcs: np.ndarray, prediction_lengths: np.ndarray, target_length: int) -> np.ndarray:
    """rouge_score's LCS F-measure, with the same float operations in the same order.

    ``_score_lcs(target, prediction)`` computes precision = lcs / len(prediction), recall =
    lcs / len(target) and ``2 * precision * recall / (precision + recall)`` (0.0 when both are 0).
    Each numpy float64 operation below rounds exactly like the Python float one. Pairs with an empty
    token list score 0 (rouge_score returns the int 0 there; ``zero_mask`` marks them).
    """
    lcs = lcs.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = lcs / prediction_lengths
        recall = lcs / float(target_length)
        denominator = precision + recall
        fmeasure = 2 * precision * recall / denominator
    fmeasure[~(denominator > 0)] = 0.0
    if target_length == 0:
        fmeasure[:] = 0.0
    fmeasure[prediction_lengths == 0] = 0.0
    return fmeasure


@dataclass
class Verdict:
    """The filter's decision on one candidate instruction.

    Attributes:
        keep: True when no pool instruction scores above the threshold.
        max_score: the highest ROUGE-L F-measure against the pool.
        most_similar_instructions: for kept candidates, upstream's top 10 (instruction -> score).
        avg_similarity_score: for kept candidates, the mean score over the pool.
    """

    keep: bool
    max_score: float
    most_similar_instructions: dict | None = None
    avg_similarity_score: float | None = None


class SimilarityIndex:
    """The pool of seed and kept instructions, and the ROUGE-L filter against it.

    Args:
        workers: threads rapidfuzz may use for one batch (``num_cpus`` of the script).
        threshold: candidates scoring above this against any pool instruction are rejected.
        tokenizer: "rouge_score" (upstream's, exact) or "unicode" (any script; see ``tokens``).
    """

    def __init__(self, workers: int = 1, threshold: float = ROUGE_THRESHOLD, tokenizer: str = "rouge_score"):
        self.workers = workers
        self.threshold = threshold
        self._tokenize = tokenizer_function(tokenizer)
        self._texts: list[str] = []
        self._encoded: list[str] = []
        self._lengths = np.zeros(1024, dtype=np.float64)
        self._vocabulary: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._texts)

    def _encode(self, tokens: list[str]) -> str:
        """Map tokens to one character per token id (each distinct token gets the next id)."""
        chars = []
        for token in tokens:
            token_id = self._vocabulary.get(token)
            if token_id is None:
                token_id = len(self._vocabulary)
                if token_id >= _MAX_TOKEN_IDS:
                    raise RuntimeError("more distinct ROUGE tokens than Unicode code points; pool too large")
                self._vocabulary[token] = token_id
            chars.append(chr(token_id if token_id < _SURROGATES_START else token_id + _SURROGATES_SIZE))
        return "".join(chars)

    def _append(self, text: str, encoded: str) -> None:
        if len(self._texts) == len(self._lengths):
            self._lengths = np.concatenate([self._lengths, np.zeros_like(self._lengths)])
        self._lengths[len(self._texts)] = len(encoded)
        self._texts.append(text)
        self._encoded.append(encoded)

    def add(self, texts: Sequence[str]) -> None:
        """Add instructions to the pool unconditionally (seeds, records loaded on resume)."""
        for text in texts:
            self._append(text, self._encode(self._tokenize(text)))

    def scores(self, text: str) -> np.ndarray:
        """ROUGE-L F-measures of ``text`` against every pool instruction, in pool order (pool unchanged)."""
        candidate = self._encode(self._tokenize(text))
        lcs = process.cdist(
            [candidate], self._encoded, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers
        )
        return rouge_fmeasure(lcs[0], self._lengths[: len(self._texts)], len(candidate))

    def filter_batch(self, texts: Sequence[str]) -> list[Verdict]:
        """Decide on candidates in order, adding each kept one to the pool before the next is scored.

        The result is what upstream's one-candidate-at-a-time loop gives; the LCS lengths of the whole
        batch against the pool are computed in one rapidfuzz call (that call's fixed cost, converting
        the pool's strings, is what dominates when candidates are scored one by one), and the
        candidates of the batch are compared with each other in a second, small call.
        """
        if not texts:
            return []
        pool_size = len(self._texts)
        encoded = [self._encode(self._tokenize(text)) for text in texts]
        to_pool = process.cdist(
            encoded, self._encoded, scorer=LCSseq.similarity, dtype=np.int32, workers=self.workers
        )
        within = process.cdist(encoded, encoded, scorer=LCSseq.similarity, dtype=np.int32, workers=1)
        kept_in_batch: list[int] = []
        verdicts: list[Verdict | None] = []
        pending = []
        for position, (text, candidate) in enumerate(zip(texts, encoded)):
            lcs = np.concatenate([to_pool[position], within[position, kept_in_batch]])
            lengths = self._lengths[: pool_size + len(kept_in_batch)]
            scores = rouge_fmeasure(lcs, lengths, len(candidate))
            max_score = float(scores.max()) if len(scores) else 0.0
            if max_score > self.threshold:
                verdicts.append(Verdict(keep=False, max_score=max_score))
                continue
            # The decision is made; the metadata (a full argsort, the costliest step) can wait.
            pending.append((position, scores, lengths, len(candidate)))
            verdicts.append(None)
            kept_in_batch.append(position)
            self._append(text, candidate)
        if self.workers > 1 and len(pending) > 1:
            # np.argsort releases the GIL, so threads sort several candidates' scores at once.
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(self.workers) as pool:
                done = list(pool.map(lambda item: self._kept_verdict(*item[1:]), pending))
        else:
            done = [self._kept_verdict(*item[1:]) for item in pending]
        for (position, *_), verdict in zip(pending, done):
            verdicts[position] = verdict
        return verdicts

    def _kept_verdict(self, scores: np.ndarray, lengths: np.ndarray, candidate_length: int) -> Verdict:
        """Upstream's metadata: the 10 closest pool instructions (best first) and the mean score."""
        most_similar = {}
        for index in most_similar_indices(scores, NUM_MOST_SIMILAR):
            # rouge_score returns the int 0 for an empty token list; keep that so the JSON matches.
            empty = candidate_length == 0 or lengths[index] == 0
            most_similar[self._texts[index]] = 0 if empty else float(scores[index])
        max_score = float(scores.max()) if len(scores) else 0.0
        return Verdict(
            keep=True,
            max_score=max_score,
            most_similar_instructions=most_similar,
            avg_similarity_score=float(np.mean(scores)),
        )


def most_similar_indices(scores: np.ndarray, k: int = NUM_MOST_SIMILAR) -> np.ndarray:
    """``np.argsort(scores, kind="stable")[-k:][::-1]`` in O(n): the k highest scores, best first, ties
    broken by pool position (the later instruction first).

    Upstream used the default (unstable) ``np.argsort``, whose order among equal scores depends on the
    numpy version and the CPU's SIMD sort; ROUGE-L scores tie constantly, so that order is not
    reproducible across machines anyway. The stable rule is, and a partial selection finds it without
    sorting the whole pool (the full sort dominated the filter's time at a pool of 20K).
    """
    n = len(scores)
    if n <= k:
        return np.argsort(scores, kind="stable")[::-1]
    kth = np.partition(scores, n - k)[n - k]  # the k-th highest value
    above = np.flatnonzero(scores > kth)
    ties = np.flatnonzero(scores == kth)[-(k - len(above)) :]
    chosen = np.concatenate([above, ties])
    return chosen[np.argsort(scores[chosen], kind="stable")][::-1]
