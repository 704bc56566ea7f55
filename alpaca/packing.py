"""Padding-free packing: the examples of a micro-batch become one row with per-example positions."""

from __future__ import annotations

from alpaca.data import IGNORE_INDEX


class PackingCollator:
    """Padding-free batches: the examples of a micro-batch become one row.

    Position ids restart at 0 for each example; with no attention mask, transformers builds a
    block-diagonal causal mask from them, so no example attends to another and no compute goes to
    padding. The first label of each example is masked so no token is predicted across a boundary.
    """

    def __call__(self, features: list[dict]) -> dict:
        import torch

        input_ids, labels, position_ids = [], [], []
        for f in features:
            input_ids.extend(f["input_ids"])
            labels.extend([IGNORE_INDEX] + list(f["labels"][1:]))
            position_ids.extend(range(len(f["input_ids"])))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
        }
