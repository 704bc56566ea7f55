"""The format travels with the model: the adapter folder, the merged HF export and the GGUF export carry
the chat template the model was trained in (an Alpaca-trained model: the Alpaca template as Jinja), and
that stored template renders the token ids training used, for 15 held-out records each."""

import json
from pathlib import Path

import jinja2
import pytest
from helpers.export_fixtures import read_gguf
from helpers.finetune_runs import run_finetune_fast, write_sample_subset

from alpaca.core.chat import (
    FORMAT_FILE,
    alpaca_chat_template,
    alpaca_record_chat,
    conversation_messages,
    encode_rendered,
    read_training_format,
    recorded_format,
    render,
)
from alpaca.core.prompter import Prompter, load_template
from alpaca.finetune.conversations import tokenize_conversation
from alpaca.finetune.data import load_records, tokenize_example
from alpaca.modeling import load_plain_tokenizer
from alpaca.weights.export import export_gguf, export_hf

REPO = Path(__file__).resolve().parent.parent
CHAT_SAMPLE = REPO / "data" / "chat_sample.jsonl"


def held_out_alpaca(count: int = 15) -> list[dict]:
    from alpaca.quickstart import split_records

    return split_records(json.loads((REPO / "data" / "alpaca_sample.json").read_text()))[1][:count]


def held_out_chats(count: int = 15) -> list[list[dict]]:
    records = load_records(str(CHAT_SAMPLE))
    return [conversation_messages(r, i, "chat_sample") for i, r in enumerate(records)][-count:]


@pytest.fixture(scope="module")
def alpaca_adapter(tiny_llama, tmp_path_factory):
    data = write_sample_subset(tmp_path_factory.mktemp("data") / "a.json", 16)
    out = tmp_path_factory.mktemp("alpaca") / "lora"
    run_finetune_fast(tiny_llama, str(data), out, max_steps=2, prompt_template_name="alpaca_short")
    return str(out)


@pytest.fixture(scope="module")
def chat_adapter(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "lora"
    run_finetune_fast(tiny_llama, str(CHAT_SAMPLE), out, max_steps=2, chat_template="chatml", cutoff_len=256)
    return str(out)


alpaca_messages = alpaca_record_chat


def assert_renders_training_ids(template: str, tokenizer, kind: str, prompt_template: str = "alpaca"):
    """The stored template gives the ids training used: the prompt of each held-out Alpaca record, or
    the whole of each held-out conversation."""
    if kind == "prompt_template":
        prompter = Prompter(prompt_template)
        for record in held_out_alpaca():
            example = tokenize_example(record, tokenizer, prompter, 4096, False)
            text = render(template, alpaca_messages(record), tokenizer, add_generation_prompt=True)
            assert encode_rendered(tokenizer, text) == example["input_ids"][: example["n_prompt"]]
    else:
        for messages in held_out_chats():
            example = tokenize_conversation(messages, tokenizer, template, 4096, False)
            assert encode_rendered(tokenizer, render(template, messages, tokenizer)) == example["input_ids"]
            prompt = render(template, messages[:-1], tokenizer, add_generation_prompt=True)
            assert (
                encode_rendered(tokenizer, prompt)
                == example["input_ids"][: example["trained_positions"][-1].start]
            )


def test_adapters_record_their_training_format(alpaca_adapter, chat_adapter):
    alpaca = read_training_format(alpaca_adapter)
    assert alpaca.kind == "prompt_template" and alpaca.prompt_template == "alpaca_short"
    assert alpaca.chat_template == alpaca_chat_template(load_template("alpaca_short"))
    chat = read_training_format(chat_adapter)
    assert chat.kind == "chat_template" and chat.chat_template_flag == "chatml"
    for folder, recorded in ((alpaca_adapter, alpaca), (chat_adapter, chat)):
        assert load_plain_tokenizer(folder).chat_template == recorded.chat_template
        run_config = json.loads((Path(folder) / "run_config.json").read_text())
        assert run_config["training_format"] == recorded.kind
        assert run_config["chat_template_text"] == recorded.chat_template
    assert load_plain_tokenizer(chat_adapter).convert_tokens_to_ids("<|im_end|>") >= 2000  # added, trained


@pytest.mark.parametrize("which", ["alpaca", "chat"])
def test_hf_and_gguf_exports_carry_the_trained_template(
    which, alpaca_adapter, chat_adapter, tiny_llama, tmp_path
):
    adapter = alpaca_adapter if which == "alpaca" else chat_adapter
    recorded = read_training_format(adapter)
    hf = tmp_path / "hf"
    export_hf(tiny_llama, adapter, str(hf))
    tokenizer = load_plain_tokenizer(str(hf))
    assert tokenizer.chat_template == recorded.chat_template
    assert (hf / "chat_template.jinja").read_text() == recorded.chat_template
    assert_renders_training_ids(tokenizer.chat_template, tokenizer, recorded.kind, recorded.prompt_template)

    gguf_path = tmp_path / "model.gguf"
    export_gguf(tiny_llama, adapter, str(gguf_path), outtype="f32")
    kv, _ = read_gguf(gguf_path)
    stored = kv["tokenizer.chat_template"]
    assert stored == recorded.chat_template
    # llama.cpp renders the stored template with its own Jinja engine; a plain jinja2 environment (none
    # of transformers' settings) gives the same text
    plain = jinja2.Environment().from_string(stored)
    messages = held_out_chats()[0] if which == "chat" else alpaca_messages(held_out_alpaca()[0], True)
    text = plain.render(messages=messages, add_generation_prompt=False, bos_token="<s>", eos_token="</s>")
    assert text == render(stored, messages, tokenizer)


def test_an_adapter_without_a_recorded_format_exports_its_prompt_template(
    tiny_llama, alpaca_adapter, tmp_path
):
    """Adapters trained before formats were recorded: the run_config's prompt template, else Alpaca's."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(alpaca_adapter, old)
    (old / FORMAT_FILE).unlink()
    assert recorded_format(str(old)).chat_template == alpaca_chat_template(load_template("alpaca_short"))
    (old / "run_config.json").unlink()
    assert recorded_format(str(old)).chat_template == alpaca_chat_template(load_template("alpaca"))
    assert recorded_format("tloen/alpaca-lora-7b").prompt_template == "alpaca"
    hf = tmp_path / "hf"
    export_hf(tiny_llama, str(old), str(hf))
    assert load_plain_tokenizer(str(hf)).chat_template == alpaca_chat_template(load_template("alpaca"))


@pytest.mark.realmodel
def test_smollm2_alpaca_adapter_export_no_longer_carries_chatml(smollm2, smollm2_adapter, tmp_path):
    """The bug this fixes: an Alpaca-trained SmolLM2 exported with the base model's ChatML template."""
    base_template = load_plain_tokenizer(smollm2).chat_template
    assert "<|im_start|>" in base_template
    gguf_path = tmp_path / "smol.gguf"
    export_gguf(smollm2, smollm2_adapter, str(gguf_path), outtype="f16")
    kv, _ = read_gguf(gguf_path)
    recorded = recorded_format(smollm2_adapter)
    assert kv["tokenizer.chat_template"] == recorded.chat_template != base_template
    tokenizer = load_plain_tokenizer(smollm2_adapter)
    assert_renders_training_ids(
        kv["tokenizer.chat_template"], tokenizer, recorded.kind, recorded.prompt_template
    )


def test_evaluate_loss_scores_conversations_on_assistant_tokens_in_the_trained_format(
    tiny_llama, chat_adapter
):
    from alpaca.evaluation.loss import held_out_loss

    report = held_out_loss(tiny_llama, chat_adapter, str(CHAT_SAMPLE), cutoff_len=256)
    tokenizer = load_plain_tokenizer(chat_adapter)
    template = read_training_format(chat_adapter).chat_template
    examples = [
        tokenize_conversation(conversation_messages(r, i, "s"), tokenizer, template, 256, False)
        for i, r in enumerate(load_records(str(CHAT_SAMPLE)))
    ]
    kept = [e for e in examples if e["status"] != "skipped"]
    # every assistant token (and end-of-turn token) is scored, nothing else
    assert report.examples == len(kept) and report.skipped == len(examples) - len(kept)
    assert report.tokens == sum(sum(t != -100 for t in e["labels"][1:]) for e in kept)
    assert 0 < report.loss < 20
