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

from alpaca.selfinstruct.pipeline import DEFAULT_MODEL


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

    Args:
        output_dir: folder for regen.json, alpaca_data.json, the journal, settings and summary.
        seed_tasks_path: seed tasks JSONL (id, name, instruction, instances[{input, output}], is_classification).
        num_instructions_to_generate: stop once this many instructions are kept (checked between batches).
        model_name: the model (default gpt-4o-mini: the cheapest current OpenAI model that takes temperature, top_p and stop).
        num_prompt_instructions: in-context examples per prompt.
        request_batch_size: requests per batch; the target is checked and a line printed after each batch.
        temperature: sampling temperature.
        top_p: nucleus sampling threshold.
        num_cpus: threads for the ROUGE-L filter's LCS (capped at this machine's CPUs); upstream's process pool is gone.
        api: "chat" (chat completions) or "completions" (the legacy completions endpoint, as upstream).
        base_url: an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM, llama.cpp's server, Ollama).
        max_tokens: reply length requested (shrunk by 20% whenever the server says the prompt is too long).
        max_concurrent_requests: requests in flight at once; the output does not depend on it.
        max_retries: retries per request for 429, 5xx, timeouts and dropped connections before the run stops.
        request_timeout: seconds before a request is abandoned and retried.
        initial_retry_delay: first backoff in seconds (doubles per retry, with jitter, at most 60 s; Retry-After wins).
        seed: seed for sampling the examples (and sent to the server); random and saved when not given.
        max_cost_usd: never spend more (USD, all runs in output_dir): requests go out only while their worst case fits.
        prompt_price_per_1m: USD per 1M prompt tokens (overrides the built-in price; needed for unknown models).
        completion_price_per_1m: USD per 1M completion tokens.
        num_machine_instructions: how many of the prompt's examples come from generated tasks (self-instruct used 2 of 8).
        export_alpaca_data: also write alpaca_data.json (instruction, input, output only).
        save_every_s: seconds between rewrites of regen.json (the journal is saved after every request).
        progress: show the progress bar.
        max_requests_without_new: stop after this many requests in a row keep no new instruction (0: never).
        rouge_tokenizer: "rouge_score" (upstream's; keeps only a-z, 0-9) or "unicode" (any script; see the docs).
    """
    settings = dict(locals())
    from alpaca.selfinstruct.client import APIFailure
    from alpaca.selfinstruct.pipeline import GenerationStalled, SelfInstructConfig, generate

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


if __name__ == "__main__":
    from alpaca.cli import run

    # Upstream's form names the function: python -m generate_instruction generate_instruction_following_data.
    if len(sys.argv) > 1 and sys.argv[1] == "generate_instruction_following_data":
        del sys.argv[1]
    run(generate_instruction_following_data, "generate_instruction.py")
