"""Merge a LoRA adapter into a LLaMA base and write Meta's original checkpoint layout.

    python export_state_dict_checkpoint.py --base_model=huggyllama/llama-7b --lora_weights=./lora-alpaca \
        --output_dir=./ckpt

Writes `consolidated.00.pth` (Meta's tensor names, q/k un-permuted from the HF rotary layout),
`params.json` derived from the model's config, and the tokenizer: `tokenizer.model` for sentencepiece
models, the `tokenizer.json` files for BPE models (Llama 3, SmolLM): the input of llama.cpp's
`examples/convert_legacy_llama.py` (`--vocab-type spm`, or `bpe` for byte-level BPE) and of Meta's
reference code. For current llama.cpp prefer export_gguf.py.
"""


def main(
    base_model: str = "",
    lora_weights: str = "tloen/alpaca-lora-7b",
    output_dir: str = "./ckpt",
    precision: str = "base",
    dtype: str = "",
    overwrite: bool = False,
):
    """Export the merged model in Meta's consolidated.00.pth layout.

    Args:
        base_model: LLaMA base model folder, hub id or .gguf file; defaults to the BASE_MODEL environment variable.
        lora_weights: LoRA adapter folder or hub id.
        output_dir: folder to write; must be empty or absent unless --overwrite.
        precision: precision to merge and save in: base (default: the base model's own, from its
            config.json), fp32, fp16 (upstream's) or bf16. The self-check refuses a precision
            that rounds the adapter's update away.
        dtype: older name of --precision, kept so that existing export commands run unchanged.
        overwrite: replace an existing non-empty output_dir (only once the new export has passed its checks).
    """
    from alpaca.modeling import require_base_model
    from alpaca.weights.export import export_meta, precision_or_alias

    precision = precision_or_alias(precision, dtype, default="base")
    export_meta(require_base_model(base_model), lora_weights, output_dir, precision, overwrite)


if __name__ == "__main__":
    from alpaca.core.cli import run

    run(main, "export_state_dict_checkpoint.py")
