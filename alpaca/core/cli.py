"""The one way the top-level scripts run: fire, with user mistakes shown as one line, not a traceback,
and `--config=FILE` (YAML or JSON) on every script.

A config file is a mapping of flag names to values, e.g. `configs/alpaca_lora.yaml`. Its values are
handed to fire as if typed on the command line, except for flags the command line gives itself: those
win. A key the script does not take is an error naming the file, the key and the closest flags.

fire turns only `True`/`False` into booleans and leaves `--overwrite=false` a (true) string, so every
value is converted to its flag's declared type before the script's function runs (`typed_flags`):
booleans take `true/false/yes/no/1/0` in any case, numbers take numeric text, and a value that fits no
declared type is one error naming the flag.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path


def run(
    component,
    script: str,
    argv: list[str] | None = None,
    known_keys: Callable[[], set[str]] | None = None,
    read_config: Callable[[dict], dict] | None = None,
    **fire_kwargs,
) -> None:
    """Run `component` with fire; a ValueError (a user's mistake whose message names the flag, file
    or record) becomes `SCRIPT: error: MESSAGE` on stderr and exit status 2.

    `known_keys` lists the names a --config file may set when the function also takes **kwargs
    (finetune.py passes TrainingArguments through); `read_config` turns the file's mapping into
    settings (finetune.py drops the report keys of a saved run_config.json).
    """
    import fire

    drop_bitsandbytes_kernels_warning()
    try:
        command = sys.argv[1:] if argv is None else list(argv)
        command = apply_config_file(command, component, known_keys, read_config)
        fire.Fire(typed_component(component), command=command, **fire_kwargs)
    except ValueError as err:
        print(f"{script}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


TRUE_WORDS = ("true", "yes", "1")
FALSE_WORDS = ("false", "no", "0")


def typed_component(component):
    """`component` (a function, or a dict of command name -> function) with every flag converted to
    its declared type before the function runs."""
    if isinstance(component, dict):
        return {name: typed_flags(function) for name, function in component.items()}
    return typed_flags(component)


def typed_flags(function):
    """A wrapper of `function` that converts each argument fire hands it to the parameter's annotation
    (`convert_flag`) and raises one ValueError naming every flag that fits no declared type. fire reads
    the signature and docstring through `functools.wraps`, so `--help` is unchanged."""
    signature = inspect.signature(function)
    try:
        hints = typing.get_type_hints(function)
    except Exception:  # an annotation that cannot be evaluated: leave those values as fire gives them
        hints = {}

    @functools.wraps(function)
    def entry(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        problems = []
        for name, value in bound.arguments.items():
            parameter = signature.parameters[name]
            if name not in hints or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                continue
            try:
                bound.arguments[name] = convert_flag(name, value, hints[name])
            except ValueError as err:
                problems.append(str(err))
        if problems:
            raise ValueError("; ".join(problems))
        return function(*bound.args, **bound.kwargs)

    return entry


def parse_bool(name: str, value) -> bool:
    """`value` as a boolean flag: True/False, 1/0, or the words true/false/yes/no/1/0 in any case."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise ValueError(f"--{name} must be {TYPE_WORDS[bool]}, not {value!r}")


def convert_flag(name: str, value, hint):
    """`value` (as fire or a config file gives it) converted to the declared type `hint`.

    Handles the types the scripts declare: bool, int, float, str, list[str] and unions of them with
    None. A value already of a declared type is kept; otherwise booleans come first (so `false` means
    False where a flag also takes a path), then numbers from numeric text, then text from numbers (fire
    reads `--run_name=2024` as an int) or from fire's tuple for `--flag=a,b`. Any other annotation is
    left alone.
    """
    members = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if type(None) in members and (value is None or (value == "" and str not in members)):
        return None
    known = {bool, int, float, str, list}
    kinds = [typing.get_origin(m) or m for m in members if m is not type(None)]
    if not kinds or any(kind not in known for kind in kinds):
        return value
    if bool in kinds:
        try:
            return parse_bool(name, value)
        except ValueError:
            if kinds == [bool]:
                raise
    if type(value) in kinds and not isinstance(value, list):
        return value
    for kind in (int, float):
        if kind in kinds and not isinstance(value, bool):
            number = as_number(value, kind)
            if number is not None:
                return number
    is_list_of_text = isinstance(value, list | tuple) and all(
        isinstance(item, str | int | float) and not isinstance(item, bool) for item in value
    )
    if list in kinds and is_list_of_text and value:
        return value if all(isinstance(item, str) for item in value) else [str(item) for item in value]
    if str in kinds and list not in kinds:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        if is_list_of_text:
            return ",".join(str(item) for item in value)
    return fail_type(name, value, kinds)


def as_number(value, kind):
    """`value` as an int or float when it is one (integral floats count as ints), else None."""
    if isinstance(value, str):
        try:
            value = float(value) if kind is float else int(value.strip())
        except ValueError:
            return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if kind is int and (value != value or value != int(value)):
            return None
        return kind(value)
    return None


TYPE_WORDS = {
    bool: "true or false (also yes/no, 1/0)",
    int: "a whole number",
    float: "a number",
    str: "text",
    list: "a list such as [a,b]",
}


def fail_type(name: str, value, kinds: list) -> typing.NoReturn:
    wanted = " or ".join(TYPE_WORDS[kind] for kind in kinds)
    if isinstance(value, bool) and bool not in kinds:
        raise ValueError(f"--{name} needs a value ({wanted}), e.g. --{name}=VALUE")
    raise ValueError(f"--{name} must be {wanted}, not {value!r}")


def load_config_file(path: str) -> dict:
    """A YAML (.yaml / .yml) or JSON file holding one mapping of settings."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"--config={path!r}: no such file")
    text = file.read_text(encoding="utf-8")
    try:
        if file.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as err:  # yaml.YAMLError or json.JSONDecodeError: the file is not readable as such
        raise ValueError(
            f"--config={path!r} is not valid {file.suffix.lstrip('.') or 'JSON'}: {err}"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"--config={path!r}: the file must hold a mapping of flag: value, not a {type(data).__name__}"
        )
    return data


def split_config_flag(argv: list[str]) -> tuple[str | None, list[str]]:
    """The path given by `--config=PATH` / `--config PATH` (before fire's `--` separator), and argv
    without it."""
    end = argv.index("--") if "--" in argv else len(argv)
    path, rest, skip = None, [], False
    for i, word in enumerate(argv):
        if skip:
            skip = False
            continue
        if i < end and word.startswith("--config="):
            path = word.split("=", 1)[1]
        elif i < end and word == "--config" and i + 1 < end:
            path, skip = argv[i + 1], True
        else:
            rest.append(word)
    return path, rest


def given_flags(argv: list[str], names: set[str]) -> set[str]:
    """The names among `names` that argv sets (`--x=1`, `--x 1`, `--x`, `--nox`, `--x-y`)."""
    given = set()
    for word in argv:
        if word == "--":
            break
        if not word.startswith("--"):
            continue
        name = word[2:].split("=", 1)[0].replace("-", "_")
        given.add(name)
        if name.startswith("no") and name[2:] in names:
            given.add(name[2:])
    return given


def target_function(component, argv: list[str]):
    """The function fire will call: the component itself, or for a dict of commands the one argv names."""
    if isinstance(component, dict):
        for word in argv:
            if word in component:
                return component[word]
        raise ValueError(f"--config needs a command first: one of {', '.join(component)}")
    return component


def apply_config_file(argv: list[str], component, known_keys=None, read_config=None) -> list[str]:
    """argv with the settings of its --config file added as flags, where argv does not give them."""
    path, argv = split_config_flag(argv)
    if path is None:
        return argv
    settings = load_config_file(path)
    if read_config is not None:
        settings = read_config(settings)
    function = target_function(component, argv)
    parameters = inspect.signature(function).parameters
    names = {
        name
        for name, p in parameters.items()
        if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
    }
    if known_keys is not None:
        names |= set(known_keys())
    unknown = [key for key in settings if key not in names]
    if unknown:
        raise ValueError(
            "; ".join(
                f"{path}: {key!r} is not a flag of this script{suggestion(key, names)}" for key in unknown
            )
        )
    given = given_flags(argv, names)
    # repr() writes each value as the Python literal fire reads back to the same value and type
    added = [f"--{key}={value!r}" for key, value in settings.items() if key not in given]
    end = argv.index("--") if "--" in argv else len(argv)
    return argv[:end] + added + argv[end:]


def suggestion(name: str, known) -> str:
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
    return f"; did you mean {' or '.join(close)}?" if close else ""


def drop_bitsandbytes_kernels_warning() -> None:
    """Silence one import-time message of bitsandbytes (0.50) on CPUs with AVX512-BF16.

    peft imports bitsandbytes whenever it is installed, and bitsandbytes then logs "Failed to load CPU
    gemm_4bit_forward from kernels-community: No module named 'kernels'" from its CPU backend: every
    command printed it, quantized or not. It only means an optional faster 4-bit kernel is absent.
    The filter drops that message alone, on that logger alone.
    """
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
    )
