"""The Meta export: `consolidated.00.pth` + `params.json` + the tokenizer (`tokenizer.model`, or the
`tokenizer.json` of a BPE model) in the layout of the original LLaMA release, read by llama.cpp's legacy
converter; q/k are un-permuted from the HF rotary layout and the result is permuted back and compared."""

from __future__ import annotations

import json
from pathlib import Path

from alpaca.core.locks import locks_output
from alpaca.core.staging import prepare_output_path, staged_output
from alpaca.weights.export.core import (
    announce,
    check_adapter_path,
    check_precision,
    copy_tokenizer_model,
    load_and_merge,
    permute_rotary,
    resolve_export_inputs,
    rope_settings,
    unpermute_rotary,
    vocabulary_kind,
    write_export_info,
)

# HF LLaMA module names -> Meta's (layer-local names after `model.layers.N.` / `layers.N.`).
HF_TO_META_LAYER = {
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
HF_TO_META_TOP = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}


def hf_to_meta_name(name: str) -> str:
    if name in HF_TO_META_TOP:
        return HF_TO_META_TOP[name]
    parts = name.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in HF_TO_META_LAYER:
        return f"layers.{parts[2]}.{HF_TO_META_LAYER[parts[3]]}"
    raise ValueError(f"tensor {name!r} has no place in Meta's LLaMA layout")


def meta_state_dict(model) -> dict:
    """The merged model's weights under Meta's names, q/k un-permuted (k with the KV head count)."""
    config = model.config
    state = dict(model.state_dict())
    state["lm_head.weight"] = model.get_output_embeddings().weight
    meta = {}
    for name, tensor in state.items():
        meta_name = hf_to_meta_name(name)
        tensor = tensor.detach()
        if name.endswith("q_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_key_value_heads)
        meta[meta_name] = tensor.contiguous().clone()
    return meta


def check_meta_roundtrip(meta: dict, model) -> None:
    """Permute the Meta tensors back and require them bit-equal to the merged model's weights."""
    import torch

    config = model.config
    state = dict(model.state_dict())
    state["lm_head.weight"] = model.get_output_embeddings().weight
    if len(meta) != len(state):
        raise ValueError(f"self-check failed: {len(meta)} Meta tensors for {len(state)} model tensors")
    for name, tensor in state.items():
        back = meta[hf_to_meta_name(name)]
        if name.endswith("q_proj.weight"):
            back = permute_rotary(back, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            back = permute_rotary(back, config.num_key_value_heads)
        if not torch.equal(back, tensor):
            raise ValueError(
                f"self-check failed: Meta tensor for {name} does not map back to the merged weight"
            )


def meta_ffn_params(dim: int, ffn_size: int) -> dict:
    """`multiple_of` (and `ffn_dim_multiplier` if needed) that make Meta's FFN formula give `ffn_size`."""

    def meta_formula(multiple_of: int, multiplier: float | None) -> int:
        hidden = int(2 * (4 * dim) / 3)
        if multiplier is not None:
            hidden = int(multiplier * hidden)
        return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

    for multiple_of in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if meta_formula(multiple_of, None) == ffn_size:
            return {"multiple_of": multiple_of}
    base = int(2 * (4 * dim) / 3)
    if base <= ffn_size and meta_formula(ffn_size, None) == ffn_size:
        return {"multiple_of": ffn_size}
    for multiplier in (ffn_size / base, (ffn_size + 0.5) / base):
        if meta_formula(1, multiplier) == ffn_size:
            return {"multiple_of": 1, "ffn_dim_multiplier": multiplier}
    raise ValueError(
        f"no Meta multiple_of / ffn_dim_multiplier gives an FFN size of {ffn_size} for dim {dim}"
    )


def shortest_float32(value: float) -> float:
    """The shortest decimal with the same float32 value: 9.999999747378752e-06 (1e-5 stored in float32, as
    a GGUF holds it) -> 1e-05. llama.cpp's legacy converter guesses the context length from
    `norm_eps == 1e-05`, and Meta's code and humans read the short form."""
    import numpy as np

    return float(str(np.float32(value)))


def meta_params(config) -> dict:
    """`params.json` for any LLaMA size, derived from the HF config."""
    params = {
        "dim": config.hidden_size,
        "n_layers": config.num_hidden_layers,
        "n_heads": config.num_attention_heads,
    }
    if config.num_key_value_heads != config.num_attention_heads:
        params["n_kv_heads"] = config.num_key_value_heads
    params.update(meta_ffn_params(config.hidden_size, config.intermediate_size))
    params["norm_eps"] = shortest_float32(config.rms_norm_eps)
    params["vocab_size"] = config.vocab_size
    params["rope_theta"] = float(rope_settings(config)["rope_theta"])
    params["max_seq_len"] = config.max_position_embeddings
    return params


def write_added_tokens(tokenizer, output_dir: Path) -> dict:
    """`added_tokens.json` for tokens beyond the sentencepiece model (e.g. Alpaca's `[PAD]`), which
    llama.cpp's legacy converter reads next to `tokenizer.model`."""
    import sentencepiece as spm

    sp_size = spm.SentencePieceProcessor(model_file=str(output_dir / "tokenizer.model")).vocab_size()
    added = {tok.content: idx for idx, tok in tokenizer.added_tokens_decoder.items() if idx >= sp_size}
    if added:
        (output_dir / "added_tokens.json").write_text(json.dumps(added, indent=2) + "\n", encoding="utf-8")
    return added


@locks_output("--output_dir", lambda arguments: arguments["output_dir"])
def export_meta(
    base_model: str,
    lora_weights: str,
    output_dir: str = "./ckpt",
    dtype: str = "base",
    overwrite: bool = False,
) -> dict:
    """Merge the adapter and write Meta's `consolidated.00.pth`, `params.json` and the tokenizer:
    `tokenizer.model` (+ `added_tokens.json`) for sentencepiece models, the `tokenizer.json` files for
    BPE models (llama.cpp's legacy converter then needs `--vocab-type bpe`, or `hfft`)."""
    import torch

    check_precision(dtype)
    check_adapter_path(lora_weights)
    out = prepare_output_path(output_dir, overwrite, protect=(base_model, lora_weights))
    inputs = resolve_export_inputs(base_model, lora_weights, dtype, "export_state_dict_checkpoint.py")
    vocab_type = vocabulary_kind(inputs)
    meta_ffn_params(
        inputs.config.hidden_size, inputs.config.intermediate_size
    )  # refused now, not after the merge
    announce("export_meta", **inputs.source(), output_dir=str(out), dtype=inputs.precision)
    merged = load_and_merge(inputs)
    meta = meta_state_dict(merged.model)
    check_meta_roundtrip(meta, merged.model)
    params = meta_params(merged.model.config)
    with staged_output(out) as staging:
        added = {}
        if vocab_type == "spm":
            copy_tokenizer_model(merged, staging)
            added = write_added_tokens(merged.tokenizer, staging)
        else:
            merged.tokenizer.save_pretrained(staging)
        torch.save(meta, staging / "consolidated.00.pth")
        (staging / "params.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
        info = dict(
            export="meta",
            **inputs.source(),
            dtype=inputs.precision,
            params=params,
            vocab_type=vocab_type,
            added_tokens=added,
            adapter_effect=merged.adapter_effect,
            max_logit_diff_merged=merged.max_logit_diff,
        )
        write_export_info(staging, info)
    print(f"wrote Meta-layout checkpoint to {out} (llama.cpp's legacy converter: --vocab-type {vocab_type})")
    return info
