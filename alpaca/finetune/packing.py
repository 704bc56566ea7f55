"""Padding-free packing: the examples of a micro-batch become one row with per-example positions.

How transformers 5 keeps packed examples apart: with no attention mask, no KV cache and position ids
that restart at 0, `masking_utils.find_packed_sequence_indices` splits the row where the positions
restart and the mask builder turns the causal mask block-diagonal (sdpa and eager checked). Flash
attention reads the same boundaries from `cu_seq_lens_q/k`. Not every model passes its position ids
to the mask builder (OPT does not in transformers 5.23; ALiBi models such as BLOOM take no position
ids at all), so `check_packing_supported` tries the model before training instead of trusting a list.
"""

from __future__ import annotations

from alpaca.finetune.data import IGNORE_INDEX

# Kept-apart examples give bit-identical logits in every precision (0.0 measured in fp32 and bf16 for
# LLaMA and GPT-2): the masked keys add exact zeros and both probe rows have the same shapes, so the
# kernels do the same arithmetic. A leaking random-init BLOOM in bf16 moves them by 3e-3.
LEAK_TOLERANCE = 1e-5


class PackingCollator:
    """Padding-free batches: the examples of a micro-batch become one row, with no padding at all.

    A row holds exactly the `micro_batch_size` examples the sampler hands over, so an optimizer step
    sees the same examples as without packing and the loss, gradients and schedule stay the same; only
    the padding (and its compute) goes. Rows therefore vary in length, up to
    `micro_batch_size * cutoff_len` tokens.

    The batch holds `input_ids`, `labels` and `position_ids` of shape (1, total tokens), where the
    position ids restart at 0 for each example; the boundaries for flash attention's variable-length
    kernels (`cu_seq_lens_q/k` as int32, `max_length_q/k`), as `DataCollatorWithFlattening` returns
    them; and `use_cache=False`. Without that last one LLaMA builds a KV cache on every forward, in
    training too, while `config.use_cache` is true (the default), and transformers skips packed-sequence
    detection whenever there is a cache, so examples would attend to each other.

    The first label of each example is IGNORE_INDEX: the causal LM loss shifts labels by one, so the
    last token of an example would otherwise be trained to predict the first token of the next. In an
    unpadded batch that label is never predicted either, so the loss is the unpacked one, exactly.
    """

    def __call__(self, features: list[dict]) -> dict:
        import torch

        input_ids, labels, position_ids, boundaries = [], [], [], [0]
        for f in features:
            length = len(f["input_ids"])
            input_ids.extend(f["input_ids"])
            labels.extend([IGNORE_INDEX] + list(f["labels"][1:length]))
            position_ids.extend(range(length))
            boundaries.append(boundaries[-1] + length)
        max_length = max((len(f["input_ids"]) for f in features), default=0)
        cu_seq_lens = torch.tensor(boundaries, dtype=torch.int32)
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max_length,
            "max_length_k": max_length,
            "use_cache": False,
        }


def packing_leak(model, prefix_length: int = 6, probe_length: int = 5, seed: int = 0) -> float:
    """How much the last example of a packed row depends on the example before it.

    Packs a random prefix and a fixed probe example into one row, twice, with two different prefixes
    of the same length, and returns the largest change of the probe's logits relative to their scale.
    A model that keeps packed examples apart returns 0 or float noise (the masked keys contribute
    exact zeros and every shape is the same); one that lets them attend returns a visible change.
    The model runs in eval mode without gradients and its training mode is restored.
    """
    import torch

    embeddings = model.get_input_embeddings()
    vocab_size, device = embeddings.num_embeddings, embeddings.weight.device
    generator = torch.Generator().manual_seed(seed)
    # Ids from 3 up skip the usual unk/bos/eos, so every prefix is ordinary text to the model.
    low, high = min(3, vocab_size - 1), vocab_size
    probe = torch.randint(low, high, (probe_length,), generator=generator).tolist()
    collator = PackingCollator()
    was_training = model.training
    model.eval()
    try:
        logits = []
        with torch.no_grad():
            for _ in range(2):
                prefix = torch.randint(low, high, (prefix_length,), generator=generator).tolist()
                batch = collator([{"input_ids": ids, "labels": ids} for ids in (prefix, probe)])
                batch.pop("labels")
                batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
                logits.append(model(**batch).logits[0, -probe_length:].float())
    finally:
        model.train(was_training)
    scale = 1.0 + logits[0].abs().max().item()
    return (logits[0] - logits[1]).abs().max().item() / scale


def check_packing_supported(model) -> None:
    """Raise a ValueError naming the model type when `--packing` would let examples see each other.

    Runs `packing_leak` (two forward passes of 11 tokens) rather than trusting a list of model types:
    whether packing is exact depends on the model's code, its attention implementation and the
    transformers version.
    """
    import transformers

    config = model.config
    model_type = getattr(config, "model_type", type(model).__name__)
    attention = getattr(config, "_attn_implementation", None)
    where = f"model type {model_type!r} (attn_implementation={attention!r}, transformers {transformers.__version__})"
    try:
        leak = packing_leak(model)
    except TypeError as err:
        raise ValueError(
            f"--packing is not supported for {where}: its forward does not accept the packed inputs "
            f"(position_ids, cu_seq_lens_q/k, max_length_q/k, use_cache): {err}. Train without --packing."
        ) from err
    if leak > LEAK_TOLERANCE:
        raise ValueError(
            f"--packing is not supported for {where}: packed examples attend to one another (an "
            f"example's logits moved by {leak:.1e} of their scale when the example packed before it "
            "changed), because this model does not build a per-example attention mask from restarting "
            "position_ids. Train without --packing."
        )
