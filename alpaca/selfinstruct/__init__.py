"""Self-instruct data generation (Stanford Alpaca's ``generate_instruction.py``, rebuilt).

Modules, in the order data flows through them:

- ``seeds``: load and validate the seed-task JSONL.
- ``prompts``: the meta-prompt (kept only there) and how examples are encoded into a prompt.
- ``client``: the OpenAI-compatible API client with retries, timeouts and the "prompt too long" shrink.
- ``parsing``: turn a reply into instruction / input / output candidates.
- ``filters``: upstream's heuristic filters (length, blacklist, "Write a program", first character).
- ``similarity``: the exact, fast ROUGE-L de-duplication filter.
- ``cost``: token prices and the running cost.
- ``journal``: the append-only journal, crash-safe ``regen.json`` and exports.
- ``pipeline``: the generation loop that ties them together.

Nothing here imports torch or transformers.
"""
