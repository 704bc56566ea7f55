"""Weight diffs (tuned minus raw, in fp32) for publishing a fine-tune whose base may not be shared.

The arithmetic is Stanford Alpaca's, so its published Alpaca-7B diff recovers with this code: both models
in fp32; the raw model first gets the `[PAD]` token with a mean-initialised embedding row when the tuned
tokenizer has it; the diff is `tuned - raw` and recovery adds `raw` back, tensor by tensor, in place (two
models in memory, no more).

Beyond upstream, `make_diff` records the SHA-256 of every tensor that recovery will rebuild (`raw + diff`
in fp32, which is not always bit-equal to `tuned`), and `recover` checks each one and names the first
tensor that does not match. Upstream's only check, one global sum against a 7B constant, stays as an
option; for other models it compares with the sum recorded in the diff.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from alpaca.modeling import (
    PAD_TOKEN,
    check_model_path,
    damaged_weights,
    load_base_model,
    load_plain_tokenizer,
    prepare_output_path,
    resize_embeddings_for_new_tokens,
    resolve_base_model,
    staged_output,
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


def match_raw_vocabulary(model_raw, tokenizer_raw, tokenizer_tuned, model_tuned) -> None:
    """Give the raw model Alpaca's `[PAD]` (mean-initialised) when the tuned tokenizer has it, then require
    equal embedding sizes."""
    if PAD_TOKEN in tokenizer_tuned.get_vocab() and PAD_TOKEN not in tokenizer_raw.get_vocab():
        added = tokenizer_raw.add_special_tokens({"pad_token": PAD_TOKEN})
        resize_embeddings_for_new_tokens(model_raw, tokenizer_raw, added)
    raw_rows = model_raw.get_input_embeddings().weight.shape[0]
    tuned_rows = model_tuned.get_input_embeddings().weight.shape[0]
    if raw_rows != tuned_rows:
        raise ValueError(
            f"--path_raw has {raw_rows} embedding rows but the tuned/diff model has {tuned_rows} "
            "(after adding [PAD] when the tuned tokenizer has it): was the diff made from another raw model?"
        )


def unique_keys(state: dict) -> list[str]:
    """State-dict keys with tied tensors (same storage) listed once, so in-place updates apply once."""
    seen, keys = set(), []
    for key, tensor in state.items():
        pointer = (tensor.data_ptr(), tensor.shape)
        if pointer not in seen:
            seen.add(pointer)
            keys.append(key)
    return keys


def check_same_tensors(state_raw: dict, state_other: dict, other: str) -> None:
    """Same tensor names and shapes in both models, or a ValueError naming the first difference."""
    missing = sorted(set(state_other) - set(state_raw))
    extra = sorted(set(state_raw) - set(state_other))
    if missing or extra:
        raise ValueError(
            f"--path_raw and {other} hold different tensors (only in {other}: {missing[:3]}, only in raw: "
            f"{extra[:3]}): is --path_raw the model the diff belongs to?"
        )
    for key, tensor in state_other.items():
        if state_raw[key].shape != tensor.shape:
            raise ValueError(
                f"tensor {key} has shape {tuple(tensor.shape)} in {other} but {tuple(state_raw[key].shape)} "
                "in --path_raw: is --path_raw the model the diff belongs to?"
            )


def naive_sum(state: dict, keys: list[str]):
    """Upstream's integrity number: the sum of every parameter, accumulated tensor by tensor in fp32."""
    return sum(state[key].sum() for key in keys)


def save_with_tokenizer(model, tokenizer, tokenizer_source: str, output_dir: Path) -> None:
    """Save the model and its tokenizer, plus the sentencepiece `tokenizer.model` when there is one."""
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    sp_model = Path(tokenizer_source) / "tokenizer.model"
    if sp_model.is_file():
        shutil.copy(sp_model, output_dir / "tokenizer.model")


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


def make_diff(
    path_raw: str, path_tuned: str, path_diff: str, device: str = "cpu", overwrite: bool = False
) -> dict:
    """Write `tuned - raw` (fp32) to `path_diff` with the tuned tokenizer and the per-tensor hashes of
    what recovery will rebuild. Returns the integrity record."""
    import torch
    from tqdm import tqdm

    out = prepare_output_path(path_diff, overwrite, "--path_diff", (path_raw, path_tuned))
    check_model_path(path_tuned, "--path_tuned")
    path_raw, _ = resolve_base_model(path_raw, "--path_raw")
    with torch.inference_mode():
        model_tuned = load_fp32_model(path_tuned, device, "--path_tuned")
        model_raw = load_fp32_model(path_raw, device, "--path_raw")
        tokenizer_tuned = load_plain_tokenizer(path_tuned)
        match_raw_vocabulary(model_raw, load_plain_tokenizer(path_raw), tokenizer_tuned, model_tuned)
        state_tuned, state_raw = model_tuned.state_dict(), model_raw.state_dict()
        check_same_tensors(state_raw, state_tuned, "--path_tuned")
        keys = unique_keys(state_tuned)
        tensors, total = {}, 0
        for key in tqdm(keys, desc="make_diff"):
            state_tuned[key].sub_(state_raw[key])
            recovered = state_tuned[key] + state_raw[key]  # exactly what recover's add_ will produce
            tensors[key] = {"sha256": tensor_sha256(recovered), "shape": list(recovered.shape)}
            total = total + recovered.sum()
            del recovered
        record = {
            "format": INTEGRITY_FORMAT,
            "dtype": "float32",
            "sum": float(total),
            "tensors": tensors,
        }
        with staged_output(out) as staging:
            save_with_tokenizer(model_tuned, tokenizer_tuned, path_tuned, staging)
            (staging / INTEGRITY_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote weight diff of {len(keys)} tensors to {out} (hashes in {INTEGRITY_FILE})")
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


def check_naive_sum(state: dict, keys: list[str], integrity: dict | None) -> None:
    """Upstream's check: the sum of all recovered parameters against the recorded (or Alpaca-7B) value."""
    import torch

    expected = integrity["sum"] if integrity else ALPACA_7B_SUM
    allsum = naive_sum(state, keys)
    if not torch.allclose(allsum, torch.full_like(allsum, expected), atol=NAIVE_SUM_ATOL, rtol=0):
        source = "recorded in the diff" if integrity else "of Alpaca-7B (this diff records no sum)"
        raise ValueError(
            f"naive integrity check failed: the recovered parameters sum to {float(allsum):.4f}, not the "
            f"{expected:.4f} {source}; pass --check_integrity_naively=False for other models"
        )
    print(f"naive integrity check passed: sum of all parameters {float(allsum):.4f}")


def run_test_inference(model, tokenizer, prompt_template: str = DEFAULT_TEST_TEMPLATE) -> str:
    """Upstream's smoke test: greedy-generate from a fixed instruction in the training prompt and print it."""
    from alpaca.prompter import Prompter

    prompt = Prompter(prompt_template).generate_prompt(TEST_INSTRUCTION)
    inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
    out = model.generate(
        inputs=inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=100, do_sample=False
    )
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    print(f"Input: {prompt}\nOutput: {text}")
    return text


def recover(
    path_raw: str,
    path_diff: str,
    path_tuned: str | None = None,
    device: str = "cpu",
    test_inference: bool = True,
    check_integrity_naively: bool = True,
    overwrite: bool = False,
    prompt_template: str = DEFAULT_TEST_TEMPLATE,
):
    """Rebuild the tuned model as `raw + diff` (fp32), check every tensor's hash, save it with its
    tokenizer and the diff's integrity record when `path_tuned` is given. Returns (model, tokenizer)."""
    import torch
    from tqdm import tqdm

    out = (
        prepare_output_path(path_tuned, overwrite, "--path_tuned", (path_raw, path_diff))
        if path_tuned
        else None
    )
    if test_inference:
        from alpaca.prompter import load_template

        load_template(prompt_template)  # a wrong template name fails now, not after the recovery
    check_model_path(path_diff, "--path_diff")
    path_raw, _ = resolve_base_model(path_raw, "--path_raw")
    integrity = read_integrity(path_diff)
    if integrity is None:
        print(f"{path_diff} has no {INTEGRITY_FILE} (a diff made by upstream): per-tensor hashes not checked")
    with torch.inference_mode():
        model_raw = load_fp32_model(path_raw, device, "--path_raw")
        model_recovered = load_fp32_model(path_diff, device, "--path_diff")
        tokenizer_recovered = load_plain_tokenizer(path_diff)
        match_raw_vocabulary(model_raw, load_plain_tokenizer(path_raw), tokenizer_recovered, model_recovered)
        state_recovered, state_raw = model_recovered.state_dict(), model_raw.state_dict()
        check_same_tensors(state_raw, state_recovered, "--path_diff")
        keys = unique_keys(state_recovered)
        if integrity is not None and sorted(keys) != sorted(integrity["tensors"]):
            missing = sorted(set(integrity["tensors"]) - set(keys))
            raise ValueError(
                f"the diff lacks tensors recorded in its {INTEGRITY_FILE}: {missing[:3]}; it was altered"
            )
        for key in tqdm(keys, desc="recover"):
            state_recovered[key].add_(state_raw[key])
            if integrity is not None:
                check_recovered_tensor(key, state_recovered[key], integrity)
        del model_raw, state_raw
        if integrity is not None:
            print(f"all {len(keys)} recovered tensors match their recorded SHA-256")
        if check_integrity_naively:
            check_naive_sum(state_recovered, keys, integrity)
        if out is not None:
            with staged_output(out) as staging:
                save_with_tokenizer(model_recovered, tokenizer_recovered, path_diff, staging)
                if integrity is not None:  # so `verify` can check this copy later
                    shutil.copy(Path(path_diff) / INTEGRITY_FILE, staging / INTEGRITY_FILE)
            print(f"wrote recovered model to {out}")
        if test_inference:
            run_test_inference(model_recovered, tokenizer_recovered, prompt_template)
    return model_recovered, tokenizer_recovered


def verify(path_tuned: str, integrity_file: str | None = None, device: str = "cpu") -> int:
    """Check a recovered model against the per-tensor SHA-256 recorded when its diff was made (the
    `weight_diff_integrity.json` that `recover` copies beside it, or `integrity_file`). Returns the
    number of tensors checked; the first one that differs is a ValueError naming it."""
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
    with torch.inference_mode():
        model = load_fp32_model(path_tuned, device, "--path_tuned")
        state = model.state_dict()
        keys = unique_keys(state)
        if sorted(keys) != sorted(integrity["tensors"]):
            differ = sorted(set(keys) ^ set(integrity["tensors"]))
            raise ValueError(
                f"--path_tuned={path_tuned!r} and the integrity record hold different tensors, e.g. {differ[:3]}"
            )
        for key in keys:
            if tensor_sha256(state[key]) != integrity["tensors"][key]["sha256"]:
                raise ValueError(
                    f"tensor {key} of {path_tuned} does not match the SHA-256 recorded when the diff was made: "
                    "the model was altered or damaged after recovery"
                )
    print(f"verified: all {len(keys)} tensors of {path_tuned} match their recorded SHA-256")
    return len(keys)
