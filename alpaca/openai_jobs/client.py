"""The API client: one prompt per request to any OpenAI-compatible server, with retries.

Self-instruct generation and pairwise judging both send their requests through ``CompletionClient``;
each passes its own stop sequences and chat form. The ``openai`` package is imported here only, so
nothing else pays for it.
"""

import asyncio
import json
import os
import random
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Replies to a prompt that does not fit, from OpenAI, vLLM, llama.cpp's server and Ollama.
_PROMPT_TOO_LONG = re.compile(
    r"please reduce|maximum context length|context_length_exceeded|exceeds the (available )?context|"
    r"max_tokens.{0,40}too large|too many tokens",
    re.IGNORECASE,
)
# Upstream shrank the requested length by 20% each time the prompt plus max_tokens did not fit.
MAX_TOKENS_SHRINK = 0.8
MIN_MAX_TOKENS = 16
MAX_RETRY_DELAY_S = 60.0


class APIFailure(RuntimeError):
    """A request that cannot succeed (retries used up, bad key, unknown model): the run must stop."""


@dataclass
class CompletionReply:
    """One request's outcome.

    Attributes:
        text: the reply text ("" when the reply was unusable).
        finish_reason: the choice's finish reason (``"length"`` when cut by ``max_tokens``).
        prompt_tokens / completion_tokens: usage reported by the server (0 when absent).
        retries: attempts beyond the first.
        failure: why the reply was unusable (malformed JSON, no choices), None when it was usable.
        max_tokens: the ``max_tokens`` finally sent (after any "prompt too long" shrinking).
        from_journal: an earlier run paid for this reply and journaled it unapplied.
    """

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    failure: str | None = None
    max_tokens: int = 0
    from_journal: bool = False


@dataclass
class RetryPolicy:
    """Bounded exponential backoff with jitter; a server's Retry-After takes precedence."""

    max_retries: int = 5
    initial_delay_s: float = 1.0
    max_delay_s: float = MAX_RETRY_DELAY_S

    def delay(self, retry_number: int, retry_after_s: float | None, jitter: random.Random) -> float:
        if retry_after_s is not None:
            return min(retry_after_s, self.max_delay_s)
        backoff = min(self.max_delay_s, self.initial_delay_s * 2**retry_number)
        return backoff * jitter.uniform(0.5, 1.0)


def _warn(message: str) -> None:
    """Print above the progress bar (imported lazily: tqdm is only needed once requests run)."""
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def client_api_key(base_url: str | None) -> str:
    """The key comes from OPENAI_API_KEY only; local servers get a placeholder when it is unset."""
    key = os.environ.get("OPENAI_API_KEY")
    if key:
        return key
    if base_url:
        return "not-needed"
    raise ValueError(
        "OPENAI_API_KEY is not set. Export your OpenAI key (export OPENAI_API_KEY=...), or pass "
        "--base_url=http://127.0.0.1:8000/v1 to use a local OpenAI-compatible server."
    )


def _retry_after_seconds(headers) -> float | None:
    """Retry-After in seconds (OpenAI also sends retry-after-ms); None when absent or an HTTP date."""
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue
    return None


def _parse_body(body: str, chat: bool) -> CompletionReply:
    """Read text, finish reason and usage from a JSON reply; a malformed one becomes a failure."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return CompletionReply(failure="malformed JSON")
    if not isinstance(data, dict):
        return CompletionReply(failure="malformed JSON")
    reply = CompletionReply()
    usage = data.get("usage")
    if isinstance(usage, dict):
        reply.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        reply.completion_tokens = int(usage.get("completion_tokens") or 0)
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        reply.failure = "no choices"
        return reply
    choice = choices[0]
    text = (choice.get("message") or {}).get("content") if chat else choice.get("text")
    if not isinstance(text, str):
        reply.failure = "no text in choice"
        return reply
    reply.text = text
    reply.finish_reason = choice.get("finish_reason")
    return reply


class CompletionClient:
    """Sends one prompt per request with ``--api=chat`` or ``--api=completions``.

    Args:
        api: ``"chat"`` or ``"completions"``.
        model_name: the model to ask.
        base_url: an OpenAI-compatible server (vLLM, llama.cpp's server, Ollama); None for OpenAI.
        temperature / top_p: sampling settings, as upstream.
        max_tokens: requested length before any "prompt too long" shrinking.
        request_timeout: seconds before a request is abandoned and retried.
        retry: the retry policy.
        stop: stop sequences sent with every request (empty sends none).
        messages: turns a prompt into chat messages for ``api="chat"``.
    """

    def __init__(
        self,
        *,
        api: str,
        model_name: str,
        base_url: str | None,
        temperature: float,
        top_p: float,
        max_tokens: int,
        request_timeout: float,
        retry: RetryPolicy,
        stop: Sequence[str],
        messages: Callable[[str], list[dict]],
    ):
        import openai

        self._openai = openai
        self.api = api
        self.model_name = model_name
        self.temperature = temperature
        self.top_p = top_p
        self.max_tokens = max_tokens
        self.request_timeout = request_timeout
        self.retry = retry
        self.stop = tuple(stop)
        self.messages = messages
        self._jitter = random.Random()
        # OPENAI_ORG is what upstream read; OPENAI_ORG_ID is the current client's own name for it.
        organization = os.environ.get("OPENAI_ORG") or os.environ.get("OPENAI_ORG_ID")
        # Retries are ours (they honour Retry-After and count toward --max_retries), so the client's are off.
        self._client = openai.AsyncOpenAI(
            api_key=client_api_key(base_url),
            organization=organization,
            base_url=base_url,
            timeout=request_timeout,
            max_retries=0,
        )

    async def close(self) -> None:
        await self._client.close()

    async def _send(self, prompt: str, max_tokens: int, request_seed: int | None) -> str:
        """One HTTP request; returns the raw body text so a malformed reply cannot raise."""
        settings = dict(
            model=self.model_name,
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            n=1,
        )
        if self.stop:
            settings["stop"] = list(self.stop)
        if request_seed is not None:
            settings["seed"] = request_seed
        if self.api == "chat":
            call = self._client.chat.completions.with_raw_response.create(
                messages=self.messages(prompt), **settings
            )
        else:
            call = self._client.completions.with_raw_response.create(prompt=prompt, **settings)
        raw = await asyncio.wait_for(call, timeout=self.request_timeout)
        return raw.http_response.content.decode("utf-8", errors="replace")

    async def complete(self, prompt: str, request_seed: int | None = None) -> CompletionReply:
        """Send ``prompt``, retrying transient faults; raise ``APIFailure`` when it cannot succeed."""
        openai = self._openai
        max_tokens = self.max_tokens
        retries = 0
        while True:
            retry_after = None
            try:
                body = await self._send(prompt, max_tokens, request_seed)
                reply = _parse_body(body, chat=self.api == "chat")
                reply.retries, reply.max_tokens = retries, max_tokens
                return reply
            except openai.BadRequestError as error:
                if not _PROMPT_TOO_LONG.search(str(error)):
                    raise APIFailure(f"the server rejected the request (400): {error.message}") from None
                shrunk = int(max_tokens * MAX_TOKENS_SHRINK)
                if shrunk < MIN_MAX_TOKENS:
                    raise APIFailure(
                        f"the prompt does not fit the model's context even with max_tokens={max_tokens}: "
                        "use fewer or shorter examples (--num_prompt_instructions) or a longer-context model"
                    ) from None
                _warn(f"the prompt is too long for max_tokens={max_tokens}; retrying with {shrunk}")
                max_tokens = shrunk
                continue
            except openai.RateLimitError as error:
                if "insufficient_quota" in str(error):
                    raise APIFailure(
                        "the API reports insufficient quota (429 insufficient_quota): add credit or "
                        "use another key; retrying will not help"
                    ) from None
                problem, retry_after = "rate limited (429)", _retry_after_seconds(error.response.headers)
            except openai.APIStatusError as error:
                if error.status_code < 500 and error.status_code not in (408, 409):
                    hint = {
                        401: "check OPENAI_API_KEY",
                        403: "check the key's permissions and OPENAI_ORG",
                        404: "check --model_name and --base_url",
                    }.get(error.status_code, "check the flags")
                    raise APIFailure(
                        f"the server rejected the request ({error.status_code}): {error.message}; {hint}"
                    ) from None
                problem = f"server error ({error.status_code})"
                retry_after = _retry_after_seconds(error.response.headers)
            except (openai.APITimeoutError, asyncio.TimeoutError, TimeoutError):
                problem = f"no reply within --request_timeout={self.request_timeout}s"
            except openai.APIConnectionError as error:
                problem = f"connection failed ({error.__cause__ or error})"
            if retries >= self.retry.max_retries:
                raise APIFailure(f"{problem}, and --max_retries={self.retry.max_retries} retries are used up")
            delay = self.retry.delay(retries, retry_after, self._jitter)
            retries += 1
            _warn(f"{problem}; retry {retries} of {self.retry.max_retries} in {delay:.2f}s")
            await asyncio.sleep(delay)
