"""Settings tables: one dataclass per command, one field per flag holding its default and help line.

Every command a user runs (`finetune.py`, `generate.py`, each `evaluate.py` and `weight_diff.py`
subcommand, the exports, `generate_instruction.py`) takes its flags from one table, and its entry
function is built from that table by `@flags_from`, as torchtune's `config.parse` gives every recipe
one command-line contract:

    @dataclass
    class ExactMatchConfig:
        outputs: str = setting("", "the model's outputs, AlpacaEval JSON.")
        output_file: str = setting("", "the per-item report.")

    @flags_from(ExactMatchConfig)
    def exact_match(config: ExactMatchConfig) -> None:
        \"\"\"Final-answer accuracy.\"\"\"
        score(config.outputs, config.output_file)

fire sees `exact_match(outputs: str = "", output_file: str = "")`: the table's names, defaults and
types in the table's order, so `alpaca/core/cli.py` converts every flag to its declared type, and
`--help` shows an `Args:` section generated from the help lines. The body receives one table instance.

Adding a flag to any command is two or three edits:
  1. a `setting(default, "help line")` field in the command's table (the one place its default and
     help live; the field's annotation is the flag's type);
  2. the code that reads `config.<name>` (and, where some values are invalid, a check in the table's
     `problems()` when it has one);
  3. the docs page listing the flags, where there is one (docs/generate_instruction.md is tested).
The signature, `--help` and `--config` files follow by themselves; tests/test_settings.py checks every
command.

When the value a user types differs in type from the resolved value the table keeps (finetune's
`--report_to=wandb,tensorboard` becomes a list), `setting(..., flag_type=str | None)` gives the type
the command line takes; a flag whose default is None also takes None. A flag without a default is `setting(REQUIRED, ...)`; a command's positional
rest (`evaluate.py leaderboard DIR DIR ...`) is `setting((), ..., variadic=True, flag_type=str)`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing

REQUIRED = dataclasses.MISSING  # `setting(REQUIRED, ...)`: a flag the command cannot run without


def setting(default, help: str, *, flag_type=None, variadic: bool = False, **metadata):
    """A flag: its default and its help line (the `Args:` entry of the command's --help).

    `flag_type` is the type the command line takes when it is not the field's own annotation;
    `variadic` makes the field the command's `*args`; any other keyword is kept in the field's
    metadata (finetune's per-mode defaults).
    """
    metadata = {"help": help, "flag_type": flag_type, "variadic": variadic, **metadata}
    return dataclasses.field(default=default, metadata=metadata)


def derived(default_factory=None, default=None):
    """A resolved value that is not a flag (computed from the flags, saved with the run)."""
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"derived": True})
    return dataclasses.field(default=default, metadata={"derived": True})


def flag_fields(config_class) -> list[dataclasses.Field]:
    """The fields of a settings dataclass that are flags, in the signature's order."""
    return [f for f in dataclasses.fields(config_class) if not f.metadata.get("derived")]


def flag_defaults(config_class) -> dict:
    """Each flag's default as the command's signature shows it (`REQUIRED` for one without)."""
    return {f.name: f.default for f in flag_fields(config_class)}


def flag_values(config) -> dict:
    """The flags of a settings instance, by name."""
    return {f.name: getattr(config, f.name) for f in flag_fields(type(config))}


def flag_parameters(config_class) -> list[inspect.Parameter]:
    """The command's parameters as fire must see them: each flag's name, default and declared type,
    in the table's order (flags after a variadic field are keyword-only, as Python requires)."""
    hints = typing.get_type_hints(config_class)
    parameters, kind = [], inspect.Parameter.POSITIONAL_OR_KEYWORD
    for spec in flag_fields(config_class):
        annotation = spec.metadata.get("flag_type") or hints[spec.name]
        if spec.default is None and type(None) not in (typing.get_args(annotation) or (annotation,)):
            annotation = annotation | None  # a flag left unset: the command decides (finetune's modes)
        if spec.metadata.get("variadic"):
            parameters.append(
                inspect.Parameter(spec.name, inspect.Parameter.VAR_POSITIONAL, annotation=annotation)
            )
            kind = inspect.Parameter.KEYWORD_ONLY
            continue
        default = inspect.Parameter.empty if spec.default is REQUIRED else spec.default
        parameters.append(inspect.Parameter(spec.name, kind, default=default, annotation=annotation))
    return parameters


def flags_from(config_class, *, extra: str | None = None):
    """Decorator: the command's signature and `--help` come from its settings table.

    The decorated function takes one argument, the table filled from the command line
    (`config_class(**flags)`; a flag not given keeps the table's default), plus `**extra` when `extra`
    names a catch-all for flags outside the table (finetune.py passes TrainingArguments through).
    The signature fire reads has real annotations, so `typing.get_type_hints` and
    `alpaca.core.cli.typed_flags` see every flag's declared type.
    """

    def decorate(body):
        parameters = flag_parameters(config_class)
        if extra:
            parameters.append(inspect.Parameter(extra, inspect.Parameter.VAR_KEYWORD))
        returns = typing.get_type_hints(body).get("return", inspect.Signature.empty)
        signature = inspect.Signature(parameters, return_annotation=returns)

        @functools.wraps(body)
        def entry(*args, **kwargs):
            values = signature.bind(*args, **kwargs).arguments
            rest = values.pop(extra, {}) if extra else {}
            return body(config_class(**values), **rest)

        entry.__signature__ = signature
        entry.__annotations__ = {p.name: p.annotation for p in parameters if p.annotation is not p.empty}
        if returns is not inspect.Signature.empty:
            entry.__annotations__["return"] = returns
        entry.__doc__ = (body.__doc__ or "").rstrip() + "\n\n" + args_docstring(config_class)
        entry._config_class = config_class  # private: fire lists public attributes as commands
        return entry

    return decorate


def args_docstring(config_class, indent: str = "    ") -> str:
    """The `Args:` section of a command's docstring (what `--help` shows), from the table's help lines.

    Each entry stays on one line: fire's docstring parser reads a continuation line holding a colon
    ("... Default: the template's ...") as a new argument and drops the rest, and it rewraps the
    text for the terminal anyway.
    """
    lines = [f"{indent}Args:"]
    for spec in flag_fields(config_class):
        lines.append(f"{indent * 2}{spec.name}: {' '.join(spec.metadata['help'].split())}")
    return "\n".join(lines) + "\n"


def type_problems(config) -> list[str]:
    """A settings table's fields whose value is not of the declared type, one line each naming the flag.

    For tables filled in Python (the command line is converted to the declared types first, by
    `alpaca.core.cli.typed_flags`): a bool is not a number here, an int is a float, None only where the
    type allows it.
    """
    wanted = {bool: "True or False", int: "a whole number", float: "a number", str: "text"}
    problems = []
    for name, hint in typing.get_type_hints(type(config)).items():
        value, kinds = getattr(config, name), typing.get_args(hint) or (hint,)
        optional = type(None) in kinds
        base = next(kind for kind in kinds if kind is not type(None))
        if value is None and optional:
            continue
        numeric = base is float and isinstance(value, (int, float))
        if isinstance(value, bool) != (base is bool) or not (numeric or isinstance(value, base)):
            problem = f"--{name} must be {wanted[base]}{' (or left out)' if optional else ''}, not {value!r}"
            if base is str and isinstance(value, (int, float)):
                problem += f" (write --{name}='\"{value}\"' for a name that looks like a number)"
            problems.append(problem)
    return problems
