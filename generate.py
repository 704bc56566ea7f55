"""Serve a base model plus LoRA weights in a Gradio page, or generate for a file of instructions.

    # the page, on http://127.0.0.1:7860 (add --server_name=0.0.0.0 --auth=user:pw to serve others)
    python generate.py --base_model=huggyllama/llama-7b --lora_weights=tloen/alpaca-lora-7b

    # side by side: the base alone, the main adapter and two more, in the Compare tab
    python generate.py --base_model=... --lora_weights=./lora-a --compare_lora_weights=./lora-b,./lora-c

    # batch mode: AlpacaEval-format outputs; rerun the same command to resume after a crash
    python generate.py --base_model=... --lora_weights=... --input_file=instructions.json \
        --output_file=outputs.json --batch_size=8 --temperature=0 --num_beams=1   # greedy

    # an OpenAI-compatible API on http://127.0.0.1:8000/v1, requests batched together (docs/api.md)
    python generate.py --api --base_model=... --lora_weights=... --server_port=8000

See docs/generate.md for every flag.
"""

from __future__ import annotations

import json
import sys


def main(
    load_8bit: bool = False,
    base_model: str = "",
    lora_weights: str = "tloen/alpaca-lora-7b",
    prompt_template: str = "",
    server_name: str = "127.0.0.1",
    share_gradio: bool = False,
    server_port: int = 7860,
    load_4bit: bool = False,
    auth: str = "",
    precision: str = "auto",
    trust_remote_code: bool = False,
    compare_lora_weights: str = "",
    compare_base_models: str = "",
    max_input_tokens: int = 1024,
    max_new_tokens_limit: int = 1024,
    concurrency_limit: int = 1,
    max_queue_size: int = 64,
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 40,
    num_beams: int = 4,
    max_new_tokens: int = 128,
    seed: int = -1,
    input_file: str = "",
    output_file: str = "",
    batch_size: int = 8,
    generator: str = "",
    stop: str | None = None,
    api: bool = False,
    api_key: str = "",
    chat_format: str = "template",
    served_model_name: str = "",
    max_batch_size: int = 8,
    max_wait_ms: float = 20.0,
    read_timeout_s: float = 5.0,
    num_threads: int = 0,
):
    """Serve the Alpaca-LoRA page, or with --input_file/--output_file, generate in batch mode.

    Args:
        load_8bit: load the base model in 8 bits (bitsandbytes).
        base_model: base model folder or hub id; defaults to the BASE_MODEL environment variable.
        lora_weights: LoRA adapter folder or hub id; "" runs the base (or a merged) model alone.
        prompt_template: template name in templates/ or a JSON path; "" means alpaca.
        server_name: address to bind; 127.0.0.1 keeps the page on this machine, 0.0.0.0 opens it to all.
        share_gradio: also create a public gradio.live link.
        server_port: port to serve on.
        load_4bit: load the base model in 4 bits (NF4, bitsandbytes).
        auth: "user:password" required to open the page; defaults to $ALPACA_DEMO_AUTH.
        precision: auto (bf16/fp16 on GPUs, fp16 on MPS, fp32 on CPU), bf16, fp16 or fp32. bf16 on a CPU
            runs bf16 weights where the CPU has native bf16 (about 1.6x batch 1, 2x batch 8), else fp32
            with a warning; the start-up report says which runs (docs/performance.md).
        trust_remote_code: allow model code from the hub to run; off unless you trust the model.
        compare_lora_weights: comma-separated extra adapters for the same base, shown in the Compare tab.
        compare_base_models: comma-separated other models (no adapters), shown in the Compare tab.
        max_input_tokens: reject prompts longer than this many tokens.
        max_new_tokens_limit: the largest Max tokens a request may ask for.
        concurrency_limit: requests each page event processes at once (generation on one model is
            serialized; the rest wait in the queue).
        max_queue_size: requests that may wait in the queue before new ones are turned away.
        temperature: default Temperature; 0 is deterministic: greedy with --num_beams=1, beam search
            with more beams (the default is 4); above 0 samples.
        top_p: default Top p (used when sampling).
        top_k: default Top k (used when sampling).
        num_beams: default Beams.
        max_new_tokens: default Max tokens.
        seed: default Seed; -1 samples afresh each time.
        input_file: batch mode: a JSON list or JSONL file of {"instruction", "input"} records.
        output_file: batch mode: where to write the AlpacaEval-format JSON list (resumed if present).
        batch_size: batch mode: records generated together.
        generator: batch mode: the `generator` name written into each record; default: the base model's
            name plus the adapter's (e.g. "SmolLM2-135M-Instruct + lora-alpaca").
        stop: comma-separated stop strings (\\n for a newline): generation stops at the first one and the
            reply is cut before it. Default: the template's next-turn markers ("### Instruction:",
            "### Input:", "### Response:", ...); --stop="" turns stopping off.
        api: serve an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) on
            --server_name:--server_port instead of the page; requests in flight are batched (docs/api.md).
        api_key: with --api: the key clients must send as "Authorization: Bearer KEY"; defaults to
            $ALPACA_API_KEY; none set serves without a key.
        chat_format: with --api: "template" puts chat turns into the prompt template (system message ->
            instruction, user message -> input); "tokenizer" uses the tokenizer's chat template.
        served_model_name: with --api: the model id in /v1/models; default: the model's label.
        max_batch_size: with --api: the most sequences generated together.
        max_wait_ms: with --api: when idle, how long the first request waits for others expected with it
            (later ones join the running batch at the next step).
        read_timeout_s: with --api: seconds a client may take to send its request body; a slower one
            gets 408 (the connection is closed, no thread or request slot is held).
        num_threads: torch CPU threads; 0 chooses: $OMP_NUM_THREADS when set, else the usable physical
            cores (docs/performance.md).
    """
    from alpaca.batch import check_output_file, read_finished, read_instructions, run_batch
    from alpaca.decoding import GenerationLimits, make_settings, parse_stop_strings
    from alpaca.generator_loading import describe, load_generators
    from alpaca.modeling import base_model_or_env

    base_model = base_model_or_env(base_model)
    check_flags(
        base_model,
        input_file,
        output_file,
        batch_size,
        load_8bit,
        load_4bit,
        max_input_tokens,
        max_new_tokens_limit,
        concurrency_limit,
        server_port,
    )
    limits = GenerationLimits(max_input_tokens=max_input_tokens, max_new_tokens=max_new_tokens_limit)
    settings = make_settings(temperature, top_p, top_k, num_beams, max_new_tokens, seed, limits)
    batch_mode = bool(input_file)
    # Fail on a malformed input file, an unusable output file, --auth or a busy port before the slow
    # model load.
    if api:
        from alpaca.serving.server import check_api_flags, serve_api, start_api

        check_api_flags(
            chat_format, max_batch_size, max_wait_ms, input_file, served_model_name, read_timeout_s
        )
        # Bound before the load: a busy port fails now, and clients get 503 while the model loads.
        api_server = start_api(server_name, server_port, api_key, limits, read_timeout_s)
    elif batch_mode:
        check_output_file(output_file)
        read_finished(output_file, read_instructions(input_file))
    else:
        from alpaca.demo import build_demo, check_port_free, launch_demo, parse_auth, request_body_limit

        auth_pair = parse_auth(auth)
        check_port_free(server_name, server_port)
    from alpaca.threads import set_num_threads

    set_num_threads(num_threads, log=lambda message: print(message, file=sys.stderr))
    generators = load_generators(
        base_model,
        lora_weights=lora_weights,
        compare_lora_weights="" if batch_mode or api else compare_lora_weights,
        compare_base_models="" if batch_mode or api else compare_base_models,
        prompt_template=prompt_template,
        load_8bit=load_8bit,
        load_4bit=load_4bit,
        precision=precision,
        trust_remote_code=trust_remote_code,
        limits=limits,
        stop_strings=None if stop is None else parse_stop_strings(stop),
    )
    print(json.dumps(describe(generators, settings, limits), indent=2))
    if batch_mode:
        run_batch(generators[0], input_file, output_file, settings, batch_size, generator)
        print(f"wrote {output_file}")
        return None
    if api:
        serve_api(
            api_server,
            generators[0],
            max_new_tokens,
            chat_format,
            served_model_name,
            max_batch_size,
            max_queue_size,
            max_wait_ms,
        )
        return None

    demo = build_demo(generators, settings, limits)
    launch_demo(
        demo,
        server_name,
        server_port,
        share_gradio,
        auth_pair,
        concurrency_limit,
        max_queue_size,
        max_request_bytes=request_body_limit(limits),
    )
    return None


def check_flags(
    base_model,
    input_file,
    output_file,
    batch_size,
    load_8bit,
    load_4bit,
    max_input_tokens,
    max_new_tokens_limit,
    concurrency_limit,
    server_port,
) -> None:
    """Collect every problem with the flags into one ValueError."""
    from alpaca.modeling import MISSING_BASE_MODEL

    problems = []
    if not base_model:
        problems.append(MISSING_BASE_MODEL)
    if bool(input_file) != bool(output_file):
        problems.append("batch mode needs both --input_file and --output_file")
    if batch_size < 1:
        problems.append(f"--batch_size must be at least 1, got {batch_size}")
    if load_8bit and load_4bit:
        problems.append("--load_8bit and --load_4bit are exclusive: choose one")
    if max_input_tokens < 1 or max_new_tokens_limit < 1:
        problems.append("--max_input_tokens and --max_new_tokens_limit must be at least 1")
    if concurrency_limit < 1:
        problems.append(f"--concurrency_limit must be at least 1, got {concurrency_limit}")
    if not 1 <= server_port <= 65535:
        problems.append(f"--server_port must be a port number, got {server_port}")
    if problems:
        raise ValueError("; ".join(problems))


if __name__ == "__main__":
    from alpaca.cli import run

    run(main, "generate.py")
