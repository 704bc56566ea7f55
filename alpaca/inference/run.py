"""`generate.py`'s three modes over one loading path: the Gradio page, batch mode over a file of
instructions, and the OpenAI-compatible API. Each mode checks what it can before the slow model load
(a malformed input file, an unusable output file, --auth, a busy port), then loads and runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from alpaca.inference.settings import GenerateConfig


def run_generate(config: GenerateConfig) -> None:
    """Check every flag, then serve the page, generate in batch mode or serve the API."""
    from alpaca.inference.decoding import GenerationLimits, make_settings
    from alpaca.modeling import base_model_or_env

    config = dataclasses.replace(config, base_model=base_model_or_env(config.base_model))
    problems = config.problems()
    if problems:
        raise ValueError("; ".join(problems))
    limits = GenerationLimits(
        max_input_tokens=config.max_input_tokens, max_new_tokens=config.max_new_tokens_limit
    )
    settings = make_settings(
        config.temperature,
        config.top_p,
        config.top_k,
        config.num_beams,
        config.max_new_tokens,
        config.seed,
        limits,
    )
    if config.api:
        run_api(config, limits, settings)
    elif config.batch_mode:
        run_batch_mode(config, limits, settings)
    else:
        run_page(config, limits, settings)


def load_models(config: GenerateConfig, limits, settings, compare: bool) -> list:
    """Set the CPU threads, load the base model with its adapter (and, on the page, the models to
    compare), and print the start-up report."""
    from alpaca.core.threads import set_num_threads
    from alpaca.inference.decoding import parse_stop_strings
    from alpaca.inference.loading import describe, load_generators

    set_num_threads(config.num_threads, log=lambda message: print(message, file=sys.stderr))
    generators = load_generators(
        config.base_model,
        lora_weights=config.lora_weights,
        compare_lora_weights=config.compare_lora_weights if compare else "",
        compare_base_models=config.compare_base_models if compare else "",
        prompt_template=config.prompt_template,
        load_8bit=config.load_8bit,
        load_4bit=config.load_4bit,
        precision=config.precision,
        trust_remote_code=config.trust_remote_code,
        limits=limits,
        stop_strings=None if config.stop is None else parse_stop_strings(config.stop),
    )
    print(json.dumps(describe(generators, settings, limits), indent=2))
    return generators


def run_batch_mode(config: GenerateConfig, limits, settings) -> None:
    """Generate for every record of --input_file into --output_file (resuming what it holds)."""
    from alpaca.core.locks import check_output_free
    from alpaca.inference.batch import check_output_file, read_finished, read_instructions, run_batch

    check_output_file(config.output_file)
    check_output_free(config.output_file, "--output_file")  # run_batch holds the lock while it writes
    read_finished(config.output_file, read_instructions(config.input_file))
    generators = load_models(config, limits, settings, compare=False)
    run_batch(
        generators[0], config.input_file, config.output_file, settings, config.batch_size, config.generator
    )
    print(f"wrote {config.output_file}")


def run_api(config: GenerateConfig, limits, settings) -> None:
    """Serve the OpenAI-compatible API until Ctrl-C."""
    from alpaca.serving.server import check_api_flags, serve_api, start_api

    check_api_flags(
        config.chat_format,
        config.max_batch_size,
        config.max_wait_ms,
        config.input_file,
        config.served_model_name,
        config.read_timeout_s,
    )
    # Bound before the load: a busy port fails now, and clients get 503 while the model loads.
    api_server = start_api(
        config.server_name, config.server_port, config.api_key, limits, config.read_timeout_s
    )
    generators = load_models(config, limits, settings, compare=False)
    serve_api(
        api_server,
        generators[0],
        config.max_new_tokens,
        config.chat_format,
        config.served_model_name,
        config.max_batch_size,
        config.max_queue_size,
        config.max_wait_ms,
    )


def run_page(config: GenerateConfig, limits, settings) -> None:
    """Serve the Gradio page (with the Compare tab when other models are given) until closed."""
    from alpaca.inference.page import build_demo, check_port_free, launch_demo, parse_auth, request_body_limit

    auth_pair = parse_auth(config.auth)
    check_port_free(config.server_name, config.server_port)
    generators = load_models(config, limits, settings, compare=True)
    demo = build_demo(generators, settings, limits)
    launch_demo(
        demo,
        config.server_name,
        config.server_port,
        config.share_gradio,
        auth_pair,
        config.concurrency_limit,
        config.max_queue_size,
        max_request_bytes=request_body_limit(limits),
    )
