"""Weight diffs (tuned minus raw, in fp32) for publishing a fine-tune whose base may not be shared.

The arithmetic is Stanford Alpaca's, so its published Alpaca-7B diff recovers with this code: every
tensor in fp32; the raw model first gets the `[PAD]` token with a mean-initialised embedding row when
the tuned tokenizer has it; the diff is `tuned - raw` and recovery adds `raw` back.

Unlike upstream, which holds two fp32 models in memory (about 56 GB for a 7B model), both directions
stream: one tensor at a time is read from the safetensors or `.bin` files (`alpaca.weights.files`),
combined and written straight into save_pretrained's files, so the memory needed is a few copies of
the largest tensor (the embeddings), whatever the model's size. The model's tensor names, tied weights
and embeddings come from its class built on the meta device, so the names, order and values are the
ones `from_pretrained` + `state_dict()` would give.

Beyond upstream, `make_diff` records the SHA-256 of every tensor that recovery will rebuild (`raw + diff`
in fp32, which is not always bit-equal to `tuned`), and `recover` checks each one and names the first
tensor that does not match. Upstream's only check, one global sum against a 7B constant, stays as an
option; for other models it compares with the sum recorded in the diff.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from alpaca.core.locks import locks_output
from alpaca.core.staging import prepare_output_path, staged_output
from alpaca.modeling import (
    PAD_TOKEN,
    check_model_path,
    damaged_weights,
    load_base_model,
    load_generation_config,
    load_model_config,
    load_plain_tokenizer,
    resolve_base_model,
)
from alpaca.weights.files import (
    DEFAULT_MAX_SHARD_SIZE,
    ModelLayout,
    SafetensorsWriter,
    WeightReader,
    local_model_folder,
    model_layout,
    parse_size,
)

INTEGRITY_FILE = "weight_diff_integrity.json"
INTEGRITY_FORMAT = "alpaca-kit weight diff integrity v1"
ALPACA_7B_SUM = 50637.1836  # upstream's naive check: sum of all recovered Alpaca-7B parameters
NAIVE_SUM_ATOL = 1e-2
# Upstream's smoke test asks this in the prompt the model was trained with (Stanford's, by default);
# upstream wrote it with "\r\n", which the model never saw in training.
TEST_INSTRUCTION = "List three technologies that make life easier."
DEFAULT_TEST_TEMPLATE = "alpaca_legacy"


def tensor_sha256(tensor) -> str:
    """SHA-256 of a tensor's raw bytes (C order, on the CPU); any dtype."""
    import torch

    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(data.numpy()).hexdigest()


def load_fp32_model(path: str, device: str, flag: str):
    """Load a causal LM in fp32 on `device` (diffs are made and applied in fp32, as upstream); a truncated
    or corrupt weight file is a ValueError naming it."""
    import torch
    from safetensors import SafetensorError

    try:
        return load_base_model(path, dtype=torch.float32, device_map={"": device}, flag=flag)
    except (SafetensorError, EOFError, RuntimeError) as err:
        raise ValueError(f"{flag}={path!r}: cannot read the weights: {damaged_weights(path) or err}") from err


def read_integrity(folder: str, flag: str = "--path_diff") -> dict | None:
    """The folder's integrity record, None when it has none."""
    path = Path(folder) / INTEGRITY_FILE
    return read_integrity_file(path, flag) if path.is_file() else None


def read_integrity_file(path: Path, flag: str) -> dict:
    """An integrity record; a malformed one is a ValueError naming the file."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ValueError(
            f"{flag}: {path} is not valid JSON ({err}); the diff was altered or damaged"
        ) from None
    if not isinstance(record, dict) or record.get("format") != INTEGRITY_FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{flag}: {path} has an unknown integrity format {found!r}")
    tensors = record.get("tensors")
    well_formed = isinstance(tensors, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("sha256"), str) for entry in tensors.values()
    )
    if not well_formed or not isinstance(record.get("sum"), (int, float)):
        raise ValueError(
            f"{flag}: {path} lacks a per-tensor 'sha256' table or the 'sum'; the diff was altered or damaged"
        )
    return record


def check_recovered_tensor(key: str, tensor, integrity: dict) -> None:
    expected = integrity["tensors"].get(key)
    if expected is None:
        raise ValueError(f"tensor {key} is in the diff but not in its {INTEGRITY_FILE}: the diff was altered")
    if tensor_sha256(tensor) != expected["sha256"]:
        raise ValueError(
            f"recovered tensor {key} does not match the SHA-256 recorded when the diff was made: the diff "
            "was altered or corrupted, or --path_raw is not the raw model it was made from"
        )


def run_test_inference(model, tokenizer, prompt_template: str = DEFAULT_TEST_TEMPLATE) -> str:
    """Upstream's smoke test: greedy-generate from a fixed instruction in the training prompt and print it."""
    from alpaca.core.prompter import Prompter

    prompt = Prompter(prompt_template).generate_prompt(TEST_INSTRUCTION)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    out = model.generate(
        inputs=inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=100, do_sample=False
    )
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"Input: {prompt}\nOutput: {text}")
    return text


@dataclass
class RawPadding:
    """How the raw embeddings grow before the arithmetic, as Stanford's `smart_tokenizer_and_embedding_resize`
    does (`alpaca.modeling.resize_embeddings_for_new_tokens`): cut or extended to `rows`, then the last
    `added` rows set to the mean of the rows before them."""

    rows: int
    added: int

    def apply(self, weight):
        import torch

        if self.rows <= weight.shape[0]:
            padded = weight[: self.rows].clone()
        else:
            extra = weight.new_empty((self.rows - weight.shape[0], *weight.shape[1:]))
            padded = torch.cat([weight, extra])
        padded[-self.added :] = padded[: -self.added].mean(dim=0, keepdim=True)
        return padded


def raw_padding(raw_folder: Path, tokenizer_tuned) -> RawPadding | None:
    """Alpaca's `[PAD]` for the raw model when the tuned tokenizer has it and the raw one does not."""
    if PAD_TOKEN not in tokenizer_tuned.get_vocab():
        return None
    tokenizer_raw = load_plain_tokenizer(str(raw_folder))
    if PAD_TOKEN in tokenizer_raw.get_vocab():
        return None
    added = tokenizer_raw.add_special_tokens({"pad_token": PAD_TOKEN})
    return RawPadding(rows=len(tokenizer_raw), added=added) if added > 0 else None


def fp32_copy(reader: WeightReader, name: str, device: str):
    """Tensor `name` in fp32 on `device`, in memory of its own (so in-place arithmetic never touches a
    memory-mapped file and no second copy is needed)."""
    import torch

    stored = reader.get(name)
    tensor = stored.to(device=device, dtype=torch.float32)
    return tensor.clone() if tensor is stored and not reader.owns(name) else tensor


@dataclass
class DiffPlan:
    """Where each tensor of the model lives in the raw files and in the other folder (tuned or diff)."""

    layout: ModelLayout
    raw: WeightReader
    other: WeightReader
    raw_names: dict[str, str]
    other_names: dict[str, str]
    padding: RawPadding | None

    def padded(self, key: str) -> bool:
        return self.padding is not None and key in (self.layout.input_embedding, self.layout.output_embedding)

    def raw_tensor(self, key: str, device: str):
        """The raw tensor in fp32 on `device`, `[PAD]`-extended for the embeddings; the caller's to modify."""
        tensor = fp32_copy(self.raw, self.raw_names[key], device)
        return self.padding.apply(tensor) if self.padded(key) else tensor

    def other_tensor(self, key: str, device: str):
        """The tuned (or diff) tensor in fp32 on `device`; the caller's to modify."""
        return fp32_copy(self.other, self.other_names[key], device)

    def close(self) -> None:
        self.raw.close()
        self.other.close()


def unmatched_names(reader: WeightReader, layout: ModelLayout) -> list[str]:
    """Tensors in `reader`'s files that are no tensor of the model (a tied tensor stored under both its
    names is one tensor; buffers such as old checkpoints' `rotary_emb.inv_freq` are ignored, as
    `from_pretrained` ignores them)."""
    known = layout.file_names()
    buffers = {name.rsplit(".", 1)[-1] for name in layout.buffers}
    return sorted(n for n in reader.files if n not in known and n.rsplit(".", 1)[-1] not in buffers)


def plan_diff(raw_folder: Path, other_folder: Path, other: str, tokenizer_other) -> DiffPlan:
    """Open both folders, match every tensor of the model by name and check every shape, all before any
    arithmetic; a mismatch is a ValueError naming the first tensor."""
    layout = model_layout(other_folder, other)
    raw, theirs = WeightReader(raw_folder, "--path_raw"), WeightReader(other_folder, other)
    raw_names = {k: n for k in layout.keys if (n := layout.name_in(k, raw)) is not None}
    other_names = {k: n for k in layout.keys if (n := layout.name_in(k, theirs)) is not None}
    lacking = [k for k in layout.keys if k not in other_names]
    if lacking:
        raise ValueError(
            f"{other}={str(other_folder)!r} lacks tensors its config.json implies, e.g. {lacking[:3]}: the "
            "folder is incomplete or damaged"
        )
    only_other = [k for k in layout.keys if k not in raw_names]
    only_raw = unmatched_names(raw, layout)
    if only_other or only_raw:
        raise ValueError(
            f"--path_raw and {other} hold different tensors (only in {other}: {only_other[:3]}, only in raw: "
            f"{only_raw[:3]}): is --path_raw the model the diff belongs to?"
        )
    padding = raw_padding(raw_folder, tokenizer_other)
    plan = DiffPlan(layout, raw, theirs, raw_names, other_names, padding)
    for key in layout.keys:
        shape = theirs.shapes[other_names[key]]
        if shape != layout.shapes[key]:
            raise ValueError(
                f"{other}: tensor {key} has shape {shape} in its weight files but {layout.shapes[key]} in its "
                "config.json: the folder is inconsistent"
            )
        raw_shape = raw.shapes[raw_names[key]]
        if plan.padded(key):
            raw_shape = (padding.rows, *raw_shape[1:])
        if key == layout.input_embedding and raw_shape[0] != shape[0]:
            raise ValueError(
                f"--path_raw has {raw_shape[0]} embedding rows but the tuned/diff model has {shape[0]} (after "
                "adding [PAD] when the tuned tokenizer has it): was the diff made from another raw model?"
            )
        if raw_shape != shape:
            raise ValueError(
                f"tensor {key} has shape {shape} in {other} but {raw_shape} in --path_raw: is --path_raw "
                "the model the diff belongs to?"
            )
    return plan


def save_metadata(source: Path, tokenizer, output_dir: Path) -> None:
    """What save_pretrained writes beside the weights: the config (now float32), the generation config,
    and the tokenizer, plus the sentencepiece `tokenizer.model` when the source has one."""
    import torch

    config = load_model_config(str(source), "--path_tuned")
    config.dtype = torch.float32
    config.save_pretrained(output_dir)
    load_generation_config(str(source), config).save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    sp_model = source / "tokenizer.model"
    if sp_model.is_file():
        shutil.copy(sp_model, output_dir / "tokenizer.model")


@contextlib.contextmanager
def streamed_weights(folder: Path | None, layout: ModelLayout, max_shard_size: int):
    """A `SafetensorsWriter` for every tensor of `layout` in fp32 into `folder` (None: write nothing)."""
    if folder is None:
        yield None
        return
    writer = SafetensorsWriter(
        folder, [(key, layout.shapes[key], "float32") for key in layout.keys], max_shard_size
    )
    try:
        yield writer
        writer.close()
    finally:
        writer.abort()


@locks_output("--path_diff", lambda arguments: arguments["path_diff"])
def make_diff(
    path_raw: str,
    path_tuned: str,
    path_diff: str,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
) -> dict:
    """Write `tuned - raw` (fp32) to `path_diff`, one tensor at a time, with the tuned tokenizer and the
    per-tensor hashes of what recovery will rebuild. Returns the integrity record."""
    import torch
    from tqdm import tqdm

    shard_bytes = parse_size(max_shard_size)
    out = prepare_output_path(path_diff, overwrite, "--path_diff", (path_raw, path_tuned))
    check_model_path(path_tuned, "--path_tuned")
    path_raw, _ = resolve_base_model(path_raw, "--path_raw")
    tuned_folder = local_model_folder(path_tuned, "--path_tuned")
    raw_folder = local_model_folder(path_raw, "--path_raw")
    tokenizer_tuned = load_plain_tokenizer(str(tuned_folder))
    plan = plan_diff(raw_folder, tuned_folder, "--path_tuned", tokenizer_tuned)
    keys = plan.layout.keys
    tensors, total = {}, 0
    try:
        with torch.inference_mode(), staged_output(out) as staging:
            with streamed_weights(staging, plan.layout, shard_bytes) as writer:
                for key in tqdm(keys, desc="make_diff"):
                    # In place, so two tensors of this size are alive at a time; a - b and a + b are the
                    # same bits in place or not, and b + a == a + b, so `recovered` is exactly what
                    # recover's `diff + raw` will compute.
                    raw = plan.raw_tensor(key, device)
                    diff = plan.other_tensor(key, device).sub_(raw)
                    writer.write(key, diff.cpu())
                    recovered = raw.add_(diff)
                    del diff
                    tensors[key] = {"sha256": tensor_sha256(recovered), "shape": list(recovered.shape)}
                    total = total + recovered.sum()
                    del raw, recovered
            record = {"format": INTEGRITY_FORMAT, "dtype": "float32", "sum": float(total), "tensors": tensors}
            save_metadata(tuned_folder, tokenizer_tuned, staging)
            (staging / INTEGRITY_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    finally:
        plan.close()
    print(f"wrote weight diff of {len(keys)} tensors to {out} (hashes in {INTEGRITY_FILE})")
    return record


def check_naive_sum(total, integrity: dict | None) -> None:
    """Upstream's check: the sum of all recovered parameters (accumulated tensor by tensor in fp32)
    against the recorded (or Alpaca-7B) value."""
    import torch

    expected = integrity["sum"] if integrity else ALPACA_7B_SUM
    total = torch.as_tensor(total, dtype=torch.float32)
    if not torch.allclose(total, torch.full_like(total, expected), atol=NAIVE_SUM_ATOL, rtol=0):
        source = "recorded in the diff" if integrity else "of Alpaca-7B (this diff records no sum)"
        raise ValueError(
            f"naive integrity check failed: the recovered parameters sum to {float(total):.4f}, not the "
            f"{expected:.4f} {source}; pass --check_integrity_naively=False for other models"
        )
    print(f"naive integrity check passed: sum of all parameters {float(total):.4f}")


@contextlib.contextmanager
def recovery_folder(out: Path | None, needed: bool):
    """Where recovered weights go: staged and swapped into `out`; without `out`, a temporary folder when
    the smoke test needs the model on disk (deleted afterwards); else nowhere (check only)."""
    if out is not None:
        with staged_output(out) as staging:
            yield staging
    elif needed:
        with tempfile.TemporaryDirectory(prefix="alpaca-recovered-") as folder:
            print(f"no --path_tuned: recovering into the temporary folder {folder} for the smoke test")
            yield Path(folder)
    else:
        yield None


@locks_output("--path_tuned", lambda arguments: arguments["path_tuned"])
def recover(
    path_raw: str,
    path_diff: str,
    path_tuned: str | None = None,
    device: str = "cpu",
    test_inference: bool = True,
    check_integrity_naively: bool = True,
    overwrite: bool = False,
    prompt_template: str = DEFAULT_TEST_TEMPLATE,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
):
    """Rebuild the tuned model as `raw + diff` (fp32) one tensor at a time, check every tensor's hash,
    and write it with its tokenizer and the diff's integrity record when `path_tuned` is given.

    Returns (model, tokenizer): the recovered model as loaded for the smoke test (None without
    `test_inference`) and its tokenizer."""
    import torch
    from tqdm import tqdm

    shard_bytes = parse_size(max_shard_size)
    out = (
        prepare_output_path(path_tuned, overwrite, "--path_tuned", (path_raw, path_diff))
        if path_tuned
        else None
    )
    if test_inference:
        from alpaca.core.prompter import load_template

        load_template(prompt_template)  # a wrong template name fails now, not after the recovery
    check_model_path(path_diff, "--path_diff")
    path_raw, _ = resolve_base_model(path_raw, "--path_raw")
    diff_folder = local_model_folder(path_diff, "--path_diff")
    raw_folder = local_model_folder(path_raw, "--path_raw")
    integrity = read_integrity(str(diff_folder))
    if integrity is None:
        print(f"{path_diff} has no {INTEGRITY_FILE} (a diff made by upstream): per-tensor hashes not checked")
    tokenizer = load_plain_tokenizer(str(diff_folder))
    plan = plan_diff(raw_folder, diff_folder, "--path_diff", tokenizer)
    keys = plan.layout.keys
    if integrity is not None and sorted(keys) != sorted(integrity["tensors"]):
        missing = sorted(set(integrity["tensors"]) - set(keys))
        extra = sorted(set(keys) - set(integrity["tensors"]))
        if not missing:
            raise ValueError(
                f"tensor {extra[0]} is in the diff but not in its {INTEGRITY_FILE}: the diff was altered"
            )
        raise ValueError(
            f"the diff lacks tensors recorded in its {INTEGRITY_FILE}: {missing[:3]}; it was altered"
        )
    model = None
    try:
        with torch.inference_mode(), recovery_folder(out, test_inference) as folder:
            total = 0
            with streamed_weights(folder, plan.layout, shard_bytes) as writer:
                for key in tqdm(keys, desc="recover"):
                    raw = plan.raw_tensor(key, device)  # first: its [PAD] copy is made with one tensor alive
                    recovered = plan.other_tensor(key, device).add_(raw)
                    del raw
                    if integrity is not None:
                        check_recovered_tensor(key, recovered, integrity)
                    total = total + recovered.sum()
                    if writer is not None:
                        writer.write(key, recovered.cpu())
                    del recovered
                if integrity is not None:
                    print(f"all {len(keys)} recovered tensors match their recorded SHA-256")
                if check_integrity_naively:
                    check_naive_sum(total, integrity)
            plan.close()
            if folder is not None:
                save_metadata(diff_folder, tokenizer, folder)
                if integrity is not None:  # so `verify` can check this copy later
                    shutil.copy(diff_folder / INTEGRITY_FILE, folder / INTEGRITY_FILE)
            if test_inference:
                model = load_fp32_model(str(folder), device, "--path_tuned")
                run_test_inference(model, tokenizer, prompt_template)
    finally:
        plan.close()
    if out is not None:
        print(f"wrote recovered model to {out}")
    return model, tokenizer


def verify(path_tuned: str, integrity_file: str | None = None, device: str = "cpu") -> int:
    """Check a recovered model, one tensor at a time, against the per-tensor SHA-256 recorded when its
    diff was made (the `weight_diff_integrity.json` that `recover` copies beside it, or
    `integrity_file`). Returns the number of tensors checked; the first one that differs is a ValueError
    naming it. `device` is accepted for upstream-style commands; hashing runs on the CPU."""
    import torch

    check_model_path(path_tuned, "--path_tuned")
    if integrity_file:
        source = Path(integrity_file).expanduser()
        if not source.is_file():
            raise ValueError(f"--integrity_file={integrity_file!r}: no such file")
        integrity = read_integrity_file(source, "--integrity_file")
    else:
        integrity = read_integrity(path_tuned, "--path_tuned")
        if integrity is None:
            raise ValueError(
                f"--path_tuned={path_tuned!r} has no {INTEGRITY_FILE} (recover writes it since this version); "
                f"pass --integrity_file=<the diff folder>/{INTEGRITY_FILE}"
            )
    folder = local_model_folder(path_tuned, "--path_tuned")
    layout = model_layout(folder, "--path_tuned")
    reader = WeightReader(folder, "--path_tuned")
    try:
        names = {k: n for k in layout.keys if (n := layout.name_in(k, reader)) is not None}
        if sorted(names) != sorted(integrity["tensors"]):
            differ = sorted(set(names) ^ set(integrity["tensors"]))
            raise ValueError(
                f"--path_tuned={path_tuned!r} and the integrity record hold different tensors, e.g. {differ[:3]}"
            )
        for key in layout.keys:
            tensor = reader.get(names[key]).to(torch.float32)
            if tensor_sha256(tensor) != integrity["tensors"][key]["sha256"]:
                raise ValueError(
                    f"tensor {key} of {path_tuned} does not match the SHA-256 recorded when the diff was made: "
                    "the model was altered or damaged after recovery"
                )
            del tensor
    finally:
        reader.close()
    print(f"verified: all {len(layout.keys)} tensors of {path_tuned} match their recorded SHA-256")
    return len(layout.keys)
