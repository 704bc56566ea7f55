"""`export_gguf.py --ollama`: the Modelfile beside the GGUF parses as Ollama parses it, and its TEMPLATE,
filled as Ollama fills it (`go_template.ollama_render`), gives exactly the training prompt: for an
Alpaca-trained adapter the prompter's prompt of the demo's 15 held-out records and the Jinja template's
text of 15 held-out conversations; for a chat-trained adapter (ChatML on the tiny LLaMA) the trained
Jinja template's text and token ids. Its stop strings and sampling parameters are generate.py's. A chat
template the probe cannot express, and a chat adapter with added tokens under --adapter_only, are refused
in one line before anything is written."""

import inspect
import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers.finetune_runs import run_finetune_fast
from helpers.ollama_modelfile import parse_modelfile

from alpaca.core.chat import (
    FORMAT_FILE,
    TrainingFormat,
    alpaca_chat_template,
    alpaca_record_chat,
    encode_rendered,
    render,
    save_training_format,
)
from alpaca.core.prompter import Prompter, available_templates, load_template
from alpaca.finetune.conversations import tokenize_conversation
from alpaca.inference.decoding import template_stop_strings
from alpaca.modeling import load_plain_tokenizer
from alpaca.weights.export import export_gguf
from alpaca.weights.export.go_template import ollama_render
from alpaca.weights.export.go_template import render as go_render
from alpaca.weights.export.ollama import ollama_template
from alpaca.weights.export.ollama_chat import held_out_conversations, probe_chat_template
from alpaca.weights.export.prompt_format import (
    PromptFormat,
    prompt_template_format,
    resolve_prompt_format,
)
from alpaca.weights.export.quantize import held_out_records

REPO = Path(__file__).resolve().parent.parent
CHAT_SAMPLE = REPO / "data" / "chat_sample.jsonl"
CHATML_GO = (
    "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    '{{ range .Messages }}{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n'
    '{{ else if eq .Role "assistant" }}<|im_start|>assistant\n{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'
    "<|im_start|>assistant\n"
)
LLAMA2_JINJA = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% if loop.index0 == 1 and messages[0]['role'] == 'system' %}"
    "{{ '<<SYS>>\\n' + messages[0]['content'] + '\\n<</SYS>>\\n\\n' }}{% endif %}"
    "{{ message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)


alpaca_messages = alpaca_record_chat  # the convention of the Jinja template every export carries


def assert_renders_training_prompts(template: str, prompter: Prompter, records: list[dict]) -> None:
    for index, record in enumerate(records):
        expected = prompter.generate_prompt(record["instruction"], record.get("input") or None)
        assert ollama_render(template, alpaca_messages(record)) == expected, f"record {index}"


def prompts(messages: list[dict]) -> list[list[dict]]:
    """Each prompt of a conversation: the turns before each assistant turn."""
    return [messages[:i] for i, m in enumerate(messages) if m["role"] == "assistant"]


def assert_agrees_with_jinja(go_template: str, jinja: str, tokenizer) -> int:
    count = 0
    for number, messages in enumerate(held_out_conversations(15)):
        for prompt in prompts(messages):
            expected = render(jinja, prompt, tokenizer, add_generation_prompt=True)
            assert ollama_render(go_template, prompt) == expected, f"conversation {number}"
            count += 1
    return count


def generate_defaults() -> dict:
    sys.path.insert(0, str(REPO))
    try:
        import generate
    finally:
        sys.path.remove(str(REPO))
    return {name: p.default for name, p in inspect.signature(generate.main).parameters.items()}


@pytest.mark.parametrize("adapter_only", [False, True])
def test_modelfile_parses_and_its_template_renders_the_training_prompt(
    adapter_only, tiny_llama, tiny_llama_adapter, tmp_path
):
    out = tmp_path / "out" / "model.gguf"
    info = export_gguf(
        tiny_llama, tiny_llama_adapter, str(out), outtype="f32", ollama=True, adapter_only=adapter_only
    )
    modelfile = out.parent / "Modelfile"
    assert info["modelfile"] == str(modelfile)
    text = modelfile.read_text()
    # one directive per line: every line is blank, a comment, starts a directive, or is inside TEMPLATE
    commands = parse_modelfile(text)
    names = [name for name, _ in commands]
    assert names[0] == "model" and names.count("template") == 1
    values = dict(commands)
    if adapter_only:
        assert values["model"] == "./model.base-f32.gguf" and values["adapter"] == "./model.gguf"
    else:
        assert values["model"] == "./model.gguf" and "adapter" not in values
    for name in ("model", "adapter"):
        if name in values:
            assert (modelfile.parent / values[name]).is_file()
    assert text.count('"""') == 2 and 'TEMPLATE """{{ if .System }}' in text

    records = held_out_records(15)
    assert len(records) == 15 and sum(bool(r.get("input")) for r in records) == 5
    assert_renders_training_prompts(values["template"], Prompter("alpaca"), records)
    # multi-turn chats render as the Jinja template llama.cpp reads from the GGUF (answers + EOS)
    tokenizer = load_plain_tokenizer(tiny_llama)
    jinja = alpaca_chat_template(load_template("alpaca"))
    assert assert_agrees_with_jinja(values["template"], jinja, tokenizer) == 30  # prompts of 15 chats
    assert info["training_format"] == "prompt_template"

    stops = [value for name, value in commands if name == "stop"]
    assert stops == [*template_stop_strings(Prompter("alpaca").template), "</s>"]
    defaults = generate_defaults()
    assert float(values["temperature"]) == defaults["temperature"]
    assert float(values["top_p"]) == defaults["top_p"]
    assert int(values["top_k"]) == defaults["top_k"]
    assert int(values["num_predict"]) == defaults["max_new_tokens"]
    assert float(values["repeat_penalty"]) == 1.0  # generate.py applies no repetition penalty


def test_the_adapters_own_template_travels_and_a_modelfile_is_not_overwritten(
    tiny_llama, tiny_llama_adapter, tmp_path
):
    """The template named in the adapter's run_config.json (vigogne, French markers) is the one the
    Modelfile renders and stops at; an existing Modelfile is kept unless --overwrite."""
    adapter = tmp_path / "lora"
    shutil.copytree(tiny_llama_adapter, adapter)
    (adapter / "run_config.json").write_text(json.dumps({"prompt_template_name": "vigogne"}))
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    (out.parent / "Modelfile").write_text("FROM old\n")
    with pytest.raises(ValueError, match="Modelfile exists; pass --overwrite"):
        export_gguf(tiny_llama, str(adapter), str(out), outtype="f32", ollama=True)
    assert not out.exists() and (out.parent / "Modelfile").read_text() == "FROM old\n"
    info = export_gguf(tiny_llama, str(adapter), str(out), outtype="f32", ollama=True, overwrite=True)
    assert info["prompt_template"] == "vigogne"
    values = dict(parse_modelfile((out.parent / "Modelfile").read_text()))
    assert_renders_training_prompts(values["template"], Prompter("vigogne"), held_out_records(15))
    assert "### Réponse:" in [
        v for n, v in parse_modelfile((out.parent / "Modelfile").read_text()) if n == "stop"
    ]


@pytest.mark.parametrize("name", available_templates())
def test_every_shipped_template_renders_exactly(name, tiny_llama):
    tokenizer = load_plain_tokenizer(tiny_llama)
    fmt = prompt_template_format(name, "test")
    template = ollama_template(fmt, tokenizer)
    assert_renders_training_prompts(template, Prompter(name), held_out_records(15))
    assert_agrees_with_jinja(template, fmt.chat_template, tokenizer)


def test_literal_braces_and_quotes_survive_and_triple_quotes_are_refused(
    tiny_llama, tiny_llama_adapter, tmp_path
):
    """A template with literal {{ }} (written {{{{ }}}} in the JSON) and a double quote renders exactly;
    one with three double quotes cannot be quoted in a Modelfile and is refused before any weights load."""
    braces = tmp_path / "braces.json"
    braces.write_text(
        json.dumps(
            {
                "prompt_input": 'Task {{{{x}}}} "{instruction}"\n{input}\nAnswer:',
                "prompt_no_input": "Task {{{{x}}}} {instruction}\nAnswer:",
                "response_split": "Answer:",
            }
        )
    )
    template = ollama_template(prompt_template_format(str(braces), "test"), load_plain_tokenizer(tiny_llama))
    assert go_render(template, {"System": "", "Prompt": "Name a colour.", "Response": ""}) == (
        "Task {{x}} Name a colour.\nAnswer:"
    )
    assert_renders_training_prompts(template, Prompter(str(braces)), held_out_records(15))

    quotes = tmp_path / "quotes.json"
    quotes.write_text(
        json.dumps(
            {
                "prompt_input": '"""{instruction} {input}',
                "prompt_no_input": "{instruction}",
                "response_split": ":",
            }
        )
    )
    with pytest.raises(ValueError, match=r"--ollama: the prompt template .* holds \"\"\""):
        export_gguf(
            tiny_llama, tiny_llama_adapter, str(tmp_path / "q.gguf"), ollama=True, prompt_template=str(quotes)
        )
    assert not (tmp_path / "q.gguf").exists()


def test_prompt_format_resolution(tiny_llama_adapter, tmp_path):
    default = resolve_prompt_format(tiny_llama_adapter)
    assert (default.kind, default.name, default.source) == ("prompt_template", "alpaca", "default")
    assert default.chat_template == alpaca_chat_template(load_template("alpaca"))
    assert resolve_prompt_format(tiny_llama_adapter, "alpaca_short").source == "--prompt_template"
    with pytest.raises(ValueError, match="unknown prompt template 'nope'"):
        resolve_prompt_format(tiny_llama_adapter, "nope")
    # the adapter's training_format.json decides; --prompt_template may only repeat it
    adapter = tmp_path / "lora"
    shutil.copytree(tiny_llama_adapter, adapter)
    chatml = (REPO / "alpaca" / "templates" / "chatml.jinja").read_text()
    save_training_format(adapter, TrainingFormat("chat_template", "alpaca", "chatml", chatml))
    recorded = resolve_prompt_format(str(adapter))
    assert recorded == PromptFormat("chat_template", "chatml", chatml, f"{FORMAT_FILE} of the adapter")
    with pytest.raises(ValueError, match="trained in the chat template 'chatml'.*drop --prompt_template"):
        resolve_prompt_format(str(adapter), "alpaca")


def test_go_template_renderer_subset():
    """The renderer the export checks with: Go's trimming, else if, range, Ollama's cut after .Response in
    an older-style TEMPLATE's last exchange, and a refusal of anything outside the subset."""
    messages = {"Messages": [{"Role": "user", "Content": "hi"}, {"Role": "assistant", "Content": "yo"}]}
    template = '{{- range .Messages }}\n  {{- if eq .Role "user" }}U:{{ .Content }}\n{{ else if eq .Role "x" }}X{{ else }}A:{{ .Content }}{{ end -}}\n{{ end }}'
    assert go_render(template, messages) == "U:hi\nA:yo"
    assert go_render('{{ "{{" }}x{{ if .A }}a{{ else }}b{{ end }}', {"A": ""}) == "{{xb"
    legacy = "<{{ .System }}|{{ .Prompt }}>{{ .Response }}{{ if .Response }}</s>{{ end }}"
    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    assert ollama_render(legacy, chat) == "<S|u1>a1</s><|u2>"
    with pytest.raises(ValueError, match="outside the supported subset"):
        go_render("{{ len .Messages }}", messages)
    with pytest.raises(ValueError, match="ends inside a block"):
        go_render("{{ if .A }}x", {"A": "1"})


@pytest.fixture(scope="module")
def chatml_adapter(tiny_llama, tmp_path_factory):
    """The tiny LLaMA trained on the sample conversations in ChatML (its two markers added as tokens)."""
    out = tmp_path_factory.mktemp("chatml") / "lora"
    run_finetune_fast(tiny_llama, str(CHAT_SAMPLE), out, max_steps=2, chat_template="chatml", cutoff_len=256)
    return str(out)


def test_chat_adapter_modelfile_renders_the_trained_chat_template(tiny_llama, chatml_adapter, tmp_path):
    """A ChatML-trained adapter: the TEMPLATE is ChatML's in Ollama's .Messages form, and for 15 held-out
    conversations every prompt it renders is the trained Jinja template's text and gives the token ids
    training used; it stops at <|im_end|> and EOS. The quantized export's held-out loss is scored in
    ChatML."""
    out = tmp_path / "out" / "chat.gguf"
    info = export_gguf(tiny_llama, chatml_adapter, str(out), outtype="q8_0", ollama=True)
    assert info["training_format"] == "chat_template" and info["prompt_template"] == "chatml"
    assert info["quantization"]["records"] == 8
    text = (out.parent / "Modelfile").read_text()
    assert "# Written by export_gguf.py --ollama; the chat template 'chatml' (training_format.json" in text
    commands = parse_modelfile(text)
    values = dict(commands)
    assert values["model"] == "./chat.gguf" and values["template"] == CHATML_GO
    assert [value for name, value in commands if name == "stop"] == ["<|im_end|>", "</s>"]

    tokenizer = load_plain_tokenizer(chatml_adapter)
    jinja = json.loads((Path(chatml_adapter) / FORMAT_FILE).read_text())["chat_template"]
    assert assert_agrees_with_jinja(values["template"], jinja, tokenizer) == 30  # prompts of 15 chats
    for messages in held_out_conversations(15):
        example = tokenize_conversation(messages, tokenizer, jinja, 4096, False)
        for prompt, span in zip(prompts(messages), example["trained_positions"]):
            ids = encode_rendered(tokenizer, ollama_render(values["template"], prompt))
            assert ids == example["input_ids"][: span.start]


def test_chat_adapter_with_added_tokens_is_refused_by_adapter_only(tiny_llama, chatml_adapter, tmp_path):
    out = tmp_path / "a.gguf"
    with pytest.raises(ValueError) as caught:
        export_gguf(tiny_llama, chatml_adapter, str(out), adapter_only=True, ollama=True)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("--adapter_only: the adapter cannot be a llama.cpp")
    assert "added 2 tokens to the vocabulary (<|im_start|>, <|im_end|>" in message
    assert list(tmp_path.iterdir()) == []


def test_a_chat_template_the_probe_cannot_express_is_refused(tiny_llama, tiny_llama_adapter, tmp_path):
    """Llama 2's format puts the system message inside the first user turn: no TEMPLATE of the probed
    form renders it, so --ollama is refused in one line before anything is written."""
    tokenizer = load_plain_tokenizer(tiny_llama)
    with pytest.raises(ValueError, match="differs between turns"):
        probe_chat_template(LLAMA2_JINJA, tokenizer)
    adapter = tmp_path / "lora"
    shutil.copytree(tiny_llama_adapter, adapter)
    save_training_format(adapter, TrainingFormat("chat_template", "alpaca", "llama2.jinja", LLAMA2_JINJA))
    out = tmp_path / "out" / "m.gguf"
    with pytest.raises(ValueError) as caught:
        export_gguf(tiny_llama, str(adapter), str(out), outtype="f32", ollama=True)
    message = str(caught.value)
    assert message.startswith("--ollama: no Ollama TEMPLATE renders the chat template 'llama2.jinja'")
    assert "\n" not in message and not out.parent.exists()
    # a template that rewrites the content is caught by the check on real conversations
    upper = (
        (REPO / "alpaca" / "templates" / "chatml.jinja")
        .read_text()
        .replace("message['content']", "(message['content'] | replace('. ', '.  '))")
    )
    save_training_format(adapter, TrainingFormat("chat_template", "alpaca", "upper.jinja", upper))
    with pytest.raises(ValueError, match="renders check chat .* differently from the Jinja template"):
        export_gguf(tiny_llama, str(adapter), str(out), outtype="f32", ollama=True)
