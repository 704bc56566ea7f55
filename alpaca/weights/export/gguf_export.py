"""`export_gguf`: merge the adapter and write the GGUF (f32, f16, bf16 or quantized), or the adapter as its
own GGUF (`gguf_adapter`), and an Ollama Modelfile beside it; the writer itself is `gguf`."""

from __future__ import annotations

import contextlib
from pathlib import Path

from alpaca.core.locks import locks_output
from alpaca.core.staging import prepare_output_path, staged_output
from alpaca.weights.export.core import (
    MergedModel,
    announce,
    check_adapter_path,
    check_logits_match,
    check_precision,
    compute_logits,
    load_and_merge,
    resolve_export_inputs,
    vocabulary_kind,
)
from alpaca.weights.export.gguf import bpe_pre_tokenizer, check_gguf_readback, write_gguf
from alpaca.weights.export.gguf_adapter import export_adapter_gguf
from alpaca.weights.export.gguf_quantized import write_quantized_gguf
from alpaca.weights.export.ollama import ollama_modelfile, prepare_modelfile_path, write_modelfile
from alpaca.weights.export.prompt_format import resolve_prompt_format
from alpaca.weights.export.quantize import check_outtype, is_quantized


def check_f16_weights(merged: MergedModel, outtype: str = "f16") -> float:
    """Round the merged matrices to f16 (or bf16) in place (the values the file will hold; norms stay
    f32) and require the logits to keep the adapter's effect: a small update that rounds away is an error."""
    import torch

    dtype, precision = (torch.bfloat16, "bf16") if outtype == "bf16" else (torch.float16, "fp16")
    with torch.no_grad():
        for param in merged.model.parameters():
            if param.ndim > 1:
                param.copy_(param.to(dtype).to(param.dtype))
    return check_logits_match(
        merged.reference_logits,
        compute_logits(merged.model, merged.input_ids),
        precision,
        f"{outtype} GGUF model",
        merged.adapter_effect,
        remedy="Write the GGUF with --outtype=f32.",
    )


def default_gguf_path(outtype: str, adapter_only: bool = False) -> str:
    return "./alpaca-lora-adapter.gguf" if adapter_only else f"./alpaca-lora-{outtype}.gguf"


@locks_output(
    "--output_file",
    lambda arguments: (
        arguments["output_file"]
        or default_gguf_path(arguments["outtype"], arguments.get("adapter_only", False))
    ),
)
def export_gguf(
    base_model: str,
    lora_weights: str,
    output_file: str | None = None,
    outtype: str = "f16",
    dtype: str = "fp32",
    model_name: str | None = None,
    overwrite: bool = False,
    adapter_only: bool = False,
    ollama: bool = False,
    prompt_template: str = "",
) -> dict:
    """Merge the adapter and write one GGUF file for llama.cpp (quantized for a q* outtype); read it back
    and check it. `adapter_only` writes the LoRA adapter as its own GGUF instead (and the base beside it
    unless the base is a .gguf file); `ollama` writes a Modelfile beside the file."""
    output_file = output_file or default_gguf_path(outtype, adapter_only)
    check_outtype(outtype, adapter_only)
    if not str(output_file).endswith(".gguf"):
        raise ValueError(f"--output_file={output_file!r}: give a file name ending in .gguf")
    check_precision(dtype)
    check_adapter_path(lora_weights)
    if adapter_only:
        return export_adapter_gguf(
            base_model, lora_weights, output_file, outtype, model_name, overwrite, ollama, prompt_template
        )
    path = prepare_output_path(
        output_file, overwrite, "--output_file", (base_model, lora_weights), is_file=True
    )
    inputs = resolve_export_inputs(base_model, lora_weights, dtype, "the GGUF export")
    vocab_type = vocabulary_kind(inputs)
    if vocab_type == "bpe":
        bpe_pre_tokenizer(inputs.tokenizer)  # an unknown pre-tokenizer is refused before the merge
    prompt_format = resolve_prompt_format(lora_weights, prompt_template)
    inputs.tokenizer.chat_template = prompt_format.chat_template  # the file and the Modelfile agree
    modelfile = prepare_modelfile_path(path, overwrite, prompt_format, inputs.tokenizer) if ollama else None
    announce("export_gguf", **inputs.source(), output_file=str(path), outtype=outtype, dtype=inputs.precision)
    merged = load_and_merge(inputs)
    if outtype in ("f16", "bf16"):
        check_f16_weights(merged, outtype)
    name_hint = Path(inputs.folder.rstrip("/")).name or "model"
    info = dict(export="gguf", **inputs.source(), path=str(path), outtype=outtype, dtype=inputs.precision)
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(staged_output(path, is_file=True))
        if is_quantized(outtype):
            count, cost = write_quantized_gguf(
                merged, inputs, staging, outtype, model_name, name_hint, vocab_type, prompt_format
            )
            info["quantization"] = cost.to_dict()
            print(f"read back {count} tensors from {path}: dequantized and measured against the merged model")
        else:
            tensors = write_gguf(merged, staging, outtype, model_name, name_hint, vocab_type)
            check_gguf_readback(staging, tensors, merged.model.config)
            count = len(tensors)
            print(f"read back {count} tensors from {path}: all equal to the merged weights")
        if modelfile is not None:
            info["modelfile"] = str(modelfile)
            write_modelfile(
                stack.enter_context(staged_output(modelfile, is_file=True)),
                ollama_modelfile(f"./{path.name}", None, prompt_format, merged.tokenizer),
            )
    print(f"wrote GGUF ({outtype}, {vocab_type} vocabulary) to {path}")
    if modelfile is not None:
        print(f"wrote {modelfile}: ollama create NAME -f {modelfile}")
    return dict(
        info,
        vocab_type=vocab_type,
        tensors=count,
        adapter_effect=merged.adapter_effect,
        max_logit_diff_merged=merged.max_logit_diff,
        prompt_template=prompt_format.name,
        training_format=prompt_format.kind,
    )
