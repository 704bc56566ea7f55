"""Continuous batching: requests in flight share forward passes over one key/value cache.

Every request becomes rows (`rows.Row`: one per prompt and choice). A scheduler thread decodes the
rows in flight together, one token per forward pass, in a left-padded batch with a shared key/value
cache. Rows join the running batch at the next step (their prompts are run in one forward pass of their
own and their cache is merged in, see `kv_cache`) and leave it as soon as they end, so a request that
arrives while others are being generated starts at once instead of waiting for them, and a short reply
is not held up by a long one. Up to `max_batch_size` rows run together; more wait in the queue. From an
idle scheduler the first rows wait at most `max_wait_ms` for others expected to come with them.

Rows may differ in every decoding setting: each step's logits are turned into each row's token by
that row's own rule (`next_tokens`): the argmax for greedy rows, exactly as `generate` picks it, so
their tokens are those of `generate.py`'s batch mode; for sampling rows, their own temperature, top-p,
top-k and `torch.Generator` (seeded per request, so a seed reproduces a reply whatever else is in the
batch). Each row then takes its token (`Row.add_token`, in `rows`): stop strings, token limits, streaming, and
the end of a row whose client went away.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

from alpaca.inference.decoding import DecodingSettings
from alpaca.inference.generation import ResponseGenerator
from alpaca.inference.settings import GenerateConfig
from alpaca.serving import kv_cache
from alpaca.serving.rows import Job, Row, RowSettings

logger = logging.getLogger(__name__)

# Seconds after a batch during which its clients are expected back (see `_expected_rows`).
RECENT_S = 1.0


class QueueFull(RuntimeError):
    """More rows are waiting than the queue holds (`max_queue_size`)."""


@dataclass
class SchedulerStats:
    """Counters of the scheduler, for tests, `/stats` and benchmarks.

    Attributes:
        batches: batches started from an idle scheduler.
        joins: groups of rows that joined a batch already running.
        rows: rows run.
        largest_batch: the most rows run together.
        steps: forward passes that gave tokens (a group's prompt pass, then one per decoding step).
        generated_tokens: tokens generated for rows still wanted (EOS excluded).
        cancelled_rows: rows ended because their client went away (running or queued).
        queued_rows / active_rows: rows waiting now / rows in the running batch not finished yet.
    """

    batches: int = 0
    joins: int = 0
    rows: int = 0
    largest_batch: int = 0
    steps: int = 0
    generated_tokens: int = 0
    cancelled_rows: int = 0
    queued_rows: int = 0
    active_rows: int = 0


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


def next_tokens(rows: list[Row], logits):
    """Each row's next token from this step's logits (one row of `logits` per row): the argmax for
    greedy rows, as `generate` picks it; a draw with the row's own settings and generator for sampling
    rows. Rows that want log-probabilities get this step's."""
    import torch

    scores = logits.float()
    tokens = torch.argmax(scores, dim=-1)
    for i, row in enumerate(rows):
        if row.settings.logprobs is not None:
            row.step_logprobs = torch.log_softmax(scores[i], dim=-1)
        if row.settings.samples:
            tokens[i] = sample_token(scores[i], row.settings, row.rng)
    return tokens


class RunningBatch:
    """The rows being decoded together and their shared, left-padded key/value cache.

    `mask` is the attention mask over the cache's positions ([rows, length]; 0 for padding), `last` the
    token each row takes as input next. `can_join` is False for caches that are not plain per-layer
    key/value tensors (sliding-window or hybrid models): rows then wait until the batch has ended.
    """

    def __init__(self):
        self.rows: list[Row] = []
        self.cache = None
        self.mask = None
        self.last = None
        self.can_join = True

    def add(self, rows: list[Row], cache, mask, last) -> None:
        """Merge rows whose prompts just ran (their cache, mask and first tokens) into the batch: both
        caches are left-padded to the same length and stacked."""
        import torch

        if not self.rows:
            self.rows, self.cache, self.mask, self.last = list(rows), cache, mask, last
            self.can_join = kv_cache.can_merge(cache)
            return
        length = max(self.mask.shape[1], mask.shape[1])
        self.cache = kv_cache.merge(self.cache, cache, length)
        self.mask = torch.cat([kv_cache.left_pad(self.mask, length, 1), kv_cache.left_pad(mask, length, 1)])
        self.last = torch.cat([self.last, last])
        self.rows += rows

    def drop_finished(self) -> None:
        """Remove ended rows from the batch and its cache, and the padding columns no row needs."""
        import torch

        keep = [i for i, row in enumerate(self.rows) if not row.finished]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = self.mask = self.last = None
            return
        index = torch.tensor(keep, device=self.mask.device)
        kv_cache.select_rows(self.cache, index)
        self.mask, self.last = self.mask[index], self.last[index]
        unused = int((self.mask.sum(dim=0) == 0).long().cumprod(dim=0).sum())  # leading all-padding columns
        if unused and self.can_join:
            self.cache = kv_cache.drop_leading(self.cache, unused)
            self.mask = self.mask[:, unused:]


class BatchScheduler:
    """Decodes the rows of submitted jobs on one generator's model, in a background thread; rows join
    the running batch at the next step and leave it when they end (see the module docstring).

    Args:
        generator: the model, tokenizer and lock (shared with any other user of the model).
        max_batch_size: the most rows generated together.
        max_queue_size: the most rows waiting; `submit` raises `QueueFull` beyond it.
        max_wait_ms: from an idle scheduler, the longest the first rows wait for others expected to come
            with them (rows that arrive later join the running batch at the next step).
    """

    def __init__(
        self,
        generator: ResponseGenerator,
        max_batch_size: int = GenerateConfig.max_batch_size,
        max_queue_size: int = GenerateConfig.max_queue_size,
        max_wait_ms: float = GenerateConfig.max_wait_ms,
    ):
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue_size = max_queue_size
        self.max_wait_s = max_wait_ms / 1000
        self.stats = SchedulerStats()
        self.device = getattr(generator.model, "device", None) or "cpu"
        # the model's context (rows end there, as `generate` ends them); None when the config has none
        self.max_length = getattr(generator.model.config, "max_position_embeddings", None)
        # Prompt passes compute the last position's logits only, where the model can (a PeftModel
        # passes the argument on to its base model).
        base = (
            generator.model.get_base_model()
            if hasattr(generator.model, "get_base_model")
            else generator.model
        )
        self.keeps_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
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
            return self._take_pending(self.max_batch_size)  # the condition's lock is re-entrant

    def _expected_rows(self) -> int:
        """How many rows to wait for (at most `max_wait_ms`) before starting a batch.

        Clients whose replies just came back tend to send their next request at once, so right after
        a batch, expect its rows again plus those that were already waiting when it ended. A lone
        client then never waits, and eight clients do not settle into alternating half batches.
        """
        if time.monotonic() - self._last_end > RECENT_S:
            return 1
        return self._last_rows + self._carried_rows

    def _take_pending(self, room: int) -> list[Row]:
        """Up to `room` waiting rows, without waiting (rows whose client left are ended)."""
        with self._condition:
            taken = []
            while self._pending and len(taken) < room:
                row = self._pending.popleft()
                if row.job.cancelled.is_set():
                    self.stats.cancelled_rows += 1
                    row.finish("cancelled")
                else:
                    taken.append(row)
            self.stats.queued_rows = len(self._pending)
            return taken

    def _loop(self) -> None:
        batch = RunningBatch()
        while not self._closing:
            if batch.rows:
                room = self.max_batch_size - len(batch.rows)
                joining = self._take_pending(room) if batch.can_join and room > 0 else []
            else:
                joining = self._next_batch()
            started = len(batch.rows)
            try:
                if joining:
                    self._admit(batch, joining)
                if batch.rows:
                    self._decode_step(batch)
            except Exception as err:  # one failed step must not stop the server
                self._fail(batch.rows + [row for row in joining if row not in batch.rows], err)
                batch = RunningBatch()
            if started and not batch.rows:
                with self._condition:
                    self._last_rows, self._carried_rows = started, len(self._pending)
                    self._last_end = time.monotonic()
            self.stats.active_rows = len(batch.rows)
        with self._condition:
            for row in self._pending:
                row.job.fail("the server is shutting down")
        for row in batch.rows:
            row.job.fail("the server is shutting down")

    def _fail(self, rows: list[Row], err: Exception) -> None:
        logger.exception("generation failed")
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        message = f"generation failed ({type(err).__name__}: {first_line})"
        for job in {id(row.job): row.job for row in rows if not row.finished}.values():
            job.fail(message)

    def _forward(self, **inputs):
        """One forward pass under the generator's context: its lock (other users of the model wait
        between steps), its adapter, no autograd."""
        greedy = DecodingSettings(temperature=0, num_beams=1, max_new_tokens=1)
        with self.generator.using_model(greedy):
            return self.generator.model(use_cache=True, **inputs).logits[:, -1]

    def _admit(self, batch: RunningBatch, rows: list[Row]) -> None:
        """Run the new rows' prompts in one left-padded pass, take their first tokens and merge them in."""
        import torch

        if batch.rows:
            self.stats.joins += 1
        else:
            self.stats.batches += 1
        self.stats.rows += len(rows)
        width = max(len(row.prompt_ids) for row in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor(
            [[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in rows], device=self.device
        )
        mask = torch.tensor(
            [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in rows], device=self.device
        )
        positions = (mask.cumsum(dim=-1) - 1).masked_fill(mask == 0, 1)
        cache = kv_cache.new_cache(self.generator.model.config)
        logits = self._forward(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            logits_to_keep=1,
        )
        tokens = next_tokens(rows, logits)
        batch.add(rows, cache, mask, tokens)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch.rows))
        self._take_tokens(rows, tokens)
        batch.drop_finished()

    def _decode_step(self, batch: RunningBatch) -> None:
        """One token for every row of the batch."""
        import torch

        for row in batch.rows:  # the model's context is full: the row ends as `generate` would end it
            if self.max_length and len(row.prompt_ids) + len(row.token_ids) >= self.max_length:
                row.finish("length", self.tokenizer)
        batch.drop_finished()
        if not batch.rows:
            return
        ones = torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype, device=batch.mask.device)
        batch.mask = torch.cat([batch.mask, ones], dim=1)
        positions = batch.mask.sum(dim=-1, keepdim=True) - 1
        logits = self._forward(
            input_ids=batch.last[:, None],
            attention_mask=batch.mask,
            position_ids=positions,
            past_key_values=batch.cache,
        )
        batch.last = next_tokens(batch.rows, logits)
        self._take_tokens(batch.rows, batch.last)
        batch.drop_finished()

    def _take_tokens(self, rows: list[Row], tokens) -> None:
        """Hand each row its token (or end it, when its client went away)."""
        self.stats.steps += 1
        for row, token in zip(rows, tokens.tolist()):
            if row.finished:
                continue
            if row.job.cancelled.is_set():
                self.stats.cancelled_rows += 1
                row.finish("cancelled")
            else:
                row.add_token(token, self.tokenizer)
                self.stats.generated_tokens += token not in row.settings.stop_token_ids
