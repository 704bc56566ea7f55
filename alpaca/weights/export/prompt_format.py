"""Which format the adapter was trained in, for what an export carries about it (the Ollama TEMPLATE and
stop strings, the held-out loss of the quantization check).

The format is the adapter's own record (`training_format.json`, `alpaca.core.chat.recorded_format`): an
Alpaca prompt template (`kind == "prompt_template"`) or a Jinja chat template (`kind ==
"chat_template"`: conversations, or Alpaca records as one exchange, trained in ChatML or the
tokenizer's own template). An adapter trained before formats were recorded falls back to the prompt
template its run_config.json names, else `alpaca`; `--prompt_template` names the template for such an
adapter, and is refused for one whose record says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alpaca.core.chat import FORMAT_FILE, alpaca_chat_template, read_training_format, recorded_format
from alpaca.core.prompter import Prompter, load_template

RUN_CONFIG = "run_config.json"


@dataclass(frozen=True)
class PromptFormat:
    """The identity of a training format: `kind` as in `TrainingFormat`, `name` the prompt template's
    name or path (prompt templates) or the `--chat_template` value it was trained with (chat
    templates), `chat_template` the Jinja source that renders a chat exactly as training did, and
    `source` where the choice came from (for the printed configuration)."""

    kind: str
    name: str
    chat_template: str = ""
    source: str = ""

    @property
    def is_chat(self) -> bool:
        return self.kind == "chat_template"

    def prompter(self) -> Prompter:
        """The Alpaca prompter (for a chat format, the default one: records are then rendered as chats)."""
        return Prompter(None if self.is_chat else self.name)

    def loss_chat_template(self) -> str | None:
        """The chat template the held-out loss renders records in (None: the prompter's template)."""
        return self.chat_template if self.is_chat else None


def prompt_template_format(name: str, source: str) -> PromptFormat:
    """An Alpaca prompt template by name or path; loaded (and so checked) now, before any weights are."""
    return PromptFormat("prompt_template", name, alpaca_chat_template(load_template(name)), source)


def resolve_prompt_format(lora_weights: str, prompt_template: str = "") -> PromptFormat:
    """The adapter's recorded format; else `--prompt_template` when given; else the template the
    adapter's run_config.json names, else Alpaca's default."""
    recorded = read_training_format(lora_weights) if lora_weights else None
    if recorded is not None:
        name = recorded.chat_template_flag if recorded.is_chat else recorded.prompt_template
        if prompt_template and (recorded.is_chat or prompt_template != recorded.prompt_template):
            trained = f"chat template {name!r}" if recorded.is_chat else f"prompt template {name!r}"
            raise ValueError(
                f"--prompt_template={prompt_template!r}: the adapter was trained in the {trained} (its "
                f"{FORMAT_FILE}); drop --prompt_template"
            )
        return PromptFormat(recorded.kind, name, recorded.chat_template, f"{FORMAT_FILE} of the adapter")
    if prompt_template:
        return prompt_template_format(prompt_template, "--prompt_template")
    fallback = recorded_format(lora_weights)
    has_run_config = bool(lora_weights) and (Path(str(lora_weights)).expanduser() / RUN_CONFIG).is_file()
    source = f"{RUN_CONFIG} of the adapter" if has_run_config else "default"
    return prompt_template_format(fallback.prompt_template, source)
