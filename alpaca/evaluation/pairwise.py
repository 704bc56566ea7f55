"""Pairwise judging of a model's outputs against a reference's, through any OpenAI-compatible endpoint.

Every matched pair is judged in both orders (see ``stats`` for how they combine). Requests go out up
to ``max_concurrent_requests`` at a time through ``alpaca.openai_jobs``' client (retries, Retry-After,
the "prompt too long" shrink); each reply is appended to the journal as soon as it arrives, so a killed
run loses at most the requests in flight, and a rerun judges only what the journal lacks. The files
written (annotations.json, results.json) depend only on the judgments, not on timing or concurrency.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from alpaca.core.files import write_json_atomic
from alpaca.core.locks import locks_output
from alpaca.evaluation.journal import JudgeJournal, judgment_hash
from alpaca.evaluation.judge import (
    COMPLETIONS_STOP,
    build_judge_prompt,
    judge_messages,
    parse_verdict,
)
from alpaca.evaluation.outputs import Matching, Pair, load_outputs, match_outputs
from alpaca.evaluation.settings import PairwiseConfig
from alpaca.evaluation.stats import combine_orders, preferred_side, summarize
from alpaca.openai_jobs.cost import CostMeter, request_texts, worst_case_usd

ORDERS = ("reference_first", "model_first")
ANNOTATIONS_NAME = "annotations.json"
RESULTS_NAME = "results.json"
CONFIG_NAME = "pairwise_config.json"
PREFERENCE_RULE = (
    "each pair is judged twice (reference as Output (a), then the model as Output (a)); preference 2 = win "
    "(both orders prefer the model), 1 = loss (both prefer the reference), 1.5 = tie (the orders disagree), "
    "null = unparseable (either verdict unreadable); win_rate = 100 x mean(preference - 1) over the others"
)


class PairwiseIncomplete(RuntimeError):
    """The run stopped before every pair was judged (cost cap, API failure); what was judged is saved."""


@dataclass
class JudgeRequest:
    """One order of one pair."""

    pair_index: int
    order: str
    prompt: str
    sha256: str


def plan_requests(config: PairwiseConfig, pairs: list[Pair]) -> list[JudgeRequest]:
    """Both orders of every pair, reference first, in pair order."""
    requests = []
    for index, pair in enumerate(pairs):
        for order in ORDERS:
            first, second = (
                (pair.reference_output, pair.model_output)
                if order == "reference_first"
                else (pair.model_output, pair.reference_output)
            )
            prompt = build_judge_prompt(pair.instruction, pair.input, first, second)
            sha = judgment_hash(config.api, config.judge_model, config.max_tokens, config.temperature, prompt)
            requests.append(JudgeRequest(index, order, prompt, sha))
    return requests


def worst_case_cost(config: PairwiseConfig, meter: CostMeter, prompt: str) -> float:
    """The most one judge request can be billed (0 when the price is unknown: then there is no cap)."""
    texts = request_texts(config.api, prompt, judge_messages)
    return worst_case_usd(meter, texts, config.max_tokens) or 0.0


def judgment_entry(request: JudgeRequest, pair: Pair, config: PairwiseConfig, reply) -> dict:
    """The journal line for one reply."""
    return {
        "kind": "judgment",
        "request_sha256": request.sha256,
        "judge_model": config.judge_model,
        "order": request.order,
        "instruction": pair.instruction[:200],
        "text": reply.text,
        "finish_reason": reply.finish_reason,
        "failure": reply.failure,
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "retries": reply.retries,
    }


async def judge_all(
    config: PairwiseConfig,
    requests: list[JudgeRequest],
    pairs: list[Pair],
    journal: JudgeJournal,
    judgments: dict[str, dict],
    meter: CostMeter,
) -> str:
    """Send every request, journaling each reply as it arrives; returns why it stopped early, or ""."""
    from tqdm import tqdm

    from alpaca.openai_jobs.client import APIFailure, CompletionClient, RetryPolicy

    client = CompletionClient(
        api=config.api,
        model_name=config.judge_model,
        base_url=config.base_url,
        temperature=config.temperature,
        top_p=1.0,
        max_tokens=config.max_tokens,
        request_timeout=config.request_timeout,
        retry=RetryPolicy(max_retries=config.max_retries, initial_delay_s=config.initial_retry_delay),
        stop=COMPLETIONS_STOP if config.api == "completions" else (),
        messages=judge_messages,
    )
    pending = list(requests)
    in_flight: dict[asyncio.Task, tuple[JudgeRequest, float]] = {}
    progress = tqdm(total=len(requests), desc="judged", disable=not config.progress)
    stop_reason, failure = "", None
    try:
        while pending or in_flight:
            while pending and len(in_flight) < config.max_concurrent_requests and failure is None:
                worst = worst_case_cost(config, meter, pending[0].prompt)
                reserved = sum(cost for _, cost in in_flight.values())
                if config.max_cost_usd is not None and meter.usd + reserved + worst > config.max_cost_usd:
                    break
                request = pending.pop(0)
                in_flight[asyncio.create_task(client.complete(request.prompt))] = (request, worst)
            if not in_flight:
                if failure is None and pending:
                    stop_reason = (
                        f"reached --max_cost_usd={config.max_cost_usd}: spent ${meter.usd:.6f} (all runs in this "
                        f"folder) and the next request could cost up to ${worst:.6f}; {len(pending)} requests "
                        "were not sent. Raise --max_cost_usd and rerun to judge the rest"
                    )
                break
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                request, _ = in_flight.pop(task)
                try:
                    reply = task.result()
                except APIFailure as error:
                    failure = failure or error
                    continue
                entry = judgment_entry(request, pairs[request.pair_index], config, reply)
                journal.append(entry)
                judgments[request.sha256] = entry
                meter.add(reply.prompt_tokens, reply.completion_tokens)
                progress.update(1)
                progress.set_postfix(cost=meter.describe())
            if failure is not None:
                # Let the requests in flight finish (they are paid for) but send no more.
                pending.clear()
        if failure is not None:
            stop_reason = (
                f"{failure}; every reply received is in the journal: rerun the same command to resume"
            )
    finally:
        for task in in_flight:
            task.cancel()
        progress.close()
        await client.close()
    return stop_reason


def build_annotations(
    config: PairwiseConfig, pairs: list[Pair], requests: list[JudgeRequest], judgments: dict[str, dict]
) -> list[dict]:
    """One AlpacaEval-like record per pair (output_1 = reference, output_2 = model)."""
    by_pair: dict[int, dict[str, dict | None]] = {}
    for request in requests:
        by_pair.setdefault(request.pair_index, {})[request.order] = judgments.get(request.sha256)
    annotations = []
    for index, pair in enumerate(pairs):
        entries = by_pair[index]
        complete = all(entries[order] is not None for order in ORDERS)
        texts = {order: entries[order]["text"] if entries[order] else None for order in ORDERS}
        verdicts = {order: parse_verdict(texts[order]) for order in ORDERS}
        sides = {order: preferred_side(order, verdicts[order]) for order in ORDERS}
        annotations.append(
            {
                "instruction": pair.instruction,
                "input": pair.input,
                "output_1": pair.reference_output,
                "output_2": pair.model_output,
                "generator_1": pair.reference_generator,
                "generator_2": pair.model_generator,
                "annotator": config.judge_model,
                "preference": combine_orders(sides["reference_first"], sides["model_first"])
                if complete
                else None,
                "judged": complete,
                "verdict_by_order": verdicts,
                "preferred_by_order": sides,
                "raw_completion": texts,
                "failures": {order: (entries[order] or {}).get("failure") for order in ORDERS},
            }
        )
    return annotations


def build_results(
    config: PairwiseConfig, matching: Matching, annotations: list[dict], meter: CostMeter
) -> dict:
    """results.json: the numbers of the judged pairs, the unmatched records and the cost."""
    judged = [record for record in annotations if record["judged"]]
    letters = [v for record in judged for v in record["verdict_by_order"].values() if v is not None]
    summary = summarize(
        [record["preference"] for record in judged],
        [len(record["output_2"]) for record in judged],
        [len(record["output_1"]) for record in judged],
    )
    first = matching.pairs[0]
    return {
        "model": first.model_generator,
        "reference": first.reference_generator,
        "judge_model": config.judge_model,
        **summary,
        # An unbiased judge names Output (a) about half the time; a judge that always names the same
        # position turns every pair into a tie.
        "output_a_share": 100.0 * letters.count("a") / len(letters) if letters else None,
        "n_pairs": len(annotations),
        "n_pending": len(annotations) - len(judged),
        "complete": len(judged) == len(annotations),
        "preference_rule": PREFERENCE_RULE,
        "length_unit": "characters",
        "unmatched": matching.report(),
        "cost": {
            "usd": meter.usd,
            "prompt_tokens": meter.prompt_tokens,
            "completion_tokens": meter.completion_tokens,
            "prices_per_1m": list(meter.prices) if meter.prices else None,
            "scope": "every judgment in this folder's journal",
        },
        "model_outputs": config.model_outputs,
        "reference_outputs": config.reference_outputs,
    }


def load_matching(config: PairwiseConfig) -> Matching:
    """Read both files and match them; no pair at all is an error naming both flags."""
    model_records = load_outputs(config.model_outputs, "--model_outputs")
    reference_records = load_outputs(config.reference_outputs, "--reference_outputs")
    matching = match_outputs(
        model_records,
        reference_records,
        model_name=Path(config.model_outputs).stem,
        reference_name=Path(config.reference_outputs).stem,
    )
    if not matching.pairs:
        raise ValueError(
            f"--model_outputs={config.model_outputs!r} and --reference_outputs={config.reference_outputs!r} "
            "share no instruction (records are matched by instruction and input): are they answers to the "
            "same instruction file?"
        )
    return matching


@locks_output(
    "--output_dir",
    lambda arguments: arguments["config"].output_dir,
    settings_ok=lambda arguments: not arguments["config"].problems(),
)
def run_pairwise(config: PairwiseConfig) -> dict:
    """Judge, write annotations.json and results.json, and return the results.

    Raises PairwiseIncomplete (after writing both files for what was judged) when the cost cap or an
    API failure stopped the run early.
    """
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    matching = load_matching(config)
    if matching.only_in_model or matching.only_in_reference:
        print(
            f"warning: {len(matching.pairs)} pairs matched; {len(matching.only_in_model)} model records and "
            f"{len(matching.only_in_reference)} reference records have no counterpart and are not judged "
            "(listed in results.json under 'unmatched')"
        )
    output_dir = Path(config.output_dir).expanduser()
    requests = plan_requests(config, matching.pairs)
    journal = JudgeJournal(output_dir)
    judgments = journal.load()
    meter = CostMeter(prices=config.prices())
    for entry in judgments.values():
        meter.add(entry["prompt_tokens"], entry["completion_tokens"])
    # Identical prompts (the same pair twice, or a pair whose two outputs are equal, whose two orders
    # then read the same) are asked once.
    todo = list({request.sha256: request for request in requests if request.sha256 not in judgments}.values())
    stored = sum(request.sha256 in judgments for request in requests)
    repeated = len(requests) - stored - len(todo)
    print(
        f"{len(matching.pairs)} pairs, {len(requests)} judgments: {stored} from the journal, "
        + (f"{repeated} repeating an identical prompt, " if repeated else "")
        + f"{len(todo)} to request from {config.judge_model} ({config.base_url or 'OpenAI'})"
    )
    write_json_atomic(output_dir / CONFIG_NAME, {**asdict(config), "prices_per_1m": config.prices()})
    started = time.monotonic()
    journal.open()
    try:
        stop_reason = asyncio.run(judge_all(config, todo, matching.pairs, journal, judgments, meter))
    finally:
        journal.close()
    annotations = build_annotations(config, matching.pairs, requests, judgments)
    results = build_results(config, matching, annotations, meter)
    write_json_atomic(output_dir / ANNOTATIONS_NAME, annotations)
    write_json_atomic(output_dir / RESULTS_NAME, results)
    print(describe_results(results, time.monotonic() - started))
    if stop_reason:
        raise PairwiseIncomplete(stop_reason)
    return results


def describe_results(results: dict, seconds: float) -> str:
    """A few lines for the terminal."""
    rate, error = results["win_rate"], results["standard_error"]
    headline = "n/a" if rate is None else f"{rate:.1f}%" + ("" if error is None else f" ± {error:.1f}")
    cost, share = results["cost"]["usd"], results["output_a_share"]
    lines = [
        f"win rate of {results['model']} against {results['reference']} (judge {results['judge_model']}): "
        f"{headline}",
        f"  {results['n_wins']} wins, {results['n_losses']} losses, {results['n_ties']} ties, "
        f"{results['n_unparseable']} unparseable, {results['n_pending']} not judged yet, of {results['n_pairs']} pairs",
        f"  the judge named Output (a) in {'n/a' if share is None else format(share, '.0f') + '%'} of its readable "
        "verdicts (50% for a judge without position bias; each pair is judged in both orders to cancel it)",
        "  by length (model / reference): "
        + ", ".join(
            f"{b['bin']} {'n/a' if b['win_rate'] is None else format(b['win_rate'], '.1f') + '%'} (n={b['n_judged']})"
            for b in results["length_bins"]
        ),
        f"  cost {'n/a (unknown price)' if cost is None else f'${cost:.4f}'}; {seconds:.1f}s this run",
    ]
    return "\n".join(lines)
