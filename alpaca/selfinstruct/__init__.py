"""Self-instruct data generation (Stanford Alpaca's ``generate_instruction.py``, rebuilt).

Modules, in the order data flows through them:

- ``settings``: ``SelfInstructConfig``, every flag's default, help line and check.
- ``seeds``: load and validate the seed-task JSONL.
- ``prompts``: the meta-prompt (kept only there) and how examples are encoded into a prompt.
- ``parsing``: turn a reply into instruction / input / output candidates.
- ``filters``: upstream's heuristic filters (length, blacklist, "Write a program", first character).
- ``similarity`` (with ``tokens``): the exact, fast ROUGE-L de-duplication filter.
- ``journal``: the append-only journal, crash-safe ``regen.json`` and exports.
- ``pipeline``: the generation loop that ties them together.

The API client, prices and cost cap are shared with pairwise judging, in ``alpaca.openai_jobs``.
Nothing here imports torch or transformers.
"""
