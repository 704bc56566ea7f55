"""Exports of a LoRA fine-tune as one shippable model, each checked before it is called done.

`core` holds what every export shares (input checks, the merge and its self-checks); `hf`, `meta` and
`gguf` hold one writer each.

- `export_hf`: the adapter merged into the base, saved as safetensors shards with the tokenizer and the
  generation config; the saved folder is reloaded and its logits compared with the adapter model's.
- `export_meta`: Meta's `consolidated.00.pth` + `params.json` + the tokenizer (`tokenizer.model`, or the
  `tokenizer.json` of a BPE model) in the layout of the original LLaMA release, read by llama.cpp's legacy
  converter; q/k are un-permuted from the HF rotary layout and the result is permuted back and compared.
- `export_gguf` (`gguf_export`; the writer is `gguf`): a GGUF file for llama.cpp written with the `gguf`
  package (llama.cpp's own), laid out as
  llama.cpp's `convert_hf_to_gguf.py` lays out a LLaMA, sentencepiece or BPE vocabulary; it is read back
  and compared tensor by tensor. Quantized types follow llama.cpp's per-tensor rules (`quantize`); a
  quantized file is dequantized and measured against the merged model (`gguf_quantized`). The LoRA
  adapter can be its own GGUF (`gguf_adapter`), and an Ollama Modelfile can go beside the file
  (`ollama`): its TEMPLATE renders the adapter's recorded training format (`prompt_format`), a chat
  template probed into Ollama's form (`ollama_chat`) and checked with a renderer of the Go-template
  subset and of Ollama's filling (`go_template`).

Every export checks all its arguments and inputs first, then merges, then checks that the merged model's
logits equal the adapter model's, measured against the adapter's own effect on the logits (so an update
that the export precision rounds away is an error), and that every adapted layer really changed (a merge
that silently does nothing is upstream's old bug). Files are written to a temporary sibling and moved
into place only after the checks pass: a failed export leaves no partial output and keeps an old one.
"""

from alpaca.weights.export.core import (
    LOGIT_TOLERANCE,
    MAX_EFFECT_LOST,
    ExportInputs,
    MergedModel,
    load_and_merge,
    precision_or_alias,
    resolve_export_inputs,
)
from alpaca.weights.export.gguf_export import export_gguf
from alpaca.weights.export.hf import export_hf
from alpaca.weights.export.meta import export_meta, meta_ffn_params, meta_params
from alpaca.weights.export.quantize import GGUF_OUTTYPES

__all__ = [
    "GGUF_OUTTYPES",
    "LOGIT_TOLERANCE",
    "MAX_EFFECT_LOST",
    "ExportInputs",
    "MergedModel",
    "export_gguf",
    "export_hf",
    "export_meta",
    "load_and_merge",
    "meta_ffn_params",
    "meta_params",
    "precision_or_alias",
    "resolve_export_inputs",
]
