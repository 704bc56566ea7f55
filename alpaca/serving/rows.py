"""What a request becomes inside the scheduler: a `Job` with one `Row` per prompt and choice.

A row holds its decoding settings (`RowSettings`), the tokens generated so far and its text. It takes
one token at a time (`Row.add_token`): stop strings, token limits, log-probabilities, streaming deltas
to the request's handler, and the end of a row whose client went away. `scheduler` decides which rows
run together and gives them their tokens.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from alpaca.inference.decoding import StreamDecoder, held_back

logger = logging.getLogger(__name__)

# Prompt tokens decoded in front of the generated ones, so that a reply's first characters (a
# sentencepiece word's leading space) decode as they do after the whole prompt.
CONTEXT_TOKENS = 8


@dataclass(frozen=True)
class RowSettings:
    """How to decode one row.

    Attributes:
        max_tokens: the most tokens to generate.
        temperature: 0 is greedy; above 0 samples, with `top_p` and `top_k` (0: off) applied.
        seed: seeds this row's own random generator; None draws a fresh seed.
        stop: the reply ends before the first of these strings.
        stop_token_ids: tokens that end the reply (EOS), not part of it.
        logprobs: None: none; k >= 0: each token's log-probability and the k most likely alternatives.
        strip: strip the reply and the text before a stop string, as the page and batch mode do.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    strip: bool = False

    @property
    def samples(self) -> bool:
        return self.temperature > 0


@dataclass
class TokenLogprob:
    """One generated token's log-probability (of the model's distribution, before temperature) and
    the most likely alternatives at that step, as (token id, log-probability) pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


def visible_text(raw: str, stop: Sequence[str], strip: bool, final: bool) -> tuple[str, bool]:
    """The part of a row's decoded text that may be shown, and whether a stop string ended it.

    Before the end, text that may still become a stop string is held back, as is an incomplete UTF-8
    character (decoded as U+FFFD) and, when stripping, trailing whitespace, so every later version
    of the text extends the one shown before.
    """
    text = raw.lstrip() if strip else raw
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
        return (text.rstrip() if strip else text), True
    if not final:
        text = text[: len(text) - held_back(text, stop)].rstrip("\ufffd")
    return (text.rstrip() if strip else text), False


class Row:
    """One sequence being generated: a prompt and one choice of one request."""

    def __init__(self, job: Job, index: int, prompt_ids: list[int], settings: RowSettings, rng=None):
        self.job = job
        self.index = index
        self.prompt_ids = list(prompt_ids)
        self.settings = settings
        self.rng = rng
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.step_logprobs = None
        self._text_decoder: StreamDecoder | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add_token(self, token: int, tokenizer) -> None:
        """Take the token generated for this row; end the row at EOS, a stop string or the limit."""
        if token in self.settings.stop_token_ids:
            self._update_text(tokenizer, final=True)
            self.finish("stop")
            return
        self.token_ids.append(token)
        if self.step_logprobs is not None:
            self.logprobs.append(self._logprob_of(token))
            self.step_logprobs = None
        if self._update_text(tokenizer, final=False):
            self.finish("stop")
        elif len(self.token_ids) >= self.settings.max_tokens:
            if self._update_text(tokenizer, final=True):
                self.finish("stop")
            else:
                self.finish("length")

    def finish(self, reason: str, tokenizer=None) -> None:
        """End the row ("stop", "length", "cancelled", "error"); with `tokenizer`, decode its text first."""
        if self.finished:
            return
        if tokenizer is not None:
            self._update_text(tokenizer, final=True)
        self.finish_reason = reason
        self.job.row_finished(self)

    def _logprob_of(self, token: int) -> TokenLogprob:
        import torch

        values = self.step_logprobs
        top = []
        if self.settings.logprobs:
            best = torch.topk(values, self.settings.logprobs)
            top = list(zip(best.indices.tolist(), best.values.tolist()))
        return TokenLogprob(token, float(values[token]), top)

    def _decoder(self, tokenizer) -> StreamDecoder:
        if self._text_decoder is None:
            self._text_decoder = StreamDecoder(tokenizer, self.prompt_ids[-CONTEXT_TOKENS:])
        return self._text_decoder

    def _tail_has_stop(self, tokenizer) -> bool:
        """Whether the newest tokens hold a stop string: every token decodes to at least one byte, so
        (longest stop string in bytes + 2) tokens hold any stop string that the newest one completed.
        Cheaper than decoding the whole reply at every step."""
        if not self.settings.stop:
            return False
        window = max(len(stop.encode("utf-8")) for stop in self.settings.stop) + 2
        tail = tokenizer.decode(self.token_ids[-window:], skip_special_tokens=True)
        return any(stop in tail for stop in self.settings.stop)

    def _update_text(self, tokenizer, final: bool) -> bool:
        """Decode the reply so far, send its new part to a streaming client; True if a stop string
        ended it. Rows that do not stream are decoded in full only at the end or at a stop string.

        Whether a stop string ends the reply is decided on the whole text, as for a row that does not
        stream; a stream shows only the settled part of the rest (`StreamDecoder.settled_text`), so
        every delta extends what was sent and the deltas add up to the non-streamed reply."""
        if not final and not self.job.stream and not self._tail_has_stop(tokenizer):
            return False
        decoder = self._decoder(tokenizer)
        shown, stopped = visible_text(
            decoder.text(self.token_ids), self.settings.stop, self.settings.strip, final
        )
        if not self.job.stream:
            self.text = shown
            return stopped
        if not final and not stopped:
            shown = visible_text(
                decoder.settled_text(self.token_ids), self.settings.stop, self.settings.strip, False
            )[0]
        if shown.startswith(self.text) and len(shown) > len(self.text):
            delta, self.text = shown[len(self.text) :], shown
            self.job.events.put(("delta", self, delta))
        elif not shown.startswith(self.text):
            logger.error(
                "stream of row %d diverged from its text: %r sent, %r now", self.index, self.text, shown
            )
        return stopped


class JobEvents(queue.SimpleQueue):
    """A job's event queue that also calls `listener` (when set) after each event, so that a waiter
    in an event loop is woken without polling (`listener` must not block)."""

    def __init__(self):
        super().__init__()
        self.listener: Callable[[], None] | None = None

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self.notify()

    def notify(self) -> None:
        if self.listener is not None:
            self.listener()


class Job:
    """One HTTP request: its rows, and how their results reach the request's handler.

    Streaming requests get ("delta", row, text), ("finish", row, None) and ("error", None, message)
    events in `events`; every request can wait on `done`, or set `events.listener` to hear of each
    event and of the end. `cancel()` (the client went away) ends the request's rows at the next token,
    and rows still queued are dropped.
    """

    def __init__(self, stream: bool = False):
        self.stream = stream
        self.rows: list[Row] = []
        self.events = JobEvents()
        self.done = threading.Event()
        self.cancelled = threading.Event()
        self.error: str | None = None
        self.prompt_tokens = 0
        self._lock = threading.Lock()
        self._remaining = 0

    def add_row(self, prompt_ids: list[int], settings: RowSettings, device="cpu") -> Row:
        """Add a row with its own random generator (seeded by `settings.seed`, else afresh)."""
        import torch

        rng = None
        if settings.samples:
            rng = torch.Generator(device=device)
            rng.manual_seed(
                settings.seed if settings.seed is not None else random.SystemRandom().getrandbits(63)
            )
        row = Row(self, len(self.rows), prompt_ids, settings, rng)
        self.rows.append(row)
        self._remaining += 1
        return row

    def cancel(self) -> None:
        self.cancelled.set()

    def fail(self, message: str) -> None:
        """End the job with an error (generation raised); its unfinished rows end as "error"."""
        self.error = message
        if self.stream:
            self.events.put(("error", None, message))
        for row in self.rows:
            row.finish("error")

    def row_finished(self, row: Row) -> None:
        if self.stream:
            self.events.put(("finish", row, None))
        with self._lock:
            self._remaining -= 1
            if self._remaining == 0:
                self.done.set()
                self.events.notify()
