"""AlpacaEval-format output files: reading them and matching a model's records to a reference's.

An output file is a JSON list (or JSONL) of ``{"instruction", "input"?, "output", "generator"?}``
records, as ``generate.py --output_file`` writes it. Records are matched by instruction and input
(both stripped of surrounding whitespace; a missing input, null and "" are the same). When a key occurs
several times in a file, its k-th occurrence in one file is matched with its k-th in the other.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from alpaca.core.files import read_json_records


@dataclass
class Pair:
    """One instruction answered by the model and by the reference."""

    instruction: str
    input: str
    model_output: str
    reference_output: str
    model_generator: str
    reference_generator: str


@dataclass
class Matching:
    """The matched pairs (in the model file's order) and the records found in one file only."""

    pairs: list[Pair] = field(default_factory=list)
    only_in_model: list[dict] = field(default_factory=list)
    only_in_reference: list[dict] = field(default_factory=list)

    def report(self, examples: int = 3) -> dict:
        """Counts and the first few unmatched instructions of each side, for results.json."""

        def first(records):
            return [record["instruction"][:120] for record in records[:examples]]

        return {
            "only_in_model_outputs": len(self.only_in_model),
            "only_in_reference_outputs": len(self.only_in_reference),
            "examples_only_in_model_outputs": first(self.only_in_model),
            "examples_only_in_reference_outputs": first(self.only_in_reference),
        }


def load_outputs(path: str, flag: str) -> list[dict]:
    """Read and check an output file; a bad record raises a ValueError naming the flag and its index."""
    if not path:
        raise ValueError(f"{flag} is required: an AlpacaEval-format JSON file (generate.py --output_file)")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{flag}={path!r}: no such file")
    records = read_json_records(file, f"{flag}={path!r}")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{flag}={path!r}: expected a non-empty JSON list of output records")
    for index, record in enumerate(records):
        where = f"{flag}={path!r} record {index}"
        if not isinstance(record, dict):
            raise ValueError(
                f"{where} is a {type(record).__name__}, not an object with instruction and output"
            )
        for key in ("instruction", "output"):
            if not isinstance(record.get(key), str):
                raise ValueError(f"{where}: {key!r} must be a string (it is {record.get(key)!r})")
        if record.get("input") is not None and not isinstance(record["input"], str):
            raise ValueError(f"{where}: 'input' must be a string or absent")
        if record.get("generator") is not None and not isinstance(record["generator"], str):
            raise ValueError(f"{where}: 'generator' must be a string or absent")
    return records


def record_key(record: dict) -> tuple[str, str]:
    """What two records must share to answer the same task."""
    return record["instruction"].strip(), (record.get("input") or "").strip()


def match_outputs(
    model_records: list[dict], reference_records: list[dict], model_name: str, reference_name: str
) -> Matching:
    """Pair each model record with the reference record for the same instruction and input.

    `model_name` / `reference_name` stand in for a record without a ``generator``.
    """
    waiting = defaultdict(list)
    for record in reference_records:
        waiting[record_key(record)].append(record)
    matching = Matching()
    for record in model_records:
        candidates = waiting.get(record_key(record))
        if not candidates:
            matching.only_in_model.append(record)
            continue
        reference = candidates.pop(0)
        instruction, task_input = record_key(record)
        matching.pairs.append(
            Pair(
                instruction=instruction,
                input=task_input,
                model_output=record["output"],
                reference_output=reference["output"],
                model_generator=record.get("generator") or model_name,
                reference_generator=reference.get("generator") or reference_name,
            )
        )
    matching.only_in_reference = [record for records in waiting.values() for record in records]
    return matching
