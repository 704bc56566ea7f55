"""Distributed settings: Stanford's `--fsdp "full_shard auto_wrap"` flags on transformers 5's FSDP."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alpaca.core.log import log
from alpaca.finetune.settings import FinetuneConfig

FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard", "offload", "auto_wrap")


def causal_lm_class(base_model: str, trust_remote_code: bool = False):
    """The model class `from_pretrained` would build, found from the config alone (no weights)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from alpaca.modeling import load_model_config

    model_config = load_model_config(base_model, trust_remote_code=trust_remote_code)
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(model_config)]
    except KeyError:
        return None


def configure_fsdp(config: FinetuneConfig) -> None:
    """Turn Stanford's `--fsdp "full_shard auto_wrap"` into transformers 5's `fsdp=True` + `fsdp_config`,
    default the wrap class to the model's own decoder layer, and check a given one exists.

    Runs before any weights load, so a wrong class name costs seconds, not a model load.
    """
    extra = config.extra_training_args
    fsdp = extra.get("fsdp")
    if fsdp in (None, False, "", "False", "false", "no"):
        extra.pop("fsdp", None)
        return
    options = (
        fsdp.split() if isinstance(fsdp, str) else (list(fsdp) if isinstance(fsdp, (list, tuple)) else [])
    )
    unknown = [o for o in options if o not in FSDP_OPTIONS and o not in ("True", "true")]
    if unknown:
        raise ValueError(f"--fsdp: unknown option(s) {unknown}; choose from {list(FSDP_OPTIONS)}")
    fsdp_config = extra.get("fsdp_config") or {}
    if isinstance(fsdp_config, str):
        path = Path(fsdp_config)
        if not path.is_file():
            raise ValueError(f"--fsdp_config={fsdp_config!r}: no such file (see configs/fsdp_*.json)")
        try:
            fsdp_config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"--fsdp_config={fsdp_config!r} is not valid JSON: {err}") from err
    fsdp_config = {k[5:] if k.startswith("fsdp_") else k: v for k, v in dict(fsdp_config).items()}
    if "shard_grad_op" in options:
        fsdp_config.setdefault("reshard_after_forward", False)
    if "offload" in options:
        fsdp_config.setdefault("cpu_offload", True)
    model_cls = causal_lm_class(config.base_model, config.trust_remote_code)
    layer_names = fsdp_config.get("transformer_layer_cls_to_wrap")
    if isinstance(layer_names, str):
        layer_names = [name.strip() for name in layer_names.split(",") if name.strip()]
    if model_cls is not None:
        module = sys.modules[model_cls.__module__]
        if not layer_names:
            layer_names = list(getattr(model_cls, "_no_split_modules", None) or [])[:1]
            if layer_names:
                config.sources["fsdp_transformer_layer_cls_to_wrap"] = (
                    f"default ({model_cls.__name__}'s decoder layer)"
                )
        missing = [name for name in layer_names or [] if not hasattr(module, name)]
        if missing:
            known = sorted(getattr(model_cls, "_no_split_modules", None) or [])
            raise ValueError(
                f"--fsdp_transformer_layer_cls_to_wrap={missing}: {model_cls.__name__} has no such layer class; "
                f"its decoder layer is {known}"
            )
    if layer_names:
        fsdp_config["transformer_layer_cls_to_wrap"] = layer_names
    extra["fsdp"] = True
    extra["fsdp_config"] = fsdp_config
    if config.world_size < 2:
        log(
            "warning: --fsdp needs several processes (torchrun --nproc_per_node=N); training in one process without it"
        )
        extra.pop("fsdp")
        extra.pop("fsdp_config")
    elif not cuda_available():
        log(
            "warning: accelerate enables FSDP only on GPUs; on this CPU machine the ranks train with "
            "DDP (every rank holds the whole model)"
        )


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def close_process_group() -> None:
    """Wait for every rank, then shut the process group down before the interpreter exits.

    Left open, gloo's threads are torn down during interpreter shutdown, and a rank sometimes aborted
    there ("terminate called without an active exception", exit -6) after a complete, saved run, so
    torchrun reported a failure.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
