"""Merge a LoRA adapter into a LLaMA base and write one GGUF file for llama.cpp.

    python export_gguf.py --base_model=huggyllama/llama-7b --lora_weights=./lora-alpaca \
        --output_file=./alpaca-lora-f16.gguf --outtype=f16
    python export_gguf.py ... --outtype=q4_0 --ollama       # quantized, with an Ollama Modelfile beside it
    python export_gguf.py ... --adapter_only --outtype=f16  # the LoRA as its own GGUF (+ the base in f16)

Written with the `gguf` package (maintained by llama.cpp) in the layout of llama.cpp's own
convert_hf_to_gguf.py: tensors, hyperparameters and the vocabulary (sentencepiece, or BPE with its merges
and llama.cpp's pre-tokenizer name) with special ids and the chat template. Arguments are checked before
anything is loaded; the file is written beside the target, read back and compared tensor by tensor with
the merged weights, and only then moved into place (so a failed --overwrite keeps the old file). A
quantized file is dequantized again and measured against the merged model (logit error, held-out loss);
it is refused when the quantization wiped out the adapter's update.
"""


def main(
    base_model: str = "",
    lora_weights: str = "tloen/alpaca-lora-7b",
    output_file: str = "",
    outtype: str = "f16",
    precision: str = "fp32",
    dtype: str = "",
    model_name: str = "",
    overwrite: bool = False,
    adapter_only: bool = False,
    ollama: bool = False,
    prompt_template: str = "",
):
    """Export the merged model as GGUF.

    Args:
        base_model: LLaMA base model folder, hub id or .gguf file; defaults to the BASE_MODEL environment variable.
        lora_weights: LoRA adapter folder or hub id.
        output_file: the .gguf file to write; default ./alpaca-lora-{outtype}.gguf.
        outtype: tensor type in the file: f32, f16 or bf16 (norms stay f32, as llama.cpp does); q8_0, q4_0,
            q4_1, q5_0 or q5_1 (quantized here, llama.cpp's block layouts); q4_k_m, q5_k_m or q6_k (made by
            llama.cpp's quantizer: needs llama-cpp-python). With --adapter_only: the base's type.
        precision: precision to merge in before conversion: fp32 (default), fp16 or bf16.
        dtype: older name of --precision, kept so that existing export commands run unchanged.
        model_name: general.name in the file; default derived from the base model's folder name.
        overwrite: replace an existing output_file (only once the new one has passed its checks).
        adapter_only: write the LoRA adapter as its own GGUF (llama.cpp's convert_lora_to_gguf.py layout),
            plus the base as `<name>.base-<outtype>.gguf` unless --base_model is a .gguf file.
        ollama: also write an Ollama Modelfile beside the GGUF (FROM/ADAPTER, TEMPLATE, stop, sampling).
        prompt_template: the prompt template the adapter was trained with, for the Modelfile's TEMPLATE and
            the held-out loss; default: the one the adapter's run_config.json names, else alpaca.
    """
    from alpaca.export import export_gguf, precision_or_alias
    from alpaca.modeling import require_base_model

    precision = precision_or_alias(precision, dtype, default="fp32")
    export_gguf(
        require_base_model(base_model),
        lora_weights,
        output_file or None,
        outtype,
        precision,
        model_name or None,
        overwrite,
        adapter_only=adapter_only,
        ollama=ollama,
        prompt_template=prompt_template,
    )


if __name__ == "__main__":
    from alpaca.cli import run

    run(main, "export_gguf.py")
