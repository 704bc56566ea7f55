"""Every flag means what its declared type says: `--flag=false` is False on every script, on the command
line and in --config files; a value that fits no declared type is one `SCRIPT: error:` line before
anything loads."""

import functools
import importlib.util
import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from alpaca.core.cli import convert_flag, run

REPO = Path(__file__).resolve().parent.parent


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"script_{name.removesuffix('.py')}", REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry_functions() -> list[tuple[str, object]]:
    """(script, function) for every command a user runs: the top-level scripts (each command of the
    multi-command ones) and the `python -m alpaca...` entries."""
    entries = []
    for script, names in (
        ("finetune.py", ["train"]),
        ("generate.py", ["main"]),
        ("generate_instruction.py", ["generate_instruction_following_data"]),
        ("export_hf_checkpoint.py", ["main"]),
        ("export_state_dict_checkpoint.py", ["main"]),
        ("export_gguf.py", ["main"]),
        ("weight_diff.py", ["make_diff", "recover", "verify"]),
        ("evaluate.py", ["pairwise", "loss", "exact_match", "leaderboard"]),
    ):
        module = load_script(script)
        entries += [(script, getattr(module, name)) for name in names]
    for module_name in ("alpaca.quickstart", "alpaca.offline_loop", "alpaca.default_model"):
        module = importlib.import_module(module_name)
        entries.append((f"python -m {module_name}", module.main))
    return entries


def boolean_flags(function) -> list[str]:
    hints = typing.get_type_hints(function)
    names = []
    for name in inspect.signature(function).parameters:
        hint = hints.get(name)
        members = typing.get_args(hint) or (hint,)
        if bool in members:
            names.append(name)
    return names


def call_recorded(function, argv: list[str], capsys=None) -> dict:
    """Run `function`'s real signature through the CLI layer with `argv`; return the arguments its
    body would have received (the body itself is not run)."""
    received = {}

    @functools.wraps(function)
    def recorder(*args, **kwargs):
        received.update(inspect.signature(function).bind_partial(*args, **kwargs).arguments)

    required = [
        f"--{name}=x"
        for name, p in inspect.signature(function).parameters.items()
        if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD
    ]
    argv = [*argv, *required]
    component = recorder
    if function.__name__ in (
        "make_diff",
        "recover",
        "verify",
        "pairwise",
        "loss",
        "exact_match",
        "leaderboard",
    ):
        component = {function.__name__: recorder}
        argv = [function.__name__, *argv]
    run(component, "script.py", argv, serialize=lambda _: None)
    return received


ENTRIES = entry_functions()


def test_every_script_has_boolean_flags_to_check():
    flags = {script: boolean_flags(function) for script, function in ENTRIES}
    assert "overwrite" in flags["finetune.py"] and "use_lora" in flags["finetune.py"]
    assert "share_gradio" in flags["generate.py"] and "trust_remote_code" in flags["generate.py"]
    assert "overwrite" in flags["export_hf_checkpoint.py"]
    assert sum(len(boolean_flags(function)) for _, function in ENTRIES) >= 25


@pytest.mark.parametrize(
    "script,function,flag",
    [(script, function, flag) for script, function in ENTRIES for flag in boolean_flags(function)],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_every_boolean_flag_given_false_means_false(script, function, flag, tmp_path):
    for word in ("false", "False", "FALSE", "no", "0"):
        assert call_recorded(function, [f"--{flag}={word}"])[flag] is False, (script, flag, word)
    for word in ("true", "Yes", "1", "True"):
        assert call_recorded(function, [f"--{flag}={word}"])[flag] is True, (script, flag, word)
    # the same words in a --config file (YAML reads a quoted "false" as text)
    config = tmp_path / "flags.yaml"
    config.write_text(f'{flag}: "false"\n', encoding="utf-8")
    assert call_recorded(function, [f"--config={config}"])[flag] is False
    config.write_text(json.dumps({flag: "no"}), encoding="utf-8")
    config = config.rename(tmp_path / "flags.json")
    assert call_recorded(function, [f"--config={config}"])[flag] is False


def test_a_boolean_flag_given_any_other_word_is_one_error_naming_it(capsys, tmp_path):
    from finetune import train

    with pytest.raises(SystemExit) as stop:
        call_recorded(train, ["--overwrite=maybe"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "script.py: error: --overwrite must be true or false (also yes/no, 1/0), not 'maybe'"
    ]
    config = tmp_path / "c.yaml"
    config.write_text("overwrite: maybe\nuse_lora: perhaps\n", encoding="utf-8")
    with pytest.raises(SystemExit):
        call_recorded(train, [f"--config={config}"])
    err = capsys.readouterr().err
    assert "--overwrite must be true or false (also yes/no, 1/0), not 'maybe'" in err
    assert "--use_lora must be true or false (also yes/no, 1/0), not 'perhaps'" in err


def test_other_declared_types_are_converted_or_refused(capsys):
    from finetune import train

    got = call_recorded(train, ["--learning_rate=3e-4", "--cutoff_len=256", "--wandb_run_name=2024"])
    assert got["learning_rate"] == 3e-4 and got["cutoff_len"] == 256 and got["wandb_run_name"] == "2024"
    got = call_recorded(train, ["--lora_target_modules=[q_proj,k_proj]", "--resume_from_checkpoint=false"])
    assert list(got["lora_target_modules"]) == ["q_proj", "k_proj"] and got["resume_from_checkpoint"] is False
    assert call_recorded(train, ["--resume_from_checkpoint=latest"])["resume_from_checkpoint"] == "latest"
    for argv, message in (
        (["--lora_target_modules=5"], "--lora_target_modules must be a list such as [a,b] or text, not 5"),
        (["--cutoff_len=12.5"], "--cutoff_len must be a whole number, not 12.5"),
        (["--micro_batch_size=four"], "--micro_batch_size must be a whole number, not 'four'"),
        (["--output_dir"], "--output_dir needs a value (text)"),
    ):
        with pytest.raises(SystemExit):
            call_recorded(train, argv)
        assert message in capsys.readouterr().err, argv


def test_convert_flag_keeps_fires_lists_for_text_flags():
    # fire reads --compare_lora_weights=./a,./b as text but a,b as a tuple: both mean the same list
    assert convert_flag("compare_lora_weights", ("a", "b"), str) == "a,b"
    assert convert_flag("stop", "### Instruction:,### Input:", str | None) == "### Instruction:,### Input:"
    assert convert_flag("warmup_steps", "", float | None) is None


def test_pass_through_training_arguments_are_typed_too():
    from alpaca.finetune.resolve import typed_pass_through

    assert typed_pass_through({"bf16": "false", "tf32": "no", "no_cuda": "0"}) == {
        "bf16": False,
        "tf32": False,
        "no_cuda": False,
    }
    with pytest.raises(ValueError, match="--bf16 must be true or false"):
        typed_pass_through({"bf16": "maybe"})


def run_script(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )


@pytest.mark.slow
def test_finetune_overwrite_false_keeps_the_run_in_the_folder(tiny_llama, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"another run's adapter")
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "Hi."}] * 4))
    result = run_script(
        "finetune.py",
        f"--base_model={tiny_llama}",
        f"--data_path={data}",
        f"--output_dir={out}",
        "--overwrite=false",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "already holds another run's files" in result.stderr
    assert (out / "adapter_model.safetensors").read_bytes() == b"another run's adapter"


@pytest.mark.slow
def test_export_overwrite_false_keeps_the_existing_export(tiny_llama, tiny_llama_adapter, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "config.json").write_text('{"kept": true}')
    result = run_script(
        "export_hf_checkpoint.py",
        f"--base_model={tiny_llama}",
        f"--lora_weights={tiny_llama_adapter}",
        f"--output_dir={out}",
        "--overwrite=false",
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--overwrite" in result.stderr
    assert (out / "config.json").read_text() == '{"kept": true}'
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]
