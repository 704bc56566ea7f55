"""Exports on the tiny LLaMA: merged HF checkpoint, Meta layout, GGUF, each checked against an independent
computation (peft's own adapter model, transformers' Meta->HF permute, llama.cpp's converters)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.adapters import make_random_adapter
from helpers.export_fixtures import (
    CONVERT_HF,
    CONVERT_LEGACY,
    LEGACY_HEADER_KEYS,
    assert_same_header,
    assert_same_tensors,
    read_gguf,
    run_converter,
    snapshot,
)

from alpaca.weights.export import export_gguf, export_hf, export_meta, meta_ffn_params, meta_params

REPO = Path(__file__).resolve().parent.parent
PROMPT = "### Instruction:\nName a colour.\n\n### Response:"


@pytest.fixture(scope="module")
def hf_fp32(tiny_llama, tiny_llama_adapter, tmp_path_factory):
    """fp32 HF export, in a folder named like the base model (so llama.cpp's naming sees the same name)."""
    out = tmp_path_factory.mktemp("hf_fp32") / Path(tiny_llama).name
    info = export_hf(tiny_llama, tiny_llama_adapter, str(out), max_shard_size="200KB", dtype="fp32")
    return out, info


@pytest.fixture(scope="module")
def reference_gguf(hf_fp32, tmp_path_factory):
    """llama.cpp's convert_hf_to_gguf.py applied to our HF export: {outtype: path}."""
    out = tmp_path_factory.mktemp("ref_gguf")
    paths = {}
    for outtype in ("f32", "f16"):
        paths[outtype] = out / f"ref-{outtype}.gguf"
        run_converter(CONVERT_HF, hf_fp32[0], "--outfile", paths[outtype], "--outtype", outtype)
    return paths


@pytest.fixture(scope="module")
def meta_fp32(tiny_llama, tiny_llama_adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("meta") / "ckpt"
    info = export_meta(tiny_llama, tiny_llama_adapter, str(out), dtype="fp32")
    return out, info


def adapter_logits(base, adapter, dtype):
    """Logits of peft's unmerged adapter model: the ground truth a merged export must reproduce."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base)(PROMPT, return_tensors="pt").input_ids
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), adapter).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float(), ids


def test_hf_export_writes_a_complete_folder_whose_logits_match_the_adapter(
    hf_fp32, tiny_llama, tiny_llama_adapter
):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, info = hf_fp32
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "export_info.json").read_text())["adapted_weights"] == 4  # q, v in 2 layers
    assert (
        AutoTokenizer.from_pretrained(out)(PROMPT).input_ids
        == AutoTokenizer.from_pretrained(tiny_llama)(PROMPT).input_ids
    )

    expected, ids = adapter_logits(tiny_llama, tiny_llama_adapter, torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        got = merged(input_ids=ids).logits
    assert (got - expected).abs().max() < 1e-4
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    # the adapter's targets changed, everything else is the base, bit for bit
    saved = {}
    for shard in shards:
        saved.update(load_file(shard))
    for name, tensor in base.state_dict().items():
        changed = not torch.equal(saved[name], tensor)
        assert changed == (name.endswith(("q_proj.weight", "v_proj.weight"))), name


def test_hf_export_fp16_keeps_the_precision(tiny_llama, tiny_llama_adapter, tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf16"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="--overwrite"):
        export_hf(tiny_llama, tiny_llama_adapter, str(out), dtype="fp16")
    info = export_hf(tiny_llama, tiny_llama_adapter, str(out), dtype="fp16", overwrite=True)
    assert not (out / "old.txt").exists()
    assert "max |logit difference| saved model vs adapter model" in capsys.readouterr().out
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    expected, ids = adapter_logits(tiny_llama, tiny_llama_adapter, torch.float16)
    with torch.no_grad():
        got = model(input_ids=ids).logits.float()
    assert (got - expected).abs().max() == pytest.approx(info["max_logit_diff_saved"], abs=1e-2)
    assert 0 < info["max_logit_diff_saved"] < 1e-2


def test_hf_export_reads_base_model_from_environment(tiny_llama, tiny_llama_adapter, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setenv("BASE_MODEL", tiny_llama)
    import export_hf_checkpoint

    export_hf_checkpoint.main(
        lora_weights=tiny_llama_adapter, output_dir=str(tmp_path / "env"), precision="fp32"
    )
    assert json.loads((tmp_path / "env" / "export_info.json").read_text())["dtype"] == "fp32"
    # --dtype, the older name of --precision, still works; the two may not disagree
    export_hf_checkpoint.main(
        lora_weights=tiny_llama_adapter, output_dir=str(tmp_path / "alias"), dtype="fp16"
    )
    assert json.loads((tmp_path / "alias" / "export_info.json").read_text())["dtype"] == "fp16"
    with pytest.raises(ValueError, match="--precision='bf16' and --dtype='fp16' disagree"):
        export_hf_checkpoint.main(
            lora_weights=tiny_llama_adapter, output_dir=str(tmp_path / "x"), precision="bf16", dtype="fp16"
        )
    monkeypatch.delenv("BASE_MODEL")
    with pytest.raises(ValueError, match="BASE_MODEL"):
        export_hf_checkpoint.main(lora_weights=tiny_llama_adapter, output_dir=str(tmp_path / "env2"))


def test_a_merge_that_changes_nothing_is_an_error(tiny_llama, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    # peft's default init: B = 0, so the adapter is a no-op (an adapter that was never trained)
    config = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), config).save_pretrained(
        tmp_path / "zero"
    )
    with pytest.raises(ValueError, match=r"left model\.layers\.0\.self_attn\.q_proj\.weight unchanged"):
        export_hf(tiny_llama, str(tmp_path / "zero"), str(tmp_path / "out"), dtype="fp32")
    assert not (tmp_path / "out").exists()


def test_a_merge_with_wrong_logits_is_an_error(tiny_llama, tiny_llama_adapter, tmp_path, monkeypatch):
    import torch

    import alpaca.weights.export.core

    def bad_merge(peft_model):
        model = peft_model.merge_and_unload()
        with torch.no_grad():
            model.model.layers[1].mlp.up_proj.weight.mul_(3.0)
        return model

    monkeypatch.setattr(alpaca.weights.export.core, "merge_lora", bad_merge)
    with pytest.raises(ValueError, match="logits differ from the adapter model's"):
        export_hf(tiny_llama, tiny_llama_adapter, str(tmp_path / "out"), dtype="fp32")
    assert not (tmp_path / "out").exists()


def test_bad_inputs_are_named(tiny_llama, tiny_opt, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    out = str(tmp_path / "out")
    # an adapter trained on a LLaMA of another width: shapes do not match
    other = tmp_path / "other-llama"
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
    )
    LlamaForCausalLM(config).save_pretrained(other)
    wrong_shape = make_random_adapter(str(other), tmp_path / "wrong-shape")
    with pytest.raises(ValueError, match="does not fit the base model"):
        export_hf(tiny_llama, wrong_shape, out, dtype="fp32")
    # an adapter whose target modules (OPT's fc1/fc2) the base does not have
    wrong_targets = make_random_adapter(tiny_opt, tmp_path / "wrong-targets", target_modules=("fc1", "fc2"))
    with pytest.raises(ValueError, match="does not fit the base model"):
        export_hf(tiny_llama, wrong_targets, out, dtype="fp32")
    with pytest.raises(ValueError, match="--base_model=.*no such folder"):
        export_hf(str(tmp_path / "missing"), wrong_shape, out)
    with pytest.raises(ValueError, match="--lora_weights=.*no such folder"):
        export_hf(tiny_llama, str(tmp_path / "missing"), out)
    with pytest.raises(ValueError, match="--precision='int8'"):
        export_hf(tiny_llama, wrong_shape, out, dtype="int8")
    # Meta and GGUF layouts exist for LLaMA only
    opt_adapter = make_random_adapter(tiny_opt, tmp_path / "opt-lora")
    with pytest.raises(ValueError, match="LLaMA models only.*'opt' model"):
        export_meta(tiny_opt, opt_adapter, out)
    with pytest.raises(ValueError, match="LLaMA models only.*'opt' model"):
        export_gguf(tiny_opt, opt_adapter, str(tmp_path / "x.gguf"))
    assert not Path(out).exists()


def test_meta_export_layout_and_params(meta_fp32, hf_fp32):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out, info = meta_fp32
    config = AutoConfig.from_pretrained(hf_fp32[0])
    assert sorted(p.name for p in out.iterdir()) == [
        "consolidated.00.pth",
        "export_info.json",
        "params.json",
        "tokenizer.model",
    ]
    params = json.loads((out / "params.json").read_text())
    assert params == {
        "dim": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "multiple_of": 16,
        "norm_eps": 1e-6,
        "vocab_size": config.vocab_size,
        "rope_theta": 10000.0,
        "max_seq_len": 512,
    }
    state = torch.load(out / "consolidated.00.pth", weights_only=True)
    per_layer = [
        "attention.wq",
        "attention.wk",
        "attention.wv",
        "attention.wo",
        "feed_forward.w1",
        "feed_forward.w2",
        "feed_forward.w3",
        "attention_norm",
        "ffn_norm",
    ]
    expected = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected |= {f"layers.{i}.{name}.weight" for i in range(2) for name in per_layer}
    assert set(state) == expected
    assert state["layers.0.attention.wk.weight"].shape == (32, 64)  # GQA: 2 KV heads of 16

    # transformers' own Meta->HF permute (from its former conversion script) must give back HF's q/k
    def permute(w, n_heads, dim1, dim2=64):
        return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)

    hf = AutoModelForCausalLM.from_pretrained(hf_fp32[0], dtype=torch.float32).state_dict()
    for i in range(2):
        assert torch.equal(
            permute(state[f"layers.{i}.attention.wq.weight"], 4, 64),
            hf[f"model.layers.{i}.self_attn.q_proj.weight"],
        )
        assert torch.equal(
            permute(state[f"layers.{i}.attention.wk.weight"], 2, 32),
            hf[f"model.layers.{i}.self_attn.k_proj.weight"],
        )
        assert not torch.equal(
            state[f"layers.{i}.attention.wq.weight"], hf[f"model.layers.{i}.self_attn.q_proj.weight"]
        )
        assert torch.equal(
            state[f"layers.{i}.feed_forward.w2.weight"], hf[f"model.layers.{i}.mlp.down_proj.weight"]
        )
    assert torch.equal(state["output.weight"], hf["lm_head.weight"])


def test_meta_export_through_llama_cpp_legacy_converter(meta_fp32, reference_gguf, tmp_path):
    """llama.cpp's legacy converter reads our Meta export into exactly the tensors that its HF converter
    makes of our HF export: names, layout (q/k rotary order included) and values."""
    out = tmp_path / "legacy-f32.gguf"
    run_converter(CONVERT_LEGACY, meta_fp32[0], "--outfile", out, "--outtype", "f32")
    kv, tensors = read_gguf(out)
    ref_kv, ref_tensors = read_gguf(reference_gguf["f32"])
    assert_same_tensors(tensors, ref_tensors)
    assert_same_header(
        kv, ref_kv, (*LEGACY_HEADER_KEYS, "tokenizer.ggml.scores", "tokenizer.ggml.token_type")
    )


@pytest.mark.parametrize("outtype", ["f32", "f16"])
def test_gguf_export_equals_llama_cpp_conversion(
    outtype, tiny_llama, tiny_llama_adapter, reference_gguf, tmp_path
):
    """Our GGUF equals, key by key and tensor by tensor, what convert_hf_to_gguf.py makes of the HF export."""
    out = tmp_path / f"ours-{outtype}.gguf"
    info = export_gguf(tiny_llama, tiny_llama_adapter, str(out), outtype=outtype)
    assert info["tensors"] == 21
    kv, tensors = read_gguf(out)
    ref_kv, ref_tensors = read_gguf(reference_gguf[outtype])
    assert_same_header(kv, ref_kv)
    assert_same_tensors(tensors, ref_tensors)
    # and what llama.cpp needs is really there
    assert kv["general.architecture"] == "llama"
    assert kv["general.file_type"] == (1 if outtype == "f16" else 0)
    assert (
        kv["tokenizer.ggml.bos_token_id"],
        kv["tokenizer.ggml.eos_token_id"],
        kv["tokenizer.ggml.unknown_token_id"],
    ) == (1, 2, 0)
    assert kv["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"]
    assert tensors["blk.0.attn_q.weight"][0] == ("F16" if outtype == "f16" else "F32")
    assert tensors["blk.0.attn_norm.weight"][0] == "F32"


def test_gguf_export_refuses_to_overwrite_and_bad_outtype(tiny_llama, tiny_llama_adapter, tmp_path):
    existing = tmp_path / "model.gguf"
    existing.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="--output_file=.*--overwrite"):
        export_gguf(tiny_llama, tiny_llama_adapter, str(existing))
    with pytest.raises(ValueError, match="--outtype='q3_k'"):
        export_gguf(tiny_llama, tiny_llama_adapter, str(tmp_path / "m.gguf"), outtype="q3_k")
    assert existing.read_bytes() == b"GGUF"


def test_added_pad_token_travels_to_meta_and_gguf(tiny_llama, tmp_path):
    """An adapter trained with Alpaca's [PAD] (tokenizer saved with the adapter): the base is resized,
    and both llama.cpp layouts name the token instead of leaving a filler."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alpaca.modeling import resize_embeddings_for_new_tokens

    resized = tmp_path / "llama-pad"
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    resize_embeddings_for_new_tokens(model, tokenizer, 1)
    model.save_pretrained(resized)
    adapter = make_random_adapter(str(resized), tmp_path / "lora-pad")
    tokenizer.save_pretrained(adapter)
    pad_id = len(tokenizer) - 1

    meta = tmp_path / "meta"
    info = export_meta(tiny_llama, adapter, str(meta), dtype="fp32")
    assert info["added_tokens"] == {"[PAD]": pad_id}
    assert json.loads((meta / "added_tokens.json").read_text()) == {"[PAD]": pad_id}
    assert json.loads((meta / "params.json").read_text())["vocab_size"] == pad_id + 1
    gguf_path = tmp_path / "pad.gguf"
    export_gguf(tiny_llama, adapter, str(gguf_path), outtype="f32")
    kv, tensors = read_gguf(gguf_path)
    assert kv["tokenizer.ggml.tokens"][pad_id] == "[PAD]"
    assert kv["tokenizer.ggml.token_type"][pad_id] == 3  # control
    assert kv["tokenizer.ggml.padding_token_id"] == pad_id
    assert tensors["token_embd.weight"][1].shape == (pad_id + 1, 64)


def test_meta_params_for_real_llama_sizes():
    from types import SimpleNamespace

    def formula(dim, p):
        hidden = int(2 * 4 * dim / 3)
        if "ffn_dim_multiplier" in p:
            hidden = int(p["ffn_dim_multiplier"] * hidden)
        return p["multiple_of"] * -(-hidden // p["multiple_of"])

    assert meta_ffn_params(4096, 11008) == {"multiple_of": 256}  # LLaMA-7B
    assert meta_ffn_params(5120, 13824) == {"multiple_of": 256}  # LLaMA-13B
    for dim, ffn in ((8192, 28672), (4096, 14336), (64, 100), (6656, 17920)):
        assert formula(dim, meta_ffn_params(dim, ffn)) == ffn
    llama7b = SimpleNamespace(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        rms_norm_eps=1e-6,
        vocab_size=32000,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=2048,
    )
    assert meta_params(llama7b) == {
        "dim": 4096,
        "n_layers": 32,
        "n_heads": 32,
        "multiple_of": 256,
        "norm_eps": 1e-6,
        "vocab_size": 32000,
        "rope_theta": 10000.0,
        "max_seq_len": 2048,
    }


def test_scripts_show_typed_flags_and_import_nothing_heavy():
    for script, flags in (
        (
            "export_hf_checkpoint.py",
            ["--base_model", "--max_shard_size", "--precision", "--dtype", "--overwrite"],
        ),
        ("export_state_dict_checkpoint.py", ["--base_model", "--lora_weights", "--output_dir"]),
        (
            "export_gguf.py",
            [
                "--output_file",
                "--outtype",
                "--precision",
                "--model_name",
                "--adapter_only",
                "--ollama",
                "--prompt_template",
            ],
        ),
    ):
        result = subprocess.run(
            [sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        shown = result.stdout + result.stderr  # fire writes help to stderr when not on a terminal
        assert "Type: str" in shown and "Type: bool" in shown
        for flag in flags:
            assert flag in shown, (script, flag)
    probe = "import sys, export_hf_checkpoint, export_state_dict_checkpoint, export_gguf; print(sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_tied_embeddings_gguf_equals_llama_cpp_conversion(tiny_llama, tmp_path):
    """A LLaMA with tied input/output embeddings: no separate `output` tensor, as llama.cpp's converter."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    tied = tmp_path / "tied" / "llama"
    config = AutoConfig.from_pretrained(tiny_llama)
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(tied)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(Path(tiny_llama) / name, tied / name)
    adapter = make_random_adapter(str(tied), tmp_path / "lora")
    hf_dir = tmp_path / "hf" / "llama"
    export_hf(str(tied), adapter, str(hf_dir), dtype="fp32")
    run_converter(CONVERT_HF, hf_dir, "--outfile", tmp_path / "ref.gguf", "--outtype", "f32")
    export_gguf(str(tied), adapter, str(tmp_path / "ours.gguf"), outtype="f32")
    kv, tensors = read_gguf(tmp_path / "ours.gguf")
    ref_kv, ref_tensors = read_gguf(tmp_path / "ref.gguf")
    assert "output.weight" not in tensors
    assert_same_header(kv, ref_kv)
    assert_same_tensors(tensors, ref_tensors)


def test_overwrite_never_clears_the_working_folder_or_an_input(tmp_path, monkeypatch):
    from alpaca.core.staging import prepare_output_path

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "model")
    for path, protect in (
        (".", ()),
        (str(tmp_path), ()),
        (str(tmp_path / "model"), (str(tmp_path / "model"),)),
    ):
        with pytest.raises(ValueError, match="refusing to clear it"):
            prepare_output_path(path, overwrite=True, protect=protect)
    assert (tmp_path / "model" / "config.json").is_file()
    assert prepare_output_path(str(tmp_path / "new"), overwrite=False) == tmp_path / "new"


# ---- arguments, refusals and overwrites (issue 14 items 1, 2, 11; issue 9 item 3) -----------------------


def test_gguf_overwrite_with_a_bad_name_deletes_nothing(tiny_llama, tiny_llama_adapter, tmp_path):
    data = tmp_path / "my_dataset"
    data.mkdir()
    (data / "train.json").write_text("[]")
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    for target in (data, notes):
        with pytest.raises(ValueError, match=r"--output_file=.*ending in \.gguf"):
            export_gguf(tiny_llama, tiny_llama_adapter, str(target), overwrite=True)
    assert (data / "train.json").read_text() == "[]" and notes.read_text() == "mine"
    folder = tmp_path / "model.gguf"
    folder.mkdir()
    with pytest.raises(ValueError, match="--output_file=.*is a folder"):
        export_gguf(tiny_llama, tiny_llama_adapter, str(folder), overwrite=True)
    assert folder.is_dir()


def test_a_failed_overwrite_keeps_the_previous_output(tiny_llama, tiny_opt, tiny_llama_adapter, tmp_path):
    """Each export with --overwrite and an adapter that does not fit: an error, the old output untouched,
    no temporary sibling left behind."""
    wrong = make_random_adapter(tiny_opt, tmp_path / "opt-lora", target_modules=("fc1", "fc2"))
    exports = {
        "hf": lambda out, adapter: export_hf(tiny_llama, adapter, out, dtype="fp32", overwrite=True),
        "meta": lambda out, adapter: export_meta(tiny_llama, adapter, out, dtype="fp32", overwrite=True),
        "gguf": lambda out, adapter: export_gguf(tiny_llama, adapter, out, outtype="f32", overwrite=True),
    }
    for name, export in exports.items():
        parent = tmp_path / name
        parent.mkdir()
        out = str(parent / ("old.gguf" if name == "gguf" else "old"))
        export(out, tiny_llama_adapter)
        before = snapshot(out)
        with pytest.raises(ValueError, match="does not fit the base model"):
            export(out, wrong)
        assert snapshot(out) == before, name
        assert [p.name for p in parent.iterdir()] == [Path(out).name], name


def test_a_failing_self_check_leaves_no_output_folder(tiny_llama, tiny_llama_adapter, tmp_path, monkeypatch):
    """The saved model is checked after it is written: a failure there removes what was written."""
    import alpaca.weights.export.hf

    real = alpaca.weights.export.hf.check_logits_match

    def fail_on_saved(reference, candidate, dtype_name, what, adapter_effect):
        if what == "saved model":
            raise ValueError("self-check failed: simulated")
        return real(reference, candidate, dtype_name, what, adapter_effect)

    monkeypatch.setattr(alpaca.weights.export.hf, "check_logits_match", fail_on_saved)
    with pytest.raises(ValueError, match="simulated"):
        export_hf(tiny_llama, tiny_llama_adapter, str(tmp_path / "out"), dtype="fp32")
    assert list(tmp_path.iterdir()) == []


def test_adapter_files_that_cannot_load_are_named(tiny_llama, tiny_llama_adapter, tmp_path):
    import shutil

    out = str(tmp_path / "out")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_adapter, broken)
    (broken / "adapter_config.json").write_text('{"r": 8,')
    with pytest.raises(ValueError, match=r"adapter_config\.json is not valid JSON"):
        export_hf(tiny_llama, str(broken), out)
    shutil.copy(Path(tiny_llama_adapter) / "adapter_config.json", broken / "adapter_config.json")
    weights = (broken / "adapter_model.safetensors").read_bytes()
    (broken / "adapter_model.safetensors").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors are truncated"):
        export_hf(tiny_llama, str(broken), out)
    (broken / "adapter_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has adapter_config.json but no adapter weights"):
        export_hf(tiny_llama, str(broken), out)
    assert not Path(out).exists()


def test_unknown_bpe_pre_tokenizer_is_refused_before_the_merge(tiny_llama, tmp_path, monkeypatch):
    """A byte-level BPE tokenizer whose pre-tokenizer llama.cpp does not know: refused before any weights
    load (llama.cpp's converter refuses it too)."""
    import shutil

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import alpaca.weights.export.gguf_export

    base = tmp_path / "bpe-llama"
    shutil.copytree(tiny_llama, base)
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (base / name).unlink(missing_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    bpe.train_from_iterator(["a tiny corpus for a tiny byte-level tokenizer"] * 20, trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    ).save_pretrained(base)
    adapter = make_random_adapter(str(base), tmp_path / "lora")

    def no_merge(*args, **kwargs):
        raise AssertionError("the merge started before the refusal")

    monkeypatch.setattr(alpaca.weights.export.gguf_export, "load_and_merge", no_merge)
    with pytest.raises(ValueError, match="pre-tokenizer is not one this export knows"):
        export_gguf(str(base), adapter, str(tmp_path / "out.gguf"))
    assert not (tmp_path / "out.gguf").exists()


# ---- precision and the self-check (issue 9 item 4) ------------------------------------------------------


def test_export_dtype_defaults_to_the_base_and_a_rounded_away_update_is_an_error(tiny_llama, tmp_path):
    """fp32 base, small adapter update: the default export keeps it (fp32); an explicit fp16 export loses
    part of it in rounding, which the self-check measures against the adapter's own effect and refuses."""
    small = make_random_adapter(tiny_llama, tmp_path / "small", b_scale=3e-4)
    info = export_hf(tiny_llama, small, str(tmp_path / "default"))
    assert info["dtype"] == "fp32"
    assert info["max_logit_diff_saved"] < 0.1 * info["adapter_effect"]
    with pytest.raises(
        ValueError, match=r"(loses \d+% of the adapter's effect|left .* unchanged).*--precision=fp32"
    ):
        export_hf(tiny_llama, small, str(tmp_path / "fp16"), dtype="fp16")
    assert not (tmp_path / "fp16").exists()
    # the same for llama.cpp's f16 file, whose matrices are rounded after an fp32 merge
    with pytest.raises(ValueError, match=r"f16 GGUF model loses \d+% of the adapter's effect.*--outtype=f32"):
        export_gguf(tiny_llama, small, str(tmp_path / "small-f16.gguf"), outtype="f16")
    assert not (tmp_path / "small-f16.gguf").exists()
    export_gguf(tiny_llama, small, str(tmp_path / "small-f32.gguf"), outtype="f32")


def test_merged_config_pads_with_the_tokenizers_pad_id(tiny_llama, tmp_path):
    """Training pads with unk (id 0); the exported config.json and generation_config.json must agree."""
    from transformers import AutoTokenizer

    adapter = make_random_adapter(tiny_llama, tmp_path / "lora")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.save_pretrained(adapter)
    out = tmp_path / "hf"
    export_hf(tiny_llama, adapter, str(out))
    assert AutoTokenizer.from_pretrained(out).pad_token_id == 0
    assert json.loads((out / "config.json").read_text())["pad_token_id"] == 0
    assert json.loads((out / "generation_config.json").read_text())["pad_token_id"] == 0


def test_llama_style_bpe_without_tokenizer_model_equals_llama_cpp_conversion(tiny_llama, tmp_path):
    """A LLaMA whose tokenizer is only a tokenizer.json with byte fallback (no tokenizer.model): both
    llama.cpp's converter and ours read it as LLaMA-style BPE (`LlamaHfVocab`); same keys, same tensors."""
    import shutil

    base = tmp_path / "hfft" / "llama"
    shutil.copytree(tiny_llama, base)
    (base / "tokenizer.model").unlink()
    adapter = make_random_adapter(str(base), tmp_path / "lora")
    hf_dir = tmp_path / "hf" / "llama"
    export_hf(str(base), adapter, str(hf_dir))
    assert not (hf_dir / "tokenizer.model").exists()
    run_converter(CONVERT_HF, hf_dir, "--outfile", tmp_path / "ref.gguf", "--outtype", "f32")
    info = export_gguf(str(base), adapter, str(tmp_path / "ours.gguf"), outtype="f32")
    assert info["vocab_type"] == "hfft"
    kv, tensors = read_gguf(tmp_path / "ours.gguf")
    ref_kv, ref_tensors = read_gguf(tmp_path / "ref.gguf")
    assert_same_header(kv, ref_kv)
    assert kv["tokenizer.ggml.model"] == "llama"
    assert_same_tensors(tensors, ref_tensors)
