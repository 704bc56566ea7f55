"""The flags of the exports (`export_hf_checkpoint.py`, `export_state_dict_checkpoint.py`,
`export_gguf.py`) and of `weight_diff.py`'s commands: one table per command, each field a flag with
its default and help line. The scripts' signatures and `--help` are built from these tables by
`@flags_from` (alpaca/core/settings.py explains how to add a flag). Importing this module loads no torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from alpaca.core.settings import REQUIRED, setting
from alpaca.weights.files import DEFAULT_MAX_SHARD_SIZE

PRECISION_ALIAS_HELP = "older name of --precision, kept so that existing export commands run unchanged."
OVERWRITE_FOLDER_HELP = (
    "replace an existing non-empty output_dir (only once the new export has passed its checks)."
)
MERGE_PRECISION_HELP = (
    "precision to merge and save in: base (default: the base model's own, from its config.json), fp32, "
    "fp16 (upstream's) or bf16. The self-check refuses a precision that rounds the adapter's update away."
)


@dataclass
class ExportHFConfig:
    """export_hf_checkpoint.py's flags."""

    base_model: str = setting(
        "",
        "base model folder, hub id or .gguf file; defaults to the BASE_MODEL environment variable (as "
        "upstream's scripts).",
    )
    lora_weights: str = setting("tloen/alpaca-lora-7b", "LoRA adapter folder or hub id.")
    output_dir: str = setting("./hf_ckpt", "folder to write; must be empty or absent unless --overwrite.")
    max_shard_size: str = setting("400MB", 'largest safetensors shard, e.g. "400MB", "5GB".')
    precision: str = setting("base", MERGE_PRECISION_HELP)
    dtype: str = setting("", PRECISION_ALIAS_HELP)
    overwrite: bool = setting(False, OVERWRITE_FOLDER_HELP)


@dataclass
class ExportMetaConfig:
    """export_state_dict_checkpoint.py's flags."""

    base_model: str = setting(
        "",
        "LLaMA base model folder, hub id or .gguf file; defaults to the BASE_MODEL environment variable.",
    )
    lora_weights: str = setting("tloen/alpaca-lora-7b", "LoRA adapter folder or hub id.")
    output_dir: str = setting("./ckpt", "folder to write; must be empty or absent unless --overwrite.")
    precision: str = setting("base", MERGE_PRECISION_HELP)
    dtype: str = setting("", PRECISION_ALIAS_HELP)
    overwrite: bool = setting(False, OVERWRITE_FOLDER_HELP)


@dataclass
class ExportGGUFConfig:
    """export_gguf.py's flags."""

    base_model: str = setting(
        "",
        "LLaMA base model folder, hub id or .gguf file; defaults to the BASE_MODEL environment variable.",
    )
    lora_weights: str = setting("tloen/alpaca-lora-7b", "LoRA adapter folder or hub id.")
    output_file: str = setting("", "the .gguf file to write; default ./alpaca-lora-{outtype}.gguf.")
    outtype: str = setting(
        "f16",
        "tensor type in the file: f32, f16 or bf16 (norms stay f32, as llama.cpp does); q8_0, q4_0, q4_1, "
        "q5_0 or q5_1 (quantized here, llama.cpp's block layouts); q4_k_m, q5_k_m or q6_k (made by "
        "llama.cpp's quantizer: needs llama-cpp-python). With --adapter_only: the base's type.",
    )
    precision: str = setting("fp32", "precision to merge in before conversion: fp32 (default), fp16 or bf16.")
    dtype: str = setting("", PRECISION_ALIAS_HELP)
    model_name: str = setting(
        "", "general.name in the file; default derived from the base model's folder name."
    )
    overwrite: bool = setting(
        False, "replace an existing output_file (only once the new one has passed its checks)."
    )
    adapter_only: bool = setting(
        False,
        "write the LoRA adapter as its own GGUF (llama.cpp's convert_lora_to_gguf.py layout), plus the "
        "base as `<name>.base-<outtype>.gguf` unless --base_model is a .gguf file.",
    )
    ollama: bool = setting(
        False,
        "also write an Ollama Modelfile beside the GGUF (FROM/ADAPTER, a TEMPLATE rendering the trained "
        "format, stop, sampling).",
    )
    prompt_template: str = setting(
        "",
        "the Alpaca prompt template an adapter without training_format.json was trained with, for the "
        "Modelfile's TEMPLATE and the held-out loss; default: its run_config.json's, else alpaca.",
    )


DEVICE_HELP = "where to do the arithmetic (cpu, cuda, ...)."
SHARD_HELP = "largest safetensors file to write (5GB, 500MB, ...); save_pretrained's default."


@dataclass
class MakeDiffConfig:
    """weight_diff.py make_diff's flags."""

    path_raw: str = setting(REQUIRED, "the raw (base) model folder, hub id or .gguf file.")
    path_tuned: str = setting(REQUIRED, "the fine-tuned model folder.")
    path_diff: str = setting(
        REQUIRED, "folder to write the diff into; must be empty or absent unless --overwrite."
    )
    device: str = setting("cpu", DEVICE_HELP)
    overwrite: bool = setting(
        False, "replace an existing non-empty path_diff (only once the new diff is complete)."
    )
    max_shard_size: str = setting(DEFAULT_MAX_SHARD_SIZE, SHARD_HELP)


@dataclass
class RecoverConfig:
    """weight_diff.py recover's flags."""

    path_raw: str = setting(
        REQUIRED, "the raw (base) model folder, hub id or .gguf file the diff was made against."
    )
    path_diff: str = setting(REQUIRED, "the weight diff folder.")
    path_tuned: str = setting(
        "", "folder to save the recovered model and tokenizer into (optional, as upstream)."
    )
    device: str = setting("cpu", DEVICE_HELP)
    test_inference: bool = setting(
        True, "generate from a fixed instruction afterwards (in --prompt_template) and print it."
    )
    check_integrity_naively: bool = setting(
        True,
        "also check the sum of all parameters against the sum recorded in the diff, or Alpaca-7B's "
        "50637.1836 for diffs that record none (upstream's check).",
    )
    overwrite: bool = setting(
        False,
        "replace an existing non-empty path_tuned (only once the recovered model has passed its checks).",
    )
    prompt_template: str = setting(
        "alpaca_legacy",
        "the template of the smoke-test prompt: alpaca_legacy (Stanford's training prompt), alpaca, or a "
        "template file.",
    )
    max_shard_size: str = setting(DEFAULT_MAX_SHARD_SIZE, SHARD_HELP)


@dataclass
class VerifyConfig:
    """weight_diff.py verify's flags."""

    path_tuned: str = setting(
        REQUIRED, "the recovered model folder (recover writes weight_diff_integrity.json into it)."
    )
    integrity_file: str = setting(
        "",
        "the integrity record to check against; default PATH_TUNED/weight_diff_integrity.json.",
    )
    device: str = setting("cpu", "where to load the model (cpu, cuda, ...).")
