"""Self-instruct data generation: Stanford Alpaca's generate_instruction.py on today's APIs.

Usage (upstream's form, and the plain one):
    python -m generate_instruction generate_instruction_following_data \\
        --seed_tasks_path=data/seed_tasks_sample.jsonl --num_instructions_to_generate=100
    python generate_instruction.py --base_url=http://127.0.0.1:8000/v1 --model_name=my-model --api=completions

The key is read from OPENAI_API_KEY only (OPENAI_ORG is honoured). Output in --output_dir:
regen.json (upstream's records), alpaca_data.json (instruction / input / output only),
regen_journal.jsonl (the crash-safe journal a rerun resumes from), the settings and a summary.
See docs/generate_instruction.md.
"""

import sys

from alpaca.core.settings import args_docstring
from alpaca.selfinstruct.settings import DEFAULT_MODEL, SelfInstructConfig


def generate_instruction_following_data(
    output_dir: str = "./",
    seed_tasks_path: str = "./seed_tasks.jsonl",
    num_instructions_to_generate: int = 100,
    model_name: str = DEFAULT_MODEL,
    num_prompt_instructions: int = 3,
    request_batch_size: int = 5,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_cpus: int = 16,
    api: str = "chat",
    base_url: str | None = None,
    max_tokens: int = 3072,
    max_concurrent_requests: int = 8,
    max_retries: int = 5,
    request_timeout: float = 120.0,
    initial_retry_delay: float = 1.0,
    seed: int | None = None,
    max_cost_usd: float | None = None,
    prompt_price_per_1m: float | None = None,
    completion_price_per_1m: float | None = None,
    num_machine_instructions: int = 0,
    export_alpaca_data: bool = True,
    save_every_s: float = 10.0,
    progress: bool = True,
    max_requests_without_new: int = 50,
    rouge_tokenizer: str = "rouge_score",
) -> None:
    """Generate instruction-following data from seed tasks with an OpenAI-compatible model.

    Each flag's default and help line live in SelfInstructConfig (alpaca/selfinstruct/settings.py; the
    Args below come from it).
    """
    settings = dict(locals())
    from alpaca.openai_jobs.client import APIFailure
    from alpaca.selfinstruct.pipeline import GenerationStalled, generate

    config = SelfInstructConfig(**settings)
    try:
        generate(config)
    except GenerationStalled as error:
        raise SystemExit(f"generate_instruction: stopped: {error}.") from None
    except APIFailure as error:
        raise SystemExit(
            f"generate_instruction: stopped: {error}.\nEverything kept so far is saved in {output_dir} "
            "(regen.json and regen_journal.jsonl); rerun the same command to resume."
        ) from None


generate_instruction_following_data.__doc__ = (
    generate_instruction_following_data.__doc__.rstrip() + "\n\n" + args_docstring(SelfInstructConfig)
)


if __name__ == "__main__":
    from alpaca.core.cli import run

    # Upstream's form names the function: python -m generate_instruction generate_instruction_following_data.
    if len(sys.argv) > 1 and sys.argv[1] == "generate_instruction_following_data":
        del sys.argv[1]
    run(generate_instruction_following_data, "generate_instruction.py")
