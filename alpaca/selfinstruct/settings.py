"""Every setting of a self-instruct run (``generate_instruction.py``'s flags) and its checks.

``SelfInstructConfig`` is the table: each flag's default and help line live there. The client flags it
shares with pairwise judging are checked by ``alpaca.openai_jobs.settings``.
"""

from dataclasses import dataclass
from pathlib import Path

from alpaca.core.settings import setting, type_problems
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
from alpaca.selfinstruct.tokens import TOKENIZERS

DEFAULT_MODEL = "gpt-4o-mini"
# Items after N+1 are numbered up to 19 (the stop sequences end the list before 20).
MAX_PROMPT_INSTRUCTIONS = 18


@dataclass
class SelfInstructConfig:
    """Every setting of a run: each field is one flag of ``generate_instruction.py``, with its default
    and its help line (the ``Args:`` section of ``generate_instruction.py --help`` is generated from it).

    ``generate_instruction.py``'s signature and ``--help`` are built from this table by ``@flags_from``
    (alpaca/core/settings.py). Adding a knob takes three edits:
      1. a ``setting(...)`` field here (default, help line);
      2. the code that uses ``config.<name>`` (and a check in ``problems`` if some values are invalid);
      3. its row in docs/generate_instruction.md (tests/test_settings.py checks the rows).
    """

    output_dir: str = setting(
        "./", "folder for regen.json, alpaca_data.json, the journal, settings and summary."
    )
    seed_tasks_path: str = setting(
        "./seed_tasks.jsonl",
        "seed tasks JSONL (id, name, instruction, instances[{input, output}], is_classification).",
    )
    num_instructions_to_generate: int = setting(
        100, "stop once this many instructions are kept (checked between batches)."
    )
    model_name: str = setting(
        DEFAULT_MODEL,
        "the model (default gpt-4o-mini: the cheapest current OpenAI model that takes temperature, top_p and stop).",
    )
    num_prompt_instructions: int = setting(3, "in-context examples per prompt.")
    request_batch_size: int = setting(
        5, "requests per batch; the target is checked and a line printed after each batch."
    )
    temperature: float = setting(1.0, "sampling temperature.")
    top_p: float = setting(1.0, "nucleus sampling threshold.")
    num_cpus: int = setting(
        16,
        "threads for the ROUGE-L filter's LCS (capped at this machine's CPUs); upstream's process pool is gone.",
    )
    api: str = setting(
        "chat", '"chat" (chat completions) or "completions" (the legacy completions endpoint, as upstream).'
    )
    base_url: str | None = setting(
        None,
        "an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp's server, Ollama).",
    )
    max_tokens: int = setting(
        3072, "reply length requested (shrunk by 20% whenever the server says the prompt is too long)."
    )
    max_concurrent_requests: int = setting(8, CONCURRENCY_HELP)
    max_retries: int = setting(5, RETRIES_HELP)
    request_timeout: float = setting(120.0, TIMEOUT_HELP)
    initial_retry_delay: float = setting(1.0, BACKOFF_HELP)
    seed: int | None = setting(
        None, "seed for sampling the examples (and sent to the server); random and saved when not given."
    )
    max_cost_usd: float | None = setting(None, COST_CAP_HELP)
    prompt_price_per_1m: float | None = setting(None, PROMPT_PRICE_HELP)
    completion_price_per_1m: float | None = setting(None, COMPLETION_PRICE_HELP)
    num_machine_instructions: int = setting(
        0,
        "how many of the prompt's examples come from generated tasks (self-instruct used 2 of 8).",
    )
    export_alpaca_data: bool = setting(True, "also write alpaca_data.json (instruction, input, output only).")
    save_every_s: float = setting(
        10.0, "seconds between rewrites of regen.json (the journal is saved after every request)."
    )
    progress: bool = setting(True, "show the progress bar.")
    max_requests_without_new: int = setting(
        50, "stop after this many requests in a row keep no new instruction (0: never)."
    )
    rouge_tokenizer: str = setting(
        "rouge_score",
        '"rouge_score" (upstream\'s; keeps only a-z, 0-9) or "unicode" (any script; see the docs).',
    )

    def problems(self) -> list[str]:
        """Every invalid setting, each with the flag name and what is allowed."""
        wrong_types = type_problems(self)
        if wrong_types:
            return wrong_types
        checks = [
            (self.num_instructions_to_generate >= 1, "--num_instructions_to_generate must be at least 1"),
            (
                1 <= self.num_prompt_instructions <= MAX_PROMPT_INSTRUCTIONS,
                f"--num_prompt_instructions must be between 1 and {MAX_PROMPT_INSTRUCTIONS} (the list stops at 20)",
            ),
            (self.request_batch_size >= 1, "--request_batch_size must be at least 1"),
            (0.0 <= self.temperature <= 2.0, "--temperature must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "--top_p must be in (0, 1]"),
            (self.num_cpus >= 1, "--num_cpus must be at least 1"),
            api_check(self.api),
            (self.max_tokens >= 16, "--max_tokens must be at least 16"),
            *client_checks(self),
            (self.save_every_s >= 0, "--save_every_s must be 0 or more (seconds)"),
            backoff_check(self),
            cap_check(self),
            (
                0 <= self.num_machine_instructions <= self.num_prompt_instructions,
                "--num_machine_instructions must be between 0 and --num_prompt_instructions",
            ),
            (
                self.max_requests_without_new >= 0,
                "--max_requests_without_new must be 0 (no limit) or more",
            ),
            output_dir_check(self.output_dir),
            (
                self.rouge_tokenizer in TOKENIZERS,
                f"--rouge_tokenizer must be one of {', '.join(TOKENIZERS)}, not {self.rouge_tokenizer!r}",
            ),
            *price_checks(self, self.model_name),
        ]
        return [message for ok, message in checks if not ok]


def output_dir_check(output_dir: str) -> tuple[bool, str]:
    """--output_dir must be a folder or creatable as one: no part of it may be an existing file."""
    path = Path(output_dir).expanduser()
    for part in (path, *path.parents):
        if part.exists():
            return part.is_dir(), (
                f"--output_dir {output_dir!r}: {part} is a file, not a folder; give a folder path "
                "(it is created if missing)"
            )
    return True, ""
