"""`generate.py`'s flags: one table for its three modes (the page, batch mode, the API), each field a
flag with its default and help line. `generate.py`'s signature and `--help` are built from this table
by `@flags_from` (alpaca/core/settings.py explains how to add a flag); `problems` checks the flags
every mode shares, before anything loads (the API's own are checked by `alpaca.serving.server`).

The serving code takes its defaults from here (`GenerateConfig.max_batch_size`, ...), so each default
is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

from alpaca.core.settings import setting


@dataclass
class GenerateConfig:
    """Every flag of `generate.py`."""

    load_8bit: bool = setting(False, "load the base model in 8 bits (bitsandbytes).")
    base_model: str = setting(
        "", "base model folder or hub id; defaults to the BASE_MODEL environment variable."
    )
    lora_weights: str = setting(
        "tloen/alpaca-lora-7b", 'LoRA adapter folder or hub id; "" runs the base (or a merged) model alone.'
    )
    prompt_template: str = setting("", 'template name in templates/ or a JSON path; "" means alpaca.')
    server_name: str = setting(
        "127.0.0.1", "address to bind; 127.0.0.1 keeps the page on this machine, 0.0.0.0 opens it to all."
    )
    share_gradio: bool = setting(False, "also create a public gradio.live link.")
    server_port: int = setting(7860, "port to serve on.")
    load_4bit: bool = setting(False, "load the base model in 4 bits (NF4, bitsandbytes).")
    auth: str = setting("", '"user:password" required to open the page; defaults to $ALPACA_DEMO_AUTH.')
    precision: str = setting(
        "auto",
        "auto (bf16/fp16 on GPUs, fp16 on MPS, fp32 on CPU), bf16, fp16 or fp32. bf16 on a CPU runs bf16 "
        "weights where the CPU has native bf16 (about 1.6x batch 1, 2x batch 8), else fp32 with a warning; "
        "the start-up report says which runs (docs/performance.md).",
    )
    trust_remote_code: bool = setting(
        False, "allow model code from the hub to run; off unless you trust the model."
    )
    compare_lora_weights: str = setting(
        "", "comma-separated extra adapters for the same base, shown in the Compare tab."
    )
    compare_base_models: str = setting(
        "", "comma-separated other models (no adapters), shown in the Compare tab."
    )
    max_input_tokens: int = setting(1024, "reject prompts longer than this many tokens.")
    max_new_tokens_limit: int = setting(1024, "the largest Max tokens a request may ask for.")
    concurrency_limit: int = setting(
        1,
        "requests each page event processes at once (generation on one model is serialized; the rest wait "
        "in the queue).",
    )
    max_queue_size: int = setting(64, "requests that may wait in the queue before new ones are turned away.")
    temperature: float = setting(
        0.1,
        "default Temperature; 0 is deterministic: greedy with --num_beams=1, beam search with more beams "
        "(the default is 4); above 0 samples.",
    )
    top_p: float = setting(0.75, "default Top p (used when sampling).")
    top_k: int = setting(40, "default Top k (used when sampling).")
    num_beams: int = setting(4, "default Beams.")
    max_new_tokens: int = setting(128, "default Max tokens.")
    seed: int = setting(-1, "default Seed; -1 samples afresh each time.")
    input_file: str = setting(
        "", 'batch mode: a JSON list or JSONL file of {"instruction", "input"} records.'
    )
    output_file: str = setting(
        "", "batch mode: where to write the AlpacaEval-format JSON list (resumed if present)."
    )
    batch_size: int = setting(8, "batch mode: records generated together.")
    generator: str = setting(
        "",
        "batch mode: the `generator` name written into each record; default: the base model's name plus "
        'the adapter\'s (e.g. "SmolLM2-135M-Instruct + lora-alpaca").',
    )
    stop: str | None = setting(
        None,
        "comma-separated stop strings (\\n for a newline): generation stops at the first one and the reply "
        'is cut before it. Default: the template\'s next-turn markers ("### Instruction:", "### Input:", '
        '"### Response:", ...); --stop="" turns stopping off.',
    )
    api: bool = setting(
        False,
        "serve an OpenAI-compatible API (/v1/models, /v1/completions, /v1/chat/completions) on "
        "--server_name:--server_port instead of the page; requests in flight are batched (docs/api.md).",
    )
    api_key: str = setting(
        "",
        'with --api: the key clients must send as "Authorization: Bearer KEY"; defaults to $ALPACA_API_KEY; '
        "none set serves without a key.",
    )
    chat_format: str = setting(
        "trained",
        'with --api: "trained" (default) speaks the format the adapter was trained in (its '
        'training_format.json): its chat template, or the prompt template; "template" puts chat turns into the '
        'prompt template (system message -> instruction, user message -> input); "tokenizer" uses the '
        "tokenizer's chat template.",
    )
    served_model_name: str = setting(
        "", "with --api: the model id in /v1/models; default: the model's label."
    )
    max_batch_size: int = setting(8, "with --api: the most sequences generated together.")
    max_wait_ms: float = setting(
        20.0,
        "with --api: when idle, how long the first request waits for others expected with it (later ones "
        "join the running batch at the next step).",
    )
    read_timeout_s: float = setting(
        5.0,
        "with --api: seconds a client may take to send its request body; a slower one gets 408 (the "
        "connection is closed, no thread or request slot is held).",
    )
    num_threads: int = setting(
        0,
        "torch CPU threads; 0 chooses: $OMP_NUM_THREADS when set, else the usable physical cores "
        "(docs/performance.md).",
    )

    @property
    def batch_mode(self) -> bool:
        return bool(self.input_file)

    def problems(self) -> list[str]:
        """Every problem with the flags all modes share, each naming its flag."""
        from alpaca.modeling import MISSING_BASE_MODEL

        checks = [
            (bool(self.base_model), MISSING_BASE_MODEL),
            (
                bool(self.input_file) == bool(self.output_file),
                "batch mode needs both --input_file and --output_file",
            ),
            (self.batch_size >= 1, f"--batch_size must be at least 1, got {self.batch_size}"),
            (
                not (self.load_8bit and self.load_4bit),
                "--load_8bit and --load_4bit are exclusive: choose one",
            ),
            (
                self.max_input_tokens >= 1 and self.max_new_tokens_limit >= 1,
                "--max_input_tokens and --max_new_tokens_limit must be at least 1",
            ),
            (
                self.concurrency_limit >= 1,
                f"--concurrency_limit must be at least 1, got {self.concurrency_limit}",
            ),
            (1 <= self.server_port <= 65535, f"--server_port must be a port number, got {self.server_port}"),
        ]
        return [message for ok, message in checks if not ok]
