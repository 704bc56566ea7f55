"""Merge a LoRA adapter into a LLaMA base and write Meta's original checkpoint layout.

    python export_state_dict_checkpoint.py --base_model=huggyllama/llama-7b --lora_weights=./lora-alpaca \
        --output_dir=./ckpt

Writes `consolidated.00.pth` (Meta's tensor names, q/k un-permuted from the HF rotary layout),
`params.json` derived from the model's config, and `tokenizer.model`: the input of llama.cpp's
`examples/convert_legacy_llama.py` and of Meta's reference code. For current llama.cpp prefer export_gguf.py.
"""

import os


def main(
    base_model: str = "",
    lora_weights: str = "tloen/alpaca-lora-7b",
    output_dir: str = "./ckpt",
    dtype: str = "fp16",
    overwrite: bool = False,
):
    """Export the merged model in Meta's consolidated.00.pth layout.

    Args:
        base_model: LLaMA base model folder or hub id; defaults to the BASE_MODEL environment variable.
        lora_weights: LoRA adapter folder or hub id.
        output_dir: folder to write; must be empty or absent unless --overwrite.
        dtype: precision to merge and save in: fp16 (upstream's), bf16 or fp32.
        overwrite: replace the contents of an existing non-empty output_dir.
    """
    from alpaca.export import export_meta

    base_model = base_model or os.environ.get("BASE_MODEL", "")
    if not base_model:
        raise ValueError(
            "--base_model is required (or set BASE_MODEL), e.g. --base_model=huggyllama/llama-7b"
        )
    export_meta(base_model, lora_weights, output_dir, dtype, overwrite)


if __name__ == "__main__":
    from alpaca.cli import run

    run(main, "export_state_dict_checkpoint.py")
