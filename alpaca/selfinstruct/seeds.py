"""Load and validate the seed tasks (Stanford's ``seed_tasks.jsonl`` format)."""

import json
from pathlib import Path


def load_seed_tasks(path: str) -> list[dict]:
    """Read seed tasks and return ``instruction`` / ``input`` / ``output`` dicts (first instance only).

    Each line is a JSON object with ``instruction`` and ``instances`` (a list of ``{input, output}``);
    ``id``, ``name`` and ``is_classification`` may be present and are not used. Blank lines are skipped.

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
    examples = []
    for line_number, raw in enumerate(file.read_bytes().split(b"\n"), start=1):
        where = f"{path} line {line_number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ValueError(
                f"{where}: not valid UTF-8 (byte {raw[error.start]:#04x} at column {error.start + 1}). "
                "Save the seed file as UTF-8."
            ) from None
        if line.strip():
            examples.append(_parse_seed_line(line, where))
    if not examples:
        raise ValueError(
            f"--seed_tasks_path {path!r} holds no seed tasks; it needs one JSON object per line."
        )
    return examples


def _parse_seed_line(line: str, where: str) -> dict:
    try:
        task = json.loads(line)
    except RecursionError:
        raise ValueError(f"{where}: JSON nested too deeply to be a seed task.") from None
    except ValueError as error:
        # JSONDecodeError, or Python's limit on integer digits (over 4,300), which is not one.
        raise ValueError(
            f"{where}: not valid JSON ({getattr(error, 'msg', error)}). The seed file must be JSONL: one "
            "complete JSON object per line, no commas between lines and no surrounding [ ]."
        ) from None
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
