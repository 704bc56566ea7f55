"""Fine-tuning: resolved configuration, model preparation, Trainer construction, resume, reports.

`finetune.py` is a thin fire entry point over `run_finetune`. Every step is a module-level function
so tests can call it on a tiny model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from alpaca.checkpoints import (
    is_main_process,
    load_adapter_weights,
    log,
    plan_resume,
    prepare_output_dir,
    run_identity,
)
from alpaca.files import write_json_atomic
from alpaca.modeling import check_model_path

logger = logging.getLogger("alpaca")

# Alpaca-LoRA's defaults (LoRA mode) and Stanford Alpaca's recipe (full fine-tuning mode), for the
# settings whose sensible value depends on the mode. Flags left unset take these.
LORA_DEFAULTS = {
    "learning_rate": 3e-4,
    "cutoff_len": 256,
    "val_set_size": 2000,
    "train_on_inputs": True,
    "warmup_steps": 100,
    "weight_decay": 0.0,
    "lr_scheduler_type": "linear",
    "num_epochs": 3,
    "batch_size": 128,
}
FULL_DEFAULTS = {
    "learning_rate": 2e-5,
    "cutoff_len": 512,
    "val_set_size": 0,
    "train_on_inputs": False,
    "warmup_steps": 0.03,
    "weight_decay": 0.0,
    "lr_scheduler_type": "cosine",
    "num_epochs": 3,
    "batch_size": 128,
}
DEFAULT_SOURCES = {True: "default (Alpaca-LoRA)", False: "default (Stanford Alpaca recipe)"}

# Tests swap in a Trainer subclass here (the CPU FSDP shim); users never need to.
TRAINER_CLASS = None

# Stanford's train.py flag names, accepted as aliases of ours.
ALIASES = {
    "model_name_or_path": "base_model",
    "model_max_length": "cutoff_len",
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "micro_batch_size",
}


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class FinetuneConfig:
    """Every setting of a run, resolved; saved as `run_config.json` next to the outputs."""

    base_model: str
    data_path: str
    output_dir: str
    use_lora: bool
    batch_size: int
    micro_batch_size: int
    num_epochs: float
    learning_rate: float
    cutoff_len: int
    val_set_size: int
    train_on_inputs: bool
    warmup_steps: float
    weight_decay: float
    lr_scheduler_type: str
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: list
    add_eos_token: bool
    group_by_length: bool
    prompt_template_name: str
    resume_from_checkpoint: str | None
    load_in_8bit: bool
    load_in_4bit: bool
    precision: str
    seed: int
    logging_steps: int
    eval_steps: int
    save_steps: int
    save_total_limit: int | None
    max_steps: int
    packing: bool
    gradient_checkpointing: bool
    trust_remote_code: bool
    report_to: list
    wandb_project: str
    wandb_run_name: str
    wandb_watch: str
    wandb_log_model: str
    gradient_accumulation_steps: int = 1
    world_size: int = 1
    overwrite: bool = False
    extra_training_args: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def parse_target_modules(value) -> list[str] | str:
    """Accept a list, a tuple, `"[q_proj,v_proj]"`, `"q_proj,v_proj"` or `all-linear`."""
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        parts = [p.strip().strip("'\"") for p in text.split(",") if p.strip()]
        value = parts
    value = list(value)
    if value == ["all-linear"]:
        return "all-linear"
    if not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            f"--lora_target_modules={value!r}: give module names such as [q_proj,v_proj] or all-linear"
        )
    return value


def gradient_accumulation(batch_size: int, micro_batch_size: int, n_ranks: int) -> tuple[int, str | None]:
    """Steps to accumulate so that micro_batch_size x ranks x steps = batch_size.

    Upstream divided by the world size and could reach 0 (a crash) on many GPUs; we never go below 1
    and warn that the global batch then grows.
    """
    if micro_batch_size < 1 or batch_size < 1:
        raise ValueError(f"--batch_size={batch_size} and --micro_batch_size={micro_batch_size} must be >= 1")
    if micro_batch_size > batch_size:
        raise ValueError(
            f"--micro_batch_size={micro_batch_size} is larger than --batch_size={batch_size}: the global "
            "batch must hold at least one micro-batch; lower --micro_batch_size or raise --batch_size"
        )
    per_step = micro_batch_size * n_ranks
    steps = batch_size // per_step
    if steps < 1:
        return 1, (
            f"--batch_size={batch_size} is smaller than micro_batch_size x world size = {per_step}; "
            f"accumulating 1 step, so the global batch is {per_step}"
        )
    if batch_size % per_step:
        raise ValueError(
            f"--batch_size={batch_size} is not a multiple of micro_batch_size x world size = "
            f"{micro_batch_size} x {n_ranks}; choose a global batch divisible by {per_step}"
        )
    return steps, None


LEGACY_TRAINING_ARGS = {
    # transformers < 5 name -> handler note; mapped in `map_training_args`
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
}


def map_training_args(extra: dict) -> tuple[dict, list[str]]:
    """Translate flags renamed or removed in transformers 5 to today's equivalents.

    Returns the mapped dict and notes for the log.
    """
    out, notes = {}, []
    for key, value in extra.items():
        if key in LEGACY_TRAINING_ARGS:
            new = LEGACY_TRAINING_ARGS[key]
            notes.append(f"--{key} is now --{new} (transformers 5); mapped")
            out[new] = value
        elif key == "warmup_ratio":
            notes.append(
                "--warmup_ratio was removed in transformers 5; mapped to a fractional --warmup_steps"
            )
            out["warmup_ratio"] = float(value)
        elif key == "fsdp_transformer_layer_cls_to_wrap":
            notes.append("--fsdp_transformer_layer_cls_to_wrap now lives in fsdp_config; mapped")
            layers = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",")]
            out.setdefault("fsdp_config", {})
            out["fsdp_config"]["transformer_layer_cls_to_wrap"] = list(layers)
        elif key == "fsdp_config" and isinstance(value, dict):
            out.setdefault("fsdp_config", {}).update(value)
        else:
            out[key] = value
    return out, notes


# flag -> (type, lowest allowed, whether the lowest is allowed, what the flag means)
NUMERIC_RANGES = {
    "num_epochs": (float, 0, False, "passes over the data"),
    "learning_rate": (float, 0, False, "the peak learning rate"),
    "cutoff_len": (int, 1, True, "tokens per example"),
    "val_set_size": (int, 0, True, "examples held out (0 disables validation)"),
    "warmup_steps": (float, 0, True, "warmup steps (a value below 1 is a fraction of the run)"),
    "weight_decay": (float, 0, True, "the AdamW weight decay"),
    "lora_r": (int, 1, True, "the LoRA rank"),
    "lora_alpha": (float, 0, False, "the LoRA scale numerator"),
    "lora_dropout": (float, 0, True, "the LoRA dropout probability"),
    "logging_steps": (int, 1, True, "steps between loss logs"),
    "eval_steps": (int, 1, True, "steps between evaluations"),
    "save_steps": (int, 1, True, "steps between checkpoints"),
    "seed": (int, 0, True, "the random seed"),
}


def range_problems(flags: dict, use_lora: bool) -> list[str]:
    """One message per numeric flag that is not a number or out of range, so a run never starts that
    would train nothing (`--num_epochs=0` used to save an untrained adapter with exit code 0) or fail
    inside a library after the model has loaded (`--lora_r=0`)."""
    problems = []
    for key, (kind, lowest, inclusive, meaning) in NUMERIC_RANGES.items():
        value = flags.get(key)
        if value is None or (key.startswith("lora_") and not use_lora):
            continue
        try:
            number = kind(value)
            if kind is int and isinstance(value, float) and value != number:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(
                f"--{key}={value!r}: {meaning} must be {'an integer' if kind is int else 'a number'}"
            )
            continue
        if number != number or number < lowest or (number == lowest and not inclusive):
            bound = f">= {lowest}" if inclusive else f"> {lowest}"
            problems.append(f"--{key}={value!r}: {meaning} must be {bound}")
    if use_lora and flags.get("lora_dropout") is not None:
        try:
            if float(flags["lora_dropout"]) >= 1:
                problems.append(
                    f"--lora_dropout={flags['lora_dropout']!r}: a dropout probability must be below 1"
                )
        except (TypeError, ValueError):
            pass
    max_steps = flags.get("max_steps")
    if max_steps is not None and (
        not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps == 0 or max_steps < -1
    ):
        problems.append(
            f"--max_steps={max_steps!r}: give a positive number of optimizer steps, or -1 to use --num_epochs"
        )
    limit = flags.get("save_total_limit")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        problems.append(f"--save_total_limit={limit!r}: keep at least 1 checkpoint (or leave it unset)")
    output_dir = Path(str(flags.get("output_dir") or "")).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        problems.append(f"--output_dir={str(output_dir)!r} is a file; give a folder")
    if flags.get("overwrite") and flags.get("resume_from_checkpoint"):
        problems.append(
            "--overwrite clears --output_dir, --resume_from_checkpoint continues from it: give one of them"
        )
    return problems


def resolve_config(flags: dict, extra: dict) -> FinetuneConfig:
    """Merge user flags, Stanford aliases, legacy TrainingArguments names and per-mode defaults.

    `flags` holds finetune.py's own arguments (None = not given); `extra` the pass-through ones.
    Collects every problem into one error.
    """
    flags, extra = dict(flags), dict(extra)
    problems, sources = [], {}
    for alias, ours in ALIASES.items():
        if alias in extra:
            value = extra.pop(alias)
            if flags.get(ours) not in (None, "") and flags[ours] != value:
                problems.append(
                    f"--{alias}={value!r} conflicts with --{ours}={flags[ours]!r}: give one of them"
                )
            else:
                flags[ours] = value
                sources[ours] = f"flag --{alias}"
    extra, notes = map_training_args(extra)
    if "warmup_ratio" in extra:
        ratio = extra.pop("warmup_ratio")
        if flags.get("warmup_steps") is not None and flags["warmup_steps"] != ratio:
            problems.append(f"--warmup_ratio={ratio} conflicts with --warmup_steps={flags['warmup_steps']}")
        else:
            flags["warmup_steps"] = ratio
            sources["warmup_steps"] = "flag --warmup_ratio"
    if "gradient_accumulation_steps" in extra:
        steps = int(extra.pop("gradient_accumulation_steps"))
        global_batch = steps * int(flags.get("micro_batch_size") or 4) * world_size()
        if flags.get("batch_size") is not None and flags["batch_size"] != global_batch:
            problems.append(
                f"--gradient_accumulation_steps={steps} gives a global batch of {global_batch}, which conflicts "
                f"with --batch_size={flags['batch_size']}"
            )
        flags["batch_size"] = global_batch
        sources["batch_size"] = (
            "flags --gradient_accumulation_steps x --per_device_train_batch_size x world size"
        )
    if "eval_strategy" in extra and str(extra["eval_strategy"]) == "no" and flags.get("val_set_size") is None:
        flags["val_set_size"] = 0
        sources["val_set_size"] = "flag --eval_strategy no"
    use_lora = bool(flags.get("use_lora", True))
    defaults = LORA_DEFAULTS if use_lora else FULL_DEFAULTS
    for key, value in defaults.items():
        if flags.get(key) is None:
            flags[key] = value
            sources[key] = DEFAULT_SOURCES[use_lora]
        else:
            sources.setdefault(key, "flag")
    if not flags.get("base_model"):
        problems.append(
            "--base_model is required (a local folder or hub id), e.g. --base_model=huggyllama/llama-7b"
        )
    else:
        try:
            check_model_path(str(flags["base_model"]))
        except ValueError as err:
            problems.append(str(err))
    if flags.get("load_in_8bit") and flags.get("load_in_4bit"):
        problems.append("--load_in_8bit and --load_in_4bit are exclusive: choose one")
    if not use_lora and (flags.get("load_in_8bit") or flags.get("load_in_4bit")):
        problems.append(
            "8-bit / 4-bit loading is for LoRA only (the quantized base is frozen): use it with --use_lora=True"
        )
    if use_lora and extra.get("fsdp") and (flags.get("load_in_8bit") or flags.get("load_in_4bit")):
        problems.append("--fsdp with a quantized (8-bit / 4-bit) LoRA model is not supported; drop --fsdp")
    if (
        extra.get("deepspeed")
        and isinstance(extra["deepspeed"], str)
        and not Path(extra["deepspeed"]).is_file()
    ):
        problems.append(f"--deepspeed={extra['deepspeed']!r}: no such config file (see configs/)")
    elif extra.get("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        problems.append("--deepspeed needs the deepspeed package: pip install deepspeed")
    report_to = flags.get("report_to")
    if isinstance(report_to, str):
        report_to = [r.strip() for r in report_to.split(",") if r.strip()]
    if report_to is None:
        wandb_wanted = flags.get("wandb_project") or os.environ.get("WANDB_PROJECT")
        report_to = ["wandb"] if wandb_wanted else ["none"]
    for integration, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if integration in report_to and importlib.util.find_spec(package) is None:
            problems.append(
                f"reporting to {integration} (--report_to or --wandb_project) needs the {package} package: "
                f"pip install {package}"
            )
    try:
        target_modules = parse_target_modules(flags.get("lora_target_modules") or ["q_proj", "v_proj"])
    except ValueError as err:
        problems.append(str(err))
        target_modules = ["q_proj", "v_proj"]
    if flags.get("precision", "auto") not in ("auto", "bf16", "fp16", "fp32"):
        problems.append(f"--precision={flags['precision']!r}: choose auto, bf16, fp16 or fp32")
    accumulation, warning = 1, None
    try:
        accumulation, warning = gradient_accumulation(
            int(flags["batch_size"]), int(flags.get("micro_batch_size") or 4), world_size()
        )
    except ValueError as err:
        problems.append(str(err))
    problems += range_problems(flags, use_lora)
    if problems:
        raise ValueError("invalid finetune.py arguments:\n  - " + "\n  - ".join(problems))
    for note in notes + ([warning] if warning else []):
        log(f"note: {note}")
    return FinetuneConfig(
        base_model=str(flags["base_model"]),
        data_path=str(flags["data_path"]),
        output_dir=str(flags["output_dir"]),
        use_lora=use_lora,
        batch_size=int(flags["batch_size"]),
        micro_batch_size=int(flags.get("micro_batch_size") or 4),
        num_epochs=float(flags["num_epochs"]),
        learning_rate=float(flags["learning_rate"]),
        cutoff_len=int(flags["cutoff_len"]),
        val_set_size=int(flags["val_set_size"]),
        train_on_inputs=bool(flags["train_on_inputs"]),
        warmup_steps=float(flags["warmup_steps"]),
        weight_decay=float(flags["weight_decay"]),
        lr_scheduler_type=str(flags["lr_scheduler_type"]),
        lora_r=int(flags.get("lora_r", 8)),
        lora_alpha=int(flags.get("lora_alpha", 16)),
        lora_dropout=float(flags.get("lora_dropout", 0.05)),
        lora_target_modules=target_modules,
        add_eos_token=bool(flags.get("add_eos_token", False)),
        group_by_length=bool(flags.get("group_by_length", False)),
        prompt_template_name=str(flags.get("prompt_template_name") or "alpaca"),
        resume_from_checkpoint=flags.get("resume_from_checkpoint") or None,
        load_in_8bit=bool(flags.get("load_in_8bit", False)),
        load_in_4bit=bool(flags.get("load_in_4bit", False)),
        precision=str(flags.get("precision") or "auto"),
        seed=int(flags.get("seed") if flags.get("seed") is not None else 42),
        logging_steps=int(flags.get("logging_steps") or 10),
        eval_steps=int(flags.get("eval_steps") or 200),
        save_steps=int(flags.get("save_steps") or 200),
        save_total_limit=flags.get("save_total_limit", 3),
        max_steps=int(flags.get("max_steps") if flags.get("max_steps") is not None else -1),
        packing=bool(flags.get("packing", False)),
        gradient_checkpointing=bool(flags.get("gradient_checkpointing", False)),
        trust_remote_code=bool(flags.get("trust_remote_code", False)),
        report_to=list(report_to),
        wandb_project=str(flags.get("wandb_project") or ""),
        wandb_run_name=str(flags.get("wandb_run_name") or ""),
        wandb_watch=str(flags.get("wandb_watch") or ""),
        wandb_log_model=str(flags.get("wandb_log_model") or ""),
        gradient_accumulation_steps=accumulation,
        world_size=world_size(),
        overwrite=bool(flags.get("overwrite", False)),
        extra_training_args=extra,
        sources=sources,
    )


# ---------------------------------------------------------------- distributed settings

FSDP_OPTIONS = ("full_shard", "shard_grad_op", "hybrid_shard", "no_shard", "offload", "auto_wrap")


def causal_lm_class(base_model: str, trust_remote_code: bool = False):
    """The model class `from_pretrained` would build, found from the config alone (no weights)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    model_config = AutoConfig.from_pretrained(base_model, trust_remote_code=trust_remote_code)
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
    elif not _cuda_available():
        log(
            "warning: accelerate enables FSDP only on GPUs; on this CPU machine the ranks train with "
            "DDP (every rank holds the whole model)"
        )


# ---------------------------------------------------------------- model preparation


def training_precision(config: FinetuneConfig) -> tuple[str, object]:
    """The precision to train in (`bf16`, `fp16`, `fp32`) and the dtype to load the base in.

    On the CPU `auto` is fp32. An explicit bf16 runs as bf16 autocast over fp32 weights when the CPU
    has native bf16 instructions, and falls back to fp32 with a warning where it would be emulated;
    fp16 falls back to fp32 on the CPU.
    """
    import torch

    from alpaca.modeling import pick_device

    device = pick_device()
    wanted = config.precision
    for flag in ("bf16", "fp16"):
        if config.extra_training_args.pop(flag, False) in (True, "True", "true", 1):
            wanted = flag
    if device != "cuda":
        config.extra_training_args.pop("tf32", None)  # TF32 is a CUDA setting; the Trainer raises elsewhere
    if wanted == "auto":
        if device == "cuda":
            wanted = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            wanted = "fp32"
    if wanted == "bf16" and device == "cpu":
        from alpaca.modeling import cpu_has_native_bf16

        if cpu_has_native_bf16():
            # bf16 autocast over fp32 weights: measured 2.1-2.4x fp32 on an avx512_bf16 CPU, same loss
            # to 2-4 decimals; the adapter and optimizer stay fp32.
            log("precision: bf16 autocast on the CPU (native bf16 instructions found); weights stay fp32")
            return "bf16", torch.float32
        log(
            "warning: this CPU has no native bf16 (avx512_bf16, AMX or Arm BF16), so bf16 would be emulated and slow; training in fp32"
        )
        wanted = "fp32"
    if wanted in ("bf16", "fp16") and device != "cuda":
        log(
            f"warning: --{wanted} needs a CUDA GPU (or, for bf16, a CPU with native bf16); training in fp32 on {device}"
        )
        wanted = "fp32"
    if wanted == "bf16" and not torch.cuda.is_bf16_supported():
        log("warning: this GPU has no bf16; training in fp16")
        wanted = "fp16"
    # LoRA keeps the frozen base in half precision to save memory; full fine-tuning keeps fp32
    # master weights and lets AMP cast.
    if config.use_lora and wanted == "bf16":
        dtype = torch.bfloat16
    elif config.use_lora and wanted == "fp16":
        dtype = torch.float16
    else:
        dtype = torch.float32
    return wanted, dtype


def add_lora(model, config: FinetuneConfig):
    """Wrap the model with LoRA adapters (after k-bit preparation for quantized bases)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from alpaca.modeling import check_target_modules

    check_target_modules(model, config.lora_target_modules)
    if config.load_in_8bit or config.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=config.lora_target_modules,
        lora_dropout=config.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora_config)


def prepare_tokenizer_and_model(config: FinetuneConfig, dtype):
    """Load tokenizer and base model; give the tokenizer a pad token that is not EOS; add LoRA."""
    from alpaca.modeling import (
        add_missing_special_tokens,
        load_base_model,
        load_tokenizer,
        resize_embeddings_for_new_tokens,
    )

    tokenizer = load_tokenizer(
        config.base_model,
        padding_side="right",
        trust_remote_code=config.trust_remote_code,
        add_pad_token=not config.use_lora,
    )
    device_map = None
    if (config.load_in_8bit or config.load_in_4bit) and _cuda_available():
        device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = load_base_model(
        config.base_model,
        load_in_8bit=config.load_in_8bit,
        load_in_4bit=config.load_in_4bit,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=config.trust_remote_code,
    )
    add_missing_special_tokens(tokenizer)
    resize_embeddings_for_new_tokens(model, tokenizer)  # no-op unless the tokenizer outgrew the embeddings
    model.config.pad_token_id = tokenizer.pad_token_id
    # Training never reads a KV cache; building one wastes memory (upstream set this too).
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.use_lora:
        model = add_lora(model, config)
    return tokenizer, model


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- trainer


def build_training_arguments(config: FinetuneConfig, precision: str, has_eval: bool):
    """TrainingArguments from the resolved config; pass-through flags override ours."""
    from transformers import TrainingArguments

    kwargs = dict(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.micro_batch_size,
        per_device_eval_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        num_train_epochs=config.num_epochs,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        load_best_model_at_end=has_eval,
        report_to=config.report_to,
        run_name=config.wandb_run_name or None,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        ddp_find_unused_parameters=False if config.world_size > 1 else None,
        use_cpu=not _cuda_available(),
        optim="adamw_torch",
        disable_tqdm=not is_main_process(),
    )
    kwargs.update(config.extra_training_args)
    if kwargs.get("eval_strategy") == "no":
        kwargs["load_best_model_at_end"] = False
        kwargs["eval_steps"] = None
    if kwargs["load_best_model_at_end"] and kwargs["save_steps"] % kwargs["eval_steps"]:
        raise ValueError(
            f"--save_steps={kwargs['save_steps']} must be a multiple of --eval_steps={kwargs['eval_steps']} so the "
            "best checkpoint (by validation loss) can be restored at the end"
        )
    return TrainingArguments(**kwargs)


def build_trainer(model, tokenizer, config: FinetuneConfig, train_set, val_set, args, trainer_class=None):
    """An HF Trainer over our datasets and our collator."""
    from transformers import Trainer

    trainer_class = trainer_class or TRAINER_CLASS or Trainer

    from alpaca.data import ExampleDataset, PaddingCollator
    from alpaca.packing import PackingCollator, check_packing_supported

    if config.packing:
        check_packing_supported(model)
    collator = PackingCollator() if config.packing else PaddingCollator(tokenizer.pad_token_id)
    return trainer_class(
        model=model,
        args=args,
        train_dataset=ExampleDataset(train_set),
        eval_dataset=ExampleDataset(val_set) if val_set else None,
        data_collator=collator,
        processing_class=tokenizer,
    )


def setup_wandb(config: FinetuneConfig) -> None:
    """Hand wandb its settings the way its Trainer integration reads them."""
    if "wandb" not in config.report_to:
        return
    for key, value in (
        ("WANDB_PROJECT", config.wandb_project),
        ("WANDB_WATCH", config.wandb_watch),
        ("WANDB_LOG_MODEL", config.wandb_log_model),
    ):
        if value:
            os.environ[key] = value


# ---------------------------------------------------------------- reports


# A setting whose name ends like one of these holds a credential (hub_token, wandb_api_key, ...).
SECRET_NAME = re.compile(r"(^|_)(token|api_key|key|password|passwd|secret|credentials?)$", re.IGNORECASE)
MASK = "***"


def mask_secrets(value, key: str = ""):
    """A copy of `value` with every token/key/password-like setting replaced by `***`, at any depth."""
    if key and SECRET_NAME.search(key) and value not in (None, "", False):
        return MASK
    if isinstance(value, dict):
        return {k: mask_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets(v) for v in value]
    return value


def mask_command_line(argv: list[str]) -> str:
    """The command line with the values of secret flags (`--hub_token=x` or `--hub_token x`) masked."""
    words, hide_next = [], False
    for word in argv:
        if hide_next:
            words.append(MASK)
            hide_next = False
            continue
        name, equals, _ = word.lstrip("-").partition("=")
        if word.startswith("--") and SECRET_NAME.search(name.replace("-", "_")):
            if equals:
                word = f"--{name}={MASK}"
            else:
                hide_next = True
        words.append(word)
    return " ".join(words)


def save_run_config(config: FinetuneConfig, extra: dict | None = None) -> Path:
    """Print the resolved configuration (with where each default came from) and save it, with every
    secret-like setting masked (the Trainer's own training_args.bin still holds them: keep output
    folders private when passing --hub_token)."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = config.to_dict()
    if extra:
        data.update(extra)
    data = mask_secrets(data)
    data["command"] = mask_command_line(sys.argv)
    if is_main_process():
        write_json_atomic(out / "run_config.json", data)
        log("resolved configuration:")
        for key, value in data.items():
            if key in ("sources", "command"):
                continue
            source = config.sources.get(key, "")
            log(f"  {key} = {value!r}" + (f"   [{source}]" if source else ""))
    return out / "run_config.json"


def optimizer_steps(config: FinetuneConfig, n_train: int) -> int:
    """Optimizer steps the Trainer will take: max_steps, or epochs x updates per epoch, where an epoch
    is ceil(examples / (micro batch x world size)) micro-batches per rank, ceil-divided by accumulation
    (transformers 5.23, `set_initial_training_values`)."""
    if config.max_steps > 0:
        return config.max_steps
    micro_batches = math.ceil(n_train / (config.micro_batch_size * config.world_size))
    per_epoch = max(math.ceil(micro_batches / config.gradient_accumulation_steps), 1)
    return math.ceil(config.num_epochs * per_epoch)


def warmup_report(config: FinetuneConfig, total_steps: int) -> tuple[int, str | None]:
    """Warmup steps the Trainer will use, and a warning when the warmup is not shorter than the run,
    giving the peak learning rate actually reached (the schedule is computed, not guessed)."""
    warmup = (
        int(config.warmup_steps) if config.warmup_steps >= 1 else math.ceil(total_steps * config.warmup_steps)
    )
    if warmup < total_steps or warmup == 0:
        return warmup, None
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    try:
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, warmup, total_steps)
    except (ValueError, TypeError):  # schedules needing more arguments: report the steps only
        scheduler = None
    peak = None
    if scheduler is not None:
        rates = []
        for _ in range(total_steps):  # the rate each optimizer step uses, as the Trainer steps it
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        peak = max(rates)
    reached = (
        f"the learning rate peaks at {peak:.3g} ({100 * peak / config.learning_rate:.0f}% of --learning_rate="
        f"{config.learning_rate:g})"
        if peak is not None
        else "the learning rate never reaches --learning_rate"
    )
    return warmup, (
        f"warning: the warmup ({warmup} steps) is not shorter than the run ({total_steps} optimizer steps): "
        f"{reached}. Lower --warmup_steps (or use --warmup_ratio=0.03)"
    )


def plot_losses(log_history: list[dict], path: str | Path) -> Path | None:
    """Save a PNG of the training (and validation) loss against the step."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def save_outputs(trainer, tokenizer, config: FinetuneConfig) -> None:
    """Save the adapter (or full model) once through its own save method, the tokenizer, the loss
    history and plot. Upstream patched `model.state_dict`, which made newer peft write an empty
    (443-byte) adapter; `save_model` gathers FSDP/DeepSpeed shards and writes on rank 0 only."""
    trainer.model.config.use_cache = True  # the saved model generates with a KV cache
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        history = trainer.state.log_history
        write_json_atomic(Path(config.output_dir) / "loss_history.json", history)
        plot_losses(history, Path(config.output_dir) / "loss.png")


def count_trainable(model) -> tuple[int, int]:
    """(trainable, total) parameters. A bitsandbytes 4-bit weight is a packed tensor holding two values
    per byte: count the unpacked size its `quant_state` records (SmolLM2: 134.5M, not 81.9M)."""

    def size(param) -> int:
        shape = getattr(getattr(param, "quant_state", None), "shape", None)
        return math.prod(shape) if shape is not None else param.numel()

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total


def report_run(config: FinetuneConfig, report, model, extra: dict) -> None:
    """The pre-flight report: data, trainable parameters, optimizer and warmup steps (warning when the
    warmup is not shorter than the run); printed once and saved in run_config.json."""
    total_steps = optimizer_steps(config, report.train_examples)
    warmup, warmup_warning = warmup_report(config, total_steps)
    trainable, total = count_trainable(model)
    extra = dict(extra, data_report=report.to_dict(), optimizer_steps=total_steps)
    extra.update(warmup_steps_resolved=warmup, trainable_params=trainable, total_params=total)
    save_run_config(config, extra)
    log(report.summary())
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    log(f"optimizer steps: {total_steps} (warmup {warmup})")
    if warmup_warning:
        log(warmup_warning)


def final_metrics(trainer, result, n_train: int) -> dict:
    metrics = dict(result.metrics)
    metrics["global_step"] = trainer.state.global_step
    metrics["num_processes"] = trainer.accelerator.num_processes
    metrics["distributed_type"] = str(trainer.accelerator.distributed_type)
    metrics["train_examples"] = n_train
    return metrics


def run_finetune(flags: dict, extra: dict) -> dict:
    """The whole run: resolve, check the resume point and output folder, load data and model, train,
    save. Every user mistake is found before the model loads. Returns the final metrics."""
    from alpaca.data import build_datasets, load_records
    from alpaca.modeling import resolve_base_model
    from alpaca.prompter import Prompter

    config = resolve_config(flags, extra)
    prompter = Prompter(config.prompt_template_name)
    records = load_records(config.data_path)
    plan = plan_resume(config)
    given_model = config.base_model
    # a .gguf base is converted once (cached by hash); every rank may call this, the cache is atomic
    config.base_model, gguf_info = resolve_base_model(given_model, log=log)
    identity = run_identity(config, records, gguf_info)
    prepare_output_dir(config, plan, identity)
    precision, dtype = training_precision(config)
    if is_main_process():
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import set_seed

    set_seed(config.seed)
    configure_fsdp(config)
    tokenizer, model = prepare_tokenizer_and_model(config, dtype)
    train_set, val_set, report = build_datasets(
        records,
        tokenizer,
        prompter,
        config.cutoff_len,
        config.train_on_inputs,
        config.val_set_size,
        config.seed,
        source=config.data_path,
    )
    report_run(
        config,
        report,
        model,
        {
            "base_model_file": given_model if gguf_info else None,
            "base_model_gguf": gguf_info,
            "base_model_resolved": identity["base_model_resolved"],
            "data_sha256": identity["data_sha256"],
            "precision_resolved": precision,
        },
    )
    if plan.adapter_weights:
        load_adapter_weights(
            model, plan.adapter_weights, f"--resume_from_checkpoint={config.resume_from_checkpoint}"
        )
    if plan.checkpoint:
        log(f"resuming from Trainer checkpoint {plan.checkpoint}: optimizer, scheduler and step restored")
    setup_wandb(config)
    args = build_training_arguments(config, precision, has_eval=bool(val_set))
    trainer = build_trainer(model, tokenizer, config, train_set, val_set, args)
    result = trainer.train(resume_from_checkpoint=plan.checkpoint)
    save_outputs(trainer, tokenizer, config)
    metrics = final_metrics(trainer, result, len(train_set))
    if is_main_process():
        write_json_atomic(Path(config.output_dir) / "train_metrics.json", metrics)
    log(
        f"saved to {config.output_dir}: {'LoRA adapter' if config.use_lora else 'model'}, tokenizer, loss.png"
    )
    return metrics
