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

from alpaca.core.settings import flags_from
from alpaca.evaluation.settings import ExactMatchConfig, LeaderboardConfig, LossConfig, PairwiseConfig


@flags_from(PairwiseConfig)
def pairwise(config: PairwiseConfig) -> None:
    """Judge the model's outputs against the reference's, each pair in both orders."""
    from alpaca.evaluation.pairwise import PairwiseIncomplete, run_pairwise

    try:
        run_pairwise(config)
    except PairwiseIncomplete as stop:
        raise SystemExit(f"evaluate.py: stopped: {stop}.") from None


@flags_from(LossConfig)
def loss(config: LossConfig) -> None:
    """Held-out loss and perplexity on the response tokens (+ EOS), the prompt masked as in training."""
    from alpaca.core.files import write_json_atomic
    from alpaca.evaluation.loss import held_out_loss

    report = held_out_loss(
        config.base_model,
        config.lora_weights,
        config.data_path,
        config.prompt_template_name,
        config.cutoff_len,
        config.batch_size,
    )
    result = {
        "base_model": config.base_model,
        "lora_weights": config.lora_weights,
        "data_path": config.data_path,
        **report.to_dict(),
    }
    print(json.dumps(result, indent=2))
    if config.output_file:
        write_json_atomic(config.output_file, result)


@flags_from(ExactMatchConfig)
def exact_match(config: ExactMatchConfig) -> None:
    """Final-answer accuracy (GSM8K's "#### N", else the last number; compared as numbers)."""
    from alpaca.evaluation.exact_match import default_report_path, score_exact_match, write_report

    report = score_exact_match(config.outputs, config.references)
    path = write_report(report, config.output_file or default_report_path(config.outputs))
    print(
        f"exact match: {report['accuracy']:.1f}% ({report['n_correct']} of {report['n_items']}; "
        f"{report['n_no_answer']} without a number; {report['n_outputs_without_reference']} outputs without a "
        f"reference). Per item: {path}"
    )


@flags_from(LeaderboardConfig)
def leaderboard(config: LeaderboardConfig) -> None:
    """A Markdown and a CSV table and a PNG bar chart (with error bars) of several pairwise runs."""
    from alpaca.evaluation.leaderboard import write_leaderboard

    paths = write_leaderboard(list(config.result_dirs), config.output_dir)
    print(paths["md"].read_text(encoding="utf-8"))
    print("written: " + ", ".join(str(path) for path in paths.values()))


COMMANDS = {"pairwise": pairwise, "loss": loss, "exact_match": exact_match, "leaderboard": leaderboard}

if __name__ == "__main__":
    from alpaca.core.cli import run

    run(COMMANDS, "evaluate.py")
