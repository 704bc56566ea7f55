"""Trainer checkpoints carry a SHA-256 manifest written last, checked on resume; a copied or renamed
checkpoint (any folder holding the Trainer's optimizer, scheduler or RNG state) is checked as a
checkpoint, never resumed as a final adapter."""

import json
import shutil
from pathlib import Path

import pytest

from alpaca.finetune.checkpoints import MANIFEST_NAME, file_sha256


@pytest.fixture(scope="module")
def saved_run(tiny_llama, tmp_path_factory, sample_subset, finetune_fast):
    """A 4-step LoRA run with checkpoint-2 and checkpoint-4."""
    root = tmp_path_factory.mktemp("integrity")
    data = sample_subset(root / "data.json", 16)
    out = root / "run"
    finetune_fast(tiny_llama, data, out, max_steps=4, save_steps=2, save_total_limit=2)
    return tiny_llama, data, out


def test_each_checkpoint_gets_a_manifest_of_every_file_written_last(saved_run):
    _, _, out = saved_run
    for step in (2, 4):
        folder = out / f"checkpoint-{step}"
        manifest = json.loads((folder / MANIFEST_NAME).read_text())["files"]
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        assert sorted(manifest) == [name for name in files if name != MANIFEST_NAME]
        assert {"trainer_state.json", "optimizer.pt", "adapter_model.safetensors"} <= set(manifest)
        for name, entry in manifest.items():
            assert entry == {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size}
        newest = max((folder / name).stat().st_mtime_ns for name in manifest)
        assert (folder / MANIFEST_NAME).stat().st_mtime_ns >= newest
    assert not list(out.rglob(f".{MANIFEST_NAME}.*"))  # no temporary left by the atomic write


def flip_a_bit_in_the_tensor_data(path: Path) -> None:
    """Flip one bit well inside a safetensors file's data: its header still parses and the size is
    unchanged, so only a checksum can tell."""
    data = bytearray(path.read_bytes())
    header = int.from_bytes(data[:8], "little")
    data[8 + header + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_a_checkpoints_adapter_is_refused_and_latest_skips_it(
    saved_run, tmp_path, finetune_fast, capsys
):
    base, data, out = saved_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    flip_a_bit_in_the_tensor_data(run / "checkpoint-4" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="adapter_model.safetensors does not match its SHA-256"):
        finetune_fast(
            base, data, run, max_steps=4, save_steps=2, resume_from_checkpoint=str(run / "checkpoint-4")
        )
    finetune_fast(
        base, data, run, max_steps=4, save_steps=2, save_total_limit=2, resume_from_checkpoint="latest"
    )
    output = capsys.readouterr().out
    assert (
        "skipping" in output
        and "checkpoint-4: incomplete (adapter_model.safetensors does not match" in output
    )
    assert f"resuming from Trainer checkpoint {run / 'checkpoint-2'}" in output
    # The resumed run wrote checkpoint-4 again, with a manifest that matches it.
    manifest = json.loads((run / "checkpoint-4" / MANIFEST_NAME).read_text())["files"]
    adapter = run / "checkpoint-4" / "adapter_model.safetensors"
    assert manifest["adapter_model.safetensors"]["sha256"] == file_sha256(adapter)


@pytest.mark.parametrize(
    "removed",
    [("trainer_state.json",), ("trainer_state.json", "optimizer.pt", "scheduler.pt"), ("scheduler.pt",)],
)
def test_a_torn_checkpoint_under_another_name_is_checked_as_a_checkpoint(
    saved_run, tmp_path, finetune_fast, removed
):
    base, data, out = saved_run
    copy = tmp_path / "my-copy"
    shutil.copytree(out / "checkpoint-4", copy)
    for name in removed:
        (copy / name).unlink()
    with pytest.raises(ValueError, match=r"incomplete Trainer checkpoint \(it holds .*\): .*" + removed[0]):
        finetune_fast(base, data, tmp_path / "new", max_steps=6, resume_from_checkpoint=str(copy))
    assert not (tmp_path / "new").exists()


def test_a_final_adapter_folder_is_still_a_final_adapter(saved_run, tmp_path, finetune_fast, capsys):
    base, data, out = saved_run
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        shutil.copy(out / name, adapter / name)
    finetune_fast(base, data, tmp_path / "new", max_steps=1, resume_from_checkpoint=str(adapter))
    assert "this is not a Trainer checkpoint, so the schedule restarts at step 0" in capsys.readouterr().out
