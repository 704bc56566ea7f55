"""`export_gguf.py --adapter_only` on the tiny LLaMA: the LoRA adapter as llama.cpp's own
convert_lora_to_gguf.py writes it (keys and tensors equal), the base written beside it, and the adapters
that llama.cpp's format cannot hold refused before anything is written."""

import json
from pathlib import Path

import pytest
from helpers.adapters import make_random_adapter
from helpers.export_fixtures import CONVERT_LORA, assert_same_tensors, read_gguf, run_converter

from alpaca.weights.export import export_gguf


@pytest.mark.parametrize(
    "targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")]
)
def test_adapter_gguf_equals_llama_cpp_lora_converter(targets, tiny_llama, tmp_path, capsys):
    """Keys and tensors equal to convert_lora_to_gguf.py's (f32, its default); k_proj's lora_b goes
    through llama.cpp's grouped-query permute and down_proj's A through the 176-wide input."""
    adapter = make_random_adapter(tiny_llama, tmp_path / "lora", target_modules=targets)
    out = tmp_path / "out" / "adapter.gguf"
    info = export_gguf(tiny_llama, adapter, str(out), outtype="f16", adapter_only=True)
    run_converter(CONVERT_LORA, "--base", tiny_llama, "--outfile", tmp_path / "ref.gguf", adapter)
    kv, tensors = read_gguf(out)
    ref_kv, ref_tensors = read_gguf(tmp_path / "ref.gguf")
    assert kv == ref_kv
    assert_same_tensors(tensors, ref_tensors)
    assert (kv["general.type"], kv["adapter.type"], kv["adapter.lora.alpha"]) == ("adapter", "lora", 16.0)
    assert len(tensors) == 2 * 2 * len(targets) and tensors["blk.0.attn_q.weight.lora_a"][1].shape == (8, 64)
    # The base is written beside it, in --outtype, by the merged export's writer (an f16 GGUF of the base).
    base_kv, base_tensors = read_gguf(out.parent / "adapter.base-f16.gguf")
    assert base_kv["general.file_type"] == 1 and base_tensors["blk.0.attn_q.weight"][0] == "F16"
    assert info["base_gguf"] == str(out.parent / "adapter.base-f16.gguf")
    assert info["max_logit_diff_rebuilt"] <= 1e-4 < info["adapter_effect"]
    assert "base + adapter GGUF vs adapter model" in capsys.readouterr().out


def test_rslora_alpha_is_rescaled_for_llama_cpp(tiny_llama, tmp_path):
    """llama.cpp scales by alpha / rank; rsLoRA by alpha / sqrt(rank): the file carries the alpha that
    gives rsLoRA's scale, and the self-check (W + alpha / rank * B A from the file) holds."""
    adapter = Path(make_random_adapter(tiny_llama, tmp_path / "lora"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, use_rslora=True)))
    info = export_gguf(tiny_llama, str(adapter), str(tmp_path / "a.gguf"), outtype="f32", adapter_only=True)
    assert info["lora_alpha"] == pytest.approx(16 * 8**0.5)
    assert read_gguf(tmp_path / "a.gguf")[0]["adapter.lora.alpha"] == pytest.approx(16 * 8**0.5)


def test_a_gguf_base_is_used_as_it_is(tiny_llama, tiny_llama_adapter, tmp_path, monkeypatch):
    """With --base_model=FILE.gguf nothing but the adapter is written, and the Modelfile's FROM is that
    file; the adapter is the same as from the HF folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = tmp_path / "first" / "a.gguf"
    export_gguf(tiny_llama, tiny_llama_adapter, str(first), outtype="f32", adapter_only=True)
    base_gguf = first.parent / "a.base-f32.gguf"
    out = tmp_path / "out" / "a.gguf"
    info = export_gguf(str(base_gguf), tiny_llama_adapter, str(out), adapter_only=True, ollama=True)
    assert info["base_gguf"] == str(base_gguf.resolve())
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "a.gguf"]
    modelfile = (out.parent / "Modelfile").read_text()
    assert f"\nFROM {base_gguf.resolve()}\nADAPTER ./a.gguf\n" in modelfile
    assert_same_tensors(read_gguf(out)[1], read_gguf(first)[1])


def test_adapters_llama_cpp_cannot_hold_are_refused_before_anything_is_written(tiny_llama, tmp_path):
    out = tmp_path / "out"
    adapter = Path(make_random_adapter(tiny_llama, tmp_path / "dora"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(ValueError, match=r"^--adapter_only: .*DoRA.*export the merged model") as caught:
        export_gguf(tiny_llama, str(adapter), str(out / "a.gguf"), adapter_only=True)
    assert "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="--outtype=q4_k_m with --adapter_only"):
        export_gguf(tiny_llama, str(adapter), str(out / "a.gguf"), outtype="q4_k_m", adapter_only=True)
    assert not out.exists()
