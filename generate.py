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

from alpaca.core.settings import flags_from
from alpaca.inference.settings import GenerateConfig


@flags_from(GenerateConfig)
def main(config: GenerateConfig):
    """Serve the Alpaca-LoRA page, or with --input_file/--output_file, generate in batch mode.

    Each flag's default and help line live in alpaca/inference/settings.py (the Args below come from it).
    """
    from alpaca.inference.run import run_generate

    run_generate(config)


if __name__ == "__main__":
    from alpaca.core.cli import run

    run(main, "generate.py")
