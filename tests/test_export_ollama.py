"""`export_gguf.py --ollama`: the Modelfile beside the GGUF parses as Ollama parses it, its TEMPLATE filled
by a renderer of the Go-template subset gives exactly the training prompt of the demo's 15 held-out
records, and its stop strings and sampling parameters are generate.py's."""

import inspect
import json
import shutil
import sys
from pathlib import Path

import pytest
from helpers.ollama_modelfile import parse_modelfile, render

from alpaca.core.prompter import Prompter, available_templates
from alpaca.inference.decoding import template_stop_strings
from alpaca.weights.export import export_gguf
from alpaca.weights.export.ollama import ollama_template
from alpaca.weights.export.prompt_format import PromptFormat, resolve_prompt_format
from alpaca.weights.export.quantize import held_out_records

REPO = Path(__file__).resolve().parent.parent


def ollama_values(record: dict) -> dict:
    """What Ollama fills in for a record: the instruction as the prompt, or, for a record with an input,
    the instruction as the system message and the input as the prompt; no response yet."""
    if record.get("input"):
        return {"System": record["instruction"], "Prompt": record["input"], "Response": ""}
    return {"System": "", "Prompt": record["instruction"], "Response": ""}


def assert_renders_training_prompts(template: str, prompter: Prompter, records: list[dict]) -> None:
    for index, record in enumerate(records):
        expected = prompter.generate_prompt(record["instruction"], record.get("input") or None)
        assert render(template, ollama_values(record)) == expected, f"record {index}"


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
def test_every_shipped_template_renders_exactly(name):
    fmt = PromptFormat("alpaca", name)
    assert_renders_training_prompts(ollama_template(fmt), Prompter(name), held_out_records(15))


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
    template = ollama_template(PromptFormat("alpaca", str(braces)))
    assert render(template, {"Prompt": "Name a colour."}) == "Task {{x}} Name a colour.\nAnswer:"
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
    assert resolve_prompt_format(tiny_llama_adapter) == PromptFormat("alpaca", "alpaca", source="default")
    assert resolve_prompt_format(tiny_llama_adapter, "alpaca_short").source == "--prompt_template"
    with pytest.raises(ValueError, match="unknown prompt template 'nope'"):
        resolve_prompt_format(tiny_llama_adapter, "nope")
