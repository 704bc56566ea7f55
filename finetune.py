"""Fine-tune a causal LM on instruction data: LoRA (default; 8-bit / 4-bit base optional) or all weights.

    python finetune.py --base_model=huggyllama/llama-7b --data_path=yahma/alpaca-cleaned
    python finetune.py --base_model=... --data_path=alpaca_data.json --load_in_4bit          # QLoRA
    torchrun --nproc_per_node=4 finetune.py --use_lora=False --model_name_or_path=... \\
        --data_path=./alpaca_data.json --bf16 True --fsdp "full_shard auto_wrap" ...          # Stanford

Every Alpaca-LoRA flag keeps its name and default; Stanford's train.py names are aliases; any other
Hugging Face `TrainingArguments` flag passes through. `python finetune.py --help` lists the flags.
"""

from __future__ import annotations

import sys

from alpaca.finetune.settings import args_docstring


def train(
    # model / data
    base_model: str = "",
    data_path: str = "yahma/alpaca-cleaned",
    output_dir: str = "./lora-alpaca",
    # training hyperparams
    batch_size: int | None = None,
    micro_batch_size: int | None = None,
    num_epochs: float | None = None,
    learning_rate: float | None = None,
    cutoff_len: int | None = None,
    val_set_size: int | None = None,
    # lora hyperparams
    lora_r: int = 8,
    lora_alpha: int = 16,
    lora_dropout: float = 0.05,
    lora_target_modules: list[str] | str = ("q_proj", "v_proj"),
    # llm hyperparams
    train_on_inputs: bool | None = None,
    add_eos_token: bool = False,
    group_by_length: bool = False,
    # wandb params
    wandb_project: str = "",
    wandb_run_name: str = "",
    wandb_watch: str = "",
    wandb_log_model: str = "",
    resume_from_checkpoint: str | bool | None = None,
    prompt_template_name: str | None = None,
    chat_template: str = "",
    # beyond upstream
    use_lora: bool = True,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    seed: int = 42,
    precision: str = "auto",
    logging_steps: int = 10,
    eval_steps: int = 200,
    save_steps: int = 200,
    save_total_limit: int = 3,
    warmup_steps: float | None = None,
    weight_decay: float | None = None,
    lr_scheduler_type: str | None = None,
    max_steps: int = -1,
    packing: bool = False,
    gradient_checkpointing: bool = False,
    report_to: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    num_threads: int = 0,
    num_proc: int = 1,
    **training_args,
) -> dict:
    """Fine-tune `base_model` on Alpaca-format instruction data.

    Any other transformers TrainingArguments flag passes through (--fsdp, --deepspeed, --bf16, --tf32,
    --save_strategy, --optim, ...); flags that transformers 5 renamed or removed are mapped. A mistyped
    flag is an error before anything loads. --config=FILE (YAML or JSON: configs/*.yaml, or a run's
    run_config.json to replay it) gives values; flags on the command line win.

    Each flag's default and help line live in alpaca/finetune/settings.py (the Args below come from it).
    """
    from alpaca.core.log import log
    from alpaca.core.threads import set_num_threads
    from alpaca.finetune.run import run_finetune

    flags = {k: v for k, v in locals().items() if k != "training_args"}
    set_num_threads(num_threads, log=log)
    return run_finetune(flags, training_args)


train.__doc__ = train.__doc__.rstrip() + "\n\n" + args_docstring()


if __name__ == "__main__":
    from alpaca.core.cli import run
    from alpaca.finetune.resolve import accepted_keys, settings_from_run_config

    # `train` takes **training_args, so fire would read --help as one of them; ask for the help page.
    wants_help = {"-h", "--help"} & set(sys.argv[1:])
    # metrics are logged already; fire printing the returned dict on every rank is noise
    run(
        train,
        "finetune.py",
        ["--", "--help"] if wants_help else None,
        known_keys=accepted_keys,
        read_config=settings_from_run_config,
        serialize=lambda _: None,
    )
