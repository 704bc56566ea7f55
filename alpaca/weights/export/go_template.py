"""A renderer of the subset of Go's text/template that the Modelfile TEMPLATEs written here use, and of
how Ollama fills a TEMPLATE from a chat (its `template.Execute`), so that an export can check, before it
writes anything, that the TEMPLATE renders the text the trained Jinja chat template renders.

The subset: literal text; `{{ .Field }}` (`.System`, `.Prompt`, `.Response`; inside a range `.Role`,
`.Content`); `{{ "literal" }}`; `{{ if COND }} ... {{ else if COND }} ... {{ else }} ... {{ end }}` with
COND `.Field` (an empty string or list is false, as in Go) or `eq .Field "literal"`;
`{{ range .Messages }} ... {{ end }}`; whitespace trimming (`{{- ` and ` -}}`). Anything else raises, so
a TEMPLATE using more than this cannot pass the check.

Ollama (template/template.go) fills a TEMPLATE that mentions `.Messages` once, with `.System` (the
system messages joined by a blank line) and `.Messages` (consecutive turns of one role merged, system
messages included). An older-style TEMPLATE (`.System`, `.Prompt`, `.Response`) is filled once per
exchange: a user message and the assistant reply after it, the system message with the first exchange
only; the last exchange is rendered up to `{{ .Response }}` and everything after it is cut.
"""

from __future__ import annotations

import re

ACTION = re.compile(r"\{\{(- )?(.*?)( -)?\}\}", re.DOTALL)
FIELD = r"\.(\w+)"
STRING = r'"((?:[^"\\]|\\.)*)"'


class _Cut(Exception):
    """Raised after `{{ .Response }}` in the last exchange of an older-style TEMPLATE."""


def _condition(text: str):
    if match := re.fullmatch(FIELD, text):
        return ("truthy", match[1])
    if match := re.fullmatch(rf"eq {FIELD} {STRING}", text):
        return ("eq", match[1], _unquote(match[2]))
    raise ValueError(f"template condition outside the supported subset: {text!r}")


def _unquote(text: str) -> str:
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _tokens(template: str) -> list[tuple[str, str]]:
    """("text", literal) and ("action", body) in order, whitespace trimming applied."""
    tokens, position = [], 0
    for match in ACTION.finditer(template):
        text = template[position : match.start()]
        if match[1]:
            text = text.rstrip(" \t\r\n")
        if tokens and tokens[-1][0] == "trim":
            tokens.pop()
            text = text.lstrip(" \t\r\n")
        tokens.append(("text", text))
        tokens.append(("action", match[2].strip()))
        if match[3]:
            tokens.append(("trim", ""))
        position = match.end()
    text = template[position:]
    if tokens and tokens[-1][0] == "trim":
        tokens.pop()
        text = text.lstrip(" \t\r\n")
    tokens.append(("text", text))
    return tokens


def parse(template: str) -> list:
    """The template as a tree of nodes: ("text", s), ("field", name), ("if", [(cond, body)...], else),
    ("range", name, body)."""
    tokens = _tokens(template)
    position = 0

    def block(closing: tuple[str, ...]) -> tuple[list, str]:
        nonlocal position
        nodes = []
        while position < len(tokens):
            kind, value = tokens[position]
            position += 1
            if kind == "text":
                if value:
                    nodes.append(("text", value))
                continue
            if value in closing or (value.startswith("else if ") and "else" in closing):
                return nodes, value
            if match := re.fullmatch(FIELD, value):
                nodes.append(("field", match[1]))
            elif match := re.fullmatch(STRING, value):
                nodes.append(("text", _unquote(match[1])))
            elif value.startswith("if "):
                branches, otherwise, condition = [], [], _condition(value[3:].strip())
                while True:
                    body, end = block(("else", "end"))
                    branches.append((condition, body))
                    if end.startswith("else if "):
                        condition = _condition(end[8:].strip())
                        continue
                    if end == "else":
                        otherwise, _ = block(("end",))
                    break
                nodes.append(("if", branches, otherwise))
            elif match := re.fullmatch(rf"range {FIELD}", value):
                body, _ = block(("end",))
                nodes.append(("range", match[1], body))
            else:
                raise ValueError(f"template action outside the supported subset: {{{{ {value} }}}}")
        if closing:
            raise ValueError(f"template ends inside a block: expected {{{{ {closing[-1]} }}}}")
        return nodes, ""

    tree, _ = block(())
    return tree


def _value(data: dict, name: str):
    if name not in data:
        raise ValueError(f"template field .{name} is not one Ollama fills here")
    return data[name]


def _render(nodes: list, data: dict, out: list, cut_after_response: bool) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "field":
            value = _value(data, node[1])
            if not isinstance(value, str):
                raise ValueError(f"template field .{node[1]} is not text")
            out.append(value)
            if cut_after_response and node[1] == "Response":
                raise _Cut
        elif kind == "if":
            for condition, body in node[1]:
                value = _value(data, condition[1])
                if (value == condition[2]) if condition[0] == "eq" else bool(value):
                    _render(body, data, out, cut_after_response)
                    break
            else:
                _render(node[2], data, out, cut_after_response)
        else:  # range
            for item in _value(data, node[1]):
                _render(node[2], item, out, cut_after_response)


def render(template: str, data: dict, cut_after_response: bool = False) -> str:
    """Fill `template` with `data`; `cut_after_response` stops after `{{ .Response }}` as Ollama does in
    an older-style TEMPLATE's last exchange."""
    out: list[str] = []
    try:
        _render(parse(template), data, out, cut_after_response)
    except _Cut:
        pass
    return "".join(out)


def _mentions(nodes: list, name: str) -> bool:
    for node in nodes:
        if node[0] == "field" and node[1] == name:
            return True
        if node[0] == "range" and (node[1] == name or _mentions(node[2], name)):
            return True
        if node[0] == "if":
            branches = [body for _, body in node[1]] + [node[2]]
            if any(c[1] == name for c, _ in node[1]) or any(_mentions(b, name) for b in branches):
                return True
    return False


def collate(messages: list[dict]) -> tuple[str, list[dict]]:
    """Ollama's `collate`: the system messages joined by a blank line, and the messages with
    consecutive turns of one role merged."""
    system = [m["content"] for m in messages if m["role"] == "system"]
    merged: list[dict] = []
    for message in messages:
        if merged and merged[-1]["Role"] == message["role"]:
            merged[-1]["Content"] += "\n\n" + message["content"]
        else:
            merged.append({"Role": message["role"], "Content": message["content"]})
    return "\n\n".join(system), merged


def ollama_render(template: str, messages: list[dict]) -> str:
    """The text Ollama gives the model for a chat `messages` (OpenAI roles) under `template`."""
    system, merged = collate(messages)
    if _mentions(parse(template), "Messages"):
        return render(template, {"System": system, "Messages": merged, "Response": ""})
    out, values = [], {"System": "", "Prompt": "", "Response": ""}

    def execute() -> None:
        out.append(render(template, values))
        values.update(System="", Prompt="", Response="")

    for message in merged:
        role, content = message["Role"], message["Content"]
        if role == "system":
            if values["Prompt"] or values["Response"]:
                execute()
            values["System"] = content
        elif role == "user":
            if values["Response"]:
                execute()
            values["Prompt"] = content
        elif role == "assistant":
            values["Response"] = content
    out.append(render(template, values, cut_after_response=True))
    return "".join(out)
