"""Load and validate the seed tasks (Stanford's ``seed_tasks.jsonl`` format)."""

from pathlib import Path

from alpaca.core.files import read_json_values


def load_seed_tasks(path: str) -> list[dict]:
    """Read seed tasks and return ``instruction`` / ``input`` / ``output`` dicts (first instance only).

    Each line is a JSON object with ``instruction`` and ``instances`` (a list of ``{input, output}``);
    ``id``, ``name`` and ``is_classification`` may be present and are not used. Blank lines are skipped.
    The file is read as training data is (``alpaca.core.files.read_json_values``), so a JSON list of seed
    tasks works too.

    Raises:
        ValueError: naming the file and line, when the file is missing, empty, not JSONL, or a record
            lacks a field.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(
            f"--seed_tasks_path {path!r}: no such file. Pass the seed tasks JSONL, e.g. "
            "--seed_tasks_path=data/seed_tasks_sample.jsonl (or Stanford's 175-task seed_tasks.jsonl)."
        )
    examples = [
        _check_seed_task(task, f"{path} line {line}" if line is not None else f"{path} record {index}")
        for index, (task, line) in enumerate(read_json_values(file, str(path), allow_empty=True))
    ]
    if not examples:
        raise ValueError(
            f"--seed_tasks_path {path!r} holds no seed tasks; it needs one JSON object per line."
        )
    return examples


def _check_seed_task(task, where: str) -> dict:
    if not isinstance(task, dict):
        raise ValueError(f"{where}: expected a JSON object, found {type(task).__name__}.")
    missing = [key for key in ("instruction", "instances") if key not in task]
    if missing:
        raise ValueError(
            f"{where}: missing {' and '.join(repr(key) for key in missing)}. Each seed task needs "
            '"instruction" and "instances": [{"input": ..., "output": ...}].'
        )
    instances = task["instances"]
    if not isinstance(instances, list) or not instances or not isinstance(instances[0], dict):
        raise ValueError(f'{where}: "instances" must be a non-empty list of {{"input", "output"}} objects.')
    first = instances[0]
    fields = {"instruction": task["instruction"], "input": first.get("input"), "output": first.get("output")}
    wrong = [key for key, value in fields.items() if not isinstance(value, str)]
    if wrong:
        raise ValueError(f'{where}: {", ".join(wrong)} must be text (the input may be the empty string "").')
    return fields
