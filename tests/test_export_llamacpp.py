"""Opt-in: llama.cpp itself loads our GGUF export and llama.cpp's conversion of our Meta export, and its
logits match transformers' on the merged model.

Needs llama-cpp-python, which compiles llama.cpp on install (about 15 CPU-minutes):

    pip install llama-cpp-python==0.3.36
    PYTHON=.venv/bin/python scripts/fetch_llama_cpp_converters.sh
    RUN_LLAMACPP=1 python -m pytest -m llamacpp tests/test_export_llamacpp.py
"""

import pytest
from helpers.export_fixtures import CONVERT_LEGACY, run_converter

from alpaca.weights.export import export_gguf, export_hf, export_meta

pytestmark = pytest.mark.llamacpp  # opt-in: RUN_LLAMACPP=1 (tests/conftest.py)
PROMPTS = (
    "### Instruction:\nName a colour.\n\n### Response:",
    "The quick brown fox jumps over the lazy dog.",
)
# max |logit difference| allowed, relative to max(1, max |logit|): llama.cpp and torch sum in different
# orders (f32), and the f16 file rounds every weight matrix.
TOLERANCE = {"f32": 1e-3, "f16": 2e-2}


@pytest.fixture(scope="module")
def exports(tiny_llama, tiny_llama_adapter, tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    export_hf(tiny_llama, tiny_llama_adapter, str(root / "hf"), dtype="fp32")
    paths = {}
    for outtype in ("f32", "f16"):
        paths[f"gguf-{outtype}"] = root / f"ours-{outtype}.gguf"
        export_gguf(tiny_llama, tiny_llama_adapter, str(paths[f"gguf-{outtype}"]), outtype=outtype)
    export_meta(tiny_llama, tiny_llama_adapter, str(root / "meta"), dtype="fp32")
    paths["meta-f32"] = root / "legacy-f32.gguf"
    run_converter(CONVERT_LEGACY, root / "meta", "--outfile", paths["meta-f32"], "--outtype", "f32")
    return root / "hf", paths


def llama_cpp_logits(path, token_ids):
    """llama.cpp's logits at every position, and its own tokenization of the text."""
    import numpy as np

    try:
        from llama_cpp import Llama
    except ImportError as err:
        pytest.fail(f"RUN_LLAMACPP=1 but llama-cpp-python is not installed: {err}")
    llm = Llama(model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    llm.eval(token_ids)
    return np.array(llm.scores[: llm.n_tokens]), llm


@pytest.mark.parametrize("which", ["gguf-f32", "gguf-f16", "meta-f32"])
def test_llama_cpp_logits_match_transformers(which, exports):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir, paths = exports
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    worst = 0.0
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        got, llm = llama_cpp_logits(paths[which], ids)
        assert got.shape == expected.shape
        scale = max(1.0, float(np.abs(expected).max()))
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        assert diff <= TOLERANCE[which.split("-")[1]] * scale, (
            f"{which}: llama.cpp logits differ by {diff:.3g}"
        )
        if which.startswith("gguf"):  # our GGUF carries the full tokenizer: llama.cpp must tokenize alike
            assert llm.tokenize(prompt.encode(), add_bos=True, special=False) == ids
    print(f"{which}: max |logit difference| llama.cpp vs transformers = {worst:.3g}")


@pytest.mark.realmodel
@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_llama_cpp_reads_our_smollm2_gguf_with_transformers_logits(
    outtype, smollm2, smollm2_adapter, tmp_path
):
    """The real BPE model: llama.cpp loads our GGUF export of SmolLM2 + a trained adapter, tokenizes as
    transformers does, and gives its logits. An f32 KV cache (type_k=type_v=0) is used because llama.cpp's
    default f16 cache alone differs by about 1e-2 over 30 layers."""
    import numpy as np
    import torch
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export_hf(smollm2, smollm2_adapter, str(tmp_path / "hf"), dtype="fp32")
    path = tmp_path / f"smollm2-{outtype}.gguf"
    export_gguf(smollm2, smollm2_adapter, str(path), outtype=outtype)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    llm = Llama(
        model_path=str(path), n_ctx=256, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0
    )
    worst = 0.0
    for prompt in PROMPTS + ("Über café naïve — 東京 123,456.78 <|im_end|> tabs\tand  spaces",):
        ids = tokenizer(prompt).input_ids
        # transformers parses special tokens in text (<|im_end|> is id 2); llama.cpp does with special=True
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids, prompt
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: llm.n_tokens])
        scale = max(1.0, float(np.abs(expected).max()))
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff / scale)
    print(f"SmolLM2 {outtype}: max |logit difference| llama.cpp vs transformers = {worst:.3g} (relative)")
    assert worst <= TOLERANCE[outtype]
