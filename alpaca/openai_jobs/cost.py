"""Token prices, the running cost of a job, and the most one request can cost (for --max_cost_usd)."""

from collections.abc import Callable
from dataclasses import dataclass

# USD per 1M tokens (prompt, completion), from OpenAI's price list (checked 2025). Prices change:
# pass --prompt_price_per_1m / --completion_price_per_1m to override, or for any other model.
PRICES_PER_1M_TOKENS = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-3.5-turbo-instruct": (1.50, 2.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "davinci-002": (2.00, 2.00),
    "babbage-002": (0.40, 0.40),
}


def resolve_prices(
    model_name: str, prompt_price_per_1m: float | None, completion_price_per_1m: float | None
) -> tuple[float, float] | None:
    """Prices for ``model_name``: the flags if given, else the built-in table, else None (unknown).

    A dated snapshot (``gpt-4o-mini-2024-07-18``) takes the price of its longest matching name.
    """
    if prompt_price_per_1m is not None and completion_price_per_1m is not None:
        return prompt_price_per_1m, completion_price_per_1m
    matches = [
        name for name in PRICES_PER_1M_TOKENS if model_name == name or model_name.startswith(name + "-")
    ]
    builtin = PRICES_PER_1M_TOKENS[max(matches, key=len)] if matches else None
    if builtin is None:
        if prompt_price_per_1m is None and completion_price_per_1m is None:
            return None
        builtin = (0.0, 0.0)
    return (
        builtin[0] if prompt_price_per_1m is None else prompt_price_per_1m,
        builtin[1] if completion_price_per_1m is None else completion_price_per_1m,
    )


@dataclass
class CostMeter:
    """Sums token usage and turns it into dollars (None when the model's price is unknown)."""

    prices: tuple[float, float] | None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def request_cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        if self.prices is None:
            return None
        return (prompt_tokens * self.prices[0] + completion_tokens * self.prices[1]) / 1e6

    @property
    def usd(self) -> float | None:
        return self.request_cost(self.prompt_tokens, self.completion_tokens)

    def describe(self) -> str:
        return "n/a" if self.usd is None else f"${self.usd:.4f}"


# A bound on the tokens a chat or completions request adds around its text (role markers, BOS...).
PROMPT_OVERHEAD_TOKENS = 32


def request_texts(api: str, prompt: str, messages: Callable[[str], list[dict]]) -> list[str]:
    """The texts a request sends: the chat messages' contents with ``api="chat"``, else the prompt."""
    return [message["content"] for message in messages(prompt)] if api == "chat" else [prompt]


def worst_case_usd(meter: CostMeter, texts: list[str], max_tokens: int) -> float | None:
    """The most one request can be billed: its prompt and a full ``max_tokens`` reply (None when the
    price is unknown).

    Every current tokenizer spends at least one UTF-8 byte per token of text, so the bytes of the
    texts sent (plus a fixed allowance for the tokens around them) bound the prompt tokens.
    """
    prompt_tokens = sum(len(text.encode("utf-8")) for text in texts) + PROMPT_OVERHEAD_TOKENS
    return meter.request_cost(prompt_tokens, max_tokens)
