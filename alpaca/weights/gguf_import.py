"""Use a `.gguf` file as a base model: convert it once to a Hugging Face folder, cached by its hash.

transformers reads GGUF files (dequantizing to fp32), but every tool downstream (peft, the Trainer,
the exports, llama.cpp's converters) wants a plain HF folder. So `--base_model=model.gguf` is
converted once into `~/.cache/alpaca-kit/gguf/<name>-<sha256 prefix>/` (or `$XDG_CACHE_HOME/...`),
and every later run with the same file reuses the folder. A conversion killed halfway leaves only a
temporary folder; the cached one appears whole (a rename) or not at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

SOURCE_FILE = "gguf_source.json"
HASH_PREFIX = 16


def cache_root() -> Path:
    """Where converted GGUF models live: `$XDG_CACHE_HOME/alpaca-kit/gguf` or `~/.cache/alpaca-kit/gguf`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alpaca-kit" / "gguf"


def is_gguf_path(path: str) -> bool:
    return str(path).lower().endswith(".gguf")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def converted_folder(gguf_file: str | Path, sha256: str, root: Path | None = None) -> Path:
    stem = Path(gguf_file).name[: -len(".gguf")]
    return (root or cache_root()) / f"{stem}-{sha256[:HASH_PREFIX]}"


def read_source(folder: str | Path) -> dict | None:
    """The `gguf_source.json` of a converted folder (the GGUF file and its hash), or None."""
    path = Path(folder) / SOURCE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def import_gguf(gguf_file: str, flag: str = "--base_model", root: Path | None = None, log=print) -> Path:
    """Return the HF folder converted from `gguf_file`, converting it when the cache has none.

    The folder holds fp32 safetensors weights, the tokenizer and `gguf_source.json`.
    """
    path = Path(gguf_file).expanduser()
    if not path.is_file():
        raise ValueError(f"{flag}={gguf_file!r}: no such GGUF file")
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{flag}={gguf_file!r} is not a GGUF file (its first bytes are not 'GGUF')")
    sha256 = file_sha256(path)
    folder = converted_folder(path, sha256, root)
    if read_source(folder) is not None and (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    log(f"converting {path} to a Hugging Face folder (once; cached in {folder})")
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        convert_gguf(path, staging)
        info = {"gguf_file": str(path.resolve()), "sha256": sha256, "size_bytes": path.stat().st_size}
        (staging / SOURCE_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        if folder.exists():  # a stale or half-made folder from an older layout: replace it
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(staging, folder)
        except OSError:
            # another process (a second torchrun rank) finished the same conversion first
            if read_source(folder) is None:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def convert_gguf(path: Path, output_dir: Path) -> None:
    """Dequantize a GGUF file with transformers and save it as an fp32 HF folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError, ImportError) as err:
        raise ValueError(
            f"--base_model={str(path)!r}: transformers cannot read this GGUF file: {err}"
        ) from err
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights are
    # already dequantized to fp32, so the marker is all that stands in the way.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(output_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(output_dir))


def resolve_model_source(base_model: str, flag: str = "--base_model", log=print) -> tuple[str, dict | None]:
    """`(folder, gguf_info)`: a `.gguf` path becomes its converted folder (info says which file and
    hash); anything else comes back unchanged with None."""
    if not is_gguf_path(base_model):
        return base_model, None
    folder = import_gguf(base_model, flag=flag, log=log)
    return str(folder), read_source(folder)
