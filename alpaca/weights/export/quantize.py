"""Quantized GGUF tensors: which tensors llama.cpp quantizes and to what, the `gguf` package's block
quantizers (the block layouts of llama.cpp's, no compiler needed), llama.cpp's own quantizer for the
K-quants, reading a file back to fp32, and the self-check of what the quantization costs.

The rules (from convert_hf_to_gguf.py's `prepare_tensors` and llama.cpp's `llama_tensor_get_type`):
- 1-D tensors, norms (`*_norm.weight`) and anything not named `*.weight` stay f32;
- f32 / f16 / bf16 / q8_0 put every other tensor in that type (as `convert_hf_to_gguf.py --outtype`);
- q4_0, q4_1, q5_0 and q5_1 (llama-quantize's legacy types) quantize every other tensor to that type,
  except the output matrix (`output.weight`, or `token_embd.weight` when the embeddings are tied, since
  it then serves as the output too): llama.cpp gives it Q6_K, or Q8_0 when its rows are not a multiple
  of 256 values; the `gguf` package has no Q6_K quantizer, so it is Q8_0 here in both cases (for
  SmolLM2, 576 columns, llama.cpp's choice is Q8_0 too);
- a tensor whose rows are not a multiple of the block size (32 values) falls back to f16, as both of
  llama.cpp's tools do (e.g. a 176-wide FFN down-projection);
- q4_k_m, q5_k_m and q6_k are made by llama.cpp itself (`llama_model_quantize`) from the f32 export.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from alpaca.weights.export.core import compute_logits, permute_rotary

FLOAT_OUTTYPES = ("f32", "f16", "bf16")
BLOCK_OUTTYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
K_OUTTYPES = ("q4_k_m", "q5_k_m", "q6_k")
GGUF_OUTTYPES = FLOAT_OUTTYPES + BLOCK_OUTTYPES + K_OUTTYPES
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
# llama.cpp's file types (general.file_type) by outtype.
FILE_TYPES = {
    "f32": "ALL_F32",
    "f16": "MOSTLY_F16",
    "bf16": "MOSTLY_BF16",
    "q8_0": "MOSTLY_Q8_0",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q6_k": "MOSTLY_Q6_K",
}
# The self-check's held-out records: the first few of the demo's held-out set (never trained on).
CHECK_RECORDS = 8
# The quantized merged model must be closer to the merged model than the same quantization of the base
# is, by at least this share of the base's distance. The distance is the mean KL divergence of the next-
# token distributions (merged || quantized) over every position of the self-check prompts. Not the raw
# logits: 4-bit noise moves SmolLM2's logits by 3 (rms) against a trained adapter's 0.66, so by rms the
# q4_0 merged model was no closer than the q4_0 base (3.14 vs 3.01), although the two q4_0 files differ
# by 86% of the adapter's effect; by KL it is 9% closer (0.499 vs 0.549), q8_0 96%, while an update
# under the quantization step (wiped out) leaves the two within a fraction of a percent.
MIN_CLOSER = 0.01
# ... and the two quantized files must differ by at least this share of the adapter's effect on the
# (centred) logits. The KL alone passed q4_1 of SmolLM2, whose weights here come from a Q4_1 file: q4_1
# put the merged weights back on the grid they came from, keeping 4% of the effect (held-out loss 1.463,
# the base's 1.479, merged 1.331) while the KL was still 8% closer. The share is a noisy estimate when the
# effect is far below the noise (it read 217% for the wiped-out tiny update), hence both conditions.
MIN_EFFECT_KEPT = 0.25


def is_quantized(outtype: str) -> bool:
    return outtype in BLOCK_OUTTYPES or outtype in K_OUTTYPES


def check_outtype(outtype: str, adapter_only: bool = False) -> None:
    """One clear line for an unknown outtype, a K-quant with --adapter_only (the base beside the adapter
    is written here, without llama.cpp), or a K-quant without llama.cpp's quantizer installed."""
    if outtype not in GGUF_OUTTYPES:
        raise ValueError(f"--outtype={outtype!r}: choose one of {GGUF_OUTTYPES}")
    if outtype in K_OUTTYPES and adapter_only:
        raise ValueError(
            f"--outtype={outtype} with --adapter_only: write the base in a type made here (f32 ... q5_1)"
        )
    if outtype in K_OUTTYPES:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as err:
            raise ValueError(
                f"--outtype={outtype}: K-quants are made by llama.cpp's own quantizer; "
                f"pip install {LLAMA_CPP_PYTHON} ({err})"
            ) from None


def file_type(outtype: str):
    import gguf

    return gguf.LlamaFileType[FILE_TYPES[outtype]]


def tensor_type(name: str, shape: tuple, outtype: str, tied_embeddings: bool):
    """The GGML type llama.cpp gives tensor `name` (GGUF name) of `shape` for `outtype` (block types)."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return types.F32
    qtype = types[outtype.upper()]
    is_output = name == "output.weight" or (tied_embeddings and name == "token_embd.weight")
    if outtype in ("q4_0", "q4_1", "q5_0", "q5_1") and is_output:
        qtype = types.Q8_0  # llama.cpp: Q6_K (Q8_0 when the rows are not a multiple of 256)
    block_size = gguf.GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block_size != 0:
        return types.F16
    return qtype


def quantize_array(data, qtype):
    """`data` (float32, rows last) in GGML type `qtype`, as the file stores it."""
    import gguf
    import numpy as np

    if qtype == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    return gguf.quants.quantize(data, qtype)


def dequantize_array(data, qtype, shape: tuple):
    """The float32 values of `data` (GGML type `qtype`) as an array of the logical `shape`."""
    import gguf
    import numpy as np

    return np.asarray(gguf.quants.dequantize(np.asarray(data), qtype), dtype=np.float32).reshape(shape)


def read_gguf_arrays(path: Path) -> dict:
    """GGUF name -> (float32 array, type name) of every tensor in a file, dequantized."""
    import gguf

    reader = gguf.GGUFReader(path)
    arrays = {}
    for tensor in reader.tensors:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        arrays[tensor.name] = (
            dequantize_array(tensor.data, tensor.tensor_type, shape),
            tensor.tensor_type.name,
        )
    return arrays


def gguf_to_hf_names(model) -> dict:
    """GGUF name -> the model's parameter name (llama.cpp's LLaMA tensor names)."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    names = {}
    for name, _ in model.named_parameters():
        new_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if new_name is not None:
            names.setdefault(new_name, name)
    return names


def hf_weights(arrays: dict, model) -> dict:
    """Model parameter name -> torch tensor, from GGUF arrays (q/k back in HF's rotary order)."""
    import torch

    config = model.config
    names = gguf_to_hf_names(model)
    weights = {}
    for gguf_name, array in arrays.items():
        if gguf_name not in names:
            raise ValueError(f"self-check failed: the file's tensor {gguf_name} is not a weight of the model")
        name = names[gguf_name]
        tensor = torch.from_numpy(array.copy())
        if name.endswith("q_proj.weight"):
            tensor = permute_rotary(tensor, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            tensor = permute_rotary(tensor, config.num_key_value_heads)
        weights[name] = tensor
    return weights


def load_weights(model, weights: dict) -> None:
    """Copy `weights` (parameter name -> tensor) into the model's parameters, in place."""
    import torch

    with torch.no_grad():
        for name, tensor in weights.items():
            param = model.get_parameter(name)
            if param.shape != tensor.shape:
                raise ValueError(f"self-check failed: {name} has shape {tuple(tensor.shape)} in the file")
            param.copy_(tensor.to(param.dtype))


def llama_cpp_quantize(source: Path, target: Path, outtype: str, threads: int = 1) -> None:
    """Quantize a GGUF file with llama.cpp's own quantizer (`llama_model_quantize`)."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{FILE_TYPES[outtype]}")
    params.nthread = threads
    result = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if result != 0:
        raise ValueError(f"llama.cpp's quantizer failed ({result}) on {source} -> {outtype}")


def held_out_records(count: int = CHECK_RECORDS) -> list[dict]:
    """The first `count` records of the demo's held-out set (data/alpaca_sample.json, every 8th)."""
    from alpaca.quickstart import SAMPLE_DATA, split_records

    return split_records(json.loads(SAMPLE_DATA.read_text(encoding="utf-8")))[1][:count]


@dataclass
class QuantizationCost:
    """What a quantized file costs against the merged model in full precision."""

    outtype: str
    max_logit_error: float  # max |quantized merged - merged| over the self-check prompts' logits
    kl_quantized: float  # mean KL(merged || quantized merged) per position of the self-check prompts
    kl_base: float  # the same for the base quantized alike
    effect_kept: float  # share of the adapter's effect on the logits that the quantized models keep
    loss_merged: float  # held-out loss (nats per response token) of the merged model
    loss_quantized: float  # ... of the dequantized file
    records: int
    tokens: int

    @property
    def closer(self) -> float:
        """How much closer to the merged model the quantized merged model is than the quantized base."""
        return 1.0 - self.kl_quantized / self.kl_base if self.kl_base > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(asdict(self), closer=self.closer)


def mean_kl(reference: list, other: list) -> float:
    """Mean KL(reference || other) of the next-token distributions over all positions."""
    import torch

    total, count = 0.0, 0
    for ref, oth in zip(reference, other):
        log_p, log_q = torch.log_softmax(ref.double(), -1), torch.log_softmax(oth.double(), -1)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        count += ref.shape[0] * ref.shape[1]
    return total / count


def effect_kept(merged: list, base: list, quantized: list, quantized_base: list) -> float:
    """<quantized effect, effect> / <effect, effect> on centred logits (softmax ignores a shift): the share
    of the adapter's effect (merged - base) that the quantized files keep (quantized - quantized base)."""

    def centred(logits):
        return logits.double() - logits.double().mean(-1, keepdim=True)

    dot = norm = 0.0
    for m, b, q, qb in zip(merged, base, quantized, quantized_base):
        effect, kept = centred(m) - centred(b), centred(q) - centred(qb)
        dot, norm = dot + float((effect * kept).sum()), norm + float((effect * effect).sum())
    return dot / norm if norm > 0 else 0.0


def measure_quantization(
    model,
    tokenizer,
    input_ids: list,
    weights: dict,
    base_weights: dict,
    full_base_weights: dict,
    prompter,
    outtype: str,
    chat_template: str | None = None,
) -> QuantizationCost:
    """Load the file's dequantized `weights` into `model` (which holds the merged weights, and holds the
    dequantized ones afterwards) and measure them against the merged model: logit error, KL divergence
    and held-out loss (records in `prompter`'s template, or as chats in `chat_template`); then swap in the base's tensors quantized alike (`base_weights`: the tensors the
    adapter changed) and in full precision (`full_base_weights`) for the base's distances."""
    from alpaca.metrics import response_loss

    records = held_out_records()
    reference = compute_logits(model, input_ids)
    loss_merged = response_loss(model, tokenizer, records, prompter, chat_template=chat_template)
    load_weights(model, full_base_weights)
    base = compute_logits(model, input_ids)
    load_weights(model, weights)
    quantized = compute_logits(model, input_ids)
    loss_quantized = response_loss(model, tokenizer, records, prompter, chat_template=chat_template)
    load_weights(model, base_weights)
    quantized_base = compute_logits(model, input_ids)
    load_weights(model, {name: weights[name] for name in base_weights})
    return QuantizationCost(
        outtype=outtype,
        max_logit_error=max(float((a - b).abs().max()) for a, b in zip(quantized, reference)),
        kl_quantized=mean_kl(reference, quantized),
        kl_base=mean_kl(reference, quantized_base),
        effect_kept=effect_kept(reference, base, quantized, quantized_base),
        loss_merged=loss_merged.loss,
        loss_quantized=loss_quantized.loss,
        records=loss_quantized.examples,
        tokens=loss_quantized.tokens,
    )


# From fewest to most bits per weight, for the advice when a type is too coarse.
OUTTYPES_BY_WIDTH = ("q4_0", "q4_1", "q4_k_m", "q5_0", "q5_1", "q5_k_m", "q6_k", "q8_0", "f16", "f32")


def check_quantization_cost(cost: QuantizationCost) -> None:
    """Print what the quantization costs; raise when it wiped out the adapter's update."""
    change = cost.loss_quantized / cost.loss_merged - 1.0
    print(
        f"self-check ({cost.outtype}): vs the merged fp32 model: max |logit difference| {cost.max_logit_error:.3g}, "
        f"KL {cost.kl_quantized:.4g} per token (the base quantized alike: {cost.kl_base:.4g}, so {cost.closer:.1%} "
        f"closer; {cost.effect_kept:.0%} of the adapter's effect on the logits kept); held-out loss on "
        f"{cost.records} records ({cost.tokens} tokens): {cost.loss_quantized:.4f} vs {cost.loss_merged:.4f} "
        f"merged ({change:+.2%})"
    )
    problem = None
    if not cost.closer >= MIN_CLOSER:
        problem = (
            f"the quantized merged model is no closer to the merged model than the base quantized alike (KL "
            f"{cost.kl_quantized:.4g} vs {cost.kl_base:.4g} per token, {cost.closer:.2%} closer; at least "
            f"{MIN_CLOSER:.0%} needed)"
        )
    elif not cost.effect_kept >= MIN_EFFECT_KEPT:
        problem = (
            f"the quantized files keep {cost.effect_kept:.0%} of the adapter's effect on the logits (at least "
            f"{MIN_EFFECT_KEPT:.0%} needed)"
        )
    if problem is not None:
        wider = OUTTYPES_BY_WIDTH[OUTTYPES_BY_WIDTH.index(cost.outtype) + 1 :]
        raise ValueError(
            f"self-check failed: {cost.outtype} wipes out the adapter's update: {problem}. "
            f"Export with more bits: --outtype={' or '.join(wider[-3:])}"
        )
