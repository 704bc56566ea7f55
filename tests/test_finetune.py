import json
from pathlib import Path

import pytest
import torch
from helpers.finetune_runs import logged_losses, run_finetune_fast

from alpaca.finetune.data import IGNORE_INDEX

run = run_finetune_fast


def base_and_adapted_logits(base, adapter, text="### Instruction:\nName a color.\n\n### Response:\n"):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter)
    ids = tokenizer(text, return_tensors="pt")
    model = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        before = model(**ids).logits
        adapted = PeftModel.from_pretrained(model, adapter)
        after = adapted(**ids).logits
    return before, after


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_lora_run_learns_and_saves_a_real_adapter(arch, tiny_llama, tiny_opt, small_data, tmp_path):
    base = tiny_llama if arch == "llama" else tiny_opt
    out = tmp_path / "lora"
    metrics = run(base, small_data, out, val_set_size=8, eval_steps=5, save_steps=5, max_steps=10)
    assert metrics["global_step"] == 10
    losses = [loss for _, loss in logged_losses(out)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05, losses

    weights = out / "adapter_model.safetensors"
    assert weights.stat().st_size > 4096  # upstream's patched state_dict wrote 443 bytes
    from safetensors.torch import load_file

    tensors = load_file(str(weights))
    assert any("lora_B" in k for k in tensors) and any("lora_A" in k for k in tensors)
    assert all(tensors[k].abs().sum() > 0 for k in tensors if "lora_B" in k)  # B starts at zero: trained
    assert (out / "tokenizer_config.json").is_file() and (out / "adapter_config.json").is_file()

    before, after = base_and_adapted_logits(base, str(out))
    assert (before - after).abs().max() > 1e-3

    config = json.loads((out / "run_config.json").read_text())
    assert config["base_model"] == base and config["use_lora"] is True
    assert config["lora_target_modules"] == ["q_proj", "v_proj"]
    assert config["sources"]["val_set_size"] == "flag"
    assert config["sources"]["lr_scheduler_type"] == "default (Alpaca-LoRA)"
    assert config["data_report"]["records"] == 32
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "loss_history.json").read_text())
    assert any("eval_loss" in e for e in history)

    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(str(out))
    assert saved.pad_token_id is not None and saved.pad_token_id != saved.eos_token_id


def test_resume_from_trainer_checkpoint_continues_at_the_saved_step(tiny_llama, small_data, tmp_path):
    # A constant schedule, so the interrupted run's first steps match the uninterrupted run's.
    full = tmp_path / "full"
    run(tiny_llama, small_data, full, max_steps=6, save_steps=3, lr_scheduler_type="constant")
    part = tmp_path / "part"
    run(tiny_llama, small_data, part, max_steps=3, save_steps=3, lr_scheduler_type="constant")
    assert (part / "checkpoint-3" / "trainer_state.json").is_file()
    metrics = run(
        tiny_llama,
        small_data,
        part,
        max_steps=6,
        save_steps=3,
        lr_scheduler_type="constant",
        resume_from_checkpoint=str(part / "checkpoint-3"),
    )
    assert metrics["global_step"] == 6
    resumed_steps = [step for step, _ in logged_losses(part)]
    assert resumed_steps[-3:] == [4, 5, 6]
    # optimizer, scheduler, RNG and data order restored: same weights as the uninterrupted run
    from safetensors.torch import load_file

    a = load_file(str(full / "adapter_model.safetensors"))
    b = load_file(str(part / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_resume_from_final_adapter_loads_weights_and_restarts(tiny_llama, small_data, tmp_path, capsys, fmt):
    first = tmp_path / "first"
    run(tiny_llama, small_data, first, max_steps=3)
    if fmt == "bin":
        from safetensors.torch import load_file

        state = load_file(str(first / "adapter_model.safetensors"))
        torch.save(state, first / "adapter_model.bin")
        (first / "adapter_model.safetensors").unlink()
    capsys.readouterr()
    second = tmp_path / "second"
    metrics = run(
        tiny_llama, small_data, second, max_steps=1, learning_rate=1e-12, resume_from_checkpoint=str(first)
    )
    assert "schedule restarts" in capsys.readouterr().out
    assert metrics["global_step"] == 1
    # with a negligible learning rate the saved adapter equals the one it started from
    from safetensors.torch import load_file

    start = load_file(str(second / "adapter_model.safetensors"))
    if fmt == "bin":
        previous = torch.load(first / "adapter_model.bin", weights_only=True)
    else:
        previous = load_file(str(first / "adapter_model.safetensors"))
    for key, value in previous.items():
        torch.testing.assert_close(start[key], value, rtol=0, atol=1e-6)


def test_train_on_inputs_false_reaches_the_pipeline(tiny_llama, small_data, tmp_path):
    from alpaca.core.prompter import Prompter
    from alpaca.finetune.data import load_records, tokenize_example
    from alpaca.modeling import load_tokenizer

    out = tmp_path / "masked"
    run(tiny_llama, small_data, out, max_steps=1, train_on_inputs=False)
    report = json.loads((out / "run_config.json").read_text())["data_report"]
    tokenizer, prompter = load_tokenizer(tiny_llama), Prompter("alpaca")
    examples = [tokenize_example(r, tokenizer, prompter, 128, False) for r in load_records(small_data)]
    expected = sum(
        sum(t != IGNORE_INDEX for t in ex["labels"]) for ex in examples if ex["status"] != "skipped"
    )
    assert report["trained_tokens"] == expected
    assert expected < sum(len(ex["input_ids"]) for ex in examples if ex["status"] != "skipped")


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_quantized_lora_trains_on_cpu(bits, tiny_llama, small_data, tmp_path):
    out = tmp_path / bits
    flags = {"load_in_8bit": True} if bits == "8bit" else {"load_in_4bit": True}
    metrics = run(tiny_llama, small_data, out, max_steps=4, **flags)
    assert metrics["global_step"] == 4
    from safetensors.torch import load_file

    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert all(tensors[k].abs().sum() > 0 for k in tensors if "lora_B" in k)
    before, after = base_and_adapted_logits(tiny_llama, str(out))
    assert (before - after).abs().max() > 1e-4


def test_all_linear_targets(tiny_llama, small_data, tmp_path):
    out = tmp_path / "all"
    run(tiny_llama, small_data, out, max_steps=1, lora_target_modules="all-linear")
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert {name.rsplit(".", 1)[-1] for name in adapter_config["target_modules"]} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }


def test_unknown_target_module_lists_the_models_linear_modules(tiny_opt, small_data, tmp_path):
    with pytest.raises(ValueError) as err:
        run(tiny_opt, small_data, tmp_path / "x", lora_target_modules=["q_proj", "gate_proj"])
    message = str(err.value)
    assert "gate_proj" in message and "fc1" in message and "out_proj" in message


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(micro_batch_size=16, batch_size=8), "--micro_batch_size=16 is larger than --batch_size=8"),
        (dict(prompt_template_name="nope"), "unknown prompt template 'nope'"),
        (dict(base_model=""), "--base_model is required"),
        (dict(base_model="./no/such/model"), "no such folder"),
        (dict(load_in_8bit=True, load_in_4bit=True), "exclusive"),
        (dict(use_lora=False, load_in_4bit=True), "LoRA only"),
        (dict(num_epochs=0, max_steps=-1), "--num_epochs=0: passes over the data must be > 0"),
        (dict(num_epochs=-2, max_steps=-1), "--num_epochs=-2"),
        (dict(val_set_size=-3), "--val_set_size=-3: examples held out (0 disables validation) must be >= 0"),
        (dict(lora_r=0), "--lora_r=0: the LoRA rank must be >= 1"),
        (dict(learning_rate=-1e-4), "--learning_rate=-0.0001: the peak learning rate must be > 0"),
        (dict(cutoff_len=0), "--cutoff_len=0"),
        (dict(warmup_steps=-5), "--warmup_steps=-5"),
        (dict(lora_dropout=1.0), "--lora_dropout=1.0: a dropout probability must be below 1"),
        (dict(max_steps=0), "--max_steps=0: give a positive number"),
        (dict(save_steps=0), "--save_steps=0"),
        (dict(num_epochs="three"), "--num_epochs='three': passes over the data must be a number"),
        (dict(overwrite=True, resume_from_checkpoint="latest"), "--overwrite clears --output_dir"),
    ],
)
def test_bad_flags_fail_before_training(overrides, message, tiny_llama, small_data, tmp_path):
    with pytest.raises(
        ValueError,
        match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)"),
    ):
        run(tiny_llama, small_data, tmp_path / "x", **overrides)
    assert not (tmp_path / "x").exists()  # refused before the model loaded (run_config.json comes after)


def test_several_bad_flags_are_reported_together(tiny_llama, small_data, tmp_path):
    with pytest.raises(ValueError) as err:
        run(tiny_llama, small_data, tmp_path / "x", num_epochs=0, max_steps=-1, val_set_size=-3, lora_r=0)
    assert all(flag in str(err.value) for flag in ("--num_epochs=0", "--val_set_size=-3", "--lora_r=0"))


def test_output_dir_that_is_a_file_fails_before_loading(tiny_llama, small_data, tmp_path):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    with pytest.raises(ValueError, match="notes.txt' is a file; give a folder"):
        run(tiny_llama, small_data, target)
    assert target.read_text() == "keep me"


def broken_model_copy(tiny_llama, tmp_path, damage):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_llama, folder)
    damage(folder)
    return str(folder)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: (f / "model.safetensors").unlink(), "has config.json but no weights"),
        (
            lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
            r"model.safetensors is truncated \(5000 of \d+ bytes\)",
        ),
        (
            lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64),
            "model.safetensors is not a safetensors file",
        ),
        (
            lambda f: (f / "config.json").write_text('{"model_type": "llama", '),
            "config.json is not valid JSON",
        ),
        (lambda f: (f / "config.json").write_text("[1, 2]"), "config.json must be a JSON object"),
    ],
)
def test_broken_base_model_folder_is_named_before_loading(tiny_llama, small_data, tmp_path, damage, message):
    base = broken_model_copy(tiny_llama, tmp_path, damage)
    with pytest.raises(ValueError, match=message):
        run(base, small_data, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_output_dir_of_another_run_is_refused_then_overwritten(tiny_llama, small_data, tmp_path):
    out = tmp_path / "out"
    run(tiny_llama, small_data, out, max_steps=2, save_steps=2)
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    before = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds another run's files .* pass --overwrite"):
        run(tiny_llama, small_data, out, max_steps=1, seed=8)
    assert (out / "adapter_model.safetensors").read_bytes() == before  # run A untouched
    run(tiny_llama, small_data, out, max_steps=1, seed=8, save_steps=1, overwrite=True)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]  # nothing of run A left
    assert json.loads((out / "run_config.json").read_text())["seed"] == 8


def test_resume_refuses_a_checkpoint_of_a_different_run(tiny_llama, small_data, tmp_path):
    out = tmp_path / "out"
    run(tiny_llama, small_data, out, max_steps=2, save_steps=2, lr_scheduler_type="constant")
    with pytest.raises(ValueError, match=r"belongs to another run .*learning_rate: 0.01 -> 0.02"):
        run(tiny_llama, small_data, out, max_steps=4, learning_rate=2e-2, resume_from_checkpoint="latest")
    other = Path(small_data).parent / "other.json"
    other.write_text(json.dumps(json.loads(Path(small_data).read_text())[:20]))
    with pytest.raises(ValueError, match="belongs to another run .*data_sha256"):
        run(tiny_llama, str(other), out, max_steps=4, resume_from_checkpoint="latest")
    # the run's own run_config.json does not block it: same settings resume, a longer run is allowed
    metrics = run(
        tiny_llama,
        small_data,
        out,
        max_steps=4,
        save_steps=2,
        lr_scheduler_type="constant",
        resume_from_checkpoint="latest",
    )
    assert metrics["global_step"] == 4


def test_secrets_are_masked_in_output_and_run_config(tiny_llama, small_data, tmp_path, capsys, monkeypatch):
    import sys

    from alpaca.finetune.report import mask_command_line

    secret = "hf_SECRETvalue123"
    monkeypatch.setattr(sys, "argv", ["finetune.py", f"--hub_token={secret}", "--wandb_api_key", secret])
    out = tmp_path / "out"
    run(tiny_llama, small_data, out, max_steps=1, hub_token=secret)
    saved = (out / "run_config.json").read_text()
    printed = capsys.readouterr().out
    assert secret not in saved and secret not in printed
    config = json.loads(saved)
    assert config["extra_training_args"]["hub_token"] == "***"
    assert config["command"] == "finetune.py --hub_token=*** --wandb_api_key ***"
    assert config["data_report"]["trained_tokens"] > 0  # 'tokens' is not a secret
    assert (
        mask_command_line(["x", "--max_new_tokens=5", "--api-key=k"]) == "x --max_new_tokens=5 --api-key=***"
    )


def test_warmup_longer_than_the_run_is_reported_with_the_peak_rate(tiny_llama, small_data, tmp_path, capsys):
    out = tmp_path / "out"
    run(tiny_llama, small_data, out, max_steps=4, warmup_steps=None)  # the LoRA default, 100 steps
    printed = capsys.readouterr().out
    assert "the warmup (100 steps) is not shorter than the run (4 optimizer steps)" in printed
    # the optimizer steps use lr x 0/100, 1/100, 2/100, 3/100
    assert "peaks at 0.0003 (3% of --learning_rate=0.01)" in printed
    config = json.loads((out / "run_config.json").read_text())
    assert config["warmup_steps_resolved"] == 100 and config["optimizer_steps"] == 4


def test_warmup_ratio_with_lora_and_epoch_based_step_count(tiny_llama, small_data, tmp_path, capsys):
    out = tmp_path / "out"
    # 32 examples, micro-batch 4, accumulation 2: 4 optimizer steps per epoch; 1.5 epochs -> 6 steps
    metrics = run(
        tiny_llama, small_data, out, max_steps=-1, num_epochs=1.5, warmup_steps=None, warmup_ratio=0.5
    )
    config = json.loads((out / "run_config.json").read_text())
    assert config["optimizer_steps"] == metrics["global_step"] == 6
    assert config["warmup_steps"] == 0.5 and config["warmup_steps_resolved"] == 3
    assert config["sources"]["warmup_steps"] == "flag --warmup_ratio"
    assert "not shorter than the run" not in capsys.readouterr().out
    rates = [
        e["learning_rate"]
        for e in json.loads((out / "loss_history.json").read_text())
        if "learning_rate" in e
    ]
    # the rate each of the 6 steps used: 3 warmup steps from 0, then linear decay
    assert rates == pytest.approx([1e-2 * f for f in (0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3)])


@pytest.mark.parametrize(
    "content, message",
    [("", "is empty"), ("nope", "not valid JSON"), ('[{"output": "x"}]', "record 0 has no 'instruction'")],
)
def test_bad_data_fails_before_training(content, message, tiny_llama, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        run(tiny_llama, str(path), tmp_path / "x")


def test_command_line_help_and_errors(tmp_path):
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent
    help_run = subprocess.run(
        [sys.executable, "finetune.py", "--help"], cwd=repo, capture_output=True, text=True, timeout=120
    )
    page = help_run.stdout + help_run.stderr
    for flag in (
        "--base_model",
        "--micro_batch_size",
        "--lora_target_modules",
        "--load_in_4bit",
        "--packing",
    ):
        assert flag in page
    assert "Every complete example ends with EOS" in page  # docstrings become the help text
    bad = subprocess.run(
        [sys.executable, "finetune.py", "--base_model=./no/such/model"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0
    assert "finetune.py: error:" in bad.stderr and "no such folder" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_gguf_base_model_is_converted_once_and_recorded(
    tiny_llama, tiny_llama_adapter, small_data, tmp_path, monkeypatch
):
    import hashlib

    from alpaca.weights.export import export_gguf

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    gguf_file = tmp_path / "tiny.gguf"
    export_gguf(tiny_llama, tiny_llama_adapter, str(gguf_file), outtype="f32")
    out = tmp_path / "out"
    metrics = run(str(gguf_file), small_data, out, max_steps=2)
    assert metrics["global_step"] == 2
    config = json.loads((out / "run_config.json").read_text())
    folder = Path(config["base_model"])
    assert folder.parent == tmp_path / "cache" / "alpaca-kit" / "gguf" and (folder / "config.json").is_file()
    assert config["base_model_file"] == str(gguf_file)
    assert config["base_model_gguf"]["sha256"] == hashlib.sha256(gguf_file.read_bytes()).hexdigest()
    before, after = base_and_adapted_logits(str(folder), str(out))
    assert (before - after).abs().max() > 1e-4
