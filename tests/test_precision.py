"""bf16 on the CPU: autocast over fp32 weights where the CPU has native bf16, fp32 elsewhere."""

import json
from pathlib import Path

import pytest
import torch
from conftest import run_finetune_fast, write_sample_subset
from safetensors.torch import load_file

from alpaca.modeling import cpu_has_native_bf16

needs_native_bf16 = pytest.mark.skipif(
    not cpu_has_native_bf16(), reason="this CPU has no native bf16 (the fallback test covers it)"
)


@pytest.fixture(scope="module")
def sample16(tmp_path_factory):
    return write_sample_subset(tmp_path_factory.mktemp("precision") / "data.json", 16)


@needs_native_bf16
def test_cpu_bf16_trains_with_autocast_and_keeps_fp32_weights(tiny_llama, sample16, tmp_path):
    fp32 = run_finetune_fast(tiny_llama, sample16, tmp_path / "fp32", max_steps=6, precision="fp32")
    bf16 = run_finetune_fast(tiny_llama, sample16, tmp_path / "bf16", max_steps=6, precision="bf16")
    config = json.loads((tmp_path / "bf16" / "run_config.json").read_text())
    assert config["precision_resolved"] == "bf16"
    adapter = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert adapter and all(t.dtype == torch.float32 for t in adapter.values())
    # the same run in bf16 autocast follows the fp32 run closely (bf16 has 8 bits of mantissa)
    assert bf16["train_loss"] == pytest.approx(fp32["train_loss"], rel=0.02)
    fp32_adapter = load_file(str(tmp_path / "fp32" / "adapter_model.safetensors"))
    differs = [k for k in adapter if not torch.equal(adapter[k], fp32_adapter[k])]
    assert differs, "bf16 autocast changed nothing: it did not run"


def test_cpu_bf16_falls_back_to_fp32_without_native_support(
    tiny_llama, sample16, tmp_path, monkeypatch, capsys
):
    import alpaca.modeling

    monkeypatch.setattr(alpaca.modeling, "cpu_has_native_bf16", lambda: False)
    run_finetune_fast(tiny_llama, sample16, tmp_path / "out", max_steps=1, precision="bf16")
    assert "no native bf16" in capsys.readouterr().out
    config = json.loads((Path(tmp_path) / "out" / "run_config.json").read_text())
    assert config["precision_resolved"] == "fp32"
