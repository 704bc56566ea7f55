"""Generating responses to instructions: decoding settings, streaming, batched generation.

The demo, batch mode and benchmarks all go through `ResponseGenerator`, so a reply is produced the
same way everywhere: prompt from the template, left padding with an attention mask, sampling only
when the temperature is above zero, the response cut out of the decoded text by the `Prompter`.

One lock per loaded model serializes generation on it. That keeps seeds meaningful (sampling draws
from torch's global RNG), lets several adapters share one base model (switching adapters is global
state), and keeps peft's `generate`, which patches the base model while it runs, out of races.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

from alpaca.modeling import (
    check_adapter_fits,
    load_adapter,
    load_base_model,
    load_tokenizer,
    pick_device,
    read_adapter_config,
    resolve_base_model,
    resolve_dtype,
)
from alpaca.prompter import Prompter

MAX_BEAMS = 4
MAX_TEMPERATURE = 2.0
# No tokenizer in use packs more characters than this into a token of ordinary text (English BPE
# averages about 4), so text over max_input_tokens * MAX_CHARS_PER_TOKEN characters is over the token
# limit too and is refused without tokenizing it (a 50 MB instruction took 99 s and 2.4 GB to tokenize).
MAX_CHARS_PER_TOKEN = 32


@dataclass
class DecodingSettings:
    """How to decode; the defaults are upstream Alpaca-LoRA's page defaults.

    Attributes:
        temperature: 0 is deterministic: greedy with `num_beams=1`, beam search with more beams (the
            default 4); above 0 samples, with top-p and top-k applied.
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


def max_input_chars(limits: GenerationLimits) -> int:
    """The character bound of a request's instruction plus input, derived from `max_input_tokens`."""
    return limits.max_input_tokens * MAX_CHARS_PER_TOKEN


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


def template_stop_strings(template: dict) -> tuple[str, ...]:
    """The text that starts a new turn in a prompt template, derived from the template itself.

    A model that has answered often goes on to invent the next turn ("### Instruction:", "### Input:",
    "### Response:"). The markers are the headers that introduce `{instruction}` and `{input}` (the
    line before the placeholder, or the text before it on its own line), the template's
    `response_split`, and the opening words both prompts share (Alpaca's "Below is an instruction
    that describes a task"), when they are not a marker already.
    """
    markers = []
    for prompt in (template["prompt_input"], template["prompt_no_input"]):
        lines = prompt.splitlines()
        for index, line in enumerate(lines):
            position = min((line.find(p) for p in ("{instruction}", "{input}") if p in line), default=-1)
            if position < 0:
                continue
            before = line[:position].strip()
            previous = next((text.strip() for text in reversed(lines[:index]) if text.strip()), "")
            marker = before or previous
            if marker and "{" not in marker:
                markers.append(marker)
    markers.append(template["response_split"].strip())
    first_lines = [
        template[key].splitlines()[0] if template[key] else "" for key in ("prompt_input", "prompt_no_input")
    ]
    opening = os.path.commonprefix(first_lines).split("{")[0].rstrip(" ,.;:")
    if len(opening) >= 16 and not any(opening.startswith(marker) for marker in markers):
        markers.append(opening)
    return tuple(dict.fromkeys(marker for marker in markers if marker))


def parse_stop_strings(value) -> tuple[str, ...]:
    r"""`--stop` -> stop strings: a comma-separated list (or fire's tuple); `\n` stands for a newline."""
    if isinstance(value, bool):
        raise ValueError('--stop needs a value: --stop="### Instruction:,### Input:", or --stop="" for none')
    if isinstance(value, int | float):
        value = str(value)
    return tuple(item.replace("\\n", "\n") for item in split_list(value))


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop string (trailing space removed), and whether one was found."""
    cut = min(
        (index for index in (text.find(stop) for stop in stop_strings if stop) if index >= 0), default=-1
    )
    if cut < 0:
        return text, False
    return text[:cut].rstrip(), True


def held_back(text: str, stop_strings: Sequence[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string (so a stream
    must not show them yet: the final reply would drop them)."""
    longest = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


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
            stop_strings = template_stop_strings(prompter.template)
        self.stop_strings = tuple(stop for stop in stop_strings if stop)

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
    ) -> list[GeneratedReply]:
        """Generate for a batch of `(instruction, input)` pairs, left-padded with an attention mask.

        Left padding keeps every prompt's last token at the end of the row, where generation continues,
        and the attention mask hides the padding. Positions need no correction: OPT-style models derive
        them from the mask, and rotary attention (LLaMA) depends only on relative positions. So under
        greedy decoding each row's output equals the output for that prompt alone (tested). A row
        ends at EOS or at a stop string; `num_tokens` counts its tokens up to there.
        """
        settings = settings or DecodingSettings()
        prompts = [self.prompt_for(instruction, input) for instruction, input in requests]
        encoded = self._encode(prompts)
        config = build_generation_config(self.tokenizer, settings)
        prompt_length = encoded["input_ids"].shape[1]
        with self.using_model(settings):
            output = self.model.generate(
                **encoded, generation_config=config, stopping_criteria=self._stopping_criteria(prompt_length)
            )
        ended = {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
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

        Generation runs in a thread that feeds a `TextIteratorStreamer`. If the reader stops early
        (Gradio closes the generator when a request is cancelled), generation stops at the next token.
        Text that may be the start of a stop string is held back until it is clearly not one, so every
        update extends the previous one and the last equals `generate`'s reply.
        """
        from transformers import TextIteratorStreamer

        settings = settings or DecodingSettings()
        prompt = self.prompt_for(instruction, input)
        encoded = self._encode([prompt])
        config = build_generation_config(self.tokenizer, settings, streaming=True)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        failure: list[BaseException] = []
        criteria = self._stopping_criteria(encoded["input_ids"].shape[1], _StopWhenSet(stop))

        def run() -> None:
            try:
                with self.using_model(settings):
                    self.model.generate(
                        **encoded, generation_config=config, streamer=streamer, stopping_criteria=criteria
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
                current, stopped = cut_at_stop(
                    self.prompter.get_response(prompt + text, prompt=prompt), self.stop_strings
                )
                if not stopped:
                    current = current[: len(current) - held_back(current, self.stop_strings)].rstrip()
                if current != response:
                    response, yielded = current, True
                    yield response
                if stopped:
                    break
            else:
                final = cut_at_stop(
                    self.prompter.get_response(prompt + text, prompt=prompt), self.stop_strings
                )[0]
                if final != response:
                    response, yielded = final, True
                    yield response
        finally:
            stop.set()
            thread.join()
        if failure:
            raise failure[0]
        if not yielded:
            yield response

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


def split_list(value: str | Sequence[str] | None) -> list[str]:
    """`"a,b"` (or fire's tuple for `--flag=a,b`) -> `["a", "b"]`; empty entries dropped."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else [str(item) for item in value]
    return [item.strip() for item in items if item.strip()]


GENERIC_FOLDER_NAMES = {"hf", "merged", "model", "models", "output", "outputs", "final", "adapter", "lora"}


def display_name(path: str) -> str:
    """A short label for a model path, GGUF file or hub id: its last component, without `.gguf`;
    with the parent folder's name when the last one says nothing (`hf`, `checkpoint-200`, ...)."""
    path = Path(str(path).rstrip("/"))
    name = path.name or str(path)
    if name.lower().endswith(".gguf"):
        return name[: -len(".gguf")]
    generic = name.lower() in GENERIC_FOLDER_NAMES or re.fullmatch(r"checkpoint-\d+", name)
    if generic and path.parent.name:
        return f"{path.parent.name}/{name}"
    return name


def model_label(base_model: str, folder: str) -> str:
    """The label of a base model: for a merged export (its `export_info.json` names the base and the
    adapter), "base + adapter (merged)"; otherwise `display_name` of what the user passed."""
    info_path = Path(folder) / "export_info.json"
    if info_path.is_file():
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            info = {}
        if isinstance(info, dict) and info.get("base_model") and info.get("lora_weights"):
            return f"{display_name(info['base_model'])} + {display_name(info['lora_weights'])} (merged)"
    return display_name(base_model)


def check_hub_adapter(lora_weights: str, flag: str = "--lora_weights") -> None:
    """For an adapter given as a hub id, fetch its `adapter_config.json` (from the cache when offline)
    before the slow model load; a failure says the adapter could not be fetched, and how to go on.

    Without this check, peft's own failure offline surfaced as "does not fit the base model".
    """
    if not lora_weights or read_adapter_config(lora_weights, flag) is not None:
        return
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(lora_weights, "adapter_config.json")
    except Exception as err:  # offline, no network, no such repository, gated, malformed id
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        reason = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else type(err).__name__
        detail = (str(err).strip().splitlines() or [""])[0][:200]
        raise ValueError(
            f"{flag}={lora_weights!r} is not a local folder and could not be fetched from the Hugging Face "
            f'hub ({reason}: {detail}). Pass a local adapter folder, or {flag}="" to run the base '
            "model alone (or a merged model)."
        ) from err


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


def inference_precision(precision: str, device: str) -> tuple[object, str]:
    """The dtype to load a model in for generation on `device`, and why (for the start-up report).

    On the CPU, bf16 weights pay off only where the CPU computes bf16 natively: measured on SmolLM2
    (one thread, greedy, avx512_bf16) bf16 weights generated 1.45x (batch 1) and 2.3x (batch 8) the fp32
    tokens/s, while bf16 autocast over fp32 weights was slower than fp32 at batch 1 (it re-casts every
    weight at every step). Without native bf16 it is emulated and slow, so fp32 runs instead.
    """
    import torch

    import alpaca.modeling

    dtype = resolve_dtype(precision, device)
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    if device != "cpu" or dtype != torch.bfloat16:
        source = "--precision=auto on " + device if precision == "auto" else f"--precision={precision}"
        return dtype, f"{names[dtype]} ({source})"
    if alpaca.modeling.cpu_has_native_bf16():
        return dtype, "bf16 weights (--precision=bf16; this CPU has native bf16 instructions)"
    return torch.float32, (
        "warning: fp32, not the --precision=bf16 asked for: this CPU has no native bf16 (avx512_bf16, AMX "
        "or Arm BF16), where bf16 is emulated and slower than fp32"
    )


def load_model(
    base_model: str,
    load_8bit: bool = False,
    load_4bit: bool = False,
    precision: str = "auto",
    trust_remote_code: bool = False,
):
    """Load a base model for inference on the best device, in a dtype that suits it, and its tokenizer.

    bf16 or fp16 on a GPU, fp16 on Apple's MPS, fp32 on the CPU unless --precision=bf16 and the CPU has
    native bf16 (upstream cast to fp16 everywhere, which is slow or unsupported on CPUs). The tokenizer
    pads on the left, for batched generation. `model.resolved_precision` says which precision runs and why.
    """
    device = pick_device()
    dtype, why = inference_precision(precision, device)
    if why.startswith("warning:"):
        print(why, file=sys.stderr)
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
    model.resolved_precision = why
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
    stop_strings: Sequence[str] | None = None,
) -> list[ResponseGenerator]:
    """Load the models to serve; the first generator is the main one (base + `lora_weights`).

    Extra adapters share the base model's weights (one `PeftModel` with named adapters); when any
    adapter is loaded, the base model alone is offered too, for comparison. Each of
    `compare_base_models` is loaded as a separate model without adapters. A `.gguf` base model is
    converted once to a cached HF folder. `stop_strings`: None derives them from the template.
    """
    prompter = Prompter(prompt_template or None)
    common = dict(prompter=prompter, limits=limits or GenerationLimits(), stop_strings=stop_strings)
    extra_adapters = split_list(compare_lora_weights)
    # Every path is checked before the slow loads: a typo in the last flag should not cost a model load.
    folder, gguf_info = resolve_base_model(base_model, "--base_model")
    check_hub_adapter(lora_weights, "--lora_weights")
    for path in extra_adapters:
        check_hub_adapter(path, "--compare_lora_weights")
    others = [
        (path, *resolve_base_model(path, "--compare_base_models")) for path in split_list(compare_base_models)
    ]
    source = {"base_model": base_model, "base_model_folder": folder, "base_model_gguf": gguf_info}
    model, tokenizer = load_model(folder, load_8bit, load_4bit, precision, trust_remote_code)
    source["precision"] = model.resolved_precision  # written beside batch outputs
    lock = threading.Lock()
    base_label = model_label(base_model, folder)
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
                ResponseGenerator(
                    model,
                    tokenizer,
                    name=label,
                    adapter_name=f"adapter{index}",
                    lock=lock,
                    source={**source, "lora_weights": path},
                    **common,
                )
            )
        alone = base_label if not lora_weights else f"{base_label} (no adapter)"
        base_alone = ResponseGenerator(model, tokenizer, name=alone, lock=lock, source=source, **common)
        generators.insert(0 if not lora_weights else len(generators), base_alone)
    else:
        generators.append(
            ResponseGenerator(model, tokenizer, name=base_label, lock=lock, source=source, **common)
        )
    for path, other_folder, other_gguf in others:
        other, other_tokenizer = load_model(other_folder, load_8bit, load_4bit, precision, trust_remote_code)
        other_source = {
            "base_model": path,
            "base_model_folder": other_folder,
            "base_model_gguf": other_gguf,
            "precision": other.resolved_precision,
        }
        label = model_label(path, other_folder)
        generators.append(
            ResponseGenerator(other, other_tokenizer, name=label, source=other_source, **common)
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
        "base_model": generators[0].source.get("base_model"),
        "base_model_folder": generators[0].source.get("base_model_folder"),
        "stop_strings": list(generators[0].stop_strings),
        "device": str(getattr(generators[0].model, "device", "cpu")),
        "dtype": str(getattr(generators[0].model, "dtype", "")),
        "precision": getattr(generators[0].model, "resolved_precision", ""),
        "decoding": asdict(settings),
        "limits": asdict(limits),
    }
