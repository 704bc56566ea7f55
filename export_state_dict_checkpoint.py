"""Merge a LoRA adapter into a LLaMA base and write Meta's original checkpoint layout.

    python export_state_dict_checkpoint.py --base_model=huggyllama/llama-7b --lora_weights=./lora-alpaca \
        --output_dir=./ckpt

Writes `consolidated.00.pth` (Meta's tensor names, q/k un-permuted from the HF rotary layout),
`params.json` derived from the model's config, and the tokenizer: `tokenizer.model` for sentencepiece
models, the `tokenizer.json` files for BPE models (Llama 3, SmolLM): the input of llama.cpp's
`examples/convert_legacy_llama.py` (`--vocab-type spm`, or `bpe` for byte-level BPE) and of Meta's
reference code. For current llama.cpp prefer export_gguf.py.
"""

from alpaca.core.settings import flags_from
from alpaca.weights.settings import ExportMetaConfig


@flags_from(ExportMetaConfig)
def main(config: ExportMetaConfig):
    """Export the merged model in Meta's consolidated.00.pth layout."""
    from alpaca.modeling import require_base_model
    from alpaca.weights.export import export_meta, precision_or_alias

    precision = precision_or_alias(config.precision, config.dtype, default="base")
    export_meta(
        require_base_model(config.base_model),
        config.lora_weights,
        config.output_dir,
        precision,
        config.overwrite,
    )


if __name__ == "__main__":
    from alpaca.core.cli import run

    run(main, "export_state_dict_checkpoint.py")
