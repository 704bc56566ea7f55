"""The self-instruct generation loop: prompts out, filtered records in, in request order.

Requests are numbered 0, 1, 2, ...; request k's prompt depends only on the run seed, k and (when
machine-generated examples are mixed in) records from requests before k - MACHINE_EXAMPLE_LAG.
Replies are applied strictly in request order, so with a deterministic server the output is the same
for any ``max_concurrent_requests``, and a resumed run continues exactly where the journal ends.

``SelfInstructConfig`` (in ``settings``) is the table of settings: each flag's default and help line
live there.
"""

import asyncio
import bisect
import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

from alpaca.core.locks import output_lock
from alpaca.openai_jobs.client import APIFailure, CompletionClient, CompletionReply, RetryPolicy
from alpaca.openai_jobs.cost import CostMeter, request_texts, resolve_prices, worst_case_usd
from alpaca.openai_jobs.journal import request_hash
from alpaca.selfinstruct.journal import Journal, JournalState, add_counts, write_json_atomically
from alpaca.selfinstruct.parsing import parse_reply
from alpaca.selfinstruct.prompts import (
    MACHINE_EXAMPLE_LAG,
    STOP_SEQUENCES,
    chat_messages,
    encode_prompt,
    request_rng,
    sample_examples,
)
from alpaca.selfinstruct.seeds import load_seed_tasks
from alpaca.selfinstruct.settings import SelfInstructConfig
from alpaca.selfinstruct.similarity import SimilarityIndex

CONFIG_NAME = "generate_instruction_config.json"
SUMMARY_NAME = "generate_instruction_summary.json"


class GenerationStalled(RuntimeError):
    """Too many requests in a row kept nothing (--max_requests_without_new); everything is saved."""


@dataclass
class RunState:
    """Everything the loop mutates, in one place.

    Attributes:
        stored_replies: replies an earlier run paid for but did not apply, by request index.
        requests_without_new: requests in a row, up to the last applied, that kept nothing.
        reserved_usd: for each request in flight, the most it can cost (held against --max_cost_usd).
        request_hashes: for each request in flight, its ``reply_hash`` (journaled with an unapplied reply).
    """

    records: list[dict]
    record_requests: list[int]
    next_to_apply: int
    totals: dict
    session: dict
    meter: CostMeter
    stored_replies: dict[int, dict] = dataclasses.field(default_factory=dict)
    requests_without_new: int = 0
    reserved_usd: dict[int, float] = dataclasses.field(default_factory=dict)
    request_hashes: dict[int, str] = dataclasses.field(default_factory=dict)
    stop_reason: str = ""
    stalled: bool = False
    last_refresh: float = 0.0
    batch_generated: int = 0
    batch_kept: int = 0
    batch_started: float = 0.0


def generate(config: SelfInstructConfig) -> dict:
    """Run self-instruct generation to ``config``'s target and return the run summary.

    Raises:
        ValueError: for invalid settings or seed files (every problem is listed).
        APIFailure: when a request cannot succeed; everything kept so far is saved first.
        GenerationStalled: when --max_requests_without_new requests in a row kept nothing (saved first).
    """
    problems = config.problems()
    if problems:
        raise ValueError("invalid settings:\n  - " + "\n  - ".join(problems))
    seed_examples = load_seed_tasks(config.seed_tasks_path)
    if len(seed_examples) < config.num_prompt_instructions - config.num_machine_instructions:
        raise ValueError(
            f"{config.seed_tasks_path} has {len(seed_examples)} seed tasks, fewer than the "
            f"{config.num_prompt_instructions} examples per prompt (--num_prompt_instructions)."
        )
    print(f"Loaded {len(seed_examples)} human-written seed instructions")
    # One run per output folder. The lock is inside it: the default is the working folder, whose parent
    # may not be writable.
    with output_lock(config.output_dir, "--output_dir", inside=True):
        return _generate_into_output_dir(config, seed_examples)


def _generate_into_output_dir(config: SelfInstructConfig, seed_examples: list[dict]) -> dict:
    """`generate` once the settings and seed tasks are checked and the output folder is this run's."""
    journal = Journal(config.output_dir)
    previous = journal.load()
    seed = resolve_seed(config.seed, previous)
    save_config(config, seed)
    journal.start(seed, imported=previous.records if previous.adopted else [])
    if previous.records:
        print(f"Loaded {len(previous.records)} machine-generated instructions")
    index = SimilarityIndex(
        workers=min(config.num_cpus, os.cpu_count() or 1), tokenizer=config.rouge_tokenizer
    )
    index.add([example["instruction"] for example in seed_examples])
    index.add([record["instruction"] for record in previous.records])
    prices = resolve_prices(config.model_name, config.prompt_price_per_1m, config.completion_price_per_1m)
    meter = CostMeter(
        prices, previous.totals.get("prompt_tokens", 0), previous.totals.get("completion_tokens", 0)
    )
    state = RunState(
        previous.records,
        previous.record_requests,
        previous.next_request,
        previous.totals,
        {},
        meter,
        stored_replies=previous.stored_replies,
        requests_without_new=previous.requests_without_new,
    )
    failure = None
    try:
        asyncio.run(run_requests(config, seed, seed_examples, index, journal, state))
    except APIFailure as error:
        failure, state.stop_reason = error, f"stopped: {error}"
    finally:
        journal.close()
        journal.write_regen(state.records)
    if config.export_alpaca_data:
        journal.write_alpaca_export(state.records)
    summary = build_summary(config, seed, state)
    write_json_atomically(Path(config.output_dir) / SUMMARY_NAME, summary)
    print_summary(summary)
    if failure is not None:
        raise failure
    if state.stalled:
        raise GenerationStalled(state.stop_reason)
    return summary


def resolve_seed(requested: int | None, previous: JournalState) -> int:
    """The run seed: the flag, else the one a resumed run recorded, else a fresh random one (saved)."""
    if requested is None:
        return previous.seed if previous.seed is not None else random.SystemRandom().randrange(2**31)
    if previous.seed is not None and previous.seed != requested:
        print(
            f"Note: earlier requests in this folder used --seed={previous.seed}; continuing with {requested}."
        )
    return requested


def save_config(config: SelfInstructConfig, seed: int) -> None:
    """Print the resolved settings once and save them next to the output (there is no key in them)."""
    resolved = dataclasses.asdict(config) | {
        "seed": seed,
        "prices_per_1m_tokens": resolve_prices(
            config.model_name, config.prompt_price_per_1m, config.completion_price_per_1m
        ),
    }
    print("Settings: " + json.dumps(resolved))
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    write_json_atomically(Path(config.output_dir) / CONFIG_NAME, resolved)


def build_prompt(
    config: SelfInstructConfig,
    seed: int,
    request_index: int,
    seed_examples: list[dict],
    records: list[dict] = (),
    record_requests: list[int] = (),
) -> str:
    """Request k's prompt; machine examples come only from requests before k - MACHINE_EXAMPLE_LAG.

    Args:
        records / record_requests: the kept records so far and the request index of each.
    """
    machine_examples = []
    if config.num_machine_instructions:
        eligible = bisect.bisect_left(record_requests, request_index - MACHINE_EXAMPLE_LAG)
        machine_examples = records[:eligible]
    examples = sample_examples(
        request_rng(seed, request_index),
        seed_examples,
        machine_examples,
        config.num_prompt_instructions,
        config.num_machine_instructions,
    )
    return encode_prompt(examples)


def api_seed(seed: int, request_index: int) -> int:
    """The ``seed`` sent with request k, for servers that make sampling reproducible with it."""
    return random.Random(f"api:{seed}:{request_index}").randrange(2**31)


def should_stop(config: SelfInstructConfig, state: RunState) -> bool:
    """Upstream checked the target between batches of ``request_batch_size`` requests; so do we
    (batches are fixed ranges of request indices, so a resumed run stops where an unbroken one would).
    Requests that keep nothing are counted in a row, so a run whose every reply is a duplicate ends."""
    if (
        len(state.records) >= config.num_instructions_to_generate
        and state.next_to_apply % config.request_batch_size == 0
    ):
        state.stop_reason = f"reached {config.num_instructions_to_generate} instructions"
        return True
    limit = config.max_requests_without_new
    if limit and state.requests_without_new >= limit:
        state.stalled = True
        state.stop_reason = (
            f"the last {state.requests_without_new} requests kept no new instruction "
            f"(--max_requests_without_new={limit}): every reply was a near-duplicate of a kept one, or "
            f"unusable. {len(state.records)} instructions are kept and the journal is intact; rerun with a "
            "higher --max_requests_without_new (0: no limit) to continue, or change the seed tasks, "
            "--temperature or the model"
        )
        return True
    return False


def reply_hash(config: SelfInstructConfig, prompt: str) -> str:
    """What a stored reply answered: the endpoint, the model and the prompt."""
    return request_hash([config.api, config.model_name, prompt])


def worst_case_cost(config: SelfInstructConfig, meter: CostMeter, prompt: str) -> float | None:
    """The most one request can be billed: its prompt and a full ``--max_tokens`` reply (None when the
    model's price is unknown)."""
    return worst_case_usd(meter, request_texts(config.api, prompt, chat_messages), config.max_tokens)


def fits_the_cap(config: SelfInstructConfig, state: RunState, worst_usd: float | None) -> bool:
    """Whether a request costing up to ``worst_usd`` can be sent with the cap holding for all in flight."""
    if config.max_cost_usd is None or worst_usd is None:
        return True
    return state.meter.usd + sum(state.reserved_usd.values()) + worst_usd <= config.max_cost_usd


def stored_reply(
    config: SelfInstructConfig, state: RunState, request_index: int, prompt: str
) -> CompletionReply | None:
    """The reply an earlier run paid for, when it answered this very prompt with this model and endpoint."""
    entry = state.stored_replies.pop(request_index, None)
    if entry is None or entry["request_sha256"] != reply_hash(config, prompt):
        return None
    fields = {spec.name for spec in dataclasses.fields(CompletionReply)}
    return CompletionReply(
        **{key: value for key, value in entry["reply"].items() if key in fields}, from_journal=True
    )


async def run_requests(config, seed, seed_examples, index, journal, state: RunState) -> None:
    """Keep up to ``max_concurrent_requests`` requests in flight and apply replies in request order."""
    from tqdm import tqdm

    client = CompletionClient(
        api=config.api,
        model_name=config.model_name,
        base_url=config.base_url,
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
        request_timeout=config.request_timeout,
        retry=RetryPolicy(max_retries=config.max_retries, initial_delay_s=config.initial_retry_delay),
        stop=STOP_SEQUENCES,
        messages=chat_messages,
    )
    progress = tqdm(
        total=config.num_instructions_to_generate,
        initial=len(state.records),
        desc="kept",
        disable=not config.progress,
    )
    in_flight: dict[int, asyncio.Task] = {}
    next_to_send = state.next_to_apply
    state.last_refresh = state.batch_started = time.monotonic()
    finished, worst = False, None
    try:
        while not should_stop(config, state):
            while len(in_flight) < config.max_concurrent_requests and (
                not config.num_machine_instructions
                or next_to_send - MACHINE_EXAMPLE_LAG <= state.next_to_apply
            ):
                prompt = build_prompt(
                    config, seed, next_to_send, seed_examples, state.records, state.record_requests
                )
                reused = stored_reply(config, state, next_to_send, prompt)
                if reused is not None:
                    in_flight[next_to_send] = asyncio.ensure_future(asyncio.sleep(0, reused))
                else:
                    worst = worst_case_cost(config, state.meter, prompt)
                    if not fits_the_cap(config, state, worst):
                        break
                    state.reserved_usd[next_to_send] = worst or 0.0
                    state.request_hashes[next_to_send] = reply_hash(config, prompt)
                    in_flight[next_to_send] = asyncio.create_task(
                        client.complete(prompt, api_seed(seed, next_to_send))
                    )
                next_to_send += 1
            if state.next_to_apply not in in_flight:
                # Nothing is in flight and even the next request might cost more than is left.
                state.stop_reason = (
                    f"reached --max_cost_usd={config.max_cost_usd}: spent ${state.meter.usd:.6f}, and the "
                    f"next request could cost up to ${worst:.6f} (its prompt and a full --max_tokens="
                    f"{config.max_tokens} reply), which would pass the cap; raise --max_cost_usd (or lower "
                    "--max_tokens) to continue"
                )
                break
            reply = await in_flight.pop(state.next_to_apply)
            apply_reply(config, index, journal, state, reply)
            # Like upstream, the last batch may overshoot the target; let the bar show it.
            progress.total = max(progress.total, len(state.records))
            progress.update(len(state.records) - progress.n)
            progress.set_postfix(generated=state.totals.get("generated", 0), cost=state.meter.describe())
            if time.monotonic() - state.last_refresh >= config.save_every_s:
                journal.write_regen(state.records)
                state.last_refresh = time.monotonic()
        finished = True
    finally:
        progress.close()
        await settle_in_flight(journal, state, in_flight, wait=finished)
        await client.close()


async def settle_in_flight(journal: Journal, state: RunState, in_flight: dict, wait: bool) -> None:
    """Count and journal every reply that was paid for but not applied, so a rerun uses it.

    After a normal stop the requests still running are awaited (the server bills them whether or not
    anyone reads the reply); after a failure or Ctrl-C they are abandoned, and what the server bills
    for them cannot be known.
    """
    running = sum(not task.done() for task in in_flight.values())
    if wait and running:
        print(f"Waiting for the {running} requests still in flight (paid for; kept for a rerun)")
    if not wait:
        for task in in_flight.values():
            task.cancel()
    results = await asyncio.gather(*in_flight.values(), return_exceptions=True)
    kept = 0
    for request_index, result in sorted(zip(in_flight, results), key=lambda pair: pair[0]):
        if not isinstance(result, CompletionReply):
            continue
        if result.from_journal:
            continue  # still in the journal from the run that bought it
        counts = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "retries": result.retries,
            "stored_replies": 1,
        }
        reply = {key: value for key, value in dataclasses.asdict(result).items() if key != "from_journal"}
        journal.append_reply(request_index, state.request_hashes[request_index], reply, counts)
        state.meter.add(result.prompt_tokens, result.completion_tokens)
        add_counts(state.totals, counts)
        add_counts(state.session, counts)
        kept += 1
    state.session["discarded_in_flight"] = len(in_flight) - kept


def apply_reply(
    config, index: SimilarityIndex, journal: Journal, state: RunState, reply: CompletionReply
) -> None:
    """Parse, filter and durably record one reply, then account for it."""
    request_index = state.next_to_apply
    state.reserved_usd.pop(request_index, None)
    state.request_hashes.pop(request_index, None)
    candidates, counts, well_formed = [], {"rejected": {}}, 0
    if reply.failure is None:
        parsed = parse_reply(
            reply.text,
            reply.finish_reason,
            config.num_prompt_instructions,
            config.api == "chat",
            config.rouge_tokenizer,
        )
        candidates = parsed.candidates
        counts["rejected"] = dict(parsed.rejected, malformed=parsed.malformed, truncated=parsed.truncated)
        well_formed = parsed.items - parsed.malformed - parsed.truncated
    kept = []
    for candidate, verdict in zip(candidates, index.filter_batch([c["instruction"] for c in candidates])):
        if verdict.keep:
            candidate["most_similar_instructions"] = verdict.most_similar_instructions
            candidate["avg_similarity_score"] = verdict.avg_similarity_score
            kept.append(candidate)
    # A reply an earlier run paid for was counted when it was journaled; count only its use now.
    paid = not reply.from_journal
    counts.update(
        requests=1,
        failed_replies=int(reply.failure is not None),
        empty_replies=int(reply.failure is None and well_formed == 0),
        retries=reply.retries if paid else 0,
        prompt_tokens=reply.prompt_tokens if paid else 0,
        completion_tokens=reply.completion_tokens if paid else 0,
        generated=len(candidates),
        kept=len(kept),
    )
    if not paid:
        counts["stored_replies_used"] = 1
    counts["rejected"]["rouge_similar"] = len(candidates) - len(kept)
    if reply.failure is not None:
        counts["failures"] = {reply.failure: 1}
    journal.append_request(request_index, kept, counts)
    state.records += kept
    state.record_requests += [request_index] * len(kept)
    state.requests_without_new = 0 if kept else state.requests_without_new + 1
    add_counts(state.totals, counts)
    add_counts(state.session, counts)
    if paid:
        state.meter.add(reply.prompt_tokens, reply.completion_tokens)
    state.next_to_apply = request_index + 1
    state.batch_generated += len(candidates)
    state.batch_kept += len(kept)
    if state.next_to_apply % config.request_batch_size == 0:
        from tqdm import tqdm

        batch = state.next_to_apply // config.request_batch_size
        tqdm.write(
            f"Request batch {batch} took {time.monotonic() - state.batch_started:.2f}s: "
            f"generated {state.batch_generated} instructions, kept {state.batch_kept}"
        )
        state.batch_generated = state.batch_kept = 0
        state.batch_started = time.monotonic()


def build_summary(config: SelfInstructConfig, seed: int, state: RunState) -> dict:
    """Totals over every run in this folder, plus this run's own counters."""
    from alpaca.selfinstruct.filters import FILTER_NAMES

    totals = state.totals
    rejected = {name: 0 for name in (*FILTER_NAMES, "malformed", "truncated", "rouge_similar")}
    rejected.update(totals.get("rejected", {}))
    return {
        "stop_reason": state.stop_reason,
        "kept": len(state.records),
        "target": config.num_instructions_to_generate,
        "requests": totals.get("requests", 0),
        "failed_replies": totals.get("failed_replies", 0),
        "failures": totals.get("failures", {}),
        "empty_replies": totals.get("empty_replies", 0),
        "retries": totals.get("retries", 0),
        "generated": totals.get("generated", 0),
        "rejected": rejected,
        "prompt_tokens": state.meter.prompt_tokens,
        "completion_tokens": state.meter.completion_tokens,
        "cost_usd": state.meter.usd,
        "model_name": config.model_name,
        "seed": seed,
        "this_run": state.session,
    }


def print_summary(summary: dict) -> None:
    cost = "n/a (no price for this model)" if summary["cost_usd"] is None else f"${summary['cost_usd']:.4f}"
    rejected = ", ".join(f"{name} {count}" for name, count in summary["rejected"].items())
    print(
        f"Done ({summary['stop_reason']}): kept {summary['kept']} of {summary['generated']} generated; "
        f"{summary['requests']} requests, {summary['failed_replies']} failed, {summary['empty_replies']} empty, "
        f"{summary['retries']} retries; rejected: {rejected}; tokens {summary['prompt_tokens']} prompt + "
        f"{summary['completion_tokens']} completion, cost {cost}"
    )
