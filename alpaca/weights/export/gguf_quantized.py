"""Write a quantized GGUF of the merged model and check what the quantization costs.

Block types (q8_0, q4_0, q4_1, q5_0, q5_1) are quantized here with the `gguf` package and read back
byte for byte; K-quants are made by llama.cpp's quantizer from an f32 file. Either way the file is then
dequantized and measured against the merged model in fp32 (logit error, held-out loss), and against
the base quantized the same way: the quantized merged model must be measurably closer to the merged
model than the quantized base is, or the quantization wiped out the adapter's update.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from alpaca.modeling import load_base_model, resize_embeddings_for_new_tokens, resolve_dtype
from alpaca.weights.export.core import ExportInputs, MergedModel
from alpaca.weights.export.gguf import check_gguf_readback, gguf_tensors, write_gguf
from alpaca.weights.export.prompt_format import PromptFormat
from alpaca.weights.export.quantize import (
    K_OUTTYPES,
    QuantizationCost,
    check_quantization_cost,
    dequantize_array,
    gguf_to_hf_names,
    hf_weights,
    llama_cpp_quantize,
    measure_quantization,
    read_gguf_arrays,
)


def changed_base_weights(inputs: ExportInputs, merged: MergedModel) -> tuple[object, dict]:
    """The base model (loaded as the merge loaded it) and its tensors that the merge changed
    (parameter name -> fp32 tensor)."""
    import torch

    base = load_base_model(inputs.folder, dtype=resolve_dtype(inputs.precision), device_map={"": "cpu"})
    extra = len(merged.tokenizer) - base.get_input_embeddings().weight.shape[0]
    if extra > 0:
        resize_embeddings_for_new_tokens(base, merged.tokenizer, extra)
    base.eval()
    merged_params = dict(merged.model.named_parameters())
    changed = {
        name: param.detach().float()
        for name, param in base.named_parameters()
        if not torch.equal(param, merged_params[name])
    }
    return base, changed


def quantized_base_weights(
    base,
    changed: dict,
    merged: MergedModel,
    outtype: str,
    model_name: str | None,
    name_hint: str,
    vocab_type: str,
    workdir: Path,
) -> dict:
    """The changed tensors of the base quantized as the merged model's file is, dequantized again."""
    model = merged.model
    if outtype in K_OUTTYPES:
        # llama.cpp chooses a K-quant mixture over the whole file: quantize the whole base the same way.
        base_merged = MergedModel(base, merged.tokenizer, merged.tokenizer_dir, merged.base_model, "fp32")
        write_gguf(base_merged, workdir / "base-f32.gguf", "f32", model_name, name_hint, vocab_type)
        llama_cpp_quantize(workdir / "base-f32.gguf", workdir / f"base-{outtype}.gguf", outtype)
        wanted = {gguf_name for gguf_name, name in gguf_to_hf_names(model).items() if name in changed}
        arrays = {
            name: array
            for name, (array, _) in read_gguf_arrays(workdir / f"base-{outtype}.gguf").items()
            if name in wanted
        }
    else:
        tensors = gguf_tensors(model, outtype, state=changed)
        shapes = {
            gguf_name: tuple(changed[name].shape)
            for gguf_name, name in gguf_to_hf_names(model).items()
            if name in changed
        }
        arrays = {
            name: dequantize_array(data, qtype, shapes[name]) for name, (data, qtype) in tensors.items()
        }
    return hf_weights(arrays, model)


def check_quantized_readback(path: Path, config, names: set) -> None:
    """A K-quant file (llama.cpp's): the tensors of the f32 file, and the main hyperparameters."""
    import gguf

    check_gguf_readback(path, {}, config, check_tensors=False)
    found = {tensor.name for tensor in gguf.GGUFReader(path).tensors}
    if found != names:
        raise ValueError(f"self-check failed: {path} holds tensors {sorted(found ^ names)} unexpectedly")


def write_quantized_gguf(
    merged: MergedModel,
    inputs: ExportInputs,
    staging: Path,
    outtype: str,
    model_name: str | None,
    name_hint: str,
    vocab_type: str,
    prompt_format: PromptFormat,
) -> tuple[int, QuantizationCost]:
    """Write `staging` in `outtype`, read it back, and measure and check what the quantization costs."""
    base, changed = changed_base_weights(inputs, merged)
    with tempfile.TemporaryDirectory(dir=staging.parent, prefix=f".{staging.name}.") as tmp:
        workdir = Path(tmp)
        if outtype in K_OUTTYPES:
            tensors = write_gguf(
                merged, workdir / "merged-f32.gguf", "f32", model_name, name_hint, vocab_type
            )
            llama_cpp_quantize(workdir / "merged-f32.gguf", staging, outtype)
            check_quantized_readback(staging, merged.model.config, set(tensors))
        else:
            tensors = write_gguf(merged, staging, outtype, model_name, name_hint, vocab_type)
            check_gguf_readback(staging, tensors, merged.model.config)
        base_weights = quantized_base_weights(
            base, changed, merged, outtype, model_name, name_hint, vocab_type, workdir
        )
    del base
    weights = hf_weights(
        {name: array for name, (array, _) in read_gguf_arrays(staging).items()}, merged.model
    )
    cost = measure_quantization(
        merged.model,
        merged.tokenizer,
        merged.input_ids,
        weights,
        base_weights,
        changed,
        prompt_format.prompter(),
        outtype,
        prompt_format.loss_chat_template(),
    )
    check_quantization_cost(cost)
    return len(tensors), cost
