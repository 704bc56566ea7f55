"""Turning the flags of a `finetune.py` command line into a `FinetuneConfig`.

`resolve_config` turns the flags of a command line into a `FinetuneConfig` in small steps: Stanford's
aliases, names that transformers 5 renamed, per-mode defaults, then one validation pass that collects
every problem. Pass-through flags (any other `TrainingArguments` field) are checked by name first, so
a mistyped flag fails before the model loads, with a suggestion.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from pathlib import Path

from alpaca.core.cli import parse_bool
from alpaca.core.log import log
from alpaca.finetune.settings import (
    DEFAULT_SOURCES,
    NUMERIC_RANGES,
    SECRET_MASK,
    FinetuneConfig,
    flag_defaults,
    flag_fields,
    mode_defaults,
)
from alpaca.modeling import check_model_path

# Stanford's train.py flag names, accepted as aliases of ours.
ALIASES = {
    "model_name_or_path": "base_model",
    "model_max_length": "cutoff_len",
    "num_train_epochs": "num_epochs",
    "per_device_train_batch_size": "micro_batch_size",
}

# transformers < 5 names, mapped in `map_training_args`
LEGACY_TRAINING_ARGS = {
    "evaluation_strategy": "eval_strategy",
    "no_cuda": "use_cpu",
}
# pass-through names we read ourselves (they are not TrainingArguments fields in transformers 5)
MAPPED_NAMES = ("warmup_ratio", "fsdp_transformer_layer_cls_to_wrap")

# Keys of a saved run_config.json that report on the run rather than set it: `--config` ignores them,
# so that `finetune.py --config=OUT/run_config.json` replays the run. `extra_training_args` is read as
# the pass-through flags it holds.
REPORT_KEYS = frozenset(
    {
        "gradient_accumulation_steps",
        "world_size",
        "sources",
        "command",
        "data_report",
        "optimizer_steps",
        "warmup_steps_resolved",
        "trainable_params",
        "total_params",
        "base_model_file",
        "base_model_gguf",
        "base_model_resolved",
        "data_sha256",
        "data_cache_id",
        "precision_resolved",
        "training_format",
        "chat_template_text",
    }
)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_argument_names() -> set[str]:
    from transformers import TrainingArguments

    return {f.name for f in dataclasses.fields(TrainingArguments) if f.init}


def accepted_keys() -> set[str]:
    """Every name finetune.py accepts: its flags, Stanford's aliases, the legacy and mapped names, and
    every transformers TrainingArguments field (passed through)."""
    return (
        set(flag_defaults()) | set(ALIASES) | set(LEGACY_TRAINING_ARGS) | set(MAPPED_NAMES)
    ) | training_argument_names()


def suggest(name: str, known) -> str:
    """`; did you mean --x?` for the closest known names, or nothing."""
    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.75)
    return f"; did you mean {' or '.join('--' + c for c in close)}?" if close else ""


def check_pass_through_names(extra: dict) -> None:
    """A flag that is neither ours nor a TrainingArguments field is a typo: say so before anything
    loads (it used to reach `TrainingArguments(**kwargs)` after the model had loaded, as a TypeError)."""
    known = accepted_keys()
    unknown = [key for key in extra if key not in known]
    if unknown:
        raise ValueError(
            "; ".join(
                f"--{key} is not a flag of finetune.py nor a transformers TrainingArguments field"
                + suggest(key, known)
                for key in unknown
            )
        )


def typed_pass_through(extra: dict) -> dict:
    """The pass-through TrainingArguments boolean flags converted to booleans, so that
    `--bf16=false` or `tf32: "no"` in a config file means False (fire leaves such words strings, and
    TrainingArguments takes any non-empty string for true). Raises one error naming every flag whose
    value fits no declared type."""
    import typing

    from transformers import TrainingArguments

    from alpaca.core.cli import convert_flag

    hints = typing.get_type_hints(TrainingArguments)
    out, problems = {}, []
    for key, value in extra.items():
        hint = hints.get(LEGACY_TRAINING_ARGS.get(key, key))
        # only the boolean fields: the others' declared types are narrower than what transformers
        # accepts (`fsdp: str | None` also takes True), so their values go through as given
        if hint is None or bool not in (typing.get_args(hint) or (hint,)):
            out[key] = value
            continue
        try:
            out[key] = convert_flag(key, value, hint)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError("; ".join(problems))
    return out


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


def apply_aliases(flags: dict, extra: dict, sources: dict) -> list[str]:
    """Stanford's names (`--model_name_or_path`, ...) become ours; a conflict with our own is a problem."""
    problems = []
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
    return problems


def apply_trainer_names(flags: dict, extra: dict, sources: dict) -> list[str]:
    """TrainingArguments names that set one of our settings: --warmup_ratio, --gradient_accumulation_steps
    (gives the global batch), --eval_strategy=no (no validation set)."""
    problems = []
    if "warmup_ratio" in extra:
        ratio = extra.pop("warmup_ratio")
        if flags.get("warmup_steps") is not None and flags["warmup_steps"] != ratio:
            problems.append(f"--warmup_ratio={ratio} conflicts with --warmup_steps={flags['warmup_steps']}")
        else:
            flags["warmup_steps"] = ratio
            sources["warmup_steps"] = "flag --warmup_ratio"
    if "gradient_accumulation_steps" in extra:
        steps = int(extra.pop("gradient_accumulation_steps"))
        micro = flags.get("micro_batch_size") or mode_defaults(True)["micro_batch_size"]
        global_batch = steps * int(micro) * world_size()
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
    return problems


def apply_mode_defaults(flags: dict, use_lora: bool, sources: dict) -> None:
    """Unset mode-dependent flags take Alpaca-LoRA's (LoRA) or Stanford's (full) value."""
    for key, value in mode_defaults(use_lora).items():
        if flags.get(key) in (None, ""):
            flags[key] = value
            sources[key] = DEFAULT_SOURCES[use_lora]
        else:
            sources.setdefault(key, "flag")


def resolve_report_to(flags: dict) -> list[str]:
    report_to = flags.get("report_to")
    if isinstance(report_to, str):
        report_to = [r.strip() for r in report_to.split(",") if r.strip()]
    if report_to is None:
        wandb_wanted = flags.get("wandb_project") or os.environ.get("WANDB_PROJECT")
        report_to = ["wandb"] if wandb_wanted else ["none"]
    return list(report_to)


def setting_problems(flags: dict, extra: dict, use_lora: bool, report_to: list[str]) -> list[str]:
    """Every problem with the settings (not the numeric ranges), collected."""
    problems = []
    if not flags.get("base_model"):
        problems.append(
            "--base_model is required (a local folder or hub id), e.g. --base_model=huggyllama/llama-7b"
        )
    else:
        try:
            check_model_path(str(flags["base_model"]))
        except ValueError as err:
            problems.append(str(err))
    quantized = flags.get("load_in_8bit") or flags.get("load_in_4bit")
    if flags.get("load_in_8bit") and flags.get("load_in_4bit"):
        problems.append("--load_in_8bit and --load_in_4bit are exclusive: choose one")
    if not use_lora and quantized:
        problems.append(
            "8-bit / 4-bit loading is for LoRA only (the quantized base is frozen): use it with --use_lora=True"
        )
    if use_lora and extra.get("fsdp") and quantized:
        problems.append("--fsdp with a quantized (8-bit / 4-bit) LoRA model is not supported; drop --fsdp")
    deepspeed = extra.get("deepspeed")
    if deepspeed and isinstance(deepspeed, str) and not Path(deepspeed).is_file():
        problems.append(f"--deepspeed={deepspeed!r}: no such config file (see configs/)")
    elif deepspeed and importlib.util.find_spec("deepspeed") is None:
        problems.append("--deepspeed needs the deepspeed package: pip install deepspeed")
    for integration, package in (("wandb", "wandb"), ("tensorboard", "tensorboard")):
        if integration in report_to and importlib.util.find_spec(package) is None:
            problems.append(
                f"reporting to {integration} (--report_to or --wandb_project) needs the {package} package: "
                f"pip install {package}"
            )
    if flags.get("precision", "auto") not in ("auto", "bf16", "fp16", "fp32"):
        problems.append(f"--precision={flags['precision']!r}: choose auto, bf16, fp16 or fp32")
    return problems + range_problems(flags, use_lora)


def typed_value(spec: dataclasses.Field, flags: dict):
    """The flag's value converted to the field's type; an absent flag (or None for a non-optional one)
    takes the field's default."""
    kinds = [k.strip() for k in str(spec.type).split("|")]
    optional = "None" in kinds
    value = flags.get(spec.name, spec.default)
    if value is None or (value == "" and optional):
        return None if optional else spec.default
    if "bool" in kinds:
        try:
            return parse_bool(spec.name, value)
        except ValueError:
            if kinds != ["bool"]:
                return str(value)
            raise
    convert = {"int": int, "float": float, "str": str}.get(kinds[0])
    return convert(value) if convert else value


def resolve_config(flags: dict, extra: dict) -> FinetuneConfig:
    """Merge user flags, Stanford aliases, legacy TrainingArguments names and per-mode defaults.

    `flags` holds finetune.py's own arguments (None = not given; absent = its default); `extra` the
    pass-through ones. Collects every problem into one error.
    """
    flags, extra, sources = dict(flags), dict(extra), {}
    check_pass_through_names(extra)
    extra = typed_pass_through(extra)
    problems = apply_aliases(flags, extra, sources)
    extra, notes = map_training_args(extra)
    problems += apply_trainer_names(flags, extra, sources)
    use_lora = bool(flags.get("use_lora", True))
    apply_mode_defaults(flags, use_lora, sources)
    report_to = resolve_report_to(flags)
    problems += setting_problems(flags, extra, use_lora, report_to)
    target_modules = ["q_proj", "v_proj"]
    try:
        target_modules = parse_target_modules(flags.get("lora_target_modules") or target_modules)
    except ValueError as err:
        problems.append(str(err))
    accumulation, warning = 1, None
    try:
        accumulation, warning = gradient_accumulation(
            int(flags["batch_size"]), int(flags["micro_batch_size"]), world_size()
        )
    except (ValueError, TypeError) as err:
        problems.append(str(err))
    if problems:
        raise ValueError("invalid finetune.py arguments:\n  - " + "\n  - ".join(problems))
    for note in notes + ([warning] if warning else []):
        log(f"note: {note}")
    values = {spec.name: typed_value(spec, flags) for spec in flag_fields()}
    values.update(use_lora=use_lora, lora_target_modules=target_modules, report_to=report_to)
    return FinetuneConfig(
        **values,
        gradient_accumulation_steps=accumulation,
        world_size=world_size(),
        extra_training_args=extra,
        sources=sources,
    )


def settings_from_run_config(data: dict) -> dict:
    """The flags a saved run_config.json (or any --config file) sets for finetune.py: report keys are
    dropped, `extra_training_args` is spread out into the pass-through flags it holds, and masked
    secrets are left out."""
    settings = {k: v for k, v in data.items() if k not in REPORT_KEYS and k != "extra_training_args"}
    settings.update(data.get("extra_training_args") or {})
    # a secret saved masked (`--hub_token=***`) is not its value: give it on the command line again
    return {k: v for k, v in settings.items() if v != SECRET_MASK}
