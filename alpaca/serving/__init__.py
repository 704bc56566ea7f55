"""An OpenAI-compatible HTTP API over one loaded model (`generate.py --api`), with continuous batching.

    python generate.py --api --base_model=... --lora_weights=... --server_port=8000

`server` runs uvicorn (in a background thread, bound before the model loads) over the Starlette routes
of `app` (key check, body limits and read timeout, OpenAI-shaped errors, server-sent events, client
disconnects). `openai_protocol` turns OpenAI request bodies into jobs and results into OpenAI's
response shapes. `rows` holds what a request becomes (a `Job` with one `Row` per prompt and choice:
stop strings, token limits, streamed text that only grows); `scheduler` decodes rows together with
continuous batching (rows join the running batch at the next step and leave it when they end),
merging key/value caches through `kv_cache`, the one module that relies on transformers' cache
internals. `limits` is the request-body limit shared with the Gradio page. See docs/api.md.
"""
