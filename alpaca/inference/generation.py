"""Generating responses to instructions: `ResponseGenerator`, streaming, batched generation.

Decoding settings and stop strings are in `alpaca.inference.decoding`; loading the models to serve is in
`alpaca.inference.loading`.

The demo, batch mode and benchmarks all go through `ResponseGenerator`, so a reply is produced the
same way everywhere: prompt from the template, left padding with an attention mask, sampling only
when the temperature is above zero, the response cut out of the decoded text by the `Prompter`.

One lock per loaded model serializes generation on it. That keeps seeds meaningful (sampling draws
from torch's global RNG), lets several adapters share one base model (switching adapters is global
state), and keeps peft's `generate`, which patches the base model while it runs, out of races.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from alpaca.core.prompter import Prompter
from alpaca.inference.decoding import (
    DecodingSettings,
    GenerationLimits,
    StreamDecoder,
    build_generation_config,
    cut_at_stop,
    held_back,
    max_input_chars,
    template_stop_strings,
)


class _StopAtStrings:
    """A stopping criterion: a row is done once its generated text contains a stop string.

    Each step decodes only the last few generated tokens of each row: every ordinary token decodes to
    at least one byte, so a window of (longest stop string in bytes + 2) tokens holds any stop string
    completed by the newest token. A row that stopped is padded by `generate`; the reply is then trimmed at the
    earliest stop string (`cut_at_stop`), which also catches one completed on the last allowed token.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str], prompt_length: int):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.prompt_length = prompt_length
        self.window = max(len(stop.encode("utf-8")) for stop in self.stop_strings) + 2

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        tails = input_ids[:, self.prompt_length :][:, -self.window :]
        texts = self.tokenizer.batch_decode(tails, skip_special_tokens=True)
        done = [any(stop in text for stop in self.stop_strings) for text in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@dataclass
class GeneratedReply:
    """One generated response and the number of tokens generated for it (EOS and padding excluded)."""

    text: str
    num_tokens: int


class _TokenQueue:
    """A streamer for `generate` that hands each step's new token ids to another thread (the prompt,
    which `generate` puts first, is skipped); iterating ends after `end()`."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self._queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (item := self._queue.get()) is not None:
            yield item


class _StopWhenSet:
    """A stopping criterion that ends generation once an event is set (the reader went away)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        return torch.full(
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


class ResponseGenerator:
    """Answers instructions with one model (a base model, or one adapter of a `PeftModel`).

    Args:
        model: a transformers causal LM or a peft `PeftModel`, already on its device and in eval mode.
        tokenizer: its tokenizer; it must have a pad token that is not EOS (see `load_tokenizer`).
        prompter: turns instruction + input into the prompt and cuts the response out of the output.
        name: how this model is labelled in the page and in batch outputs.
        adapter_name: which adapter of a `PeftModel` to use; None runs the base model alone (adapters
            disabled). Ignored for plain models.
        lock: shared by every `ResponseGenerator` over the same model object.
        limits: prompt length and `max_new_tokens` limits.
        stop_strings: generation stops once the reply contains one of these, and the reply is cut
            before it. None derives them from the template (`template_stop_strings`); () disables them.
        source: where the model came from (base model flag, its folder, GGUF file, adapter), recorded
            beside batch outputs.
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompter: Prompter,
        name: str,
        adapter_name: str | None = None,
        lock: threading.Lock | None = None,
        limits: GenerationLimits | None = None,
        stop_strings: Sequence[str] | None = None,
        source: dict | None = None,
    ):
        self.model = model
        self.source = dict(source or {})
        self.tokenizer = tokenizer
        self.prompter = prompter
        self.name = name
        self.adapter_name = adapter_name
        self.lock = lock or threading.Lock()
        self.limits = limits or GenerationLimits()
        if stop_strings is None:
            # a chat template (ChatPrompter) has no text markers: its end-of-turn token ends a reply
            stop_strings = template_stop_strings(prompter.template) if prompter.template is not None else ()
        self.stop_strings = tuple(stop for stop in stop_strings if stop)
        self.end_ids = list(getattr(prompter, "end_ids", None) or [])

    def prompt_for(self, instruction: str, input: str | None = None, index: int | None = None) -> str:
        """The prompt for one request, after checking it; `index` names a batch record in errors."""
        where = f"record {index}: " if index is not None else ""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"{where}the instruction is empty: type what the model should do")
        if input is not None and not isinstance(input, str):
            raise ValueError(f"{where}the input must be text, got {type(input).__name__}")
        num_chars = len(instruction) + len(input or "")
        if num_chars > max_input_chars(self.limits):
            raise ValueError(
                f"{where}the instruction and input are {num_chars} characters long, far over the limit of "
                f"{self.limits.max_input_tokens} tokens (--max_input_tokens; at most {max_input_chars(self.limits)} "
                "characters are even tokenized): shorten the instruction or input"
            )
        return self._checked_length(self.prompter.generate_prompt(instruction, input or None), where)

    def prompt_for_messages(self, messages, index: int | None = None) -> str:
        """The prompt for a conversation (OpenAI `messages`) whose reply comes next, in the format this
        model was trained in: its chat template, or for an Alpaca-trained model the Alpaca template as
        Jinja (the last user message is the instruction, a system message its input)."""
        from alpaca.core.chat import alpaca_chat_template, conversation_messages, render

        where = f"record {index}: " if index is not None else ""
        checked = conversation_messages(
            {"messages": [*messages, {"role": "assistant", "content": "-"}]}, index or 0, "chat"
        )
        checked = checked[:-1]
        if not checked or checked[-1]["role"] != "user":
            raise ValueError(f"{where}the conversation must end with a user message")
        num_chars = sum(len(m["content"]) for m in checked)
        if num_chars > max_input_chars(self.limits):
            raise ValueError(
                f"{where}the conversation is {num_chars} characters long, far over the limit of "
                f"{self.limits.max_input_tokens} tokens (--max_input_tokens): shorten it"
            )
        if hasattr(self.prompter, "render_chat"):
            prompt = self.prompter.render_chat(checked)
        else:
            prompt = render(alpaca_chat_template(self.prompter.template), checked, self.tokenizer, True)
        return self._checked_length(prompt, where)

    def _checked_length(self, prompt: str, where: str) -> str:
        num_tokens = len(self.tokenizer(prompt)["input_ids"])
        if num_tokens > self.limits.max_input_tokens:
            raise ValueError(
                f"{where}the prompt is {num_tokens} tokens long, over the limit of "
                f"{self.limits.max_input_tokens} tokens (--max_input_tokens): shorten the instruction or input"
            )
        return prompt

    def generate(
        self, instruction: str, input: str | None = None, settings: DecodingSettings | None = None
    ) -> str:
        """The response to one instruction."""
        return self.generate_replies([(instruction, input)], settings)[0].text

    def generate_batch(
        self, requests: Sequence[tuple[str, str | None]], settings: DecodingSettings | None = None
    ):
        """Responses to several `(instruction, input)` pairs, generated together in one batch."""
        return [reply.text for reply in self.generate_replies(requests, settings)]

    def generate_replies(
        self, requests: Sequence[tuple[str, str | None]], settings: DecodingSettings | None = None
    ) -> list[GeneratedReply]:
        """Generate for a batch of `(instruction, input)` pairs, left-padded with an attention mask.

        Left padding keeps every prompt's last token at the end of the row, where generation continues,
        and the attention mask hides the padding. Positions need no correction: OPT-style models derive
        them from the mask, and rotary attention (LLaMA) depends only on relative positions. So under
        greedy decoding each row's output equals the output for that prompt alone (tested). A row
        ends at EOS or at a stop string; `num_tokens` counts its tokens up to there.
        """
        prompts = [self.prompt_for(instruction, input) for instruction, input in requests]
        return self.replies_to_prompts(prompts, settings)

    def chat_replies(
        self, conversations: Sequence[list[dict]], settings: DecodingSettings | None = None
    ) -> list[GeneratedReply]:
        """Replies to several conversations (each ending with a user message), generated together."""
        return self.replies_to_prompts([self.prompt_for_messages(m) for m in conversations], settings)

    def replies_to_prompts(
        self, prompts: list[str], settings: DecodingSettings | None = None
    ) -> list[GeneratedReply]:
        """Generate for checked prompts (`prompt_for`, `prompt_for_messages`), batched."""
        settings = settings or DecodingSettings()
        encoded = self._encode(prompts)
        config = build_generation_config(self.tokenizer, settings, eos_token_ids=self.end_ids)
        prompt_length = encoded["input_ids"].shape[1]
        with self.using_model(settings):
            output = self.model.generate(
                **encoded, generation_config=config, stopping_criteria=self._stopping_criteria(prompt_length)
            )
        ended = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id, *self.end_ids}
        replies = []
        for row, prompt_ids in zip(output, encoded["input_ids"]):
            generated = row[prompt_length:].tolist()
            num_tokens = next((i for i, token in enumerate(generated) if token in ended), len(generated))
            replies.append(GeneratedReply(self._response(prompt_ids, row), num_tokens))
        return replies

    def stream(
        self, instruction: str, input: str | None = None, settings: DecodingSettings | None = None
    ) -> Iterator[str]:
        """Yield the response so far, growing as tokens are generated; ends at EOS, a stop string or the
        token limit.

        Generation runs in a thread that hands each new token over (`_TokenQueue`). If the reader stops
        early (Gradio closes the generator when a request is cancelled), generation stops at the next
        token. Only text that no later token can change is shown (`StreamDecoder.settled_text`: a run
        of byte-fallback tokens or an incomplete UTF-8 character is held back), and so is text that may
        be the start of a stop string, so every update extends the previous one. The last update is
        `generate`'s reply for the same tokens, decoded the same way.
        """
        return self.stream_prompt(self.prompt_for(instruction, input), settings)

    def stream_chat(self, messages: list[dict], settings: DecodingSettings | None = None) -> Iterator[str]:
        """`stream` for a conversation whose reply comes next (the page's Chat tab)."""
        return self.stream_prompt(self.prompt_for_messages(messages), settings)

    def stream_prompt(self, prompt: str, settings: DecodingSettings | None = None) -> Iterator[str]:
        """`stream` for a checked prompt."""
        settings = settings or DecodingSettings()
        encoded = self._encode([prompt])
        prompt_ids = encoded["input_ids"][0]
        config = build_generation_config(self.tokenizer, settings, streaming=True, eos_token_ids=self.end_ids)
        tokens = _TokenQueue()
        stop = threading.Event()
        failure: list[BaseException] = []
        criteria = self._stopping_criteria(encoded["input_ids"].shape[1], _StopWhenSet(stop))

        def run() -> None:
            try:
                with self.using_model(settings):
                    self.model.generate(
                        **encoded, generation_config=config, streamer=tokens, stopping_criteria=criteria
                    )
            except BaseException as err:  # re-raised in the reader's thread below
                failure.append(err)
            finally:
                tokens.end()

        thread = threading.Thread(target=run, name=f"stream-{self.name}", daemon=True)
        thread.start()
        decoder = StreamDecoder(self.tokenizer, prompt_ids.tolist())
        decoded_prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        generated: list[int] = []
        response, yielded = "", False
        try:
            for new_tokens in tokens:
                generated.extend(new_tokens)
                whole = self.prompter.get_response(
                    decoded_prompt + decoder.text(generated), prompt=decoded_prompt
                )
                if cut_at_stop(whole, self.stop_strings)[1]:
                    continue  # generation ends at this token too (`_StopAtStrings`); the reply is final below
                settled = decoder.settled_text(generated)
                current = self.prompter.get_response(decoded_prompt + settled, prompt=decoded_prompt)
                current = current[: len(current) - held_back(current, self.stop_strings)].rstrip()
                if len(current) > len(response) and current.startswith(response):
                    response, yielded = current, True
                    yield response
        finally:
            stop.set()
            thread.join()
        if failure:
            raise failure[0]
        final = self._response(prompt_ids, prompt_ids.tolist() + generated)
        if final != response or not yielded:
            yield final

    def _stopping_criteria(self, prompt_length: int, *extra):
        from transformers import StoppingCriteriaList

        criteria = list(extra)
        if self.stop_strings:
            criteria.append(_StopAtStrings(self.tokenizer, self.stop_strings, prompt_length))
        return StoppingCriteriaList(criteria)

    def _encode(self, prompts: list[str]):
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        device = getattr(self.model, "device", None) or "cpu"
        return {key: encoded[key].to(device) for key in ("input_ids", "attention_mask")}

    def _response(self, prompt_ids, output_ids) -> str:
        # Decode the prompt the same way as the output, so that the prompt is an exact prefix of the
        # decoded output; the template's response marker is the fallback.
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        output = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        return cut_at_stop(self.prompter.get_response(output, prompt=prompt), self.stop_strings)[0]

    @contextmanager
    def using_model(self, settings: DecodingSettings):
        """Hold the model for one generation: this generator's lock (other users of the model wait), its
        adapter active (or the base with the adapter disabled), no autograd, and the request's seed when
        it samples. The API's batch scheduler runs its own decoding loop inside this."""
        import torch

        with self.lock, self.adapter_context(), torch.inference_mode():
            if settings.do_sample and settings.seed is not None:
                torch.manual_seed(settings.seed)
            yield

    def adapter_context(self):
        """A context in which the model computes as this generator's adapter (or as the bare base when
        `adapter_name` is None): for forward passes outside `generate`, such as a loss."""
        # A PeftModel exists only once peft is imported; importing it just to check would import
        # bitsandbytes too (peft does when it is installed), for every plain model.
        peft = sys.modules.get("peft")
        if peft is None or not isinstance(self.model, peft.PeftModel):
            return nullcontext()
        if self.adapter_name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(self.adapter_name)
        return nullcontext()
