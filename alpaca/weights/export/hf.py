"""The Hugging Face export: the merged model saved as safetensors shards with the tokenizer and the
generation config; the saved folder is reloaded and its logits compared with the adapter model's."""

from __future__ import annotations

from pathlib import Path

from alpaca.core.locks import locks_output
from alpaca.core.staging import prepare_output_path, staged_output
from alpaca.modeling import load_base_model, resolve_dtype
from alpaca.weights.export.core import (
    MergedModel,
    announce,
    check_adapter_path,
    check_logits_match,
    check_precision,
    compute_logits,
    copy_tokenizer_model,
    load_and_merge,
    resolve_export_inputs,
    write_export_info,
)


def save_hf_folder(merged: MergedModel, output_dir: Path, max_shard_size: str) -> None:
    """Save weights (safetensors shards), tokenizer, `tokenizer.model` and the generation config."""
    merged.model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    merged.tokenizer.save_pretrained(output_dir)
    copy_tokenizer_model(merged, output_dir)
    if not (output_dir / "generation_config.json").is_file():
        merged.model.generation_config.save_pretrained(output_dir)


@locks_output("--output_dir", lambda arguments: arguments["output_dir"])
def export_hf(
    base_model: str,
    lora_weights: str,
    output_dir: str = "./hf_ckpt",
    max_shard_size: str = "400MB",
    dtype: str = "base",
    overwrite: bool = False,
) -> dict:
    """Merge the adapter and save a Hugging Face folder; reload it and check its logits. Returns a summary."""
    check_precision(dtype)
    check_adapter_path(lora_weights)
    out = prepare_output_path(output_dir, overwrite, protect=(base_model, lora_weights))
    inputs = resolve_export_inputs(base_model, lora_weights, dtype)
    announce(
        "export_hf",
        **inputs.source(),
        output_dir=str(out),
        max_shard_size=max_shard_size,
        dtype=inputs.precision,
    )
    merged = load_and_merge(inputs)
    with staged_output(out) as staging:
        save_hf_folder(merged, staging, max_shard_size)
        del merged.model
        reloaded = load_base_model(str(staging), dtype=resolve_dtype(inputs.precision)).eval()
        saved_diff = check_logits_match(
            merged.reference_logits,
            compute_logits(reloaded, merged.input_ids),
            inputs.precision,
            "saved model",
            merged.adapter_effect,
        )
        info = dict(
            export="hf",
            **inputs.source(),
            dtype=inputs.precision,
            max_shard_size=max_shard_size,
            adapted_weights=len(merged.adapted_weights),
            adapter_effect=merged.adapter_effect,
            max_logit_diff_merged=merged.max_logit_diff,
            max_logit_diff_saved=saved_diff,
        )
        write_export_info(staging, info)
    print(f"wrote merged Hugging Face model to {out}")
    return info
