"""Measuring a fine-tune: pairwise judging (the way Alpaca was judged), held-out loss, exact match.

Modules, in the order a pairwise run uses them:

- ``outputs``: read AlpacaEval-format output files and match model and reference records.
- ``judge``: the judge prompt (kept only there) and how a verdict is read from a judge's reply.
- ``journal``: the crash-safe, append-only journal of judgments a rerun resumes from.
- ``pairwise``: the judging loop (both orders per pair, concurrency, retries, cost cap) and its files.
- ``stats``: how the two orders combine, win rate, standard error and the length bins.
- ``leaderboard``: several runs in one Markdown / CSV table and a bar chart.
- ``exact_match``: final-answer accuracy (GSM8K's ``#### N``).
- ``loss``: held-out response-token loss and perplexity of a model (+ adapter).

Only ``loss`` imports torch and transformers; ``leaderboard`` imports matplotlib when it draws.
"""
