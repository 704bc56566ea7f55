"""Checkpoints that a kill -9 left half-written: `latest` skips them, an explicit one is an error, and a
run killed at any moment of a save resumes to the uninterrupted run's adapter (or is clearly refused)."""

import dataclasses
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alpaca.finetune.checkpoints import checkpoint_problems, latest_complete_checkpoint

# A constant schedule and several checkpoints; resume is bit-identical to the uninterrupted run.
SETTINGS = dict(max_steps=6, save_steps=2, save_total_limit=2, lr_scheduler_type="constant", lora_dropout=0.0)


@pytest.fixture(scope="module")
def data(tmp_path_factory, sample_subset):
    return sample_subset(tmp_path_factory.mktemp("data") / "d.json", 24)


@pytest.fixture(scope="module")
def train(tiny_llama, data, finetune_fast):
    """finetune.py's entry function on the tiny model with SETTINGS (plus `extra`) into `out`."""

    def train(out, **extra):
        return finetune_fast(tiny_llama, data, out, **{**SETTINGS, **extra})

    return train


@pytest.fixture(scope="module")
def reference(train, tmp_path_factory):
    """The uninterrupted run (its folder), with every file write of the run listed in order."""
    out = tmp_path_factory.mktemp("reference") / "run"
    events = []

    def record(name, path, write):
        events.append((name, Path(path).relative_to(out).as_posix()))
        write(path)

    with WriteHooks(record):
        train(out)
    return out, events


def adapter(folder) -> dict:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_same_adapter(a, b):
    a, b = adapter(a), adapter(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class WriteHooks:
    """Route the Trainer's file writes (torch.save, safetensors, trainer_state.json, checkpoint
    rotation) through `on_write(name, path, write)`; `write(target)` does the real write into a path
    or a BytesIO, so a hook can let it through, or write half of it and stop."""

    def __init__(self, on_write):
        self.on_write = on_write

    def __enter__(self):
        import peft.peft_model
        import transformers.trainer_callback

        self.saved = (
            torch.save,
            peft.peft_model.safe_save_file,
            transformers.trainer_callback.TrainerState.save_to_json,
        )
        self.saved_rmtree = shutil.rmtree
        real_save, real_safe, real_state = self.saved
        hooks = self

        def save(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)):
                hooks.on_write("torch.save", f, lambda target: real_save(obj, target, *args, **kwargs))
            else:
                real_save(obj, f, *args, **kwargs)

        def safe_save(tensors, filename, *args, **kwargs):
            def write(target):
                if isinstance(target, io.BytesIO):
                    from safetensors.torch import save

                    target.write(save(tensors, *args, **kwargs))
                else:
                    real_safe(tensors, target, *args, **kwargs)

            hooks.on_write("safetensors", filename, write)

        def save_state(state, json_path):
            def write(target):
                text = json.dumps(dataclasses.asdict(state), indent=2, sort_keys=True) + "\n"
                if isinstance(target, io.BytesIO):
                    target.write(text.encode())
                else:
                    real_state(state, target)

            hooks.on_write("trainer_state", json_path, write)

        def rmtree(path, *args, **kwargs):
            if "checkpoint-" in Path(path).name:
                hooks.on_write("rotate", path, lambda target: self.saved_rmtree(path, *args, **kwargs))
            else:
                self.saved_rmtree(path, *args, **kwargs)

        torch.save, peft.peft_model.safe_save_file = save, safe_save
        transformers.trainer_callback.TrainerState.save_to_json = save_state
        shutil.rmtree = rmtree
        return self

    def __exit__(self, *exc):
        import peft.peft_model
        import transformers.trainer_callback

        (
            torch.save,
            peft.peft_model.safe_save_file,
            transformers.trainer_callback.TrainerState.save_to_json,
        ) = self.saved
        shutil.rmtree = self.saved_rmtree


def killed_child(train, out, hook=None):
    """Fork a process that runs finetune.py's entry function (imports are shared, so it starts in
    milliseconds); `hook` may stop it mid-write. Returns the pid."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 0
        try:
            if hook is not None:
                with WriteHooks(hook):
                    train(out)
            else:
                train(out)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    return pid


def stop_at(event_index, signal_file):
    """A hook that lets writes through until the `event_index`-th, writes half of that one, tells the
    parent (signal_file) and waits to be killed."""
    count = [0]

    def on_write(name, path, write):
        index = count[0]
        count[0] += 1
        if index != event_index:
            write(path)
            return
        if name == "rotate":  # delete about half the files of the rotated checkpoint
            files = sorted(p for p in Path(path).iterdir() if p.is_file())
            for p in files[: len(files) // 2]:
                p.unlink()
        else:
            buffer = io.BytesIO()
            write(buffer)
            blob = buffer.getvalue()
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                handle.write(blob[: len(blob) // 2])
        Path(signal_file).touch()
        time.sleep(120)

    return on_write


def kill_when(pid, ready, timeout=60.0):
    """SIGKILL `pid` once `ready()` is true (or it has exited); return True when it was killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
        if ready():
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return True
        time.sleep(0.0005)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the child neither finished nor reached the kill point")


def resume_latest(train, out):
    """'ok' after a resume that finished, or the refusal's message."""
    try:
        train(out, resume_from_checkpoint="latest")
    except ValueError as err:
        return str(err)
    return "ok"


@pytest.mark.slow
def test_kill_9_at_every_write_of_a_checkpoint_save_then_latest(train, reference, tmp_path):
    reference_out, events = reference
    # every write of checkpoint-4 (adapter, training args, optimizer, scheduler, RNG, trainer state), the
    # rotation that deletes checkpoint-2 while checkpoint-6 is saved, and the final adapter
    targets = [i for i, (_, path) in enumerate(events) if path.startswith("checkpoint-4/")]
    targets += [i for i, (name, _) in enumerate(events) if name == "rotate"]
    targets += [i for i, (_, path) in enumerate(events) if path == "adapter_model.safetensors"]
    assert len(targets) >= 7, events
    outcomes = {}
    for index in targets:
        out, flag = tmp_path / f"kill{index}", tmp_path / f"stopped{index}"
        pid = killed_child(train, out, hook=stop_at(index, flag))
        assert kill_when(pid, flag.exists), f"the run finished before write {index}"
        outcome = resume_latest(train, out)
        assert outcome == "ok", (events[index], outcome)
        assert_same_adapter(out, reference_out)
        outcomes[events[index]] = outcome
    assert len(outcomes) == len(targets)
    print(f"{len(targets)} aimed kills, each resumed to the reference adapter: {sorted(outcomes)}")


@pytest.mark.slow
def test_kill_9_at_random_moments_then_latest(train, reference, tmp_path):
    """Kills without any hook, the moment a file appears: the exact point inside the save is left to
    chance (often an empty or half-written folder). `latest` then resumes to the same adapter or, when
    no checkpoint was complete yet, refuses clearly."""
    reference_out, _ = reference
    moments = [
        "checkpoint-2",
        "checkpoint-4/optimizer.pt",
        "checkpoint-6",
        "checkpoint-6/trainer_state.json",
        "adapter_config.json",  # the final save
    ]
    resumed = refused = 0
    for n, moment in enumerate(moments):
        out = tmp_path / f"random{n}"
        pid = killed_child(train, out)
        assert kill_when(pid, (out / moment).exists), moment
        outcome = resume_latest(train, out)
        if outcome == "ok":
            assert_same_adapter(out, reference_out)
            resumed += 1
        else:  # a clear refusal, only when no checkpoint was complete
            assert "no complete checkpoint-N folder" in outcome and "--overwrite" in outcome, outcome
            assert latest_complete_checkpoint(out, use_lora=True)[0] is None
            refused += 1
    print(f"kills when a file appeared: {resumed} resumed to the reference adapter, {refused} refused")
    assert resumed >= 3, (resumed, refused)


@pytest.mark.slow
def test_kill_9_of_the_command_line_while_it_saves(tiny_llama, data, train, reference, tmp_path):
    """The real script in its own process, killed the moment checkpoint-4 appears; then `latest`."""
    reference_out, _ = reference
    out = tmp_path / "cli"
    repo = Path(__file__).resolve().parent.parent
    flags = {**SETTINGS, "batch_size": 8, "micro_batch_size": 4, "cutoff_len": 128, "val_set_size": 0}
    flags.update(learning_rate=1e-2, warmup_steps=0, logging_steps=1, seed=7)
    command = [sys.executable, "finetune.py", f"--base_model={tiny_llama}", f"--data_path={data}"]
    command += [f"--output_dir={out}"] + [f"--{k}={v}" for k, v in flags.items()]
    proc = subprocess.Popen(command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint-4").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.0005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert resume_latest(train, out) == "ok"
    assert_same_adapter(out, reference_out)


@pytest.fixture(scope="module")
def finished(train, tmp_path_factory):
    """A finished run with checkpoint-2, -4 and -6, to copy and damage."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(out, save_total_limit=None)
    return out


def damaged_copy(finished, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    damage(out / "checkpoint-6")
    return out


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def garbage(path):
    path.write_bytes(os.urandom(path.stat().st_size))


DAMAGES = {
    "empty folder": (lambda c: [p.unlink() for p in c.iterdir()], "empty"),
    "no trainer_state.json": (lambda c: (c / "trainer_state.json").unlink(), "trainer_state.json missing"),
    "truncated trainer_state.json": (
        lambda c: truncate(c / "trainer_state.json"),
        "trainer_state.json truncated or not valid JSON",
    ),
    "truncated optimizer.pt": (lambda c: truncate(c / "optimizer.pt"), "optimizer.pt truncated"),
    "garbage optimizer.pt": (
        lambda c: garbage(c / "optimizer.pt"),
        "optimizer.pt truncated or not a torch.save",
    ),
    "truncated scheduler.pt": (lambda c: truncate(c / "scheduler.pt", 0.9), "scheduler.pt truncated"),
    "no rng_state.pth": (lambda c: (c / "rng_state.pth").unlink(), "rng_state.pth missing"),
    "garbage rng_state.pth": (lambda c: garbage(c / "rng_state.pth"), "rng_state.pth truncated"),
    "truncated adapter": (
        lambda c: truncate(c / "adapter_model.safetensors", 0.7),
        "adapter_model.safetensors truncated",
    ),
    "no adapter_config.json": (lambda c: (c / "adapter_config.json").unlink(), "adapter_config.json missing"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_newest_checkpoint(damage, train, finished, tmp_path, capsys):
    hurt, message = DAMAGES[damage]
    out = damaged_copy(finished, tmp_path, hurt)
    assert any(message in p for p in checkpoint_problems(out / "checkpoint-6", use_lora=True))
    # explicit: an error naming what is wrong, before any model loads
    with pytest.raises(ValueError, match="is an incomplete Trainer checkpoint") as err:
        train(out, resume_from_checkpoint=str(out / "checkpoint-6"))
    assert message in str(err.value)
    assert "optimizer, scheduler and step restored" not in capsys.readouterr().out
    # latest: skips it with the reason, resumes from checkpoint-4, and the result is the uninterrupted one
    train(out, resume_from_checkpoint="latest")
    printed = capsys.readouterr().out
    assert f"skipping {out / 'checkpoint-6'}: incomplete" in printed and message in printed
    assert f"resuming from Trainer checkpoint {out / 'checkpoint-4'}" in printed
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert_same_adapter(out, finished)


def test_complete_checkpoints_pass_and_none_complete_is_refused(finished, train, tmp_path):
    for step in (2, 4, 6):
        assert checkpoint_problems(finished / f"checkpoint-{step}", use_lora=True) == []
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    for step in (2, 4, 6):
        (out / f"checkpoint-{step}" / "trainer_state.json").unlink()
    with pytest.raises(
        ValueError, match="no complete checkpoint-N folder .*checkpoint-6: trainer_state.json missing"
    ):
        train(out, resume_from_checkpoint="latest")


def test_rng_files_expected_for_the_ranks_that_saved(finished, tmp_path):
    """A checkpoint saved by 2 ranks holds rng_state_0.pth and rng_state_1.pth (whatever the world
    size on resume); the run_config.json beside it says how many ranks saved it."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    config = json.loads((out / "run_config.json").read_text())
    (out / "run_config.json").write_text(json.dumps({**config, "world_size": 2}))
    checkpoint = out / "checkpoint-6"
    # The renamed files no longer match the checksum manifest; this test is about the file layout only.
    (checkpoint / "checkpoint_sha256.json").unlink()
    (checkpoint / "rng_state.pth").rename(checkpoint / "rng_state_0.pth")
    assert checkpoint_problems(checkpoint, use_lora=True, n_ranks=1) == ["rng_state_1.pth missing"]
    shutil.copy(checkpoint / "rng_state_0.pth", checkpoint / "rng_state_1.pth")
    assert checkpoint_problems(checkpoint, use_lora=True, n_ranks=1) == []
