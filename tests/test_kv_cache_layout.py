"""The transformers internals that the API's continuous batching relies on (`alpaca/serving/kv_cache.py`):
if an upgrade changes how a `DynamicCache` is laid out, this fails with a message saying where to look,
instead of the API quietly falling back to batches that no request can join."""

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from alpaca.serving import kv_cache

UPGRADE = (
    f"transformers {transformers.__version__} changed DynamicCache's internals that continuous batching "
    "relies on: update alpaca/serving/kv_cache.py (the only module that uses them)"
)


@pytest.fixture(scope="module")
def model(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


def prompt_pass(model, rows: list[list[int]]):
    """One left-padded prompt pass: (cache, mask, last logits)."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in rows])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows])
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = kv_cache.new_cache(model.config)
    with torch.no_grad():
        logits = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
    return cache, mask, logits


def step(model, cache, mask, tokens):
    mask = torch.cat([mask, torch.ones((len(tokens), 1), dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        logits = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            past_key_values=cache,
            use_cache=True,
        ).logits[:, -1]
    return mask, logits


def test_the_cache_layout_that_merging_relies_on(model):
    cache, _, _ = prompt_pass(model, [[5, 6, 7, 8]])
    assert kv_cache.can_merge(cache), UPGRADE
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in cache.layers:
        assert type(layer).__name__ == kv_cache.PLAIN_LAYER, UPGRADE
        shape = (1, config.num_key_value_heads, 4, head_dim)
        assert tuple(layer.keys.shape) == shape and tuple(layer.values.shape) == shape, UPGRADE
    assert len(cache.layers) == config.num_hidden_layers, UPGRADE


def test_merged_selected_and_trimmed_caches_decode_as_each_row_alone(model):
    """Two rows whose prompts ran apart, merged into one batch, decode to the logits each gives alone;
    so does the second after the first leaves and the padding no row needs is cut off."""
    short, long = [11, 12, 13], [21, 22, 23, 24, 25, 26]
    alone = []
    for ids in (short, long):
        cache, mask, logits = prompt_pass(model, [ids])
        token = logits.argmax(-1)
        mask, logits = step(model, cache, mask, token)
        alone.append((token, logits[0], cache, mask))

    cache_a, mask_a, logits_a = prompt_pass(model, [short])
    cache_b, mask_b, logits_b = prompt_pass(model, [long])
    length = max(mask_a.shape[1], mask_b.shape[1])
    cache = kv_cache.merge(cache_a, cache_b, length)
    assert kv_cache.can_merge(cache), UPGRADE
    mask = torch.cat([kv_cache.left_pad(mask_a, length, 1), kv_cache.left_pad(mask_b, length, 1)])
    tokens = torch.cat([logits_a.argmax(-1), logits_b.argmax(-1)])
    assert tokens.tolist() == [alone[0][0].item(), alone[1][0].item()]
    mask, logits = step(model, cache, mask, tokens)
    torch.testing.assert_close(logits[0], alone[0][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], alone[1][1], atol=1e-5, rtol=1e-5)

    # The long row leaves; the short one keeps decoding, with its padding columns cut off.
    kv_cache.select_rows(cache, torch.tensor([0]))
    mask, last = mask[:1], logits[:1].argmax(-1)
    unused = int((mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())
    assert unused == len(long) - len(short)
    cache = kv_cache.drop_leading(cache, unused)
    mask = mask[:, unused:]
    _, logits = step(model, cache, mask, last)
    _, reference = step(model, alone[0][2], alone[0][3], alone[0][1].argmax(-1)[None])
    torch.testing.assert_close(logits[0], reference[0], atol=1e-5, rtol=1e-5)
