"""Conversation records in a chat template: token ids and the loss mask of every assistant turn.

The rule, computed on token ids: with `train_on_inputs=False` the trained tokens of each assistant turn
are its content and the template's end-of-turn token (`<|im_end|>` for ChatML, `<|eot_id|>` for
Llama 3, EOS for others): not the role header before it, not the newline after it, and nothing of the
system or user turns. Every assistant turn of a multi-turn conversation is trained.

How the turns are found: the template renders the conversation up to each assistant turn with the
generation prompt (where the reply starts) and up to the end of that turn; both texts are prefixes of
the whole rendering. The whole text is tokenized once, as `apply_chat_template(tokenize=True)` and a
server do; where the tokenizer merges across a turn's edge, each piece between edges is tokenized on
its own instead, so the mask never covers part of a token (the same fallback as Alpaca records).
"""

from __future__ import annotations

from alpaca.core.chat import alternation_break, encode_rendered, end_of_turn_ids, render

# the label of a token the loss skips (PyTorch's cross-entropy default); alpaca.finetune.data shares it
IGNORE_INDEX = -100


def turn_edges(messages: list[dict], template: str, tokenizer) -> tuple[str, list[tuple[int, int]]]:
    """The whole rendering and, for each assistant turn, the character span from where its reply
    starts to where the rendering of that turn ends."""
    full = render(template, messages, tokenizer)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start_text = render(template, messages[:index], tokenizer, add_generation_prompt=True)
        end_text = render(template, messages[: index + 1], tokenizer)
        if not (end_text.startswith(start_text) and full.startswith(end_text)):
            raise ValueError(
                f"turn {index}: the chat template does not render this conversation turn by turn (the text up "
                "to a reply is not a prefix of the whole), so the replies cannot be found for the loss mask"
            )
        spans.append((len(start_text), len(end_text)))
    return full, spans


def token_spans(
    full: str, spans: list[tuple[int, int]], tokenizer, encode=None
) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `full` and each character span as a token span. `encode(text)` gives a text's ids
    (default `encode_rendered`; batched preparation passes ids it computed in one tokenizer call)."""
    encode = encode or (lambda text: encode_rendered(tokenizer, text))
    ids = encode(full)
    edges = sorted({edge for span in spans for edge in span})
    positions = {}
    for edge in edges:
        prefix = encode(full[:edge])
        if ids[: len(prefix)] != prefix:
            break
        positions[edge] = len(prefix)
    else:
        return ids, [(positions[a], positions[b]) for a, b in spans]
    # a token crosses an edge: tokenize the pieces between edges one by one
    ids, positions, start = [], {0: 0}, 0
    for edge in [*edges, len(full)]:
        ids += encode_rendered(tokenizer, full[start:edge])
        positions[edge], start = len(ids), edge
    return ids, [(positions[a], positions[b]) for a, b in spans]


def trained_positions(ids: list[int], token_span: tuple[int, int], ends: set[int]) -> range:
    """The positions trained in one assistant turn: its first token up to and including the first
    end-of-turn token (the whole span when the template writes none)."""
    start, stop = token_span
    for position in range(start, stop):
        if ids[position] in ends:
            return range(start, position + 1)
    return range(start, stop)


def conversation_text(messages: list[dict], tokenizer, template: str, where: str = ""):
    """`turn_edges`, with a template's refusal turned into an error that names the record and turn."""
    try:
        return turn_edges(messages, template, tokenizer)
    except ValueError as err:
        # a template that refuses the conversation usually does so for broken alternation: name the turn
        broken = alternation_break(messages)
        raise ValueError(
            f"{where}: {broken}; the chat template says: {err}" if broken else f"{where}: {err}"
        ) from None


def tokenize_conversation(
    messages: list[dict],
    tokenizer,
    template: str,
    cutoff_len: int,
    train_on_inputs: bool,
    where: str = "",
    encode=None,
    ends: set[int] | None = None,
    rendered: tuple | None = None,
) -> dict:
    """Tokenize one conversation into `input_ids`, `attention_mask`, `labels` and a `status`.

    `status` is `ok`, `truncated` (cut at `cutoff_len`) or `skipped` (nothing of the first assistant turn
    fits in `cutoff_len`, so there is nothing to learn). `encode`, `ends` (the end-of-turn ids) and
    `rendered` (`conversation_text`'s result) let batched preparation hand in what it computed for many
    records at once.
    """
    full, spans = rendered or conversation_text(messages, tokenizer, template, where)
    ids, turns = token_spans(full, spans, tokenizer, encode)
    ends = end_of_turn_ids(tokenizer) if ends is None else ends
    trained = [trained_positions(ids, span, ends) for span in turns]
    labels = list(ids) if train_on_inputs else [IGNORE_INDEX] * len(ids)
    if not train_on_inputs:
        for positions in trained:
            for position in positions:
                labels[position] = ids[position]
    first_reply = turns[0][0]
    status = "ok"
    if first_reply >= cutoff_len:
        status = "skipped"
    elif len(ids) > cutoff_len:
        status = "truncated"
    ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    return {
        "input_ids": ids,
        "attention_mask": [1] * len(ids),
        "labels": labels,
        "status": status,
        "n_prompt": first_reply,
        "turns": len(messages),
        "trained_positions": [
            range(p.start, min(p.stop, cutoff_len)) for p in trained if p.start < cutoff_len
        ],
    }
