"""An Ollama Modelfile for an exported GGUF: FROM (the file, or the base plus ADAPTER), a TEMPLATE in
Ollama's Go-template syntax that renders exactly the prompt the model was trained with, a stop
parameter for each of the template's turn markers and the end-of-turn token, and generate.py's
sampling defaults.

The format is the adapter's recorded one (`prompt_format`). An Alpaca prompt template becomes the
older-style TEMPLATE that Ollama fills with `.System`, `.Prompt` and `.Response`, in the convention of
the Jinja template every export carries (`alpaca.core.chat.alpaca_chat_template`), so that llama.cpp's
chat and Ollama agree: the user message is the instruction; with a system message, the system message
is the instruction and the user message its input (`prompt_input`), e.g. `ollama run` with
`/set system Translate into French` and then the text to translate; an answer is
followed by EOS, as training appended it. A Jinja chat template is probed into a `.Messages` TEMPLATE
(`ollama_chat`). Either TEMPLATE is checked, before any weights load, to render the Jinja template's
text for the probe chats, 15 held-out conversations and 15 held-out Alpaca records.

Ollama's Modelfile parser (parser/parser.go) has no escapes: a value ends at the end of its line unless
it is quoted, in double quotes on one line or in triple double quotes over several; the quotes are
stripped and everything inside is kept as written. So a TEMPLATE may not contain three double quotes,
nor a stop string a line break.
"""

from __future__ import annotations

import inspect
import string
from pathlib import Path

from alpaca.core.chat import END_OF_TURN_TOKENS, end_of_turn_ids
from alpaca.inference.decoding import make_settings, template_stop_strings
from alpaca.weights.export.ollama_chat import (
    CannotExpress,
    chat_go_template,
    check_go_template,
    go_literal,
    probe_chat_template,
)
from alpaca.weights.export.prompt_format import PromptFormat

MODELFILE = "Modelfile"


def prepare_modelfile_path(gguf_path: Path, overwrite: bool, prompt_format: PromptFormat, tokenizer) -> Path:
    """The Modelfile beside the GGUF; refused when one exists (unless --overwrite) or is a folder, or
    when the format has no TEMPLATE a Modelfile can hold (checked now, before any weights load)."""
    checked_template(prompt_format, tokenizer)
    path = Path(gguf_path).parent / MODELFILE
    if path.is_dir():
        raise ValueError(f"--ollama: {path} is a folder; the Modelfile goes beside the .gguf file")
    if path.exists() and not overwrite:
        raise ValueError(f"--ollama: {path} exists; pass --overwrite to replace it")
    return path


def go_fill(prompt: str, fields: dict) -> str:
    """A Python format string (the prompter's) as Go-template text, each `{field}` as the given action.
    (The parser returns an escaped `{{` as separate pieces of literal text: join them before escaping.)"""
    parts, literal = [], ""
    for text, field, _, _ in string.Formatter().parse(prompt):
        literal += text
        if field is not None:
            parts += [go_literal(literal), fields[field]]
            literal = ""
    return "".join(parts) + go_literal(literal)


def alpaca_go_template(template: dict, eos_token: str | None = None) -> str:
    """An Alpaca prompt template (templates/*.json) as an Ollama TEMPLATE: the user message is the
    instruction, or with a system message the system message is the instruction and the user message
    its input (as in `alpaca_chat_template`); an answer of an earlier
    exchange is followed by `eos_token`."""
    with_input = go_fill(template["prompt_input"], {"instruction": "{{ .System }}", "input": "{{ .Prompt }}"})
    no_input = go_fill(template["prompt_no_input"], {"instruction": "{{ .Prompt }}"})
    end = f"{{{{ if .Response }}}}{go_literal(eos_token)}{{{{ end }}}}" if eos_token else ""
    return f"{{{{ if .System }}}}{with_input}{{{{ else }}}}{no_input}{{{{ end }}}}{{{{ .Response }}}}{end}"


def ollama_template(prompt_format: PromptFormat, tokenizer) -> str:
    """The Ollama TEMPLATE that renders the training prompt of `prompt_format`, unchecked."""
    if prompt_format.is_chat:
        return chat_go_template(probe_chat_template(prompt_format.chat_template, tokenizer))
    return alpaca_go_template(prompt_format.prompter().template, tokenizer.eos_token)


def format_label(prompt_format: PromptFormat) -> str:
    kind = "chat template" if prompt_format.is_chat else "prompt template"
    return f"the {kind} {prompt_format.name!r}"


def stop_strings(prompt_format: PromptFormat, tokenizer) -> list[str]:
    """The prompt template's turn markers (as generate.py stops at them) or the chat template's end of an
    assistant turn, then the EOS and the end-of-turn tokens the tokenizer knows."""
    if prompt_format.is_chat:
        shape = probe_chat_template(prompt_format.chat_template, tokenizer)
        stops = [shape.assistant_suffix.strip()] if shape.assistant_suffix.strip() else []
    else:
        stops = list(template_stop_strings(prompt_format.prompter().template))
    stops += [tokenizer.eos_token] if tokenizer.eos_token else []
    ids = sorted(end_of_turn_ids(tokenizer) - {tokenizer.eos_token_id})
    stops += [token for token in tokenizer.convert_ids_to_tokens(ids) if token in END_OF_TURN_TOKENS]
    return list(dict.fromkeys(stops))


def sampling_parameters() -> dict:
    """generate.py's sampling defaults (they are `make_settings`'s) under Ollama's parameter names.
    Beam search (generate.py's num_beams) has no Ollama counterpart; generate.py applies no repetition
    penalty, while Ollama's default is 1.1, hence repeat_penalty 1."""
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


def checked_template(prompt_format: PromptFormat, tokenizer) -> str:
    """The TEMPLATE, checked to render the Jinja template's text (`ollama_chat.check_go_template`) and
    to fit in a Modelfile; one line saying why when not."""
    label = format_label(prompt_format)
    try:
        template = ollama_template(prompt_format, tokenizer)
        check_go_template(template, prompt_format.chat_template, tokenizer, label)
    except CannotExpress as err:
        raise ValueError(f"--ollama: no Ollama TEMPLATE renders {label} exactly: {err}") from err
    if '"""' in template:
        raise ValueError(f'--ollama: {label} holds """, which a Modelfile TEMPLATE cannot quote')
    return template


def ollama_modelfile(
    model_path: str, adapter_path: str | None, prompt_format: PromptFormat, tokenizer
) -> str:
    """The Modelfile text: FROM (and ADAPTER), TEMPLATE, stop strings and sampling parameters."""
    template = checked_template(prompt_format, tokenizer)
    lines = [
        f"# Written by export_gguf.py --ollama; {format_label(prompt_format)} ({prompt_format.source}).",
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
