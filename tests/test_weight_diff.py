"""Weight diffs on the tiny LLaMA: Stanford's arithmetic, per-tensor hashes, tampering caught and named."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from alpaca.weights import ALPACA_7B_SUM, INTEGRITY_FILE, make_diff, recover, tensor_sha256

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tuned(tiny_llama, tmp_path_factory):
    """A 'fine-tuned' tiny LLaMA as Stanford's training leaves it: `[PAD]` added, every weight moved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca.modeling import resize_embeddings_for_new_tokens

    out = tmp_path_factory.mktemp("tuned") / "tuned"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    resize_embeddings_for_new_tokens(model, tokenizer, tokenizer.add_special_tokens({"pad_token": "[PAD]"}))
    torch.manual_seed(7)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def diff(tiny_llama, tuned, tmp_path_factory):
    out = tmp_path_factory.mktemp("diff") / "diff"
    record = make_diff(tiny_llama, tuned, str(out))
    return out, record


def load_state(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()


def test_diff_is_tuned_minus_mean_padded_raw(diff, tiny_llama, tuned):
    import torch

    out, record = diff
    raw, tuned_state, diff_state = load_state(tiny_llama), load_state(tuned), load_state(out)
    pad_id = tuned_state["model.embed_tokens.weight"].shape[0] - 1
    assert raw["model.embed_tokens.weight"].shape[0] == pad_id  # raw has no [PAD]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        mean_row = raw[key].mean(dim=0)
        padded = torch.cat([raw[key], mean_row[None]])
        assert torch.equal(diff_state[key], tuned_state[key] - padded), key
    for key in ("model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
        assert torch.equal(diff_state[key], tuned_state[key] - raw[key]), key
    assert sorted(record["tensors"]) == sorted(diff_state)
    assert json.loads((out / INTEGRITY_FILE).read_text()) == record
    assert (out / "tokenizer.json").is_file()


def test_recover_rebuilds_the_tuned_weights_and_the_recorded_hashes(
    diff, tiny_llama, tuned, tmp_path, capsys
):
    import torch
    from transformers import AutoTokenizer

    out, record = diff
    target = tmp_path / "recovered"
    model, tokenizer = recover(tiny_llama, str(out), str(target), test_inference=True)
    printed = capsys.readouterr().out
    assert f"all {len(record['tensors'])} recovered tensors match their recorded SHA-256" in printed
    assert "naive integrity check passed" in printed and "### Response:" in printed
    recovered, tuned_state = load_state(target), load_state(tuned)
    assert sorted(recovered) == sorted(tuned_state)
    for key, tensor in tuned_state.items():
        assert torch.allclose(recovered[key], tensor, rtol=0, atol=1e-6), key  # fp32 rounding of (t - r) + r
        assert tensor_sha256(recovered[key]) == record["tensors"][key]["sha256"], key
    assert AutoTokenizer.from_pretrained(target).pad_token == "[PAD]"
    assert len(tokenizer) == tuned_state["model.embed_tokens.weight"].shape[0]


def test_a_tampered_diff_is_caught_and_named(diff, tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    tampered = tmp_path / "tampered"
    shutil.copytree(diff[0], tampered)
    weights = load_file(tampered / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][3, 5] += 1e-3
    save_file(weights, tampered / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"recovered tensor model\.layers\.1\.mlp\.up_proj\.weight does not match"
    ):
        recover(tiny_llama, str(tampered), test_inference=False)
    # upstream's naive sum alone catches it too, when hashes are not there to do it
    (tampered / INTEGRITY_FILE).unlink()
    with pytest.raises(ValueError, match="naive integrity check failed.*Alpaca-7B"):
        recover(tiny_llama, str(tampered), test_inference=False)


def test_recover_against_the_wrong_raw_model_names_the_first_tensor(diff, tuned, tmp_path):
    # the tuned model as "raw": same shapes, wrong values; the first tensor in order is the embedding
    with pytest.raises(ValueError, match=r"recovered tensor model\.embed_tokens\.weight does not match"):
        recover(tuned, str(diff[0]), test_inference=False)


def test_naive_check_against_the_recorded_sum_and_the_7b_constant(diff, tiny_llama, tmp_path, capsys):
    legacy = tmp_path / "legacy"
    shutil.copytree(diff[0], legacy)
    (legacy / INTEGRITY_FILE).unlink()  # what a diff made by upstream looks like
    with pytest.raises(ValueError, match=f"not the {ALPACA_7B_SUM:.4f} of Alpaca-7B"):
        recover(tiny_llama, str(legacy), test_inference=False)
    recover(tiny_llama, str(legacy), test_inference=False, check_integrity_naively=False)
    assert "per-tensor hashes not checked" in capsys.readouterr().out
    recover(tiny_llama, str(diff[0]), test_inference=False, check_integrity_naively=True)
    assert f"sum of all parameters {diff[1]['sum']:.4f}" in capsys.readouterr().out


def test_bad_inputs(diff, tiny_llama, tiny_opt, tuned, tmp_path):
    with pytest.raises(ValueError, match="--path_raw=.*no such folder"):
        make_diff(str(tmp_path / "missing"), tuned, str(tmp_path / "d1"))
    with pytest.raises(ValueError, match="--path_diff=.*no such folder"):
        recover(tiny_llama, str(tmp_path / "missing"), test_inference=False)
    with pytest.raises(ValueError, match="--path_raw and --path_tuned hold different tensors"):
        make_diff(tiny_opt, tuned, str(tmp_path / "d2"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="--path_diff=.*--overwrite"):
        make_diff(tiny_llama, tuned, str(occupied))
    with pytest.raises(ValueError, match="--path_tuned=.*--overwrite"):
        recover(tiny_llama, str(diff[0]), str(occupied), test_inference=False)
    assert (occupied / "keep.txt").read_text() == "mine"


def test_script_imports_neither_training_nor_openai():
    probe = (
        "import sys, weight_diff; heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('openai', 'torch', 'transformers', 'finetune', 'train') or m == 'alpaca.training']; print(heavy)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stderr
    help_text = subprocess.run(
        [sys.executable, "weight_diff.py", "recover", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    shown = (help_text.stdout + help_text.stderr).lower()  # required ones are listed as PATH_RAW, ...
    assert "type: bool" in shown
    for flag in (
        "--path_raw",
        "--path_diff",
        "--path_tuned",
        "--device",
        "--test_inference",
        "--check_integrity_naively",
    ):
        assert flag.lstrip("-") in shown, flag
    verify_help = subprocess.run(
        [sys.executable, "weight_diff.py", "verify", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    shown = (verify_help.stdout + verify_help.stderr).lower()
    assert verify_help.returncode == 0 and "path_tuned" in shown and "integrity_file" in shown
    source = (REPO / "alpaca" / "weights.py").read_text() + (REPO / "weight_diff.py").read_text()
    assert "openai" not in source.replace("OpenAI client", "") and "alpaca.training" not in source


def snapshot(path) -> dict:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def test_a_failed_overwrite_keeps_the_previous_output(diff, tiny_llama, tiny_opt, tuned, tmp_path):
    """recover with a tampered diff and make_diff against the wrong raw model, both with --overwrite:
    errors, and the earlier good output is left exactly as it was (no temporary sibling either)."""
    from safetensors.torch import load_file, save_file

    recovered = tmp_path / "out" / "recovered"
    recover(tiny_llama, str(diff[0]), str(recovered), test_inference=False)
    before = snapshot(recovered)
    tampered = tmp_path / "tampered"
    shutil.copytree(diff[0], tampered)
    weights = load_file(tampered / "model.safetensors")
    weights["model.norm.weight"][0] += 1.0
    save_file(weights, tampered / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"recovered tensor model\.norm\.weight does not match"):
        recover(tiny_llama, str(tampered), str(recovered), test_inference=False, overwrite=True)
    assert snapshot(recovered) == before
    assert [p.name for p in recovered.parent.iterdir()] == ["recovered"]

    old_diff = tmp_path / "diffs" / "diff"
    shutil.copytree(diff[0], old_diff)
    before = snapshot(old_diff)
    with pytest.raises(ValueError, match="hold different tensors"):
        make_diff(tiny_opt, tuned, str(old_diff), overwrite=True)
    assert snapshot(old_diff) == before
    assert [p.name for p in old_diff.parent.iterdir()] == ["diff"]


def test_damaged_diff_files_are_named(diff, tiny_llama, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(diff[0], damaged)
    (damaged / INTEGRITY_FILE).write_text('{"format": "alpaca-kit weight diff integrity v1", "tensors": {')
    with pytest.raises(ValueError, match=f"--path_diff: .*{INTEGRITY_FILE} is not valid JSON"):
        recover(tiny_llama, str(damaged), test_inference=False)
    (damaged / INTEGRITY_FILE).write_text('{"format": "alpaca-kit weight diff integrity v1", "tensors": [1]}')
    with pytest.raises(ValueError, match="lacks a per-tensor 'sha256' table"):
        recover(tiny_llama, str(damaged), test_inference=False)
    shutil.copy(diff[0] / INTEGRITY_FILE, damaged / INTEGRITY_FILE)
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(ValueError, match=r"--path_diff=.*model\.safetensors is truncated"):
        recover(tiny_llama, str(damaged), test_inference=False)


def test_recover_keeps_the_hashes_and_verify_checks_them(diff, tiny_llama, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from alpaca.weights import verify

    recovered = tmp_path / "recovered"
    recover(tiny_llama, str(diff[0]), str(recovered), test_inference=False)
    assert json.loads((recovered / INTEGRITY_FILE).read_text()) == diff[1]
    assert verify(str(recovered)) == len(diff[1]["tensors"])
    assert "verified: all" in capsys.readouterr().out
    weights = load_file(recovered / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][1, 2] += 1e-4
    save_file(weights, recovered / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"tensor model\.layers\.0\.mlp\.down_proj\.weight of .* does not match"
    ):
        verify(str(recovered))
    (recovered / INTEGRITY_FILE).unlink()
    with pytest.raises(ValueError, match="--integrity_file"):
        verify(str(recovered))
    with pytest.raises(ValueError, match=r"down_proj\.weight of .* does not match"):
        verify(str(recovered), integrity_file=str(diff[0] / INTEGRITY_FILE))


def test_smoke_test_prompt_is_the_training_template(diff, tiny_llama, capsys):
    """Upstream asked with '\\r\\n' line breaks, which training never used: the prompt is the template's."""
    from alpaca.prompter import Prompter
    from alpaca.weights import TEST_INSTRUCTION

    recover(tiny_llama, str(diff[0]), test_inference=True, check_integrity_naively=False)
    printed = capsys.readouterr().out
    expected = Prompter("alpaca_legacy").generate_prompt(TEST_INSTRUCTION)
    assert f"Input: {expected}\nOutput: " in printed and "\r" not in printed
    recover(
        tiny_llama, str(diff[0]), test_inference=True, check_integrity_naively=False, prompt_template="alpaca"
    )
    assert (
        f"Input: {Prompter('alpaca').generate_prompt(TEST_INSTRUCTION)}\nOutput: " in capsys.readouterr().out
    )
