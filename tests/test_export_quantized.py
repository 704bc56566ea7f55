"""Quantized GGUF exports on the tiny LLaMA (untied embeddings, a 176-wide FFN): q8_0 and bf16 equal to
llama.cpp's convert_hf_to_gguf.py key by key and tensor by tensor; q4_0 ... q5_1 follow llama.cpp's
rules for which tensor gets which type, with the bytes of the gguf package's quantizers; the self-check
measures what quantization costs and refuses a file that wiped out the adapter's update; every refusal
comes before anything is written; a quantized file loads back as --base_model."""

from pathlib import Path

import pytest
from helpers.adapters import make_random_adapter
from helpers.export_fixtures import CONVERT_HF, assert_same_tensors, read_gguf, run_converter

from alpaca.weights.export import export_gguf, export_hf

BLOCK_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1")


@pytest.fixture(scope="module")
def hf_export(tiny_llama, tiny_llama_adapter, tmp_path_factory):
    """The merged fp32 HF export, in a folder named like the base (llama.cpp's naming reads it)."""
    out = tmp_path_factory.mktemp("q-hf") / Path(tiny_llama).name
    export_hf(tiny_llama, tiny_llama_adapter, str(out), dtype="fp32")
    return out


@pytest.fixture(scope="module")
def reference(hf_export, tmp_path_factory):
    """convert_hf_to_gguf.py of the HF export: {outtype: (keys, tensors)} for f32, q8_0 and bf16."""
    out = tmp_path_factory.mktemp("q-ref")
    files = {}
    for outtype in ("f32", "q8_0", "bf16"):
        run_converter(CONVERT_HF, hf_export, "--outfile", out / f"{outtype}.gguf", "--outtype", outtype)
        files[outtype] = read_gguf(out / f"{outtype}.gguf")
    return files


@pytest.mark.parametrize("outtype", ["q8_0", "bf16"])
def test_q8_0_and_bf16_equal_llama_cpp_conversion(
    outtype, tiny_llama, tiny_llama_adapter, reference, tmp_path
):
    out = tmp_path / f"ours-{outtype}.gguf"
    export_gguf(tiny_llama, tiny_llama_adapter, str(out), outtype=outtype)
    kv, tensors = read_gguf(out)
    ref_kv, ref_tensors = reference[outtype]
    assert kv == ref_kv
    assert_same_tensors(tensors, ref_tensors)
    qtype = outtype.upper()
    assert kv["general.file_type"] == {"q8_0": 7, "bf16": 32}[outtype]
    assert tensors["blk.0.attn_q.weight"][0] == tensors["output.weight"][0] == qtype
    assert tensors["blk.0.ffn_down.weight"][0] == ("F16" if outtype == "q8_0" else "BF16")  # 176 % 32
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"


@pytest.mark.parametrize("outtype", BLOCK_TYPES)
def test_block_types_follow_llama_cpp_rules_with_the_gguf_quantizers(
    outtype, tiny_llama, tiny_llama_adapter, reference, tmp_path, capsys
):
    """Every tensor in the type llama.cpp's rules give it, and its bytes are the gguf package's quantizer
    applied to llama.cpp's own f32 conversion of the merged model (so the q/k order is llama.cpp's)."""
    import gguf
    import numpy as np

    out = tmp_path / f"ours-{outtype}.gguf"
    info = export_gguf(tiny_llama, tiny_llama_adapter, str(out), outtype=outtype)
    kv, tensors = read_gguf(out)
    ref_kv, ref_f32 = reference["f32"]
    assert sorted(tensors) == sorted(ref_f32)
    differing = {key for key in set(kv) | set(ref_kv) if kv.get(key) != ref_kv.get(key)}
    assert differing == {"general.file_type"}
    assert kv["general.file_type"] == int(gguf.LlamaFileType[f"MOSTLY_{outtype.upper()}"])
    expected_types = {}
    for name, (_, data) in ref_f32.items():
        if data.ndim == 1:
            expected_types[name] = "F32"
        elif name == "output.weight":
            expected_types[name] = "Q8_0"  # llama.cpp: Q6_K, or Q8_0 for rows not a multiple of 256
        elif data.shape[-1] % 32:
            expected_types[name] = "F16"
        else:
            expected_types[name] = outtype.upper()
    assert {name: t[0] for name, t in tensors.items()} == expected_types
    assert expected_types["token_embd.weight"] == outtype.upper()  # untied: quantized like the rest
    assert expected_types["blk.1.ffn_down.weight"] == "F16"
    for name, (qtype, data) in tensors.items():
        quantized = gguf.quants.quantize(ref_f32[name][1], gguf.GGMLQuantizationType[qtype])
        assert np.array_equal(data, quantized), name
    printed = capsys.readouterr().out
    assert f"self-check ({outtype}): vs the merged fp32 model" in printed
    cost = info["quantization"]
    assert cost["closer"] > 0.5 and cost["kl_quantized"] < cost["kl_base"] and cost["effect_kept"] > 0.5
    assert cost["records"] == 8 and abs(cost["loss_quantized"] / cost["loss_merged"] - 1) < 0.01
    assert f"held-out loss on 8 records ({cost['tokens']} tokens)" in printed


def test_the_self_check_refuses_a_quantization_that_wipes_out_the_update(tiny_llama, tmp_path, capsys):
    """A small update (the random adapter's B times 1e-3: 0.003 logits) survives fp32 and q8_0 but sits
    under q4_0's noise: the q4_0 merged model is then no closer to the merged model than the base in
    q4_0 is; the export is refused and nothing is written."""
    small = make_random_adapter(tiny_llama, tmp_path / "small", b_scale=1e-3)
    export_gguf(tiny_llama, small, str(tmp_path / "small-q8_0.gguf"), outtype="q8_0")
    with pytest.raises(
        ValueError, match=r"q4_0 wipes out the adapter's update.*--outtype=q8_0 or f16 or f32"
    ):
        export_gguf(tiny_llama, small, str(tmp_path / "small-q4_0.gguf"), outtype="q4_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small", "small-q8_0.gguf"]
    printed = capsys.readouterr().out
    q8, q4 = (line for line in printed.splitlines() if line.startswith("self-check (q"))
    assert "self-check (q8_0)" in q8 and "self-check (q4_0)" in q4


def one_line_refusal(call, match: str) -> str:
    with pytest.raises(ValueError, match=match) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_refusals_are_one_line_before_anything_is_written(
    tiny_llama, tiny_opt, tiny_llama_adapter, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / "model.gguf")
    one_line_refusal(
        lambda: export_gguf(tiny_llama, tiny_llama_adapter, target, outtype="q3_k"), r"--outtype='q3_k'"
    )
    opt_adapter = make_random_adapter(tiny_opt, tmp_path / "opt-lora")
    one_line_refusal(
        lambda: export_gguf(tiny_opt, opt_adapter, target, outtype="q4_0", ollama=True),
        "writes LLaMA models only",
    )
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # as if llama-cpp-python were absent
    message = one_line_refusal(
        lambda: export_gguf(tiny_llama, tiny_llama_adapter, target, outtype="q4_k_m"), "K-quants"
    )
    assert "pip install llama-cpp-python==0.3.36" in message
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_a_quantized_export_loads_back_as_base_model(
    outtype, tiny_llama, tiny_llama_adapter, tmp_path, monkeypatch
):
    """The project's GGUF import (transformers dequantizes) gives back exactly the file's dequantized
    weights, and the merged model's logits within the quantization's own error."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca.modeling import resolve_base_model
    from alpaca.weights.export.quantize import hf_weights, read_gguf_arrays

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / f"tiny-{outtype}.gguf"
    info = export_gguf(tiny_llama, tiny_llama_adapter, str(path), outtype=outtype)
    folder, record = resolve_base_model(str(path))
    assert record["sha256"] and Path(folder).is_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    arrays = {name: array for name, (array, _) in read_gguf_arrays(path).items()}
    for name, tensor in hf_weights(arrays, model).items():
        assert torch.equal(model.get_parameter(name).detach(), tensor), name
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_q.weight"] == outtype.upper()
    merged = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    from peft import PeftModel

    merged = PeftModel.from_pretrained(merged, tiny_llama_adapter).merge_and_unload().eval()
    ids = AutoTokenizer.from_pretrained(folder)(
        "### Instruction:\nName a colour.", return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        diff = float((model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max())
    assert 0 < diff <= 2 * info["quantization"]["max_logit_error"] + 1e-4
