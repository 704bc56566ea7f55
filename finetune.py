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
    resume_from_checkpoint: str | None = None,
    prompt_template_name: str = "alpaca",
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
    **training_args,
) -> dict:
    """Fine-tune `base_model` on Alpaca-format instruction data.

    Any other transformers TrainingArguments flag passes through (--fsdp, --deepspeed, --bf16, --tf32,
    --save_strategy, --optim, ...); flags that transformers 5 renamed or removed are mapped.

    Args:
        base_model: model folder, hub id (any AutoModelForCausalLM; LLaMA and OPT tested) or a .gguf
            file (converted once to a cached HF folder). Required. Stanford's --model_name_or_path is an
            alias.
        data_path: a JSON list or JSONL file of {instruction, input, output} records (told apart by
            content, not by name), or a Hugging Face dataset name.
        output_dir: where the adapter (or model), tokenizer, checkpoints, run_config.json, loss.png go.
            A folder holding another run's files is refused unless --overwrite or a resume.
        batch_size: global batch (examples per optimizer step, all ranks together). Default 128.
        micro_batch_size: examples per forward pass per device. Default 4. Stanford's
            --per_device_train_batch_size is an alias.
        num_epochs: passes over the data. Default 3. Stanford's --num_train_epochs is an alias.
        learning_rate: peak learning rate. Default 3e-4 with LoRA, 2e-5 for full fine-tuning.
        cutoff_len: maximum tokens per example. Default 256 with LoRA, 512 for full fine-tuning.
            Stanford's --model_max_length is an alias.
        val_set_size: examples held out for validation; 0 disables it. Default 2000 with LoRA, 0 full.
        lora_r: LoRA rank.
        lora_alpha: LoRA scaling numerator (scale = alpha / r).
        lora_dropout: dropout on the LoRA input.
        lora_target_modules: linear modules to adapt, e.g. [q_proj,v_proj], or all-linear.
        train_on_inputs: also learn the prompt tokens. Default True with LoRA (upstream), False for full
            fine-tuning (Stanford masks the prompt).
        add_eos_token: kept for old commands. Every complete example ends with EOS whatever its value,
            which was upstream's effective behaviour (its flag was shadowed and never took effect).
        group_by_length: batch examples of similar length together (faster, noisier loss curve).
        wandb_project: Weights & Biases project; setting it turns on wandb reporting.
        wandb_run_name: wandb run name.
        wandb_watch: wandb gradient watching: false, gradients or all.
        wandb_log_model: upload checkpoints to wandb: false, checkpoint or end.
        resume_from_checkpoint: a complete Trainer checkpoint folder (restores optimizer, scheduler
            and step), `latest` (the newest complete checkpoint-N in output_dir; half-written ones
            are skipped), or a final adapter folder (weights only; the schedule restarts). A
            checkpoint must come from the same run (data, model, settings in run_config.json).
        prompt_template_name: a template in templates/ (alpaca, alpaca_legacy, alpaca_short, vigogne) or
            a path to a JSON template.
        use_lora: train LoRA adapters (True) or every weight (False, Stanford's recipe).
        load_in_8bit: load the frozen base in 8-bit (bitsandbytes), LoRA only.
        load_in_4bit: load the frozen base in 4-bit NF4 with double quantization (QLoRA), LoRA only.
        seed: seed for weights init, data split and shuffling.
        precision: auto (bf16 on GPUs that have it, else fp16; fp32 on CPU), bf16, fp16 or fp32.
        logging_steps: log the loss every N optimizer steps.
        eval_steps: evaluate every N steps when there is a validation set.
        save_steps: checkpoint every N steps.
        save_total_limit: keep at most N checkpoints.
        warmup_steps: learning-rate warmup; a value below 1 is a fraction of the run (--warmup_ratio
            is an alias). Default 100 with LoRA, 0.03 (Stanford's warmup_ratio) for full fine-tuning.
            A warning says so when the warmup is not shorter than the run.
        weight_decay: AdamW weight decay. Default 0.
        lr_scheduler_type: linear (LoRA default) or cosine (full fine-tuning default), or any HF name.
        max_steps: stop after N optimizer steps (overrides num_epochs); -1 for none.
        packing: padding-free batches: each micro-batch becomes one row with per-example positions.
        gradient_checkpointing: trade compute for memory.
        report_to: comma-separated integrations (wandb, tensorboard, none). Default: wandb when a wandb
            project is set, else none.
        trust_remote_code: allow model code from the hub (off by default).
        overwrite: clear a non-empty --output_dir (another run's files) before training.
    """
    from alpaca.training import run_finetune

    flags = {k: v for k, v in locals().items() if k != "training_args"}
    return run_finetune(flags, training_args)


if __name__ == "__main__":
    from alpaca.cli import run

    # `train` takes **training_args, so fire would read --help as one of them; ask for the help page.
    wants_help = {"-h", "--help"} & set(sys.argv[1:])
    # metrics are logged already; fire printing the returned dict on every rank is noise
    run(train, "finetune.py", ["--", "--help"] if wants_help else None, serialize=lambda _: None)
