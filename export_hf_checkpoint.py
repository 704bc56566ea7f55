"""Merge a LoRA adapter into its base model and save a Hugging Face checkpoint that checks itself.

    python export_hf_checkpoint.py --base_model=huggyllama/llama-7b --lora_weights=./lora-alpaca \
        --output_dir=./hf_ckpt

Saves safetensors shards, the tokenizer and the generation config, then reloads the folder and requires
its logits to equal the adapter model's (and every adapted layer to have changed); a failure is an error.
"""


def main(
    base_model: str = "",
    lora_weights: str = "tloen/alpaca-lora-7b",
    output_dir: str = "./hf_ckpt",
    max_shard_size: str = "400MB",
    precision: str = "base",
    dtype: str = "",
    overwrite: bool = False,
):
    """Export the merged model as a Hugging Face checkpoint.

    Args:
        base_model: base model folder, hub id or .gguf file; defaults to the BASE_MODEL environment variable (as upstream's scripts).
        lora_weights: LoRA adapter folder or hub id.
        output_dir: folder to write; must be empty or absent unless --overwrite.
        max_shard_size: largest safetensors shard, e.g. "400MB", "5GB".
        precision: precision to merge and save in: base (default: the base model's own, from its
            config.json), fp32, fp16 (upstream's) or bf16. The self-check refuses a precision
            that rounds the adapter's update away.
        dtype: older name of --precision, kept so that existing export commands run unchanged.
        overwrite: replace an existing non-empty output_dir (only once the new export has passed its checks).
    """
    from alpaca.modeling import require_base_model
    from alpaca.weights.export import export_hf, precision_or_alias

    precision = precision_or_alias(precision, dtype, default="base")
    export_hf(require_base_model(base_model), lora_weights, output_dir, max_shard_size, precision, overwrite)


if __name__ == "__main__":
    from alpaca.core.cli import run

    run(main, "export_hf_checkpoint.py")
