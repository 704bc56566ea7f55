"""Real-model tier of the quantized GGUF, adapter GGUF and Modelfile exports: SmolLM2-135M-Instruct (BPE,
tied embeddings) with the session's trained adapter. q8_0 and bf16 equal llama.cpp's convert_hf_to_gguf.py
on the merged model, the adapter GGUF equals convert_lora_to_gguf.py's, q4_0 keeps the trained update
(the self-check passes), and the Modelfile stops at SmolLM2's end-of-turn tokens; a SmolLM2 adapter trained
in its own chat template gets a TEMPLATE that renders that template's prompts."""

from pathlib import Path

import pytest
from helpers.export_fixtures import (
    CONVERT_HF,
    CONVERT_LORA,
    assert_same_tensors,
    read_gguf,
    require_converters,
    run_converter,
)
from helpers.finetune_runs import run_finetune_fast
from helpers.ollama_modelfile import parse_modelfile

from alpaca.core.chat import alpaca_record_chat, encode_rendered, recorded_format, render
from alpaca.core.prompter import Prompter
from alpaca.modeling import load_plain_tokenizer
from alpaca.weights.export import export_gguf, export_hf
from alpaca.weights.export.go_template import ollama_render
from alpaca.weights.export.ollama_chat import held_out_conversations
from alpaca.weights.export.quantize import held_out_records

CHAT_SAMPLE = Path(__file__).resolve().parent.parent / "data" / "chat_sample.jsonl"

pytestmark = pytest.mark.realmodel


@pytest.fixture(scope="module")
def hf_export(smollm2, smollm2_adapter, tmp_path_factory):
    require_converters()
    out = tmp_path_factory.mktemp("rq-hf") / Path(smollm2).name
    export_hf(smollm2, smollm2_adapter, str(out))
    return out


@pytest.mark.parametrize("outtype", ["q8_0", "bf16"])
def test_q8_0_and_bf16_equal_llama_cpp_conversion(outtype, smollm2, smollm2_adapter, hf_export, tmp_path):
    run_converter(CONVERT_HF, hf_export, "--outfile", tmp_path / "ref.gguf", "--outtype", outtype)
    export_gguf(smollm2, smollm2_adapter, str(tmp_path / "ours.gguf"), outtype=outtype)
    kv, tensors = read_gguf(tmp_path / "ours.gguf")
    ref_kv, ref_tensors = read_gguf(tmp_path / "ref.gguf")
    assert sorted(key for key in set(kv) | set(ref_kv) if kv.get(key) != ref_kv.get(key)) == []
    assert_same_tensors(tensors, ref_tensors)
    assert len(kv) == 31 and len(tensors) == 272
    assert tensors["token_embd.weight"][0] == tensors["blk.0.ffn_down.weight"][0] == outtype.upper()


def test_adapter_gguf_equals_llama_cpp_lora_converter(smollm2, smollm2_adapter, tmp_path):
    require_converters()
    out = tmp_path / "out" / "adapter.gguf"
    info = export_gguf(smollm2, smollm2_adapter, str(out), outtype="f16", adapter_only=True, ollama=True)
    run_converter(CONVERT_LORA, "--base", smollm2, "--outfile", tmp_path / "ref.gguf", smollm2_adapter)
    kv, tensors = read_gguf(out)
    ref_kv, ref_tensors = read_gguf(tmp_path / "ref.gguf")
    assert kv == ref_kv
    assert_same_tensors(tensors, ref_tensors)
    assert len(tensors) == 4 * 30  # q and v, lora_a and lora_b, 30 layers
    assert info["max_logit_diff_rebuilt"] <= 1e-3 < info["adapter_effect"]
    values = parse_modelfile((out.parent / "Modelfile").read_text())
    assert ("model", "./adapter.base-f16.gguf") in values and ("adapter", "./adapter.gguf") in values


def test_q4_0_keeps_the_trained_update_and_the_modelfile_stops_at_end_of_turn(
    smollm2, smollm2_adapter, tmp_path
):
    path = tmp_path / "smollm2-q4_0.gguf"
    info = export_gguf(smollm2, smollm2_adapter, str(path), outtype="q4_0", ollama=True)
    cost = info["quantization"]
    assert cost["closer"] > 0.01 and cost["records"] == 8
    assert path.stat().st_size < 0.25 * 4 * 134_515_008  # about a quarter of the fp32 size
    commands = parse_modelfile((tmp_path / "Modelfile").read_text())
    stops = [value for name, value in commands if name == "stop"]
    assert stops[-2:] == ["<|im_end|>", "<|endoftext|>"]
    template = dict(commands)["template"]
    prompter = Prompter("alpaca")
    for record in held_out_records(15):
        assert ollama_render(template, alpaca_record_chat(record)) == prompter.generate_prompt(
            record["instruction"], record.get("input")
        )


@pytest.fixture(scope="module")
def smollm2_chat_adapter(smollm2, tmp_path_factory):
    """SmolLM2 trained for two steps on the sample conversations in its own chat template."""
    out = tmp_path_factory.mktemp("smollm2-chat") / "lora"
    run_finetune_fast(
        smollm2,
        str(CHAT_SAMPLE),
        out,
        chat_template="tokenizer",
        learning_rate=2e-3,
        max_steps=2,
        batch_size=4,
        micro_batch_size=4,
        cutoff_len=192,
    )
    return str(out)


def test_smollm2_chat_template_becomes_an_ollama_template(smollm2, smollm2_chat_adapter, tmp_path):
    """SmolLM2's own template (a default system message when the chat has none): the probed TEMPLATE
    writes that message in its else branch, and for 15 held-out conversations (with and without a system
    message) renders every prompt as the Jinja template does, token ids included."""
    out = tmp_path / "smollm2-chat.gguf"
    info = export_gguf(smollm2, smollm2_chat_adapter, str(out), outtype="f16", ollama=True)
    assert info["training_format"] == "chat_template" and info["prompt_template"] == "tokenizer"
    commands = parse_modelfile((tmp_path / "Modelfile").read_text())
    template = dict(commands)["template"]
    default_system = (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    )
    assert f"{{{{ else }}}}{default_system}{{{{ end }}}}" in template
    assert [value for name, value in commands if name == "stop"] == ["<|im_end|>", "<|endoftext|>"]
    tokenizer = load_plain_tokenizer(smollm2_chat_adapter)
    jinja = recorded_format(smollm2_chat_adapter).chat_template
    conversations = held_out_conversations(15)
    assert any(m[0]["role"] == "system" for m in conversations)
    assert any(m[0]["role"] != "system" for m in conversations)
    for messages in conversations:
        for end in [i for i, m in enumerate(messages) if m["role"] == "assistant"]:
            expected = render(jinja, messages[:end], tokenizer, add_generation_prompt=True)
            text = ollama_render(template, messages[:end])
            assert text == expected
            assert encode_rendered(tokenizer, text) == encode_rendered(tokenizer, expected)


def test_smollm2_chat_adapter_exports_as_its_own_gguf(smollm2, smollm2_chat_adapter, tmp_path):
    """SmolLM2 has its template's tokens, so its chat adapter adds none: --adapter_only writes it, and the
    Modelfile (base + ADAPTER) carries the chat TEMPLATE."""
    out = tmp_path / "out" / "chat-adapter.gguf"
    info = export_gguf(smollm2, smollm2_chat_adapter, str(out), outtype="f16", adapter_only=True, ollama=True)
    assert info["training_format"] == "chat_template"
    values = dict(parse_modelfile((out.parent / "Modelfile").read_text()))
    assert values["adapter"] == "./chat-adapter.gguf" and "{{ range .Messages }}" in values["template"]
