"""Tiny random LLaMA and OPT models with a real, locally trained tokenizer; no network needed.

Tests and the offline demo use these in place of real checkpoints. The tokenizer is a sentencepiece
BPE model trained on the project's own text with LLaMA's conventions (unk=0, bos=1, eos=2, no pad,
byte fallback, split digits), saved as `tokenizer.model` and loaded through `LlamaTokenizer`, so the
same loading code runs as for a real LLaMA folder.

    python -m alpaca.tiny --output_dir ./tiny-models          # writes ./tiny-models/{llama,opt}
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
SAMPLE_DATA = REPO_DIR / "data" / "alpaca_sample.json"
ARCHES = ("llama", "opt")

# Text the tokenizer always sees, so prompt markers get their own pieces even without sample data.
_BASE_CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "Write a response that appropriately completes the request.",
    "### Instruction:",
    "### Input:",
    "### Response:",
    "Ci-dessous se trouve une instruction qui décrit une tâche. Écrivez une réponse.",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def _corpus_lines() -> list[str]:
    lines = list(_BASE_CORPUS)
    from alpaca.core.prompter import TEMPLATES_DIR  # inside the package, so an installed copy finds them too

    for template in sorted(TEMPLATES_DIR.glob("*.json")):
        for value in json.loads(template.read_text(encoding="utf-8")).values():
            lines.extend(value.splitlines())
    if SAMPLE_DATA.is_file():
        for record in json.loads(SAMPLE_DATA.read_text(encoding="utf-8")):
            for key in ("instruction", "input", "output"):
                lines.extend(record.get(key, "").splitlines())
    return [line for line in lines if line.strip()]


def train_tokenizer_model(vocab_size: int = 2000) -> bytes:
    """Train a LLaMA-style sentencepiece BPE model and return its serialized bytes."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus_lines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def build_tokenizer(output_dir: str | Path, vocab_size: int = 2000):
    """Write `tokenizer.model` plus the HF tokenizer files into `output_dir` and return the tokenizer."""
    from transformers import LlamaTokenizer

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(train_tokenizer_model(vocab_size))
        # LlamaTokenizer(vocab_file=...) ignores the file in transformers 5; from_pretrained reads it.
        tokenizer = LlamaTokenizer.from_pretrained(tmp, add_bos_token=True, add_eos_token=False)
        tokenizer.save_pretrained(output_dir)
        shutil.copy(Path(tmp) / "tokenizer.model", output_dir / "tokenizer.model")
    return tokenizer


def tiny_config(arch: str, vocab_size: int):
    """A small but non-degenerate config: 2 layers, hidden 64, grouped-query attention for LLaMA."""
    from transformers import LlamaConfig, OPTConfig

    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "llama":
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-6,
            tie_word_embeddings=False,
            **common,
        )
    if arch == "opt":
        return OPTConfig(
            hidden_size=64,
            ffn_dim=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=64,
            max_position_embeddings=512,
            # no dropout, so runs are deterministic and distributed runs can be compared exactly
            dropout=0.0,
            attention_dropout=0.0,
            **common,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}: choose one of {ARCHES}")


def build_tiny_model(output_dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Build a random tiny `arch` model with its tokenizer and save it (safetensors) to `output_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    output_dir = Path(output_dir)
    tokenizer = build_tokenizer(output_dir)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2)
    model.save_pretrained(output_dir)
    return output_dir


def ensure_tiny_model(output_dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Return `output_dir`, building the tiny model there first when it holds none."""
    output_dir = Path(output_dir)
    if not (output_dir / "config.json").is_file():
        build_tiny_model(output_dir, arch=arch, seed=seed)
    return output_dir


def main(output_dir: str = "./tiny-models", arch: str = "both", seed: int = 0) -> None:
    """Build tiny random models with a locally trained tokenizer, offline.

    Args:
        output_dir: folder to write into; each architecture gets a subfolder (`llama`, `opt`).
        arch: `llama`, `opt` or `both`.
        seed: torch seed for the random weights.
    """
    arches = ARCHES if arch == "both" else (arch,)
    for name in arches:
        if name not in ARCHES:
            raise ValueError(f"--arch={name!r}: choose one of {ARCHES} or 'both'")
        path = build_tiny_model(Path(output_dir) / name, arch=name, seed=seed)
        print(f"wrote tiny {name} model to {path}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
