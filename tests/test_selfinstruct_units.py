"""Prompt encoding, reply parsing, filters, seed validation, pricing and the journal."""

import json

import pytest

from alpaca.openai_jobs.cost import CostMeter, resolve_prices
from alpaca.selfinstruct import prompts
from alpaca.selfinstruct.filters import BLACKLIST, rejection_reason
from alpaca.selfinstruct.journal import Journal
from alpaca.selfinstruct.parsing import parse_reply
from alpaca.selfinstruct.pipeline import generate
from alpaca.selfinstruct.seeds import load_seed_tasks
from alpaca.selfinstruct.settings import SelfInstructConfig


def test_encode_prompt_is_upstreams_format():
    examples = [
        {"instruction": "  Summarize the\n text  below:", "input": "Some text.", "output": "Short."},
        {"instruction": "Name a planet.", "input": "", "output": "Mars"},
    ]
    expected = (
        prompts.META_PROMPT
        + "\n###\n1. Instruction: Summarize the text below\n1. Input:\nSome text.\n1. Output:\nShort.\n"
        + "###\n2. Instruction: Name a planet.\n2. Input:\n<noinput>\n2. Output:\nMars\n"
        + "###\n3. Instruction:"
    )
    assert prompts.encode_prompt(examples) == expected
    assert prompts.META_PROMPT.startswith(
        "You are asked to come up with a set of 20 diverse task instructions."
    )
    assert "\n9. The output should be an appropriate response" in prompts.META_PROMPT
    assert prompts.META_PROMPT.endswith("List of 20 tasks:")


def test_sampling_depends_only_on_seed_and_request_index():
    seeds = [{"instruction": f"Task number {i}", "input": "", "output": ""} for i in range(10)]
    first = prompts.sample_examples(prompts.request_rng(7, 3), seeds, [], 3, 0)
    again = prompts.sample_examples(prompts.request_rng(7, 3), seeds, [], 3, 0)
    other = prompts.sample_examples(prompts.request_rng(7, 4), seeds, [], 3, 0)
    assert first == again and first != other and len(first) == 3
    machine = [{"instruction": "Machine task", "input": "", "output": ""}]
    mixed = prompts.sample_examples(prompts.request_rng(7, 3), seeds, machine, 3, 2)
    # Only one machine record exists, so one machine example and two seeds.
    assert sum(example in machine for example in mixed) == 1 and len(mixed) == 3


def item(number: int, instruction: str, task_input: str = "<noinput>", output: str = "Out.") -> str:
    return f"\n{number}. Instruction: {instruction}\n{number}. Input:\n{task_input}\n{number}. Output:\n{output}\n"


def test_parse_reply_follows_upstream():
    reply = (
        " Describe the water cycle in two sentences.\n4. Input:\n<noinput>\n4. Output:\nWater evaporates.\n###"
        + item(5, "Translate the sentence into Spanish.", "I like tea.", "Me gusta el té.")
        + "###"
        + "\n6. Instruction: Missing its other parts\n###"
        + item(7, "Draw a picture of a cat for the children.")
        + "###"
        + item(8, "Summarize the following paragraph in one line.", "A long paragraph", "Cut off he")
    )
    parsed = parse_reply(reply, "length", num_prompt_instructions=3, chat=False)
    assert parsed.candidates == [
        {
            "instruction": "Describe the water cycle in two sentences.",
            "input": "",
            "output": "Water evaporates.",
        },
        {
            "instruction": "Translate the sentence into Spanish.",
            "input": "I like tea.",
            "output": "Me gusta el té.",
        },
    ]
    assert (parsed.items, parsed.malformed, parsed.truncated) == (5, 1, 1)
    assert parsed.rejected == {"blacklist": 1}
    # Not cut by the length limit: the last item is kept.
    assert len(parse_reply(reply, "stop", 3, chat=False).candidates) == 3


def test_parse_reply_headers_must_be_in_order_and_chat_may_restate_the_first():
    swapped = " Explain the rule.\n4. Output:\nA\n4. Input:\nB\n"
    assert parse_reply(swapped, "stop", 3, chat=False).malformed == 1
    restated = "4. Instruction: Explain how tides work in simple terms.\n4. Input:\n<noinput>\n4. Output:\nThe moon.\n"
    assert parse_reply(restated, "stop", 3, chat=False).candidates == []
    chat = parse_reply("###\n" + restated, "stop", 3, chat=True)
    assert [c["instruction"] for c in chat.candidates] == ["Explain how tides work in simple terms."]
    assert parse_reply("Sorry, I cannot help with that.", "stop", 3, chat=True).malformed == 1


@pytest.mark.parametrize(
    "instruction, reason",
    [
        ("Name three colors", "too_short"),
        ("word " * 151, "too_long"),
        ("Describe the painting in the IMAGE below.", "blacklist"),
        ("Please go to the store and buy milk.", "blacklist"),
        ("Write a program that prints the primes.", "write_a_program"),
        ('"Quote" this sentence for me please.', "punctuation"),
        ("¿Cuál es la capital de Francia hoy?", "non_ascii"),
        ("Describe imagery used in the poem.", None),
        ("Explain why mapping functions are useful.", None),
        ("write a program description for a radio show.", None),
    ],
)
def test_filters(instruction, reason):
    assert rejection_reason(instruction) == reason


def test_every_blacklisted_word_is_matched_as_a_whole_word():
    for word in BLACKLIST:
        assert rejection_reason(f"Please use the {word.upper()} in this sentence.") == "blacklist"
        assert rejection_reason(f"Please use the x{word}x in this sentence.") is None


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_seed_file_errors_name_the_file_and_line(tmp_path):
    good = json.dumps({"instruction": "Do it.", "instances": [{"input": "", "output": "Done."}]})
    with pytest.raises(ValueError, match="no such file"):
        load_seed_tasks(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="holds no seed tasks"):
        load_seed_tasks(write(tmp_path / "empty.jsonl", "\n\n"))
    with pytest.raises(ValueError, match=r"bad\.jsonl line 2: not valid JSON"):
        load_seed_tasks(write(tmp_path / "bad.jsonl", good + "\n{not json\n"))
    with pytest.raises(ValueError, match=r"line 1: missing 'instances'"):
        load_seed_tasks(write(tmp_path / "noinst.jsonl", json.dumps({"instruction": "x"})))
    with pytest.raises(ValueError, match=r"line 3: missing 'instruction'"):
        load_seed_tasks(write(tmp_path / "noins.jsonl", good + "\n\n" + json.dumps({"instances": []})))
    with pytest.raises(ValueError, match=r"line 1: output must be text"):
        load_seed_tasks(
            write(tmp_path / "nooutput.jsonl", json.dumps({"instruction": "x", "instances": [{"input": ""}]}))
        )
    tasks = load_seed_tasks(write(tmp_path / "ok.jsonl", good + "\n" + good + "\n"))
    assert tasks == [{"instruction": "Do it.", "input": "", "output": "Done."}] * 2


def test_invalid_settings_are_reported_together(tmp_path):
    config = SelfInstructConfig(
        output_dir=str(tmp_path),
        api="grpc",
        num_prompt_instructions=0,
        max_concurrent_requests=0,
        model_name="my-local-model",
        max_cost_usd=1.0,
    )
    with pytest.raises(ValueError) as error:
        generate(config)
    message = str(error.value)
    for flag in ("--api", "--num_prompt_instructions", "--max_concurrent_requests", "--max_cost_usd"):
        assert flag in message


def test_prices():
    assert resolve_prices("gpt-4o-mini", None, None) == (0.15, 0.60)
    assert resolve_prices("gpt-4o-mini-2024-07-18", None, None) == (0.15, 0.60)
    assert resolve_prices("gpt-4o-2024-08-06", None, None) == (2.50, 10.00)
    assert resolve_prices("my-local-model", None, None) is None
    assert resolve_prices("my-local-model", 1.0, 2.0) == (1.0, 2.0)
    assert resolve_prices("gpt-4o-mini", None, 9.0) == (0.15, 9.0)
    meter = CostMeter((1.0, 2.0))
    meter.add(1_000_000, 500_000)
    assert meter.usd == pytest.approx(2.0) and meter.describe() == "$2.0000"


def test_journal_drops_a_torn_last_line_and_resumes_after_it(tmp_path):
    journal = Journal(tmp_path)
    journal.start(seed=5, imported=[])
    record = {"instruction": "A", "input": "", "output": "B"}
    journal.append_request(0, [record], {"requests": 1, "kept": 1, "rejected": {"blacklist": 2}})
    journal.append_request(1, [], {"requests": 1, "kept": 0, "rejected": {"blacklist": 1}})
    journal.close()
    with open(journal.path, "ab") as handle:
        handle.write(b'{"kind": "request", "request": 2, "records": [{"instru')
    state = Journal(tmp_path).load()
    assert (state.seed, state.records, state.next_request) == (5, [record], 2)
    assert state.totals == {"requests": 2, "kept": 1, "rejected": {"blacklist": 3}}
    assert journal.path.read_bytes().endswith(b"\n")


def write_journal(tmp_path, requests: int) -> Journal:
    """A journal of a header and ``requests`` request lines, each keeping one record."""
    journal = Journal(tmp_path)
    journal.start(seed=5, imported=[])
    for index in range(requests):
        record = {"instruction": f"Task {index}", "input": "", "output": "Out."}
        journal.append_request(index, [record], {"requests": 1, "kept": 1})
    journal.close()
    return journal


def test_a_garbled_line_inside_the_journal_is_an_error_and_deletes_nothing(tmp_path):
    journal = write_journal(tmp_path, 41)
    lines = journal.path.read_bytes().split(b"\n")
    assert len(lines) == 43 and lines[-1] == b""  # 42 lines
    lines[5] = lines[5][:30] + b"\x00\x00garbled" + lines[5][40:]
    damaged = b"\n".join(lines)
    journal.path.write_bytes(damaged)
    with pytest.raises(
        ValueError, match=r"regen_journal\.jsonl line 6: not valid JSON .*Nothing was changed"
    ):
        Journal(tmp_path).load()
    assert journal.path.read_bytes() == damaged
    assert [path.name for path in tmp_path.iterdir()] == ["regen_journal.jsonl"]
    # A line that parses but is not an entry, a repeated request, bad UTF-8: each named, nothing cut.
    for bad, problem in [
        (b'{"kind": "request", "request": 3}', "without a request number, records and counts"),
        (lines[3], "request 2 again, after request 3"),
        (b'{"kind": "request", "records": ["\xff"]}', "not valid UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"seed": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ]:
        damaged = b"\n".join([*lines[:5], bad, *lines[6:]])
        journal.path.write_bytes(damaged)
        with pytest.raises(ValueError, match=rf"line 6: .*{problem}"):
            Journal(tmp_path).load()
        assert journal.path.read_bytes() == damaged
    # Deleting the bad line, as the message offers, resumes with everything else.
    journal.path.write_bytes(b"\n".join([*lines[:5], *lines[6:]]))
    state = Journal(tmp_path).load()
    assert len(state.records) == 40 and state.next_request == 41 and "'Task 4'" not in str(state.records)


def test_a_torn_last_line_is_set_aside_in_a_side_file(tmp_path, capsys):
    journal = write_journal(tmp_path, 3)
    whole = journal.path.read_bytes()
    torn = b'{"kind": "request", "request": 3, "records": [{"instru'
    journal.path.write_bytes(whole + torn)
    state = Journal(tmp_path).load()
    assert state.next_request == 3 and len(state.records) == 3
    assert journal.path.read_bytes() == whole
    (side,) = tmp_path.glob("regen_journal.jsonl.torn-*")
    assert side.read_bytes() == torn
    assert f"moved to {side}" in capsys.readouterr().err
    # An unparseable last line that does end in a newline (a crash's garbage) is set aside the same way.
    journal.path.write_bytes(whole + b"\x00" * 20 + b"\n")
    assert Journal(tmp_path).load().next_request == 3 and journal.path.read_bytes() == whole
    assert len(list(tmp_path.glob("regen_journal.jsonl.torn-*"))) == 2
    # A whole last entry that only lacks its newline is kept, and the newline is added.
    journal.path.write_bytes(whole[:-1])
    assert Journal(tmp_path).load().next_request == 3 and journal.path.read_bytes() == whole


def test_a_journal_whose_only_line_was_torn_gets_a_header_again(tmp_path):
    (tmp_path / "regen_journal.jsonl").write_bytes(b'{"kind": "hea')
    journal = Journal(tmp_path)
    assert journal.load().seed is None
    journal.start(seed=9, imported=[])
    journal.close()
    assert Journal(tmp_path).load().seed == 9


def test_filters_with_the_unicode_tokenizer_count_words_of_any_script():
    chinese = "请写一首关于秋天的诗"
    assert rejection_reason(chinese) == "too_short"  # upstream: one "word", and non-ASCII
    assert rejection_reason(chinese, "unicode") is None
    assert (
        rejection_reason("写一首诗", "unicode") is None and rejection_reason("写诗", "unicode") == "too_short"
    )
    assert rejection_reason("Écrivez un poème sur l'été.", "unicode") is None
    assert rejection_reason("Écrivez un poème sur l'été.") == "non_ascii"
    assert rejection_reason("请画一张图片 picture", "unicode") == "blacklist"
    assert rejection_reason("字" * 151, "unicode") == "too_long"
