"""Fine-tuning, as a table of contents: `run_finetune` calls one step after another.

`finetune.py` is a thin fire entry point over `run_finetune`. The steps live in their own modules,
each a set of module-level functions that tests call on a tiny model:

    settings.py     every setting (default, help, per-mode default, range)
    resolve.py      `resolve_config`: the command line's flags -> a checked `FinetuneConfig`
    checkpoints.py  resume plans, output-folder checks, run identity
    distributed.py  FSDP settings from Stanford's flags
    data.py         records, tokenization, label masks, collators (packing.py: packed batches)
    sources.py      records read in bounded memory; prepared.py: the tokenized Arrow cache
    model.py        precision, tokenizer and base model, LoRA
    trainer.py      TrainingArguments and the Trainer
    report.py       run_config.json, step / warmup report, saved outputs, metrics
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

from alpaca.core.files import write_json_atomic
from alpaca.core.locks import output_lock
from alpaca.core.log import is_main_process, log
from alpaca.finetune.checkpoints import load_adapter_weights, plan_resume, prepare_output_dir, run_identity
from alpaca.finetune.distributed import close_process_group, configure_fsdp
from alpaca.finetune.model import prepare_tokenizer_and_model, training_precision
from alpaca.finetune.report import (
    final_metrics,
    report_run,
    save_outputs,
)
from alpaca.finetune.resolve import resolve_config
from alpaca.finetune.settings import FinetuneConfig
from alpaca.finetune.trainer import build_trainer, build_training_arguments, setup_wandb


def run_finetune(flags: dict, extra: dict, trainer_class=None) -> dict:
    """The whole run: resolve, check the resume point and output folder, load data and model, train,
    save. Every user mistake is found before the model loads. Returns the final metrics.

    `trainer_class` replaces transformers' Trainer (tests pass a CPU FSDP shim; users never need to).
    """
    config = resolve_config(flags, extra)
    # One run per output folder: rank 0 holds its lock from the resume checks to the last file.
    with output_lock(config.output_dir, "--output_dir") if is_main_process() else nullcontext():
        return _finetune_in_output_dir(config, trainer_class)


def _finetune_in_output_dir(config: FinetuneConfig, trainer_class) -> dict:
    """`run_finetune` once the settings are resolved and the output folder is this run's."""
    from alpaca.core.chat import save_training_format, training_format
    from alpaca.core.prompter import Prompter
    from alpaca.finetune.prepared import data_cache_root, prepare_examples, split_prepared
    from alpaca.finetune.sources import scan_source
    from alpaca.modeling import resolve_base_model

    prompter = Prompter(config.prompt_template_name)
    # every record validated and hashed in one streaming pass (kept in the data cache by content)
    source = scan_source(config.data_path, data_cache_root())
    plan = plan_resume(config)
    given_model = config.base_model
    # a .gguf base is converted once (cached by hash); every rank may call this, the cache is atomic
    config.base_model, gguf_info = resolve_base_model(given_model, log=log)
    identity = run_identity(config, source.records_sha256, gguf_info)
    prepare_output_dir(config, plan, identity)
    precision, dtype = training_precision(config)
    if is_main_process():
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers import set_seed

    set_seed(config.seed)
    configure_fsdp(config)
    tokenizer, model = prepare_tokenizer_and_model(config, dtype)
    trained_format = training_format(
        config.chat_template, prompter.template_name, tokenizer, source.has_conversations
    )
    # tokenized once into the Arrow cache (shared by ranks, resumes, reruns); training reads it mapped
    prepared = prepare_examples(
        source,
        tokenizer,
        prompter,
        config.cutoff_len,
        config.train_on_inputs,
        chat_template=trained_format.chat_template if trained_format.is_chat else None,
        num_proc=config.num_proc,
        log=log,
    )
    train_set, val_set, report = split_prepared(prepared, config.val_set_size, config.seed, config.data_path)
    report_run(
        config,
        report,
        model,
        {
            "base_model_file": given_model if gguf_info else None,
            "base_model_gguf": gguf_info,
            "base_model_resolved": identity["base_model_resolved"],
            "data_sha256": identity["data_sha256"],
            "data_cache_id": prepared.key,
            "precision_resolved": precision,
            "training_format": trained_format.kind,
            "chat_template_text": trained_format.chat_template,
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
    trainer = build_trainer(model, tokenizer, config, train_set, val_set, args, trainer_class)
    result = trainer.train(resume_from_checkpoint=plan.checkpoint)
    tokenizer.chat_template = trained_format.chat_template  # saved with the tokenizer: the format travels
    save_outputs(trainer, tokenizer, config)
    if is_main_process():
        save_training_format(config.output_dir, trained_format)
    metrics = final_metrics(trainer, result, len(train_set))
    if is_main_process():
        write_json_atomic(Path(config.output_dir) / "train_metrics.json", metrics)
    log(
        f"saved to {config.output_dir}: {'LoRA adapter' if config.use_lora else 'model'}, tokenizer, loss.png"
    )
    close_process_group()
    return metrics
