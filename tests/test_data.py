import json

import pytest

from alpaca.core.prompter import Prompter, available_templates
from alpaca.finetune.data import (
    IGNORE_INDEX,
    PaddingCollator,
    build_datasets,
    load_records,
    tokenize_example,
)
from alpaca.finetune.resolve import gradient_accumulation
from alpaca.modeling import load_tokenizer

RECORDS = [
    {"instruction": "Name three primary colors.", "input": "", "output": "Red, yellow and blue."},
    {"instruction": "Add the numbers.", "input": "12 and 30", "output": "12 + 30 = 42."},
    {"instruction": "Translate to French.", "input": "Good morning, friend!", "output": "Bonjour, mon ami !"},
    {"instruction": "Say something in Japanese.", "input": "", "output": "こんにちは 🙂"},
    {"instruction": "Give a one-word answer.", "input": "Is water wet?", "output": "Yes"},
    {"instruction": "Continue", "input": "", "output": "  leading spaces and trailing ones  "},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


def test_pad_token_is_never_eos(tokenizer):
    assert tokenizer.pad_token_id is not None
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.pad_token_id == tokenizer.unk_token_id == 0  # upstream Alpaca-LoRA's choice
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize("template", available_templates())
def test_masked_labels_are_exactly_output_plus_eos(tokenizer, template):
    prompter = Prompter(template)
    for record in RECORDS:
        example = tokenize_example(record, tokenizer, prompter, cutoff_len=512, train_on_inputs=False)
        assert example["status"] == "ok"
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) == len(labels) == len(example["attention_mask"])
        n_prompt = example["n_prompt"]
        prompt_ids = tokenizer(prompter.generate_prompt(record["instruction"], record["input"]))["input_ids"]
        # exactly the prompt's tokens are masked, and they are the prompt tokenized alone
        assert ids[:n_prompt] == prompt_ids
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert IGNORE_INDEX not in labels[n_prompt:]
        assert ids[-1] == tokenizer.eos_token_id and labels[-1] == tokenizer.eos_token_id
        decoded = tokenizer.decode(labels[n_prompt:-1])
        assert decoded.strip() == record["output"].strip()
        # the full sequence decodes back to prompt + output + EOS
        assert (
            tokenizer.decode(ids, skip_special_tokens=True).strip()
            == (prompter.generate_prompt(record["instruction"], record["input"]) + record["output"]).strip()
        )


@pytest.mark.parametrize("template", available_templates())
def test_train_on_inputs_learns_every_token(tokenizer, template):
    prompter = Prompter(template)
    for record in RECORDS:
        example = tokenize_example(record, tokenizer, prompter, cutoff_len=512, train_on_inputs=True)
        assert example["labels"] == example["input_ids"]
        assert example["input_ids"][0] == tokenizer.bos_token_id
        assert example["input_ids"][-1] == tokenizer.eos_token_id


def test_skipping_and_truncation_are_counted(tokenizer):
    prompter = Prompter("alpaca")
    short = {"instruction": "Hi.", "input": "", "output": "Hello there, how are you today? " * 3}
    long_prompt = {"instruction": "Summarize. " * 40, "input": "", "output": "Short."}
    n_prompt_short = len(tokenizer(prompter.generate_prompt("Hi."))["input_ids"])
    cutoff = n_prompt_short + 5
    truncated = tokenize_example(short, tokenizer, prompter, cutoff, train_on_inputs=False)
    assert truncated["status"] == "truncated"
    assert len(truncated["input_ids"]) == cutoff
    assert truncated["input_ids"][-1] != tokenizer.eos_token_id  # incomplete output: no EOS
    assert sum(t != IGNORE_INDEX for t in truncated["labels"]) == 5
    skipped = tokenize_example(long_prompt, tokenizer, prompter, cutoff, train_on_inputs=False)
    assert skipped["status"] == "skipped"

    complete = {"instruction": "Hi!", "input": "", "output": "Yo."}
    records = [short, long_prompt, complete, long_prompt]
    train, val, report = build_datasets(records, tokenizer, prompter, cutoff, False, 0, seed=1, source="mem")
    assert (report.records, report.skipped, report.truncated, report.kept) == (4, 2, 1, 2)
    assert report.skipped_indices == [1, 3]
    assert len(train) == 2 and val == []
    # every kept example has something to learn from, so no NaN loss
    assert all(any(t != IGNORE_INDEX for t in ex["labels"]) for ex in train)
    assert report.length_percentiles["max"] == cutoff


def test_all_records_skipped_is_an_error(tokenizer):
    prompter = Prompter("alpaca")
    with pytest.raises(ValueError, match="--cutoff_len=8"):
        build_datasets(RECORDS, tokenizer, prompter, 8, False, 0, seed=1, source="mem")


def test_validation_split_is_seeded(tokenizer):
    prompter = Prompter("alpaca")
    a = build_datasets(RECORDS, tokenizer, prompter, 256, True, 2, seed=3, source="mem")
    b = build_datasets(RECORDS, tokenizer, prompter, 256, True, 2, seed=3, source="mem")
    assert a[1] == b[1] and len(a[0]) == 4 and len(a[1]) == 2
    with pytest.raises(ValueError, match="--val_set_size=6"):
        build_datasets(RECORDS, tokenizer, prompter, 256, True, 6, seed=3, source="mem")


def test_padding_collator_masks_padding(tokenizer):
    prompter = Prompter("alpaca")
    examples = [tokenize_example(r, tokenizer, prompter, 256, False) for r in RECORDS[:2]]
    batch = PaddingCollator(tokenizer.pad_token_id)(examples)
    assert batch["input_ids"].shape[1] % 8 == 0
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["attention_mask"][row, :n].all() and not batch["attention_mask"][row, n:].any()
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()


def test_load_json_and_jsonl(tmp_path):
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps(RECORDS))
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n")
    assert load_records(str(json_path)) == RECORDS == load_records(str(jsonl_path))


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("this is not json", "not valid JSON"),
        ('{\n  "instruction": "x"\n}', "holds one JSON object"),
        ('{"instruction": "x"}', "record 0 has no 'output'"),  # one line: JSONL with one record
        ('[{"instruction": null, "output": "b"}]', "record 0: 'instruction' must be a string, not null"),
        ('[{"instruction": "a", "output": null}]', "record 0: 'output' must be a string, not null"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
        ('[{"instruction": "a", "output": "b", "n": ' + "9" * 5000 + "}]", "cannot be read as JSON"),
        ("[]", "holds no records"),
        (
            '[{"instruction": "a", "output": "b"}, {"input": "x", "output": "y"}]',
            "record 1 has no 'instruction'",
        ),
        ('[{"instruction": "a", "input": ""}]', "record 0 has no 'output'"),
        ('[{"instruction": "a", "output": 3}]', "record 0: 'output' must be a string, not int"),
        ('[{"instruction": ["a"], "output": "b"}]', "record 0: 'instruction' must be a string"),
        ('[{"instruction": "a", "input": {"k": 1}, "output": "b"}]', "'input' must be a string, not dict"),
        ('["just a string"]', "record 0 is a str"),
    ],
)
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError) as err:
        load_records(str(path))
    assert message in str(err.value) and "bad.json" in str(err.value)


def test_jsonl_named_json_is_read_by_content(tmp_path):
    path = tmp_path / "records.json"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert load_records(str(path)) == RECORDS
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"train": RECORDS}, indent=2))
    assert load_records(str(wrapped)) == RECORDS


def test_null_input_is_no_input(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "input": None, "output": "b"}]))
    assert load_records(str(path))[0]["input"] is None


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "c"}]')
    with pytest.raises(ValueError, match=r"latin1.json' is not valid UTF-8 \(byte \d+, line 2\)"):
        load_records(str(path))


def test_bad_jsonl_line_is_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match="line 2"):
        load_records(str(path))


def test_missing_data_file():
    with pytest.raises(ValueError, match="no such file"):
        load_records("./does/not/exist.json")


@pytest.mark.parametrize(
    "batch, micro, world, steps",
    [(128, 4, 1, 32), (128, 4, 2, 16), (128, 4, 4, 8), (8, 4, 2, 1), (4, 4, 2, 1), (16, 8, 1, 2)],
)
def test_gradient_accumulation(batch, micro, world, steps):
    assert gradient_accumulation(batch, micro, world)[0] == steps


def test_gradient_accumulation_never_below_one_and_errors():
    steps, warning = gradient_accumulation(4, 4, 4)
    assert steps == 1 and "global batch is 16" in warning
    with pytest.raises(ValueError, match="--micro_batch_size=8 is larger than --batch_size=4"):
        gradient_accumulation(4, 8, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        gradient_accumulation(12, 4, 2)


def test_local_dataset_folders_load_through_datasets(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "my_dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text("\n".join(json.dumps(r) for r in RECORDS))
    assert load_records(str(folder)) == RECORDS  # a folder of data files, as on the hub
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(RECORDS)}).save_to_disk(str(saved))
    assert load_records(str(saved)) == RECORDS  # a save_to_disk folder
    with pytest.raises(ValueError, match="no such file or folder"):
        load_records("./not/a/dataset")
