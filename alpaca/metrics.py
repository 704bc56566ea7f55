"""Measurements that need no judge: held-out loss on response tokens, and how generations end."""

from __future__ import annotations

import math
from dataclasses import dataclass

from alpaca.finetune.data import IGNORE_INDEX, tokenize_record


@dataclass
class LossReport:
    """Mean negative log-likelihood per response token (EOS included), as training computes it."""

    loss: float
    perplexity: float
    tokens: int
    examples: int
    skipped: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def response_loss(
    model,
    tokenizer,
    records: list[dict],
    prompter,
    cutoff_len: int = 256,
    batch_size: int = 8,
    chat_template: str | None = None,
):
    """Token-weighted loss of `model` on the output (+ EOS) of each record in the prompt template, or
    on every assistant turn (+ its end-of-turn token) in `chat_template`.

    The prompt is masked exactly as `train_on_inputs=False` training masks it, so the number is the
    held-out counterpart of a training loss; records whose prompt fills `cutoff_len` are skipped.
    """
    examples = [
        tokenize_record(r, i, tokenizer, prompter, cutoff_len, False, "data", chat_template)
        for i, r in enumerate(records)
    ]
    kept = [e for e in examples if e["status"] != "skipped"]
    return examples_loss(model, tokenizer, kept, len(examples) - len(kept), batch_size)


def examples_loss(model, tokenizer, kept, skipped: int, batch_size: int = 8) -> LossReport:
    """The token-weighted loss over tokenized examples (`input_ids`, `labels`): a list, or the rows of a
    prepared table (`alpaca.finetune.prepared`), read `batch_size` at a time."""
    import torch

    total_nll, total_tokens = 0.0, 0
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(kept), batch_size):
        batch = kept[start : start + batch_size]
        if isinstance(batch, dict):  # a table's slice: columns -> rows
            batch = [dict(zip(batch, row)) for row in zip(*batch.values())]
        width = max(len(e["input_ids"]) for e in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            ids[row, :n] = torch.tensor(example["input_ids"])
            mask[row, :n] = 1
            labels[row, :n] = torch.tensor(example["labels"])
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
        nll = torch.nn.functional.cross_entropy(
            shifted_logits.reshape(-1, shifted_logits.shape[-1]),
            shifted_labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        total_nll += float(nll)
        total_tokens += int((shifted_labels != IGNORE_INDEX).sum())
    if total_tokens == 0:
        raise ValueError("no response tokens to score: every record was skipped (raise cutoff_len)")
    loss = total_nll / total_tokens
    return LossReport(
        loss=loss,
        perplexity=math.exp(min(loss, 50.0)),
        tokens=total_tokens,
        examples=len(kept),
        skipped=skipped,
    )
