"""A local OpenAI-compatible HTTP server with scripted replies, for tests and benchmarks (not part
of the installed package: `from helpers.scripted_server import ...`, with `tests/` on the path).

It speaks the wire protocol the real API does (``POST /v1/completions`` and
``/v1/chat/completions``, JSON bodies with ``choices`` and ``usage``), on 127.0.0.1 only. What it
answers is decided by a ``responder(prompt, attempt)`` callable, where ``attempt`` counts how often
that same prompt was received before; it returns one of the actions below. ``synthetic_responder``
makes deterministic self-instruct replies from a hash of the prompt. Usage is counted in words, and a
reply longer than the request's ``max_tokens`` words is cut there with finish_reason "length"; the
usage of every reply sent is in ``usage``, the bill a real API would send.
"""

import hashlib
import json
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class TextReply:
    """A normal reply; usage counts are words, so they are deterministic."""

    text: str
    finish_reason: str = "stop"
    delay_s: float = 0.0


@dataclass
class StatusReply:
    """An HTTP error (429, 500, 400 ...) with optional headers such as Retry-After."""

    status: int
    message: str = "scripted error"
    headers: dict = field(default_factory=dict)
    delay_s: float = 0.0


@dataclass
class RawReply:
    """A 200 reply with this exact body (malformed JSON, JSON without choices ...)."""

    body: str
    delay_s: float = 0.0


@dataclass
class DropConnection:
    """Close the connection without answering."""

    delay_s: float = 0.0


Responder = Callable[[str, int], object]


class _Server(ThreadingHTTPServer):
    # The default backlog of 5 drops connections when many requests start at once; the client then
    # sees a timeout that no script asked for.
    request_queue_size = 256
    daemon_threads = True


def _prompt_of(endpoint: str, body: dict) -> str:
    if endpoint == "chat":
        users = [m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user"]
        return users[-1] if users else ""
    prompt = body.get("prompt", "")
    return prompt[0] if isinstance(prompt, list) and prompt else prompt


def _cut_to_max_tokens(reply: TextReply, max_tokens) -> TextReply:
    """A real server stops at ``max_tokens`` (here: words) and says so with finish_reason "length"."""
    if not isinstance(max_tokens, int) or len(reply.text.split()) <= max_tokens:
        return reply
    end = [match.end() for match in re.finditer(r"\S+", reply.text)][max_tokens - 1] if max_tokens > 0 else 0
    return TextReply(reply.text[:end], finish_reason="length", delay_s=reply.delay_s)


def _reply_body(endpoint: str, model: str, prompt: str, reply: TextReply) -> dict:
    if endpoint == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": reply.text},
            "finish_reason": reply.finish_reason,
        }
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": reply.text, "finish_reason": reply.finish_reason, "logprobs": None}
        kind = "text_completion"
    prompt_tokens, completion_tokens = len(prompt.split()), len(reply.text.split())
    return {
        "id": "scripted-" + hashlib.sha1(prompt.encode()).hexdigest()[:12],
        "object": kind,
        "created": 0,
        "model": model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class ScriptedOpenAIServer:
    """Run the server in a background thread; use as a context manager.

    Args:
        responder: decides each reply from the prompt and how often it was seen before.
        latency_s: added before every reply (a fixed server latency).
    """

    def __init__(self, responder: Responder, latency_s: float = 0.0):
        self.responder = responder
        self.latency_s = latency_s
        self.log: list[dict] = []
        # The usage of every reply sent with a 200, i.e. what a real API would bill.
        self.usage: list[dict] = []
        self._attempts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> "ScriptedOpenAIServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def _next_action(self, endpoint: str, body: dict):
        prompt = _prompt_of(endpoint, body)
        with self._lock:
            attempt = self._attempts.get(prompt, 0)
            self._attempts[prompt] = attempt + 1
        action = self.responder(prompt, attempt)
        with self._lock:
            self.log.append(
                {
                    "time": time.monotonic(),
                    "endpoint": endpoint,
                    "prompt": prompt,
                    "attempt": attempt,
                    "action": type(action).__name__,
                    "body": body,
                }
            )
        return prompt, action

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in (headers or {}).items():
                    self.send_header(name, str(value))
                self.end_headers()
                self.wfile.write(payload)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                endpoint = {"/v1/chat/completions": "chat", "/v1/completions": "completions"}.get(self.path)
                if endpoint is None:
                    self._send(404, json.dumps({"error": {"message": f"no route {self.path}"}}).encode())
                    return
                prompt, action = server._next_action(endpoint, body)
                time.sleep(server.latency_s + getattr(action, "delay_s", 0.0))
                try:
                    if isinstance(action, DropConnection):
                        self.close_connection = True
                    elif isinstance(action, StatusReply):
                        error = {"error": {"message": action.message, "type": "scripted", "code": None}}
                        self._send(action.status, json.dumps(error).encode(), action.headers)
                    elif isinstance(action, RawReply):
                        self._send(200, action.body.encode())
                    else:
                        action = _cut_to_max_tokens(action, body.get("max_tokens"))
                        reply = _reply_body(endpoint, body.get("model", ""), prompt, action)
                        with server._lock:
                            server.usage.append(reply["usage"])
                        self._send(200, json.dumps(reply).encode())
                except (BrokenPipeError, ConnectionResetError):
                    # The client gave up (its timeout) before the scripted delay ended.
                    self.close_connection = True

        return Handler


_VERBS = tuple(
    "Describe Explain Summarize Classify Rewrite Suggest Compare Identify Translate Evaluate Name List "
    "Outline Critique Define Predict Recommend Estimate Paraphrase Contrast Illustrate Justify Rank "
    "Simplify Analyze Propose Review Debate Categorize Interpret".split()
)
_TOPICS = tuple(
    "the water cycle|a healthy breakfast|remote work|the French Revolution|compound interest|a job interview|"
    "renewable energy|a city park|the human heart|a cover letter|volcanoes|a team meeting|public transport|"
    "a birthday party|machine learning|the moon landing|photosynthesis|a small bakery|the stock market|"
    "climate change|a first date|electric cars|the Roman Empire|a rainy weekend|online privacy|a chess opening|"
    "black holes|a customer complaint|the immune system|a camping trip|supply and demand|a wedding toast|"
    "honeybees|a mobile app|the printing press|a marathon|social media|a school garden|earthquakes|"
    "a hotel review|vaccines|a budget spreadsheet|the Olympic Games|a haiku|coral reefs|a library card|"
    "the internet|a pet adoption|tax returns|a science fair|the Great Depression|a vegan recipe|"
    "quantum computers|a lost wallet|the Amazon rainforest|a bus schedule|democracy|a product launch|"
    "sleep hygiene|a neighborhood cleanup".split("|")
)
_STYLES = tuple(
    "in one sentence|for a ten-year-old|using a formal tone|in fewer than fifty words|as a short list|"
    "with one concrete example|and give the main reason|from the point of view of a teacher|as a tweet|"
    "in three bullet points|for a busy manager|with a touch of humor|as a short dialogue|for a travel blog|"
    "using only simple words|in the style of a news headline|for a museum guide|with a counterargument|"
    "as a step-by-step guide|for an email newsletter|without using technical terms|as a riddle|"
    "for a job applicant|in exactly two sentences|for a history class".split("|")
)


_OBJECTS = tuple(
    "a short story|a poem|three tips|an email|a summary|five questions|a product description|a tweet|"
    "a lesson plan|a persuasive paragraph|a dialogue|a list of pros and cons|a fun fact|a slogan|"
    "a recipe|a quiz|a definition|an analogy|a timeline|a checklist".split("|")
)
_QUESTIONS = (
    "What is the difference between {a} and {b}?",
    "How would you explain {a} to someone who has never heard of it?",
    "Why does {a} matter for {b}?",
    "Which is more important for a student, {a} or {b}, and why?",
)


def synthetic_instruction(rng: random.Random) -> str:
    """A plausible generated instruction (about 6-20 words), from a space of millions."""
    kind = rng.random()
    if kind < 0.2:
        return rng.choice(_QUESTIONS).format(a=rng.choice(_TOPICS), b=rng.choice(_TOPICS))
    if kind < 0.6:
        instruction = f"{rng.choice(_VERBS)} {rng.choice(_TOPICS)} {rng.choice(_STYLES)}"
    else:
        instruction = f"Write {rng.choice(_OBJECTS)} about {rng.choice(_TOPICS)} {rng.choice(_STYLES)}"
    if rng.random() < 0.3:
        instruction += f", and relate it to {rng.choice(_TOPICS)}"
    return instruction + "."


def synthetic_responder(prompt: str, attempt: int = 0, items: int = 12) -> TextReply:
    """A deterministic self-instruct reply: the same prompt always gets the same items."""
    rng = random.Random(hashlib.sha256(prompt.encode()).hexdigest())
    first = int(prompt.rsplit("###\n", 1)[-1].split(".", 1)[0]) if "###\n" in prompt else 4
    blocks = []
    for number in range(first, min(first + items, 20)):
        instruction = synthetic_instruction(rng)
        task_input = "<noinput>" if rng.random() < 0.6 else f"Some context about {rng.choice(_TOPICS)}."
        header = f" {instruction}" if number == first else f"\n{number}. Instruction: {instruction}"
        blocks.append(f"{header}\n{number}. Input:\n{task_input}\n{number}. Output:\nAn answer about it.\n")
    return TextReply("###".join(blocks))
