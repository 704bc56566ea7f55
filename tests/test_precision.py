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


# Generation ---------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def _batch_input(tmp_path) -> str:
    records = [
        {"instruction": "Name a colour.", "input": ""},
        {"instruction": "Add 2 and 3.", "input": "2, 3"},
    ]
    path = tmp_path / "in.json"
    path.write_text(json.dumps(records))
    return str(path)


@needs_native_bf16
def test_generate_py_bf16_on_a_native_bf16_cpu_loads_bf16_and_says_so(
    tiny_llama, tiny_llama_adapter, tmp_path, monkeypatch, capsys
):
    import sys

    sys.path.insert(0, str(REPO))
    import generate

    output_file = tmp_path / "out.json"
    generate.main(
        base_model=tiny_llama,
        lora_weights=tiny_llama_adapter,
        input_file=_batch_input(tmp_path),
        output_file=str(output_file),
        precision="bf16",
        temperature=0,
        num_beams=1,
        max_new_tokens=8,
    )
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{") : out.index("\n}\n") + 2])
    assert report["dtype"] == "torch.bfloat16"
    assert report["precision"].startswith("bf16 weights") and "native bf16" in report["precision"]
    written = json.loads(output_file.read_text())
    assert len(written) == 2 and all(isinstance(r["output"], str) for r in written)
    config = json.loads(output_file.with_suffix(".config.json").read_text())
    assert config["precision"] == report["precision"]


def test_generation_bf16_falls_back_to_fp32_without_native_support(tiny_llama, monkeypatch, capsys):
    import alpaca.modeling
    from alpaca.inference.decoding import DecodingSettings
    from alpaca.inference.loading import describe, load_generators

    monkeypatch.setattr(alpaca.modeling, "cpu_has_native_bf16", lambda: False)
    (generator,) = load_generators(tiny_llama, lora_weights="", precision="bf16")
    assert generator.model.dtype == torch.float32
    assert "no native bf16" in capsys.readouterr().err
    settings = DecodingSettings(temperature=0, num_beams=1, max_new_tokens=4)
    report = describe([generator], settings, generator.limits)
    assert report["dtype"] == "torch.float32"
    assert (
        report["precision"].startswith("warning: fp32")
        and generator.source["precision"] == report["precision"]
    )
    assert isinstance(generator.generate("Name a colour.", None, settings), str)


def test_generation_precision_auto_stays_fp32_on_the_cpu(tiny_llama):
    from alpaca.inference.loading import load_generators

    (generator,) = load_generators(tiny_llama, lora_weights="")
    assert generator.model.dtype == torch.float32
    assert generator.source["precision"] == "fp32 (--precision=auto on cpu)"


@pytest.mark.realmodel
@needs_native_bf16
def test_realmodel_adapter_trained_in_bf16_merges_in_fp32(smollm2, tmp_path):
    """A bf16-autocast run on SmolLM2 saves an fp32 adapter that export_hf_checkpoint.py merges in fp32;
    the export's own self-check (merged logits equal the adapter model's) must pass."""
    import sys

    sys.path.insert(0, str(REPO))
    import export_hf_checkpoint

    data = write_sample_subset(tmp_path / "data.json", 8)
    lora = tmp_path / "lora"
    options = dict(batch_size=2, micro_batch_size=2, cutoff_len=96, learning_rate=2e-3, max_steps=3)
    run_finetune_fast(smollm2, data, lora, precision="bf16", **options)
    assert json.loads((lora / "run_config.json").read_text())["precision_resolved"] == "bf16"
    adapter = load_file(str(lora / "adapter_model.safetensors"))
    assert all(t.dtype == torch.float32 for t in adapter.values())
    merged = tmp_path / "merged"
    export_hf_checkpoint.main(
        base_model=smollm2, lora_weights=str(lora), output_dir=str(merged), dtype="fp32"
    )
    weights = {}
    for shard in merged.glob("*.safetensors"):
        weights.update(load_file(str(shard)))
    assert weights and all(t.dtype == torch.float32 for t in weights.values())
    base = {}
    for shard in Path(smollm2).glob("*.safetensors"):
        base.update(load_file(str(shard)))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[name], base[name]), "the adapter's update is missing from the merge"
