"""Trainer checkpoints and output folders: what is complete, what is resumable, which run a folder holds.

`plan_resume` and `prepare_output_dir` run before the model loads, so every problem with the resume
point or the output folder is reported in seconds.

A kill -9 can stop the Trainer anywhere inside `_save_checkpoint`, which writes (transformers 5.23) in
this order: the weights (`adapter_model.safetensors` + `adapter_config.json`, or `model.safetensors`),
`training_args.bin`, `optimizer.pt`, `scheduler.pt`, (`scaler.pt` with fp16), `rng_state.pth` (one
`rng_state_<rank>.pth` per rank under torchrun), and `trainer_state.json` last. None of these writes is
atomic. So a folder named `checkpoint-N` is resumable only when every one of those files is there and
readable; anything less is a half-written checkpoint, never a "final adapter". The same holds for a
folder of any name that holds the Trainer's own state (`optimizer.pt`, `scheduler.pt`, `rng_state*.pth`
...): a copied or renamed checkpoint is checked as one.

After each complete save, `checkpoint_sha256.json` (every file's SHA-256 and size) is written into the
checkpoint, atomically and last; a checkpoint whose files no longer match it (a flipped bit, a file
replaced) is not resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alpaca.core.files import safetensors_problem, torch_file_problem
from alpaca.core.log import is_main_process, log

if TYPE_CHECKING:
    from alpaca.finetune.settings import FinetuneConfig


CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
MANIFEST_NAME = "checkpoint_sha256.json"
# Files only the Trainer's checkpoints hold (a final adapter or model folder has none of them).
TRAINER_STATE_FILES = ("trainer_state.json", "optimizer.pt", "optimizer.bin", "scheduler.pt", "scaler.pt")

# The settings that define a run: resuming a checkpoint with any of them changed would continue a
# different run. Length settings (max_steps, num_epochs), logging and saving may change on resume.
RUN_IDENTITY_KEYS = (
    "base_model_resolved",
    "base_model_sha256",
    "data_sha256",
    "use_lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "cutoff_len",
    "train_on_inputs",
    "prompt_template_name",
    "chat_template",
    "val_set_size",
    "seed",
    "batch_size",
    "micro_batch_size",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "packing",
    "load_in_8bit",
    "load_in_4bit",
)


def checkpoint_step(path: str | Path) -> int | None:
    """N for a folder named `checkpoint-N`, else None."""
    match = CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def trainer_state_files(folder: str | Path) -> list[str]:
    """The files (and folders) in `folder` that only a Trainer checkpoint holds: optimizer, scheduler,
    scaler and RNG state, trainer_state.json, DeepSpeed / FSDP optimizer folders, the checksum manifest."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if p.name in TRAINER_STATE_FILES
        or p.name == MANIFEST_NAME
        or re.fullmatch(r"rng_state(_\d+)?\.pth", p.name)
        or (p.is_dir() and (p.name == "optimizer_0" or p.name.startswith("global_step")))
    )


def is_trainer_checkpoint(folder: str | Path) -> bool:
    """A `checkpoint-N` folder, or a folder of any name holding the Trainer's own state."""
    return checkpoint_step(folder) is not None or bool(trainer_state_files(folder))


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint_manifest(folder: str | Path) -> Path:
    """Write `checkpoint_sha256.json` (SHA-256 and size of every file) into a complete checkpoint,
    atomically; call it last, once the Trainer has written everything."""
    from alpaca.core.files import write_json_atomic

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    manifest = {
        "files": {
            str(p.relative_to(folder)): {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in files
        }
    }
    write_json_atomic(folder / MANIFEST_NAME, manifest)
    return folder / MANIFEST_NAME


def manifest_problems(folder: Path) -> list[str]:
    """Files of a checkpoint that differ from its `checkpoint_sha256.json` (none when it has no
    manifest: one saved by an older version, or killed just before the manifest was written)."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return []
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        entries = [(name, entry["sha256"], entry["bytes"]) for name, entry in files.items()]
    except (ValueError, KeyError, TypeError, AttributeError):
        return [f"{MANIFEST_NAME} unreadable"]
    problems = []
    for name, sha256, size in entries:
        file = folder / name
        if not file.is_file():
            problems.append(f"{name} missing (listed in {MANIFEST_NAME})")
        elif file.stat().st_size != size:
            problems.append(
                f"{name} changed since it was saved ({file.stat().st_size} bytes, {MANIFEST_NAME} says {size})"
            )
        elif file_sha256(file) != sha256:
            problems.append(
                f"{name} does not match its SHA-256 in {MANIFEST_NAME} (damaged since it was saved)"
            )
    return problems


def _json_problem(path: Path) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError):
        return "truncated or not valid JSON"
    return None


def _weights_problems(folder: Path, use_lora: bool) -> list[str]:
    if use_lora:
        problems = []
        if problem := _json_problem(folder / "adapter_config.json"):
            problems.append(f"adapter_config.json {problem}")
        if (folder / "adapter_model.safetensors").exists() or not (folder / "adapter_model.bin").exists():
            if problem := safetensors_problem(folder / "adapter_model.safetensors"):
                problems.append(f"adapter_model.safetensors {problem}")
        elif problem := torch_file_problem(folder / "adapter_model.bin"):
            problems.append(f"adapter_model.bin {problem}")
        return problems
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return ["model.safetensors.index.json truncated or not valid"]
    elif (folder / "pytorch_model.bin").is_file():
        problem = torch_file_problem(folder / "pytorch_model.bin")
        return [f"pytorch_model.bin {problem}"] if problem else []
    else:
        shards = ["model.safetensors"]
    return [f"{shard} {problem}" for shard in shards if (problem := safetensors_problem(folder / shard))]


def saved_world_size(folder: Path, fallback: int) -> int:
    """How many ranks wrote the checkpoint (each writes its own RNG file): the world size in the
    run_config.json beside it, else `fallback` (a run may resume on another number of ranks)."""
    try:
        return int(json.loads((folder.parent / "run_config.json").read_text(encoding="utf-8"))["world_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


def checkpoint_problems(folder: str | Path, use_lora: bool, n_ranks: int = 1) -> list[str]:
    """Everything that keeps `folder` from being resumed, as 'FILE what' strings; empty when complete.

    Checks that each file the Trainer writes is present and readable (JSON parses, torch.save archives
    and safetensors headers are whole) without unpickling anything. `n_ranks` is the world size to
    expect RNG files for when the run_config.json beside the checkpoint does not say.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return ["no such folder"]
    if not any(folder.iterdir()):
        return ["empty (killed before the Trainer wrote anything into it)"]
    problems = _weights_problems(folder, use_lora)
    state = folder / "trainer_state.json"
    if problem := _json_problem(state):
        problems.append(f"trainer_state.json {problem}")
    else:
        step = json.loads(state.read_text(encoding="utf-8")).get("global_step")
        expected = checkpoint_step(folder)
        if expected is not None and step != expected:
            problems.append(f"trainer_state.json says global_step {step}, the folder name {expected}")
    deepspeed = any(p.is_dir() and p.name.startswith("global_step") for p in folder.iterdir())
    sharded_optimizer = (folder / "optimizer_0").is_dir()  # FSDP's sharded optimizer state
    required = ["training_args.bin"]
    if not deepspeed:
        required.append("scheduler.pt")
        if not sharded_optimizer and not (folder / "optimizer.bin").is_file():
            required.append("optimizer.pt")
    n_ranks = saved_world_size(folder, n_ranks)
    rng_files = ["rng_state.pth"] if n_ranks <= 1 else [f"rng_state_{rank}.pth" for rank in range(n_ranks)]
    required += rng_files
    optional = ["scaler.pt", "optimizer.bin"]
    for name in required + [n for n in optional if (folder / n).is_file()]:
        if problem := torch_file_problem(folder / name):
            problems.append(f"{name} {problem}")
    return problems or manifest_problems(folder)


def checkpoint_folders(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders in `output_dir`, newest (highest N) first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step, reverse=True)


def latest_complete_checkpoint(
    output_dir: str | Path, use_lora: bool, n_ranks: int = 1
) -> tuple[Path | None, list[tuple[Path, list[str]]]]:
    """The newest complete checkpoint in `output_dir` (or None) and the newer ones skipped, with why."""
    skipped = []
    for folder in checkpoint_folders(output_dir):
        problems = checkpoint_problems(folder, use_lora, n_ranks)
        if not problems:
            return folder, skipped
        skipped.append((folder, problems))
    return None, skipped


def run_differences(previous: dict, current: dict) -> list[str]:
    """'key: before -> now' for each run-defining setting that changed (keys either side lacks are
    not compared, so configs from older versions still resume)."""
    changed = []
    for key in RUN_IDENTITY_KEYS:
        if key in previous and key in current and _normal(previous[key]) != _normal(current[key]):
            changed.append(f"{key}: {previous[key]!r} -> {current[key]!r}")
    return changed


def _normal(value):
    # JSON turns tuples into lists and may store 3e-4 as 0.0003; compare what the values mean
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value


@dataclass
class ResumePlan:
    """Where a run starts: a complete Trainer checkpoint (full state), adapter weights only, or fresh."""

    checkpoint: str | None = None
    adapter_weights: str | None = None
    stale: list = field(default_factory=list)  # incomplete checkpoint-N folders newer than `checkpoint`


def plan_resume(config: FinetuneConfig) -> ResumePlan:
    """Check `--resume_from_checkpoint` before any model loads.

    `latest` takes the newest complete `checkpoint-N` in output_dir and says which newer ones it skipped
    and why; an explicit checkpoint folder must be complete; any other folder is a final adapter
    (weights only). A Trainer checkpoint (`checkpoint-N`, or any folder holding optimizer, scheduler or
    RNG state) is never taken for a final adapter.
    """
    target = config.resume_from_checkpoint
    if not target:
        return ResumePlan()
    flag = f"--resume_from_checkpoint={target}"
    if str(target).lower() in ("true", "latest"):
        chosen, skipped = latest_complete_checkpoint(config.output_dir, config.use_lora, config.world_size)
        for folder, problems in skipped:
            log(f"skipping {folder}: incomplete ({'; '.join(problems)})")
        if chosen is None:
            found = "; ".join(f"{f.name}: {', '.join(p)}" for f, p in skipped) or "none found"
            raise ValueError(
                f"{flag}: no complete checkpoint-N folder in {config.output_dir!r} ({found}); "
                "start again with --overwrite"
            )
        return ResumePlan(checkpoint=str(chosen), stale=[str(folder) for folder, _ in skipped])
    path = Path(target).expanduser()
    if not path.is_dir():
        raise ValueError(f"{flag}: no such folder")
    if is_trainer_checkpoint(path):
        problems = checkpoint_problems(path, config.use_lora, config.world_size)
        if problems:
            why = (
                ""
                if checkpoint_step(path) is not None
                else f" (it holds {', '.join(trainer_state_files(path))})"
            )
            raise ValueError(
                f"{flag} is an incomplete Trainer checkpoint{why} (a run killed while saving it, or damaged since?): "
                + "; ".join(problems)
                + ". Resume from an earlier checkpoint, or use --resume_from_checkpoint=latest"
            )
        return ResumePlan(checkpoint=str(path))
    weights = next(
        (path / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (path / n).is_file()), None
    )
    if weights is None or not config.use_lora:
        raise ValueError(
            f"{flag} holds neither a Trainer checkpoint (trainer_state.json) "
            "nor LoRA adapter weights (adapter_model.safetensors / adapter_model.bin)"
        )
    from alpaca.core.files import safetensors_problem, torch_file_problem

    problem = (safetensors_problem if weights.suffix == ".safetensors" else torch_file_problem)(weights)
    if problem:
        raise ValueError(f"{flag}: adapter weights {weights} are {problem}")
    return ResumePlan(adapter_weights=str(weights))


def load_adapter_weights(model, weights: str, flag: str) -> None:
    """Load a final adapter's weights into the LoRA model (the schedule then restarts at step 0)."""
    import torch
    from peft import set_peft_model_state_dict

    if weights.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(weights)
    else:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    result = set_peft_model_state_dict(model, state)
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise ValueError(f"{flag}: adapter does not fit this model ({unexpected[:3]})")
    log(
        f"loaded adapter weights from {weights}; this is not a Trainer checkpoint, so the schedule restarts at step 0"
    )


def prepare_output_dir(config: FinetuneConfig, plan: ResumePlan, identity: dict) -> None:
    """Make sure the output folder holds this run only, before the model loads.

    A non-empty folder is refused unless `--overwrite` (it is then cleared) or the run resumes from a
    checkpoint inside it, whose run_config.json must describe the same run (same data, model and
    run-defining settings). Rank 0 alone clears and deletes; under torchrun a refused rank 0 stops
    the other ranks.
    """
    from alpaca.core.staging import prepare_output_path

    out = Path(config.output_dir).expanduser()
    if plan.checkpoint:
        previous_path = Path(plan.checkpoint).parent / "run_config.json"
        if previous_path.is_file():
            try:
                previous = json.loads(previous_path.read_text(encoding="utf-8"))
            except ValueError as err:
                raise ValueError(
                    f"{previous_path} is not valid JSON ({err}); cannot tell which run it was"
                ) from err
            changed = run_differences(previous, identity)
            if changed:
                raise ValueError(
                    f"--resume_from_checkpoint={config.resume_from_checkpoint}: {plan.checkpoint} belongs to another "
                    f"run ({previous_path} differs: {'; '.join(changed)}); resume with the same settings, or start "
                    "a new run in a new --output_dir (or --overwrite)"
                )
        else:
            log(f"warning: {previous_path} is missing, so the checkpoint cannot be checked against this run")
    if not is_main_process():
        return
    inside = plan.checkpoint and out.resolve() in Path(plan.checkpoint).resolve().parents
    if out.is_dir() and any(out.iterdir()) and not inside:
        if not config.overwrite:
            listing = ", ".join(sorted(p.name for p in out.iterdir())[:5])
            raise ValueError(
                f"--output_dir={config.output_dir!r} already holds another run's files ({listing}, ...); pass "
                "--overwrite to clear it, --resume_from_checkpoint=latest to continue the run in it, or choose "
                "a new folder"
            )
        # refuses the working folder, home and the run's inputs
        prepare_output_path(
            str(out),
            True,
            "--output_dir",
            (config.base_model, config.data_path, config.resume_from_checkpoint),
        )
        # rename first, so a kill while deleting never leaves a half-deleted run under the real name
        doomed = out.with_name(f".{out.name}.overwritten-{os.getpid()}")
        os.replace(out, doomed)
        shutil.rmtree(doomed)
        log(f"--overwrite: cleared {out}")
    for stale in plan.stale:
        # the resumed run writes these steps again; a half-written folder left beside them would
        # confuse the Trainer's checkpoint rotation
        shutil.rmtree(stale, ignore_errors=True)
        log(f"removed the incomplete {stale}")


def run_identity(config: FinetuneConfig, data_sha256: str, gguf_info: dict | None) -> dict:
    """The settings, data hash and model that define this run, as compared on resume. `data_sha256` is
    the records' hash (`alpaca.finetune.sources.scan_source`: sha256 of `json.dumps(records,
    sort_keys=True, ensure_ascii=False)`, computed record by record)."""
    local = Path(config.base_model).expanduser()
    identity = {key: value for key, value in config.to_dict().items()}
    identity["base_model_resolved"] = str(local.resolve()) if local.exists() else config.base_model
    identity["data_sha256"] = data_sha256
    if gguf_info:
        identity["base_model_sha256"] = gguf_info.get("sha256")
        identity["base_model_resolved"] = f"gguf:{gguf_info.get('sha256')}"
    return identity
