#!/usr/bin/env bash
# Fetch llama.cpp's own Python converters from the llama-cpp-python source package on PyPI, without
# compiling anything: convert_hf_to_gguf.py (+ its conversion/ package), convert_lora_to_gguf.py (the LoRA
# adapter converter), examples/convert_legacy_llama.py and gguf-py. The export tests use them as the reference.
#
#   scripts/fetch_llama_cpp_converters.sh            # into ${LLAMA_CPP_SRC:-~/.cache/alpaca-kit/llama.cpp}
#   PYTHON=.venv/bin/python LLAMA_CPP_SRC=/some/dir scripts/fetch_llama_cpp_converters.sh
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
dest="${LLAMA_CPP_SRC:-$HOME/.cache/alpaca-kit/llama.cpp}"
python="${PYTHON:-python3}"

if [ -f "$dest/VERSION" ] && [ "$(cat "$dest/VERSION")" = "$version" ] && [ -f "$dest/convert_hf_to_gguf.py" ] \
    && [ -f "$dest/convert_lora_to_gguf.py" ]; then
    echo "llama.cpp converters from llama-cpp-python $version already in $dest"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# --no-binary for this one package only: pip then needs just the sdist (and wheels of its build tools).
"$python" -m pip download --quiet --no-deps --no-binary llama-cpp-python -d "$tmp" "llama-cpp-python==$version"
prefix="llama_cpp_python-$version/vendor/llama.cpp"
tar -xzf "$tmp/llama_cpp_python-$version.tar.gz" -C "$tmp" --wildcards \
    "$prefix/convert_hf_to_gguf.py" "$prefix/convert_lora_to_gguf.py" "$prefix/examples/convert_legacy_llama.py" \
    "$prefix/conversion/*" "$prefix/gguf-py/*" "$prefix/LICENSE"
rm -rf "$dest"
mkdir -p "$(dirname "$dest")"
mv "$tmp/$prefix" "$dest"
echo "$version" > "$dest/VERSION"
echo "llama.cpp converters from llama-cpp-python $version written to $dest"
