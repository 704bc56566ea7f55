"""An OpenAI-compatible HTTP API over one loaded model (`generate.py --api`), with continuous batching.

    python generate.py --api --base_model=... --lora_weights=... --server_port=8000

`server` is the HTTP layer (routes, streaming, limits, auth), `openai_protocol` turns OpenAI request
bodies into jobs and results into OpenAI's response shapes, `rows` holds what a request becomes (a
`Job` with one `Row` per prompt and choice: stop strings, limits, streamed text) and `batching` is the
scheduler thread that decodes the rows in flight together, one token per forward pass, rows joining
and leaving the running batch between steps. See docs/api.md.
"""
