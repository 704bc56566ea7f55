"""Prompt templates: the one place where prompt text is turned into model input.

Templates are JSON files in the package's `templates/` folder (found relative to this module, so
scripts work from any working directory and from an installed package; the repository's top-level
`templates` is a link to it for older paths) or any JSON file given by path.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

# alpaca/templates/: one floor up from alpaca/core/.
TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "templates"
DEFAULT_TEMPLATE = "alpaca"
REQUIRED_KEYS = ("prompt_input", "prompt_no_input", "response_split")


def available_templates() -> list[str]:
    """Names of the templates shipped in `templates/`."""
    return sorted(p.stem for p in TEMPLATES_DIR.glob("*.json"))


def resolve_template_path(template_name: str | None) -> Path:
    """Return the JSON file for a template name or path; raise a ValueError listing the choices."""
    name = template_name or DEFAULT_TEMPLATE
    candidate = Path(name).expanduser()
    if name.endswith(".json") or candidate.parent != Path("."):
        if not candidate.is_file():
            raise ValueError(f"prompt template file {str(candidate)!r} does not exist")
        return candidate
    path = TEMPLATES_DIR / f"{name}.json"
    if not path.is_file():
        raise ValueError(
            f"unknown prompt template {name!r}: choose one of {available_templates()} "
            "or pass the path to a JSON file with the keys " + ", ".join(REQUIRED_KEYS)
        )
    return path


# The placeholders each prompt may use; any other `{name}` would be a KeyError at the first example.
PLACEHOLDERS = {"prompt_input": {"instruction", "input"}, "prompt_no_input": {"instruction"}}


def check_placeholders(template: dict, where: str) -> None:
    """Raise a ValueError for a prompt with an unknown `{placeholder}`, a lone brace, or a missing
    `{instruction}` / `{input}`; literal braces are written `{{` and `}}`."""
    for key, allowed in PLACEHOLDERS.items():
        try:
            fields = {name for _, name, _, _ in string.Formatter().parse(template[key]) if name is not None}
        except ValueError as err:
            raise ValueError(
                f"{where}: {key} is not a valid format string ({err}); write a literal brace as {{{{ or }}}}"
            ) from err
        unknown = sorted(fields - allowed)
        if unknown:
            raise ValueError(
                f"{where}: {key} uses unknown placeholder(s) {['{' + name + '}' for name in unknown]}; "
                f"it may use only {sorted('{' + name + '}' for name in allowed)} (write literal braces as {{{{ }}}})"
            )
        missing = sorted(allowed - fields)
        if missing:
            raise ValueError(f"{where}: {key} must use {', '.join('{' + name + '}' for name in missing)}")


def load_template(template_name: str | None) -> dict:
    """Load and validate a template (name or path)."""
    path = resolve_template_path(template_name)
    where = f"prompt template {str(path)!r}"
    try:
        template = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{where} is not valid JSON: {err}") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{where} is not valid UTF-8 (byte {err.start})") from err
    if not isinstance(template, dict):
        raise ValueError(
            f"{where} holds a JSON {type(template).__name__}; it must be an object with the keys "
            + ", ".join(REQUIRED_KEYS)
        )
    missing = [key for key in REQUIRED_KEYS if not isinstance(template.get(key), str)]
    if missing:
        raise ValueError(f"{where} lacks the string key(s) {missing}")
    check_placeholders(template, where)
    return template


class Prompter:
    """Builds prompts from a template and extracts the response from generated text."""

    def __init__(self, template_name: str | None = DEFAULT_TEMPLATE, verbose: bool = False):
        self.template_name = template_name or DEFAULT_TEMPLATE
        self.template = load_template(self.template_name)
        self._verbose = verbose

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        """The full prompt for an instruction and optional input; `label` (the answer) is appended."""
        if input:
            prompt = self.template["prompt_input"].format(instruction=instruction, input=input)
        else:
            prompt = self.template["prompt_no_input"].format(instruction=instruction)
        if label:
            prompt = f"{prompt}{label}"
        if self._verbose:
            print(prompt)
        return prompt

    def get_response(self, output: str, prompt: str | None = None) -> str:
        """The model's answer in `output` (prompt + generation).

        With `prompt` given and `output` starting with it, the answer is what follows the prompt, so an
        instruction that itself contains the split marker cannot confuse it. Otherwise everything after
        the first `response_split` marker, or the whole text when there is none. (Upstream's rule,
        `output.split(marker)[1]`, kept only the text between the first and a second marker, and raised
        IndexError when there was none.)
        """
        if prompt is not None and output.startswith(prompt):
            return output[len(prompt) :].strip()
        parts = output.split(self.template["response_split"], 1)
        return (parts[1] if len(parts) == 2 else parts[0]).strip()
