"""Loading the models to serve: a base model, its adapters and other base models as `ResponseGenerator`s.

`load_generators` checks every path before the slow loads, shares one base model (and one lock)
between all adapters on it, and labels each generator for the page, the API and batch outputs.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from alpaca.core.chat import chat_prompter_for
from alpaca.core.prompter import Prompter
from alpaca.inference.decoding import DecodingSettings, GenerationLimits, split_list
from alpaca.inference.generation import ResponseGenerator
from alpaca.modeling import (
    check_adapter_fits,
    load_adapter,
    load_base_model,
    load_tokenizer,
    pick_device,
    read_adapter_config,
    resolve_base_model,
    resolve_dtype,
)

GENERIC_FOLDER_NAMES = {"hf", "merged", "model", "models", "output", "outputs", "final", "adapter", "lora"}


def display_name(path: str) -> str:
    """A short label for a model path, GGUF file or hub id: its last component, without `.gguf`;
    with the parent folder's name when the last one says nothing (`hf`, `checkpoint-200`, ...)."""
    path = Path(str(path).rstrip("/"))
    name = path.name or str(path)
    if name.lower().endswith(".gguf"):
        return name[: -len(".gguf")]
    generic = name.lower() in GENERIC_FOLDER_NAMES or re.fullmatch(r"checkpoint-\d+", name)
    if generic and path.parent.name:
        return f"{path.parent.name}/{name}"
    return name


def model_label(base_model: str, folder: str) -> str:
    """The label of a base model: for a merged export (its `export_info.json` names the base and the
    adapter), "base + adapter (merged)"; otherwise `display_name` of what the user passed."""
    info_path = Path(folder) / "export_info.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        if isinstance(info, dict) and info.get("base_model") and info.get("lora_weights"):
            return f"{display_name(info['base_model'])} + {display_name(info['lora_weights'])} (merged)"
    return display_name(base_model)


def check_hub_adapter(lora_weights: str, flag: str = "--lora_weights") -> None:
    """For an adapter given as a hub id, fetch its `adapter_config.json` (from the cache when offline)
    before the slow model load; a failure says the adapter could not be fetched, and how to go on.

    Without this check, peft's own failure offline surfaced as "does not fit the base model".
    """
    if not lora_weights or read_adapter_config(lora_weights, flag) is not None:
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(lora_weights, "adapter_config.json")
    except Exception as err:  # offline, no network, no such repository, gated, malformed id
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else type(err).__name__
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{flag}={lora_weights!r} is not a local folder and could not be fetched from the Hugging Face "
            f'hub ({reason}: {detail}). Pass a local adapter folder, or {flag}="" to run the base '
            "model alone (or a merged model)."
        ) from err


def add_adapter(peft_model, lora_weights: str, adapter_name: str) -> None:
    """Load one more adapter into a `PeftModel` under `adapter_name` and check that it fits."""
    read_adapter_config(lora_weights)
    try:
        peft_model.load_adapter(lora_weights, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--compare_lora_weights={lora_weights!r} does not fit the base model: {detail}. "
            "Was it trained on another base model?"
        ) from err
    check_adapter_fits(peft_model, lora_weights, adapter_name, "--compare_lora_weights")


def inference_precision(precision: str, device: str) -> tuple[object, str]:
    """The dtype to load a model in for generation on `device`, and why (for the start-up report).

    On the CPU, bf16 weights pay off only where the CPU computes bf16 natively: measured on SmolLM2
    (one thread, greedy, avx512_bf16) bf16 weights generated 1.45x (batch 1) and 2.3x (batch 8) the fp32
    tokens/s, while bf16 autocast over fp32 weights was slower than fp32 at batch 1 (it re-casts every
    weight at every step). Without native bf16 it is emulated and slow, so fp32 runs instead.
    """
    import torch

    import alpaca.modeling

    dtype = resolve_dtype(precision, device)
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if device != "cpu" or dtype != torch.bfloat16:
        source = "--precision=auto on " + device if precision == "auto" else f"--precision={precision}"
        return dtype, f"{names[dtype]} ({source})"
    if alpaca.modeling.cpu_has_native_bf16():
        return dtype, "bf16 weights (--precision=bf16; this CPU has native bf16 instructions)"
    return torch.float32, (
        "warning: fp32, not the --precision=bf16 asked for: this CPU has no native bf16 (avx512_bf16, AMX "
        "or Arm BF16), where bf16 is emulated and slower than fp32"
    )


def load_model(
    base_model: str,
    load_8bit: bool = False,
    load_4bit: bool = False,
    precision: str = "auto",
    trust_remote_code: bool = False,
):
    """Load a base model for inference on the best device, in a dtype that suits it, and its tokenizer.

    bf16 or fp16 on a GPU, fp16 on Apple's MPS, fp32 on the CPU unless --precision=bf16 and the CPU has
    native bf16 (upstream cast to fp16 everywhere, which is slow or unsupported on CPUs). The tokenizer
    pads on the left, for batched generation. `model.resolved_precision` says which precision runs and why.
    """
    device = pick_device()
    dtype, why = inference_precision(precision, device)
    if why.startswith("warning:"):
        print(why, file=sys.stderr)
    device_map = {"cuda": "auto", "mps": {"": "mps"}}.get(device)
    if (load_8bit or load_4bit) and device_map is None:
        device_map = {"": device}
    model = load_base_model(
        base_model,
        load_in_8bit=load_8bit,
        load_in_4bit=load_4bit,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
    )
    model.eval()
    model.resolved_precision = why
    tokenizer = load_tokenizer(base_model, padding_side="left", trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_generators(
    base_model: str,
    lora_weights: str = "",
    compare_lora_weights: str | Sequence[str] = "",
    compare_base_models: str | Sequence[str] = "",
    prompt_template: str = "",
    load_8bit: bool = False,
    load_4bit: bool = False,
    precision: str = "auto",
    trust_remote_code: bool = False,
    limits: GenerationLimits | None = None,
    stop_strings: Sequence[str] | None = None,
) -> list[ResponseGenerator]:
    """Load the models to serve; the first generator is the main one (base + `lora_weights`).

    Extra adapters share the base model's weights (one `PeftModel` with named adapters); when any
    adapter is loaded, the base model alone is offered too, for comparison. Each of
    `compare_base_models` is loaded as a separate model without adapters. A `.gguf` base model is
    converted once to a cached HF folder. `stop_strings`: None derives them from the template.
    """
    prompter = Prompter(prompt_template or None)
    common = dict(limits=limits or GenerationLimits(), stop_strings=stop_strings)
    extra_adapters = split_list(compare_lora_weights)
    # Every path is checked before the slow loads: a typo in the last flag should not cost a model load.
    folder, gguf_info = resolve_base_model(base_model, "--base_model")
    check_hub_adapter(lora_weights, "--lora_weights")
    for path in extra_adapters:
        check_hub_adapter(path, "--compare_lora_weights")
    others = [
        (path, *resolve_base_model(path, "--compare_base_models")) for path in split_list(compare_base_models)
    ]
    source = {"base_model": base_model, "base_model_folder": folder, "base_model_gguf": gguf_info}
    model, tokenizer = load_model(folder, load_8bit, load_4bit, precision, trust_remote_code)
    source["precision"] = model.resolved_precision  # written beside batch outputs
    tokenizer = trained_tokenizer(model, tokenizer, lora_weights, trust_remote_code)

    def prompter_for(path: str):
        """The adapter's trained chat format unless --prompt_template names a prompt template."""
        return (None if prompt_template else chat_prompter_for(path, tokenizer)) or prompter

    lock = threading.Lock()
    base_label = model_label(base_model, folder)
    generators = []
    adapters = [path for path in [lora_weights, *extra_adapters] if path]
    if adapters:
        flag = "--lora_weights" if lora_weights else "--compare_lora_weights"
        model = load_adapter(model, adapters[0], adapter_name="adapter0", flag=flag)
        for index, path in enumerate(adapters[1:], start=1):
            add_adapter(model, path, f"adapter{index}")
        model.eval()
        for index, path in enumerate(adapters):
            label = f"{base_label} + {display_name(path)}"
            generators.append(
                ResponseGenerator(
                    model,
                    tokenizer,
                    name=label,
                    adapter_name=f"adapter{index}",
                    lock=lock,
                    source={**source, "lora_weights": path},
                    prompter=prompter_for(path),
                    **common,
                )
            )
        alone = base_label if not lora_weights else f"{base_label} (no adapter)"
        # the base alone is prompted like the main adapter, so the two compare in one format
        base_alone = ResponseGenerator(
            model,
            tokenizer,
            name=alone,
            lock=lock,
            source=source,
            prompter=prompter_for(lora_weights),
            **common,
        )
        generators.insert(0 if not lora_weights else len(generators), base_alone)
    else:
        generators.append(
            ResponseGenerator(
                model, tokenizer, name=base_label, lock=lock, source=source, prompter=prompter, **common
            )
        )
    for path, other_folder, other_gguf in others:
        other, other_tokenizer = load_model(other_folder, load_8bit, load_4bit, precision, trust_remote_code)
        other_source = {
            "base_model": path,
            "base_model_folder": other_folder,
            "base_model_gguf": other_gguf,
            "precision": other.resolved_precision,
        }
        label = model_label(path, other_folder)
        generators.append(
            ResponseGenerator(
                other, other_tokenizer, name=label, source=other_source, prompter=prompter, **common
            )
        )
    _make_names_unique(generators)
    return generators


def trained_tokenizer(model, tokenizer, lora_weights: str, trust_remote_code: bool = False):
    """The tokenizer saved with a chat-trained adapter (it holds the trained chat template and any
    tokens the format added, whose embedding rows are made here before the adapter loads), else
    `tokenizer`."""
    from alpaca.core.chat import read_training_format
    from alpaca.modeling import adapter_tokenizer_dir, resize_embeddings_for_new_tokens

    training = read_training_format(lora_weights) if lora_weights else None
    folder = adapter_tokenizer_dir("", lora_weights) if training is not None and training.is_chat else ""
    if not folder:
        return tokenizer
    trained = load_tokenizer(folder, padding_side="left", trust_remote_code=trust_remote_code)
    resize_embeddings_for_new_tokens(model, trained)
    return trained


def _make_names_unique(generators: list[ResponseGenerator]) -> None:
    seen: dict[str, int] = {}
    for generator in generators:
        count = seen.get(generator.name, 0)
        seen[generator.name] = count + 1
        if count:
            generator.name = f"{generator.name} ({count + 1})"


def describe(
    generators: list[ResponseGenerator], settings: DecodingSettings, limits: GenerationLimits
) -> dict:
    """The resolved configuration, for printing once at start-up."""
    return {
        "models": [generator.name for generator in generators],
        "base_model": generators[0].source.get("base_model"),
        "base_model_folder": generators[0].source.get("base_model_folder"),
        "stop_strings": list(generators[0].stop_strings),
        "device": str(getattr(generators[0].model, "device", "cpu")),
        "dtype": str(getattr(generators[0].model, "dtype", "")),
        "precision": getattr(generators[0].model, "resolved_precision", ""),
        "decoding": asdict(settings),
        "limits": asdict(limits),
    }
