"""Helpers for the export tests: llama.cpp's reference converters, GGUF reading, folder snapshots.

The converters come from the llama-cpp-python source package (scripts/fetch_llama_cpp_converters.sh puts
them in $LLAMA_CPP_SRC, default ~/.cache/alpaca-kit/llama.cpp). Without them a test skips locally and
fails under CI=true, so CI can never pass by silently not comparing.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.optional import skip_or_fail

CONVERT_HF = "convert_hf_to_gguf.py"
CONVERT_LEGACY = "examples/convert_legacy_llama.py"
CONVERT_LORA = "convert_lora_to_gguf.py"
FETCH_COMMAND = "scripts/fetch_llama_cpp_converters.sh"


def llama_cpp_src() -> Path:
    return Path(os.environ.get("LLAMA_CPP_SRC", "~/.cache/alpaca-kit/llama.cpp")).expanduser()


def require_converters() -> Path:
    """The folder holding llama.cpp's converters; skip (locally) or fail (CI=true) when it is missing."""
    root = llama_cpp_src()
    missing = [
        name
        for name in (CONVERT_HF, CONVERT_LEGACY, CONVERT_LORA, "gguf-py/gguf/__init__.py")
        if not (root / name).is_file()
    ]
    if missing:
        message = (
            f"llama.cpp converters not found in {root} (missing {missing}); run "
            f"`PYTHON=.venv/bin/python {FETCH_COMMAND}` or set LLAMA_CPP_SRC"
        )
        skip_or_fail(message)
    return root


def run_converter(script: str, *args) -> None:
    """Run one of llama.cpp's converters (with its own bundled gguf-py) and fail with its output."""
    root = require_converters()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("NO_LOCAL_GGUF", None)
    result = subprocess.run(
        [sys.executable, str(root / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if result.returncode != 0:
        pytest.fail(
            f"{script} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )


def read_gguf(path) -> tuple[dict, dict]:
    """(key -> value, tensor name -> (type name, numpy array)) of a GGUF file, header counts left out."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    kv = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}
    return kv, tensors


# The header keys llama.cpp's legacy converter (Meta layout) writes as its HF converter does, for any
# vocabulary; each test adds the tokenizer keys of its vocabulary type.
LEGACY_HEADER_KEYS = (
    "llama.block_count",
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.rope.freq_base",
    "llama.attention.layer_norm_rms_epsilon",
    "llama.rope.dimension_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.tokens",
)


def assert_same_header(ours: dict, reference: dict, keys=None) -> None:
    """Two GGUF headers (`read_gguf`'s key -> value) agree on every key, or on `keys`; the message
    names each key that differs."""
    keys = sorted(set(ours) | set(reference)) if keys is None else keys
    differing = [key for key in keys if ours.get(key) != reference.get(key)]
    assert differing == [], f"GGUF header keys differ from llama.cpp's conversion: {differing}"


def assert_same_tensors(ours: dict, reference: dict) -> None:
    import numpy as np

    assert sorted(ours) == sorted(reference)
    for name, (qtype, data) in reference.items():
        assert ours[name][0] == qtype, name
        assert ours[name][1].shape == data.shape, name
        assert np.array_equal(ours[name][1], data), f"tensor {name} differs from llama.cpp's conversion"


def snapshot(path) -> dict:
    """Relative path -> bytes of every file under `path` (or of the file itself)."""
    path = Path(path)
    if path.is_file():
        return {path.name: path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
