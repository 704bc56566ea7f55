"""Held-out loss and perplexity of a model (+ LoRA adapter) on a data file, on the response tokens only."""

from __future__ import annotations

from alpaca.core.prompter import Prompter
from alpaca.finetune.prepared import data_cache_root, prepare_examples
from alpaca.finetune.sources import scan_source
from alpaca.metrics import LossReport, examples_loss


def held_out_loss(
    base_model: str,
    lora_weights: str = "",
    data_path: str = "",
    prompt_template_name: str = "",
    cutoff_len: int = 256,
    batch_size: int = 8,
) -> LossReport:
    """Load the model, tokenizer and adapter, then score `data_path` as training would (prompt masked).

    The format is the adapter's (its `training_format.json`): a chat-trained adapter is scored in its
    chat template, on Alpaca records as well as conversations. Without one, conversations are scored in
    the tokenizer's own chat template and Alpaca records in `prompt_template_name`. The tokenized records
    come from the prepared-data cache that training uses (`alpaca.finetune.prepared`)."""
    import numpy
    import torch

    from alpaca.core.chat import read_training_format, resolve_chat_template
    from alpaca.core.log import log
    from alpaca.finetune.batched import STATUS_CODES
    from alpaca.modeling import (
        adapter_tokenizer_dir,
        load_adapter,
        load_base_model,
        load_tokenizer,
        resize_embeddings_for_new_tokens,
        resolve_base_model,
    )

    if cutoff_len < 2:
        raise ValueError("--cutoff_len must be at least 2 tokens")
    if batch_size < 1:
        raise ValueError("--batch_size must be at least 1")
    if not data_path:
        raise ValueError("--data_path is required: a JSON/JSONL file of instruction / input / output records")
    # Everything cheap is checked before the model loads.
    prompter = Prompter(prompt_template_name or None)
    source = scan_source(data_path, data_cache_root())  # every record checked, in bounded memory
    folder, _ = resolve_base_model(base_model, "--base_model")
    model = load_base_model(folder, dtype=torch.float32)
    tokenizer = load_tokenizer(adapter_tokenizer_dir(folder, lora_weights))
    resize_embeddings_for_new_tokens(model, tokenizer)  # rows a chat format added in training
    if lora_weights:
        model = load_adapter(model, lora_weights)
    trained = read_training_format(lora_weights) if lora_weights else None
    chat_template = trained.chat_template if trained is not None and trained.is_chat else None
    if chat_template is None and source.has_conversations:
        chat_template = resolve_chat_template("tokenizer", tokenizer, "conversations in --data_path")
    prepared = prepare_examples(source, tokenizer, prompter, cutoff_len, False, chat_template, log=log)
    status = prepared.dataset.data.column("status").to_numpy()
    kept = prepared.dataset.select_columns(["input_ids", "labels"])
    kept = kept.select(numpy.flatnonzero(status != STATUS_CODES["skipped"]), keep_in_memory=True)
    return examples_loss(model, tokenizer, kept, prepared.summary["skipped"], batch_size=batch_size)
