"""Merging and trimming key/value caches for continuous batching: the only code that relies on how
transformers lays out a `DynamicCache` inside (`cache.layers`, each a `DynamicLayer` with `keys` and
`values` of shape [rows, heads, positions, head_dim]). These are not public API and have moved between
releases; `tests/test_kv_cache_layout.py` fails loudly when an upgrade changes them. transformers' own
continuous batching (`generate_batch`) was evaluated as the replacement and not adopted (docs/api.md,
"Why not transformers' continuous batching").

A cache of another kind (sliding-window or hybrid models) is never merged: `can_merge` is False and the
scheduler lets new rows wait until the running batch has ended.
"""

from __future__ import annotations

PLAIN_LAYER = "DynamicLayer"


def new_cache(config):
    """An empty cache for one prompt pass of `config`'s model."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def can_merge(cache) -> bool:
    """Whether every layer of `cache` is a plain growing key/value pair (what merging rows needs)."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(
        type(layer).__name__ == PLAIN_LAYER and getattr(layer, "keys", None) is not None for layer in layers
    )


def left_pad(tensor, length: int, dim: int = 2):
    """`tensor` with zeros in front along `dim` up to `length` (cache tensors: [rows, heads, seq, dim])."""
    import torch

    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def merge(old, new, length: int):
    """One cache holding `old`'s rows then `new`'s, both left-padded to `length` positions."""
    import torch

    layers = [
        (
            torch.cat([left_pad(a.keys, length), left_pad(b.keys, length)]),
            torch.cat([left_pad(a.values, length), left_pad(b.values, length)]),
        )
        for a, b in zip(old.layers, new.layers)
    ]
    return type(old)(layers)


def select_rows(cache, index) -> None:
    """Keep only the rows at `index` (a tensor of row numbers), in place."""
    cache.batch_select_indices(index)


def drop_leading(cache, count: int):
    """`cache` without its first `count` positions (padding columns that no row needs any more)."""
    return type(cache)([(layer.keys[:, :, count:], layer.values[:, :, count:]) for layer in cache.layers])
