"""Loading base models, configs, tokenizers and LoRA adapters; quantization; merging.

Training, generation, the demo, the exports and the weight diffs load models, configs and tokenizers
through this module's `load_*` functions (and `empty_model`, a model of the config on the meta device,
for the streamed weight diffs), so that they all load (and report a bad path) the same way.
The exceptions load something else: `gguf_import` reads a `.gguf` file once into a cached HF folder,
and `tiny` builds the offline test models. Output folders are written through `alpaca.core.staging`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (x86 avx512_bf16 or AMX, Arm BF16), where bf16
    autocast is several times faster than fp32; elsewhere bf16 is emulated and slower."""
    import platform

    import torch

    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    if probe is not None and probe():
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        return True
    if platform.system() == "Linux":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
                flags = set(handle.read().split())
        except OSError:
            return False
        return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return False


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
    from alpaca.weights.gguf_import import is_gguf_path

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
    if p.is_dir() and flag == "--base_model":
        check_model_folder(p, flag)


# Weight files `from_pretrained` reads, in its order of preference.
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def check_model_folder(folder: Path, flag: str = "--base_model") -> None:
    """Raise a ValueError naming the file when a local model folder cannot load: no or unreadable
    `config.json`, no weights, or a weight file that is truncated or garbage. Reads headers only, so a
    broken folder fails in milliseconds instead of after (or in the middle of) loading the model."""
    from alpaca.core.files import safetensors_problem, torch_file_problem

    where = f"{flag}={str(folder)!r}"
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{where}: the folder has no config.json; is it a model folder?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{where}: {config_path} is not valid JSON ({err})") from err
    if not isinstance(config, dict) or not isinstance(config.get("model_type", ""), str):
        raise ValueError(f"{where}: {config_path} must be a JSON object with a model_type")
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise ValueError(
            f"{where}: the folder has config.json but no weights ({' or '.join(WEIGHT_FILES[::2])}); "
            "was the download or save interrupted?"
        )
    name = present[0]
    shards = [name]
    if name.endswith(".index.json"):
        try:
            weight_map = json.loads((folder / name).read_text(encoding="utf-8"))["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{where}: {folder / name} is not a valid weight index ({err})") from err
    for shard in shards:
        check = safetensors_problem if shard.endswith(".safetensors") else torch_file_problem
        problem = check(folder / shard)
        if problem:
            raise ValueError(f"{where}: weight file {folder / shard} is {problem}; download or save it again")


def resolve_base_model(path: str, flag: str = "--base_model", log=print) -> tuple[str, dict | None]:
    """Check `path` and return `(model folder or hub id, gguf_info)`.

    A `.gguf` file is converted once to a cached HF folder (`alpaca.weights.gguf_import`); `gguf_info` then
    names the file and its SHA-256 so run configs can record both. Call it once, early, and pass the
    returned folder on.
    """
    from alpaca.weights.gguf_import import is_gguf_path, resolve_model_source

    if path and is_gguf_path(path):
        return resolve_model_source(path, flag=flag, log=log)
    check_model_path(path, flag)
    return path, None


MISSING_BASE_MODEL = "--base_model is required (or set BASE_MODEL), e.g. --base_model=huggyllama/llama-7b"


def base_model_or_env(base_model: str) -> str:
    """`--base_model`, else the `BASE_MODEL` environment variable that upstream's scripts read ("" when
    neither is set)."""
    return base_model or os.environ.get("BASE_MODEL", "")


def require_base_model(base_model: str) -> str:
    """`base_model_or_env`, or a ValueError saying how to give one."""
    base_model = base_model_or_env(base_model)
    if not base_model:
        raise ValueError(MISSING_BASE_MODEL)
    return base_model


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
    flag: str = "--base_model",
):
    """Load any `AutoModelForCausalLM`, optionally quantized by bitsandbytes; `flag` names the path in
    errors."""
    from transformers import AutoModelForCausalLM

    check_model_path(base_model, flag)
    dtype = dtype if dtype is not None else resolve_dtype("auto")
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    quant = quantization_config(load_in_8bit, load_in_4bit, compute_dtype=dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        return AutoModelForCausalLM.from_pretrained(base_model, **kwargs)
    except OSError as err:
        # a hub id that is not cached offline, a folder that changed under us, a damaged .bin
        raise ValueError(
            f"{flag}={base_model!r}: cannot load the model ({damaged_weights(base_model) or err})"
        ) from err


def damaged_weights(folder: str) -> str | None:
    """Which weight file of `folder` is truncated or corrupt, and how (None when none looks damaged)."""
    from alpaca.core.files import safetensors_problem

    for weights in sorted(Path(folder).expanduser().glob("*.safetensors")):
        if problem := safetensors_problem(weights):
            return f"{weights} is {problem}; copy or download it again"
    return None


def load_model_config(path: str, flag: str = "--base_model", trust_remote_code: bool = False):
    """The model's `AutoConfig` (no weights); an unreadable one is a ValueError naming `flag`."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as err:  # a hub id that is not cached while offline, or not a model at all
        raise ValueError(f"{flag}={path!r}: cannot read its config ({err})") from err


def load_generation_config(path: str, model_config):
    """The folder's `generation_config.json`, else the one `from_pretrained` derives from the model
    config (what save_pretrained then writes)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return GenerationConfig.from_model_config(model_config)


def empty_model(path: str, flag: str = "--base_model", trust_remote_code: bool = False):
    """The causal LM of the folder's config built on the meta device: its tensor names, shapes and tied
    weights, no memory and no weights read."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_model_config(path, flag, trust_remote_code=trust_remote_code)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except ValueError as err:
        raise ValueError(f"{flag}={path!r}: not a causal LM this transformers knows ({err})") from err


def adapter_tokenizer_dir(base_model: str, lora_weights: str) -> str:
    """The adapter folder when it carries a tokenizer (training may add tokens, and records its chat
    template there), else the base model."""
    adapter = Path(lora_weights).expanduser() if lora_weights else None
    if (
        adapter
        and adapter.is_dir()
        and any((adapter / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    ):
        return str(adapter)
    return base_model


def load_plain_tokenizer(path: str):
    """The tokenizer exactly as saved: no pad-token fix-ups (exports and weight diffs need the vocabulary
    that matches the weights, where `load_tokenizer` may add a token)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


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


ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def read_adapter_config(lora_weights: str, flag: str = "--lora_weights") -> dict | None:
    """The adapter's `adapter_config.json` when `lora_weights` is a local folder, else None.

    A local folder must also hold the adapter's weights: without them peft fails later with a message
    that blames the base model."""
    path = Path(lora_weights).expanduser()
    if path.is_dir():
        config = path / "adapter_config.json"
        if not config.is_file():
            raise ValueError(f"{flag}={lora_weights!r}: the folder has no adapter_config.json")
        try:
            record = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{flag}: {config} is not valid JSON ({err}); re-save the adapter") from None
        if not isinstance(record, dict):
            raise ValueError(f"{flag}: {config} holds a JSON {type(record).__name__}, not an object")
        present = [path / name for name in ADAPTER_WEIGHT_FILES if (path / name).is_file()]
        if not present:
            raise ValueError(
                f"{flag}={lora_weights!r}: the folder has adapter_config.json but no adapter weights "
                f"({' or '.join(ADAPTER_WEIGHT_FILES)}); was the adapter saved completely?"
            )
        from alpaca.core.files import safetensors_problem, torch_file_problem

        check = safetensors_problem if present[0].suffix == ".safetensors" else torch_file_problem
        if problem := check(present[0]):
            raise ValueError(
                f"{flag}: adapter weights {present[0]} are {problem}; copy or save the adapter again"
            )
        return record
    if lora_weights.startswith((".", "/", "~")):
        raise ValueError(f"{flag}={lora_weights!r}: no such folder")
    return None


def unreadable_adapter_error(lora_weights: str, flag: str, err: Exception) -> ValueError:
    """A truncated or garbage weights file fails deep in safetensors or torch: name the file instead."""
    folder = Path(lora_weights).expanduser()
    files = [str(folder / name) for name in ADAPTER_WEIGHT_FILES if (folder / name).is_file()]
    where = files[0] if files else lora_weights
    return ValueError(
        f"{flag}: cannot read the adapter weights {where} ({type(err).__name__}: {err}); "
        "the file is truncated or corrupt: copy or save the adapter again"
    )


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
    from safetensors import SafetensorError

    read_adapter_config(lora_weights, flag)
    try:
        peft_model = PeftModel.from_pretrained(
            model, lora_weights, is_trainable=is_trainable, adapter_name=adapter_name
        )
    except (SafetensorError, EOFError) as err:
        raise unreadable_adapter_error(lora_weights, flag, err) from err
    except (RuntimeError, ValueError, KeyError) as err:
        if "PytorchStreamReader" in str(err) or "pickle" in str(err).lower():
            raise unreadable_adapter_error(lora_weights, flag, err) from err
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
