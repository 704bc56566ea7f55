"""Settings tables: one dataclass per script, one field per flag holding its default and help line.

A script's settings dataclass (`FinetuneConfig` in alpaca/finetune/settings.py, `SelfInstructConfig`
in alpaca/selfinstruct/settings.py) is the one home of each flag's default and help text. The script's
signature repeats the defaults because fire reads the signature (tests/test_settings.py checks that
they agree), and its `Args:` docstring, which `--help` shows, is generated here from the table.
"""

from __future__ import annotations

import dataclasses
import textwrap


def setting(default, help: str, **metadata):
    """A flag: its default and its help line (the `Args:` entry of the script's --help); any other
    keyword is kept in the field's metadata (finetune's per-mode defaults)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def derived(default_factory=None, default=None):
    """A resolved value that is not a flag (computed from the flags, saved with the run)."""
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"derived": True})
    return dataclasses.field(default=default, metadata={"derived": True})


def flag_fields(config_class) -> list[dataclasses.Field]:
    """The fields of a settings dataclass that are flags, in the signature's order."""
    return [f for f in dataclasses.fields(config_class) if not f.metadata.get("derived")]


def flag_defaults(config_class) -> dict:
    """Each flag's default as the script's signature must show it."""
    return {f.name: f.default for f in flag_fields(config_class)}


def args_docstring(config_class, indent: str = "    ") -> str:
    """The `Args:` section of a script's docstring (what `--help` shows), from the table's help lines."""
    lines = [f"{indent}Args:"]
    for spec in flag_fields(config_class):
        text = f"{spec.name}: {spec.metadata['help']}"
        lines += textwrap.wrap(
            text, width=104, initial_indent=indent * 2, subsequent_indent=indent * 3, break_on_hyphens=False
        )
    return "\n".join(lines) + "\n"
