"""The client flags every OpenAI job shares, checked one way: the server address, concurrency,
retries, timeout, backoff, the cost cap and the prices behind it.

Each job keeps the fields in its own settings (``SelfInstructConfig``, ``PairwiseConfig``), with the
help lines below; ``client_checks`` and ``cost_checks`` give those flags the same rules and
messages in both. ``--api`` and ``--max_tokens`` are checked by each job (their ranges differ).
"""

from __future__ import annotations

from alpaca.openai_jobs.cost import resolve_prices

API_KINDS = ("chat", "completions")

# The help lines of the client flags both jobs' tables declare (one client serves both: alpaca.openai_jobs)
CONCURRENCY_HELP = "requests in flight at once; the output does not depend on it."
RETRIES_HELP = "retries per request for 429, 5xx, timeouts and dropped connections before the run stops."
TIMEOUT_HELP = "seconds before a request is abandoned and retried."
BACKOFF_HELP = "first backoff in seconds (doubles per retry, with jitter, at most 60 s; Retry-After wins)."
COST_CAP_HELP = (
    "never spend more (USD, all runs in output_dir): requests go out only while their worst case fits."
)
PROMPT_PRICE_HELP = "USD per 1M prompt tokens (overrides the built-in price; needed for unknown models)."
COMPLETION_PRICE_HELP = "USD per 1M completion tokens."


def api_check(api: str) -> tuple[bool, str]:
    """--api names an endpoint kind."""
    return api in API_KINDS, f"--api must be 'chat' or 'completions', not {api!r}"


def base_url_problem(base_url: str | None, flag: str = "--base_url") -> str | None:
    """Why `base_url` cannot be a server's address (checked up front: a malformed one would otherwise
    be retried --max_retries times like a server that is down), or None."""
    from urllib.parse import urlsplit

    if base_url is None:
        return None
    example = "e.g. http://127.0.0.1:8000/v1"
    try:
        parts = urlsplit(base_url)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number from 0 to 65535)
    except ValueError as err:
        return f"{flag}={base_url!r} is not a valid URL ({err}): give the server's address, {example}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{flag}={base_url!r} is not an http:// or https:// URL with a host: give the server's address, {example}"
    return None


def base_url_check(base_url: str | None) -> tuple[bool, str]:
    """--base_url, when given, is an http(s) URL with a host."""
    problem = base_url_problem(base_url)
    return problem is None, problem or ""


def client_checks(config) -> list[tuple[bool, str]]:
    """(ok, message) for --base_url, --max_concurrent_requests, --max_retries and --request_timeout."""
    return [
        base_url_check(config.base_url),
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
