"""Trainer checkpoints and output folders: what is complete, what is resumable, which run a folder holds.

A kill -9 can stop the Trainer anywhere inside `_save_checkpoint`, which writes (transformers 5.23) in
this order: the weights (`adapter_model.safetensors` + `adapter_config.json`, or `model.safetensors`),
`training_args.bin`, `optimizer.pt`, `scheduler.pt`, (`scaler.pt` with fp16), `rng_state.pth` (one
`rng_state_<rank>.pth` per rank under torchrun), and `trainer_state.json` last. None of these writes is
atomic. So a folder named `checkpoint-N` is resumable only when every one of those files is there and
readable; anything less is a half-written checkpoint, never a "final adapter".
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from alpaca.files import safetensors_problem, torch_file_problem

CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")

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
    return problems


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
