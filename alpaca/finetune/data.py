"""Instruction data: load and validate records, tokenize with label masks, collate (packing lives in
`alpaca.finetune.packing`).

Two kinds of records: Alpaca records (`instruction`, `input`, `output`) and conversations (OpenAI
`messages` or ShareGPT `conversations`; see `alpaca.core.chat`). The label rule for Alpaca records in a
prompt template, computed on token ids: the training sequence is the prompt's tokens, then the output's
tokens, then EOS. With `train_on_inputs=False` exactly the prompt's tokens are masked with
IGNORE_INDEX, so the unmasked labels are the output plus EOS for every template. Conversations (and
Alpaca records given a chat template) follow `alpaca.finetune.conversations`: each assistant turn's
content and end-of-turn token.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alpaca.core.chat import alpaca_record_messages, conversation_messages, is_conversation
from alpaca.core.files import read_json_records
from alpaca.finetune.conversations import IGNORE_INDEX, tokenize_conversation
from alpaca.finetune.sources import open_hf_dataset, source_kind, validate_record

# ---------------------------------------------------------------- loading and validation


def load_records(data_path: str) -> list[dict]:
    """Load Alpaca records from a `.json`/`.jsonl` file (either name, either format: the content decides,
    see `alpaca.core.files.read_json_values`) or a Hugging Face dataset name or folder (train split), as
    a list (`alpaca.finetune.sources` reads large data without one)."""
    path = Path(data_path).expanduser()
    if source_kind(data_path) == "hf":
        records = list(open_hf_dataset(data_path))
    else:
        records = read_json_records(path, f"data file {str(path)!r}")
    validate_records(records, source=data_path)
    return records


def validate_records(records: list, source: str) -> None:
    """Raise a ValueError naming the first bad record (`alpaca.finetune.sources.validate_record`)."""
    if not records:
        raise ValueError(f"{source!r} holds no records")
    for index, record in enumerate(records):
        validate_record(record, index, source)


# ---------------------------------------------------------------- tokenization


def tokenize_example(record: dict, tokenizer, prompter, cutoff_len: int, train_on_inputs: bool) -> dict:
    """Tokenize one record into `input_ids`, `attention_mask`, `labels` and a `status`.

    `status` is `ok`, `truncated` (cut at `cutoff_len`; no EOS since the output is incomplete) or
    `skipped` (the prompt alone fills `cutoff_len`, leaving nothing to learn; upstream trained on such
    rows and got NaN losses when every label was masked).
    """
    prompt = prompter.generate_prompt(record["instruction"], record.get("input") or None)
    output = record["output"] or ""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    full_ids = tokenizer(prompt + output, add_special_tokens=True)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # The tokenizer merged text across the prompt/output boundary; keep the prompt's own tokens
        # so the mask covers exactly the prompt.
        output_ids = tokenizer(output, add_special_tokens=False)["input_ids"]
        full_ids = prompt_ids + output_ids
    if tokenizer.eos_token_id is not None and (not full_ids or full_ids[-1] != tokenizer.eos_token_id):
        full_ids = full_ids + [tokenizer.eos_token_id]
    n_prompt = len(prompt_ids)
    status = "ok"
    if n_prompt >= cutoff_len:
        status = "skipped"
    elif len(full_ids) > cutoff_len:
        status = "truncated"
    full_ids = full_ids[:cutoff_len]
    labels = list(full_ids)
    if not train_on_inputs:
        labels[:n_prompt] = [IGNORE_INDEX] * min(n_prompt, len(labels))
    return {
        "input_ids": full_ids,
        "attention_mask": [1] * len(full_ids),
        "labels": labels,
        "status": status,
        "n_prompt": n_prompt,
    }


def record_messages(record: dict, index: int, source: str, chat_template: str | None) -> list[dict] | None:
    """The turns a record trains as in `chat_template`, or None for an Alpaca record in the prompt
    template (no chat template); a conversation without a chat template is an error."""
    if not is_conversation(record) and chat_template is None:
        return None
    if chat_template is None:
        raise ValueError(f"{source!r} record {index} is a conversation: give --chat_template")
    if is_conversation(record):
        return conversation_messages(record, index, source)
    return alpaca_record_messages(record)


def tokenize_record(
    record: dict,
    index: int,
    tokenizer,
    prompter,
    cutoff_len: int,
    train_on_inputs: bool,
    source: str = "",
    chat_template: str | None = None,
) -> dict:
    """One record, Alpaca or conversation, tokenized in the run's format."""
    messages = record_messages(record, index, source, chat_template)
    if messages is None:
        return tokenize_example(record, tokenizer, prompter, cutoff_len, train_on_inputs)
    where = f"{source!r} record {index}"
    return tokenize_conversation(messages, tokenizer, chat_template, cutoff_len, train_on_inputs, where)


@dataclass
class DataReport:
    """What the pipeline did to the records: printed before training and saved as JSON."""

    source: str = ""
    records: int = 0
    kept: int = 0
    skipped: int = 0
    truncated: int = 0
    conversations: int = 0
    turns: int = 0
    skipped_indices: list = field(default_factory=list)
    train_examples: int = 0
    val_examples: int = 0
    trained_tokens: int = 0
    length_percentiles: dict = field(default_factory=dict)
    cache_id: str = ""  # the key of the prepared-data cache (alpaca.finetune.prepared), when one was used
    cache_dir: str = ""
    cache_reused: bool | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["skipped_indices"] = data["skipped_indices"][:50]
        return data

    def summary(self) -> str:
        p = self.length_percentiles
        lengths = ", ".join(f"{k} {v}" for k, v in p.items())
        chats = f" ({self.conversations} conversations, {self.turns} turns)" if self.conversations else ""
        cache = ""
        if self.cache_id:
            cache = f"; prepared data {'reused from' if self.cache_reused else 'cached in'} {self.cache_dir}"
        return (
            f"data {self.source}: {self.records} records{chats}, {self.kept} kept, {self.skipped} skipped "
            f"(prompt alone fills cutoff_len), {self.truncated} truncated; train {self.train_examples}, "
            f"val {self.val_examples}, {self.trained_tokens} trained tokens; tokens per example: {lengths}{cache}"
        )


def percentiles(lengths: list[int]) -> dict:
    if not lengths:
        return {}
    ordered = sorted(lengths)
    pick = {"p50": 0.5, "p90": 0.9, "p99": 0.99}
    out = {name: ordered[min(len(ordered) - 1, int(q * len(ordered)))] for name, q in pick.items()}
    out["min"], out["max"], out["mean"] = ordered[0], ordered[-1], round(sum(ordered) / len(ordered), 1)
    return out


def build_datasets(
    records: list[dict],
    tokenizer,
    prompter,
    cutoff_len: int,
    train_on_inputs: bool,
    val_set_size: int,
    seed: int,
    source: str = "",
    chat_template: str | None = None,
):
    """Tokenize every record, drop the skipped ones, split off a validation set.

    `chat_template` (Jinja source) formats conversations, and Alpaca records too when given; without
    it Alpaca records use `prompter` and a conversation is an error.
    Returns `(train_examples, val_examples, report)`; examples are dicts of token id lists.
    """
    report = DataReport(source=source, records=len(records))
    examples = []
    for index, record in enumerate(records):
        example = tokenize_record(
            record, index, tokenizer, prompter, cutoff_len, train_on_inputs, source, chat_template
        )
        if "turns" in example:
            report.conversations += is_conversation(record)
            report.turns += example["turns"]
        if example["status"] == "skipped":
            report.skipped += 1
            report.skipped_indices.append(index)
            continue
        report.truncated += example["status"] == "truncated"
        examples.append({key: example[key] for key in ("input_ids", "attention_mask", "labels")})
    report.kept = len(examples)
    if not examples:
        raise ValueError(
            f"{source!r}: all {len(records)} records were skipped because their prompt alone is at least "
            f"--cutoff_len={cutoff_len} tokens; raise --cutoff_len"
        )
    if val_set_size >= len(examples):
        raise ValueError(
            f"--val_set_size={val_set_size} leaves no training data: only {len(examples)} usable examples; "
            "lower it (0 disables validation)"
        )
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    val = [examples[i] for i in order[:val_set_size]] if val_set_size > 0 else []
    train = [examples[i] for i in order[val_set_size:]] if val_set_size > 0 else examples
    report.train_examples, report.val_examples = len(train), len(val)
    report.trained_tokens = sum(sum(1 for t in ex["labels"] if t != IGNORE_INDEX) for ex in train)
    report.length_percentiles = percentiles([len(ex["input_ids"]) for ex in examples])
    return train, val, report


# ---------------------------------------------------------------- collation


class PaddingCollator:
    """Right-pads a list of examples into a batch; labels are padded with IGNORE_INDEX."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = 8):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict:
        import torch

        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * pad)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


class ExampleDataset:
    """A list of tokenized examples with a `lengths` view for length-grouped sampling."""

    def __init__(self, examples: list[dict]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        return self.examples[index]

    @property
    def lengths(self) -> list[int]:
        return [len(ex["input_ids"]) for ex in self.examples]
