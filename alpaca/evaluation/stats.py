"""How the two judging orders combine into one preference, and the numbers in results.json.

Each pair is judged twice: once with the reference as Output (a) and the model as Output (b)
("reference_first"), once swapped ("model_first"). Each order prefers the model, the reference, or
is unparseable. The pair's ``preference`` follows AlpacaEval's convention (output_1 is the reference,
output_2 the model):

- 2 (a win): both orders prefer the model;
- 1 (a loss): both orders prefer the reference;
- 1.5 (a tie): the orders disagree, i.e. the judge picked the same position both times, which is
  exactly the position bias that judging both orders cancels;
- None (unparseable): either order's verdict could not be read. One readable order alone is not used:
  it would bring the position bias back.

``win_rate`` is 100 x the mean over parseable pairs of (preference - 1), so a tie counts half; its
``standard_error`` is the standard error of that mean (sample standard deviation / sqrt(n)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

MODEL, REFERENCE = "model", "reference"
# Length bins of the model's output relative to the reference's (characters): a judge that likes
# long answers shows up as a win rate that rises from the "shorter" bin to the "longer" one.
LENGTH_BINS = (("shorter", 0.0, 0.8), ("similar", 0.8, 1.25), ("longer", 1.25, math.inf))


def preferred_side(order: str, verdict: str | None) -> str | None:
    """Which side a verdict ("a", "b" or None) picks in `order` ("reference_first" or "model_first")."""
    if verdict is None:
        return None
    first, second = (REFERENCE, MODEL) if order == "reference_first" else (MODEL, REFERENCE)
    return first if verdict == "a" else second


def combine_orders(reference_first: str | None, model_first: str | None) -> float | None:
    """The pair's preference (2 win, 1 loss, 1.5 tie, None unparseable) from each order's side."""
    if reference_first is None or model_first is None:
        return None
    if reference_first == model_first:
        return 2.0 if reference_first == MODEL else 1.0
    return 1.5


def win_rate(preferences: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(win rate in %, its standard error in %) over the parseable preferences; None when undefined."""
    scores = [preference - 1.0 for preference in preferences if preference is not None]
    if not scores:
        return None, None
    mean = sum(scores) / len(scores)
    if len(scores) < 2:
        return 100.0 * mean, None
    variance = sum((score - mean) ** 2 for score in scores) / (len(scores) - 1)
    return 100.0 * mean, 100.0 * math.sqrt(variance / len(scores))


def length_bins(
    preferences: Sequence[float | None], model_lengths: Sequence[int], reference_lengths: Sequence[int]
) -> list[dict]:
    """Win rate within bins of model length / reference length (characters)."""
    bins = []
    for name, low, high in LENGTH_BINS:
        inside = [
            preference
            for preference, model, reference in zip(preferences, model_lengths, reference_lengths)
            if low <= (model / reference if reference else math.inf) < high
        ]
        rate, error = win_rate(inside)
        bins.append(
            {
                "bin": name,
                "length_ratio": [low, None if math.isinf(high) else high],
                "n_pairs": len(inside),
                "n_judged": sum(preference is not None for preference in inside),
                "win_rate": rate,
                "standard_error": error,
            }
        )
    return bins


def summarize(
    preferences: Sequence[float | None], model_lengths: Sequence[int], reference_lengths: Sequence[int]
) -> dict:
    """The counts, win rate, standard error, average lengths and length bins of one run."""
    rate, error = win_rate(preferences)
    count = len(preferences)
    return {
        "win_rate": rate,
        "standard_error": error,
        "n_wins": sum(preference == 2.0 for preference in preferences),
        "n_losses": sum(preference == 1.0 for preference in preferences),
        "n_ties": sum(preference == 1.5 for preference in preferences),
        "n_unparseable": sum(preference is None for preference in preferences),
        "n_pairs": count,
        "avg_length_model": sum(model_lengths) / count if count else None,
        "avg_length_reference": sum(reference_lengths) / count if count else None,
        "length_bins": length_bins(preferences, model_lengths, reference_lengths),
    }
