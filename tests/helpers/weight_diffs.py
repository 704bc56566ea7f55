"""The weight-diff recipe that streaming replaced, kept as the reference the streamed diffs must match."""

from __future__ import annotations

from alpaca.weights.diffs import tensor_sha256


def in_memory_make_diff(path_raw, path_tuned):
    """The recipe upstream (and this project before streaming) used: both models in fp32 in memory, the raw
    one given [PAD] by resize_embeddings_for_new_tokens, then `tuned - raw` in place. Returns the diff's
    state and the record of `raw + diff`, as make_diff writes it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca.modeling import resize_embeddings_for_new_tokens

    tuned = AutoModelForCausalLM.from_pretrained(path_tuned, dtype=torch.float32)
    raw = AutoModelForCausalLM.from_pretrained(path_raw, dtype=torch.float32)
    tokenizer_raw, tokenizer_tuned = (
        AutoTokenizer.from_pretrained(path_raw),
        AutoTokenizer.from_pretrained(path_tuned),
    )
    if "[PAD]" in tokenizer_tuned.get_vocab() and "[PAD]" not in tokenizer_raw.get_vocab():
        added = tokenizer_raw.add_special_tokens({"pad_token": "[PAD]"})
        resize_embeddings_for_new_tokens(raw, tokenizer_raw, added)
    state_tuned, state_raw = tuned.state_dict(), raw.state_dict()
    seen, keys = set(), []
    for key, tensor in state_tuned.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            keys.append(key)
    tensors, total = {}, 0
    with torch.no_grad():
        for key in keys:
            state_tuned[key].sub_(state_raw[key])
            recovered = state_tuned[key] + state_raw[key]
            tensors[key] = {"sha256": tensor_sha256(recovered), "shape": list(recovered.shape)}
            total = total + recovered.sum()
    record = {"format": "alpaca-kit weight diff integrity v1", "dtype": "float32", "sum": float(total)}
    return {key: state_tuned[key] for key in keys}, record | {"tensors": tensors}
