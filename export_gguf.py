"""Merge a LoRA adapter into a LLaMA base and write one GGUF file for llama.cpp.

    python export_gguf.py --base_model=huggyllama/llama-7b --lora_weights=./lora-alpaca \
        --output_file=./alpaca-lora-f16.gguf --outtype=f16

Written with the `gguf` package (maintained by llama.cpp) in the layout of llama.cpp's own
convert_hf_to_gguf.py: tensors, hyperparameters and the vocabulary (sentencepiece, or BPE with its merges
and llama.cpp's pre-tokenizer name) with special ids and the chat template. Arguments are checked before
anything is loaded; the file is written beside the target, read back and compared tensor by tensor with
the merged weights, and only then moved into place (so a failed --overwrite keeps the old file).
"""

import os


def main(
    base_model: str = "",
    lora_weights: str = "tloen/alpaca-lora-7b",
    output_file: str = "",
    outtype: str = "f16",
    dtype: str = "fp32",
    model_name: str = "",
    overwrite: bool = False,
):
    """Export the merged model as GGUF.

    Args:
        base_model: LLaMA base model folder, hub id or .gguf file; defaults to the BASE_MODEL environment variable.
        lora_weights: LoRA adapter folder or hub id.
        output_file: the .gguf file to write; default ./alpaca-lora-{outtype}.gguf.
        outtype: tensor type in the file: f16 (norms stay f32, as llama.cpp does) or f32.
        dtype: precision to merge in before conversion: fp32 (default), fp16 or bf16.
        model_name: general.name in the file; default derived from the base model's folder name.
        overwrite: replace an existing output_file (only once the new one has passed its checks).
    """
    from alpaca.export import export_gguf

    base_model = base_model or os.environ.get("BASE_MODEL", "")
    if not base_model:
        raise ValueError(
            "--base_model is required (or set BASE_MODEL), e.g. --base_model=huggyllama/llama-7b"
        )
    export_gguf(base_model, lora_weights, output_file or None, outtype, dtype, model_name or None, overwrite)


if __name__ == "__main__":
    from alpaca.cli import run

    run(main, "export_gguf.py")
