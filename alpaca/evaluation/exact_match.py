"""Exact-match accuracy for answers with a final-answer convention (GSM8K's ``#### N``).

The extraction rule, applied alike to the model's output and to the reference:

1. Dollar signs are removed, and commas between digits ("1,000" is 1000).
2. If the text contains ``####``, the answer is the first number after the last ``####``.
3. Otherwise it is the last number in the text (a model that does not follow the convention still
   gets credit when its last number is right, as in most GSM8K evaluations).
4. Numbers compare by value: "18", "18.0" and "$18" are equal; "1/2" is two numbers, and a
   percentage is its number ("50%" is 50).

A text with no number has no answer, and counts as wrong.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from alpaca.core.files import write_json_atomic
from alpaca.evaluation.outputs import load_outputs, record_key

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d)")


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(_THOUSANDS.sub("", text.replace("$", "")))


def extract_answer(text: str) -> Decimal | None:
    """The final answer of `text` as a number, by the rule in this module's docstring, or None."""
    if "####" in text:
        after = _numbers(text.rsplit("####", 1)[1])
        if after:
            return _to_decimal(after[0])
    numbers = _numbers(text)
    return _to_decimal(numbers[-1]) if numbers else None


def _to_decimal(number: str) -> Decimal | None:
    try:
        return Decimal(number)
    except InvalidOperation:
        return None


def _show(value: Decimal | None) -> str | None:
    """A number as text without exponent or trailing zeros ("18.0" -> "18")."""
    if value is None:
        return None
    text = format(value.normalize(), "f")
    return text


def score_exact_match(outputs_path: str, references_path: str) -> dict:
    """Accuracy of the outputs against the references, matched by instruction and input, per item too."""
    outputs = load_outputs(outputs_path, "--outputs")
    references = load_outputs(references_path, "--references")
    by_key: dict[tuple, list[dict]] = {}
    for record in references:
        by_key.setdefault(record_key(record), []).append(record)
    items, missing = [], 0
    for index, record in enumerate(outputs):
        candidates = by_key.get(record_key(record))
        if not candidates:
            missing += 1
            continue
        reference = candidates.pop(0)
        predicted, expected = extract_answer(record["output"]), extract_answer(reference["output"])
        if expected is None:
            raise ValueError(
                f"--references={references_path!r}: the reference for output record {index} "
                f"({record['instruction'][:60]!r}) has no number to compare with"
            )
        items.append(
            {
                "instruction": record["instruction"],
                "input": record.get("input") or "",
                "output": record["output"],
                "predicted": _show(predicted),
                "expected": _show(expected),
                "correct": predicted is not None and predicted == expected,
            }
        )
    if not items:
        raise ValueError(
            f"--outputs={outputs_path!r} and --references={references_path!r} share no instruction "
            "(records are matched by instruction and input)"
        )
    correct = sum(item["correct"] for item in items)
    return {
        "accuracy": 100.0 * correct / len(items),
        "n_correct": correct,
        "n_items": len(items),
        "n_no_answer": sum(item["predicted"] is None for item in items),
        "n_outputs_without_reference": missing,
        "rule": "first number after the last '####', else the last number; $ and thousands commas removed; "
        "compared as numbers",
        "items": items,
    }


def default_report_path(outputs_path: str) -> Path:
    """Where the per-item report goes when no --output_file is given: beside the outputs."""
    path = Path(outputs_path).expanduser()
    return path.with_name(f"{path.stem}.exact_match.json")


def write_report(report: dict, path: str | Path) -> Path:
    write_json_atomic(path, report)
    return Path(path)
