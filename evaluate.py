"""Measure whether a fine-tune got better: pairwise judging as Alpaca was judged, loss, exact match.

    # a judge compares two AlpacaEval-format output files (generate.py --output_file), both orders
    python evaluate.py pairwise --model_outputs=lora.json --reference_outputs=davinci003.json \\
        --output_dir=eval/lora [--base_url=http://127.0.0.1:8000/v1 --judge_model=NAME]

    # held-out loss and perplexity on the response tokens, as training computes them
    python evaluate.py loss --base_model=... --lora_weights=./lora-alpaca --data_path=heldout.json

    # GSM8K-style final answers ("#### 42", else the last number)
    python evaluate.py exact_match --outputs=gsm8k_outputs.json --references=gsm8k_test.json

    # several pairwise runs in one table and bar chart
    python evaluate.py leaderboard eval/lora eval/base

The key is read from OPENAI_API_KEY (not needed with --base_url). See docs/evaluate.md.
"""

from __future__ import annotations

import json

from alpaca.evaluation.judge import DEFAULT_JUDGE_MODEL


def pairwise(
    model_outputs: str = "",
    reference_outputs: str = "",
    output_dir: str = "",
    judge_model: str = DEFAULT_JUDGE_MODEL,
    base_url: str | None = None,
    api: str = "chat",
    max_tokens: int = 50,
    temperature: float = 0.0,
    max_concurrent_requests: int = 8,
    max_retries: int = 5,
    request_timeout: float = 120.0,
    initial_retry_delay: float = 1.0,
    max_cost_usd: float | None = None,
    prompt_price_per_1m: float | None = None,
    completion_price_per_1m: float | None = None,
    progress: bool = True,
) -> None:
    """Judge the model's outputs against the reference's, each pair in both orders.

    Args:
        model_outputs: the model's outputs, AlpacaEval JSON (instruction, input, output, generator).
        reference_outputs: the reference outputs in the same format (e.g. text-davinci-003's).
        output_dir: folder for annotations.json, results.json and the journal a rerun resumes from.
        judge_model: the judge (default gpt-4.1); any model the endpoint serves.
        base_url: an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (generate.py --api, vLLM, Ollama).
        api: "chat" (chat completions) or "completions" (the legacy completions endpoint).
        max_tokens: longest judge reply requested (the verdict is a few tokens).
        temperature: judge sampling temperature (0: the most repeatable verdicts).
        max_concurrent_requests: requests in flight at once; the results do not depend on it.
        max_retries: retries per request for 429, 5xx, timeouts and dropped connections before stopping.
        request_timeout: seconds before a request is abandoned and retried.
        initial_retry_delay: first backoff in seconds (doubles per retry, with jitter; Retry-After wins).
        max_cost_usd: never spend more (USD, all runs in output_dir): requests go out only while their worst case fits.
        prompt_price_per_1m: USD per 1M prompt tokens (overrides the built-in price; needed for unknown models).
        completion_price_per_1m: USD per 1M completion tokens.
        progress: show the progress bar.
    """
    settings = dict(locals())
    from alpaca.evaluation.pairwise import PairwiseConfig, PairwiseIncomplete, run_pairwise

    try:
        run_pairwise(PairwiseConfig(**settings))
    except PairwiseIncomplete as stop:
        raise SystemExit(f"evaluate.py: stopped: {stop}.") from None


def loss(
    base_model: str = "",
    lora_weights: str = "",
    data_path: str = "",
    prompt_template_name: str = "",
    cutoff_len: int = 256,
    batch_size: int = 8,
    output_file: str = "",
) -> None:
    """Held-out loss and perplexity on the response tokens (+ EOS), the prompt masked as in training.

    Args:
        base_model: base model folder, hub id or .gguf file.
        lora_weights: LoRA adapter folder; "" scores the base model alone.
        data_path: JSON/JSONL file (or dataset) of instruction / input / output records.
        prompt_template_name: template in templates/ or a JSON path; "" means alpaca (use the training one).
        cutoff_len: tokens per example, as in training; records whose prompt fills it are skipped.
        batch_size: examples per forward pass.
        output_file: also write the numbers as JSON here.
    """
    from alpaca.core.files import write_json_atomic
    from alpaca.evaluation.loss import held_out_loss

    report = held_out_loss(base_model, lora_weights, data_path, prompt_template_name, cutoff_len, batch_size)
    result = {
        "base_model": base_model,
        "lora_weights": lora_weights,
        "data_path": data_path,
        **report.to_dict(),
    }
    print(json.dumps(result, indent=2))
    if output_file:
        write_json_atomic(output_file, result)


def exact_match(outputs: str = "", references: str = "", output_file: str = "") -> None:
    """Final-answer accuracy (GSM8K's "#### N", else the last number; compared as numbers).

    Args:
        outputs: the model's outputs, AlpacaEval JSON (instruction, input, output).
        references: records with the reference answers in `output`, matched by instruction and input.
        output_file: the per-item report (default: OUTPUTS_STEM.exact_match.json beside the outputs).
    """
    from alpaca.evaluation.exact_match import default_report_path, score_exact_match, write_report

    report = score_exact_match(outputs, references)
    path = write_report(report, output_file or default_report_path(outputs))
    print(
        f"exact match: {report['accuracy']:.1f}% ({report['n_correct']} of {report['n_items']}; "
        f"{report['n_no_answer']} without a number; {report['n_outputs_without_reference']} outputs without a "
        f"reference). Per item: {path}"
    )


def leaderboard(*result_dirs: str, output_dir: str = "") -> None:
    """A Markdown and a CSV table and a PNG bar chart (with error bars) of several pairwise runs.

    Args:
        result_dirs: folders written by `evaluate.py pairwise`.
        output_dir: where to write leaderboard.md/.csv/.png (default: the folder holding the result folders).
    """
    from alpaca.evaluation.leaderboard import write_leaderboard

    paths = write_leaderboard(list(result_dirs), output_dir)
    print(paths["md"].read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(path) for path in paths.values()))


COMMANDS = {"pairwise": pairwise, "loss": loss, "exact_match": exact_match, "leaderboard": leaderboard}

if __name__ == "__main__":
    from alpaca.core.cli import run

    run(COMMANDS, "evaluate.py")
