"""The Hugging Face Trainer of a fine-tuning run: its TrainingArguments, datasets, collator, wandb."""

from __future__ import annotations

import os
from pathlib import Path

from alpaca.core.log import is_main_process
from alpaca.finetune.checkpoints import write_checkpoint_manifest
from alpaca.finetune.distributed import cuda_available
from alpaca.finetune.settings import FinetuneConfig


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
        use_cpu=not cuda_available(),
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

    trainer_class = trainer_class or Trainer

    from alpaca.finetune.data import ExampleDataset, PaddingCollator
    from alpaca.finetune.packing import PackingCollator, check_packing_supported

    if config.packing:
        check_packing_supported(model)
    collator = PackingCollator() if config.packing else PaddingCollator(tokenizer.pad_token_id)
    return trainer_class(
        model=model,
        args=args,
        # the prepared table (a datasets.Dataset with a `length` column for group_by_length) or a list
        train_dataset=train_set if hasattr(train_set, "column_names") else ExampleDataset(train_set),
        eval_dataset=(val_set if hasattr(val_set, "column_names") else ExampleDataset(val_set))
        if len(val_set)
        else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[checksum_manifest_callback()],
    )


def checksum_manifest_callback():
    """A callback that writes `checkpoint_sha256.json` into each checkpoint once the Trainer has saved
    all of it (`on_save` runs after `_save_checkpoint`), on rank 0 after every rank wrote its RNG file."""
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    class ChecksumManifest(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                write_checkpoint_manifest(folder)
            return control

    return ChecksumManifest()


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
