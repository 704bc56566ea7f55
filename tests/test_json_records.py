"""One reader and one detection rule for training data, batch input and seed tasks (issue 12)."""

import json

import pytest

from alpaca.finetune.data import load_records
from alpaca.inference.batch import read_instructions
from alpaca.selfinstruct.seeds import load_seed_tasks

RECORDS = [
    {"instruction": "Say hi.", "input": "", "output": "Hi."},
    # U+2028 is legal inside a JSON string and str.splitlines() would cut the line there
    {"instruction": "Join\u2028these lines.", "input": "a\u2029b", "output": "ab"},
]
SEEDS = [
    {
        "id": "seed_task_0",
        "instruction": r["instruction"],
        "instances": [{"input": r["input"], "output": r["output"]}],
    }
    for r in RECORDS
]


def write(path, records, jsonl):
    if jsonl:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return str(path)


@pytest.mark.parametrize(
    "name, jsonl", [("a.json", True), ("a.jsonl", True), ("a.json", False), ("a.jsonl", False)]
)
def test_every_reader_takes_json_and_jsonl_whatever_the_file_is_named(tmp_path, name, jsonl):
    assert load_records(write(tmp_path / name, RECORDS, jsonl)) == RECORDS
    assert read_instructions(write(tmp_path / name, RECORDS, jsonl)) == RECORDS
    assert load_seed_tasks(write(tmp_path / name, SEEDS, jsonl)) == [
        {k: r[k] for k in ("instruction", "input", "output")} for r in RECORDS
    ]


def test_errors_name_the_jsonl_line_in_every_reader(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(
        '{"instruction": "ok", "output": "x", "instances": [{"input": "", "output": ""}]}\n{oops}\n'
    )
    for read in (load_records, read_instructions, load_seed_tasks):
        with pytest.raises(ValueError, match=r"bad\.json.* line 2: not valid JSON"):
            read(str(path))
