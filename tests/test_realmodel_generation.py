"""Generation on the real model, SmolLM2-135M-Instruct, loaded from its GGUF file: replies stop at the
template's next-turn markers in batch mode and in streaming, trimmed, and batching changes nothing.

Measured on the project's 2-core machine, one thread: about 40 s for the module once the model
folder and the session's `smollm2_adapter` exist.
"""

import json
from pathlib import Path

import pytest

from alpaca.default_model import default_gguf
from alpaca.inference.batch import run_batch
from alpaca.inference.decoding import DecodingSettings, cut_at_stop
from alpaca.inference.generation import ResponseGenerator
from alpaca.inference.loading import load_generators

pytestmark = pytest.mark.realmodel

GREEDY = DecodingSettings(temperature=0, num_beams=1, max_new_tokens=40)
# Greedy SmolLM2 runs on into invented turns for the first two (measured: "### Instruction:" after the
# answer to the first, nothing but "### Response:" lines for the second); the others end at EOS.
PROMPTS = [
    "List all Canadian provinces in alphabetical order.",
    "Write a haiku about autumn.",
    "What is 2 + 2?",
    "Give three tips for staying healthy.",
]
MARKERS = ("### Instruction:", "### Input:", "### Response:")


@pytest.fixture(scope="module")
def smollm2_generators(smollm2, smollm2_adapter):
    """[base + adapter, base alone], from the GGUF file itself (converted once, cached as `smollm2`)."""
    import torch

    torch.set_num_threads(1)
    return load_generators(str(default_gguf()), lora_weights=smollm2_adapter)


def without_stops(generator: ResponseGenerator) -> ResponseGenerator:
    return ResponseGenerator(
        generator.model,
        generator.tokenizer,
        generator.prompter,
        "raw",
        generator.adapter_name,
        generator.lock,
        generator.limits,
        stop_strings=(),
    )


def test_raw_greedy_output_runs_on_and_the_stop_strings_cut_it(smollm2_generators):
    base = smollm2_generators[1]
    assert base.stop_strings[:3] == MARKERS
    requests = [(prompt, None) for prompt in PROMPTS]
    raw = without_stops(base).generate_replies(requests, GREEDY)
    stopped = base.generate_replies(requests, GREEDY)
    ran_on = [index for index, reply in enumerate(raw) if any(marker in reply.text for marker in MARKERS)]
    assert ran_on[:2] == [0, 1], [reply.text for reply in raw]
    for reply, cut in zip(raw, stopped):
        assert cut.text == cut_at_stop(reply.text, base.stop_strings)[0]
        assert not any(marker in cut.text for marker in MARKERS)
    assert stopped[0].text.startswith("Sure") and "Canadian provinces" in stopped[0].text
    for index in ran_on:  # generation itself ended at the marker, not at max_new_tokens
        assert stopped[index].num_tokens < raw[index].num_tokens


def test_batch_mode_stops_cleanly_and_records_the_gguf(
    smollm2_generators, smollm2, smollm2_adapter, tmp_path
):
    main = smollm2_generators[0]
    input_file = tmp_path / "in.json"
    input_file.write_text(json.dumps([{"instruction": prompt} for prompt in PROMPTS]))
    output_file = tmp_path / "out.json"
    results = run_batch(main, str(input_file), str(output_file), GREEDY, batch_size=4)
    assert len(results) == len(PROMPTS) and all(result["output"].strip() for result in results[:1])
    assert not any(marker in result["output"] for result in results for marker in MARKERS)
    # Batched replies equal one-at-a-time replies, stop strings included.
    assert [result["output"] for result in results] == [
        main.generate(prompt, None, GREEDY) for prompt in PROMPTS
    ]
    config = json.loads(output_file.with_suffix(".config.json").read_text())
    assert config["base_model"] == str(default_gguf()) and config["base_model_folder"] == smollm2
    assert len(config["base_model_gguf"]["sha256"]) == 64
    name = f"SmolLM2-135M-Instruct.Q4_1 + {Path(smollm2_adapter).parent.name}/lora"  # the GGUF's name, the adapter's
    assert config["generator"] == name == results[0]["generator"]
    assert config["stop_strings"][:3] == list(MARKERS)


def test_streaming_stops_at_the_marker(smollm2_generators):
    base = smollm2_generators[1]
    pieces = list(base.stream(PROMPTS[0], None, GREEDY))
    assert pieces[-1] == base.generate(PROMPTS[0], None, GREEDY)
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
    assert not any("###" in piece for piece in pieces)
