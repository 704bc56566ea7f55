"""generate_instruction.py end to end, against a real HTTP server on 127.0.0.1 with scripted replies."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers.scripted_server import (
    DropConnection,
    RawReply,
    ScriptedOpenAIServer,
    StatusReply,
    TextReply,
    synthetic_responder,
)
from rouge_score import rouge_scorer

import generate_instruction
from alpaca.selfinstruct import pipeline
from alpaca.selfinstruct.journal import JOURNAL_NAME
from alpaca.selfinstruct.pipeline import build_prompt
from alpaca.selfinstruct.seeds import load_seed_tasks
from alpaca.selfinstruct.settings import SelfInstructConfig
from alpaca.selfinstruct.similarity import rouge_tokens

REPO = Path(__file__).resolve().parents[1]
SEED_FILE = str(REPO / "data" / "seed_tasks_sample.jsonl")
SECRET = "sk-test-SECRET-0123456789"
SEED = 11


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def prompt_of(request_index: int, **settings) -> str:
    config = SelfInstructConfig(**settings)
    return build_prompt(config, SEED, request_index, load_seed_tasks(SEED_FILE))


def block(number: int, instruction: str, task_input: str = "<noinput>", output: str = "An answer.") -> str:
    """One list item as a model writes it; item N+1 continues the prompt's ``N+1. Instruction:``."""
    head = f" {instruction}" if number == 4 else f"\n{number}. Instruction: {instruction}"
    return f"{head}\n{number}. Input:\n{task_input}\n{number}. Output:\n{output}\n"


def reply(*blocks: str, finish_reason: str = "stop") -> TextReply:
    return TextReply("###".join(blocks), finish_reason=finish_reason)


A = ("Describe the water cycle in two short sentences.", "", "Water evaporates, condenses and falls as rain.")
C = ("Translate the sentence into German.", "The weather is lovely today.", "Das Wetter ist heute schön.")
D = ("Suggest a name for a bakery that sells only bread.", "", "Crust & Crumb")
H = (
    "Explain what a leap year is and why it exists.",
    "",
    "A year with 366 days that keeps calendars aligned.",
)
N = ("Classify these fruits by their color.", "banana, cherry, lime", "Yellow, red, green")
LAST = [
    ("Estimate how long it takes to walk five kilometers.", "", "About an hour."),
    ("Propose a weekly schedule for learning to play chess.", "", "Monday: openings; Wednesday: tactics."),
    (
        "Identify the logical fallacy in the argument.",
        "Everyone I know likes jazz, so it is the best.",
        "Hasty generalization.",
    ),
    ("Compose a limerick about a forgetful robot.", "", "A robot who lived in a shed..."),
    ("What are the main causes of inflation?", "", "Demand outpacing supply, rising costs, money growth."),
    ("Recommend a board game for a family with young kids.", "", "Ticket to Ride: First Journey."),
]
EXPECTED = [A, C, D, H, N, *LAST]


def scenario(chat: bool) -> dict[int, list]:
    """Request index -> the actions for its successive attempts (the last one repeats)."""
    first = [block(4, *A)]
    if chat:
        # Chat models often restate the header they were asked to continue.
        first = [f"###\n4. Instruction: {A[0]}\n4. Input:\n<noinput>\n4. Output:\n{A[2]}\n"]
    too_long = "This model's maximum context length is 4097 tokens. Please reduce the length of the messages."
    return {
        0: [
            StatusReply(400, too_long),
            reply(*first, block(5, "Draw a picture of a friendly dragon."), block(6, *C)),
        ],
        1: [
            StatusReply(429, "rate limited", headers={"Retry-After": "1"}),
            StatusReply(500, "internal error"),
            reply(
                block(4, *D),
                block(5, "Write a program that sorts a list of numbers."),
                "\n6. Instruction: Give an example of a metaphor.\n6. Input:\n<noinput>\n",
                block(7, "Rewrite the sentence in the past tense, please.", "I walk home.", "I walked home."),
            ),
        ],
        2: [
            TextReply("too slow", delay_s=1.5),
            DropConnection(),
            reply(
                block(4, *H), block(5, "Compose a haiku about", "<noinput>", "Autumn"), finish_reason="length"
            ),
        ],
        3: [RawReply('{"choices": [ this is not json')],
        4: [
            RawReply(
                json.dumps({"id": "x", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 0}})
            )
        ],
        5: [TextReply("Sorry, I can only answer questions about cooking.")],
        6: [
            reply(
                block(4, "Describe the water cycle in two short sentences, please."),
                block(5, '"Carpe diem" means what in English today?'),
                block(6, "¿Qué hora es en Tokio ahora mismo?"),
                block(7, "Name three colors"),
                block(8, *N),
            )
        ],
        7: [reply(*(block(4 + i, *record) for i, record in enumerate(LAST)))],
    }


def scripted_responder(script_by_index: dict[int, list], **prompt_settings):
    prompts = {prompt_of(index, **prompt_settings): actions for index, actions in script_by_index.items()}
    assert len(prompts) == len(script_by_index), "two scripted requests share a prompt; change SEED"

    def respond(prompt: str, attempt: int):
        actions = prompts.get(prompt)
        if actions is None:
            return synthetic_responder(prompt, attempt)
        return actions[min(attempt, len(actions) - 1)]

    return respond, prompts


def run_script(output_dir, base_url, **flags):
    settings = dict(
        output_dir=str(output_dir),
        seed_tasks_path=SEED_FILE,
        num_instructions_to_generate=10,
        request_batch_size=2,
        base_url=base_url,
        seed=SEED,
        max_retries=3,
        request_timeout=0.5,
        initial_retry_delay=0.05,
        progress=False,
    )
    generate_instruction.generate_instruction_following_data(**(settings | flags))
    regen = json.loads((Path(output_dir) / "regen.json").read_text())
    summary = json.loads((Path(output_dir) / "generate_instruction_summary.json").read_text())
    return regen, summary


def reference_metadata(records: list[dict]) -> list[tuple[dict, float]]:
    """Upstream's most_similar_instructions / avg_similarity_score, recomputed with rouge_score."""
    pool = [seed["instruction"] for seed in load_seed_tasks(SEED_FILE)]
    out = []
    for record in records:
        tokens = rouge_tokens(record["instruction"])
        scores = [rouge_scorer._score_lcs(tokens, rouge_tokens(text)).fmeasure for text in pool]
        out.append(
            (
                {pool[i]: scores[i] for i in np.argsort(scores, kind="stable")[-10:][::-1]},
                float(np.mean(scores)),
            )
        )
        pool.append(record["instruction"])
    return out


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_scripted_faults_give_the_exact_records(tmp_path, capsys, api):
    respond, prompts = scripted_responder(scenario(chat=api == "chat"))
    with ScriptedOpenAIServer(respond) as server:
        regen, summary = run_script(tmp_path, server.base_url, api=api)
    assert [(r["instruction"], r["input"], r["output"]) for r in regen] == EXPECTED
    for record, (most_similar, average) in zip(regen, reference_metadata(regen)):
        assert json.dumps(record["most_similar_instructions"]) == json.dumps(most_similar)
        assert record["avg_similarity_score"] == average
    assert summary["stop_reason"] == "reached 10 instructions"
    assert (summary["requests"], summary["kept"], summary["generated"]) == (8, 11, 13)
    assert (summary["failed_replies"], summary["empty_replies"], summary["retries"]) == (2, 1, 4)
    assert summary["failures"] == {"malformed JSON": 1, "no choices": 1}
    assert summary["rejected"] == {
        "too_short": 1,
        "too_long": 0,
        "blacklist": 1,
        "write_a_program": 1,
        "punctuation": 1,
        "non_ascii": 1,
        "malformed": 2,
        "truncated": 1,
        "rouge_similar": 2,
    }
    assert summary["cost_usd"] == pytest.approx(
        (summary["prompt_tokens"] * 0.15 + summary["completion_tokens"] * 0.60) / 1e6
    )

    log = {prompt: [entry for entry in server.log if entry["prompt"] == prompt] for prompt in prompts}
    first, second = (log[prompt] for prompt in list(prompts)[:2])
    assert all(entry["endpoint"] == api for entry in server.log)
    # "Prompt too long" shrinks max_tokens by 20%, as upstream did.
    assert [entry["body"]["max_tokens"] for entry in first] == [3072, 2457]
    body = first[0]["body"]
    assert body["stop"] == ["\n20", "20."] and body["temperature"] == 1.0 and body["top_p"] == 1.0
    if api == "chat":
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
    # Retry-After: 1 is honoured before the retry.
    assert second[1]["time"] - second[0]["time"] >= 0.95
    assert [len(entries) for entries in log.values()] == [2, 3, 3, 1, 1, 1, 1, 1]

    alpaca = json.loads((tmp_path / "alpaca_data.json").read_text())
    assert alpaca == [{"instruction": i, "input": x, "output": o} for i, x, o in EXPECTED]
    config = json.loads((tmp_path / "generate_instruction_config.json").read_text())
    assert config["seed"] == SEED and config["api"] == api
    captured = capsys.readouterr()
    for path in tmp_path.iterdir():
        assert SECRET not in path.read_text()
    assert SECRET not in captured.out + captured.err


def test_output_is_the_same_for_any_concurrency(tmp_path):
    respond, _ = scripted_responder(scenario(chat=False))
    outputs = []
    for concurrency in (1, 8):
        with ScriptedOpenAIServer(respond) as server:
            regen, _ = run_script(
                tmp_path / str(concurrency), server.base_url, max_concurrent_requests=concurrency
            )
        outputs.append(regen)
    assert outputs[0] == outputs[1]


def test_retries_used_up_stop_cleanly_and_a_rerun_resumes(tmp_path):
    failing = {"on": True}
    broken_prompt = prompt_of(3)

    def respond(prompt, attempt):
        if failing["on"] and prompt == broken_prompt:
            return StatusReply(503, "overloaded")
        return synthetic_responder(prompt, attempt)

    flags = dict(num_instructions_to_generate=60, request_batch_size=5, max_retries=2)
    with ScriptedOpenAIServer(respond) as server:
        with pytest.raises(
            SystemExit, match=r"server error \(503\), and --max_retries=2 retries are used up"
        ):
            run_script(tmp_path / "run", server.base_url, **flags)
        saved = json.loads((tmp_path / "run" / "regen.json").read_text())
        summary = json.loads((tmp_path / "run" / "generate_instruction_summary.json").read_text())
        assert summary["requests"] == 3 and len(saved) == summary["kept"] > 0
        failing["on"] = False
        resumed, _ = run_script(tmp_path / "run", server.base_url, **flags)
        reference, _ = run_script(tmp_path / "reference", server.base_url, **flags)
    assert resumed[: len(saved)] == saved
    assert resumed == reference
    instructions = [record["instruction"] for record in resumed]
    assert len(instructions) == len(set(instructions))


PRICED = dict(model_name="my-local-model", prompt_price_per_1m=1000.0, completion_price_per_1m=1000.0)


def billed_usd(server: ScriptedOpenAIServer) -> float:
    """What the server billed: every reply it sent, at PRICED's $1,000 per 1M tokens."""
    return sum(usage["prompt_tokens"] + usage["completion_tokens"] for usage in server.usage) * 1e-3


def journal_entries(output_dir: Path, kind: str) -> list[dict]:
    lines = (output_dir / JOURNAL_NAME).read_bytes().splitlines()
    return [entry for entry in map(json.loads, lines) if entry["kind"] == kind]


def test_max_cost_holds_with_requests_in_flight_and_counts_every_reply(tmp_path):
    # A reply costs about $0.75 here and at most about $3.5 (its prompt's bytes and 400 tokens), so
    # about 3 requests start at once, then more only while the worst case of all in flight still fits.
    flags = dict(PRICED, num_instructions_to_generate=1000, max_tokens=400, max_concurrent_requests=8)
    with ScriptedOpenAIServer(synthetic_responder, latency_s=0.05) as server:
        regen, summary = run_script(tmp_path, server.base_url, max_cost_usd=12.0, request_timeout=30, **flags)
        first_bill = billed_usd(server)
        assert summary["cost_usd"] == pytest.approx(first_bill, abs=1e-9) and first_bill <= 12.0
        assert summary["stop_reason"].startswith("reached --max_cost_usd=12.0: spent $")
        assert summary["requests"] == len(server.usage) >= 8 and len(regen) == summary["kept"]
        # A rerun with a higher cap continues from the journal.
        resumed, summary = run_script(
            tmp_path, server.base_url, max_cost_usd=20.0, request_timeout=30, **flags
        )
    assert resumed[: len(regen)] == regen and len(resumed) > len(regen)
    assert summary["cost_usd"] == pytest.approx(billed_usd(server), abs=1e-9) and billed_usd(server) <= 20.0


def test_replies_in_flight_at_the_stop_are_counted_and_kept_for_a_rerun(tmp_path):
    flags = dict(PRICED, request_batch_size=2, max_concurrent_requests=8, request_timeout=30)
    with ScriptedOpenAIServer(synthetic_responder, latency_s=0.05) as server:
        regen, summary = run_script(tmp_path, server.base_url, num_instructions_to_generate=30, **flags)
        stored = journal_entries(tmp_path, "reply")
        # The target is met at a batch boundary with requests still in flight: all paid, all counted.
        assert stored and summary["cost_usd"] == pytest.approx(billed_usd(server), abs=1e-9)
        assert [entry["request"] for entry in stored] == list(
            range(summary["requests"], summary["requests"] + len(stored))
        )
        assert summary["this_run"]["stored_replies"] == len(stored)
        resumed, summary = run_script(tmp_path, server.base_url, num_instructions_to_generate=150, **flags)
        bought = [entry["prompt"] for entry in server.log]
        assert summary["cost_usd"] == pytest.approx(billed_usd(server), abs=1e-9)
        reference, _ = run_script(
            tmp_path / "reference", server.base_url, num_instructions_to_generate=150, **flags
        )
    # The rerun used the stored replies instead of buying them again, and gave the unbroken run's records.
    assert summary["requests"] > stored[-1]["request"]
    assert summary["this_run"]["stored_replies_used"] == len(stored)
    assert len(bought) == len(set(bought))
    assert resumed == reference


def test_machine_examples_are_mixed_in_deterministically(tmp_path, monkeypatch):
    # A short lag so that a small run reaches the requests that may use machine examples.
    monkeypatch.setattr(pipeline, "MACHINE_EXAMPLE_LAG", 3)
    flags = dict(num_instructions_to_generate=80, request_batch_size=2, num_machine_instructions=2)
    outputs, logs = [], []
    for concurrency in (1, 8):
        with ScriptedOpenAIServer(synthetic_responder) as server:
            regen, summary = run_script(
                tmp_path / str(concurrency), server.base_url, max_concurrent_requests=concurrency, **flags
            )
        outputs.append(regen)
        logs.append(server.log)
    assert outputs[0] == outputs[1] and summary["requests"] > 4
    machine = {record["instruction"] for record in outputs[0]}
    uses_machine = [any(f"Instruction: {text}\n" in entry["prompt"] for text in machine) for entry in logs[0]]
    assert not any(uses_machine[:4]) and any(uses_machine[4:])


def test_adopts_an_upstream_regen_json(tmp_path, capsys):
    old = [
        {"instruction": "Explain the rules of cricket to a beginner.", "input": "", "output": "Two teams..."}
    ]
    (tmp_path / "regen.json").write_text(json.dumps(old))
    with ScriptedOpenAIServer(synthetic_responder) as server:
        regen, summary = run_script(tmp_path, server.base_url, num_instructions_to_generate=20)
    assert regen[0] == old[0] and summary["kept"] == len(regen) >= 20
    assert "Loaded 1 machine-generated instructions" in capsys.readouterr().out


def journal_requests(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(1 for line in path.read_bytes().splitlines() if b'"kind": "request"' in line)


@pytest.mark.slow
def test_kill_9_mid_run_loses_and_duplicates_nothing(tmp_path):
    flags = dict(num_instructions_to_generate=150, request_batch_size=5, max_concurrent_requests=2)
    with ScriptedOpenAIServer(synthetic_responder) as server:
        reference, _ = run_script(tmp_path / "reference", server.base_url, **flags)
    output_dir = tmp_path / "killed"
    command = [
        sys.executable,
        "generate_instruction.py",
        f"--output_dir={output_dir}",
        f"--seed_tasks_path={SEED_FILE}",
        f"--seed={SEED}",
        "--save_every_s=0",
        "--progress=False",
        *(f"--{name}={value}" for name, value in flags.items()),
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with ScriptedOpenAIServer(synthetic_responder, latency_s=0.15) as server:
        command.append(f"--base_url={server.base_url}")
        survivors = []
        for kill_after in (3, 8):
            process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            deadline = time.monotonic() + 30
            while journal_requests(output_dir / JOURNAL_NAME) < kill_after and process.poll() is None:
                assert time.monotonic() < deadline, "the script made no progress"
                time.sleep(0.01)
            assert process.poll() is None, process.stderr.read().decode()
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            process.stderr.close()
            # regen.json is whole (old or new) whenever it exists; the journal keeps every applied request.
            if (output_dir / "regen.json").exists():
                json.loads((output_dir / "regen.json").read_text())
            survivors.append(journal_requests(output_dir / JOURNAL_NAME))
        finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    assert survivors[0] >= 3 and survivors[1] >= 8
    final = json.loads((output_dir / "regen.json").read_text())
    assert final == reference
    assert json.loads((output_dir / "alpaca_data.json").read_text()) == [
        {key: record[key] for key in ("instruction", "input", "output")} for record in reference
    ]


def test_module_form_and_bad_seed_file_error(tmp_path):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text(
        '{"instruction": "A task.", "instances": [{"input": "", "output": "x"}]}\n{"name": "oops"}\n'
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "generate_instruction",
            "generate_instruction_following_data",
            f"--seed_tasks_path={bad}",
            f"--output_dir={tmp_path / 'out'}",
            "--base_url=http://127.0.0.1:9/v1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"{bad} line 2: missing 'instruction' and 'instances'" in result.stderr


def test_a_run_that_keeps_nothing_new_stops_and_a_higher_limit_continues(tmp_path):
    same = reply(block(4, *A), block(5, *D))
    flags = dict(num_instructions_to_generate=10, max_concurrent_requests=4, request_timeout=30)
    with ScriptedOpenAIServer(lambda prompt, attempt: same) as server:
        with pytest.raises(
            SystemExit, match=r"the last 5 requests kept no new instruction \(--max_requests_without_new=5\)"
        ):
            run_script(tmp_path, server.base_url, max_requests_without_new=5, **flags)
        requests = journal_entries(tmp_path, "request")
        assert [len(entry["records"]) for entry in requests] == [2, 0, 0, 0, 0, 0]
        assert len(json.loads((tmp_path / "regen.json").read_text())) == 2
        summary = json.loads((tmp_path / "generate_instruction_summary.json").read_text())
        assert summary["stop_reason"].startswith("the last 5 requests kept no new instruction")
        # The same limit stops at once; a higher one continues from the journal, buying nothing twice.
        with pytest.raises(SystemExit, match="the last 5 requests"):
            run_script(tmp_path, server.base_url, max_requests_without_new=5, **flags)
        with pytest.raises(SystemExit, match="the last 8 requests"):
            run_script(tmp_path, server.base_url, max_requests_without_new=8, **flags)
    assert [entry["request"] for entry in journal_entries(tmp_path, "request")] == list(range(9))
    assert max(server._attempts.values()) == 1


def seed_line(**overrides) -> bytes:
    task = {"instruction": "Name a planet.", "instances": [{"input": "", "output": "Mars"}]} | overrides
    return json.dumps(task).encode()


@pytest.mark.parametrize(
    "case, message",
    [
        ("output_dir_is_a_file", r"--output_dir '.*notes\.txt': .*notes\.txt is a file, not a folder"),
        ("output_dir_under_a_file", r"--output_dir '.*notes\.txt/run': .*notes\.txt is a file, not a folder"),
        ("count_not_a_number", r"--num_instructions_to_generate must be a whole number, not 'abc'"),
        ("invalid_utf8", r"seeds\.jsonl is not valid UTF-8 \(byte \d+, line 2\)"),
        ("deeply_nested", r"seeds\.jsonl line 2: JSON nested too deeply"),
        ("huge_integer", r"seeds\.jsonl line 2: not valid JSON \(Exceeds the limit \(4300 digits\)"),
    ],
)
def test_user_mistakes_are_one_error_line_before_any_request(tmp_path, capsys, case, message):
    from alpaca.core.cli import run

    seeds, notes = tmp_path / "seeds.jsonl", tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    second = {
        "invalid_utf8": b'{"instruction": "Na\xffme a star.", "instances": [{"input": "", "output": "Sun"}]}',
        "deeply_nested": b'{"instruction": "x", "instances": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "huge_integer": seed_line(id=0)[:-1] + b', "n": ' + b"7" * 5000 + b"}",
    }.get(case, seed_line())
    seeds.write_bytes(seed_line() + b"\n" + second + b"\n" + seed_line() + b"\n")
    flags = {
        "output_dir_is_a_file": [f"--output_dir={notes}"],
        "output_dir_under_a_file": [f"--output_dir={notes}/run"],
        "count_not_a_number": ["--num_instructions_to_generate=abc"],
    }.get(case, [])
    with ScriptedOpenAIServer(synthetic_responder) as server:
        argv = [
            f"--seed_tasks_path={seeds}",
            f"--output_dir={tmp_path / 'out'}",
            f"--base_url={server.base_url}",
        ]
        with pytest.raises(SystemExit) as exited:
            run(
                generate_instruction.generate_instruction_following_data,
                "generate_instruction.py",
                argv + flags,
            )
    assert exited.value.code == 2 and server.log == []
    err = capsys.readouterr().err
    assert err.startswith("generate_instruction.py: error: ") and len(err.strip().splitlines()) <= 2, err
    assert re.search(message, err), err
    assert notes.read_text() == "my notes\n" and not (tmp_path / "out").exists()


def test_a_garbled_journal_line_stops_the_rerun_before_any_request_and_deletes_nothing(tmp_path, capsys):
    from alpaca.core.cli import run

    flags = dict(num_instructions_to_generate=40, request_batch_size=1, max_concurrent_requests=1)
    with ScriptedOpenAIServer(synthetic_responder) as server:
        run_script(tmp_path, server.base_url, **flags)
        journal = tmp_path / JOURNAL_NAME
        lines = journal.read_bytes().split(b"\n")
        assert len(lines) >= 6
        lines[2] = lines[2][:1] + b"#garbled#" + lines[2][1:]
        journal.write_bytes(b"\n".join(lines))
        sent = len(server.log)
        argv = [f"--output_dir={tmp_path}", f"--seed_tasks_path={SEED_FILE}", f"--base_url={server.base_url}"]
        with pytest.raises(SystemExit) as exited:
            run(generate_instruction.generate_instruction_following_data, "generate_instruction.py", argv)
        assert len(server.log) == sent
    assert exited.value.code == 2 and journal.read_bytes() == b"\n".join(lines)
    assert f"generate_instruction.py: error: {journal} line 3: not valid JSON" in capsys.readouterr().err


def test_unicode_tokenizer_keeps_chinese_and_rejects_its_duplicates(tmp_path):
    chinese = [
        ("请写一首关于秋天的诗。", "", "秋风起，落叶飞。"),
        ("请写一首关于秋天的诗", "", "又一首。"),
        ("解释为什么天空是蓝色的。", "", "因为瑞利散射。"),
    ]
    answer = reply(*(block(4 + i, *record) for i, record in enumerate(chinese)))
    flags = dict(num_instructions_to_generate=2, request_batch_size=1, max_concurrent_requests=1)
    with ScriptedOpenAIServer(lambda prompt, attempt: answer) as server:
        regen, summary = run_script(tmp_path / "unicode", server.base_url, rouge_tokenizer="unicode", **flags)
        assert [record["instruction"] for record in regen] == [chinese[0][0], chinese[2][0]]
        assert summary["rejected"]["rouge_similar"] == 1
        assert regen[1]["most_similar_instructions"][chinese[0][0]] == pytest.approx(2 * 2 / 21)  # 天 ... 的
        with pytest.raises(SystemExit, match="the last 2 requests kept no new instruction"):
            run_script(tmp_path / "default", server.base_url, max_requests_without_new=2, **flags)
    summary = json.loads((tmp_path / "default" / "generate_instruction_summary.json").read_text())
    assert summary["kept"] == 0 and summary["rejected"]["too_short"] == 6
