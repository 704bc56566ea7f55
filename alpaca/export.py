"""Exports of a LoRA fine-tune as one shippable model, each checked before it is called done.

- `export_hf`: the adapter merged into the base, saved as safetensors shards with the tokenizer and the
  generation config; the saved folder is reloaded and its logits compared with the adapter model's.
- `export_meta`: Meta's `consolidated.00.pth` + `params.json` + `tokenizer.model` (the layout of the
  original LLaMA release, read by llama.cpp's legacy converter); q/k are un-permuted from the HF rotary
  layout and the result is permuted back and compared with the merged weights.
- `export_gguf`: a GGUF file for llama.cpp written with the `gguf` package (llama.cpp's own), laid out as
  llama.cpp's `convert_hf_to_gguf.py` lays out a LLaMA; it is read back and compared tensor by tensor.

Every export first merges, then checks that the merged model's logits equal the adapter model's and
that every adapted layer really changed (a merge that silently does nothing is upstream's old bug).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from alpaca.modeling import (
    check_model_path,
    load_adapter,
    load_base_model,
    merge_lora,
    prepare_output_path,
    read_adapter_config,
    resize_embeddings_for_new_tokens,
    resolve_dtype,
)
from alpaca.weights import tensor_sha256

SELF_CHECK_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nList three technologies that make life easier.\n\n### Response:",
    "The quick brown fox jumps over the lazy dog. 0123456789",
)
# Allowed max |logit difference|, relative to max(1, max |logit|): merging reorders the arithmetic
# (W x + B A x versus (W + B A) x), so the difference is rounding of the working precision.
LOGIT_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 6e-2}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")

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


@dataclass
class MergedModel:
    """A merged model with what its checks measured."""

    model: object
    tokenizer: object
    tokenizer_dir: str
    base_model: str
    dtype_name: str
    reference_logits: list = field(default_factory=list)
    input_ids: list = field(default_factory=list)
    adapted_weights: list = field(default_factory=list)
    max_logit_diff: float = 0.0


def check_adapter_path(lora_weights: str) -> None:
    """A clear error for a missing adapter folder or one without `adapter_config.json`."""
    if not lora_weights:
        raise ValueError("--lora_weights is required: a LoRA adapter folder or hub id")
    read_adapter_config(lora_weights)


def find_tokenizer_dir(base_model: str, lora_weights: str) -> str:
    """The adapter folder when it carries a tokenizer (training may add tokens), else the base model."""
    adapter = Path(lora_weights).expanduser()
    if adapter.is_dir() and any((adapter / name).is_file() for name in TOKENIZER_FILES[1:]):
        return str(adapter)
    return base_model


def adapted_layer_names(peft_model) -> list[str]:
    """Names (in the merged model) of the weights that the LoRA adapter modifies."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    names = []
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            names.append(f"{name.removeprefix(prefix)}.weight")
    return names


def self_check_inputs(tokenizer, prompts=SELF_CHECK_PROMPTS) -> list:
    """Token ids of the self-check prompts, one (1, n) tensor each (no padding to get wrong)."""
    return [tokenizer(prompt, return_tensors="pt").input_ids for prompt in prompts]


def compute_logits(model, input_ids: list) -> list:
    """fp32 logits of `model` on each input."""
    import torch

    with torch.no_grad():
        return [model(input_ids=ids).logits.float() for ids in input_ids]


def check_logits_match(reference: list, candidate: list, dtype_name: str, what: str) -> float:
    """Raise unless `candidate` logits equal `reference` within the dtype's tolerance; return the max
    absolute difference."""
    max_diff = max(float((ref - cand).abs().max()) for ref, cand in zip(reference, candidate))
    scale = max(1.0, max(float(ref.abs().max()) for ref in reference))
    tolerance = LOGIT_TOLERANCE[dtype_name] * scale
    print(
        f"self-check: max |logit difference| {what} vs adapter model = {max_diff:.3g} (tolerance {tolerance:.3g}, {dtype_name})"
    )
    if not max_diff <= tolerance:
        raise ValueError(
            f"self-check failed: the {what}'s logits differ from the adapter model's by up to {max_diff:.3g} "
            f"(tolerance {tolerance:.3g} for {dtype_name}); the export is wrong, nothing to ship"
        )
    return max_diff


def check_weights_changed(model, before: dict) -> None:
    """Raise naming the first adapted weight that the merge left unchanged."""
    state = model.state_dict()
    for name, digest in before.items():
        if name not in state:
            raise ValueError(
                f"self-check failed: the merged model has no weight {name!r} that the adapter targets"
            )
        if tensor_sha256(state[name]) == digest:
            raise ValueError(
                f"self-check failed: merging left {name} unchanged; the adapter's update is zero "
                "(an untrained adapter?) or too small for this precision"
            )


def load_and_merge(base_model: str, lora_weights: str, dtype: str = "fp16") -> MergedModel:
    """Load the base in `dtype`, apply the adapter, record its logits, merge, and check the merge."""
    check_model_path(base_model)
    check_adapter_path(lora_weights)
    if dtype not in LOGIT_TOLERANCE:
        raise ValueError(f"--dtype={dtype!r}: choose one of {tuple(LOGIT_TOLERANCE)}")
    from transformers import AutoTokenizer

    tokenizer_dir = find_tokenizer_dir(base_model, lora_weights)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = load_base_model(base_model, dtype=resolve_dtype(dtype), device_map={"": "cpu"})
    extra = len(tokenizer) - model.get_input_embeddings().weight.shape[0]
    if extra > 0:
        resize_embeddings_for_new_tokens(model, tokenizer, extra)
    model.eval()
    peft_model = load_adapter(model, lora_weights)
    peft_model.eval()
    state = peft_model.base_model.model.state_dict()
    names = adapted_layer_names(peft_model)
    # peft keeps the wrapped weight under `<module>.base_layer.weight` until it merges.
    before = {
        name: tensor_sha256(state[name.removesuffix(".weight") + ".base_layer.weight"]) for name in names
    }
    input_ids = self_check_inputs(tokenizer)
    reference = compute_logits(peft_model, input_ids)
    merged = merge_lora(peft_model)
    merged.eval()
    check_weights_changed(merged, before)
    result = MergedModel(merged, tokenizer, tokenizer_dir, base_model, dtype, reference, input_ids, names)
    result.max_logit_diff = check_logits_match(
        reference, compute_logits(merged, input_ids), dtype, "merged model"
    )
    return result


def hub_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub repository (from the local cache when offline), or None if it has none."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename))
    except Exception:  # not a hub id, no such file, or offline without a cached copy
        return None


def copy_tokenizer_model(merged: MergedModel, output_dir: Path, required: bool) -> bool:
    """Copy the sentencepiece `tokenizer.model`, which transformers 5 no longer writes: from the tokenizer's
    folder, else from the base model (tokens added in training extend it, they do not change it)."""
    for folder in (merged.tokenizer_dir, merged.base_model):
        source = Path(folder).expanduser() / "tokenizer.model"
        if not source.is_file() and not Path(folder).expanduser().is_dir():
            source = hub_file(folder, "tokenizer.model")
        if source is not None and source.is_file():
            shutil.copy(source, output_dir / "tokenizer.model")
            return True
    if required:
        raise ValueError(
            f"neither {merged.tokenizer_dir!r} nor {merged.base_model!r} has a sentencepiece tokenizer.model, "
            "which this export needs (LLaMA-1/2 tokenizers have one)"
        )
    return False


def save_hf_folder(merged: MergedModel, output_dir: Path, max_shard_size: str) -> None:
    """Save weights (safetensors shards), tokenizer, `tokenizer.model` and the generation config."""
    merged.model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    merged.tokenizer.save_pretrained(output_dir)
    copy_tokenizer_model(merged, output_dir, required=False)
    if not (output_dir / "generation_config.json").is_file():
        merged.model.generation_config.save_pretrained(output_dir)


def announce(export: str, **settings) -> None:
    """Print the resolved settings once, before the long part starts."""
    print(f"{export}: " + ", ".join(f"{key}={value!r}" for key, value in settings.items()))


def write_export_info(output_dir: Path, info: dict) -> None:
    (output_dir / "export_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def export_hf(
    base_model: str,
    lora_weights: str,
    output_dir: str = "./hf_ckpt",
    max_shard_size: str = "400MB",
    dtype: str = "fp16",
    overwrite: bool = False,
) -> dict:
    """Merge the adapter and save a Hugging Face folder; reload it and check its logits. Returns a summary."""
    out = prepare_output_path(output_dir, overwrite, protect=(base_model, lora_weights))
    announce(
        "export_hf",
        base_model=base_model,
        lora_weights=lora_weights,
        output_dir=str(out),
        max_shard_size=max_shard_size,
        dtype=dtype,
    )
    merged = load_and_merge(base_model, lora_weights, dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_hf_folder(merged, out, max_shard_size)
    del merged.model
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=resolve_dtype(dtype)).eval()
    saved_diff = check_logits_match(
        merged.reference_logits, compute_logits(reloaded, merged.input_ids), dtype, "saved model"
    )
    info = dict(
        export="hf",
        base_model=base_model,
        lora_weights=lora_weights,
        dtype=dtype,
        max_shard_size=max_shard_size,
        adapted_weights=len(merged.adapted_weights),
        max_logit_diff_merged=merged.max_logit_diff,
        max_logit_diff_saved=saved_diff,
    )
    write_export_info(out, info)
    print(f"wrote merged Hugging Face model to {out}")
    return info


# ---- Meta layout -------------------------------------------------------------------------------------


def check_llama_shaped(config, what: str) -> None:
    """Raise a clear error unless `config` describes a plain LLaMA (no biases, default rotary)."""
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or [model_type]
    if model_type != "llama":
        raise ValueError(
            f"{what} writes LLaMA models only; --base_model is a {model_type!r} model ({archs[0]}). "
            "Use export_hf_checkpoint.py for other architectures."
        )
    problems = []
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("it has bias terms")
    rope = rope_settings(config)
    if rope.get("rope_type", "default") != "default":
        problems.append(f"its rotary scaling is {rope.get('rope_type')!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size:
        problems.append("its head_dim times num_attention_heads is not hidden_size")
    if problems:
        raise ValueError(f"{what} cannot write this LLaMA variant: {'; '.join(problems)}")


def rope_settings(config) -> dict:
    """Rotary settings for transformers 5 (`rope_parameters`) and 4 (`rope_theta` + `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def unpermute_rotary(weight, n_heads: int):
    """HF's rotary layout (halves) -> Meta's (interleaved pairs): the inverse of transformers' Meta->HF permute."""
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rotary(weight, n_heads: int):
    """Meta's rotary layout -> HF's (what transformers' conversion script did)."""
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


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
    params["norm_eps"] = config.rms_norm_eps
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


def export_meta(
    base_model: str,
    lora_weights: str,
    output_dir: str = "./ckpt",
    dtype: str = "fp16",
    overwrite: bool = False,
) -> dict:
    """Merge the adapter and write Meta's `consolidated.00.pth`, `params.json` and `tokenizer.model`."""
    import torch
    from transformers import AutoConfig

    check_model_path(base_model)
    check_llama_shaped(AutoConfig.from_pretrained(base_model), "export_state_dict_checkpoint.py")
    out = prepare_output_path(output_dir, overwrite, protect=(base_model, lora_weights))
    announce(
        "export_meta", base_model=base_model, lora_weights=lora_weights, output_dir=str(out), dtype=dtype
    )
    merged = load_and_merge(base_model, lora_weights, dtype)
    meta = meta_state_dict(merged.model)
    check_meta_roundtrip(meta, merged.model)
    out.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_model(merged, out, required=True)
    added = write_added_tokens(merged.tokenizer, out)
    params = meta_params(merged.model.config)
    torch.save(meta, out / "consolidated.00.pth")
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")
    info = dict(
        export="meta",
        base_model=base_model,
        lora_weights=lora_weights,
        dtype=dtype,
        params=params,
        added_tokens=added,
        max_logit_diff_merged=merged.max_logit_diff,
    )
    write_export_info(out, info)
    print(f"wrote Meta-layout checkpoint to {out}")
    return info


# ---- GGUF --------------------------------------------------------------------------------------------

GGUF_OUTTYPES = ("f16", "f32")


def gguf_vocab(tokenizer, sp_model_path: Path, vocab_size: int):
    """Tokens, scores and token types as llama.cpp's converter builds them from a sentencepiece model,
    plus the tokenizer's added tokens beyond it (e.g. `[PAD]`: control, score -1000)."""
    import gguf
    from sentencepiece import SentencePieceProcessor

    types = gguf.TokenType
    sp = SentencePieceProcessor(model_file=str(sp_model_path))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    toktypes = [int(types.UNUSED)] * vocab_size
    for token_id in range(min(sp.vocab_size(), vocab_size)):
        toktype = types.NORMAL
        if sp.IsUnknown(token_id):
            toktype = types.UNKNOWN
        elif sp.IsControl(token_id):
            toktype = types.CONTROL
        elif sp.IsUnused(token_id):
            toktype = types.UNUSED
        elif sp.IsByte(token_id):
            toktype = types.BYTE
        tokens[token_id] = sp.IdToPiece(token_id).encode("utf-8")
        scores[token_id] = sp.GetScore(token_id)
        toktypes[token_id] = int(toktype)
    for token_id, added in tokenizer.added_tokens_decoder.items():
        if sp.vocab_size() <= token_id < vocab_size:
            tokens[token_id] = added.content.encode("utf-8")
            scores[token_id] = -1000.0
            toktypes[token_id] = int(types.CONTROL if added.special else types.USER_DEFINED)
    return tokens, scores, toktypes


def gguf_tensors(model, outtype: str) -> dict:
    """GGUF name -> (numpy array, GGML type), in llama.cpp's layout: q/k in Meta's rotary order, norms
    and other 1-D tensors kept in f32."""
    import gguf
    import numpy as np

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = dict(model.state_dict())
    # With tied embeddings the HF files hold no lm_head, and llama.cpp then reuses token_embd: do the same.
    state.pop("lm_head.weight", None)
    if not getattr(config, "tie_word_embeddings", False):
        state["lm_head.weight"] = model.get_output_embeddings().weight
    tensors = {}
    for name in sorted(state):
        tensor = state[name].detach().float()
        if name.endswith("q_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = unpermute_rotary(tensor, config.num_key_value_heads)
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise ValueError(f"tensor {name!r} has no GGUF name for the llama architecture")
        data = tensor.contiguous().numpy()
        qtype = gguf.GGMLQuantizationType.F32
        if outtype == "f16" and data.ndim > 1 and not new_name.endswith("_norm.weight"):
            qtype = gguf.GGMLQuantizationType.F16
        tensors[new_name] = (
            gguf.quants.quantize(data, qtype)
            if qtype != gguf.GGMLQuantizationType.F32
            else data.astype(np.float32),
            qtype,
        )
    return tensors


def write_gguf_hparams(writer, config, outtype: str) -> None:
    """Hyperparameters under llama.cpp's `llama.*` keys, as its HF converter sets them."""
    import gguf

    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(rope_settings(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if outtype == "f16" else gguf.LlamaFileType.ALL_F32
    writer.add_file_type(file_type)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)


def write_gguf_tokenizer(writer, tokenizer, hf_dir: Path, vocab_size: int) -> None:
    """Vocabulary, scores, token types, special ids and BOS/EOS flags."""
    import gguf

    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if (add_prefix_space := tokenizer_config.get("add_prefix_space")) is not None:
        writer.add_add_space_prefix(add_prefix_space)
    tokens, scores, toktypes = gguf_vocab(tokenizer, hf_dir / "tokenizer.model", vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(toktypes)
    gguf.SpecialVocab(hf_dir, n_vocab=len(tokens)).add_to_gguf(writer)


def write_gguf(merged: MergedModel, path: Path, outtype: str, model_name: str | None, name_hint: str) -> dict:
    """Write the GGUF file and return the tensors written (for the read-back check)."""
    import gguf

    model = merged.model
    tensors = gguf_tensors(model, outtype)
    with tempfile.TemporaryDirectory() as tmp:
        # The gguf package reads special ids and model-card metadata from an HF-style folder; give it
        # one named like the model so its naming heuristics see what llama.cpp's converter would.
        hf_dir = Path(tmp) / name_hint
        hf_dir.mkdir()
        merged.tokenizer.save_pretrained(hf_dir)
        copy_tokenizer_model(merged, hf_dir, required=True)
        model.config.save_pretrained(hf_dir)
        model.generation_config.save_pretrained(hf_dir)
        writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        for name, (data, qtype) in tensors.items():
            writer.add_tensor(name, data, raw_dtype=qtype)
        total, shared, expert, expert_count = writer.get_total_parameter_count()
        metadata = gguf.Metadata.load(None, hf_dir, model_name, total)
        if metadata.name is None:
            metadata.name = name_hint
        if metadata.size_label is None and total > 0:
            metadata.size_label = gguf.size_label(total, shared, expert, expert_count)
        writer.add_type(gguf.GGUFType.MODEL)
        metadata.set_gguf_meta_model(writer)
        write_gguf_hparams(writer, model.config, outtype)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_gguf_tokenizer(writer, merged.tokenizer, hf_dir, model.config.vocab_size)
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return tensors


def check_gguf_readback(path: Path, tensors: dict, config) -> None:
    """Read the file back with the gguf reader; every tensor and the main hyperparameters must match."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    found = {t.name: t for t in reader.tensors}
    if set(found) != set(tensors):
        raise ValueError(
            f"self-check failed: {path} holds tensors {sorted(set(found) ^ set(tensors))} unexpectedly"
        )
    for name, (data, qtype) in tensors.items():
        got = found[name]
        if got.tensor_type != qtype or not np.array_equal(np.asarray(got.data).reshape(data.shape), data):
            raise ValueError(f"self-check failed: tensor {name} in {path} differs from the merged weight")
    expected = {
        "general.architecture": "llama",
        "llama.block_count": config.num_hidden_layers,
        "llama.embedding_length": config.hidden_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.vocab_size": config.vocab_size,
    }
    for key, value in expected.items():
        field_ = reader.get_field(key)
        if field_ is None or field_.contents() != value:
            raise ValueError(
                f"self-check failed: {path} has {key}={field_ and field_.contents()!r}, expected {value!r}"
            )


def default_gguf_path(outtype: str) -> str:
    return f"./alpaca-lora-{outtype}.gguf"


def export_gguf(
    base_model: str,
    lora_weights: str,
    output_file: str | None = None,
    outtype: str = "f16",
    dtype: str = "fp32",
    model_name: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Merge the adapter and write one GGUF file for llama.cpp; read it back and check it."""
    from transformers import AutoConfig

    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"--outtype={outtype!r}: choose one of {GGUF_OUTTYPES}")
    check_model_path(base_model)
    check_llama_shaped(AutoConfig.from_pretrained(base_model), "the GGUF export")
    path = prepare_output_path(
        output_file or default_gguf_path(outtype), overwrite, "--output_file", (base_model, lora_weights)
    )
    if path.suffix != ".gguf":
        raise ValueError(f"--output_file={str(path)!r}: give a file name ending in .gguf")
    announce(
        "export_gguf",
        base_model=base_model,
        lora_weights=lora_weights,
        output_file=str(path),
        outtype=outtype,
        dtype=dtype,
    )
    merged = load_and_merge(base_model, lora_weights, dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    name_hint = Path(base_model.rstrip("/")).name or "model"
    tensors = write_gguf(merged, path, outtype, model_name, name_hint)
    check_gguf_readback(path, tensors, merged.model.config)
    print(f"read back {len(tensors)} tensors from {path}: all equal to the merged weights")
    print(f"wrote GGUF ({outtype}) to {path}")
    return dict(
        export="gguf",
        path=str(path),
        outtype=outtype,
        dtype=dtype,
        tensors=len(tensors),
        max_logit_diff_merged=merged.max_logit_diff,
    )
