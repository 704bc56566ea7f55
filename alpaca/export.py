"""Exports of a LoRA fine-tune as one shippable model, each checked before it is called done.

- `export_hf`: the adapter merged into the base, saved as safetensors shards with the tokenizer and the
  generation config; the saved folder is reloaded and its logits compared with the adapter model's.
- `export_meta`: Meta's `consolidated.00.pth` + `params.json` + the tokenizer (`tokenizer.model`, or the
  `tokenizer.json` of a BPE model) in the layout of the original LLaMA release, read by llama.cpp's legacy
  converter; q/k are un-permuted from the HF rotary layout and the result is permuted back and compared.
- `export_gguf`: a GGUF file for llama.cpp written with the `gguf` package (llama.cpp's own), laid out as
  llama.cpp's `convert_hf_to_gguf.py` lays out a LLaMA, sentencepiece or BPE vocabulary; it is read back
  and compared tensor by tensor.

Every export checks all its arguments and inputs first, then merges, then checks that the merged model's
logits equal the adapter model's, measured against the adapter's own effect on the logits (so an update
that the export precision rounds away is an error), and that every adapted layer really changed (a merge
that silently does nothing is upstream's old bug). Files are written to a temporary sibling and moved
into place only after the checks pass: a failed export leaves no partial output and keeps an old one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from alpaca.modeling import (
    load_adapter,
    load_base_model,
    merge_lora,
    prepare_output_path,
    read_adapter_config,
    resize_embeddings_for_new_tokens,
    resolve_base_model,
    resolve_dtype,
    staged_output,
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
# ... and at most this share of the adapter's own effect on the logits (adapter model vs base) may be
# lost: half-precision weights round a small update away entirely (W + BA == W), which the absolute
# tolerance alone cannot see when the update moves the logits by less than the rounding noise.
MAX_EFFECT_LOST = 0.1
DTYPE_CHOICES = ("base", "fp32", "fp16", "bf16")
TORCH_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
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
class ExportInputs:
    """Everything an export needs, checked before any weights load."""

    base_model: str  # as given: a folder, hub id or .gguf file
    folder: str  # the HF folder (or hub id) the weights load from
    gguf_info: dict | None
    lora_weights: str
    dtype_name: str
    tokenizer_dir: str
    tokenizer: object
    config: object

    def source(self) -> dict:
        """What the export info records about the inputs."""
        info = dict(base_model=self.base_model, base_model_folder=self.folder, lora_weights=self.lora_weights)
        if self.gguf_info is not None:
            info["base_model_gguf"] = self.gguf_info
        return info


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
    adapter_effect: float = 0.0
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


def max_logit_difference(first: list, second: list) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first, second))


def check_logits_match(
    reference: list,
    candidate: list,
    dtype_name: str,
    what: str,
    adapter_effect: float,
    remedy: str = "Export with --dtype=fp32 (or --dtype=base, the base's own precision)",
) -> float:
    """Raise unless `candidate` logits equal `reference` within the dtype's rounding and within a small
    share of the adapter's own effect (`adapter_effect`: max |adapter model - base| logits); return the
    max absolute difference."""
    max_diff = max_logit_difference(reference, candidate)
    scale = max(1.0, max(float(ref.abs().max()) for ref in reference))
    tolerance = LOGIT_TOLERANCE[dtype_name] * scale
    print(
        f"self-check: max |logit difference| {what} vs adapter model = {max_diff:.3g} (tolerance {tolerance:.3g} "
        f"for {dtype_name}; the adapter itself moves the logits by up to {adapter_effect:.3g})"
    )
    if not max_diff <= tolerance:
        raise ValueError(
            f"self-check failed: the {what}'s logits differ from the adapter model's by up to {max_diff:.3g} "
            f"(tolerance {tolerance:.3g} for {dtype_name}); the export is wrong, nothing to ship"
        )
    if not max_diff <= MAX_EFFECT_LOST * adapter_effect:
        raise ValueError(
            f"self-check failed: in {dtype_name} the {what} loses {max_diff / adapter_effect:.0%} of the adapter's "
            f"effect on the logits (it differs from the adapter model by up to {max_diff:.3g}, while the "
            f"adapter changes the base model's logits by up to {adapter_effect:.3g}): the update is too small "
            f"to survive {dtype_name} weights. {remedy}"
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
                "(an untrained adapter?) or too small for this precision (try --dtype=fp32)"
            )


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPE_CHOICES:
        raise ValueError(
            f"--dtype={dtype!r}: choose one of {DTYPE_CHOICES} (base: the base model's own precision)"
        )


def base_dtype_name(config) -> str:
    """The precision the base model's `config.json` declares (fp32 when it declares none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return TORCH_DTYPE_NAMES.get(str(dtype).removeprefix("torch."), "fp32")


def resolve_export_inputs(
    base_model: str, lora_weights: str, dtype: str, llama_only: str | None = None
) -> ExportInputs:
    """Check the inputs (a `.gguf` base is converted once to a cached HF folder) and load the config and
    tokenizer; `llama_only` names the export that writes LLaMA models only."""
    from transformers import AutoConfig, AutoTokenizer

    folder, gguf_info = resolve_base_model(base_model)
    try:
        config = AutoConfig.from_pretrained(folder)
    except OSError as err:  # a hub id that is not cached while offline, or not a model at all
        raise ValueError(f"--base_model={base_model!r}: cannot read its config ({err})") from err
    if llama_only:
        check_llama_shaped(config, llama_only)
    tokenizer_dir = find_tokenizer_dir(folder, lora_weights)
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer of {tokenizer_dir!r}: {err}") from err
    dtype_name = base_dtype_name(config) if dtype == "base" else dtype
    return ExportInputs(
        base_model, folder, gguf_info, lora_weights, dtype_name, tokenizer_dir, tokenizer, config
    )


def align_pad_token(model, tokenizer) -> None:
    """Make `config.json` and `generation_config.json` pad with the tokenizer's pad id (training may pad
    with another token than the base config names, e.g. unk instead of eos)."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        return
    model.config.pad_token_id = pad_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = pad_id


def load_and_merge(inputs: ExportInputs) -> MergedModel:
    """Load the base in the export dtype, apply the adapter, record its logits and its effect (adapter
    model vs base), merge, and check the merge."""
    tokenizer, dtype_name = inputs.tokenizer, inputs.dtype_name
    model = load_base_model(inputs.folder, dtype=resolve_dtype(dtype_name), device_map={"": "cpu"})
    extra = len(tokenizer) - model.get_input_embeddings().weight.shape[0]
    if extra > 0:
        resize_embeddings_for_new_tokens(model, tokenizer, extra)
    model.eval()
    peft_model = load_adapter(model, inputs.lora_weights)
    peft_model.eval()
    state = peft_model.base_model.model.state_dict()
    names = adapted_layer_names(peft_model)
    # peft keeps the wrapped weight under `<module>.base_layer.weight` until it merges.
    before = {
        name: tensor_sha256(state[name.removesuffix(".weight") + ".base_layer.weight"]) for name in names
    }
    input_ids = self_check_inputs(tokenizer)
    reference = compute_logits(peft_model, input_ids)
    with peft_model.disable_adapter():
        adapter_effect = max_logit_difference(reference, compute_logits(peft_model, input_ids))
    merged = merge_lora(peft_model)
    merged.eval()
    check_weights_changed(merged, before)
    align_pad_token(merged, tokenizer)
    result = MergedModel(
        merged, tokenizer, inputs.tokenizer_dir, inputs.folder, dtype_name, reference, input_ids, names
    )
    result.adapter_effect = adapter_effect
    result.max_logit_diff = check_logits_match(
        reference, compute_logits(merged, input_ids), dtype_name, "merged model", adapter_effect
    )
    return result


def hub_file(repo_id: str, filename: str) -> Path | None:
    """A file of a hub repository (from the local cache when offline), or None if it has none."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, filename))
    except Exception:  # not a hub id, no such file, or offline without a cached copy
        return None


def find_sp_model(tokenizer_dir: str, base_model: str) -> Path | None:
    """The sentencepiece `tokenizer.model` of the tokenizer's folder, else of the base model (tokens
    added in training extend it, they do not change it); None for tokenizers without one (BPE)."""
    for folder in (tokenizer_dir, base_model):
        source = Path(folder).expanduser() / "tokenizer.model"
        if not source.is_file() and not Path(folder).expanduser().is_dir():
            source = hub_file(folder, "tokenizer.model")
        if source is not None and source.is_file():
            return source
    return None


def copy_tokenizer_model(merged: MergedModel, output_dir: Path) -> bool:
    """Copy the sentencepiece `tokenizer.model`, which transformers 5 no longer writes, when there is one."""
    source = find_sp_model(merged.tokenizer_dir, merged.base_model)
    if source is not None:
        shutil.copy(source, output_dir / "tokenizer.model")
    return source is not None


def tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return json.loads(backend.to_str()) if backend is not None else {}


def vocabulary_kind(inputs: ExportInputs) -> str:
    """How llama.cpp reads this tokenizer: `spm` (a sentencepiece `tokenizer.model`), `hfft` (LLaMA-style
    BPE with byte fallback, only a `tokenizer.json`) or `bpe` (byte-level BPE: Llama 3, SmolLM, ...)."""
    if find_sp_model(inputs.tokenizer_dir, inputs.folder) is not None:
        return "spm"
    data = tokenizer_json(inputs.tokenizer)
    model, decoder = data.get("model") or {}, data.get("decoder") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and decoder.get("type") == "Sequence":
        return "hfft"
    if model.get("type") == "BPE" and not model.get("byte_fallback") and decoder.get("type") == "ByteLevel":
        return "bpe"
    raise ValueError(
        f"the tokenizer in {inputs.tokenizer_dir} has no sentencepiece tokenizer.model and its tokenizer.json "
        f"is neither LLaMA-style nor byte-level BPE (model {model.get('type')!r}, decoder "
        f"{decoder.get('type')!r}); llama.cpp's LLaMA converters cannot write it either"
    )


def save_hf_folder(merged: MergedModel, output_dir: Path, max_shard_size: str) -> None:
    """Save weights (safetensors shards), tokenizer, `tokenizer.model` and the generation config."""
    merged.model.save_pretrained(output_dir, max_shard_size=max_shard_size)
    merged.tokenizer.save_pretrained(output_dir)
    copy_tokenizer_model(merged, output_dir)
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
    dtype: str = "base",
    overwrite: bool = False,
) -> dict:
    """Merge the adapter and save a Hugging Face folder; reload it and check its logits. Returns a summary."""
    from transformers import AutoModelForCausalLM

    check_dtype(dtype)
    check_adapter_path(lora_weights)
    out = prepare_output_path(output_dir, overwrite, protect=(base_model, lora_weights))
    inputs = resolve_export_inputs(base_model, lora_weights, dtype)
    announce(
        "export_hf",
        **inputs.source(),
        output_dir=str(out),
        max_shard_size=max_shard_size,
        dtype=inputs.dtype_name,
    )
    merged = load_and_merge(inputs)
    with staged_output(out) as staging:
        save_hf_folder(merged, staging, max_shard_size)
        del merged.model
        reloaded = AutoModelForCausalLM.from_pretrained(
            staging, dtype=resolve_dtype(inputs.dtype_name)
        ).eval()
        saved_diff = check_logits_match(
            merged.reference_logits,
            compute_logits(reloaded, merged.input_ids),
            inputs.dtype_name,
            "saved model",
            merged.adapter_effect,
        )
        info = dict(
            export="hf",
            **inputs.source(),
            dtype=inputs.dtype_name,
            max_shard_size=max_shard_size,
            adapted_weights=len(merged.adapted_weights),
            adapter_effect=merged.adapter_effect,
            max_logit_diff_merged=merged.max_logit_diff,
            max_logit_diff_saved=saved_diff,
        )
        write_export_info(staging, info)
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

    check_dtype(dtype)
    check_adapter_path(lora_weights)
    out = prepare_output_path(output_dir, overwrite, protect=(base_model, lora_weights))
    inputs = resolve_export_inputs(base_model, lora_weights, dtype, "export_state_dict_checkpoint.py")
    vocab_type = vocabulary_kind(inputs)
    meta_ffn_params(
        inputs.config.hidden_size, inputs.config.intermediate_size
    )  # refused now, not after the merge
    announce("export_meta", **inputs.source(), output_dir=str(out), dtype=inputs.dtype_name)
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
            dtype=inputs.dtype_name,
            params=params,
            vocab_type=vocab_type,
            added_tokens=added,
            adapter_effect=merged.adapter_effect,
            max_logit_diff_merged=merged.max_logit_diff,
        )
        write_export_info(staging, info)
    print(f"wrote Meta-layout checkpoint to {out} (llama.cpp's legacy converter: --vocab-type {vocab_type})")
    return info


# ---- GGUF --------------------------------------------------------------------------------------------

GGUF_OUTTYPES = ("f16", "f32")
# llama.cpp names a byte-level BPE pre-tokenizer (the regex splitting text before BPE) by the SHA-256 of
# the token ids its tokenizer gives for this probe text (convert_hf_to_gguf.py's `get_vocab_base_pre`);
# the runtime then applies its own implementation of that pre-tokenizer. The hashes of the LLaMA-family
# BPE tokenizers, as llama.cpp's converter records them:
BPE_PRE_PROBE = "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
BPE_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "olmo",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
}
# llama.cpp's LLaMA converter writes add_bos_token=False for every 49152-token vocabulary (Granite's
# and SmolLM's sizes; neither tokenizer adds a BOS).
NO_BOS_VOCAB_SIZE = 49152


def bpe_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, or a ValueError (as llama.cpp refuses too)."""
    digest = hashlib.sha256(str(tokenizer.encode(BPE_PRE_PROBE)).encode()).hexdigest()
    if digest not in BPE_PRE_TOKENIZERS:
        raise ValueError(
            f"the BPE tokenizer's pre-tokenizer is not one this export knows (probe hash {digest}); "
            "llama.cpp names pre-tokenizers by this hash in convert_hf_to_gguf.py's get_vocab_base_pre: "
            "convert the HF export (export_hf_checkpoint.py) with a llama.cpp that knows it"
        )
    return BPE_PRE_TOKENIZERS[digest]


def does_token_look_special(token: str) -> bool:
    """llama.cpp's rule for added tokens that should be control tokens although not marked special."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def gguf_bpe_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types of a byte-level BPE vocabulary as llama.cpp's `get_vocab_base` builds them:
    ids without a token are `[PAD{id}]` (unused); added tokens are control (special or special-looking)
    or user-defined, stored in their normalized form."""
    import gguf

    types = gguf.TokenType
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"the tokenizer has ids up to {max(vocab.values())}, beyond the {vocab_size} embeddings"
        )
    reverse = {token_id: token for token, token_id in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, toktypes = [], []
    for token_id in range(vocab_size):
        if token_id not in reverse:
            tokens.append(f"[PAD{token_id}]")
            toktypes.append(int(types.UNUSED))
            continue
        token = reverse[token_id]
        if token in added:
            if not decoder[token_id].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[token_id].special or does_token_look_special(token):
                toktypes.append(int(types.CONTROL))
            else:
                token = token.replace("\u2581", " ")  # llama.cpp pre-normalizes user-defined spaces
                toktypes.append(int(types.USER_DEFINED))
        else:
            toktypes.append(int(types.NORMAL))
        tokens.append(token)
    return tokens, toktypes


def gguf_spm_vocab(tokenizer, sp_model_path: Path, vocab_size: int):
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


def write_gguf_tokenizer(writer, hf_dir: Path, vocab_size: int, vocab_type: str) -> None:
    """Vocabulary (tokens, scores or merges, token types), pre-tokenizer, special ids, add-bos/eos flags
    and the chat template, as llama.cpp's LLaMA converter writes them for this kind of tokenizer."""
    import gguf
    from transformers import AutoTokenizer

    # Read the tokenizer back from the folder, as llama.cpp's converter reads the HF export.
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    if (add_prefix_space := tokenizer_config.get("add_prefix_space")) is not None:
        writer.add_add_space_prefix(add_prefix_space)
    if vocab_type == "bpe":
        tokens, toktypes = gguf_bpe_vocab(tokenizer, vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(bpe_pre_tokenizer(tokenizer))
        writer.add_token_list(tokens)
        writer.add_token_types(toktypes)
        gguf.SpecialVocab(hf_dir, load_merges=True).add_to_gguf(writer)
    else:
        if vocab_type == "spm":
            tokens, scores, toktypes = gguf_spm_vocab(tokenizer, hf_dir / "tokenizer.model", vocab_size)
        else:  # LLaMA-style BPE in a tokenizer.json: the gguf package reads it as llama.cpp does
            tokens, scores, toktypes = (
                list(column) for column in zip(*gguf.LlamaHfVocab(hf_dir).all_tokens())
            )
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(toktypes)
        gguf.SpecialVocab(hf_dir, n_vocab=len(tokens)).add_to_gguf(writer)
    if vocab_size == NO_BOS_VOCAB_SIZE:
        writer.add_add_bos_token(False)


def write_gguf(
    merged: MergedModel, path: Path, outtype: str, model_name: str | None, name_hint: str, vocab_type: str
) -> dict:
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
        copy_tokenizer_model(merged, hf_dir)
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
        write_gguf_tokenizer(writer, hf_dir, model.config.vocab_size, vocab_type)
        writer.write_header_to_file(path=path)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return tensors


def check_f16_weights(merged: MergedModel) -> float:
    """Round the merged matrices to f16 in place (the values the f16 file will hold; norms stay f32) and
    require the logits to keep the adapter's effect: a small update that f16 rounds away is an error."""
    import torch

    with torch.no_grad():
        for param in merged.model.parameters():
            if param.ndim > 1:
                param.copy_(param.half().to(param.dtype))
    return check_logits_match(
        merged.reference_logits,
        compute_logits(merged.model, merged.input_ids),
        "fp16",
        "f16 GGUF model",
        merged.adapter_effect,
        remedy="Write the GGUF with --outtype=f32.",
    )


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
    output_file = output_file or default_gguf_path(outtype)
    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"--outtype={outtype!r}: choose one of {GGUF_OUTTYPES}")
    if not str(output_file).endswith(".gguf"):
        raise ValueError(f"--output_file={output_file!r}: give a file name ending in .gguf")
    check_dtype(dtype)
    check_adapter_path(lora_weights)
    path = prepare_output_path(
        output_file, overwrite, "--output_file", (base_model, lora_weights), is_file=True
    )
    inputs = resolve_export_inputs(base_model, lora_weights, dtype, "the GGUF export")
    vocab_type = vocabulary_kind(inputs)
    if vocab_type == "bpe":
        bpe_pre_tokenizer(inputs.tokenizer)  # an unknown pre-tokenizer is refused before the merge
    announce(
        "export_gguf", **inputs.source(), output_file=str(path), outtype=outtype, dtype=inputs.dtype_name
    )
    merged = load_and_merge(inputs)
    if outtype == "f16":
        check_f16_weights(merged)
    name_hint = Path(inputs.folder.rstrip("/")).name or "model"
    with staged_output(path, is_file=True) as staging:
        tensors = write_gguf(merged, staging, outtype, model_name, name_hint, vocab_type)
        check_gguf_readback(staging, tensors, merged.model.config)
    print(f"read back {len(tensors)} tensors from {path}: all equal to the merged weights")
    print(f"wrote GGUF ({outtype}, {vocab_type} vocabulary) to {path}")
    return dict(
        export="gguf",
        **inputs.source(),
        path=str(path),
        outtype=outtype,
        dtype=inputs.dtype_name,
        vocab_type=vocab_type,
        tensors=len(tensors),
        adapter_effect=merged.adapter_effect,
        max_logit_diff_merged=merged.max_logit_diff,
    )
