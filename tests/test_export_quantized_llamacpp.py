"""Opt-in: llama.cpp itself (llama-cpp-python) against the quantized exports and the adapter GGUF.

- q8_0, q4_0, q4_1, q5_0 and q5_1 written here equal, key by key and tensor by tensor (types and bytes),
  what llama.cpp's own quantizer (`llama_model_quantize`, i.e. llama-quantize) makes of our f32 export;
- every --outtype loads in llama.cpp, whose logits match transformers' on the file's dequantized weights;
- the K-quants are made by llama.cpp's quantizer and pass the self-check;
- the base GGUF plus the adapter GGUF, combined by llama.cpp, give the merged model's logits.

    pip install llama-cpp-python==0.3.36
    RUN_LLAMACPP=1 python -m pytest -m llamacpp tests/test_export_quantized_llamacpp.py
"""

import pytest
from helpers.export_fixtures import read_gguf

from alpaca.weights.export import GGUF_OUTTYPES, export_gguf, export_hf

pytestmark = pytest.mark.llamacpp  # opt-in: RUN_LLAMACPP=1 (tests/conftest.py)
PROMPTS = (
    "### Instruction:\nName a colour.\n\n### Response:\n",
    "The quick brown fox jumps over the lazy dog.",
)
# max |logit difference| allowed between llama.cpp and transformers on the same weights, relative to
# max(1, max |logit|): the summation order for f32; for f16/bf16/quantized matrices llama.cpp also rounds
# the activations (to f16, or to 8-bit blocks for the quantized dot products).
TOLERANCE = {"f32": 1e-3}
OTHER_TOLERANCE = 2e-2


@pytest.fixture(scope="module")
def f32_export(tiny_llama, tiny_llama_adapter, tmp_path_factory):
    path = tmp_path_factory.mktemp("lq") / "tiny-f32.gguf"
    export_gguf(tiny_llama, tiny_llama_adapter, str(path), outtype="f32")
    return path


def load_llama(path, **kwargs):
    """llama.cpp's model, loaded without its extra CPU buffer types (AMX, weight repacking): with them,
    llama-cpp-python 0.3.36 crashed (segmentation fault in decode) on every quantized file on this
    project's AMX-capable CPU, llama.cpp's own quantizations and the SmolLM2 Q4_1 file included; f32 and
    f16 files ran. llama-cpp-python's `Llama` does not expose the setting, so its default is wrapped."""
    import llama_cpp.llama_cpp as bindings
    from llama_cpp import Llama

    default = bindings.llama_model_default_params

    def params():
        model_params = default()
        model_params.use_extra_bufts = False
        return model_params

    bindings.llama_model_default_params = params
    try:
        settings = dict(n_ctx=256, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)
        return Llama(model_path=str(path), **{**settings, **kwargs})
    finally:
        bindings.llama_model_default_params = default


def llama_cpp_logits(path, token_ids, **kwargs):
    import numpy as np

    llm = load_llama(path, **kwargs)
    llm.eval(token_ids)
    return np.array(llm.scores[: llm.n_tokens])


@pytest.mark.parametrize("outtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_block_types_equal_llama_cpp_quantizer(outtype, tiny_llama, tiny_llama_adapter, f32_export, tmp_path):
    from helpers.export_fixtures import assert_same_tensors

    from alpaca.weights.export.quantize import llama_cpp_quantize

    ours = tmp_path / f"ours-{outtype}.gguf"
    export_gguf(tiny_llama, tiny_llama_adapter, str(ours), outtype=outtype)
    llama_cpp_quantize(f32_export, tmp_path / "ref.gguf", outtype)
    kv, tensors = read_gguf(ours)
    ref_kv, ref_tensors = read_gguf(tmp_path / "ref.gguf")
    assert kv == ref_kv
    assert_same_tensors(tensors, ref_tensors)


@pytest.mark.parametrize("outtype", GGUF_OUTTYPES)
def test_every_outtype_loads_in_llama_cpp(outtype, tiny_llama, tiny_llama_adapter, tmp_path, capsys):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca.weights.export.quantize import hf_weights, load_weights, read_gguf_arrays

    path = tmp_path / f"tiny-{outtype}.gguf"
    info = export_gguf(tiny_llama, tiny_llama_adapter, str(path), outtype=outtype)
    if outtype in ("q4_k_m", "q5_k_m", "q6_k"):
        assert f"self-check ({outtype})" in capsys.readouterr().out and info["quantization"]["closer"] > 0
        assert read_gguf(path)[0]["general.file_type"] == {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}[outtype]
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    arrays = {name: array for name, (array, _) in read_gguf_arrays(path).items()}
    load_weights(model, hf_weights(arrays, model))  # the file's values, dequantized
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        got = llama_cpp_logits(path, ids)
        worst = max(worst, float(np.abs(got - expected).max()) / max(1.0, float(np.abs(expected).max())))
    print(f"{outtype}: llama.cpp vs transformers on the file's weights: {worst:.3g} (relative)")
    assert worst <= TOLERANCE.get(outtype, OTHER_TOLERANCE)


def merged_reference(base, adapter, hf_dir, prompts):
    """Token ids and transformers' logits of the merged HF export for each prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_hf(base, adapter, str(hf_dir), dtype="fp32")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            out.append((ids, model(input_ids=torch.tensor([ids])).logits[0].numpy()))
    return out


def assert_adapter_gguf_gives_merged_logits(base, adapter, tmp_path, tolerance):
    import numpy as np

    out = tmp_path / "adapter.gguf"
    info = export_gguf(base, adapter, str(out), outtype="f32", adapter_only=True)
    worst = 0.0
    for ids, expected in merged_reference(base, adapter, tmp_path / "hf", PROMPTS):
        got = llama_cpp_logits(info["base_gguf"], ids, lora_path=str(out))
        worst = max(worst, float(np.abs(got - expected).max()) / max(1.0, float(np.abs(expected).max())))
        without = llama_cpp_logits(info["base_gguf"], ids)
        assert float(np.abs(without - expected).max()) > 10 * tolerance  # the adapter does matter
    print(f"base GGUF + adapter GGUF in llama.cpp vs the merged model: {worst:.3g} (relative)")
    assert worst <= tolerance


def test_base_plus_adapter_gguf_gives_the_merged_logits(tiny_llama, tiny_llama_adapter, tmp_path):
    assert_adapter_gguf_gives_merged_logits(tiny_llama, tiny_llama_adapter, tmp_path, TOLERANCE["f32"])


@pytest.mark.realmodel
def test_smollm2_base_plus_adapter_gguf_gives_the_merged_logits(smollm2, smollm2_adapter, tmp_path):
    assert_adapter_gguf_gives_merged_logits(smollm2, smollm2_adapter, tmp_path, TOLERANCE["f32"])


@pytest.mark.realmodel
@pytest.mark.parametrize("outtype", ["q8_0", "q4_0"])
def test_smollm2_block_types_equal_llama_cpp_quantizer(outtype, smollm2, smollm2_adapter, tmp_path):
    """Tied embeddings: token_embd is the output matrix too, Q8_0 here and in llama.cpp (576 columns)."""
    from helpers.export_fixtures import assert_same_tensors

    from alpaca.weights.export.quantize import llama_cpp_quantize

    export_gguf(smollm2, smollm2_adapter, str(tmp_path / "f32.gguf"), outtype="f32")
    export_gguf(smollm2, smollm2_adapter, str(tmp_path / "ours.gguf"), outtype=outtype)
    llama_cpp_quantize(tmp_path / "f32.gguf", tmp_path / "ref.gguf", outtype)
    kv, tensors = read_gguf(tmp_path / "ours.gguf")
    ref_kv, ref_tensors = read_gguf(tmp_path / "ref.gguf")
    assert kv == ref_kv
    assert_same_tensors(tensors, ref_tensors)
    assert tensors["token_embd.weight"][0] == "Q8_0"
