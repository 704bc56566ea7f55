"""Shared test setup: offline, single-threaded torch, tiny models built once per session."""

import os

# Set before torch / transformers are imported anywhere in the test session.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """Folder of a tiny random LlamaForCausalLM with its locally trained tokenizer."""
    from alpaca.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", arch="llama"))


@pytest.fixture(scope="session")
def tiny_opt(tmp_path_factory):
    """Folder of a tiny random OPTForCausalLM with the same tokenizer."""
    from alpaca.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "opt", arch="opt"))


def make_random_adapter(base_model: str, output_dir, target_modules=("q_proj", "v_proj"), seed: int = 1):
    """Save a LoRA adapter with random, non-zero A and B, so it visibly changes the model."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(output_dir))
    return str(output_dir)


@pytest.fixture(scope="session")
def tiny_llama_adapter(tiny_llama, tmp_path_factory):
    """A random-but-non-zero LoRA adapter (q_proj, v_proj) for the tiny LLaMA."""
    return make_random_adapter(tiny_llama, tmp_path_factory.mktemp("adapter") / "lora")
