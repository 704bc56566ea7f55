"""The Gradio page: upstream Alpaca-LoRA's form plus a tab comparing models side by side.

Every error a user can cause is shown in the page as a `gr.Error` message; anything unexpected is
logged on the server with its traceback and reported in the page in one line, so the page never
shows a stack trace and the server keeps serving.

Gradio's usage analytics are off unless the user sets GRADIO_ANALYTICS_ENABLED=True: the demo serves
private models, often offline, and should not call home.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import socket
from collections.abc import Sequence

# Gradio reads this when it is imported and when a page is built; an explicit setting wins.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from alpaca.inference.decoding import (  # noqa: E402
    MAX_BEAMS,
    DecodingSettings,
    GenerationLimits,
    make_settings,
)
from alpaca.inference.generation import ResponseGenerator  # noqa: E402
from alpaca.serving.limits import RequestBodyLimit, request_body_limit  # noqa: E402,F401  (run.py, tests)

logger = logging.getLogger(__name__)

AUTH_ENV = "ALPACA_DEMO_AUTH"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
TITLE = "🦙🌲 Alpaca-LoRA"
DESCRIPTION = (
    "Alpaca-LoRA is a LLaMA model fine-tuned with LoRA to follow instructions, trained on the "
    "[Stanford Alpaca](https://github.com/tatsu-lab/stanford_alpaca) dataset. Serving: {models}."
)
# The instructions of the Alpaca-LoRA README's example outputs.
EXAMPLE_INSTRUCTIONS = [
    "Tell me about alpacas.",
    "Tell me about the president of Mexico in 2019.",
    "Tell me about the king of France in 2019.",
    "List all Canadian provinces in alphabetical order.",
    "Write a Python program that prints the first 10 Fibonacci numbers.",
    "Write a program that prints the numbers from 1 to 100. But for multiples of three print 'Fizz' "
    "instead of the number and for the multiples of five print 'Buzz'. For numbers which are multiples "
    "of both three and five print 'FizzBuzz'.",
    "Tell me five words that rhyme with 'shock'.",
    "Translate the sentence 'I have no mouth but I must scream' into Spanish.",
]


def parse_auth(auth: str = "") -> tuple[str, str] | None:
    """`user:password` (from `--auth`, else the ALPACA_DEMO_AUTH environment variable) -> a tuple."""
    value = auth or os.environ.get(AUTH_ENV, "")
    if not value:
        return None
    user, colon, password = value.partition(":")
    if not colon or not user or not password:
        raise ValueError(f"--auth (or ${AUTH_ENV}) must look like user:password, with both parts non-empty")
    return user, password


def user_facing_error(err: Exception) -> gr.Error:
    """A `gr.Error` for the page: a ValueError's message as is; anything else in one line."""
    if isinstance(err, ValueError):
        return gr.Error(str(err), print_exception=False)
    logger.exception("generation failed")
    first_line = (str(err).strip().splitlines() or [""])[0][:300]
    return gr.Error(
        f"Generation failed ({type(err).__name__}: {first_line}). Details are in the server log.",
        print_exception=False,
    )


def build_demo(
    generators: Sequence[ResponseGenerator],
    defaults: DecodingSettings | None = None,
    limits: GenerationLimits | None = None,
) -> gr.Blocks:
    """The page: a Generate tab for `generators[0]` and, with several models, a Compare tab.

    Endpoints for `gradio_client`: `/evaluate` (streams when Stream output is ticked) and `/compare`.
    """
    defaults = defaults or DecodingSettings()
    limits = limits or GenerationLimits()
    main = generators[0]

    def evaluate(
        instruction, input, temperature, top_p, top_k, num_beams, max_new_tokens, stream_output, seed
    ):
        try:
            settings = make_settings(temperature, top_p, top_k, num_beams, max_new_tokens, seed, limits)
            if stream_output:
                yield from main.stream(instruction, input, settings)
            else:
                yield main.generate(instruction, input, settings)
        except Exception as err:
            raise user_facing_error(err) from None

    def compare(instruction, input, temperature, top_p, top_k, num_beams, max_new_tokens, seed):
        outputs = [""] * len(generators)
        try:
            settings = make_settings(temperature, top_p, top_k, num_beams, max_new_tokens, seed, limits)
            for generator in generators:
                generator.prompt_for(instruction, input)  # reject bad input before any generation
            for index, generator in enumerate(generators):
                outputs[index] = generator.generate(instruction, input, settings)
                yield tuple(outputs)
        except Exception as err:
            raise user_facing_error(err) from None

    def chat(message, history, temperature, top_p, top_k, num_beams, max_new_tokens, seed):
        try:
            settings = make_settings(temperature, top_p, top_k, num_beams, max_new_tokens, seed, limits)
            turns = [
                {"role": turn["role"], "content": message_text(turn["content"])} for turn in history or []
            ]
            yield from main.stream_chat([*turns, {"role": "user", "content": message}], settings)
        except Exception as err:
            raise user_facing_error(err) from None

    analytics = os.environ.get("GRADIO_ANALYTICS_ENABLED", "False") == "True"
    with gr.Blocks(title="Alpaca-LoRA", analytics_enabled=analytics) as demo:
        gr.Markdown(f"# {TITLE}\n" + DESCRIPTION.format(models=", ".join(g.name for g in generators)))
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    instruction = gr.Textbox(
                        lines=2, label="Instruction", placeholder="Tell me about alpacas."
                    )
                    # An initial value makes `input` optional for API callers (gradio_client).
                    input_box = gr.Textbox(lines=2, label="Input", placeholder="none", value="")
                    knobs = _decoding_inputs(defaults, limits)
                    stream_output = gr.Checkbox(label="Stream output", value=False)
                    seed = _seed_input(defaults)
                    with gr.Row():
                        clear = gr.ClearButton(value="Clear")
                        submit = gr.Button("Submit", variant="primary")
                with gr.Column():
                    output = gr.Textbox(lines=5, label="Output", interactive=False)
            gr.Examples(examples=[[text] for text in EXAMPLE_INSTRUCTIONS], inputs=[instruction])
            clear.add([instruction, input_box, output])
            submit.click(
                evaluate,
                inputs=[instruction, input_box, *knobs, stream_output, seed],
                outputs=output,
                api_name="evaluate",
            )
        with gr.Tab("Chat"):
            gr.Markdown(
                "A conversation with the main model in the format it was trained in (its chat template, or "
                "for an Alpaca-trained model the Alpaca template); each reply streams and ends at the "
                "end-of-turn token."
            )
            with gr.Accordion("Decoding", open=False):
                chat_knobs = _decoding_inputs(defaults, limits)
                chat_seed = _seed_input(defaults)
            gr.ChatInterface(chat, additional_inputs=[*chat_knobs, chat_seed], api_name="chat")
        if len(generators) > 1:
            with gr.Tab("Compare"):
                gr.Markdown("The same instruction and settings, answered by each model in turn.")
                compare_instruction = gr.Textbox(
                    lines=2, label="Instruction", placeholder="Tell me about alpacas."
                )
                compare_input = gr.Textbox(lines=2, label="Input", placeholder="none", value="")
                with gr.Accordion("Decoding", open=False):
                    compare_knobs = _decoding_inputs(defaults, limits)
                    compare_seed = _seed_input(defaults)
                compare_button = gr.Button("Compare", variant="primary")
                with gr.Row():
                    compare_outputs = [
                        gr.Textbox(lines=8, label=g.name, interactive=False) for g in generators
                    ]
                gr.Examples(examples=[[text] for text in EXAMPLE_INSTRUCTIONS], inputs=[compare_instruction])
                compare_button.click(
                    compare,
                    inputs=[compare_instruction, compare_input, *compare_knobs, compare_seed],
                    outputs=compare_outputs,
                    api_name="compare",
                )
    return demo


def message_text(content) -> str:
    """The text of a chat message as Gradio keeps it: a string, or a list of parts with text."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content)


def checked_number(component, whole: bool = False, optional: bool = False):
    """Make `component` (a Slider or Number) refuse a bad value with a message naming its field.

    Gradio checks a slider's range itself, in words that name no field ("Value 5 is greater than
    maximum value 1."), and a missing value, NaN or text sent through the API failed inside Gradio,
    so the caller got an error event whose message was null.
    """
    preprocess = component.preprocess
    low, high = getattr(component, "minimum", None), getattr(component, "maximum", None)
    if low is not None and high is not None:
        allowed = f"a whole number from {low} to {high}" if whole else f"a number from {low} to {high}"
    else:
        allowed = "a whole number (or -1 for a random seed)" if whole else "a number"

    def checked(payload):
        if payload is None and optional:
            return None
        is_number = isinstance(payload, int | float) and not isinstance(payload, bool)
        if not is_number or not math.isfinite(payload):
            raise gr.Error(f"{component.label} must be {allowed}, got {payload!r}", print_exception=False)
        if (low is not None and payload < low) or (high is not None and payload > high):
            raise gr.Error(f"{component.label} must be {allowed}, got {payload}", print_exception=False)
        return preprocess(payload)

    component.preprocess = checked
    return component


def _decoding_inputs(defaults: DecodingSettings, limits: GenerationLimits) -> list:
    """Upstream's sliders, with upstream's labels and ranges (Max tokens capped by the server limit)."""
    sliders = [
        gr.Slider(
            minimum=0,
            maximum=1,
            value=defaults.temperature,
            label="Temperature",
            info="0: deterministic (greedy with 1 beam, beam search with more); above 0: sampling",
        ),
        gr.Slider(minimum=0.01, maximum=1, value=defaults.top_p, label="Top p"),
        gr.Slider(minimum=0, maximum=100, step=1, value=defaults.top_k, label="Top k"),
        gr.Slider(
            minimum=1,
            maximum=MAX_BEAMS,
            step=1,
            value=defaults.num_beams,
            label="Beams",
            info="streaming uses one beam",
        ),
        gr.Slider(
            minimum=1,
            maximum=limits.max_new_tokens,
            step=1,
            value=min(defaults.max_new_tokens, limits.max_new_tokens),
            label="Max tokens",
        ),
    ]
    return [checked_number(slider, whole=slider.step == 1) for slider in sliders]


def _seed_input(defaults: DecodingSettings) -> gr.Number:
    number = gr.Number(
        value=-1 if defaults.seed is None else defaults.seed,
        precision=0,
        label="Seed",
        info="-1: a fresh random sample each time; another value repeats its sample",
    )
    return checked_number(number, whole=True, optional=True)


def check_port_free(server_name: str, server_port: int) -> None:
    """Raise a ValueError naming the port when another process listens on it (checked before the
    model loads; Gradio's own message came after it and spoke of a "range")."""
    host = "" if server_name in ("0.0.0.0", "") else server_name
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
        try:
            sock.bind((host, server_port))
        except OSError as err:
            if err.errno in (errno.EADDRINUSE, errno.EACCES):
                raise ValueError(_port_message(server_name, server_port, err)) from err
            raise ValueError(f"--server_name={server_name!r} cannot be served on: {err}") from err


def _port_message(server_name: str, server_port: int, err: OSError) -> str:
    reason = "permission denied" if getattr(err, "errno", None) == errno.EACCES else "already in use"
    return (
        f"--server_port={server_port}: port {server_port} on {server_name} is {reason} (another server, "
        f"or an earlier demo still running); pick another with --server_port=..."
    )


def launch_demo(
    demo: gr.Blocks,
    server_name: str = "127.0.0.1",
    server_port: int = 7860,
    share: bool = False,
    auth: tuple[str, str] | None = None,
    concurrency_limit: int = 1,
    max_queue_size: int = 64,
    block: bool = True,
    max_request_bytes: int | None = None,
) -> gr.Blocks:
    """Queue and start the server; bind `server_name` only (loopback unless told otherwise).

    With `block=False` the server runs in a background thread and `demo.close()` stops it.
    `max_request_bytes` (see `request_body_limit`) refuses larger request bodies with 413.
    """
    from starlette.middleware import Middleware

    if server_name not in LOOPBACK and auth is None:
        logger.warning(
            "serving on %s without --auth: anyone who can reach port %s can use the model",
            server_name,
            server_port,
        )
    if share and auth is None:
        logger.warning("--share_gradio without --auth: anyone with the public link can use the model")
    demo.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue_size)
    middleware = [Middleware(RequestBodyLimit, max_bytes=max_request_bytes)] if max_request_bytes else []
    try:
        demo.launch(
            server_name=server_name,
            server_port=server_port,
            share=share,
            auth=auth,
            prevent_thread_lock=True,
            show_error=False,
            ssr_mode=False,
            footer_links=["api"],
            quiet=True,
            app_kwargs={"middleware": middleware},
        )
    except OSError as err:
        if "port" not in str(err).lower():
            raise
        raise ValueError(_port_message(server_name, server_port, err)) from err
    print(f"serving on {demo.local_url}" + (f" and {demo.share_url}" if share and demo.share_url else ""))
    if block:
        demo.block_thread()
    return demo
