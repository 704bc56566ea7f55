"""The shared core of every export: check the inputs, load the base in the export precision, apply the
adapter, record its logits and its effect on them, merge, and check the merge (logits within the
precision's rounding and within a small share of the adapter's effect; every adapted weight changed).
Also the LLaMA shape checks and rotary permutations that the Meta and GGUF layouts share."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from alpaca.core.chat import recorded_format
from alpaca.modeling import (
    adapter_tokenizer_dir,
    load_adapter,
    load_base_model,
    load_model_config,
    load_plain_tokenizer,
    merge_lora,
    read_adapter_config,
    resize_embeddings_for_new_tokens,
    resolve_base_model,
    resolve_dtype,
)
from alpaca.weights.diffs import tensor_sha256

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
PRECISIONS = ("base", "fp32", "fp16", "bf16")
TORCH_DTYPE_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass
class ExportInputs:
    """Everything an export needs, checked before any weights load."""

    base_model: str  # as given: a folder, hub id or .gguf file
    folder: str  # the HF folder (or hub id) the weights load from
    gguf_info: dict | None
    lora_weights: str
    precision: str
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
    precision: str
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
    precision: str,
    what: str,
    adapter_effect: float,
    remedy: str = "Export with --precision=fp32 (or --precision=base, the base's own precision)",
) -> float:
    """Raise unless `candidate` logits equal `reference` within the dtype's rounding and within a small
    share of the adapter's own effect (`adapter_effect`: max |adapter model - base| logits); return the
    max absolute difference."""
    max_diff = max_logit_difference(reference, candidate)
    scale = max(1.0, max(float(ref.abs().max()) for ref in reference))
    tolerance = LOGIT_TOLERANCE[precision] * scale
    print(
        f"self-check: max |logit difference| {what} vs adapter model = {max_diff:.3g} (tolerance {tolerance:.3g} "
        f"for {precision}; the adapter itself moves the logits by up to {adapter_effect:.3g})"
    )
    if not max_diff <= tolerance:
        raise ValueError(
            f"self-check failed: the {what}'s logits differ from the adapter model's by up to {max_diff:.3g} "
            f"(tolerance {tolerance:.3g} for {precision}); the export is wrong, nothing to ship"
        )
    if not max_diff <= MAX_EFFECT_LOST * adapter_effect:
        raise ValueError(
            f"self-check failed: in {precision} the {what} loses {max_diff / adapter_effect:.0%} of the adapter's "
            f"effect on the logits (it differs from the adapter model by up to {max_diff:.3g}, while the "
            f"adapter changes the base model's logits by up to {adapter_effect:.3g}): the update is too small "
            f"to survive {precision} weights. {remedy}"
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
                "(an untrained adapter?) or too small for this precision (try --precision=fp32)"
            )


def check_precision(dtype: str) -> None:
    if dtype not in PRECISIONS:
        raise ValueError(
            f"--precision={dtype!r}: choose one of {PRECISIONS} (base: the base model's own precision)"
        )


def precision_or_alias(precision: str, dtype: str | None, default: str) -> str:
    """The export precision from `--precision`, or from `--dtype`, its older name (the word the other
    scripts use is `--precision`; `--dtype` keeps existing export commands working)."""
    if not dtype or dtype == precision:
        return precision
    if precision != default:
        raise ValueError(
            f"--precision={precision!r} and --dtype={dtype!r} disagree: --dtype is the older name of "
            "--precision; give only one"
        )
    return dtype


def base_precision(config) -> str:
    """The precision the base model's `config.json` declares (fp32 when it declares none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return TORCH_DTYPE_NAMES.get(str(dtype).removeprefix("torch."), "fp32")


def resolve_export_inputs(
    base_model: str, lora_weights: str, dtype: str, llama_only: str | None = None
) -> ExportInputs:
    """Check the inputs (a `.gguf` base is converted once to a cached HF folder) and load the config and
    tokenizer; `llama_only` names the export that writes LLaMA models only."""
    folder, gguf_info = resolve_base_model(base_model)
    config = load_model_config(folder)
    if llama_only:
        check_llama_shaped(config, llama_only)
    tokenizer_dir = adapter_tokenizer_dir(folder, lora_weights)
    try:
        tokenizer = load_plain_tokenizer(tokenizer_dir)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the tokenizer of {tokenizer_dir!r}: {err}") from err
    # the export speaks the format the adapter was trained in, not the base model's chat template
    tokenizer.chat_template = recorded_format(lora_weights).chat_template
    precision = base_precision(config) if dtype == "base" else dtype
    return ExportInputs(
        base_model, folder, gguf_info, lora_weights, precision, tokenizer_dir, tokenizer, config
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
    tokenizer, precision = inputs.tokenizer, inputs.precision
    model = load_base_model(inputs.folder, dtype=resolve_dtype(precision), device_map={"": "cpu"})
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
        merged, tokenizer, inputs.tokenizer_dir, inputs.folder, precision, reference, input_ids, names
    )
    result.adapter_effect = adapter_effect
    result.max_logit_diff = check_logits_match(
        reference, compute_logits(merged, input_ids), precision, "merged model", adapter_effect
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


def announce(export: str, **settings) -> None:
    """Print the resolved settings once, before the long part starts."""
    print(f"{export}: " + ", ".join(f"{key}={value!r}" for key, value in settings.items()))


def write_export_info(output_dir: Path, info: dict) -> None:
    (output_dir / "export_info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


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
