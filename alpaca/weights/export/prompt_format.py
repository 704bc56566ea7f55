"""Which prompt the adapter was trained with, for what an export carries about it (the Ollama TEMPLATE,
the held-out loss of the quantization check).

An export names the format by a `PromptFormat`: today an Alpaca prompt template (`templates/*.json`,
read through the prompter); a trained chat template (a Jinja string) is the other kind it is built to
take, so the writers dispatch on `kind` and a new kind is one more branch, not a new signature.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alpaca.core.prompter import DEFAULT_TEMPLATE, Prompter

RUN_CONFIG = "run_config.json"


@dataclass(frozen=True)
class PromptFormat:
    """The identity of a training prompt: `kind` is "alpaca" (an Alpaca prompt template, `name` is its
    name or path) or "chat" (a Jinja chat template, `name` is where it came from, `text` the template)."""

    kind: str
    name: str
    text: str = ""
    source: str = ""  # where the choice came from, for the printed configuration

    def prompter(self) -> Prompter:
        if self.kind != "alpaca":
            raise ValueError(f"a {self.kind!r} prompt format has no Alpaca prompter")
        return Prompter(self.name)


def trained_prompt_template(lora_weights: str) -> str | None:
    """The `prompt_template_name` that finetune.py saved in the adapter folder's run_config.json."""
    path = Path(lora_weights).expanduser() / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("prompt_template_name") or None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def resolve_prompt_format(lora_weights: str, prompt_template: str = "") -> PromptFormat:
    """`--prompt_template` when given, else the template the adapter's run_config.json names, else
    Alpaca's default; the template is loaded (and so checked) here, before any weights are."""
    if prompt_template:
        name, source = prompt_template, "--prompt_template"
    elif (saved := trained_prompt_template(lora_weights)) is not None:
        name, source = saved, f"{RUN_CONFIG} of the adapter"
    else:
        name, source = DEFAULT_TEMPLATE, "default"
    fmt = PromptFormat("alpaca", name, source=source)
    fmt.prompter()  # an unknown name or a broken file is refused now
    return fmt
