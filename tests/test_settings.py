"""One source of truth for the settings: every command's signature, its --help and its settings table
agree; per-mode defaults; a mistyped flag fails before loading."""

import dataclasses
import importlib.util
import inspect
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest

import finetune
from alpaca.core import settings
from alpaca.finetune.resolve import resolve_config
from alpaca.finetune.settings import FinetuneConfig, flag_defaults, flag_fields, mode_defaults
from alpaca.selfinstruct.settings import SelfInstructConfig

REPO = Path(__file__).resolve().parent.parent


def script_help(script: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO / script), "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PAGER": "cat", "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return " ".join((result.stdout + result.stderr).split())  # fire wraps lines: compare word by word


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"settings_{name.removesuffix('.py')}", REPO / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# every command a user runs, and the table its flags come from
COMMANDS = [
    ("finetune.py", "train", "alpaca.finetune.settings:FinetuneConfig"),
    ("generate.py", "main", "alpaca.inference.settings:GenerateConfig"),
    (
        "generate_instruction.py",
        "generate_instruction_following_data",
        "alpaca.selfinstruct.settings:SelfInstructConfig",
    ),
    ("export_hf_checkpoint.py", "main", "alpaca.weights.settings:ExportHFConfig"),
    ("export_state_dict_checkpoint.py", "main", "alpaca.weights.settings:ExportMetaConfig"),
    ("export_gguf.py", "main", "alpaca.weights.settings:ExportGGUFConfig"),
    ("weight_diff.py", "make_diff", "alpaca.weights.settings:MakeDiffConfig"),
    ("weight_diff.py", "recover", "alpaca.weights.settings:RecoverConfig"),
    ("weight_diff.py", "verify", "alpaca.weights.settings:VerifyConfig"),
    ("evaluate.py", "pairwise", "alpaca.evaluation.settings:PairwiseConfig"),
    ("evaluate.py", "loss", "alpaca.evaluation.settings:LossConfig"),
    ("evaluate.py", "exact_match", "alpaca.evaluation.settings:ExactMatchConfig"),
    ("evaluate.py", "leaderboard", "alpaca.evaluation.settings:LeaderboardConfig"),
]


def command_and_table(script: str, name: str, table: str):
    module_name, class_name = table.split(":")
    import importlib

    return getattr(load_script(script), name), getattr(importlib.import_module(module_name), class_name)


@pytest.mark.parametrize("script,name,table", COMMANDS, ids=[f"{c[0]}:{c[1]}" for c in COMMANDS])
def test_every_command_signature_and_help_are_its_table(script, name, table):
    """The names, order, defaults and declared types fire sees are the table's, and the help fire
    prints for the command shows every flag with its table help line."""
    from fire import helptext, trace

    function, config_class = command_and_table(script, name, table)
    parameters = {
        p.name: p for p in inspect.signature(function).parameters.values() if p.kind is not p.VAR_KEYWORD
    }
    fields = settings.flag_fields(config_class)
    assert list(parameters) == [f.name for f in fields], "same flags, same order"
    hints, table_hints = typing.get_type_hints(function), typing.get_type_hints(config_class)
    for spec in fields:
        parameter = parameters[spec.name]
        if parameter.kind is parameter.VAR_POSITIONAL:
            assert spec.metadata["variadic"], spec.name
        else:
            expected = inspect.Parameter.empty if spec.default is settings.REQUIRED else spec.default
            assert parameter.default == expected, spec.name
        declared = spec.metadata.get("flag_type") or table_hints[spec.name]
        assert hints[spec.name] in (declared, declared | None), spec.name  # real types for cli.typed_flags
        assert spec.metadata.get("help", "").strip(), f"{spec.name} has no help line"
    text = " ".join(helptext.HelpText(function, trace.FireTrace(function, name=name)).split())
    for spec in fields:
        assert f"--{spec.name}" in text or spec.name.upper() in text, spec.name
        assert " ".join(spec.metadata["help"].split()) in text, spec.name
    assert "COMMAND" not in text, "no attribute of the entry shows up as a subcommand"


def test_a_command_body_receives_its_table_filled_from_the_flags():
    received = []

    @dataclasses.dataclass
    class Table:
        path: str = settings.setting(settings.REQUIRED, "a path.")
        rest: tuple = settings.setting((), "more paths.", variadic=True, flag_type=str)
        steps: int = settings.setting(3, "steps.")
        name: str = settings.setting(None, "a name.")

    @settings.flags_from(Table, extra="more")
    def command(config: Table, **more) -> None:
        """Do it."""
        received.append((config, more))

    signature = inspect.signature(command)
    assert [(p.name, p.kind.name) for p in signature.parameters.values()] == [
        ("path", "POSITIONAL_OR_KEYWORD"),
        ("rest", "VAR_POSITIONAL"),
        ("steps", "KEYWORD_ONLY"),
        ("name", "KEYWORD_ONLY"),
        ("more", "VAR_KEYWORD"),
    ]
    assert typing.get_type_hints(command)["name"] == str | None  # a None default takes None
    command("a", "b", "c", steps=5, optim="sgd")
    assert received == [(Table(path="a", rest=("b", "c"), steps=5), {"optim": "sgd"})]
    assert "Do it." in command.__doc__ and "steps: steps." in command.__doc__


def test_finetune_signature_is_the_settings_table():
    parameters = inspect.signature(finetune.train).parameters
    flags = {name: p.default for name, p in parameters.items() if p.kind is not p.VAR_KEYWORD}
    assert list(flags) == list(flag_defaults()), "same flags, same order"
    assert flags == flag_defaults()
    # the derived fields are not flags
    derived = {f.name for f in dataclasses.fields(FinetuneConfig)} - set(flags)
    assert derived == {"gradient_accumulation_steps", "world_size", "extra_training_args", "sources"}


def test_finetune_help_shows_every_setting_help_line():
    text = script_help("finetune.py")
    for spec in flag_fields():
        assert f"--{spec.name}" in text, spec.name
        assert " ".join(spec.metadata["help"].split()) in text, spec.name


def test_mode_dependent_defaults_come_from_one_table():
    lora, full = mode_defaults(True), mode_defaults(False)
    assert set(lora) == set(full)
    assert lora["learning_rate"] == 3e-4 and full["learning_rate"] == 2e-5
    assert lora["prompt_template_name"] == "alpaca" and full["prompt_template_name"] == "alpaca_legacy"
    # each mode-dependent flag shows None in the signature: "the mode decides"
    assert all(flag_defaults()[name] is None for name in lora)


def test_full_fine_tuning_defaults_to_stanfords_exact_prompt(tiny_llama):
    base = {"base_model": tiny_llama, "data_path": "d.json", "output_dir": "o", "batch_size": 8}
    full = resolve_config(dict(base, use_lora=False), {})
    assert full.prompt_template_name == "alpaca_legacy"
    assert full.sources["prompt_template_name"] == "default (Stanford Alpaca recipe)"
    lora = resolve_config(base, {})
    assert lora.prompt_template_name == "alpaca"
    assert lora.sources["prompt_template_name"] == "default (Alpaca-LoRA)"
    chosen = resolve_config(dict(base, use_lora=False, prompt_template_name="alpaca"), {})
    assert chosen.prompt_template_name == "alpaca" and chosen.sources["prompt_template_name"] == "flag"


def test_resolved_values_take_the_table_defaults_and_types(tiny_llama):
    config = resolve_config({"base_model": tiny_llama}, {})
    for name, default in flag_defaults().items():
        if default is None or name in ("lora_target_modules", "base_model"):
            continue
        assert getattr(config, name) == default, name
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.report_to == ["none"]
    assert isinstance(config.warmup_steps, float) and isinstance(config.num_epochs, float)
    assert config.micro_batch_size == 4 and config.gradient_accumulation_steps == 32


def test_a_mistyped_flag_fails_before_the_model_loads(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "finetune.py", f"--base_model={tiny_llama}", "--data_path=x.json"]
        + [f"--output_dir={out}", "--lora_rr=16", "--lerning_rate=1e-4"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("finetune.py: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--lora_rr is not a flag of finetune.py nor a transformers TrainingArguments field" in errors[0]
    assert "did you mean --lora_r?" in errors[0]
    assert "--lerning_rate" in errors[0] and "did you mean --learning_rate?" in errors[0]
    assert not out.exists()


def test_pass_through_training_arguments_and_mapped_names_are_accepted(tiny_llama):
    extra = {"optim": "adamw_torch", "tf32": False, "evaluation_strategy": "no", "warmup_ratio": 0.1}
    config = resolve_config({"base_model": tiny_llama}, extra)
    assert config.extra_training_args == {"optim": "adamw_torch", "tf32": False, "eval_strategy": "no"}
    assert config.warmup_steps == 0.1


def test_generate_instruction_docs_table_lists_the_table_defaults():
    """docs/generate_instruction.md's flag tables: every setting is listed, and each default written as a
    value (not "none", "random", "built-in") is the table's."""
    import re

    defaults = settings.flag_defaults(SelfInstructConfig)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "generate_instruction.md").read_text()
    listed = {}
    for line in doc.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        names = re.findall(r"`(\w+)`", cells[0]) if len(cells) >= 3 else []
        if names and all(name in defaults for name in names):
            values = [v.strip().strip("`") for v in cells[1].split(",")]
            listed.update(zip(names, values if len(values) == len(names) else [cells[1]] * len(names)))
    assert sorted(listed) == sorted(defaults), "every setting has a row"
    for name, written in listed.items():
        default = defaults[name]
        if default is None or written in ("none", "random (saved)", "built-in", "none (OpenAI)"):
            assert default is None, f"{name}: the docs say {written!r}, the table {default!r}"
        elif isinstance(default, bool):
            assert written == str(default), name
        elif isinstance(default, (int, float)):
            assert float(written) == default, f"{name}: the docs say {written}, the table {default}"
        else:
            assert written == default, f"{name}: the docs say {written!r}, the table {default!r}"


def test_run_config_replays_the_settings(tiny_llama, tmp_path):
    """`finetune.py --config=OUT/run_config.json` resolves to the run's own settings (report keys
    ignored, pass-through flags restored), and a flag on the command line wins."""
    from alpaca.core.cli import apply_config_file
    from alpaca.finetune.resolve import accepted_keys, settings_from_run_config

    saved = resolve_config(
        {"base_model": tiny_llama, "data_path": "d.json", "output_dir": str(tmp_path / "a")},
        {"optim": "sgd", "per_device_train_batch_size": 2},
    ).to_dict()
    masked = dict(saved, extra_training_args={**saved["extra_training_args"], "hub_token": "***"})
    assert "hub_token" not in settings_from_run_config(masked)
    saved.update(command="python finetune.py ...", data_report={"train_examples": 3}, optimizer_steps=1)
    path = tmp_path / "run_config.json"
    path.write_text(json.dumps(saved))
    argv = apply_config_file(
        [f"--config={path}", "--output_dir=elsewhere"],
        finetune.train,
        known_keys=accepted_keys,
        read_config=settings_from_run_config,
    )
    assert "--output_dir=elsewhere" in argv and f"--output_dir={str(tmp_path / 'a')!r}" not in argv
    parsed = {}
    import fire

    fire.Fire(lambda **kw: parsed.update(kw), command=argv)
    flags = {k: v for k, v in parsed.items() if k in flag_defaults()}
    extra = {k: v for k, v in parsed.items() if k not in flag_defaults()}
    replayed = resolve_config(flags, extra).to_dict()
    for key in ("output_dir", "sources", "command", "data_report", "optimizer_steps"):
        saved.pop(key, None), replayed.pop(key, None)
    assert replayed == saved
