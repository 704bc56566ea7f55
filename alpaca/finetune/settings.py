"""Every fine-tuning setting: its default, its help text and its per-mode default, in one table.

`FinetuneConfig` below is that table. Each flag of `finetune.py` is one field made by `setting()`:
the flag's default (what `finetune.py`'s signature shows), its help line (the `Args:` section of
`finetune.py --help` is generated from it) and, for settings whose sensible value depends on the mode,
the Alpaca-LoRA (`lora=`) and Stanford (`full=`) defaults that an unset flag takes.

The generic pieces (a field with a help line, the `Args:` generator) are in alpaca/core/settings.py, shared
with every other command's table. `finetune.py`'s signature and `--help` are built from this table
by `@flags_from` (alpaca/core/settings.py). Adding a knob takes two edits:
  1. a `setting(...)` field here (default, help, per-mode defaults);
  2. the code that uses `config.<name>` (and a range in NUMERIC_RANGES, if it has one).

How the flags of a command line become a `FinetuneConfig` is in `alpaca/finetune/resolve.py`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from alpaca.core import settings as shared_settings
from alpaca.core.prompter import available_templates
from alpaca.core.settings import derived

UNSET = object()
SECRET_MASK = "***"  # what run_config.json holds in place of a token or key (alpaca/finetune/report.py)
DEFAULT_SOURCES = {True: "default (Alpaca-LoRA)", False: "default (Stanford Alpaca recipe)"}


def setting(default, help: str, *, lora=UNSET, full=UNSET, flag_type=None):
    """A flag of finetune.py: its default, its help line, and optionally its LoRA / full defaults
    (then the flag's own default is None, meaning "the mode decides")."""
    modes = None if lora is UNSET else {True: lora, False: full}
    return shared_settings.setting(default, help, flag_type=flag_type, modes=modes)


@dataclass
class FinetuneConfig:
    """Every setting of a run, resolved; saved as `run_config.json` next to the outputs."""

    # model / data
    base_model: str = setting(
        "",
        "model folder, hub id (any AutoModelForCausalLM; LLaMA and OPT tested) or a .gguf file (converted "
        "once to a cached HF folder). Required. Stanford's --model_name_or_path is an alias.",
    )
    data_path: str = setting(
        "yahma/alpaca-cleaned",
        "a JSON list or JSONL file of {instruction, input, output} records (told apart by content, not by "
        "name), or a Hugging Face dataset name.",
    )
    output_dir: str = setting(
        "./lora-alpaca",
        "where the adapter (or model), tokenizer, checkpoints, run_config.json, loss.png go. A folder "
        "holding another run's files is refused unless --overwrite or a resume.",
    )
    # training hyperparams
    batch_size: int = setting(
        None,
        "global batch (examples per optimizer step, all ranks together). Default 128.",
        lora=128,
        full=128,
    )
    micro_batch_size: int = setting(
        None,
        "examples per forward pass per device. Default 4. Stanford's --per_device_train_batch_size is an alias.",
        lora=4,
        full=4,
    )
    num_epochs: float = setting(
        None, "passes over the data. Default 3. Stanford's --num_train_epochs is an alias.", lora=3, full=3
    )
    learning_rate: float = setting(
        None, "peak learning rate. Default 3e-4 with LoRA, 2e-5 for full fine-tuning.", lora=3e-4, full=2e-5
    )
    cutoff_len: int = setting(
        None,
        "maximum tokens per example. Default 256 with LoRA, 512 for full fine-tuning. Stanford's "
        "--model_max_length is an alias.",
        lora=256,
        full=512,
    )
    val_set_size: int = setting(
        None,
        "examples held out for validation; 0 disables it. Default 2000 with LoRA, 0 full.",
        lora=2000,
        full=0,
    )
    # lora hyperparams
    lora_r: int = setting(8, "LoRA rank.")
    lora_alpha: int = setting(16, "LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = setting(0.05, "dropout on the LoRA input.")
    lora_target_modules: list = setting(
        ("q_proj", "v_proj"),
        "linear modules to adapt, e.g. [q_proj,v_proj], or all-linear.",
        flag_type=list[str] | str,
    )
    # llm hyperparams
    train_on_inputs: bool = setting(
        None,
        "also learn the prompt tokens. Default True with LoRA (upstream), False for full fine-tuning "
        "(Stanford masks the prompt).",
        lora=True,
        full=False,
    )
    add_eos_token: bool = setting(
        False,
        "kept for old commands. Every complete example ends with EOS whatever its value, which was "
        "upstream's effective behaviour (its flag was shadowed and never took effect).",
    )
    group_by_length: bool = setting(
        False, "batch examples of similar length together (faster, noisier loss curve)."
    )
    # wandb params
    wandb_project: str = setting("", "Weights & Biases project; setting it turns on wandb reporting.")
    wandb_run_name: str = setting("", "wandb run name.")
    wandb_watch: str = setting("", "wandb gradient watching: false, gradients or all.")
    wandb_log_model: str = setting("", "upload checkpoints to wandb: false, checkpoint or end.")
    resume_from_checkpoint: str | bool | None = setting(
        None,
        "a complete Trainer checkpoint folder (restores optimizer, scheduler and step), `latest` or true (the "
        "newest complete checkpoint-N in output_dir; half-written ones are skipped), or a final adapter "
        "folder (weights only; the schedule restarts). A checkpoint must come from the same run (data, "
        "model, settings in run_config.json).",
    )
    prompt_template_name: str = setting(
        None,
        f"a template in templates/ ({', '.join(available_templates())}) or a path to a JSON "
        "template. Default alpaca with LoRA (Alpaca-LoRA's), alpaca_legacy for full fine-tuning "
        "(Stanford's exact prompt).",
        lora="alpaca",
        full="alpaca_legacy",
    )
    chat_template: str = setting(
        "",
        "the chat format to train in: empty (Alpaca records in --prompt_template_name; conversation records, "
        "OpenAI `messages` or ShareGPT `conversations`, in the tokenizer's own template), tokenizer (the "
        "tokenizer's chat template, for Alpaca records too), chatml (shipped, for bases without one) or a "
        "Jinja file. Only assistant turns are trained (content and end-of-turn token) unless "
        "--train_on_inputs. The adapter records the format; generate.py and the exports use it.",
    )
    # beyond upstream
    use_lora: bool = setting(True, "train LoRA adapters (True) or every weight (False, Stanford's recipe).")
    load_in_8bit: bool = setting(False, "load the frozen base in 8-bit (bitsandbytes), LoRA only.")
    load_in_4bit: bool = setting(
        False, "load the frozen base in 4-bit NF4 with double quantization (QLoRA), LoRA only."
    )
    seed: int = setting(42, "seed for weights init, data split and shuffling.")
    precision: str = setting(
        "auto", "auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), bf16, fp16 or fp32."
    )
    logging_steps: int = setting(10, "log the loss every N optimizer steps.")
    eval_steps: int = setting(200, "evaluate every N steps when there is a validation set.")
    save_steps: int = setting(200, "checkpoint every N steps.")
    save_total_limit: int | None = setting(3, "keep at most N checkpoints.", flag_type=int)
    warmup_steps: float = setting(
        None,
        "learning-rate warmup; a value below 1 is a fraction of the run (--warmup_ratio is an alias). "
        "Default 100 with LoRA, 0.03 (Stanford's warmup_ratio) for full fine-tuning. A warning says so "
        "when the warmup is not shorter than the run.",
        lora=100,
        full=0.03,
    )
    weight_decay: float = setting(None, "AdamW weight decay. Default 0.", lora=0.0, full=0.0)
    lr_scheduler_type: str = setting(
        None,
        "linear (LoRA default) or cosine (full fine-tuning default), or any HF name.",
        lora="linear",
        full="cosine",
    )
    max_steps: int = setting(-1, "stop after N optimizer steps (overrides num_epochs); -1 for none.")
    packing: bool = setting(
        False, "padding-free batches: each micro-batch becomes one row with per-example positions."
    )
    gradient_checkpointing: bool = setting(False, "trade compute for memory.")
    report_to: list = setting(
        None,
        "comma-separated integrations (wandb, tensorboard, none). Default: wandb when a wandb project is "
        "set, else none.",
        flag_type=str | None,
    )
    trust_remote_code: bool = setting(False, "allow model code from the hub (off by default).")
    overwrite: bool = setting(False, "clear a non-empty --output_dir (another run's files) before training.")
    num_threads: int = setting(
        0,
        "torch CPU threads; 0 chooses: $OMP_NUM_THREADS when set, else the usable physical cores shared "
        "among the local ranks (docs/performance.md).",
    )
    num_proc: int = setting(
        1,
        "processes that tokenize the data (batched, into the Arrow cache in ~/.cache/alpaca-kit/data, reused "
        "by reruns, resumes, every rank and evaluate.py; docs/performance.md).",
    )
    # resolved from the flags above
    gradient_accumulation_steps: int = derived(default=1)
    world_size: int = derived(default=1)
    extra_training_args: dict = derived(default_factory=dict)
    sources: dict = derived(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def flag_fields() -> list[dataclasses.Field]:
    """The fields of FinetuneConfig that are finetune.py flags, in the signature's order."""
    return shared_settings.flag_fields(FinetuneConfig)


def flag_defaults() -> dict:
    """Each flag's default as finetune.py's signature must show it."""
    return shared_settings.flag_defaults(FinetuneConfig)


def mode_defaults(use_lora: bool) -> dict:
    """The per-mode defaults: Alpaca-LoRA's with LoRA, Stanford's recipe for full fine-tuning."""
    return {f.name: f.metadata["modes"][use_lora] for f in flag_fields() if f.metadata["modes"]}


def args_docstring(indent: str = "    ") -> str:
    """The `Args:` section of finetune.py's docstring (what `--help` shows), from the table."""
    return shared_settings.args_docstring(FinetuneConfig, indent)


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
    "num_proc": (int, 1, True, "data preparation processes"),
}
