"""What the jobs that call an OpenAI-compatible API share: self-instruct generation
(`generate_instruction.py`) and pairwise judging (`evaluate.py pairwise`). `client` sends one prompt
per request with retries, Retry-After and the "prompt too long" shrink; `cost` holds the prices, the
running cost and the worst case of one request (for `--max_cost_usd`); `journal` appends fsynced
journal lines and hashes what a stored reply answered; `settings` checks the client flags both jobs
take (`--base_url` among them). Only `client` imports `openai`, and only when a client is built.
"""
