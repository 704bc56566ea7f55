"""`--config=FILE` on every script, and every file in configs/ checked against what it is for.

A script config (YAML or JSON) names its command on its first line (`# python finetune.py
--config=configs/NAME ...`); the other files are read by a pass-through flag (--deepspeed,
--fsdp_config) and are checked as such.
"""

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import fire
import pytest

import finetune
from alpaca.core.cli import apply_config_file, load_config_file
from alpaca.finetune.resolve import (
    accepted_keys,
    parse_target_modules,
    resolve_config,
    settings_from_run_config,
)
from alpaca.finetune.settings import flag_defaults

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p for p in (REPO / "configs").iterdir() if p.suffix in (".yaml", ".yml", ".json"))
# files read by a TrainingArguments flag, not by --config
PASS_THROUGH = {"ds_zero3_offload.json": "deepspeed", "fsdp_full_shard.json": "fsdp_config"}
SCRIPTS = (
    "finetune.py",
    "generate.py",
    "generate_instruction.py",
    "evaluate.py",
    "weight_diff.py",
    "export_hf_checkpoint.py",
    "export_state_dict_checkpoint.py",
    "export_gguf.py",
)
COMMAND_LINE = re.compile(r"^#\s*(?:torchrun [^ ]+ )?(?:python )?(\S+\.py) --config=configs/(\S+)")


def run_script(*args, cwd=REPO, timeout=300):
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        timeout=timeout,
    )


def finetune_flags_from(argv: list[str]) -> tuple[dict, dict]:
    """What fire hands finetune.train for argv: (its own flags, the pass-through ones)."""
    parsed = {}
    fire.Fire(lambda **kw: parsed.update(kw), command=argv)
    flags = {k: v for k, v in parsed.items() if k in flag_defaults()}
    return flags, {k: v for k, v in parsed.items() if k not in flags}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_against_what_it_is_for(path, tiny_llama, monkeypatch):
    if path.name in PASS_THROUGH:
        data = json.loads(path.read_text())
        assert "zero_optimization" in data if PASS_THROUGH[path.name] == "deepspeed" else data
        assert f"configs/{path.name}" in (REPO / "configs" / "README.md").read_text()
        return
    first = path.read_text().splitlines()[0]
    match = COMMAND_LINE.match(first)
    assert match and match.group(2) == path.name, f"{path.name}: the first line must give its command"
    script = match.group(1)
    assert script in SCRIPTS
    settings = load_config_file(str(path))
    assert settings, path.name
    if script != "finetune.py":
        module = importlib.import_module(script[:-3])
        apply_config_file([f"--config={path}"], module.main)
        return
    # the file's values, with a local model standing in for the 7B hub model, resolve without a problem
    argv = apply_config_file(
        [f"--config={path}", f"--base_model={tiny_llama}"],
        finetune.train,
        known_keys=accepted_keys,
        read_config=settings_from_run_config,
    )
    flags, extra = finetune_flags_from(argv)
    config = resolve_config(flags, extra)
    for key, value in settings.items():
        if key in flag_defaults() and key != "base_model":
            expected = parse_target_modules(value) if key == "lora_target_modules" else value
            assert getattr(config, key) == expected, key


def test_every_script_takes_config_and_names_the_file_and_key_of_a_typo(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("# a typo\noutput_dirr: x\n")
    for script in SCRIPTS:
        command = [script, "recover" if script == "weight_diff.py" else ""]
        command += ["loss"] if script == "evaluate.py" else []
        result = run_script(*[word for word in command if word], f"--config={config}")
        assert result.returncode == 2, (script, result.stderr)
        assert f"{config}: 'output_dirr' is not a flag of this script" in result.stderr, (
            script,
            result.stderr,
        )
        assert "Traceback" not in result.stderr


def test_flags_on_the_command_line_win_over_the_file(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"lora_r": 4, "lora_alpha": 8, "learning_rate": 0.01, "optim": "sgd"}))
    argv = apply_config_file(
        ["--lora_r=32", f"--config={config}", "--nolearning_rate"],
        finetune.train,
        known_keys=accepted_keys,
    )
    assert argv == ["--lora_r=32", "--nolearning_rate", "--lora_alpha=8", "--optim='sgd'"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("lora_rr: 4\n")
    with pytest.raises(
        ValueError, match=r"bad.yaml: 'lora_rr' is not a flag of this script; did you mean lora_r\?"
    ):
        apply_config_file([f"--config={bad}"], finetune.train, known_keys=accepted_keys)
    listed = tmp_path / "list.yaml"
    listed.write_text("- lora_r\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        apply_config_file([f"--config={listed}"], finetune.train, known_keys=accepted_keys)


def test_a_saved_run_config_replays_its_run(tiny_llama, finetune_fast, sample_subset, tmp_path):
    """`finetune.py --config=OUT/run_config.json --output_dir=OUT2` trains the same run again: the
    same settings and the same losses (report keys such as data_report and sources are ignored)."""
    data = sample_subset(tmp_path / "d.json", 8)
    first = tmp_path / "first"
    finetune_fast(tiny_llama, data, first, max_steps=2, optim="adamw_torch", use_lora=False)
    second = tmp_path / "second"
    result = run_script("finetune.py", f"--config={first / 'run_config.json'}", f"--output_dir={second}")
    assert result.returncode == 0, result.stderr[-3000:]
    saved, replayed = (json.loads((out / "run_config.json").read_text()) for out in (first, second))
    for key in ("output_dir", "command", "sources"):
        saved.pop(key), replayed.pop(key)
    # the replay tokenized nothing: it read the examples the first run prepared
    assert replayed["data_report"].pop("cache_reused") is True
    saved["data_report"].pop("cache_reused")
    assert replayed == saved
    losses = [json.loads((out / "loss_history.json").read_text()) for out in (first, second)]
    assert [e["loss"] for e in losses[0] if "loss" in e] == [e["loss"] for e in losses[1] if "loss" in e]


def test_a_config_file_sets_the_values_of_another_script(tmp_path):
    """generate_instruction.py reads the file's values (an invalid one is reported as that flag), and
    the command line overrides them."""
    config = tmp_path / "si.yaml"
    config.write_text(f"num_instructions_to_generate: 0\noutput_dir: {tmp_path / 'out'}\n")
    result = run_script("generate_instruction.py", f"--config={config}")
    assert result.returncode == 2 and "--num_instructions_to_generate must be at least 1" in result.stderr
    result = run_script("generate_instruction.py", f"--config={config}", "--request_batch_size=0")
    assert "--request_batch_size must be at least 1" in result.stderr
    result = run_script(
        "generate_instruction.py", f"--config={config}", "--num_instructions_to_generate=3", "--max_tokens=1"
    )
    assert "--num_instructions_to_generate" not in result.stderr and "--max_tokens must be" in result.stderr
