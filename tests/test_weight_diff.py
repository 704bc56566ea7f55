"""Weight diffs on the tiny LLaMA: Stanford's arithmetic, per-tensor hashes, tampering caught and named."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.weight_diffs import in_memory_make_diff

from alpaca.weights.diffs import ALPACA_7B_SUM, INTEGRITY_FILE, make_diff, recover, tensor_sha256

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
        "('openai', 'torch', 'transformers', 'finetune', 'train') or m == 'alpaca.finetune.run']; print(heavy)"
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
    source = (REPO / "alpaca" / "weights" / "diffs.py").read_text() + (REPO / "weight_diff.py").read_text()
    assert "openai" not in source.replace("OpenAI client", "") and "alpaca.finetune.run" not in source


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

    from alpaca.weights.diffs import verify

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
    from alpaca.core.prompter import Prompter
    from alpaca.weights.diffs import TEST_INSTRUCTION

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


# --- streaming: the same bits as the in-memory recipe, one tensor at a time ------------------------------


def save_as_bin_shards(state: dict, folder: Path, per_shard: int) -> None:
    """Weights as Stanford published its diff: torch.save shards plus pytorch_model.bin.index.json."""
    import torch

    names = list(state)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file = f"pytorch_model-{i:05d}-of-{len(groups):05d}.bin"
        torch.save({name: state[name].clone() for name in group}, folder / file)
        weight_map.update(dict.fromkeys(group, file))
    (folder / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )


@pytest.fixture(scope="module")
def opt_pair(tiny_opt, tmp_path_factory):
    """OPT's case: tied embeddings, and a raw model with more embedding rows than its tokenizer (OPT-6.7B:
    50,272 rows, 50,265 tokens), so Stanford's resize to len(tokenizer) + [PAD] cuts rows. The raw model is
    stored as facebook/opt's files are: pytorch_model.bin, names without the `model.` prefix."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca.modeling import resize_embeddings_for_new_tokens

    root = tmp_path_factory.mktemp("opt_pair")
    tokenizer = AutoTokenizer.from_pretrained(tiny_opt)
    model = AutoModelForCausalLM.from_pretrained(tiny_opt, dtype=torch.float32)
    model.resize_token_embeddings(len(tokenizer) + 8, mean_resizing=False)
    raw = root / "raw"
    model.save_pretrained(raw)
    tokenizer.save_pretrained(raw)
    (raw / "model.safetensors").unlink()
    state = {
        key.removeprefix("model."): t for key, t in model.state_dict().items() if key != "lm_head.weight"
    }
    torch.save(state, raw / "pytorch_model.bin")

    resize_embeddings_for_new_tokens(model, tokenizer, tokenizer.add_special_tokens({"pad_token": "[PAD]"}))
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    tuned = root / "tuned"
    model.to(torch.bfloat16).save_pretrained(tuned)  # a bf16 fine-tune: the diff is still made in fp32
    tokenizer.save_pretrained(tuned)
    return str(raw), str(tuned)


@pytest.mark.parametrize("case", ["llama", "opt"])
def test_streamed_diff_has_the_in_memory_bits(case, diff, tiny_llama, tuned, opt_pair, tmp_path):
    """Same diff tensors, same per-tensor hashes and the same naive sum as the two-models-in-memory recipe,
    including the mean-initialised [PAD] row (untied LLaMA; tied OPT with its rows cut) and a bf16 tuned
    model; and recover rebuilds exactly the hashed values."""
    import torch

    raw_path, tuned_path = (tiny_llama, tuned) if case == "llama" else opt_pair
    expected_diff, expected_record = in_memory_make_diff(raw_path, tuned_path)
    out = tmp_path / "diff"
    record = diff[1] if case == "llama" else make_diff(raw_path, tuned_path, str(out))
    out = diff[0] if case == "llama" else out
    assert record == expected_record  # hashes, shapes and the sum, bit for bit
    got = load_state(out)
    assert sorted(got) == sorted(set(load_state(tuned_path)))
    for key, tensor in expected_diff.items():
        assert torch.equal(got[key], tensor), key
    recover(raw_path, str(out), str(tmp_path / "recovered"), test_inference=False)
    recovered = load_state(tmp_path / "recovered")
    for key, entry in expected_record["tensors"].items():
        assert tensor_sha256(recovered[key]) == entry["sha256"], key


def test_output_is_what_save_pretrained_writes(diff, tiny_llama, tmp_path):
    """The recovered folder next to save_pretrained's own output for the same model: the same config and
    generation config, the same tensor names, and with a small --max_shard_size the shard files and index
    save_pretrained writes; from_pretrained loads every layout."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    streamed = tmp_path / "streamed"
    recover(tiny_llama, str(diff[0]), str(streamed), test_inference=False)
    model = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.float32)
    reference = tmp_path / "reference"
    model.save_pretrained(reference)
    for name in ("config.json", "generation_config.json"):
        assert json.loads((streamed / name).read_text()) == json.loads((reference / name).read_text()), name
    with (
        safe_open(streamed / "model.safetensors", "pt") as ours,
        safe_open(reference / "model.safetensors", "pt") as theirs,
    ):
        assert sorted(ours.keys()) == sorted(theirs.keys()) and ours.metadata()["format"] == "pt"
        for key in ours.keys():
            assert torch.equal(ours.get_tensor(key), theirs.get_tensor(key)), key

    sharded = tmp_path / "sharded"
    recover(tiny_llama, str(diff[0]), str(sharded), test_inference=False, max_shard_size="300KB")
    reference_sharded = tmp_path / "reference_sharded"
    model.save_pretrained(reference_sharded, max_shard_size="300KB")
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) > 2 and files == sorted(p.name for p in reference_sharded.glob("*.safetensors"))
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    expected_index = json.loads((reference_sharded / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(expected_index["weight_map"])
    assert index["metadata"]["total_size"] == expected_index["metadata"]["total_size"]
    reloaded = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).state_dict()
    for key, tensor in model.state_dict().items():
        assert torch.equal(reloaded[key], tensor), key
    from alpaca.weights.diffs import verify

    assert verify(str(sharded)) == len(diff[1]["tensors"])


def test_a_stanford_style_bin_diff_recovers(diff, tiny_llama, tmp_path, capsys):
    """Stanford published its diff as pytorch_model-0000i-of-0000n.bin shards with an index: recover reads
    them one tensor at a time (memory-mapped) and rebuilds the same hashes."""
    bin_diff = tmp_path / "bin_diff"
    shutil.copytree(diff[0], bin_diff)
    (bin_diff / "model.safetensors").unlink()
    save_as_bin_shards(load_state(diff[0]), bin_diff, per_shard=7)
    assert len(list(bin_diff.glob("*.bin"))) == 3
    recover(tiny_llama, str(bin_diff), str(tmp_path / "out"), test_inference=False)
    assert f"all {len(diff[1]['tensors'])} recovered tensors match" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / INTEGRITY_FILE).read_text()) == diff[1]


def test_one_tensor_at_a_time(diff, tiny_llama, tuned, tmp_path, monkeypatch):
    """Every tensor read from the weight files is released before the next tensor after it is read: at most
    the raw and the other tensor of one name are alive at once, in make_diff, recover and verify."""
    import gc
    import weakref

    from alpaca.weights import files as weight_files
    from alpaca.weights.diffs import verify

    alive, peak, reads = set(), [0], iter(range(10**6))
    original = weight_files.WeightReader.get

    def tracked(self, name):
        tensor = original(self, name)
        number = next(reads)
        alive.add(number)
        weakref.finalize(tensor, alive.discard, number)
        peak[0] = max(peak[0], len(alive))
        return tensor

    monkeypatch.setattr(weight_files.WeightReader, "get", tracked)
    make_diff(tiny_llama, tuned, str(tmp_path / "d"))
    recover(tiny_llama, str(tmp_path / "d"), str(tmp_path / "r"), test_inference=False)
    verify(str(tmp_path / "r"))
    gc.collect()
    assert peak[0] == 2 and not alive


def test_layout_mistakes_are_named(diff, tiny_llama, tuned, opt_pair, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from alpaca.weights.files import SafetensorsWriter, local_model_folder, parse_size

    bigger_raw = tmp_path / "bigger_raw"  # the raw files hold a layer the tuned model does not have
    shutil.copytree(tiny_llama, bigger_raw)
    weights = load_file(bigger_raw / "model.safetensors")
    weights["model.layers.9.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"]
    save_file(
        {k: v.clone() for k, v in weights.items()},
        bigger_raw / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match=r"only in raw: \['model\.layers\.9\.mlp\.up_proj\.weight'\]"):
        make_diff(str(bigger_raw), tuned, str(tmp_path / "d"))
    both_names = tmp_path / "both_names"  # a tied raw model whose file holds the tensor under both names
    shutil.copytree(opt_pair[1], both_names)
    weights = load_file(both_names / "model.safetensors")
    weights["lm_head.weight"] = weights["model.decoder.embed_tokens.weight"].clone()
    save_file(weights, both_names / "model.safetensors", metadata={"format": "pt"})
    assert make_diff(str(both_names), opt_pair[1], str(tmp_path / "zero"))["tensors"]
    assert not any(load_state(tmp_path / "zero")["lm_head.weight"].flatten().tolist())  # tuned - itself
    incomplete = tmp_path / "incomplete"  # a diff whose files lack a tensor its config implies
    shutil.copytree(diff[0], incomplete)
    weights = load_file(incomplete / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, incomplete / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(
        ValueError, match=r"--path_diff=.*lacks tensors its config\.json implies.*model\.norm"
    ):
        recover(tiny_llama, str(incomplete), test_inference=False)
    with pytest.raises(ValueError, match="--path_raw='nobody/no-such-model': not a local folder"):
        local_model_folder("nobody/no-such-model", "--path_raw")
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2GiB") == 2 * 2**30 and parse_size(1024) == 1024
    with pytest.raises(ValueError, match="--max_shard_size='5 parsecs'"):
        parse_size("5 parsecs")
    writer = SafetensorsWriter(tmp_path, [("a", (2,), "float32"), ("b", (3,), "float32")], 10**9)
    with pytest.raises(ValueError, match="expected tensor .*'a'"):
        writer.write("b", torch.zeros(3))
    writer.abort()


# --- a run killed while it writes its output ----------------------------------------------------------------

KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from alpaca.core.staging import staged_output
target, moment = Path(sys.argv[1]), sys.argv[2]
if moment == "between_renames":
    real_replace = os.replace
    def replace(source, destination):
        real_replace(source, destination)
        if Path(destination).name == target.name and Path(destination).parent != target.parent:
            os.kill(os.getpid(), signal.SIGKILL)  # the old output is aside, the new one not yet in place
    os.replace = replace
with staged_output(target) as staging:
    (staging / "model.safetensors").write_bytes(b"partial" * 1000)
    if moment == "writing":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def kill_a_writer(target: Path, moment: str) -> None:
    result = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(target), moment], cwd=REPO, capture_output=True, timeout=120
    )
    assert result.returncode == -9, result.stderr


def test_what_a_killed_run_left_is_tidied_and_the_old_output_kept(diff, tiny_llama, tmp_path, capsys):
    """kill -9 of a run while it streams its output: the previous output is untouched and the partial copy
    is left beside it; the next run deletes that copy. kill -9 between the two renames of the swap: the
    previous output, moved aside, is put back. Both with real killed processes."""
    from alpaca.core.staging import clear_killed_staging
    from alpaca.weights.diffs import verify

    recovered = tmp_path / "out" / "recovered"
    recover(tiny_llama, str(diff[0]), str(recovered), test_inference=False)
    before = snapshot(recovered)

    kill_a_writer(recovered, "writing")
    assert snapshot(recovered) == before
    leftovers = [p.name for p in recovered.parent.iterdir() if p.name != "recovered"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".recovered.") and leftovers[0].endswith(".tmp")
    capsys.readouterr()
    recover(tiny_llama, str(diff[0]), str(recovered), test_inference=False, overwrite=True)
    assert f"removed {leftovers[0]}, left by a run that was killed" in capsys.readouterr().out
    assert [p.name for p in recovered.parent.iterdir()] == ["recovered"]
    assert verify(str(recovered)) == len(diff[1]["tensors"])

    before = snapshot(recovered)
    kill_a_writer(recovered, "between_renames")
    assert not recovered.exists()  # the window the kill hit: the old output is in a sibling .old folder
    clear_killed_staging(recovered)
    assert snapshot(recovered) == before
    assert [p.name for p in recovered.parent.iterdir()] == ["recovered"]
    assert "put back the previous output" in capsys.readouterr().out

    # a sibling whose writer is alive (this process) is someone's output in progress: left alone
    alive = recovered.parent / f".recovered.{os.getpid()}.abc123.tmp"
    alive.mkdir()
    clear_killed_staging(recovered)
    assert alive.is_dir()
