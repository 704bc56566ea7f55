"""Batched tokenization: exactly the examples of `data.tokenize_record`, many records per tokenizer call.

One-at-a-time preparation makes two or three tokenizer calls per record (prompt, prompt + output, and
the output alone when the tokenizer merges across the boundary) and, for a conversation, one per turn
edge plus a vocabulary lookup. Here a batch of records goes through the fast tokenizer in one call per
kind of text (every prompt, every prompt + output; every rendering and rendered prefix of a
conversation), with the same rules on the resulting ids: the prompt mask computed on token ids, the
boundary fallback, EOS, and the `skipped` / `truncated` statuses. `tests/test_batched_data.py` checks
that the examples are identical, field by field.
"""

from __future__ import annotations

from alpaca.core.chat import (
    adds_bos,
    end_of_turn_ids,
)
from alpaca.finetune.conversations import IGNORE_INDEX, conversation_text, tokenize_conversation
from alpaca.finetune.data import record_messages

# an example's status as the prepared table stores it (alpaca.finetune.prepared)
STATUS_CODES = {"ok": 0, "truncated": 1, "skipped": 2}


def rust_backend(tokenizer):
    """The `tokenizers.Tokenizer` behind a fast tokenizer when calling it directly gives exactly what
    `tokenizer(texts)` gives, else None.

    transformers' `__call__` on a fast tokenizer sets the backend's truncation, padding and
    `encode_special_tokens` (from `split_special_tokens`), calls its `encode_batch` and converts each
    encoding (offsets, attention masks, ...) in Python. With truncation and padding off and the same
    `encode_special_tokens`, `encode_batch_fast` (no offsets) returns the same ids at a fraction of the
    cost. A tokenizer class that overrides the encoding step, or a slow tokenizer, goes through
    `tokenizer(...)`."""
    from transformers import PreTrainedTokenizerFast

    backend = getattr(tokenizer, "_tokenizer", None)
    if not getattr(tokenizer, "is_fast", False) or not hasattr(backend, "encode_batch_fast"):
        return None
    kind = type(tokenizer)
    if kind._encode_plus is not PreTrainedTokenizerFast._encode_plus or kind.__call__ is not (
        PreTrainedTokenizerFast.__call__
    ):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    if bool(backend.encode_special_tokens) != bool(getattr(tokenizer, "split_special_tokens", False)):
        return None
    return backend


def encode_batch(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """Token ids of each text, in one tokenizer call (the same ids as one call per text)."""
    if not texts:
        return []
    backend = rust_backend(tokenizer)
    if backend is None:
        return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    return [
        encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
    ]


def alpaca_examples(records: list[dict], tokenizer, prompter, cutoff_len: int, train_on_inputs: bool):
    """`data.tokenize_example` for each Alpaca record, with two tokenizer calls for the whole batch."""
    prompts = [prompter.generate_prompt(r["instruction"], r.get("input") or None) for r in records]
    outputs = [r["output"] or "" for r in records]
    prompt_ids = encode_batch(tokenizer, prompts, True)
    full_ids = encode_batch(tokenizer, [p + o for p, o in zip(prompts, outputs)], True)
    eos = tokenizer.eos_token_id
    examples = []
    for output, ids, full in zip(outputs, prompt_ids, full_ids):
        n_prompt = len(ids)
        if full[:n_prompt] != ids:
            # merged across the prompt/output boundary: the prompt's own tokens, then the output's
            full = ids + tokenizer(output, add_special_tokens=False)["input_ids"]
        if eos is not None and (not full or full[-1] != eos):
            full = full + [eos]
        status = "skipped" if n_prompt >= cutoff_len else "truncated" if len(full) > cutoff_len else "ok"
        full = full[:cutoff_len]
        labels = list(full)
        if not train_on_inputs:
            labels[:n_prompt] = [IGNORE_INDEX] * min(n_prompt, len(labels))
        examples.append({"input_ids": full, "labels": labels, "status": status, "n_prompt": n_prompt})
    return examples


def conversation_examples(
    conversations: list[tuple[list[dict], str]],
    tokenizer,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool,
):
    """`conversations.tokenize_conversation` for each `(messages, where)`: each conversation is rendered
    (Jinja, one at a time), then every rendering and prefix of the batch is tokenized in one call."""
    rendered = [conversation_text(messages, tokenizer, template, where) for messages, where in conversations]
    texts = []
    for full, spans in rendered:
        texts.append(full)
        texts.extend(full[:edge] for edge in sorted({edge for span in spans for edge in span}))
    unique = list(dict.fromkeys(texts))
    # encode_rendered's rule, decided once: BOS in front where the tokenizer adds one and the text lacks it
    with_bos, bos = adds_bos(tokenizer), tokenizer.bos_token
    ids_of = {}
    for text, ids in zip(unique, encode_batch(tokenizer, unique, False)):
        if with_bos and not (bos and text.startswith(bos)):
            ids = [tokenizer.bos_token_id, *ids]
        ids_of[text] = ids
    ends = end_of_turn_ids(tokenizer)
    examples = []
    for (messages, where), text in zip(conversations, rendered):
        example = tokenize_conversation(
            messages,
            tokenizer,
            template,
            cutoff_len,
            train_on_inputs,
            where,
            encode=ids_of.__getitem__,
            ends=ends,
            rendered=text,
        )
        examples.append(example)
    return examples


def tokenize_records(
    records: list[tuple[int, dict]],
    tokenizer,
    prompter,
    cutoff_len: int,
    train_on_inputs: bool,
    source: str = "",
    chat_template: str | None = None,
) -> list[dict]:
    """`data.tokenize_record` for each `(index, record)`, in order, batched by kind of record.

    Each example holds `input_ids`, `labels`, `status`, `n_prompt`, and `turns` (messages) for the
    records formatted in a chat template."""
    alpaca, chats = [], []
    for position, (index, record) in enumerate(records):
        messages = record_messages(record, index, source, chat_template)
        if messages is None:
            alpaca.append((position, record))
            continue
        chats.append((position, (messages, f"{source!r} record {index}")))
    examples: list = [None] * len(records)
    if alpaca:
        tokenized = alpaca_examples([r for _, r in alpaca], tokenizer, prompter, cutoff_len, train_on_inputs)
        for (position, _), example in zip(alpaca, tokenized):
            examples[position] = example
    if chats:
        tokenized = conversation_examples(
            [c for _, c in chats], tokenizer, chat_template, cutoff_len, train_on_inputs
        )
        for (position, _), example in zip(chats, tokenized):
            examples[position] = example
    return examples
