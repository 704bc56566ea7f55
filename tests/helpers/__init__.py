"""Test helpers, one home for each: import them as `from helpers.<module> import ...` (pytest puts
`tests/` on the path); conftest.py turns the shared ones into fixtures.

- `adapters`: random LoRA adapters; `tiny_trained`: a tiny adapter trained to give known answers.
- `finetune_runs`: sample-data subsets, fast finetune.py runs and their logged losses.
- `ports`: a free loopback port for test servers.
- `export_fixtures`: llama.cpp's reference converters and GGUF reading for the export tests.
- `scripted_server`: a local OpenAI-compatible server with scripted replies (self-instruct and
  evaluate.py tests; benchmarks/bench_judge.py and bench_selfinstruct_throughput.py put `tests/` on the
  path to use it).
"""
