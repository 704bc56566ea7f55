"""Generating responses to instructions: decoding settings, streaming, batched generation.

The demo, batch mode and benchmarks all go through `ResponseGenerator`, so a reply is produced the
same way everywhere: prompt from the template, left padding with an attention mask, sampling only
when the temperature is above zero, the response cut out of the decoded text by the `Prompter`.

One lock per loaded model serializes generation on it. That keeps seeds meaningful (sampling draws
from torch's global RNG), lets several adapters share one base model (switching adapters is global
state), and keeps peft's `generate`, which patches the base model while it runs, out of races.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from alpaca.modeling import (
    check_adapter_fits,
    check_model_path,
    load_adapter,
    load_base_model,
    load_tokenizer,
    pick_device,
    read_adapter_config,
    resolve_dtype,
)
from alpaca.prompter import Prompter

logger = logging.getLogger(__name__)

MAX_BEAMS = 4
MAX_TEMPERATURE = 2.0


@dataclass
class DecodingSettings:
    """How to decode; the defaults are upstream Alpaca-LoRA's page defaults.

    Attributes:
        temperature: 0 decodes greedily; above 0 samples, with top-p and top-k applied.
        top_p: nucleus sampling mass (1 turns it off); used only when sampling.
        top_k: sample among the k most likely tokens (0 turns it off); used only when sampling.
        num_beams: beam search width; 1 is plain greedy or sampling. Streaming always uses 1.
        max_new_tokens: the most tokens to generate after the prompt.
        seed: seeds torch's RNG before generating, so a sampled reply can be reproduced; None or a
            negative value leaves the RNG as it is.
    """

    temperature: float = 0.1
    top_p: float = 0.75
    top_k: int = 40
    num_beams: int = 4
    max_new_tokens: int = 128
    seed: int | None = None

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0


@dataclass
class GenerationLimits:
    """Server-side limits that no request may exceed (page sliders can be bypassed through the API).

    Attributes:
        max_input_tokens: the longest prompt, in tokens, template included.
        max_new_tokens: the largest `max_new_tokens` a request may ask for.
    """

    max_input_tokens: int = 1024
    max_new_tokens: int = 1024


def make_settings(
    temperature: float = 0.1,
    top_p: float = 0.75,
    top_k: int = 40,
    num_beams: int = 4,
    max_new_tokens: int = 128,
    seed: float | int | None = None,
    limits: GenerationLimits | None = None,
) -> DecodingSettings:
    """Build `DecodingSettings` from loosely typed values (sliders send floats) and check them.

    Every problem is collected into one ValueError, so a user fixes them all at once.
    """
    limits = limits or GenerationLimits()
    problems = []
    values = {"temperature": temperature, "top_p": top_p, "top_k": top_k, "num_beams": num_beams}
    values["max_new_tokens"] = max_new_tokens
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{name} must be a number, got {value!r}")
    if problems:
        raise ValueError("Invalid decoding settings: " + "; ".join(problems))
    if not 0 <= temperature <= MAX_TEMPERATURE:
        problems.append(f"temperature must be between 0 and {MAX_TEMPERATURE}, got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be above 0 and at most 1, got {top_p}")
    if top_k < 0 or top_k != int(top_k):
        problems.append(f"top_k must be a whole number >= 0, got {top_k}")
    if not 1 <= num_beams <= MAX_BEAMS or num_beams != int(num_beams):
        problems.append(f"num_beams (Beams) must be a whole number from 1 to {MAX_BEAMS}, got {num_beams}")
    if not 1 <= max_new_tokens <= limits.max_new_tokens or max_new_tokens != int(max_new_tokens):
        problems.append(
            f"max_new_tokens (Max tokens) must be a whole number from 1 to {limits.max_new_tokens} "
            f"(the server's --max_new_tokens_limit), got {max_new_tokens}"
        )
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, int | float) or seed != int(seed)
    ):
        problems.append(f"seed must be a whole number (or -1 for random), got {seed!r}")
    if problems:
        raise ValueError("Invalid decoding settings: " + "; ".join(problems))
    return DecodingSettings(
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        num_beams=int(num_beams),
        max_new_tokens=int(max_new_tokens),
        seed=int(seed) if seed is not None and seed >= 0 else None,
    )


def build_generation_config(tokenizer, settings: DecodingSettings, streaming: bool = False):
    """A `GenerationConfig` for `settings`: sampling switched on only when temperature > 0.

    Upstream passed temperature / top-p / top-k without `do_sample=True`, so its sliders did nothing.
    Greedy configs carry no sampling parameters (transformers warns about unused ones). Streaming
    uses one beam because `TextIteratorStreamer` cannot follow several beams.
    """
    from transformers import GenerationConfig

    kwargs = dict(
        max_new_tokens=settings.max_new_tokens,
        num_beams=1 if streaming else settings.num_beams,
        do_sample=settings.do_sample,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    if settings.do_sample:
        kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
    else:
        # Neutral values: the model's own generation_config may carry sampling defaults.
        kwargs.update(temperature=1.0, top_p=1.0, top_k=50)
    return GenerationConfig(**kwargs)


@dataclass
class Reply:
    """One generated response and the number of tokens generated for it (EOS and padding excluded)."""

    text: str
    num_tokens: int


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
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prompter = prompter
        self.name = name
        self.adapter_name = adapter_name
        self.lock = lock or threading.Lock()
        self.limits = limits or GenerationLimits()

    def prompt_for(self, instruction: str, input: str | None = None, index: int | None = None) -> str:
        """The prompt for one request, after checking it; `index` names a batch record in errors."""
        where = f"record {index}: " if index is not None else ""
        if not isinstance(instruction, str) or not instruction.strip():
            raise ValueError(f"{where}the instruction is empty: type what the model should do")
        if input is not None and not isinstance(input, str):
            raise ValueError(f"{where}the input must be text, got {type(input).__name__}")
        prompt = self.prompter.generate_prompt(instruction, input or None)
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
    ) -> list[Reply]:
        """Generate for a batch of `(instruction, input)` pairs, left-padded with an attention mask.

        Left padding keeps every prompt's last token at the end of the row, where generation continues,
        and the attention mask hides the padding. Positions need no correction: OPT-style models derive
        them from the mask, and rotary attention (LLaMA) depends only on relative positions. So under
        greedy decoding each row's output equals the output for that prompt alone (tested).
        """
        settings = settings or DecodingSettings()
        prompts = [self.prompt_for(instruction, input) for instruction, input in requests]
        encoded = self._encode(prompts)
        config = build_generation_config(self.tokenizer, settings)
        with self._using_model(settings):
            output = self.model.generate(**encoded, generation_config=config)
        prompt_length = encoded["input_ids"].shape[1]
        replies = []
        for row, prompt_ids in zip(output, encoded["input_ids"]):
            ends = (row[prompt_length:] == self.tokenizer.eos_token_id).nonzero()
            num_tokens = int(ends[0, 0]) if len(ends) else len(row) - prompt_length
            replies.append(Reply(self._response(prompt_ids, row), num_tokens))
        return replies

    def stream(
        self, instruction: str, input: str | None = None, settings: DecodingSettings | None = None
    ) -> Iterator[str]:
        """Yield the response so far, growing as tokens are generated; ends at EOS or the token limit.

        Generation runs in a thread that feeds a `TextIteratorStreamer`. If the reader stops early
        (Gradio closes the generator when a request is cancelled), generation stops at the next token.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        settings = settings or DecodingSettings()
        prompt = self.prompt_for(instruction, input)
        encoded = self._encode([prompt])
        config = build_generation_config(self.tokenizer, settings, streaming=True)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with self._using_model(settings):
                    self.model.generate(
                        **encoded,
                        generation_config=config,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_StopWhenSet(stop)]),
                    )
            except BaseException as err:  # re-raised in the reader's thread below
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=run, name=f"stream-{self.name}", daemon=True)
        thread.start()
        text, response, yielded = "", "", False
        try:
            for piece in streamer:
                text += piece
                current = self.prompter.get_response(prompt + text, prompt=prompt)
                if current != response:
                    response, yielded = current, True
                    yield response
        finally:
            stop.set()
            thread.join()
        if failure:
            raise failure[0]
        if not yielded:
            yield response

    def _encode(self, prompts: list[str]):
        encoded = self.tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
        device = getattr(self.model, "device", None) or "cpu"
        return {key: encoded[key].to(device) for key in ("input_ids", "attention_mask")}

    def _response(self, prompt_ids, output_ids) -> str:
        # Decode the prompt the same way as the output, so that the prompt is an exact prefix of the
        # decoded output; the template's response marker is the fallback.
        prompt = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        output = self.tokenizer.decode(output_ids, skip_special_tokens=True)
        return self.prompter.get_response(output, prompt=prompt)

    @contextmanager
    def _using_model(self, settings: DecodingSettings):
        import torch

        with self.lock, self._adapter_context(), torch.inference_mode():
            if settings.do_sample and settings.seed is not None:
                torch.manual_seed(settings.seed)
            yield

    def _adapter_context(self):
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            return nullcontext()
        if self.adapter_name is None:
            return self.model.disable_adapter()
        self.model.set_adapter(self.adapter_name)
        return nullcontext()


def split_list(value: str | Sequence[str] | None) -> list[str]:
    """`"a,b"` (or fire's tuple for `--flag=a,b`) -> `["a", "b"]`; empty entries dropped."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else [str(item) for item in value]
    return [item.strip() for item in items if item.strip()]


def display_name(path: str) -> str:
    """A short label for a model path or hub id: its last component."""
    return Path(path.rstrip("/")).name or path


def add_adapter(peft_model, lora_weights: str, adapter_name: str) -> None:
    """Load one more adapter into a `PeftModel` under `adapter_name` and check that it fits."""
    read_adapter_config(lora_weights)
    try:
        peft_model.load_adapter(lora_weights, adapter_name=adapter_name)
    except (RuntimeError, ValueError, KeyError) as err:
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"--compare_lora_weights={lora_weights!r} does not fit the base model: {detail}. "
            "Was it trained on another base model?"
        ) from err
    check_adapter_fits(peft_model, lora_weights, adapter_name, "--compare_lora_weights")


def load_model(
    base_model: str,
    load_8bit: bool = False,
    load_4bit: bool = False,
    precision: str = "auto",
    trust_remote_code: bool = False,
):
    """Load a base model for inference on the best device, in a dtype that suits it, and its tokenizer.

    bf16 or fp16 on a GPU, fp16 on Apple's MPS, fp32 on the CPU (upstream cast to fp16 everywhere,
    which is slow or unsupported on CPUs). The tokenizer pads on the left, for batched generation.
    """
    device = pick_device()
    dtype = resolve_dtype(precision, device)
    device_map = {"cuda": "auto", "mps": {"": "mps"}}.get(device)
    if (load_8bit or load_4bit) and device_map is None:
        device_map = {"": device}
    model = load_base_model(
        base_model,
        load_in_8bit=load_8bit,
        load_in_4bit=load_4bit,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=trust_remote_code,
    )
    model.eval()
    tokenizer = load_tokenizer(base_model, padding_side="left", trust_remote_code=trust_remote_code)
    return model, tokenizer


def load_generators(
    base_model: str,
    lora_weights: str = "",
    compare_lora_weights: str | Sequence[str] = "",
    compare_base_models: str | Sequence[str] = "",
    prompt_template: str = "",
    load_8bit: bool = False,
    load_4bit: bool = False,
    precision: str = "auto",
    trust_remote_code: bool = False,
    limits: GenerationLimits | None = None,
) -> list[ResponseGenerator]:
    """Load the models to serve; the first generator is the main one (base + `lora_weights`).

    Extra adapters share the base model's weights (one `PeftModel` with named adapters); when any
    adapter is loaded, the base model alone is offered too, for comparison. Each of
    `compare_base_models` is loaded as a separate model without adapters.
    """
    prompter = Prompter(prompt_template or None)
    limits = limits or GenerationLimits()
    extra_adapters = split_list(compare_lora_weights)
    check_model_path(base_model, "--base_model")
    for path in [lora_weights, *extra_adapters]:
        if path:
            read_adapter_config(path)
    model, tokenizer = load_model(base_model, load_8bit, load_4bit, precision, trust_remote_code)
    lock = threading.Lock()
    base_label = display_name(base_model)
    generators = []
    adapters = [path for path in [lora_weights, *extra_adapters] if path]
    if adapters:
        flag = "--lora_weights" if lora_weights else "--compare_lora_weights"
        model = load_adapter(model, adapters[0], adapter_name="adapter0", flag=flag)
        for index, path in enumerate(adapters[1:], start=1):
            add_adapter(model, path, f"adapter{index}")
        model.eval()
        for index, path in enumerate(adapters):
            label = f"{base_label} + {display_name(path)}"
            generators.append(
                ResponseGenerator(model, tokenizer, prompter, label, f"adapter{index}", lock, limits)
            )
        if not lora_weights:
            generators.insert(
                0, ResponseGenerator(model, tokenizer, prompter, base_label, None, lock, limits)
            )
        else:
            generators.append(
                ResponseGenerator(
                    model, tokenizer, prompter, f"{base_label} (no adapter)", None, lock, limits
                )
            )
    else:
        generators.append(ResponseGenerator(model, tokenizer, prompter, base_label, None, lock, limits))
    for path in split_list(compare_base_models):
        other, other_tokenizer = load_model(path, load_8bit, load_4bit, precision, trust_remote_code)
        generators.append(
            ResponseGenerator(other, other_tokenizer, prompter, display_name(path), None, None, limits)
        )
    _make_names_unique(generators)
    return generators


def _make_names_unique(generators: list[ResponseGenerator]) -> None:
    seen: dict[str, int] = {}
    for generator in generators:
        count = seen.get(generator.name, 0)
        seen[generator.name] = count + 1
        if count:
            generator.name = f"{generator.name} ({count + 1})"


def describe(
    generators: list[ResponseGenerator], settings: DecodingSettings, limits: GenerationLimits
) -> dict:
    """The resolved configuration, for printing once at start-up."""
    return {
        "models": [generator.name for generator in generators],
        "device": str(getattr(generators[0].model, "device", "cpu")),
        "dtype": str(getattr(generators[0].model, "dtype", "")),
        "decoding": asdict(settings),
        "limits": asdict(limits),
    }
