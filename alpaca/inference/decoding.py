"""Decoding settings and stop strings: what a request may ask for, and where a reply ends.

`make_settings` checks a request's decoding settings against the server's `GenerationLimits`;
`build_generation_config` turns them into a transformers `GenerationConfig`. Stop strings come from
the prompt template (`template_stop_strings`) or `--stop`, and cut a reply before the next turn the
model invents (`cut_at_stop`, `held_back` for streams). `StreamDecoder` turns a growing list of
generated tokens into text that only grows, for the API's and the page's streams.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

MAX_BEAMS = 4
MAX_TEMPERATURE = 2.0
# No tokenizer in use packs more characters than this into a token of ordinary text (English BPE
# averages about 4), so text over max_input_tokens * MAX_CHARS_PER_TOKEN characters is over the token
# limit too and is refused without tokenizing it (a 50 MB instruction took 99 s and 2.4 GB to tokenize).
MAX_CHARS_PER_TOKEN = 32


@dataclass
class DecodingSettings:
    """How to decode; the defaults are upstream Alpaca-LoRA's page defaults.

    Attributes:
        temperature: 0 is deterministic: greedy with `num_beams=1`, beam search with more beams (the
            default 4); above 0 samples, with top-p and top-k applied.
        top_p: nucleus sampling mass (1 turns it off); used only when sampling.
        top_k: sample among the k most likely tokens (0 turns it off); used only when sampling.
        num_beams: beam search width; 1 is plain greedy or sampling. Streaming always uses 1.
        max_new_tokens: the most tokens to generate after the prompt.
        seed: seeds torch's RNG before generating, so a sampled reply can be reproduced; None or a
            negative value leaves the RNG as it is.
    """

    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 40
    num_beams: int = 4
    max_new_tokens: int = 128
    seed: int | None = None

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


@dataclass
class GenerationLimits:
    """Server-side limits that no request may exceed (page sliders can be bypassed through the API).

    Attributes:
        max_input_tokens: the longest prompt, in tokens, template included.
        max_new_tokens: the largest `max_new_tokens` a request may ask for.
    """

    max_input_tokens: int = 1024
    max_new_tokens: int = 1024


def max_input_chars(limits: GenerationLimits) -> int:
    """The character bound of a request's instruction plus input, derived from `max_input_tokens`."""
    return limits.max_input_tokens * MAX_CHARS_PER_TOKEN


def make_settings(
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 40,
    num_beams: int = 4,
    max_new_tokens: int = 128,
    seed: float | int | None = None,
    limits: GenerationLimits | None = None,
) -> DecodingSettings:
    """Build `DecodingSettings` from loosely typed values (sliders send floats) and check them.

    Every problem is collected into one ValueError, so a user fixes them all at once.
    """
    limits = limits or GenerationLimits()
    problems = []
    values = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "num_beams": num_beams}
    values["max_new_tokens"] = max_new_tokens
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{name} must be a number, got {value!r}")
    if problems:
        raise ValueError("Invalid decoding settings: " + "; ".join(problems))
    if not 0 <= temperature <= MAX_TEMPERATURE:
        problems.append(f"temperature must be between 0 and {MAX_TEMPERATURE}, got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be above 0 and at most 1, got {top_p}")
    if top_k < 0 or top_k != int(top_k):
        problems.append(f"top_k must be a whole number >= 0, got {top_k}")
    if not 1 <= num_beams <= MAX_BEAMS or num_beams != int(num_beams):
        problems.append(f"num_beams (Beams) must be a whole number from 1 to {MAX_BEAMS}, got {num_beams}")
    if not 1 <= max_new_tokens <= limits.max_new_tokens or max_new_tokens != int(max_new_tokens):
        problems.append(
            f"max_new_tokens (Max tokens) must be a whole number from 1 to {limits.max_new_tokens} "
            f"(the server's --max_new_tokens_limit), got {max_new_tokens}"
        )
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int | float) or seed != int(seed)
    ):
        problems.append(f"seed must be a whole number (or -1 for random), got {seed!r}")
    if problems:
        raise ValueError("Invalid decoding settings: " + "; ".join(problems))
    return DecodingSettings(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        num_beams=int(num_beams),
        max_new_tokens=int(max_new_tokens),
        seed=int(seed) if seed is not None and seed >= 0 else None,
    )


def build_generation_config(
    tokenizer, settings: DecodingSettings, streaming: bool = False, eos_token_ids: Sequence[int] | None = None
):
    """A `GenerationConfig` for `settings`: sampling switched on only when temperature > 0.

    Upstream passed temperature / top-p / top-k without `do_sample=True`, so its sliders did nothing.
    Greedy configs carry no sampling parameters (transformers warns about unused ones). Streaming
    uses one beam because `TextIteratorStreamer` cannot follow several beams.
    """
    from transformers import GenerationConfig

    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        num_beams=1 if streaming else settings.num_beams,
        do_sample=settings.do_sample,
        # a chat-trained model also ends at its end-of-turn token(s)
        eos_token_id=list(eos_token_ids) if eos_token_ids else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    else:
        # Neutral values: the model's own generation_config may carry sampling defaults.
        kwargs.update(temperature=1.0, top_p=1.0, top_k=50)
    return GenerationConfig(**kwargs)


def template_stop_strings(template: dict) -> tuple[str, ...]:
    """The text that starts a new turn in a prompt template, derived from the template itself.

    A model that has answered often goes on to invent the next turn ("### Instruction:", "### Input:",
    "### Response:"). The markers are the headers that introduce `{instruction}` and `{input}` (the
    line before the placeholder, or the text before it on its own line), the template's
    `response_split`, and the opening words both prompts share (Alpaca's "Below is an instruction
    that describes a task"), when they are not a marker already.
    """
    markers = []
    for prompt in (template["prompt_input"], template["prompt_no_input"]):
        lines = prompt.splitlines()
        for index, line in enumerate(lines):
            position = min((line.find(p) for p in ("{instruction}", "{input}") if p in line), default=-1)
            if position < 0:
                continue
            before = line[:position].strip()
            previous = next((text.strip() for text in reversed(lines[:index]) if text.strip()), "")
            marker = before or previous
            if marker and "{" not in marker:
                markers.append(marker)
    markers.append(template["response_split"].strip())
    first_lines = [
        template[key].splitlines()[0] if template[key] else "" for key in ("prompt_input", "prompt_no_input")
    ]
    opening = os.path.commonprefix(first_lines).split("{")[0].rstrip(" ,.;:")
    if len(opening) >= 16 and not any(opening.startswith(marker) for marker in markers):
        markers.append(opening)
    return tuple(dict.fromkeys(marker for marker in markers if marker))


def parse_stop_strings(value) -> tuple[str, ...]:
    r"""`--stop` -> stop strings: a comma-separated list (or fire's tuple); `\n` stands for a newline."""
    if isinstance(value, bool):
        raise ValueError('--stop needs a value: --stop="### Instruction:,### Input:", or --stop="" for none')
    if isinstance(value, int | float):
        value = str(value)
    return tuple(item.replace("\\n", "\n") for item in split_list(value))


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string (trailing space removed), and whether one was found."""
    cut = min(
        (index for index in (text.find(stop) for stop in stop_strings if stop) if index >= 0), default=-1
    )
    if cut < 0:
        return text, False
    return text[:cut].rstrip(), True


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (so a stream
    must not show them yet: the final reply would drop them)."""
    longest = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


def split_list(value: str | Sequence[str] | None) -> list[str]:
    """`"a,b"` (or fire's tuple for `--flag=a,b`) -> `["a", "b"]`; empty entries dropped."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else [str(item) for item in value]
    return [item.strip() for item in items if item.strip()]


# sentencepiece's byte-fallback pieces (LLaMA-1/2, Mistral): one token per UTF-8 byte of a character
# that has no piece of its own.
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_byte_ids_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def byte_token_ids(tokenizer) -> frozenset[int]:
    """The ids of `tokenizer`'s byte-fallback tokens (`<0x00>` ... `<0xFF>`); empty for byte-level BPE."""
    try:
        return _byte_ids_cache[tokenizer]
    except (KeyError, TypeError):
        pass
    ids = frozenset(i for piece, i in tokenizer.get_vocab().items() if _BYTE_PIECE.fullmatch(piece))
    try:
        _byte_ids_cache[tokenizer] = ids
    except TypeError:
        pass
    return ids


class StreamDecoder:
    """Decodes a reply that grows token by token into text that only grows.

    `text` is the reply as a whole (what a non-streamed reply holds); `settled_text` is the longest
    start of it that no later token can change, which is what a stream may show. Two things can change
    text already decoded:

    - A run of byte-fallback tokens decodes as a whole: as UTF-8 when the run is valid, else as one
      U+FFFD per byte (tokenizers' ByteFallback decoder). So a run that reads "日" now may read
      "\ufffd\ufffd\ufffd\ufffd" once one more byte token joins it. The run is held back until an
      ordinary token closes it.
    - Byte-level BPE (GPT-2, SmolLM2) decodes an incomplete UTF-8 character at the end as U+FFFD, which
      the next token may complete: trailing U+FFFD is held back. With `clean_up_tokenization_spaces`,
      a space may vanish once punctuation follows it, so text from the last space on is held back.

    The reply is decoded after `context_ids` (the end of the prompt), so that its first word keeps its
    leading space as in the whole output; when the context does not decode to a prefix of the whole,
    the reply is decoded alone (and a stream shows nothing until that choice is settled).
    """

    def __init__(self, tokenizer, context_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.context_ids = [int(token) for token in context_ids]
        self.byte_ids = byte_token_ids(tokenizer)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self.clean_up = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self._context_text: str | None = None

    def _decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def _after_context(self, token_ids: Sequence[int]) -> str | None:
        if self._context_text is None:
            self._context_text = self._decode(self.context_ids)
        full = self._decode(self.context_ids + list(token_ids))
        return full[len(self._context_text) :] if full.startswith(self._context_text) else None

    def text(self, token_ids: Sequence[int]) -> str:
        """The reply's text, decoded as a whole."""
        after = self._after_context(token_ids)
        return after if after is not None else self._decode(token_ids)

    def settled_length(self, token_ids: Sequence[int]) -> int:
        """How many of `token_ids` decode to text that later tokens cannot change: all of them but a
        trailing run of byte tokens (special tokens, skipped when decoding, do not end a run)."""
        end = len(token_ids)
        while end > 0 and (token_ids[end - 1] in self.byte_ids or token_ids[end - 1] in self.special_ids):
            end -= 1
        if any(token in self.byte_ids for token in token_ids[end:]):
            return end
        return len(token_ids)

    def settled_text(self, token_ids: Sequence[int]) -> str:
        """The start of `text(token_ids + any later tokens)` known already."""
        text = self._after_context(token_ids[: self.settled_length(token_ids)])
        if text is None:
            return ""
        text = text.rstrip("\ufffd")
        if self.clean_up:
            text = text[: max(text.rfind(" "), 0)]
        return text
