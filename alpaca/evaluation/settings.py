"""The flags of `evaluate.py`'s commands: one table per command, each field a flag with its default and
help line. The commands' signatures and `--help` are built from these tables by `@flags_from`
(alpaca/core/settings.py explains how to add a flag). `PairwiseConfig` also checks its values
(`problems`), with the client rules it shares with self-instruct (`alpaca.openai_jobs.settings`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alpaca.core.settings import setting, type_problems
from alpaca.evaluation.judge import DEFAULT_JUDGE_MODEL
from alpaca.openai_jobs.cost import resolve_prices
from alpaca.openai_jobs.settings import (
    BACKOFF_HELP,
    COMPLETION_PRICE_HELP,
    CONCURRENCY_HELP,
    COST_CAP_HELP,
    PROMPT_PRICE_HELP,
    RETRIES_HELP,
    TIMEOUT_HELP,
    api_check,
    backoff_check,
    cap_check,
    client_checks,
    price_checks,
)


@dataclass
class PairwiseConfig:
    """Every setting of a pairwise run: `evaluate.py pairwise`'s flags."""

    model_outputs: str = setting(
        "", "the model's outputs, AlpacaEval JSON (instruction, input, output, generator)."
    )
    reference_outputs: str = setting(
        "", "the reference outputs in the same format (e.g. text-davinci-003's)."
    )
    output_dir: str = setting(
        "", "folder for annotations.json, results.json and the journal a rerun resumes from."
    )
    judge_model: str = setting(
        DEFAULT_JUDGE_MODEL, "the judge (default gpt-4.1); any model the endpoint serves."
    )
    base_url: str | None = setting(
        None,
        "an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (generate.py --api, vLLM, Ollama).",
    )
    api: str = setting(
        "chat", '"chat" (chat completions) or "completions" (the legacy completions endpoint).'
    )
    max_tokens: int = setting(50, "longest judge reply requested (the verdict is a few tokens).")
    temperature: float = setting(0.0, "judge sampling temperature (0: the most repeatable verdicts).")
    max_concurrent_requests: int = setting(8, CONCURRENCY_HELP)
    max_retries: int = setting(5, RETRIES_HELP)
    request_timeout: float = setting(120.0, TIMEOUT_HELP)
    initial_retry_delay: float = setting(1.0, BACKOFF_HELP)
    max_cost_usd: float | None = setting(None, COST_CAP_HELP)
    prompt_price_per_1m: float | None = setting(None, PROMPT_PRICE_HELP)
    completion_price_per_1m: float | None = setting(None, COMPLETION_PRICE_HELP)
    progress: bool = setting(True, "show the progress bar.")

    def problems(self) -> list[str]:
        """Every invalid setting, each naming its flag and what is allowed."""
        wrong_types = type_problems(self)
        if wrong_types:
            return wrong_types
        folder = Path(self.output_dir).expanduser()
        existing = next((part for part in (folder, *folder.parents) if part.exists()), None)
        checks = [
            (
                bool(self.output_dir),
                "--output_dir is required: the folder for annotations.json and results.json",
            ),
            (
                existing is None or existing.is_dir(),
                f"--output_dir={self.output_dir!r}: {existing} is a file, not a folder",
            ),
            api_check(self.api),
            (bool(self.judge_model), "--judge_model must name a model"),
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "--max_tokens must be at least 1"),
            (0.0 <= self.temperature <= 2.0, "--temperature must be between 0 and 2"),
            *client_checks(self),
            backoff_check(self),
            cap_check(self),
            *price_checks(self, self.judge_model),
        ]
        return [message for ok, message in checks if not ok]

    def prices(self) -> tuple[float, float] | None:
        return resolve_prices(self.judge_model, self.prompt_price_per_1m, self.completion_price_per_1m)


@dataclass
class LossConfig:
    """`evaluate.py loss`'s flags."""

    base_model: str = setting("", "base model folder, hub id or .gguf file.")
    lora_weights: str = setting("", 'LoRA adapter folder; "" scores the base model alone.')
    data_path: str = setting("", "JSON/JSONL file (or dataset) of instruction / input / output records.")
    prompt_template_name: str = setting(
        "", 'template in templates/ or a JSON path; "" means alpaca (use the training one).'
    )
    cutoff_len: int = setting(
        256, "tokens per example, as in training; records whose prompt fills it are skipped."
    )
    batch_size: int = setting(8, "examples per forward pass.")
    output_file: str = setting("", "also write the numbers as JSON here.")


@dataclass
class ExactMatchConfig:
    """`evaluate.py exact_match`'s flags."""

    outputs: str = setting("", "the model's outputs, AlpacaEval JSON (instruction, input, output).")
    references: str = setting(
        "", "records with the reference answers in `output`, matched by instruction and input."
    )
    output_file: str = setting(
        "", "the per-item report (default: OUTPUTS_STEM.exact_match.json beside the outputs)."
    )


@dataclass
class LeaderboardConfig:
    """`evaluate.py leaderboard`'s arguments: the result folders, then one flag."""

    result_dirs: tuple = setting(
        (), "folders written by `evaluate.py pairwise`.", variadic=True, flag_type=str
    )
    output_dir: str = setting(
        "", "where to write leaderboard.md/.csv/.png (default: the folder holding the result folders)."
    )
