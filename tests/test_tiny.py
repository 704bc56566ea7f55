import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def test_tiny_models_load_with_auto_classes(tiny_llama, tiny_opt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for path, model_type in ((tiny_llama, "llama"), (tiny_opt, "opt")):
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path)
        assert model.config.model_type == model_type
        assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
        assert tokenizer.pad_token_id is None  # like LLaMA; the pipeline chooses a pad token
        assert len(tokenizer) == model.config.vocab_size == 2000
        assert (Path(path) / "tokenizer.model").is_file()  # sentencepiece model, for llama.cpp exports
        ids = tokenizer("### Response:\nÉcrivez 42 ☃", return_tensors="pt")["input_ids"]
        assert ids[0, 0].item() == 1
        # byte fallback: any text round-trips, like LLaMA's tokenizer
        assert tokenizer.decode(ids[0], skip_special_tokens=True) == "### Response:\nÉcrivez 42 ☃"
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.shape == (1, ids.shape[1], 2000) and torch.isfinite(logits).all()


def test_tiny_builds_are_deterministic(tmp_path):
    from alpaca.tiny import build_tiny_model

    a = build_tiny_model(tmp_path / "a", "llama", seed=5)
    b = build_tiny_model(tmp_path / "b", "llama", seed=5)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.model").read_bytes() == (b / "tokenizer.model").read_bytes()


def test_tiny_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "alpaca.tiny", f"--output_dir={tmp_path}", "--arch=opt"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "opt" / "config.json").is_file() and not (tmp_path / "llama").exists()
