"""Merge a LoRA adapter into its base model and save a Hugging Face checkpoint that checks itself.

    python export_hf_checkpoint.py --base_model=huggyllama/llama-7b --lora_weights=./lora-alpaca \
        --output_dir=./hf_ckpt

Saves safetensors shards, the tokenizer and the generation config, then reloads the folder and requires
its logits to equal the adapter model's (and every adapted layer to have changed); a failure is an error.
"""

from alpaca.core.settings import flags_from
from alpaca.weights.settings import ExportHFConfig


@flags_from(ExportHFConfig)
def main(config: ExportHFConfig):
    """Export the merged model as a Hugging Face checkpoint."""
    from alpaca.modeling import require_base_model
    from alpaca.weights.export import export_hf, precision_or_alias

    precision = precision_or_alias(config.precision, config.dtype, default="base")
    export_hf(
        require_base_model(config.base_model),
        config.lora_weights,
        config.output_dir,
        config.max_shard_size,
        precision,
        config.overwrite,
    )


if __name__ == "__main__":
    from alpaca.core.cli import run

    run(main, "export_hf_checkpoint.py")
