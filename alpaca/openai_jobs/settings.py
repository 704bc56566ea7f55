"""The client flags every OpenAI job shares, checked one way: concurrency, retries, timeout, backoff,
the cost cap and the prices behind it.

Each job keeps the fields in its own settings (``SelfInstructConfig``, ``PairwiseConfig``), with its
own defaults and help lines; ``client_checks`` and ``cost_checks`` give those flags the same rules and
messages in both. ``--api`` and ``--max_tokens`` are checked by each job (their ranges differ).
"""

from __future__ import annotations

from alpaca.openai_jobs.cost import resolve_prices

API_KINDS = ("chat", "completions")


def api_check(api: str) -> tuple[bool, str]:
    """--api names an endpoint kind."""
    return api in API_KINDS, f"--api must be 'chat' or 'completions', not {api!r}"


def client_checks(config) -> list[tuple[bool, str]]:
    """(ok, message) for --max_concurrent_requests, --max_retries and --request_timeout."""
    return [
        (config.max_concurrent_requests >= 1, "--max_concurrent_requests must be at least 1"),
        (config.max_retries >= 0, "--max_retries must be 0 or more"),
        (config.request_timeout > 0, "--request_timeout must be positive (seconds)"),
    ]


def backoff_check(config) -> tuple[bool, str]:
    """--initial_retry_delay is a number of seconds."""
    return config.initial_retry_delay >= 0, "--initial_retry_delay must be 0 or more (seconds)"


def cap_check(config) -> tuple[bool, str]:
    """--max_cost_usd, when given, is positive."""
    return config.max_cost_usd is None or config.max_cost_usd > 0, "--max_cost_usd must be positive"


def price_checks(config, model_name: str) -> list[tuple[bool, str]]:
    """(ok, message) for the two price flags, and for a cost cap on a model without a known price."""
    checks = [
        (getattr(config, name) is None or getattr(config, name) >= 0, f"--{name} must be 0 or more")
        for name in ("prompt_price_per_1m", "completion_price_per_1m")
    ]
    if config.max_cost_usd is not None:
        prices = resolve_prices(model_name, config.prompt_price_per_1m, config.completion_price_per_1m)
        checks.append(
            (
                prices is not None,
                f"--max_cost_usd needs a price, and {model_name!r} has no built-in one: pass "
                "--prompt_price_per_1m and --completion_price_per_1m (USD per 1M tokens)",
            )
        )
    return checks
