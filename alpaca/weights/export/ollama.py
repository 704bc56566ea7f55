"""An Ollama Modelfile for an exported GGUF: FROM (the file, or the base plus ADAPTER), a TEMPLATE in
Ollama's Go-template syntax that renders exactly the prompt the model was trained with, a stop
parameter for each of the template's turn markers and the end-of-turn token, and generate.py's
sampling defaults.

Ollama fills a TEMPLATE with `.System`, `.Prompt` and `.Response`. An Alpaca prompt has an instruction
and an optional input, so: without a system message the prompt is the instruction (`prompt_no_input`);
with one, the system message is the instruction and the prompt is its input (`prompt_input`), e.g.
`ollama run` with `/set system Summarize this text.` followed by the text.

Ollama's Modelfile parser (parser/parser.go) has no escapes: a value ends at the end of its line unless
it is quoted, in double quotes on one line or in triple double quotes over several; the quotes are
stripped and everything inside is kept as written. So a TEMPLATE may not contain three double quotes,
nor a stop string a line break.
"""

from __future__ import annotations

import inspect
import string
from pathlib import Path

from alpaca.weights.export.prompt_format import PromptFormat

MODELFILE = "Modelfile"
# Tokens that end a turn in the chat formats of the LLaMA family, besides the tokenizer's EOS.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def prepare_modelfile_path(gguf_path: Path, overwrite: bool, prompt_format: PromptFormat) -> Path:
    """The Modelfile beside the GGUF; refused when one exists (unless --overwrite) or is a folder, or
    when the prompt format has no TEMPLATE a Modelfile can hold (checked now, before any weights load)."""
    checked_template(prompt_format)
    path = Path(gguf_path).parent / MODELFILE
    if path.is_dir():
        raise ValueError(f"--ollama: {path} is a folder; the Modelfile goes beside the .gguf file")
    if path.exists() and not overwrite:
        raise ValueError(f"--ollama: {path} exists; pass --overwrite to replace it")
    return path


def go_text(text: str) -> str:
    """Literal text for a Go template: only `{{` would start an action, so it becomes an action that
    prints it."""
    return text.replace("{{", '{{ "{{" }}')


def go_fill(prompt: str, fields: dict) -> str:
    """A Python format string (the prompter's) as Go-template text, each `{field}` as the given action.
    (The parser returns an escaped `{{` as separate pieces of literal text: join them before escaping.)"""
    parts, literal = [], ""
    for text, field, _, _ in string.Formatter().parse(prompt):
        literal += text
        if field is not None:
            parts += [go_text(literal), fields[field]]
            literal = ""
    return "".join(parts) + go_text(literal)


def alpaca_go_template(template: dict) -> str:
    """An Alpaca prompt template (templates/*.json) as an Ollama TEMPLATE."""
    with_input = go_fill(template["prompt_input"], {"instruction": "{{ .System }}", "input": "{{ .Prompt }}"})
    no_input = go_fill(template["prompt_no_input"], {"instruction": "{{ .Prompt }}"})
    return f"{{{{ if .System }}}}{with_input}{{{{ else }}}}{no_input}{{{{ end }}}}{{{{ .Response }}}}"


def ollama_template(prompt_format: PromptFormat) -> str:
    """The Ollama TEMPLATE that renders the training prompt of `prompt_format`."""
    if prompt_format.kind == "alpaca":
        return alpaca_go_template(prompt_format.prompter().template)
    raise ValueError(f"no Ollama TEMPLATE for a {prompt_format.kind!r} prompt format yet")


def stop_strings(prompt_format: PromptFormat, tokenizer) -> list[str]:
    """The template's turn markers (as generate.py stops at them), then the EOS and end-of-turn tokens."""
    from alpaca.inference.decoding import template_stop_strings

    stops = list(template_stop_strings(prompt_format.prompter().template))
    vocab = tokenizer.get_vocab()
    stops += [tokenizer.eos_token] if tokenizer.eos_token else []
    stops += [token for token in END_OF_TURN_TOKENS if token in vocab]
    return list(dict.fromkeys(stops))


def sampling_parameters() -> dict:
    """generate.py's sampling defaults (they are `make_settings`'s) under Ollama's parameter names.
    Beam search (generate.py's num_beams) has no Ollama counterpart; generate.py applies no repetition
    penalty, while Ollama's default is 1.1, hence repeat_penalty 1."""
    from alpaca.inference.decoding import make_settings

    defaults = {name: p.default for name, p in inspect.signature(make_settings).parameters.items()}
    return {
        "temperature": defaults["temperature"],
        "top_p": defaults["top_p"],
        "top_k": defaults["top_k"],
        "num_predict": defaults["max_new_tokens"],
        "repeat_penalty": 1,
    }


def quoted(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError(f"an Ollama parameter value cannot hold a line break: {value!r}")
    return f'"{value}"'


def checked_template(prompt_format: PromptFormat) -> str:
    """The TEMPLATE, refused when it holds three double quotes (a Modelfile cannot quote it)."""
    template = ollama_template(prompt_format)
    if '"""' in template:
        raise ValueError(
            f'--ollama: the prompt template {prompt_format.name!r} holds """, which a Modelfile TEMPLATE cannot quote'
        )
    return template


def ollama_modelfile(
    model_path: str, adapter_path: str | None, prompt_format: PromptFormat, tokenizer
) -> str:
    """The Modelfile text: FROM (and ADAPTER), TEMPLATE, stop strings and sampling parameters."""
    template = checked_template(prompt_format)
    lines = [
        f"# Written by export_gguf.py --ollama; prompt template {prompt_format.name!r} ({prompt_format.source}).",
        "# ollama create NAME -f Modelfile && ollama run NAME",
        f"FROM {model_path}",
    ]
    if adapter_path is not None:
        lines.append(f"ADAPTER {adapter_path}")
    lines.append(f'TEMPLATE """{template}"""')
    lines += [f"PARAMETER stop {quoted(stop)}" for stop in stop_strings(prompt_format, tokenizer)]
    lines += [f"PARAMETER {name} {value}" for name, value in sampling_parameters().items()]
    return "\n".join(lines) + "\n"


def write_modelfile(path: Path, text: str) -> None:
    Path(path).write_text(text, encoding="utf-8")
