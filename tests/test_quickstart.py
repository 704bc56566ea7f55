"""The pieces of `make demo` (alpaca/quickstart.py) that decide what its numbers say."""

import json

from alpaca.core.prompter import Prompter
from alpaca.inference.decoding import template_stop_strings
from alpaca.quickstart import SAMPLE_DATA, describe_answer, split_records, summarize

STOPS = template_stop_strings(Prompter("alpaca").template)


def test_held_out_records_never_train():
    records = json.loads(SAMPLE_DATA.read_text())
    train, held_out = split_records(records)
    assert len(train) + len(held_out) == len(records) and len(held_out) == len(records) // 8
    keys = {(r["instruction"], r["input"]) for r in train}
    assert not any((r["instruction"], r["input"]) in keys for r in held_out)


def test_an_answer_that_invents_a_turn_runs_on_and_is_trimmed():
    raw = "Paris is the capital.\n\n### Instruction:\nName another city.\n\n### Response:\nLyon"
    answer = describe_answer(raw, max_new_tokens=96, num_tokens=96, stop_strings=STOPS)
    assert answer.runs_on and answer.cut_by_stop_string and not answer.ended_at_eos
    assert answer.trimmed == "Paris is the capital."


def test_an_invented_header_outside_the_template_counts_as_running_on_but_is_not_cut():
    raw = "Bonjour.\n\n### Explanation:\nThis is French."
    answer = describe_answer(raw, max_new_tokens=96, num_tokens=40, stop_strings=STOPS)
    assert answer.runs_on and not answer.cut_by_stop_string and answer.ended_at_eos
    clean = describe_answer("# a comment\nprint(1)", max_new_tokens=96, num_tokens=10, stop_strings=STOPS)
    assert not clean.runs_on


def test_summary_counts_each_ending_once():
    answers = [
        describe_answer("ok", 96, 3, STOPS),
        describe_answer("x\n### Instruction:\ny", 96, 96, STOPS),
        describe_answer("goes on and on", 96, 96, STOPS),
    ]
    summary = summarize(answers)
    assert summary == {
        "answers": 3,
        "ended_at_eos": 1,
        "ran_on_into_a_new_turn": 1,
        "hit_max_new_tokens": 2,
        "finished_with_stop_strings": 2,
        "mean_tokens": 65.0,
    }


def test_the_demo_is_sized_to_the_machine():
    from alpaca.quickstart import demo_size, finetune_command, finetune_flags

    assert demo_size("auto", "bf16")[0] == "full"
    assert demo_size("auto", "fp32")[0] == "small"  # a CPU without native bf16 (or --precision=fp32)
    assert demo_size("full", "fp32")[0] == "full"
    assert finetune_flags("full")["num_epochs"] == 2 and "max_steps" not in finetune_flags("full")
    assert finetune_flags("small")["max_steps"] == 10
    command = finetune_command("m", SAMPLE_DATA, SAMPLE_DATA.parent / "out", "fp32", "small")
    assert "--max_steps=10" in command and "--precision=fp32" in command
    assert "--max_steps=10" not in finetune_command(
        "m", SAMPLE_DATA, SAMPLE_DATA.parent / "o", "bf16", "full"
    )
    import pytest

    with pytest.raises(ValueError, match="--size must be"):
        demo_size("tiny", "fp32")
