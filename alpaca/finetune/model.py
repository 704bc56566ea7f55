"""Model preparation for fine-tuning: precision, tokenizer and base model, LoRA adapters."""

from __future__ import annotations

import os

from alpaca.core.log import log
from alpaca.finetune.distributed import cuda_available
from alpaca.finetune.settings import FinetuneConfig


def training_precision(config: FinetuneConfig) -> tuple[str, object]:
    """The precision to train in (`bf16`, `fp16`, `fp32`) and the dtype to load the base in.

    On the CPU `auto` is fp32. An explicit bf16 runs as bf16 autocast over fp32 weights when the CPU
    has native bf16 instructions, and falls back to fp32 with a warning where it would be emulated;
    fp16 falls back to fp32 on the CPU.
    """
    import torch

    from alpaca.modeling import pick_device

    device = pick_device()
    wanted = config.precision
    for flag in ("bf16", "fp16"):
        if config.extra_training_args.pop(flag, False) in (True, "True", "true", 1):
            wanted = flag
    if device != "cuda":
        config.extra_training_args.pop("tf32", None)  # TF32 is a CUDA setting; the Trainer raises elsewhere
    if wanted == "auto":
        if device == "cuda":
            wanted = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            wanted = "fp32"
    if wanted == "bf16" and device == "cpu":
        from alpaca.modeling import cpu_has_native_bf16

        if cpu_has_native_bf16():
            # bf16 autocast over fp32 weights: measured 2.1-2.4x fp32 on an avx512_bf16 CPU, same loss
            # to 2-4 decimals; the adapter and optimizer stay fp32.
            log("precision: bf16 autocast on the CPU (native bf16 instructions found); weights stay fp32")
            return "bf16", torch.float32
        log(
            "warning: this CPU has no native bf16 (avx512_bf16, AMX or Arm BF16), so bf16 would be emulated and slow; training in fp32"
        )
        wanted = "fp32"
    if wanted in ("bf16", "fp16") and device != "cuda":
        log(
            f"warning: --{wanted} needs a CUDA GPU (or, for bf16, a CPU with native bf16); training in fp32 on {device}"
        )
        wanted = "fp32"
    if wanted == "bf16" and not torch.cuda.is_bf16_supported():
        log("warning: this GPU has no bf16; training in fp16")
        wanted = "fp16"
    # LoRA keeps the frozen base in half precision to save memory; full fine-tuning keeps fp32
    # master weights and lets AMP cast.
    if config.use_lora and wanted == "bf16":
        dtype = torch.bfloat16
    elif config.use_lora and wanted == "fp16":
        dtype = torch.float16
    else:
        dtype = torch.float32
    return wanted, dtype


def add_lora(model, config: FinetuneConfig, new_token_ids: list[int] | None = None):
    """Wrap the model with LoRA adapters (after k-bit preparation for quantized bases).

    `new_token_ids` (tokens added for the chat format) get trainable embedding rows, input and output
    (peft's trainable tokens; a tied output follows the input), so the model can learn to read and
    write them; the rest of the embeddings stays frozen."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from alpaca.modeling import check_target_modules

    check_target_modules(model, config.lora_target_modules)
    if config.load_in_8bit or config.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    lora_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        target_modules=config.lora_target_modules,
        lora_dropout=config.lora_dropout,
        bias="none",
        task_type="CAUSAL_LM",
        trainable_token_indices=new_token_indices(model, new_token_ids) if new_token_ids else None,
    )
    return get_peft_model(model, lora_config)


def new_token_indices(model, ids: list[int]) -> dict[str, list[int]]:
    """peft's `trainable_token_indices` for new tokens: the input embedding, and the output layer too
    when it is not tied to it."""
    names = {module: name for name, module in model.named_modules()}
    indices = {names[model.get_input_embeddings()].rsplit(".", 1)[-1]: list(ids)}
    output = model.get_output_embeddings()
    tied = output is None or output.weight is model.get_input_embeddings().weight
    if not tied:
        indices[names[output].rsplit(".", 1)[-1]] = list(ids)
    return indices


def prepare_tokenizer_and_model(config: FinetuneConfig, dtype):
    """Load tokenizer and base model; give the tokenizer a pad token that is not EOS; add LoRA."""
    from alpaca.modeling import (
        add_missing_special_tokens,
        load_base_model,
        load_tokenizer,
        resize_embeddings_for_new_tokens,
    )

    tokenizer = load_tokenizer(
        config.base_model,
        padding_side="right",
        trust_remote_code=config.trust_remote_code,
        add_pad_token=not config.use_lora,
    )
    device_map = None
    if (config.load_in_8bit or config.load_in_4bit) and cuda_available():
        device_map = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    model = load_base_model(
        config.base_model,
        load_in_8bit=config.load_in_8bit,
        load_in_4bit=config.load_in_4bit,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=config.trust_remote_code,
    )
    from alpaca.core.chat import chat_special_tokens

    add_missing_special_tokens(tokenizer)
    chat_tokens = chat_special_tokens(config.chat_template, tokenizer)
    if chat_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": chat_tokens})
        log(f"added the chat format's tokens {chat_tokens} (new embedding rows, trained)")
    resize_embeddings_for_new_tokens(model, tokenizer)  # no-op unless the tokenizer outgrew the embeddings
    model.config.pad_token_id = tokenizer.pad_token_id
    # Training never reads a KV cache; building one wastes memory (upstream set this too).
    model.config.use_cache = False
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if config.use_lora:
        model = add_lora(model, config, tokenizer.convert_tokens_to_ids(chat_tokens))
    return tokenizer, model
