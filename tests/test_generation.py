"""Generation on tiny models: decoding settings, streaming, batching, seeds, adapters, batch mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.adapters import make_random_adapter
from helpers.tiny_trained import TRAINED_ANSWERS

from alpaca.core.prompter import load_template
from alpaca.inference.batch import read_instructions, run_batch
from alpaca.inference.decoding import (
    DecodingSettings,
    GenerationLimits,
    build_generation_config,
    cut_at_stop,
    held_back,
    make_settings,
    parse_stop_strings,
    template_stop_strings,
)
from alpaca.inference.generation import ResponseGenerator
from alpaca.inference.loading import display_name, load_generators, model_label

REPO = Path(__file__).resolve().parent.parent
GREEDY = DecodingSettings(temperature=0, num_beams=1, max_new_tokens=24)
# Different lengths, with and without input, so the batch really gets left padding.
REQUESTS = [
    ("Tell me about alpacas.", None),
    ("List all Canadian provinces in alphabetical order, then explain why the order matters.", ""),
    ("Translate.", "I have no mouth"),
    ("Hi", None),
]


@pytest.fixture(scope="module")
def main(generators):
    return generators[0]


def test_sampling_only_above_zero_temperature(main):
    greedy = build_generation_config(main.tokenizer, make_settings(temperature=0, num_beams=4))
    assert greedy.do_sample is False and greedy.num_beams == 4
    sampled = build_generation_config(main.tokenizer, make_settings(temperature=0.7, top_p=0.5, top_k=7))
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.top_k) == (True, 0.7, 0.5, 7)
    streamed = build_generation_config(main.tokenizer, make_settings(num_beams=4), streaming=True)
    assert streamed.num_beams == 1
    assert sampled.eos_token_id == main.tokenizer.eos_token_id
    assert sampled.pad_token_id == main.tokenizer.pad_token_id != main.tokenizer.eos_token_id


def test_settings_errors_are_collected_into_one_message():
    with pytest.raises(ValueError) as err:
        make_settings(
            temperature=-0.5, top_p=0, num_beams=9, max_new_tokens=300, limits=GenerationLimits(16, 256)
        )
    message = str(err.value)
    for part in ("temperature", "top_p", "num_beams", "from 1 to 256"):
        assert part in message
    assert make_settings(seed=-1).seed is None and make_settings(seed=7.0).seed == 7
    assert make_settings(num_beams=2.0, top_k=3.0) == DecodingSettings(num_beams=2, top_k=3)


def test_trained_adapter_reply_is_the_response_only(main):
    """The trained answers come back exactly: no prompt, no '### Response:', no </s>."""
    for instruction, input, answer in TRAINED_ANSWERS:
        assert main.generate(instruction, input, GREEDY) == answer
    beams = make_settings(temperature=0, num_beams=4, max_new_tokens=24)
    assert main.generate(*TRAINED_ANSWERS[0][:2], beams) == TRAINED_ANSWERS[0][2]


def test_generation_stops_at_eos(main):
    long_enough = make_settings(temperature=0, num_beams=1, max_new_tokens=200)
    reply = main.generate_replies([TRAINED_ANSWERS[0][:2]], long_enough)[0]
    assert reply.text == TRAINED_ANSWERS[0][2]
    assert 5 < reply.num_tokens < 30


def test_stream_grows_and_ends_with_the_plain_reply(main, generators):
    for generator in (main, generators[-1]):  # stops at EOS (trained) and at the token limit (base)
        for instruction, input in REQUESTS[:2]:
            pieces = list(generator.stream(instruction, input, GREEDY))
            assert len(pieces) > 2
            assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
            assert pieces[-1] == generator.generate(instruction, input, GREEDY)


def test_stream_stops_generating_when_the_reader_leaves(generators):
    """Counted in forward passes (one per generated token): a reader that leaves after the first update
    ends generation within a few tokens, where the whole reply runs to the token limit."""
    base = generators[-1]  # the untrained base never emits EOS on this prompt: its reply is long
    settings = make_settings(temperature=0, max_new_tokens=200)
    passes = []
    hook = base.model.get_input_embeddings().register_forward_hook(lambda *args: passes.append(1))
    try:
        list(base.stream("Hi", None, settings))
        full_passes, passes[:] = len(passes), []
        stream = base.stream("Hi", None, settings)
        next(stream)
        stream.close()  # joins the generation thread, which must stop at the next token
        left_passes = len(passes)
    finally:
        hook.remove()
    assert full_passes == 200, "the whole reply must be long for this test to show anything"
    assert left_passes <= 10, (left_passes, full_passes)
    assert not base.lock.locked()


def test_batched_equals_one_at_a_time_under_greedy(generators):
    for generator in generators:
        one_by_one = [generator.generate(instruction, input, GREEDY) for instruction, input in REQUESTS]
        assert generator.generate_batch(REQUESTS, GREEDY) == one_by_one
        assert len(set(one_by_one)) >= 3  # rows differ, so a mix-up between rows would show


def test_batched_equals_one_at_a_time_for_opt(tiny_opt):
    (generator,) = load_generators(tiny_opt, lora_weights="")
    one_by_one = [generator.generate(instruction, input, GREEDY) for instruction, input in REQUESTS]
    assert generator.generate_batch(REQUESTS, GREEDY) == one_by_one


def test_seeds_reproduce_samples_and_different_seeds_differ(generators):
    base = generators[-1]

    def sample(seed):
        return base.generate(
            "Hi", None, make_settings(temperature=1.0, num_beams=1, max_new_tokens=16, seed=seed)
        )

    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) == 3


def test_adapters_share_one_base_without_leaking(generators, tiny_llama, tiny_llama_adapter):
    main, random_adapter, base_alone = generators
    assert base_alone.adapter_name is None and base_alone.model is main.model and base_alone.lock is main.lock
    replies = [g.generate("Tell me about alpacas.", None, GREEDY) for g in generators]
    assert len(set(replies)) == 3
    # Each adapter's reply equals the reply of a model that loaded that adapter alone.
    (alone,) = load_generators(tiny_llama, lora_weights=tiny_llama_adapter)[:1]
    assert alone.generate("Tell me about alpacas.", None, GREEDY) == replies[1]
    (plain,) = load_generators(tiny_llama, lora_weights="")
    assert plain.generate("Tell me about alpacas.", None, GREEDY) == replies[2]


# Stop strings -----------------------------------------------------------------------------------


def test_stop_strings_come_from_the_template():
    assert template_stop_strings(load_template("alpaca")) == (
        "### Instruction:",
        "### Input:",
        "### Response:",
        "Below is an instruction that describes a task",
    )
    assert template_stop_strings(load_template("alpaca_short")) == (
        "### Instruction:",
        "### Input:",
        "### Response:",
    )
    assert template_stop_strings(load_template("alpaca_legacy"))[:3] == (
        "### Instruction:",
        "### Input:",
        "### Response:",
    )
    assert template_stop_strings(load_template("vigogne")) == (
        "### Instruction:",
        "### Entrée:",
        "### Réponse:",
        "Ci-dessous se trouve une instruction qui décrit une tâche",
    )
    one_line = {
        "prompt_input": "USER: {instruction}\nCONTEXT: {input}\nASSISTANT:",
        "prompt_no_input": "USER: {instruction}\nASSISTANT:",
        "response_split": "ASSISTANT:",
    }
    assert template_stop_strings(one_line) == ("USER:", "CONTEXT:", "ASSISTANT:")


def test_stop_string_helpers():
    assert cut_at_stop(
        "Paris.\n\n### Instruction:\nMore ### Response:", ["### Response:", "### Instruction:"]
    ) == (
        "Paris.",
        True,
    )
    assert cut_at_stop("Paris.", ["###"]) == ("Paris.", False)
    assert held_back("Paris.\n\n### Inst", ["### Instruction:"]) == len("### Inst")
    assert held_back("Paris. #", ["### Instruction:", "#!"]) == 1
    assert held_back("Paris.", ["### Instruction:"]) == 0
    assert parse_stop_strings("### Instruction:, ### Input:") == ("### Instruction:", "### Input:")
    assert parse_stop_strings(("a", "b")) == ("a", "b") and parse_stop_strings("") == ()
    assert parse_stop_strings("\\n\\n") == ("\n\n",)
    with pytest.raises(ValueError, match="--stop needs a value"):
        parse_stop_strings(True)


@pytest.fixture(scope="module")
def base_raw_and_stop(generators):
    """The base model alone, without stop strings, and a stop string taken from the middle of its
    greedy reply to REQUESTS[0] (the tiny model's noise holds no template marker to stop at)."""
    base = generators[-1]
    raw = ResponseGenerator(
        base.model, base.tokenizer, base.prompter, "raw", None, base.lock, stop_strings=()
    )
    reply = raw.generate_replies([REQUESTS[0]], GREEDY)[0]
    words = reply.text.split()
    stop = next(word for word in words[len(words) // 3 :] if len(word) >= 3 and word in reply.text[10:])
    return raw, stop


def test_generation_stops_at_a_stop_string_and_trims_it(base_raw_and_stop):
    raw, stop = base_raw_and_stop
    stopping = ResponseGenerator(
        raw.model, raw.tokenizer, raw.prompter, "stop", None, raw.lock, stop_strings=[stop]
    )
    full = raw.generate_replies([REQUESTS[0]], GREEDY)[0]
    cut = stopping.generate_replies([REQUESTS[0]], GREEDY)[0]
    assert cut.text == full.text[: full.text.index(stop)].rstrip() and stop not in cut.text
    assert cut.num_tokens < full.num_tokens == GREEDY.max_new_tokens  # generation itself stopped early
    # Batched rows stop one by one; each equals its one-at-a-time reply.
    one_by_one = [stopping.generate(instruction, input, GREEDY) for instruction, input in REQUESTS]
    assert stopping.generate_batch(REQUESTS, GREEDY) == one_by_one
    beams = make_settings(temperature=0, num_beams=3, max_new_tokens=24)
    assert stop not in stopping.generate(*REQUESTS[0], beams)


def test_stream_stops_at_a_stop_string_and_never_shows_it(base_raw_and_stop):
    raw, stop = base_raw_and_stop
    stopping = ResponseGenerator(
        raw.model, raw.tokenizer, raw.prompter, "stop", None, raw.lock, stop_strings=[stop]
    )
    pieces = list(stopping.stream(*REQUESTS[0], GREEDY))
    assert pieces[-1] == stopping.generate(*REQUESTS[0], GREEDY)
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
    assert not any(stop in piece for piece in pieces)
    assert not stopping.lock.locked()


def test_default_stop_strings_follow_the_template(generators, tiny_llama):
    assert generators[0].stop_strings == template_stop_strings(load_template("alpaca"))
    (short,) = load_generators(tiny_llama, lora_weights="", prompt_template="alpaca_short", stop_strings=())
    assert short.stop_strings == ()


def test_bad_requests_raise_clear_errors(main):
    with pytest.raises(ValueError, match="instruction is empty"):
        main.generate("   ", None, GREEDY)
    limits = GenerationLimits(max_input_tokens=40)
    short = ResponseGenerator(
        main.model, main.tokenizer, main.prompter, "short", "adapter0", main.lock, limits
    )
    with pytest.raises(ValueError, match=r"over the limit of 40 tokens \(--max_input_tokens\)"):
        short.generate("Tell me about alpacas.", "word " * 50, GREEDY)


def test_oversized_text_is_refused_before_tokenizing(main, monkeypatch):
    """A 4 MB instruction is refused by its length in characters; the tokenizer never sees it."""
    limits = GenerationLimits(max_input_tokens=1024)
    generator = ResponseGenerator(
        main.model, main.tokenizer, main.prompter, "g", "adapter0", main.lock, limits
    )
    tokenizer_type = type(main.tokenizer)
    original = tokenizer_type.__call__

    def refuse_long(self, text, *args, **kwargs):
        assert len(str(text)) < 100_000, "tokenized an oversized request"
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_type, "__call__", refuse_long)
    with pytest.raises(ValueError, match=r"4000005 characters long.*1024 tokens \(--max_input_tokens"):
        generator.prompt_for("word " * 800_000, "input")
    assert generator.prompt_for("Tell me about alpacas.", None).endswith("### Response:\n")


def test_an_unreachable_hub_adapter_says_it_could_not_be_fetched(tiny_llama):
    """Offline (HF_HUB_OFFLINE=1 in the tests), upstream's default adapter cannot be fetched: say so,
    before loading the model, not "does not fit the base model"."""
    with pytest.raises(
        ValueError, match=r"'tloen/alpaca-lora-7b' is not a local folder and could not be fetched"
    ) as err:
        load_generators(tiny_llama, lora_weights="tloen/alpaca-lora-7b")
    assert "HF_HUB_OFFLINE" in str(err.value) and '--lora_weights=""' in str(err.value)
    with pytest.raises(
        ValueError, match="--compare_lora_weights='nobody/no-such-adapter' is not a local folder"
    ):
        load_generators(tiny_llama, lora_weights="", compare_lora_weights="nobody/no-such-adapter")


def test_model_labels_say_what_the_model_is(tmp_path):
    assert display_name("/models/SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    assert display_name("./lora-alpaca/checkpoint-200") == "lora-alpaca/checkpoint-200"
    assert display_name("tloen/alpaca-lora-7b") == "alpaca-lora-7b"
    merged = tmp_path / "run-a" / "hf"
    merged.mkdir(parents=True)
    assert model_label(str(merged), str(merged)) == "run-a/hf"
    (merged / "export_info.json").write_text(
        json.dumps({"base_model": "/m/SmolLM2-135M-Instruct.Q4_1.gguf", "lora_weights": "./lora-alpaca"})
    )
    assert model_label(str(merged), str(merged)) == "SmolLM2-135M-Instruct.Q4_1 + lora-alpaca (merged)"


@pytest.mark.filterwarnings("ignore:Found missing adapter keys")
def test_loading_errors_name_the_flag(tiny_llama, tiny_opt, tmp_path):
    with pytest.raises(ValueError, match="--base_model"):
        load_generators(str(tmp_path / "missing-model"), lora_weights="")
    with pytest.raises(ValueError, match="--lora_weights.*no such folder"):
        load_generators(tiny_llama, lora_weights=str(tmp_path / "missing-adapter"))
    opt_adapter = make_random_adapter(tiny_opt, tmp_path / "opt-adapter")
    with pytest.raises(ValueError, match="does not fit the base model.*another base model"):
        load_generators(tiny_llama, lora_weights=opt_adapter)
    with pytest.raises(ValueError, match="--compare_lora_weights=.*does not fit the base model"):
        load_generators(tiny_llama, lora_weights="", compare_lora_weights=opt_adapter)


# Batch mode -----------------------------------------------------------------------------------


def write_records(path: Path, records, jsonl=False) -> str:
    text = "\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records)
    path.write_text(text, encoding="utf-8")
    return str(path)


RECORDS = [
    {"instruction": instruction, "input": input, "dataset": "tiny"} if input else {"instruction": instruction}
    for instruction, input in REQUESTS
] + [
    {"instruction": answer[0], "input": answer[1], "output": "a reference answer"}
    for answer in TRAINED_ANSWERS
]


def test_batch_writes_alpaca_eval_format_equal_to_one_at_a_time(main, tmp_path):
    input_file = write_records(tmp_path / "in.jsonl", RECORDS, jsonl=True)
    results = run_batch(
        main, input_file, str(tmp_path / "out.json"), GREEDY, batch_size=3, generator_name="tiny"
    )
    written = json.loads((tmp_path / "out.json").read_text())
    assert written == results and len(written) == len(RECORDS)
    for record, result in zip(RECORDS, written):
        assert result["instruction"] == record["instruction"] and result["generator"] == "tiny"
        assert result.get("input") == record.get("input") and result.get("dataset") == record.get("dataset")
        assert result["output"] == main.generate(record["instruction"], record.get("input"), GREEDY)
    assert [r["output"] for r in written[-3:]] == [answer for _, _, answer in TRAINED_ANSWERS]


def test_batch_resumes_after_a_crash(main, tmp_path, monkeypatch):
    input_file = write_records(tmp_path / "in.json", RECORDS)
    output_file = tmp_path / "out.json"
    calls = []
    original = type(main).generate_batch

    def crash_on_second_batch(self, requests, settings=None):
        calls.append([instruction for instruction, _ in requests])
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return original(self, requests, settings)

    monkeypatch.setattr(type(main), "generate_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_batch(main, input_file, str(output_file), GREEDY, batch_size=2, generator_name="tiny")
    assert [r["instruction"] for r in json.loads(output_file.read_text())] == [
        r["instruction"] for r in RECORDS[:2]
    ]
    monkeypatch.setattr(type(main), "generate_batch", original)

    calls.clear()

    def counting(self, requests, settings=None):
        calls.append(len(requests))
        return original(self, requests, settings)

    monkeypatch.setattr(type(main), "generate_batch", counting)
    results = run_batch(main, input_file, str(output_file), GREEDY, batch_size=2, generator_name="tiny")
    assert sum(calls) == len(RECORDS) - 2  # the first batch was not generated again
    assert [r["instruction"] for r in results] == [r["instruction"] for r in RECORDS]
    calls.clear()
    run_batch(main, input_file, str(output_file), GREEDY, batch_size=2, generator_name="tiny")
    assert calls == []
    config = json.loads(output_file.with_suffix(".config.json").read_text())
    assert config["generator"] == "tiny" and config["batch_size"] == 2
    assert config["decoding"]["temperature"] == GREEDY.temperature


def test_batch_refuses_an_output_file_for_other_instructions(main, tmp_path):
    input_file = write_records(tmp_path / "in.json", RECORDS)
    output_file = tmp_path / "out.json"
    output_file.write_text(json.dumps([{"instruction": "something else", "output": "x", "generator": "g"}]))
    with pytest.raises(ValueError, match="record 0 does not match"):
        run_batch(main, input_file, str(output_file), GREEDY)


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"instruction": "ok"}, {"input": "no instruction"}]', "record 1: 'instruction' must be"),
        ('{"instruction": "ok"}\n\n{"instruction": "   "}\n', r"record 1 \(line 3\): 'instruction' must be"),
        ('{"instruction": "ok"}\n{"instruction": oops}\n', "line 2: not valid JSON"),
        ('[{"instruction": "ok"}, ["a list"]]', "record 1: expected an object"),
        ('[{"instruction": "ok", "input": 5}]', "record 0: 'input' must be a string"),
        ('[{"instruction": "ok"}', "is not valid JSON"),
        ("[]", "holds no records"),
    ],
)
def test_malformed_input_files_name_the_record(tmp_path, content, message):
    path = tmp_path / "in.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_instructions(str(path))


def test_input_that_is_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"instruction": "Caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(
        ValueError, match=r"--input_file='.*latin1.json' is not valid UTF-8 \(byte 21, line 1\)"
    ):
        read_instructions(str(path))


def test_batch_config_records_the_model_and_stop_strings(main, tmp_path):
    input_file = write_records(tmp_path / "in.json", RECORDS[:2])
    run_batch(main, input_file, str(tmp_path / "out.json"), GREEDY)
    config = json.loads((tmp_path / "out.config.json").read_text())
    assert config["generator"] == main.name and " + " in main.name
    assert config["base_model"] == config["base_model_folder"] == main.source["base_model"]
    assert config["base_model_gguf"] is None and config["lora_weights"] == main.source["lora_weights"]
    assert config["stop_strings"] == list(template_stop_strings(load_template("alpaca")))


def test_batch_checks_every_prompt_before_generating(main, tmp_path, monkeypatch):
    records = [{"instruction": "fine"}, {"instruction": "long", "input": "word " * 2000}]
    input_file = write_records(tmp_path / "in.json", records)
    monkeypatch.setattr(type(main), "generate_batch", lambda *args: pytest.fail("generated before checking"))
    with pytest.raises(ValueError, match="record 1: the prompt is .* over the limit"):
        run_batch(main, input_file, str(tmp_path / "out.json"), GREEDY)
    assert not (tmp_path / "out.json").exists()


# The generate.py entry point ------------------------------------------------------------------


def test_generate_py_imports_nothing_heavy():
    code = "import sys, generate; print(sorted(m for m in ('torch', 'gradio', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_generate_py_batch_mode(tiny_llama, trained_adapter, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    import generate

    input_file = write_records(
        tmp_path / "in.json", [{"instruction": i, "input": x} for i, x, _ in TRAINED_ANSWERS]
    )
    output_file = tmp_path / "outputs" / "out.json"
    monkeypatch.setenv("BASE_MODEL", tiny_llama)
    generate.main(
        lora_weights=trained_adapter,
        input_file=input_file,
        output_file=str(output_file),
        temperature=0,
        num_beams=2,
        max_new_tokens=24,
        batch_size=2,
    )
    written = json.loads(output_file.read_text())
    assert [r["output"] for r in written] == [answer for _, _, answer in TRAINED_ANSWERS]
    assert {r["generator"] for r in written} == {Path(tiny_llama).name + " + trained-adapter"}


def test_generate_py_checks_the_output_file_before_loading(tiny_llama, tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO))
    import alpaca.inference.loading
    import generate

    monkeypatch.setattr(
        alpaca.inference.loading, "load_generators", lambda *a, **k: pytest.fail("loaded the model")
    )
    input_file = write_records(tmp_path / "in.json", RECORDS[:2])
    with pytest.raises(ValueError, match=r"--output_file='.*' is a folder; give a file name"):
        generate.main(
            base_model=tiny_llama, lora_weights="", input_file=input_file, output_file=str(tmp_path)
        )
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        generate.main(
            base_model=tiny_llama,
            lora_weights="",
            input_file=input_file,
            output_file=str(tmp_path / "a-file" / "o.json"),
        )
    (tmp_path / "other.json").write_text(json.dumps([{"instruction": "else", "output": "x"}]))
    with pytest.raises(ValueError, match="record 0 does not match"):
        generate.main(
            base_model=tiny_llama,
            lora_weights="",
            input_file=input_file,
            output_file=str(tmp_path / "other.json"),
        )


def test_help_says_temperature_zero_with_beams_is_beam_search():
    sys.path.insert(0, str(REPO))
    import generate

    help_text = " ".join(generate.main.__doc__.split())
    assert "0 is deterministic: greedy with --num_beams=1, beam search with more beams" in help_text


def test_generate_py_command_line_batch_is_quiet_and_names_the_generator(
    tiny_llama, tiny_llama_adapter, tmp_path
):
    """The real command line with an adapter (so peft, and with it bitsandbytes, is imported): stderr
    holds no bitsandbytes `kernels` warning and no traceback; `--stop=""` turns stopping off."""
    input_file = write_records(tmp_path / "in.json", RECORDS[:2])
    output_file = tmp_path / "out.json"
    command = [
        sys.executable,
        "generate.py",
        f"--base_model={tiny_llama}",
        f"--lora_weights={tiny_llama_adapter}",
        f"--input_file={input_file}",
        f"--output_file={output_file}",
        "--temperature=0",
        "--num_beams=1",
        "--max_new_tokens=8",
        '--stop=""',
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "kernels" not in run.stderr and "Traceback" not in run.stderr
    import peft  # noqa: F401

    assert "bitsandbytes" in sys.modules  # peft imports it when installed: the warning was real here
    written = json.loads(output_file.read_text())
    adapter = Path(tiny_llama_adapter)  # a folder named "lora" says little: its parent's name is added
    assert {r["generator"] for r in written} == {f"{Path(tiny_llama).name} + {adapter.parent.name}/lora"}
    assert json.loads(output_file.with_suffix(".config.json").read_text())["stop_strings"] == []


def test_generate_py_collects_flag_errors(monkeypatch):
    sys.path.insert(0, str(REPO))
    import generate

    monkeypatch.delenv("BASE_MODEL", raising=False)
    with pytest.raises(ValueError) as err:
        generate.main(input_file="in.json", batch_size=0, load_8bit=True, load_4bit=True)
    for part in ("--base_model is required", "--output_file", "--batch_size", "exclusive"):
        assert part in str(err.value)


def test_a_4bit_model_counts_its_unpacked_parameters(tiny_llama):
    """bitsandbytes packs two 4-bit values per byte; the count reported must be the model's own."""
    from alpaca.finetune.report import count_trainable

    (plain,) = load_generators(tiny_llama, lora_weights="")
    (packed,) = load_generators(tiny_llama, lora_weights="", load_4bit=True)
    assert type(packed.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
    assert sum(p.numel() for p in packed.model.parameters()) < count_trainable(plain.model)[1]
    assert count_trainable(packed.model)[1] == count_trainable(plain.model)[1]
