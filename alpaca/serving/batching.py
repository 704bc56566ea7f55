"""Requests in flight share forward passes: a scheduler thread runs queued rows in one padded batch.

Every request becomes rows (`Row`: one per prompt and choice). The scheduler takes up to
`max_batch_size` queued rows, waiting at most `max_wait_ms` for more when more are expected (the
clients of the batch that just ended), and runs them in one left-padded `model.generate` call. Rows may differ in every decoding setting, because
`generate` itself runs greedy and two hooks do the per-row work:

- `_RowSampler` (a logits processor) samples each sampling row with its own temperature, top-p, top-k
  and `torch.Generator` (seeded per request, so a seed reproduces a reply whatever else is in the
  batch), then leaves only the chosen token for the argmax. Greedy rows pass through untouched, so
  their tokens are exactly those of `generate.py`'s batch mode.
- `_RowTracker` (a stopping criterion) records each row's new token, applies its stop strings and
  token limit, streams its new text, and ends a row whose client went away.

A row's reply is delivered as soon as the row ends, not when its batch does. Rows cannot join a batch
that is already running (no continuous batching): they wait for the next one.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from alpaca.decoding import DecodingSettings, build_generation_config, held_back
from alpaca.generation import ResponseGenerator

logger = logging.getLogger(__name__)

# Prompt tokens decoded in front of the generated ones, so that a reply's first characters (a
# sentencepiece word's leading space) decode as they do after the whole prompt.
CONTEXT_TOKENS = 8
# Seconds after a batch during which its clients are expected back (see `_expected_rows`).
RECENT_S = 1.0


class QueueFull(RuntimeError):
    """More rows are waiting than the queue holds (`max_queue_size`)."""


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
        self._context_text: str | None = None

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

    def _decode(self, tokenizer) -> str:
        context = self.prompt_ids[-CONTEXT_TOKENS:]
        if self._context_text is None:
            self._context_text = tokenizer.decode(context, skip_special_tokens=True)
        full = tokenizer.decode(context + self.token_ids, skip_special_tokens=True)
        if full.startswith(self._context_text):
            return full[len(self._context_text) :]
        return tokenizer.decode(self.token_ids, skip_special_tokens=True)

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
        ended it. Rows that do not stream are decoded in full only at the end or at a stop string."""
        if not final and not self.job.stream and not self._tail_has_stop(tokenizer):
            return False
        shown, stopped = visible_text(self._decode(tokenizer), self.settings.stop, self.settings.strip, final)
        if not self.job.stream:
            self.text = shown
        elif shown.startswith(self.text) and len(shown) > len(self.text):
            delta, self.text = shown[len(self.text) :], shown
            self.job.events.put(("delta", self, delta))
        return stopped


class Job:
    """One HTTP request: its rows, and how their results reach the request's thread.

    Streaming requests get ("delta", row, text), ("finish", row, None) and ("error", None, message)
    events in `events`; every request can wait on `done`. `cancel()` (the client went away) ends the
    request's rows at the next token, and rows still queued are dropped.
    """

    def __init__(self, stream: bool = False):
        self.stream = stream
        self.rows: list[Row] = []
        self.events: queue.SimpleQueue = queue.SimpleQueue()
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


@dataclass
class SchedulerStats:
    """Counters of the scheduler, for tests, `/stats` and benchmarks.

    Attributes:
        batches: `generate` calls run.
        rows: rows run in them.
        largest_batch: the most rows run together.
        steps: decoding steps (forward passes after the prompt) over all batches.
        generated_tokens: tokens generated for rows still wanted (EOS excluded).
        cancelled_rows: rows ended because their client went away (running or queued).
        queued_rows / active_rows: rows waiting now / rows in the running batch not finished yet.
    """

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    steps: int = 0
    generated_tokens: int = 0
    cancelled_rows: int = 0
    queued_rows: int = 0
    active_rows: int = 0


class _RowSampler:
    """Logits processor: per-row sampling and log-probabilities inside a greedy `generate`."""

    def __init__(self, rows: list[Row]):
        self.rows = rows

    def __call__(self, input_ids, scores):
        import torch

        for i, row in enumerate(self.rows):
            if row.finished:
                continue
            if row.settings.logprobs is not None:
                row.step_logprobs = torch.log_softmax(scores[i], dim=-1)
            if row.settings.samples:
                token = sample_token(scores[i], row.settings, row.rng)
                scores[i] = float("-inf")
                scores[i, token] = 0.0
        return scores


def sample_token(logits, settings: RowSettings, rng) -> int:
    """Draw one token id from `logits` (one row) with temperature, top-k and top-p, using `rng`."""
    import torch

    logits = logits / settings.temperature
    if 0 < settings.top_k < logits.shape[-1]:
        kth = torch.topk(logits, settings.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the most likely tokens until their mass reaches top_p (always the first one).
        outside = (torch.cumsum(probs, dim=-1) - probs) >= settings.top_p
        logits = torch.full_like(logits, float("-inf")).scatter(
            0, order, sorted_logits.masked_fill(outside, float("-inf"))
        )
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=rng))


class _RowTracker:
    """Stopping criterion: hands each row its new token; a row is done once it has finished."""

    def __init__(self, rows: list[Row], tokenizer, stats: SchedulerStats):
        self.rows = rows
        self.tokenizer = tokenizer
        self.stats = stats

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        self.stats.steps += 1
        newest = input_ids[:, -1].tolist()
        done = []
        for row, token in zip(self.rows, newest):
            if not row.finished:
                if row.job.cancelled.is_set():
                    self.stats.cancelled_rows += 1
                    row.finish("cancelled")
                else:
                    row.add_token(token, self.tokenizer)
                    self.stats.generated_tokens += token not in row.settings.stop_token_ids
            done.append(row.finished)
        self.stats.active_rows = done.count(False)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class BatchScheduler:
    """Runs the rows of submitted jobs in batches on one generator's model, in a background thread.

    Args:
        generator: the model, tokenizer and lock (shared with any other user of the model).
        max_batch_size: the most rows generated together.
        max_queue_size: the most rows waiting; `submit` raises `QueueFull` beyond it.
        max_wait_ms: the longest a waiting row may be held back for others expected to join its batch.
    """

    def __init__(
        self,
        generator: ResponseGenerator,
        max_batch_size: int = 8,
        max_queue_size: int = 64,
        max_wait_ms: float = 20.0,
    ):
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_wait_s = max_wait_ms / 1000
        self.stats = SchedulerStats()
        self.device = getattr(generator.model, "device", None) or "cpu"
        self._pending: deque[Row] = deque()
        self._condition = threading.Condition()
        self._closing = False
        self._last_rows, self._carried_rows, self._last_end = 0, 0, 0.0
        self._thread = threading.Thread(target=self._loop, name="api-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue every row of `job`, or none of them (`QueueFull`)."""
        with self._condition:
            if len(self._pending) + len(job.rows) > self.max_queue_size:
                raise QueueFull(
                    f"{len(self._pending)} rows are waiting and the queue holds {self.max_queue_size} "
                    "(--max_queue_size); retry later"
                )
            self._pending.extend(job.rows)
            self.stats.queued_rows = len(self._pending)
            self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._closing = True
            self._condition.notify()
        self._thread.join(timeout=60)

    def _next_batch(self) -> list[Row]:
        with self._condition:
            while not self._pending and not self._closing:
                self._condition.wait()
            target = min(self.max_batch_size, self._expected_rows())
            deadline = time.monotonic() + self.max_wait_s
            while len(self._pending) < target and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._condition.wait(left)
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                row = self._pending.popleft()
                if row.job.cancelled.is_set():
                    self.stats.cancelled_rows += 1
                    row.finish("cancelled")
                else:
                    batch.append(row)
            self.stats.queued_rows = len(self._pending)
            return batch

    def _expected_rows(self) -> int:
        """How many rows to wait for (at most `max_wait_ms`) before starting a batch.

        Clients whose replies just came back tend to send their next request at once, so right after
        a batch, expect its rows again plus those that were already waiting when it ended. A lone
        client then never waits, and eight clients do not settle into alternating half batches.
        """
        if time.monotonic() - self._last_end > RECENT_S:
            return 1
        return self._last_rows + self._carried_rows

    def _loop(self) -> None:
        while not self._closing:
            batch = self._next_batch()
            if batch:
                self._run(batch)
        with self._condition:
            for row in self._pending:
                row.job.fail("the server is shutting down")

    def _run(self, rows: list[Row]) -> None:
        self.stats.batches += 1
        self.stats.rows += len(rows)
        self.stats.largest_batch = max(self.stats.largest_batch, len(rows))
        self.stats.active_rows = len(rows)
        try:
            self._generate(rows)
        except Exception as err:  # one failed batch must not stop the server
            logger.exception("generation failed")
            message = f"generation failed ({type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''})"
            for job in {id(row.job): row.job for row in rows if not row.finished}.values():
                job.fail(message)
        finally:
            # Rows still open when `generate` returns reached the model's length limit.
            for row in rows:
                row.finish("length", self.tokenizer)
            self.stats.active_rows = 0
            with self._condition:
                self._last_rows, self._carried_rows = len(rows), len(self._pending)
                self._last_end = time.monotonic()

    def _generate(self, rows: list[Row]) -> None:
        import torch
        from transformers import LogitsProcessorList, StoppingCriteriaList

        width = max(len(row.prompt_ids) for row in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = [[pad] * (width - len(row.prompt_ids)) + row.prompt_ids for row in rows]
        mask = [[0] * (width - len(row.prompt_ids)) + [1] * len(row.prompt_ids) for row in rows]
        greedy = DecodingSettings(
            temperature=0, num_beams=1, max_new_tokens=max(r.settings.max_tokens for r in rows)
        )
        config = build_generation_config(self.tokenizer, greedy)
        processors = LogitsProcessorList()
        if any(row.settings.samples or row.settings.logprobs is not None for row in rows):
            processors.append(_RowSampler(rows))
        tracker = _RowTracker(rows, self.tokenizer, self.stats)
        # The generator's own context: its lock (other users of the model wait), its adapter, no grad.
        with self.generator.using_model(greedy):
            self.generator.model.generate(
                input_ids=torch.tensor(input_ids, device=self.device),
                attention_mask=torch.tensor(mask, device=self.device),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
