"""The LoRA adapter as its own GGUF, for `llama-server --lora` and Ollama's ADAPTER without a merge.

The file is what llama.cpp's `convert_lora_to_gguf.py` writes: `general.type=adapter`, `adapter.type=lora`,
`adapter.lora.alpha`, and for every adapted matrix `<tensor>.lora_a` (rank x in) and `<tensor>.lora_b`
(out x rank) in f32 under llama.cpp's tensor names, lora_b of q/k rows in Meta's rotary order. llama.cpp
scales the update by alpha / rank. llama.cpp needs the base as a GGUF too: a `.gguf` base is used as it
is; any other base is written beside the adapter (`<name>.base-<outtype>.gguf`) by the merged export's
writer.

The self-check rebuilds every adapted weight from the file as llama.cpp will (W + alpha / rank * B A)
and requires the logits of peft's adapter model, as the merged export does.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from alpaca.core.staging import prepare_output_path, staged_output
from alpaca.modeling import (
    load_adapter,
    load_base_model,
    read_adapter_config,
    resolve_dtype,
)
from alpaca.weights.export.core import (
    MergedModel,
    announce,
    check_logits_match,
    compute_logits,
    max_logit_difference,
    resolve_export_inputs,
    self_check_inputs,
    unpermute_rotary,
    vocabulary_kind,
)
from alpaca.weights.export.gguf import bpe_pre_tokenizer, check_gguf_readback, write_gguf
from alpaca.weights.export.ollama import ollama_modelfile, prepare_modelfile_path, write_modelfile
from alpaca.weights.export.prompt_format import resolve_prompt_format
from alpaca.weights.export.quantize import check_outtype


def check_adapter_for_gguf(adapter_config: dict | None, inputs) -> None:
    """Refuse, in one line, adapters llama.cpp's LoRA format cannot hold (as its converter refuses them)."""
    if adapter_config is None:
        raise ValueError("--adapter_only needs a local adapter folder for --lora_weights")
    problems = []
    if adapter_config.get("use_dora"):
        problems.append("it is a DoRA adapter")
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        problems.append("its rank or alpha varies by layer (llama.cpp takes one alpha per file)")
    if adapter_config.get("modules_to_save") or adapter_config.get("trainable_token_indices"):
        problems.append("it trains whole modules or token rows besides the LoRA matrices")
    if len(inputs.tokenizer) > inputs.config.vocab_size:
        added = inputs.tokenizer.convert_ids_to_tokens(
            list(range(inputs.config.vocab_size, len(inputs.tokenizer)))
        )
        problems.append(
            f"training added {len(added)} tokens to the vocabulary ({', '.join(added[:4])}"
            f"{', ...' if len(added) > 4 else ''}; a chat format such as --chat_template=chatml adds its "
            "markers), and a LoRA GGUF cannot carry their embedding rows"
        )
    if problems:
        raise ValueError(
            f"--adapter_only: the adapter cannot be a llama.cpp LoRA GGUF: {'; '.join(problems)}; "
            "export the merged model instead (without --adapter_only)"
        )


def llama_cpp_alpha(adapter_config: dict) -> float:
    """The alpha for llama.cpp's scale alpha / rank: peft's own alpha, or for rsLoRA (scale alpha /
    sqrt(rank)) the alpha that gives the same scale."""
    alpha = float(adapter_config["lora_alpha"])
    if adapter_config.get("use_rslora"):
        alpha *= math.sqrt(adapter_config["r"])
    return alpha


def base_weight_name(key: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` -> `model.layers.0.self_attn.q_proj.weight`."""
    name = key.removeprefix("base_model.model.")
    return name.replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")


def lora_gguf_tensors(lora_state: dict, config) -> dict:
    """GGUF name -> (float32 array, F32) for every lora_a / lora_b, in convert_lora_to_gguf.py's layout."""
    import gguf
    import numpy as np

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    tensors = {}
    for key in sorted(lora_state):
        if ".lora_A." not in key and ".lora_B." not in key:
            raise ValueError(f"--adapter_only: the adapter holds {key!r}, not a LoRA matrix")
        base_name = base_weight_name(key)
        new_name = name_map.get_name(base_name, try_suffixes=(".weight",))
        if new_name is None or base_name.startswith("lm_head"):
            raise ValueError(f"--adapter_only: llama.cpp has no LoRA target for {base_name!r}")
        tensor = lora_state[key].detach().float()
        if ".lora_B." in key and base_name.endswith("q_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_attention_heads)
        elif ".lora_B." in key and base_name.endswith("k_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_key_value_heads)
        suffix = ".lora_a" if ".lora_A." in key else ".lora_b"
        tensors[new_name + suffix] = (
            tensor.contiguous().numpy().astype(np.float32),
            gguf.GGMLQuantizationType.F32,
        )
    return tensors


def write_lora_gguf(
    path: Path, tensors: dict, alpha: float, lora_weights: str, base_folder: str, model_name
) -> None:
    """Write the adapter GGUF with the keys convert_lora_to_gguf.py writes (the model card metadata from
    the adapter folder, as that converter reads it)."""
    import gguf

    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    total, shared, expert, expert_count = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, Path(lora_weights), model_name, total)
    if metadata.name is None:
        metadata.name = Path(base_folder.rstrip("/")).name
    if metadata.size_label is None and total > 0:
        metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_lora_gguf(path: Path) -> tuple[dict, float]:
    """(GGUF name -> float32 array, alpha) of an adapter GGUF; its type keys must say LoRA adapter."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    keys = {key: field.contents() for key, field in reader.fields.items()}
    if keys.get("general.type") != "adapter" or keys.get("adapter.type") != "lora":
        raise ValueError(f"self-check failed: {path} is not marked as a LoRA adapter")
    arrays = {t.name: np.array(t.data).reshape([int(n) for n in reversed(t.shape)]) for t in reader.tensors}
    return arrays, float(keys["adapter.lora.alpha"])


def rebuilt_weights(arrays: dict, alpha: float, base_weights: dict, config, gguf_names: dict) -> dict:
    """Each adapted weight as llama.cpp computes it from the files: W + alpha / rank * B A (HF layout)."""
    import torch

    from alpaca.weights.export.core import permute_rotary

    weights = {}
    for name, base in base_weights.items():
        stem = gguf_names[name]
        a = torch.from_numpy(arrays[f"{stem}.lora_a"].copy())
        b = torch.from_numpy(arrays[f"{stem}.lora_b"].copy())
        if name.endswith("q_proj.weight"):
            b = permute_rotary(b, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            b = permute_rotary(b, config.num_key_value_heads)
        weights[name] = base + (alpha / a.shape[0]) * (b @ a)
    return weights


def base_gguf_path(path: Path, outtype: str) -> Path:
    return path.with_name(f"{path.name.removesuffix('.gguf')}.base-{outtype}.gguf")


def export_adapter_gguf(
    base_model: str,
    lora_weights: str,
    output_file: str,
    outtype: str,
    model_name: str | None,
    overwrite: bool,
    ollama: bool,
    prompt_template: str,
) -> dict:
    """Write the adapter GGUF (and the base GGUF beside it unless the base is a .gguf file); check that
    base + adapter, as llama.cpp combines them, gives the adapter model's logits."""
    import gguf
    from peft.utils import load_peft_weights

    from alpaca.weights.export.quantize import load_weights

    check_outtype(outtype, adapter_only=True)
    protect = (base_model, lora_weights)
    path = prepare_output_path(output_file, overwrite, "--output_file", protect, is_file=True)
    inputs = resolve_export_inputs(base_model, lora_weights, "fp32", "the GGUF export")
    adapter_config = read_adapter_config(lora_weights)
    check_adapter_for_gguf(adapter_config, inputs)
    base_path = None if str(base_model).lower().endswith(".gguf") else base_gguf_path(path, outtype)
    vocab_type = None
    if base_path is not None:
        base_path = prepare_output_path(str(base_path), overwrite, "--output_file", protect, is_file=True)
        vocab_type = vocabulary_kind(inputs)
        if vocab_type == "bpe":
            bpe_pre_tokenizer(inputs.tokenizer)
    prompt_format = resolve_prompt_format(lora_weights, prompt_template)
    inputs.tokenizer.chat_template = prompt_format.chat_template
    modelfile = prepare_modelfile_path(path, overwrite, prompt_format, inputs.tokenizer) if ollama else None
    announce(
        "export_gguf --adapter_only",
        **inputs.source(),
        output_file=str(path),
        base_gguf=str(base_path or Path(base_model).expanduser().resolve()),
        outtype=outtype,
    )
    config = inputs.config
    lora_state = load_peft_weights(lora_weights, device="cpu")
    tensors = lora_gguf_tensors(lora_state, config)
    alpha = llama_cpp_alpha(adapter_config)
    model = load_base_model(inputs.folder, dtype=resolve_dtype("fp32"), device_map={"": "cpu"}).eval()
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    adapted = sorted({base_weight_name(key) for key in lora_state})
    gguf_names = {name: name_map.get_name(name, try_suffixes=(".weight",)) for name in adapted}
    base_weights = {name: model.get_parameter(name).detach().clone() for name in adapted}
    input_ids = self_check_inputs(inputs.tokenizer)
    base_logits = compute_logits(model, input_ids)
    info = dict(
        export="gguf-adapter", **inputs.source(), path=str(path), lora_alpha=alpha, tensors=len(tensors)
    )
    with contextlib.ExitStack() as stack:
        if base_path is not None:
            base_staging = stack.enter_context(staged_output(base_path, is_file=True))
            base = MergedModel(model, inputs.tokenizer, inputs.tokenizer_dir, inputs.folder, "fp32")
            name_hint = Path(inputs.folder.rstrip("/")).name or "model"
            base_tensors = write_gguf(base, base_staging, outtype, model_name, name_hint, vocab_type)
            check_gguf_readback(base_staging, base_tensors, config)
            info.update(base_gguf=str(base_path), base_outtype=outtype)
        else:
            info["base_gguf"] = str(Path(base_model).expanduser().resolve())
        staging = stack.enter_context(staged_output(path, is_file=True))
        write_lora_gguf(staging, tensors, alpha, lora_weights, inputs.folder, model_name)
        arrays, file_alpha = read_lora_gguf(staging)
        if sorted(arrays) != sorted(tensors) or any((arrays[n] != tensors[n][0]).any() for n in tensors):
            raise ValueError(
                f"self-check failed: the tensors read back from {path} differ from the adapter's"
            )
        peft_model = load_adapter(model, lora_weights)
        reference = compute_logits(peft_model, input_ids)
        effect = max_logit_difference(reference, base_logits)
        model = peft_model.unload()
        load_weights(model, rebuilt_weights(arrays, file_alpha, base_weights, config, gguf_names))
        info["max_logit_diff_rebuilt"] = check_logits_match(
            reference, compute_logits(model, input_ids), "fp32", "base + adapter GGUF", effect
        )
        info["adapter_effect"] = effect
        if modelfile is not None:
            info["modelfile"] = str(modelfile)
            from_path = f"./{base_path.name}" if base_path is not None else info["base_gguf"]
            write_modelfile(
                stack.enter_context(staged_output(modelfile, is_file=True)),
                ollama_modelfile(from_path, f"./{path.name}", prompt_format, inputs.tokenizer),
            )
    print(f"wrote the LoRA adapter GGUF ({len(tensors)} tensors, alpha {alpha:g}) to {path}")
    if base_path is not None:
        print(f"wrote the base GGUF ({outtype}) to {base_path}")
    if modelfile is not None:
        print(f"wrote {modelfile}: ollama create NAME -f {modelfile}")
    return dict(info, prompt_template=prompt_format.name, training_format=prompt_format.kind)
