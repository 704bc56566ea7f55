"""Held-out loss and perplexity of a model (+ LoRA adapter) on a data file, on the response tokens only."""

from __future__ import annotations

from alpaca.core.prompter import Prompter
from alpaca.finetune.data import load_records
from alpaca.metrics import LossReport, response_loss


def held_out_loss(
    base_model: str,
    lora_weights: str = "",
    data_path: str = "",
    prompt_template_name: str = "",
    cutoff_len: int = 256,
    batch_size: int = 8,
) -> LossReport:
    """Load the model, tokenizer and adapter, then score `data_path` as training would (prompt masked)."""
    import torch

    from alpaca.modeling import load_adapter, load_base_model, load_tokenizer, resolve_base_model

    if cutoff_len < 2:
        raise ValueError("--cutoff_len must be at least 2 tokens")
    if batch_size < 1:
        raise ValueError("--batch_size must be at least 1")
    if not data_path:
        raise ValueError("--data_path is required: a JSON/JSONL file of instruction / input / output records")
    # Everything cheap is checked before the model loads.
    prompter = Prompter(prompt_template_name or None)
    records = load_records(data_path)
    if not records:
        raise ValueError(f"--data_path={data_path!r} holds no records")
    folder, _ = resolve_base_model(base_model, "--base_model")
    model = load_base_model(folder, dtype=torch.float32)
    tokenizer = load_tokenizer(folder)
    if lora_weights:
        model = load_adapter(model, lora_weights)
    return response_loss(model, tokenizer, records, prompter, cutoff_len=cutoff_len, batch_size=batch_size)
