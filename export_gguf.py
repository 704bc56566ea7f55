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

from alpaca.core.settings import flags_from
from alpaca.weights.settings import ExportGGUFConfig


@flags_from(ExportGGUFConfig)
def main(config: ExportGGUFConfig):
    """Export the merged model as GGUF."""
    from alpaca.modeling import require_base_model
    from alpaca.weights.export import export_gguf, precision_or_alias

    precision = precision_or_alias(config.precision, config.dtype, default="fp32")
    export_gguf(
        require_base_model(config.base_model),
        config.lora_weights,
        config.output_file or None,
        config.outtype,
        precision,
        config.model_name or None,
        config.overwrite,
        adapter_only=config.adapter_only,
        ollama=config.ollama,
        prompt_template=config.prompt_template,
    )


if __name__ == "__main__":
    from alpaca.core.cli import run

    run(main, "export_gguf.py")
