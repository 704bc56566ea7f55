"""Batched preparation (`alpaca.finetune.batched`, `alpaca.finetune.prepared`) gives exactly the examples of
one-at-a-time preparation (`data.tokenize_record`, `data.build_datasets`): Alpaca records in every
template, conversations and Alpaca records in a chat template, and the edge cases."""

import json
from pathlib import Path

import pytest

from alpaca.core.chat import SHIPPED_CHAT_TEMPLATES
from alpaca.core.prompter import Prompter, available_templates
from alpaca.finetune.batched import tokenize_records
from alpaca.finetune.data import build_datasets, load_records, tokenize_record
from alpaca.finetune.prepared import prepare_examples, split_prepared
from alpaca.finetune.sources import scan_source

REPO = Path(__file__).resolve().parent.parent
ALPACA_SAMPLE = REPO / "data" / "alpaca_sample.json"
CHAT_SAMPLE = REPO / "data" / "chat_sample.jsonl"
FIELDS = ("input_ids", "labels", "status", "n_prompt")

EDGE_CASES = [
    {"instruction": "Empty input and output.", "input": "", "output": ""},
    {"instruction": "Null input.", "input": None, "output": "ok"},
    {"instruction": "Very long prompt. " * 200, "input": "and a long input " * 50, "output": "short"},
    {"instruction": "Long output.", "input": "", "output": "word " * 400},
    {
        "instruction": "Unicode: ünïcødé, 日本語, emoji 🙂🚀, RTL שלום",
        "input": "ß→ss",
        "output": "Ça va — 😀",
    },
    {"instruction": "No space at the boundary", "input": "", "output": "...glued"},
    {"instruction": "Whitespace", "input": "  ", "output": "\n\n  spaced out \t"},
    {"instruction": "Newlines\n\nin the instruction", "input": "line\nline", "output": "\u2028separator"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from alpaca.modeling import load_tokenizer

    return load_tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_llama):
    from alpaca.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def alpaca_records() -> list[dict]:
    return json.loads(ALPACA_SAMPLE.read_text()) + EDGE_CASES


def assert_same(records, tokenizer, prompter, cutoff_len, train_on_inputs, chat_template=None):
    indexed = list(enumerate(records))
    batched = tokenize_records(
        indexed, tokenizer, prompter, cutoff_len, train_on_inputs, "mem", chat_template
    )
    statuses = set()
    for (index, record), example in zip(indexed, batched):
        single = tokenize_record(
            record, index, tokenizer, prompter, cutoff_len, train_on_inputs, "mem", chat_template
        )
        for key in FIELDS + (("turns",) if chat_template else ()):
            assert example[key] == single[key], (index, key)
        statuses.add(example["status"])
    return statuses


@pytest.mark.parametrize("template", available_templates())
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_alpaca_records_batched_equal_one_at_a_time(tokenizer, template, train_on_inputs):
    prompter = Prompter(template)
    statuses = assert_same(alpaca_records(), tokenizer, prompter, 96, train_on_inputs)
    assert statuses == {"ok", "truncated", "skipped"}  # every branch is compared
    assert_same(alpaca_records(), tokenizer, prompter, 1024, train_on_inputs)


def test_boundary_fallback_is_taken_and_equal(tokenizer):
    """A prompt ending mid-word makes the tokenizer merge across the boundary: the fallback path."""
    prompter = Prompter("alpaca")
    prompter.template = dict(prompter.template, prompt_no_input=prompter.template["prompt_no_input"] + "a")
    records = [{"instruction": "x", "input": "", "output": "nswer and more"}, EDGE_CASES[5]]
    single = tokenize_record(records[0], 0, tokenizer, prompter, 256, False)
    full = tokenizer(prompter.generate_prompt("x") + "nswer and more")["input_ids"]
    assert single["input_ids"][: single["n_prompt"]] != full[: single["n_prompt"]]  # really merged
    assert_same(records, tokenizer, prompter, 256, False)


@pytest.mark.parametrize("train_on_inputs", [False, True])
@pytest.mark.parametrize("cutoff_len", [48, 2048])
def test_conversations_batched_equal_one_at_a_time(chatml_tokenizer, train_on_inputs, cutoff_len):
    chatml = SHIPPED_CHAT_TEMPLATES["chatml"].read_text()
    records = load_records(str(CHAT_SAMPLE)) + alpaca_records()[:20] + EDGE_CASES
    statuses = assert_same(records, chatml_tokenizer, Prompter("alpaca"), cutoff_len, train_on_inputs, chatml)
    assert statuses == ({"ok", "truncated", "skipped"} if cutoff_len == 48 else {"ok"})


def test_empty_batch(tokenizer):
    assert tokenize_records([], tokenizer, Prompter("alpaca"), 64, False) == []


@pytest.mark.parametrize("num_proc", [1, 2])
def test_prepared_table_equals_build_datasets(tokenizer, tmp_path, num_proc):
    path = tmp_path / "data.jsonl"
    records = alpaca_records()
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    prompter = Prompter("alpaca")
    train, val, report = build_datasets(records, tokenizer, prompter, 96, False, 5, seed=7, source=str(path))
    source = scan_source(str(path), tmp_path / "cache")
    prepared = prepare_examples(
        source, tokenizer, prompter, 96, False, num_proc=num_proc, cache_root=tmp_path / "cache"
    )
    assert not prepared.reused
    cached_train, cached_val, cached_report = split_prepared(prepared, 5, seed=7, source=str(path))
    for mine, theirs in ((cached_train, train), (cached_val, val)):
        assert len(mine) == len(theirs)
        for row, example in zip(mine, theirs):
            assert row["input_ids"] == example["input_ids"] and row["labels"] == example["labels"]
            assert row["length"] == len(example["input_ids"])
    expected = report.to_dict()
    got = cached_report.to_dict()
    for key in ("cache_id", "cache_dir", "cache_reused"):
        got.pop(key)
        expected.pop(key)
    assert got == expected


TRICKY_TEXTS = [
    "",
    " ",
    "plain words",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n",
    "ünïcødé 日本語 🙂🚀 שלום ß→ss",
    "<|im_start|>user\nspecial tokens inside<|im_end|>\n<|endoftext|></s><s>",
    "\u2028\u00a0\u200b odd spaces",
]


def _fast_path_equals_transformers(tokenizer):
    from alpaca.finetune.batched import encode_batch, rust_backend

    assert rust_backend(tokenizer) is not None  # the fast path is the one being checked
    texts = TRICKY_TEXTS + [Prompter("alpaca").generate_prompt(r["instruction"]) for r in EDGE_CASES]
    for special in (True, False):
        assert encode_batch(tokenizer, texts, special) == [
            tokenizer(text, add_special_tokens=special)["input_ids"] for text in texts
        ]


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_opt"])
def test_direct_backend_ids_equal_the_tokenizers_call(model, request):
    """`encode_batch` calls the Rust tokenizer directly (no offsets, no Python conversion); its ids equal
    `tokenizer(text)`'s, BOS (LLaMA, OPT) and special tokens in the text included, and a tokenizer set up
    differently (truncation on, split_special_tokens) falls back to `tokenizer(...)`."""
    from alpaca.finetune.batched import encode_batch, rust_backend
    from alpaca.modeling import load_tokenizer

    tokenizer = load_tokenizer(request.getfixturevalue(model))
    _fast_path_equals_transformers(tokenizer)
    tokenizer.split_special_tokens = True
    assert rust_backend(tokenizer) is None
    assert encode_batch(tokenizer, TRICKY_TEXTS, True) == tokenizer(TRICKY_TEXTS)["input_ids"]
    tokenizer.split_special_tokens = False
    tokenizer._tokenizer.enable_truncation(max_length=4)
    assert rust_backend(tokenizer) is None


def test_opt_batched_equal_one_at_a_time(tiny_opt):
    from alpaca.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_opt)
    assert assert_same(alpaca_records(), tokenizer, Prompter("alpaca"), 96, False) == {
        "ok",
        "truncated",
        "skipped",
    }


@pytest.mark.realmodel
def test_smollm2_batched_equal_one_at_a_time(smollm2):
    """The real tokenizer (byte-level BPE with SmolLM2's added tokens): the direct path's ids, and batched
    preparation of Alpaca records and of conversations in its own chat template, equal one at a time."""
    from alpaca.modeling import load_tokenizer

    tokenizer = load_tokenizer(smollm2)
    _fast_path_equals_transformers(tokenizer)
    assert assert_same(alpaca_records(), tokenizer, Prompter("alpaca"), 96, False) == {
        "ok",
        "truncated",
        "skipped",
    }
    records = load_records(str(CHAT_SAMPLE)) + EDGE_CASES
    assert_same(records, tokenizer, Prompter("alpaca"), 2048, False, tokenizer.chat_template)
