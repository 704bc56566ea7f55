"""An OpenAI-compatible HTTP API over one loaded model, with requests in flight batched together.

    python generate.py --api --base_model=... --lora_weights=... --server_port=8000

`batching` runs the requests (a scheduler thread, one padded `generate` call per batch, per-row
sampling, stop strings and cancellation), `openai_protocol` turns OpenAI request bodies into jobs and
results into OpenAI's response shapes, and `server` is the HTTP layer (stdlib `ThreadingHTTPServer`,
no extra dependency). See docs/api.md.
"""
