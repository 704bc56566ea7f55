"""Conversation records: loading and errors, the loss mask of every assistant turn (decoded), Alpaca
records in a chat template, truncation and skips, packing, and the Alpaca template as Jinja."""

import json
from pathlib import Path

import pytest
import torch
from test_packing import packed_forward, unpacked_reference

from alpaca.core.chat import (
    adds_bos,
    alpaca_chat_template,
    alpaca_record_chat,
    alpaca_record_messages,
    conversation_messages,
    encode_rendered,
    resolve_chat_template,
    training_format,
)
from alpaca.core.prompter import Prompter, available_templates, load_template
from alpaca.finetune.conversations import tokenize_conversation
from alpaca.finetune.data import IGNORE_INDEX, build_datasets, load_records, tokenize_example

REPO = Path(__file__).resolve().parent.parent
CHAT_SAMPLE = REPO / "data" / "chat_sample.jsonl"
ALPACA_SAMPLE = REPO / "data" / "alpaca_sample.json"


def chat_records() -> list[dict]:
    return load_records(str(CHAT_SAMPLE))


def held_out_alpaca(count: int = 15) -> list[dict]:
    """The demo's held-out records (every 8th), 15 of them."""
    from alpaca.quickstart import split_records

    return split_records(json.loads(ALPACA_SAMPLE.read_text()))[1][:count]


@pytest.fixture(scope="module")
def chatml_tokenizer(tiny_llama):
    """The tiny LLaMA's sentencepiece tokenizer with ChatML's two tokens added, as finetune.py adds them."""
    from alpaca.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tokenizer


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def test_chat_sample_has_both_forms_system_messages_and_multi_turn():
    raw = [json.loads(line) for line in CHAT_SAMPLE.read_text().splitlines()]
    assert sum("messages" in r for r in raw) and sum("conversations" in r for r in raw)
    messages = [conversation_messages(r, i, "s") for i, r in enumerate(raw)]
    assert sum(m[0]["role"] == "system" for m in messages) >= 10
    assert sum(sum(t["role"] == "assistant" for t in m) >= 3 for m in messages) >= 10
    assert len(chat_records()) == len(raw) == 60


@pytest.mark.parametrize(
    "record,message",
    [
        ({"messages": [{"role": "bot", "content": "x"}]}, "record 1, turn 0: unknown role 'bot'"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
            "record 1, turn 1: 'content' is empty",
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, "record 1: no assistant turn"),
        (
            {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
            "record 1, turn 0: 'value' must be a string, not a int",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
            "record 1, turn 1: a system message may only be the first turn",
        ),
        ({"conversations": "hello"}, "record 1: 'conversations' must be a non-empty list"),
        ({"messages": [["user", "hi"]]}, "record 1, turn 0 is a list, not an object"),
        ({"conversations": [{"from": "robot", "value": "x"}]}, "unknown from 'robot'"),
    ],
)
def test_bad_conversations_name_the_record_and_the_turn(tmp_path, record, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", [good, record])
    with pytest.raises(ValueError) as err:
        load_records(path)
    assert message in str(err.value) and "bad.jsonl" in str(err.value)


def test_two_turns_of_a_role_name_the_turn_where_the_template_cannot_render_them(chatml_tokenizer):
    strict = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
        "{{ m['content'] + eos_token }}{% endfor %}"
    )
    messages = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(ValueError, match=r"rec 4: turn 1: two user turns in a row.*must alternate"):
        tokenize_conversation(messages, chatml_tokenizer, strict, 256, False, "rec 4")
    # ChatML renders them, and the reply is still the only trained text
    chatml = resolve_chat_template("chatml", chatml_tokenizer)
    example = tokenize_conversation(messages, chatml_tokenizer, chatml, 256, False, "rec 4")
    assert chatml_tokenizer.decode([t for t in example["labels"] if t != IGNORE_INDEX]) == "c<|im_end|>"


def trained_texts(tokenizer, example: dict) -> list[str]:
    """Each assistant turn's unmasked labels, decoded."""
    labels, texts, current = example["labels"], [], []
    for position, label in enumerate(labels):
        if label != IGNORE_INDEX:
            current.append(label)
        if current and (label == IGNORE_INDEX or position == len(labels) - 1):
            texts.append(tokenizer.decode(current))
            current = []
    return texts


def assert_labels_are_assistant_turns(tokenizer, template: str, end_token: str):
    for index, record in enumerate(chat_records()):
        messages = conversation_messages(record, index, "chat_sample")
        example = tokenize_conversation(messages, tokenizer, template, 4096, False, f"record {index}")
        wanted = [m["content"] + end_token for m in messages if m["role"] == "assistant"]
        assert example["status"] == "ok"
        assert trained_texts(tokenizer, example) == wanted, index
        # the newline after the end token and the next role header are masked
        for positions in example["trained_positions"]:
            after = positions.stop
            assert after == len(example["labels"]) or example["labels"][after] == IGNORE_INDEX


def test_trained_labels_are_each_assistant_turn_and_its_end_token_chatml_tiny(chatml_tokenizer):
    assert_labels_are_assistant_turns(
        chatml_tokenizer, resolve_chat_template("chatml", chatml_tokenizer), "<|im_end|>"
    )


@pytest.mark.realmodel
@pytest.mark.parametrize("template", ["tokenizer", "chatml"])
def test_trained_labels_are_each_assistant_turn_and_its_end_token_smollm2(smollm2, template):
    from alpaca.modeling import load_tokenizer

    tokenizer = load_tokenizer(smollm2)
    assert_labels_are_assistant_turns(tokenizer, resolve_chat_template(template, tokenizer), "<|im_end|>")


def test_train_on_inputs_trains_every_token(chatml_tokenizer):
    template = resolve_chat_template("chatml", chatml_tokenizer)
    messages = conversation_messages(chat_records()[2], 2, "s")
    example = tokenize_conversation(messages, chatml_tokenizer, template, 4096, True)
    assert example["labels"] == example["input_ids"]


def test_alpaca_records_in_a_chat_template_train_the_output_and_end_token(chatml_tokenizer):
    template = resolve_chat_template("chatml", chatml_tokenizer)
    records = json.loads(ALPACA_SAMPLE.read_text())[:20]
    for record in records:
        messages = alpaca_record_messages(record)
        if record["input"]:
            assert messages[0]["content"] == f"{record['instruction']}\n\n{record['input']}"
        example = tokenize_conversation(messages, chatml_tokenizer, template, 4096, False)
        assert trained_texts(chatml_tokenizer, example) == [record["output"] + "<|im_end|>"]


def test_truncation_and_skips_are_counted(chatml_tokenizer):
    template = resolve_chat_template("chatml", chatml_tokenizer)
    records = chat_records()[:12]
    prompter = Prompter("alpaca")
    full = [
        tokenize_conversation(conversation_messages(r, i, "s"), chatml_tokenizer, template, 10**6, False)
        for i, r in enumerate(records)
    ]
    cutoff = sorted(len(e["input_ids"]) for e in full)[len(full) // 2]
    train, _, report = build_datasets(records, chatml_tokenizer, prompter, cutoff, False, 0, 0, "s", template)
    first_replies = [e["n_prompt"] for e in full]
    skipped = sum(start >= cutoff for start in first_replies)
    truncated = sum(len(e["input_ids"]) > cutoff and e["n_prompt"] < cutoff for e in full)
    assert report.skipped == skipped and report.truncated == truncated > 0
    assert report.conversations == 12 and report.turns == sum(e["turns"] for e in full)
    assert all(len(ex["input_ids"]) <= cutoff for ex in train)
    assert report.trained_tokens == sum(sum(t != IGNORE_INDEX for t in ex["labels"]) for ex in train)
    # a conversation whose first reply starts beyond the cutoff is skipped: nothing of it is learnt
    tiny_cutoff = min(first_replies)
    with pytest.raises(ValueError, match="all 12 records were skipped"):
        build_datasets(records, chatml_tokenizer, prompter, tiny_cutoff, False, 0, 0, "s", template)


def test_conversations_without_a_chat_template_are_an_error(chatml_tokenizer):
    with pytest.raises(ValueError, match="record 0 is a conversation: give --chat_template"):
        build_datasets(chat_records()[:2], chatml_tokenizer, Prompter("alpaca"), 256, False, 0, 0, "s")


def test_packed_conversations_give_the_unpacked_loss(tiny_llama, chatml_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    model.resize_token_embeddings(len(chatml_tokenizer))
    template = resolve_chat_template("chatml", chatml_tokenizer)
    features = [
        tokenize_conversation(conversation_messages(r, i, "s"), chatml_tokenizer, template, 160, False)
        for i, r in enumerate(chat_records()[:6])
    ]
    features = [{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in features]
    ref_logits, ref_loss = unpacked_reference(model, features)
    logits, loss = packed_forward(model, features)
    for packed, unpacked in zip(logits, ref_logits):
        torch.testing.assert_close(packed, unpacked, rtol=0, atol=1e-5)
    assert abs(loss.item() - ref_loss.item()) < 1e-5


alpaca_chat_messages = alpaca_record_chat


def assert_alpaca_jinja_renders_training_ids(tokenizer):
    for name in available_templates():
        prompter = Prompter(name)
        jinja = alpaca_chat_template(load_template(name))
        for record in held_out_alpaca():
            example = tokenize_example(record, tokenizer, prompter, 4096, False)
            text = tokenizer.apply_chat_template(
                alpaca_chat_messages(record, False),
                chat_template=jinja,
                add_generation_prompt=True,
                tokenize=False,
            )
            assert text == prompter.generate_prompt(record["instruction"], record["input"]), name
            prompt_ids = encode_rendered(tokenizer, text)
            assert prompt_ids == example["input_ids"][: example["n_prompt"]], (name, record["instruction"])
            text = tokenizer.apply_chat_template(
                alpaca_chat_messages(record, True), chat_template=jinja, tokenize=False
            )
            prompt = prompter.generate_prompt(record["instruction"], record["input"])
            whole = tokenizer(prompt + record["output"])["input_ids"]
            if whole[: example["n_prompt"]] == prompt_ids:
                # (where the tokenizer merges the prompt's end with the answer, training tokenized the
                # two apart, as generation does: the prompt ids above are what must match)
                assert encode_rendered(tokenizer, text) == example["input_ids"], name


def test_alpaca_template_as_jinja_renders_the_training_ids_tiny(tiny_llama):
    from alpaca.modeling import load_tokenizer

    tokenizer = load_tokenizer(tiny_llama)
    assert adds_bos(tokenizer)  # LLaMA's sentencepiece tokenizer adds the BOS to the rendered text
    assert_alpaca_jinja_renders_training_ids(tokenizer)


@pytest.mark.realmodel
def test_alpaca_template_as_jinja_renders_the_training_ids_smollm2(smollm2):
    from alpaca.modeling import load_tokenizer

    tokenizer = load_tokenizer(smollm2)
    assert not adds_bos(tokenizer)
    assert_alpaca_jinja_renders_training_ids(tokenizer)


def test_training_format_defaults(chatml_tokenizer):
    alpaca = training_format("", "alpaca", chatml_tokenizer, has_conversations=False)
    assert alpaca.kind == "prompt_template" and "### Instruction:" in alpaca.chat_template
    with pytest.raises(ValueError, match="--chat_template=chatml"):
        training_format("", "alpaca", chatml_tokenizer, has_conversations=True)  # the tiny one has none
    chat = training_format("chatml", "alpaca", chatml_tokenizer, has_conversations=True)
    assert chat.is_chat and "<|im_start|>" in chat.chat_template
    with pytest.raises(ValueError, match="not tokenizer, a shipped template"):
        training_format("no-such.jinja", "alpaca", chatml_tokenizer, has_conversations=True)
