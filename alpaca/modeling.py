"""Loading base models, tokenizers and LoRA adapters; quantization; merging.

Everything that touches `from_pretrained` lives here so that training, the demo and the exports
load models the same way.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

PAD_TOKEN = "[PAD]"
DTYPES = ("auto", "bf16", "fp16", "fp32")


def pick_device() -> str:
    """`cuda`, `mps` or `cpu`: the best device this machine has."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(name: str = "auto", device: str | None = None):
    """Map `auto`/`bf16`/`fp16`/`fp32` to a torch dtype; `auto` picks bf16 on capable GPUs, fp16 on
    older GPUs and MPS, fp32 on the CPU (where half precision is slow and upstream's fp16 cast broke)."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"precision {name!r} is not one of {DTYPES}")
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if name == "fp32":
        return torch.float32
    device = device or pick_device()
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


def check_model_path(path: str, flag: str = "--base_model") -> None:
    """Raise a clear error for a local-looking path that does not exist (hub ids pass through)."""
    from alpaca.gguf_import import is_gguf_path

    if path and is_gguf_path(path):
        if not Path(path).expanduser().is_file():
            raise ValueError(f"{flag}={path!r}: no such GGUF file")
        return
    if not path:
        raise ValueError(f"{flag} is required: a local model folder or a Hugging Face hub id")
    p = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or p.exists() or path.count("/") > 1
    if looks_local and not p.exists():
        raise ValueError(f"{flag}={path!r}: no such folder")
    if p.is_dir() and not (p / "config.json").is_file() and flag == "--base_model":
        raise ValueError(f"{flag}={path!r}: the folder has no config.json; is it a model folder?")


def resolve_base_model(path: str, flag: str = "--base_model", log=print) -> tuple[str, dict | None]:
    """Check `path` and return `(model folder or hub id, gguf_info)`.

    A `.gguf` file is converted once to a cached HF folder (`alpaca.gguf_import`); `gguf_info` then
    names the file and its SHA-256 so run configs can record both. Call it once, early, and pass the
    returned folder on.
    """
    from alpaca.gguf_import import is_gguf_path, resolve_model_source

    if path and is_gguf_path(path):
        return resolve_model_source(path, flag=flag, log=log)
    check_model_path(path, flag)
    return path, None


def load_tokenizer(
    path: str, padding_side: str = "right", trust_remote_code: bool = False, add_pad_token: bool = False
):
    """Load a tokenizer and give it a pad token that is never EOS.

    LLaMA tokenizers ship without a pad token. Padding with EOS (a common shortcut) teaches the model
    never to stop, because EOS labels get masked with the padding. Upstream Alpaca-LoRA used the unk
    token (id 0), which needs no new embedding row: we do the same unless `add_pad_token` (Stanford's
    full fine-tuning adds a `[PAD]` token; the caller must then resize the embeddings).
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        unk = tokenizer.unk_token_id
        if not add_pad_token and unk is not None and unk != tokenizer.eos_token_id:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def add_missing_special_tokens(tokenizer) -> int:
    """Add bos/eos/unk only when the tokenizer lacks them (Stanford's rule); return how many were added."""
    missing = {}
    for key, text in (("eos_token", "</s>"), ("bos_token", "<s>"), ("unk_token", "<unk>")):
        if getattr(tokenizer, key) is None:
            missing[key] = text
    return tokenizer.add_special_tokens(missing) if missing else 0


def resize_embeddings_for_new_tokens(model, tokenizer, num_new_tokens: int | None = None) -> int:
    """Resize the embeddings to the tokenizer and set each new input and output row to the mean of the
    existing rows (Stanford's `smart_tokenizer_and_embedding_resize`), so a new token such as `[PAD]`
    starts as an average token instead of a random one. Returns the number of new rows."""
    import torch

    old_rows = model.get_input_embeddings().weight.shape[0]
    new_rows = len(tokenizer)
    num_new = new_rows - old_rows if num_new_tokens is None else num_new_tokens
    if num_new <= 0:
        return 0
    model.resize_token_embeddings(new_rows, mean_resizing=False)
    with torch.no_grad():
        for embeddings in (model.get_input_embeddings(), model.get_output_embeddings()):
            if embeddings is None:
                continue
            weight = embeddings.weight
            weight[-num_new:] = weight[:-num_new].mean(dim=0, keepdim=True)
    return num_new


def quantization_config(load_in_8bit: bool = False, load_in_4bit: bool = False, compute_dtype=None):
    """A bitsandbytes config for 8-bit or 4-bit (QLoRA NF4, double quantization) loading, or None."""
    if load_in_8bit and load_in_4bit:
        raise ValueError("--load_in_8bit and --load_in_4bit are exclusive: choose one")
    if not (load_in_8bit or load_in_4bit):
        return None
    import torch
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise ValueError("8-bit / 4-bit loading needs bitsandbytes: pip install bitsandbytes") from err
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.float32,
    )


def load_base_model(
    base_model: str,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    dtype=None,
    device_map=None,
    trust_remote_code: bool = False,
):
    """Load any `AutoModelForCausalLM`, optionally quantized by bitsandbytes."""
    from transformers import AutoModelForCausalLM

    check_model_path(base_model)
    dtype = dtype if dtype is not None else resolve_dtype("auto")
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    quant = quantization_config(load_in_8bit, load_in_4bit, compute_dtype=dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device_map is not None:
        kwargs["device_map"] = device_map
    return AutoModelForCausalLM.from_pretrained(base_model, **kwargs)


def linear_module_names(model) -> list[str]:
    """Short names of the model's linear layers that LoRA can target (lm_head excluded)."""
    import torch

    names = set()
    for full_name, module in model.named_modules():
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in (
            "Linear8bitLt",
            "Linear4bit",
        )
        if is_linear and not full_name.endswith("lm_head"):
            names.add(full_name.rsplit(".", 1)[-1])
    return sorted(names)


def check_target_modules(model, target_modules) -> None:
    """Raise a ValueError naming any LoRA target the model lacks, with the ones it has."""
    if target_modules == "all-linear" or target_modules == ["all-linear"]:
        return
    available = linear_module_names(model)
    missing = [name for name in target_modules if name not in available]
    if missing:
        raise ValueError(
            f"--lora_target_modules: the model has no linear module(s) {missing}; "
            f"its linear modules are {available} (or pass all-linear)"
        )


def read_adapter_config(lora_weights: str, flag: str = "--lora_weights") -> dict | None:
    """The adapter's `adapter_config.json` when `lora_weights` is a local folder, else None."""
    path = Path(lora_weights).expanduser()
    if path.is_dir():
        config = path / "adapter_config.json"
        if not config.is_file():
            raise ValueError(f"{flag}={lora_weights!r}: the folder has no adapter_config.json")
        return json.loads(config.read_text(encoding="utf-8"))
    if lora_weights.startswith((".", "/", "~")):
        raise ValueError(f"{flag}={lora_weights!r}: no such folder")
    return None


def load_adapter(
    model,
    lora_weights: str,
    is_trainable: bool = False,
    adapter_name: str = "default",
    flag: str = "--lora_weights",
):
    """Wrap `model` with the LoRA adapter in `lora_weights` (folder or hub id).

    An adapter trained on another base fails inside peft with a long size-mismatch trace; we turn that
    into one message naming the adapter and the mismatched tensor.
    """
    from peft import PeftModel

    read_adapter_config(lora_weights, flag)
    try:
        peft_model = PeftModel.from_pretrained(
            model, lora_weights, is_trainable=is_trainable, adapter_name=adapter_name
        )
    except (RuntimeError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()
        detail = next(
            (line.strip() for line in first if "size mismatch" in line or "shape" in line),
            first[0] if first else "",
        )
        raise ValueError(
            f"{flag}={lora_weights!r} does not fit the base model "
            f"({type(model).__name__}): {detail}. Was it trained on another base model?"
        ) from err
    check_adapter_fits(peft_model, lora_weights, adapter_name, flag)
    return peft_model


def check_adapter_fits(
    peft_model, lora_weights: str, adapter_name: str = "default", flag: str = "--lora_weights"
) -> None:
    """Raise a ValueError when the adapter's weights do not all land in the model.

    peft only warns when an adapter's tensor names match nothing in the model (an adapter trained on
    another architecture): the model then runs silently without it. Compare the names instead.
    """
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    saved = set(load_peft_weights(lora_weights, device="cpu"))
    expected = set(get_peft_model_state_dict(peft_model, adapter_name=adapter_name))
    missing = sorted(expected - saved)
    if missing:
        raise ValueError(
            f"{flag}={lora_weights!r} does not fit the base model ({type(peft_model.get_base_model()).__name__}): "
            f"{len(missing)} of its {len(expected)} LoRA tensors are missing, e.g. {missing[0]!r}. "
            "Was it trained on another base model?"
        )


def merge_lora(peft_model):
    """Fold the LoRA weights into the base weights and return the plain transformers model."""
    return peft_model.merge_and_unload()


def prepare_output_path(path: str, overwrite: bool, flag: str = "--output_dir", protect=()) -> Path:
    """Refuse to replace an existing non-empty folder (or file) unless `overwrite`; then clear it."""
    path = Path(path).expanduser()
    exists = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if exists and not overwrite:
        raise ValueError(
            f"{flag}={str(path)!r} already exists and is not empty; pass --overwrite to replace it"
        )
    if exists:
        resolved = path.resolve()
        guarded = [Path.cwd().resolve(), Path.home().resolve()] + [
            Path(p).expanduser().resolve() for p in protect if p
        ]
        if any(resolved == g or resolved in g.parents for g in guarded):
            raise ValueError(
                f"{flag}={str(path)!r} holds the working folder, home or an input model; refusing to clear it"
            )
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    return path
