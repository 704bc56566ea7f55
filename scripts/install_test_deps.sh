#!/usr/bin/env bash
# Test-only system pieces, installed when missing:
#  - Debian's Chromium (/usr/bin/chromium) for the browser test of the Gradio demo (playwright drives it;
#    playwright's own browser download is not used);
#  - llama.cpp's Python converters (from the llama-cpp-python source package on PyPI, nothing compiled),
#    the reference for the export tests.
# Without them those tests skip locally; under CI=true they fail instead.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"

if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing Debian's chromium for the browser test"
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
            || echo "warning: could not install chromium; the browser test will not run"
    else
        echo "note: /usr/bin/chromium is missing (apt-get install chromium); the browser test will not run"
    fi
fi

PYTHON="$python" bash scripts/fetch_llama_cpp_converters.sh \
    || echo "warning: could not fetch llama.cpp's converters; the export cross-checks will not run"
exit 0
