"""OpenAI's wire protocol: request bodies -> checked jobs, finished jobs -> response bodies and chunks.

Only what this server can honour is accepted: a parameter it would silently ignore (`echo`,
penalties, `logit_bias`, tools, JSON mode) is a 400 that names it, as OpenAI does for bad values.
"""

from __future__ import annotations

import dataclasses
import math
import queue
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

from alpaca.inference.decoding import MAX_TEMPERATURE, max_input_chars
from alpaca.inference.generation import ResponseGenerator
from alpaca.serving.rows import CONTEXT_TOKENS, Job, Row, RowSettings
from alpaca.serving.scheduler import BatchScheduler

CHAT_FORMATS = ("template", "tokenizer", "trained")
MAX_STOP_STRINGS = 16
MAX_COMPLETION_LOGPROBS = 5
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant")
# Parameters accepted only at their neutral value: anything else would be silently ignored.
NEUTRAL = {
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    """A request the server refuses, with OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ServingConfig:
    """What the API serves and how.

    Attributes:
        model_id: the id in `/v1/models`; requests naming another model get a 404.
        chat_format: "template": chat turns fill the prompt template's instruction and input, and the
            reply is cut and stripped as in the page and batch mode; "tokenizer": the tokenizer's chat
            template formats the messages.
        default_max_tokens: `max_tokens` when a request gives none.
    """

    model_id: str
    chat_format: str
    default_max_tokens: int


def shown(value, width: int = 80) -> str:
    """`value`'s repr for an error message, cut to `width` characters (a client's value may be huge)."""
    text = repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def _invalid(name: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{name}: {message}", param=name, code=code)


def _number(
    body: dict, name: str, default, low: float, high: float, integer: bool = False, above: bool = False
):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, float) and not math.isfinite(value):
        # JSON has no NaN or Infinity, but Python's parser reads them (and 1e999 as infinity).
        raise _invalid(name, f"must be a finite number, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, int | float) or (integer and value != int(value)):
        kind = "an integer" if integer else "a number"
        raise _invalid(name, f"must be {kind}, got {shown(value)}", "invalid_type")
    if (value <= low if above else value < low) or value > high:
        bound = f"above {low}" if above else f"at least {low}"
        raise _invalid(name, f"must be {bound} and at most {high}, got {value!r}")
    return int(value) if integer else float(value)


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _invalid("stop", f"must be a string or a list of strings, got {shown(stop)}", "invalid_type")
    if len(items) > MAX_STOP_STRINGS:
        raise _invalid("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(items)}")
    return tuple(dict.fromkeys(item for item in items if item))


def check_unsupported(body: dict) -> None:
    for name, neutral in NEUTRAL.items():
        if name in body and body[name] not in neutral:
            raise APIError(
                400,
                f"{name}={shown(body[name])} is not supported by this server; leave it out",
                param=name,
                code="unsupported_parameter",
            )
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise APIError(400, "best_of is not supported by this server; leave it out", param="best_of")


class OpenAIBackend:
    """Turns OpenAI requests into jobs for a `BatchScheduler` over one `ResponseGenerator`, and
    results into OpenAI's response bodies."""

    def __init__(self, generator: ResponseGenerator, scheduler: BatchScheduler, config: ServingConfig):
        if config.chat_format not in CHAT_FORMATS:
            raise ValueError(
                f"--chat_format must be one of {', '.join(CHAT_FORMATS)}, got {config.chat_format!r}"
            )
        if config.chat_format == "trained":
            # the adapter's recorded format: a chat-trained one speaks its chat template (the tokenizer
            # loaded from the adapter holds it), an Alpaca-trained one its prompt template
            chat_trained = hasattr(generator.prompter, "render_chat")
            config = dataclasses.replace(config, chat_format="tokenizer" if chat_trained else "template")
        self.generator = generator
        self.tokenizer = generator.tokenizer
        self.scheduler = scheduler
        self.config = config
        self.limits = generator.limits
        model_config = getattr(generator.model, "config", None)
        self.context_length = getattr(model_config, "max_position_embeddings", None)
        self.vocab_size = len(self.tokenizer)
        self.eos_ids = frozenset({self.tokenizer.eos_token_id} - {None})
        self.chat_eos_ids = self.eos_ids
        if config.chat_format == "tokenizer":
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(
                    "--chat_format=tokenizer: the tokenizer of --base_model has no chat template; "
                    "use --chat_format=template (the prompt template)"
                )
            # Chat models may end a turn with their own token (Llama 3's <|eot_id|>).
            extra = getattr(getattr(generator.model, "generation_config", None), "eos_token_id", None)
            extra = extra if isinstance(extra, list) else [extra]
            extra += list(getattr(generator.prompter, "end_ids", []))  # the trained end-of-turn tokens
            self.chat_eos_ids = frozenset(self.eos_ids | {token for token in extra if token is not None})
        self.created = int(time.time())

    # -- endpoints ---------------------------------------------------------------------------------

    def models_body(self) -> dict:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self) -> dict:
        return {
            "id": self.config.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "alpaca-lora",
        }

    def start(self, kind: str, body) -> Job:
        """Check a `kind` ("completions" or "chat") request, queue its rows and return the job."""
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.config.model_id:
            raise APIError(
                404,
                f"The model {shown(model)} does not exist; this server serves {self.config.model_id!r} (see /v1/models)",
                param="model",
                code="model_not_found",
            )
        check_unsupported(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _invalid("stream", f"must be true or false, got {shown(stream)}", "invalid_type")
        settings, n = self._settings(body, kind, stream)
        if kind == "chat":
            prompts = [self._chat_prompt(body.get("messages"), settings.max_tokens)]
            stop = settings.stop
            if self.config.chat_format == "template":
                stop = tuple(dict.fromkeys(self.generator.stop_strings + stop))
            settings = RowSettings(
                **{
                    **settings.__dict__,
                    "stop": stop,
                    "strip": self.config.chat_format == "template",
                    "stop_token_ids": self.chat_eos_ids,
                }
            )
        else:
            prompts = self._completion_prompts(body.get("prompt"), settings.max_tokens)
        if len(prompts) * n > self.scheduler.max_queue_size:
            raise _invalid(
                "n",
                f"{len(prompts)} prompt(s) x n={n} is over the queue size {self.scheduler.max_queue_size}",
            )
        job = Job(stream=stream)
        for ids in prompts:
            for choice in range(n):
                seed = settings.seed
                if seed is not None and choice:
                    seed = (seed * 1_000_003 + choice) % 2**63
                job.add_row(ids, RowSettings(**{**settings.__dict__, "seed": seed}), self.scheduler.device)
        job.prompt_tokens = sum(len(ids) for ids in prompts)
        return job

    def _settings(self, body: dict, kind: str, stream: bool) -> tuple[RowSettings, int]:
        limit = self.limits.max_new_tokens
        name = (
            "max_completion_tokens"
            if kind == "chat" and body.get("max_completion_tokens") is not None
            else "max_tokens"
        )
        max_tokens = _number(
            body, name, min(self.config.default_max_tokens, limit), 1, float("inf"), integer=True
        )
        if max_tokens > limit:
            raise _invalid(
                name,
                f"max_tokens is too large: {max_tokens}. This server generates at most {limit} tokens per "
                "reply (--max_new_tokens_limit)",
            )
        temperature = _number(body, "temperature", 1.0, 0, MAX_TEMPERATURE)
        top_p = _number(body, "top_p", 1.0, 0, 1, above=True)
        top_k = _number(body, "top_k", 0, 0, float("inf"), integer=True)
        n = _number(body, "n", 1, 1, self.scheduler.max_queue_size, integer=True)
        seed = _number(body, "seed", None, -(2**63), 2**64, integer=True)
        logprobs = None
        if kind == "chat":
            if body.get("logprobs") not in (None, False, True):
                raise _invalid("logprobs", "must be true or false", "invalid_type")
            top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
            if body.get("logprobs"):
                logprobs = top
            elif body.get("top_logprobs") is not None:
                raise _invalid("top_logprobs", "needs logprobs=true")
        else:
            logprobs = _number(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS, integer=True)
        if logprobs is not None and stream:
            raise APIError(
                400,
                "logprobs with stream=true is not supported by this server",
                param="logprobs",
                code="unsupported_parameter",
            )
        stream_options = body.get("stream_options")
        if stream_options is not None and not isinstance(stream_options, dict):
            raise _invalid("stream_options", "must be an object", "invalid_type")
        settings = RowSettings(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=None if seed is None else seed % 2**63,
            stop=_stop_strings(body),
            stop_token_ids=self.eos_ids,
            logprobs=logprobs,
        )
        return settings, n

    # -- prompts -----------------------------------------------------------------------------------

    def _check_length(self, ids: list[int], max_tokens: int, param: str) -> list[int]:
        if not ids:
            raise _invalid(param, "the prompt is empty")
        if len(ids) > self.limits.max_input_tokens:
            raise APIError(
                400,
                f"The prompt is {len(ids)} tokens long, over this server's limit of "
                f"{self.limits.max_input_tokens} tokens (--max_input_tokens): shorten it",
                param=param,
                code="context_length_exceeded",
            )
        if self.context_length and len(ids) + max_tokens > self.context_length:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context_length} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the completion). "
                "Please reduce the length of the prompt or max_tokens.",
                param=param,
                code="context_length_exceeded",
            )
        return ids

    def _check_chars(self, num_chars: int, param: str) -> None:
        # Refused before tokenizing: a huge text costs seconds and gigabytes to tokenize.
        if num_chars > max_input_chars(self.limits):
            raise APIError(
                400,
                f"The prompt is {num_chars} characters long, far over this server's limit of "
                f"{self.limits.max_input_tokens} tokens (--max_input_tokens): shorten it",
                param=param,
                code="context_length_exceeded",
            )

    def _encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # As ResponseGenerator encodes prompts, so greedy replies equal batch mode's.
        return self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]

    def _completion_prompts(self, prompt, max_tokens: int) -> list[list[int]]:
        def token_list(value) -> bool:
            return isinstance(value, list) and all(
                isinstance(t, int) and not isinstance(t, bool) for t in value
            )

        if isinstance(prompt, str):
            texts, id_lists = [prompt], None
        elif isinstance(prompt, list) and prompt and all(isinstance(item, str) for item in prompt):
            texts, id_lists = prompt, None
        elif isinstance(prompt, list) and prompt and token_list(prompt):
            texts, id_lists = None, [prompt]
        elif isinstance(prompt, list) and prompt and all(token_list(item) for item in prompt):
            texts, id_lists = None, prompt
        else:
            raise _invalid(
                "prompt",
                "must be a string, a list of strings, a list of token ids or a list of those",
                "invalid_type",
            )
        if texts is not None:
            self._check_chars(sum(len(text) for text in texts), "prompt")
            id_lists = [self._encode(text) for text in texts]
        for ids in id_lists:
            if any(not 0 <= token < self.vocab_size for token in ids):
                raise _invalid("prompt", f"token ids must be from 0 to {self.vocab_size - 1}")
            self._check_length(ids, max_tokens, "prompt")
        return id_lists

    def _chat_prompt(self, messages, max_tokens: int) -> list[int]:
        messages = parse_messages(messages)
        self._check_chars(sum(len(message["content"]) for message in messages), "messages")
        if self.config.chat_format == "tokenizer":
            plain = [
                {"role": "system" if m["role"] == "developer" else m["role"], "content": m["content"]}
                for m in messages
            ]
            if hasattr(self.generator.prompter, "render_chat"):
                # as training tokenized it (`encode_rendered`): the tokenizer adds the BOS it adds
                ids = self._encode(self.generator.prompter.render_chat(plain))
            else:
                text = self.tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)
                ids = self._encode(text, add_special_tokens=False)
        else:
            instruction, input = template_fields(messages)
            ids = self._encode(self.generator.prompter.generate_prompt(instruction, input))
        return self._check_length(ids, max_tokens, "messages")

    # -- results -----------------------------------------------------------------------------------

    def response_body(self, kind: str, job: Job, request_id: str) -> dict:
        choices = []
        for row in job.rows:
            choice = {"index": row.index}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": row.text}
                choice["logprobs"] = self._chat_logprobs(row)
            else:
                choice["text"] = row.text
                choice["logprobs"] = self._completion_logprobs(row)
            choice["finish_reason"] = row.finish_reason
            choices.append(choice)
        return {**self._head(kind, request_id, chunk=False), "choices": choices, "usage": usage(job)}

    def chunks(
        self, kind: str, job: Job, request_id: str, include_usage: bool, poll_s: float = 0.1
    ) -> Iterator[dict | None]:
        """The stream's chunks; None every `poll_s` while nothing happens (the caller checks that the
        client is still there), or, with `poll_s=0`, whenever no event is waiting (the caller waits
        for the next one, see `JobEvents.listener`). An error ends the stream with an error chunk."""
        head = self._head(kind, request_id, chunk=True)
        extra = {"usage": None} if include_usage else {}
        if kind == "chat":
            for row in job.rows:
                yield {
                    **head,
                    "choices": [self._chunk_choice(kind, row, {"role": "assistant", "content": ""})],
                    **extra,
                }
        finished = 0
        while finished < len(job.rows):
            try:
                event, row, value = job.events.get(timeout=poll_s) if poll_s else job.events.get_nowait()
            except queue.Empty:
                yield None
                continue
            if event == "error":
                yield APIError(500, value, type="server_error", code="generation_failed").body()
                return
            if event == "delta":
                delta = {"content": value} if kind == "chat" else value
                yield {**head, "choices": [self._chunk_choice(kind, row, delta)], **extra}
            elif event == "finish":
                finished += 1
                yield {
                    **head,
                    "choices": [
                        self._chunk_choice(kind, row, {} if kind == "chat" else "", row.finish_reason)
                    ],
                    **extra,
                }
        if include_usage:
            yield {**head, "choices": [], "usage": usage(job)}

    def _head(self, kind: str, request_id: str, chunk: bool) -> dict:
        obj = (
            ("chat.completion.chunk" if chunk else "chat.completion") if kind == "chat" else "text_completion"
        )
        return {"id": request_id, "object": obj, "created": int(time.time()), "model": self.config.model_id}

    @staticmethod
    def _chunk_choice(kind: str, row: Row, delta, finish_reason: str | None = None) -> dict:
        key = "delta" if kind == "chat" else "text"
        return {"index": row.index, key: delta, "logprobs": None, "finish_reason": finish_reason}

    def _token_texts(self, row: Row) -> list[tuple[str, list[tuple[str, float]]]]:
        """Each generated token's text as it reads after the tokens before it (a sentencepiece word
        keeps its leading space), with its alternatives' texts and log-probabilities."""
        decode = self.tokenizer.decode
        texts = []
        for position, entry in enumerate(row.logprobs):
            prefix = row.prompt_ids[-CONTEXT_TOKENS:] + row.token_ids[:position]
            before = decode(prefix)

            def piece(token_id: int, prefix=prefix, before=before) -> str:
                full = decode(prefix + [token_id])
                return full[len(before) :] if full.startswith(before) else decode([token_id])

            texts.append((piece(entry.token_id), [(piece(token), logprob) for token, logprob in entry.top]))
        return texts

    def _completion_logprobs(self, row: Row) -> dict | None:
        if row.settings.logprobs is None:
            return None
        texts = self._token_texts(row)
        offsets, offset = [], 0
        for token, _ in texts:
            offsets.append(offset)
            offset += len(token)
        return {
            "tokens": [token for token, _ in texts],
            "token_logprobs": [entry.logprob for entry in row.logprobs],
            "top_logprobs": [dict(top) for _, top in texts],
            "text_offset": offsets,
        }

    def _chat_logprobs(self, row: Row) -> dict | None:
        if row.settings.logprobs is None:
            return None

        def item(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        content = []
        for entry, (token, top) in zip(row.logprobs, self._token_texts(row)):
            content.append({**item(token, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in top]})
        return {"content": content}


def new_request_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(job: Job) -> dict:
    completion = sum(len(row.token_ids) for row in job.rows)
    prompt = job.prompt_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def parse_messages(messages) -> list[dict]:
    """Check chat messages; return them as {"role", "content"} with text content."""
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages", "must be a non-empty list of {role, content} objects", "invalid_type")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _invalid(where, "must be an object with a role and content", "invalid_type")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise _invalid(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {shown(role)}")
        if isinstance(content, list):
            if not all(
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                for part in content
            ):
                raise _invalid(
                    f"{where}.content", 'only text parts ({"type": "text", "text": ...}) are supported'
                )
            content = "".join(part["text"] for part in content)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise _invalid(f"{where}.content", "must be a string or a list of text parts", "invalid_type")
        parsed.append({"role": role, "content": content})
    if parsed[-1]["role"] != "user":
        raise _invalid("messages", "the last message must be the user's")
    return parsed


def template_fields(messages: list[dict]) -> tuple[str, str | None]:
    """Chat turns -> the prompt template's (instruction, input).

    With a system (or developer) message, it is the instruction and the user's message the input, so
    "Translate into French" + "Good morning" reads as the template intends. Without one, the user's
    message is the instruction. Earlier turns go into the input as a transcript ("User: ...",
    "Assistant: ...").
    """
    system = "\n\n".join(m["content"].strip() for m in messages if m["role"] in ("system", "developer"))
    turns = [m for m in messages if m["role"] in ("user", "assistant")]
    last = turns[-1]["content"].strip()
    history = "\n\n".join(f"{m['role'].capitalize()}: {m['content'].strip()}" for m in turns[:-1])
    if system:
        instruction = system
        input = f"{history}\n\nUser: {last}" if history else last
    else:
        instruction, input = last, history or None
    if not instruction:
        raise _invalid("messages", "the user's message is empty")
    return instruction, input or None
