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

from alpaca.core.settings import flags_from
from alpaca.selfinstruct.settings import SelfInstructConfig


@flags_from(SelfInstructConfig)
def generate_instruction_following_data(config: SelfInstructConfig) -> None:
    """Generate instruction-following data from seed tasks with an OpenAI-compatible model.

    Each flag's default and help line live in SelfInstructConfig (alpaca/selfinstruct/settings.py; the
    Args below come from it).
    """
    from alpaca.openai_jobs.client import APIFailure
    from alpaca.selfinstruct.pipeline import GenerationStalled, generate

    try:
        generate(config)
    except GenerationStalled as error:
        raise SystemExit(f"generate_instruction: stopped: {error}.") from None
    except APIFailure as error:
        raise SystemExit(
            f"generate_instruction: stopped: {error}.\nEverything kept so far is saved in {config.output_dir} "
            "(regen.json and regen_journal.jsonl); rerun the same command to resume."
        ) from None


if __name__ == "__main__":
    from alpaca.core.cli import run

    # Upstream's form names the function: python -m generate_instruction generate_instruction_following_data.
    if len(sys.argv) > 1 and sys.argv[1] == "generate_instruction_following_data":
        del sys.argv[1]
    run(generate_instruction_following_data, "generate_instruction.py")
