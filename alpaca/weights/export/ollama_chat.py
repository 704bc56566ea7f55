"""The Ollama TEMPLATE of a trained Jinja chat template (ChatML, a tokenizer's own such as SmolLM2's),
found by probing it, and the check that a TEMPLATE renders what the Jinja template renders.

Probing: probe chats whose contents are unique placeholders are rendered with the Jinja template; the
text around the placeholders gives each role's prefix and suffix, the generation prompt, and what the
template writes when there is no system message (SmolLM2's default system message; nothing for ChatML).
The TEMPLATE (Ollama's `.Messages` form, on one line so no whitespace is trimmed):

    {{ if .System }}SYSTEM-PREFIX{{ .System }}SYSTEM-SUFFIX{{ else }}NO-SYSTEM{{ end }}
    {{ range .Messages }}{{ if eq .Role "user" }}USER-PREFIX{{ .Content }}USER-SUFFIX
    {{ else if eq .Role "assistant" }}ASSISTANT-PREFIX{{ .Content }}ASSISTANT-SUFFIX{{ end }}{{ end }}
    GENERATION-PROMPT

A chat that ends with a user message renders as the Jinja template renders it with
`add_generation_prompt=True`, which is the prompt the model was trained to answer.

The check (`check_go_template`), for both kinds of format: the TEMPLATE, filled as Ollama fills it
(`go_template.ollama_render`), must give the Jinja template's text for the probe chats, the last 15
conversations of data/chat_sample.jsonl (each prompt up to each assistant turn) and the demo's held-out
Alpaca records (input as the system message, instruction as the user message). A template it cannot
express (a system message inside the first user turn, a role's markers that depend on the turn, content
the template rewrites) is refused in one line before the export loads any weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from alpaca.core.chat import alpaca_record_chat, conversation_messages, render
from alpaca.weights.export.go_template import ollama_render

PROBE = {
    "system": "qqsystemprobeqq",
    "user1": "qquserprobe1qq",
    "assistant1": "qqassistantprobe1qq",
    "user2": "qquserprobe2qq",
    "assistant2": "qqassistantprobe2qq",
}
CHAT_SAMPLE = Path(__file__).resolve().parents[3] / "data" / "chat_sample.jsonl"
CHECK_CONVERSATIONS = 15


class CannotExpress(ValueError):
    """The Jinja chat template has no Ollama TEMPLATE of the probed form."""


@dataclass(frozen=True)
class ChatShape:
    """The text a chat template writes around each turn."""

    system_prefix: str
    system_suffix: str
    no_system: str  # what it writes before the first user turn when there is no system message
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation: str  # add_generation_prompt's text


def _split(text: str, placeholders: list[str]) -> list[str]:
    """The text between the placeholders, each of which must occur once, in order."""
    pieces, rest = [], text
    for placeholder in placeholders:
        if rest.count(placeholder) != 1:
            raise CannotExpress("a message's content does not appear exactly once, unchanged, in its turn")
        before, rest = rest.split(placeholder)
        pieces.append(before)
    return [*pieces, rest]


def _strip_suffix(text: str, suffix: str, what: str) -> str:
    if not text.endswith(suffix):
        raise CannotExpress(f"{what} differs between turns")
    return text[: len(text) - len(suffix)]


def _strip_prefix(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise CannotExpress(f"{what} differs between turns")
    return text[len(prefix) :]


def probe_chat_template(template: str, tokenizer) -> ChatShape:
    """Each role's prefix and suffix, the generation prompt and the no-system text of `template`."""
    p = PROBE

    def chat(*names: str) -> list[dict]:
        return [{"role": name.rstrip("12"), "content": p[name]} for name in names]

    def text(messages: list[dict], generation: bool = False) -> str:
        try:
            return render(template, messages, tokenizer, add_generation_prompt=generation)
        except ValueError as err:
            raise CannotExpress(f"it cannot render a probe chat ({err})") from err

    names = ["system", "user1", "assistant1", "user2", "assistant2"]
    with_system = _split(text(chat(*names)), [p[n] for n in names])
    without = _split(text(chat(*names[1:])), [p[n] for n in names[1:]])
    one_user = text(chat("user1"))
    prompt = text(chat("user1"), True)
    # with a system message: S_PRE s S_SUF U_PRE u1 U_SUF A_PRE a1 A_SUF U_PRE u2 U_SUF A_PRE a2 A_SUF
    assistant_suffix = with_system[5]
    user_prefix = _strip_prefix(with_system[3], assistant_suffix, "the assistant turn's end")
    user_suffix = _split(one_user, [p["user1"]])[1]
    assistant_prefix = _strip_prefix(with_system[4], user_suffix, "the user turn's end")
    if with_system[2] != with_system[4]:
        raise CannotExpress("the text between a user and an assistant turn differs between turns")
    system_suffix = _strip_suffix(with_system[1], user_prefix, "the user turn's start")
    no_system = _strip_suffix(without[0], user_prefix, "the user turn's start")
    generation = _strip_prefix(prompt, one_user, "a chat without the generation prompt")
    return ChatShape(
        with_system[0],
        system_suffix,
        no_system,
        user_prefix,
        user_suffix,
        assistant_prefix,
        assistant_suffix,
        generation,
    )


def go_literal(text: str) -> str:
    """Literal text for a Go template: only `{{` would start an action, so it becomes one printing it."""
    return text.replace("{{", '{{ "{{" }}')


def chat_go_template(shape: ChatShape) -> str:
    """The Ollama TEMPLATE (`.Messages` form) of a probed chat template."""
    g = go_literal
    system = f"{{{{ if .System }}}}{g(shape.system_prefix)}{{{{ .System }}}}{g(shape.system_suffix)}"
    if shape.no_system:
        system += f"{{{{ else }}}}{g(shape.no_system)}"
    user = f"{g(shape.user_prefix)}{{{{ .Content }}}}{g(shape.user_suffix)}"
    assistant = f"{g(shape.assistant_prefix)}{{{{ .Content }}}}{g(shape.assistant_suffix)}"
    return (
        f"{system}{{{{ end }}}}"
        f'{{{{ range .Messages }}}}{{{{ if eq .Role "user" }}}}{user}'
        f'{{{{ else if eq .Role "assistant" }}}}{assistant}{{{{ end }}}}{{{{ end }}}}'
        f"{g(shape.generation)}"
    )


def held_out_conversations(count: int = CHECK_CONVERSATIONS) -> list[list[dict]]:
    """The last `count` conversations of data/chat_sample.jsonl (none when the file is not there)."""
    if not CHAT_SAMPLE.is_file():
        return []
    lines = [line for line in CHAT_SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    return [conversation_messages(r, i, str(CHAT_SAMPLE)) for i, r in enumerate(records)][-count:]


def check_chats() -> list[list[dict]]:
    """The chats a TEMPLATE is checked on: every prompt (up to an assistant turn) of the probe chats, of
    the held-out conversations and of the held-out Alpaca records as chats."""
    from alpaca.weights.export.quantize import held_out_records

    p = PROBE
    full = [
        [{"role": "system", "content": p["system"]}, {"role": "user", "content": p["user1"]}],
        [{"role": "user", "content": p["user1"]}, {"role": "assistant", "content": p["assistant1"]}],
        *held_out_conversations(),
    ]
    full += [alpaca_record_chat(record) for record in held_out_records(CHECK_CONVERSATIONS)]
    prompts = []
    for messages in full:
        ends = [i for i, m in enumerate(messages) if m["role"] == "assistant"] or [len(messages)]
        prompts += [messages[:end] for end in ends]
    return prompts


def check_go_template(go_template: str, template: str, tokenizer, name: str) -> int:
    """Require the TEMPLATE, filled as Ollama fills it, to give the Jinja template's prompt for every
    check chat; returns how many were compared."""
    chats = check_chats()
    for number, messages in enumerate(chats):
        expected = render(template, messages, tokenizer, add_generation_prompt=True)
        try:
            got = ollama_render(go_template, messages)
        except ValueError as err:
            raise CannotExpress(f"{err}") from err
        if got != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected))
            )
            raise CannotExpress(
                f"the Ollama TEMPLATE of {name} renders check chat {number} differently from the Jinja "
                f"template at character {at}: {got[at : at + 30]!r} vs {expected[at : at + 30]!r}"
            )
    return len(chats)
