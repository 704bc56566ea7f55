"""Opt-in: llama.cpp chats with an exported model in the format it was trained in.

llama-cpp-python's `create_chat_completion` formats the chat with the GGUF's `tokenizer.chat_template`
(the adapter's trained template) and decodes greedily; its tokens must be `generate.py`'s for the same
conversation, for a SmolLM2 adapter trained on conversations in SmolLM2's own template and for one
trained on Alpaca records (whose GGUF carries the Alpaca template as Jinja).

    RUN_LLAMACPP=1 python -m pytest -m llamacpp tests/test_chat_llamacpp.py
"""

from pathlib import Path

import pytest
from helpers.finetune_runs import run_finetune_fast
from test_export_quantized_llamacpp import load_llama

from alpaca.core.chat import alpaca_record_chat, conversation_messages
from alpaca.finetune.data import load_records
from alpaca.inference.decoding import DecodingSettings
from alpaca.inference.loading import load_generators
from alpaca.weights.export import export_gguf

pytestmark = [pytest.mark.llamacpp, pytest.mark.realmodel]  # opt-in: RUN_LLAMACPP=1 (tests/conftest.py)
REPO = Path(__file__).resolve().parent.parent
MAX_TOKENS = 24


def chats() -> list[list[dict]]:
    records = load_records(str(REPO / "data" / "chat_sample.jsonl"))
    conversations = [conversation_messages(r, i, "s") for i, r in enumerate(records)][-4:]
    return [m[: max(i for i, t in enumerate(m) if t["role"] == "user") + 1] for m in conversations]


@pytest.fixture(scope="module")
def smollm2_chat_adapter(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("smol-chat") / "lora"
    data = REPO / "data" / "chat_sample.jsonl"
    run_finetune_fast(
        smollm2, str(data), out, max_steps=2, chat_template="tokenizer", cutoff_len=256, learning_rate=1e-3
    )
    return str(out)


def assert_llama_cpp_chats_as_generate(base, adapter, conversations, tmp_path):
    gguf = tmp_path / "model.gguf"
    export_gguf(base, adapter, str(gguf), outtype="f32")
    generator = load_generators(base, adapter)[0]
    settings = DecodingSettings(temperature=0.0, num_beams=1, max_new_tokens=MAX_TOKENS)
    llm = load_llama(gguf, n_ctx=1024)
    for messages in conversations:
        ours = generator.chat_replies([messages], settings)[0]
        reply = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=MAX_TOKENS)
        text = reply["choices"][0]["message"]["content"]
        assert text.strip() == ours.text, messages


def test_llama_cpp_chats_with_a_chat_trained_smollm2_in_its_template(smollm2, smollm2_chat_adapter, tmp_path):
    assert_llama_cpp_chats_as_generate(smollm2, smollm2_chat_adapter, chats(), tmp_path)


def test_llama_cpp_chats_with_an_alpaca_trained_smollm2_in_the_alpaca_template(
    smollm2, smollm2_adapter, tmp_path
):
    from alpaca.quickstart import split_records

    records = split_records(load_records(str(REPO / "data" / "alpaca_sample.json")))[1][:4]
    assert_llama_cpp_chats_as_generate(
        smollm2, smollm2_adapter, [alpaca_record_chat(r) for r in records], tmp_path
    )
