"""Read an Ollama Modelfile, independently of the code that writes it.

`parse_modelfile` follows Ollama's own parser (parser/parser.go, `ParseFile`): a directive name, then a
value that ends at a line break once it unquotes (`"..."` or `\"\"\"...\"\"\"`, quotes stripped, no
escapes), `#` comments, `PARAMETER name value`. The TEMPLATE is filled by the renderer of the
Go-template subset in `alpaca.weights.export.go_template` (the export checks its TEMPLATE with it before
writing), whose own tests are in tests/test_export_ollama.py.
"""

from __future__ import annotations

COMMANDS = {
    "from",
    "license",
    "template",
    "system",
    "adapter",
    "draft",
    "renderer",
    "parser",
    "parameter",
    "message",
    "requires",
}


def unquote(value: str) -> tuple[str, bool]:
    if value.startswith('"""'):
        return (value[3:-3], True) if len(value) >= 6 and value.endswith('"""') else ("", False)
    if value.startswith('"'):
        return (value[1:-1], True) if len(value) >= 2 and value.endswith('"') else ("", False)
    return value, True


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs in order; FROM is named `model`, a PARAMETER by its own name."""
    commands, state, buffer, name = [], "nil", "", ""
    for char in text:
        newline, space = char in "\r\n", char in " \t"
        if state == "nil":
            if char == "#":
                state = "comment"
            elif not (space or newline):
                state, buffer = "name", char
        elif state == "comment":
            state = "nil" if newline else "comment"
        elif state == "name":
            if char.isascii() and char.isalpha():
                buffer += char
            elif space and buffer.lower() in COMMANDS:
                command = buffer.lower()
                state = "parameter" if command == "parameter" else "value"
                name, buffer = ("model" if command == "from" else command), ""
            else:
                raise ValueError(f"not a Modelfile command: {buffer + char!r}")
        elif state == "parameter":
            if char.isascii() and (char.isalnum() or char == "_"):
                buffer += char
            elif space:
                name, state, buffer = buffer, "value", ""
            else:
                raise ValueError(f"bad parameter name {buffer + char!r}")
        elif newline or space:
            value, complete = unquote(buffer.strip())
            if not complete or space:
                buffer += char
            else:
                commands.append((name, value))
                state, buffer = "nil", ""
        else:
            buffer += char
    if state == "value":
        value, complete = unquote(buffer.strip())
        if not complete:
            raise ValueError("unexpected end of the Modelfile inside a quoted value")
        commands.append((name, value))
    elif state not in ("nil", "comment"):
        raise ValueError("unexpected end of the Modelfile")
    if not any(command == "model" for command, _ in commands):
        raise ValueError("no FROM line")
    return commands
