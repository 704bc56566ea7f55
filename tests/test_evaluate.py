"""evaluate.py: pairwise judging against a real local OpenAI-wire server with scripted verdicts, the
journal under kill -9, loss against a direct transformers computation, exact match, the leaderboard."""

import csv
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.scripted_server import RawReply, ScriptedOpenAIServer, StatusReply, TextReply

from alpaca.evaluation.exact_match import extract_answer, score_exact_match
from alpaca.evaluation.journal import JOURNAL_NAME
from alpaca.evaluation.judge import build_judge_prompt, parse_verdict
from alpaca.evaluation.pairwise import PairwiseConfig, PairwiseIncomplete, run_pairwise
from alpaca.evaluation.stats import combine_orders, win_rate

REPO = Path(__file__).resolve().parent.parent


def write_json(path: Path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


def split_prompt(prompt: str) -> tuple[str, str]:
    """(instruction, order) of a judge prompt: model outputs start with "model", references with "ref"."""
    instruction = prompt.split("## Instruction\n", 1)[1].split("\n\n## ", 1)[0]
    output_a = prompt.split("## Output (a)\n", 1)[1].split("\n\n## Output (b)\n", 1)[0]
    return instruction, "model_first" if output_a.startswith("model") else "reference_first"


def scripted(script: dict):
    """A responder that answers script[instruction][order] (a reply object or a text)."""

    def responder(prompt: str, attempt: int):
        instruction, order = split_prompt(prompt)
        reply = script[instruction][order]
        reply = reply(attempt) if callable(reply) else reply
        return TextReply(reply) if isinstance(reply, str) else reply

    return responder


def make_files(tmp_path: Path, instructions: list[str], inputs: dict | None = None) -> tuple[str, str]:
    inputs = inputs or {}
    model = [
        {
            "instruction": text,
            "input": inputs.get(text, ""),
            "output": f"model says {text} " * 2,
            "generator": "lora",
        }
        for text in instructions
    ]
    reference = [
        {
            "instruction": text,
            "input": inputs.get(text, ""),
            "output": f"ref says {text}",
            "generator": "davinci",
        }
        for text in instructions
    ]
    return write_json(tmp_path / "model.json", model), write_json(tmp_path / "reference.json", reference)


def config(tmp_path, model, reference, server, **overrides) -> PairwiseConfig:
    settings = dict(
        model_outputs=model,
        reference_outputs=reference,
        output_dir=str(tmp_path / "out"),
        base_url=server.base_url,
        judge_model="judge",
        progress=False,
        initial_retry_delay=0.01,
    )
    settings.update(overrides)
    return PairwiseConfig(**settings)


def read_outputs(folder) -> tuple[list, dict]:
    folder = Path(folder)
    return json.loads((folder / "annotations.json").read_text()), json.loads(
        (folder / "results.json").read_text()
    )


@pytest.mark.parametrize(
    "text, verdict",
    [
        ("Output (a)", "a"),
        ("Output (b)", "b"),
        ("**Output (b)**", "b"),
        ('"Output (a)".', "a"),
        ("(a)", "a"),
        ("b", "b"),
        ("Output B", "b"),
        ("Output (a) is better", "a"),
        ("Output (a) is better than Output (b).", "a"),
        ("I prefer Output (b) over Output (a).", "b"),
        ("The better output is Output (b).", "b"),
        ("Answer: Output (a)", "a"),
        ("Comparing Output (a) and Output (b):\nOutput (b) is more accurate.", "b"),
        ("Output (a)\n\n## Instruction\nWrite about Output (b)", "a"),
        ("Output (a) is better because it does not ramble.", "a"),
        ("Output (a) is worse than Output (b).", None),
        ("Both Output (a) and Output (b) are good.", None),
        ("Neither Output (a) nor Output (b).", None),
        ("Not Output (a).", None),
        ("It's a tie.", None),
        ("I cannot decide.", None),
        ("The output a user wants is missing.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_verdict_reads_what_judges_write_and_never_guesses(text, verdict):
    assert parse_verdict(text) == verdict


def test_combine_orders_and_win_rate():
    assert combine_orders("model", "model") == 2.0
    assert combine_orders("reference", "reference") == 1.0
    assert combine_orders("reference", "model") == 1.5 == combine_orders("model", "reference")
    assert combine_orders(None, "model") is None and combine_orders("model", None) is None
    rate, error = win_rate([2.0, 1.0, 1.5, None, 2.0])
    scores = [1.0, 0.0, 0.5, 1.0]
    mean = sum(scores) / 4
    expected_error = 100 * math.sqrt(sum((s - mean) ** 2 for s in scores) / 3 / 4)
    assert rate == pytest.approx(62.5) and error == pytest.approx(expected_error)
    assert win_rate([None]) == (None, None) and win_rate([2.0]) == (100.0, None)


def test_pairwise_both_orders_ties_unparseable_and_mismatches(tmp_path):
    # Each order shows the model once as Output (a) ("model_first") and once as Output (b).
    script = {
        "win": {"reference_first": "Output (b)", "model_first": "Output (a)"},
        "loss": {"reference_first": "**Output (a)**", "model_first": "Output (b) is better."},
        "position bias": {"reference_first": "Output (a)", "model_first": "Output (a)"},
        "unreadable": {"reference_first": "I cannot decide.", "model_first": "Output (a)"},
        "chatty win": {
            "reference_first": "I prefer Output (b) over Output (a).",
            "model_first": "Output (a) is better than Output (b).",
        },
        "malformed": {"reference_first": RawReply("{not json"), "model_first": "Output (a)"},
    }
    model, reference = make_files(tmp_path, list(script), inputs={"win": "some context"})
    # One record on each side without a counterpart: reported, not judged.
    write_json(
        Path(model), json.loads(Path(model).read_text()) + [{"instruction": "only model", "output": "x"}]
    )
    write_json(
        Path(reference),
        json.loads(Path(reference).read_text()) + [{"instruction": "only ref", "output": "y"}],
    )
    with ScriptedOpenAIServer(scripted(script)) as server:
        results = run_pairwise(
            config(tmp_path, model, reference, server, prompt_price_per_1m=1.0, completion_price_per_1m=2.0)
        )
    annotations, written = read_outputs(tmp_path / "out")
    assert written == results
    assert [a["preference"] for a in annotations] == [2.0, 1.0, 1.5, None, 2.0, None]
    assert annotations[0]["output_1"] == "ref says win" and annotations[0]["output_2"].startswith(
        "model says win"
    )
    assert (annotations[0]["generator_1"], annotations[0]["generator_2"]) == ("davinci", "lora")
    assert annotations[3]["raw_completion"] == {
        "reference_first": "I cannot decide.",
        "model_first": "Output (a)",
    }
    assert annotations[3]["preferred_by_order"] == {"reference_first": None, "model_first": "model"}
    assert annotations[5]["failures"]["reference_first"] == "malformed JSON"
    assert annotations[2]["verdict_by_order"] == {"reference_first": "a", "model_first": "a"}
    assert results["output_a_share"] == pytest.approx(70.0)  # 7 of the 10 readable verdicts
    counts = {
        key: results[key] for key in ("n_wins", "n_losses", "n_ties", "n_unparseable", "n_pairs", "n_pending")
    }
    assert counts == dict(n_wins=2, n_losses=1, n_ties=1, n_unparseable=2, n_pairs=6, n_pending=0)
    assert results["win_rate"] == pytest.approx(62.5)
    assert results["standard_error"] == pytest.approx(win_rate([2.0, 1.0, 1.5, 2.0])[1])
    assert results["unmatched"]["examples_only_in_model_outputs"] == ["only model"]
    assert results["unmatched"]["examples_only_in_reference_outputs"] == ["only ref"]
    assert sum(b["n_pairs"] for b in results["length_bins"]) == 6
    # Every order of every pair was asked exactly once; the input is shown only where there is one.
    asked = [split_prompt(entry["prompt"]) for entry in server.log]
    assert sorted(asked) == sorted(
        (text, order) for text in script for order in ("reference_first", "model_first")
    )
    with_input = [e["prompt"] for e in server.log if split_prompt(e["prompt"])[0] == "win"]
    assert all("## Input\nsome context\n" in prompt for prompt in with_input)
    assert not any("## Input" in e["prompt"] for e in server.log if split_prompt(e["prompt"])[0] != "win")
    assert all(e["body"]["messages"][0]["role"] == "system" for e in server.log)
    # The cost is the server's own bill at the given prices.
    prompt_tokens = sum(u["prompt_tokens"] for u in server.usage)
    completion_tokens = sum(u["completion_tokens"] for u in server.usage)
    assert results["cost"]["usd"] == pytest.approx((prompt_tokens * 1.0 + completion_tokens * 2.0) / 1e6)


def test_faults_500_and_429_with_retry_after_then_completions_api(tmp_path):
    script = {
        "flaky": {
            "reference_first": lambda attempt: StatusReply(500) if attempt == 0 else "Output (b)",
            "model_first": lambda attempt: (
                StatusReply(429, headers={"Retry-After": "0.4"}) if attempt == 0 else "Output (a)"
            ),
        },
        "steady": {"reference_first": "Output (a)", "model_first": "Output (b)"},
    }
    model, reference = make_files(tmp_path, list(script))
    with ScriptedOpenAIServer(scripted(script)) as server:
        results = run_pairwise(config(tmp_path, model, reference, server, api="completions"))
    assert (results["n_wins"], results["n_losses"], results["complete"]) == (1, 1, True)
    times = {}
    for entry in server.log:
        times.setdefault((split_prompt(entry["prompt"]), entry["action"]), []).append(entry["time"])
        assert entry["endpoint"] == "completions" and entry["body"]["stop"] == ["\n##"]
    limited = ("flaky", "model_first")
    assert len(server.log) == 6
    assert times[(limited, "TextReply")][0] - times[(limited, "StatusReply")][0] >= 0.4
    journal = [json.loads(line) for line in (tmp_path / "out" / JOURNAL_NAME).read_text().splitlines()]
    assert sorted(entry.get("retries") for entry in journal[1:]) == [0, 0, 1, 1]


def test_a_request_that_keeps_failing_stops_the_run_and_a_rerun_resumes(tmp_path, capsys):
    failing = {"yes": True}
    script = {
        "good": {"reference_first": "Output (b)", "model_first": "Output (a)"},
        "bad": {
            "reference_first": lambda attempt: StatusReply(503) if failing["yes"] else "Output (a)",
            "model_first": "Output (b)",
        },
    }
    model, reference = make_files(tmp_path, list(script))
    with ScriptedOpenAIServer(scripted(script)) as server:
        with pytest.raises(PairwiseIncomplete, match="retries are used up.*rerun"):
            run_pairwise(config(tmp_path, model, reference, server, max_retries=1, max_concurrent_requests=1))
        _, partial = read_outputs(tmp_path / "out")
        assert (partial["complete"], partial["n_pending"], partial["n_wins"]) == (False, 1, 1)
        before = len(server.log)
        failing["yes"] = False
        results = run_pairwise(config(tmp_path, model, reference, server))
    assert (results["complete"], results["n_wins"], results["n_losses"]) == (True, 1, 1)
    # The failure stopped the sending (one in flight at a time): the rerun asks only what the journal lacks.
    assert sorted(split_prompt(e["prompt"]) for e in server.log[before:]) == [
        ("bad", "model_first"),
        ("bad", "reference_first"),
    ]


def test_cost_cap_stops_before_the_cap_and_a_higher_cap_finishes(tmp_path):
    script = {f"task {i}": {"reference_first": "Output (b)", "model_first": "Output (a)"} for i in range(4)}
    model, reference = make_files(tmp_path, list(script))
    prices = dict(prompt_price_per_1m=1000.0, completion_price_per_1m=1000.0, max_concurrent_requests=1)
    with ScriptedOpenAIServer(scripted(script)) as server:
        # A request's worst case (its prompt bytes + 50 reply tokens) is ~0.75 $ at these prices, its bill
        # (scripted: words) ~0.1 $: a few fit under 1 $ before the next worst case would not.
        with pytest.raises(PairwiseIncomplete, match="max_cost_usd=1.0"):
            run_pairwise(config(tmp_path, model, reference, server, max_cost_usd=1.0, **prices))
        _, partial = read_outputs(tmp_path / "out")
        assert partial["cost"]["usd"] <= 1.0 and len(server.log) >= 1 and partial["n_pending"] >= 1
        spent = len(server.log)
        results = run_pairwise(config(tmp_path, model, reference, server, max_cost_usd=100.0, **prices))
    assert results["n_wins"] == 4 and len(server.log) == 8 and spent < 8
    billed = sum(u["prompt_tokens"] + u["completion_tokens"] for u in server.usage) * 1000.0 / 1e6
    assert results["cost"]["usd"] == pytest.approx(billed)


def journal_judgments(path: Path) -> list[dict]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_bytes().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line being written
        if entry.get("kind") == "judgment":
            entries.append(entry)
    return entries


@pytest.mark.slow
def test_kill_9_then_resume_gives_identical_results_and_judges_nothing_twice(tmp_path):
    script = {
        f"task {i}": {
            "reference_first": ["Output (b)", "Output (a)", "Output (a)", "hmm"][i % 4],
            "model_first": ["Output (a)", "Output (b)", "Output (a)", "Output (a)"][i % 4],
        }
        for i in range(12)
    }
    model, reference = make_files(tmp_path, list(script))
    with ScriptedOpenAIServer(scripted(script)) as server:
        run_pairwise(config(tmp_path, model, reference, server, output_dir=str(tmp_path / "reference")))
    expected_annotations, expected_results = read_outputs(tmp_path / "reference")

    output_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with ScriptedOpenAIServer(scripted(script), latency_s=0.1) as server:
        command = [
            sys.executable,
            "evaluate.py",
            "pairwise",
            f"--model_outputs={model}",
            f"--reference_outputs={reference}",
            f"--output_dir={output_dir}",
            f"--base_url={server.base_url}",
            "--judge_model=judge",
            "--max_concurrent_requests=2",
            "--progress=False",
        ]
        journaled_at_kill = []
        for kill_after in (4, 12):
            process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
            )
            deadline = time.monotonic() + 60
            while len(journal_judgments(output_dir / JOURNAL_NAME)) < kill_after and process.poll() is None:
                assert time.monotonic() < deadline, "evaluate.py made no progress"
                time.sleep(0.01)
            assert process.poll() is None, process.stderr.read().decode()
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            process.stderr.close()
            kill_time = time.monotonic()
            journaled_at_kill.append((kill_time, journal_judgments(output_dir / JOURNAL_NAME)))
        finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert finished.returncode == 0, finished.stderr
    annotations, results = read_outputs(output_dir)
    assert annotations == expected_annotations
    assert {k: v for k, v in results.items() if k != "cost"} == {
        k: v for k, v in expected_results.items() if k != "cost"
    }
    assert results["cost"] == expected_results["cost"]  # each judgment is billed once in the journal
    assert len(journal_judgments(output_dir / JOURNAL_NAME)) == 24
    # Nothing journaled before a kill was asked again; only requests in flight at a kill (at most 2
    # each time) could be asked twice.
    for kill_time, journaled in journaled_at_kill:
        done = {(entry["instruction"], entry["order"]) for entry in journaled}
        later = [split_prompt(e["prompt"]) for e in server.log if e["time"] > kill_time]
        assert not done & set(later)
    asked = [split_prompt(e["prompt"]) for e in server.log]
    assert set(asked) == {(text, order) for text in script for order in ("reference_first", "model_first")}
    assert len(asked) - 24 <= 2 * 2


def test_torn_last_journal_line_is_set_aside_and_a_damaged_middle_line_stops(tmp_path, capsys):
    script = {f"task {i}": {"reference_first": "Output (b)", "model_first": "Output (a)"} for i in range(2)}
    model, reference = make_files(tmp_path, list(script))
    journal = tmp_path / "out" / JOURNAL_NAME
    with ScriptedOpenAIServer(scripted(script)) as server:
        run_pairwise(config(tmp_path, model, reference, server))
        lines = journal.read_bytes().splitlines(keepends=True)
        journal.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # a kill mid-append
        results = run_pairwise(config(tmp_path, model, reference, server))
        assert results["n_wins"] == 2 and len(server.log) == 5
        assert "last line was torn" in capsys.readouterr().err
        assert len(list(journal.parent.glob(JOURNAL_NAME + ".torn-*"))) == 1
        lines = journal.read_bytes().splitlines(keepends=True)
        journal.write_bytes(lines[0] + b"garbage\n" + b"".join(lines[1:]))
        with pytest.raises(ValueError, match="line 2: not valid JSON.*Nothing was changed"):
            run_pairwise(config(tmp_path, model, reference, server))
    assert len(server.log) == 5


def test_user_mistakes_name_the_flag(tmp_path):
    good = write_json(tmp_path / "good.json", [{"instruction": "a", "output": "b"}])
    with pytest.raises(ValueError, match="--model_outputs='.*missing.json': no such file"):
        run_pairwise(
            PairwiseConfig(
                model_outputs=str(tmp_path / "missing.json"), reference_outputs=good, output_dir="x"
            )
        )
    bad = write_json(
        tmp_path / "bad.json", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]
    )
    with pytest.raises(ValueError, match="--reference_outputs=.* record 1: 'output' must be a string"):
        run_pairwise(
            PairwiseConfig(model_outputs=good, reference_outputs=bad, output_dir=str(tmp_path / "o"))
        )
    other = write_json(tmp_path / "other.json", [{"instruction": "z", "output": "b"}])
    with pytest.raises(ValueError, match="share no instruction"):
        run_pairwise(
            PairwiseConfig(model_outputs=good, reference_outputs=other, output_dir=str(tmp_path / "o"))
        )
    with pytest.raises(ValueError, match="--api must be.*--max_cost_usd needs a price"):
        run_pairwise(
            PairwiseConfig(
                model_outputs=good,
                reference_outputs=good,
                output_dir="o",
                api="x",
                judge_model="m",
                max_cost_usd=1,
            )
        )
    with pytest.raises(
        ValueError, match="--judge_model must be text, not 4 .*--max_tokens must be a whole number"
    ):
        run_pairwise(
            PairwiseConfig(
                model_outputs=good, reference_outputs=good, output_dir="o", judge_model=4, max_tokens="x"
            )
        )
    with pytest.raises(ValueError, match="good.json is a file, not a folder"):
        run_pairwise(PairwiseConfig(model_outputs=good, reference_outputs=good, output_dir=f"{good}/out"))
    result = subprocess.run(
        [sys.executable, "evaluate.py", "pairwise", f"--model_outputs={good}", f"--reference_outputs={good}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 2 and result.stderr.startswith("evaluate.py: error: --output_dir is required")


def test_judge_prompt_shows_instruction_input_and_both_outputs():
    prompt = build_judge_prompt("Sum these.", "1 and 2", "three", "3")
    assert prompt.index("## Instruction\nSum these.") < prompt.index("## Input\n1 and 2")
    assert (
        prompt.index("## Output (a)\nthree")
        < prompt.index("## Output (b)\n3")
        < prompt.index('"Output (a)" or')
    )
    assert "## Input" not in build_judge_prompt("Say hi.", "", "hi", "hello")


@pytest.mark.parametrize(
    "text, answer",
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("Total: $1,250.\n#### $1,250", "1250"),
        ("#### 18.0", "18"),
        ("The answer is 42.", "42"),
        ("It costs -5 dollars, then 12.5 more", "12.5"),
        ("#### 3\nLater text 99", "3"),
        ("#### none\nbut 5 was computed", "5"),
        ("no numbers here", None),
    ],
)
def test_extract_answer_rule(text, answer):
    value = extract_answer(text)
    assert (None if value is None else format(value.normalize(), "f")) == answer


def test_exact_match_accuracy_and_per_item_file(tmp_path):
    references = [
        {"instruction": "q1", "input": "", "output": "steps\n#### 1,000"},
        {"instruction": "q2", "input": "", "output": "#### 5"},
        {"instruction": "q3", "input": "ctx", "output": "#### 2.5"},
        {"instruction": "q4", "input": "", "output": "#### 8"},
    ]
    outputs = [
        {"instruction": "q1", "output": "so $1000 in all", "generator": "m"},
        {"instruction": "q2", "output": "#### 6", "generator": "m"},
        {"instruction": "q3", "input": "ctx", "output": "2.50", "generator": "m"},
        {"instruction": "q4", "output": "I don't know", "generator": "m"},
        {"instruction": "q5", "output": "#### 1", "generator": "m"},
    ]
    out_path = write_json(tmp_path / "outputs.json", outputs)
    ref_path = write_json(tmp_path / "refs.json", references)
    report = score_exact_match(out_path, ref_path)
    assert [item["correct"] for item in report["items"]] == [True, False, True, False]
    assert (report["accuracy"], report["n_no_answer"], report["n_outputs_without_reference"]) == (50.0, 1, 1)
    result = subprocess.run(
        [sys.executable, "evaluate.py", "exact_match", f"--outputs={out_path}", f"--references={ref_path}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert result.returncode == 0, result.stderr
    assert "exact match: 50.0% (2 of 4" in result.stdout
    written = json.loads((tmp_path / "outputs.exact_match.json").read_text())
    assert written["items"][0]["predicted"] == "1000" and written["items"][1]["expected"] == "5"


def test_leaderboard_writes_markdown_csv_and_png(tmp_path):
    script = {f"task {i}": {"reference_first": "Output (b)", "model_first": "Output (b)"} for i in range(3)}
    script["task 0"] = {"reference_first": "Output (b)", "model_first": "Output (a)"}
    model, reference = make_files(tmp_path, list(script))
    runs = tmp_path / "runs"
    with ScriptedOpenAIServer(scripted(script)) as server:
        run_pairwise(config(tmp_path, model, reference, server, output_dir=str(runs / "lora")))
        flipped = {k: {"reference_first": "Output (a)", "model_first": "Output (b)"} for k in script}
        server.responder = scripted(flipped)
        run_pairwise(
            config(tmp_path, model, reference, server, output_dir=str(runs / "base"), judge_model="j2")
        )
    import evaluate

    evaluate.leaderboard(str(runs / "base"), str(runs / "lora"))
    table = (runs / "leaderboard.md").read_text()
    assert table.splitlines()[0].startswith("| model | reference | judge_model | win_rate |")
    rows = list(csv.DictReader(io.StringIO((runs / "leaderboard.csv").read_text())))
    assert [(row["judge_model"], float(row["win_rate"])) for row in rows] == [
        ("judge", pytest.approx(100 * 2 / 3)),
        ("j2", 0.0),
    ]
    assert rows[0]["results_dir"].endswith("lora") and float(rows[0]["standard_error"]) > 0
    png = (runs / "leaderboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    with pytest.raises(ValueError, match="has no results.json"):
        evaluate.leaderboard(str(tmp_path))


def test_loss_matches_a_direct_transformers_computation(
    tiny_llama, tiny_llama_adapter, tmp_path, monkeypatch
):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import evaluate
    from alpaca.core.prompter import Prompter

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # an empty prepared-data cache
    records = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "The sum is 5."},
        {"instruction": "Say hello politely to the whole team.", "input": "", "output": "Hello, everyone!"},
    ]
    data = write_json(tmp_path / "heldout.json", records)
    out = tmp_path / "loss.json"
    evaluate.loss(
        base_model=tiny_llama, lora_weights=tiny_llama_adapter, data_path=data, output_file=str(out)
    )
    report = json.loads(out.read_text())

    # Directly: prompt + output + EOS, labels only on the output and EOS, summed over tokens.
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), tiny_llama_adapter
    ).eval()
    prompter = Prompter()
    total, tokens = 0.0, 0
    for record in records:
        prompt = prompter.generate_prompt(record["instruction"], record["input"] or None)
        prompt_ids = tokenizer(prompt)["input_ids"]
        output_ids = tokenizer(prompt + record["output"])["input_ids"][len(prompt_ids) :]
        ids = torch.tensor([prompt_ids + output_ids + [tokenizer.eos_token_id]])
        labels = ids.clone()
        labels[0, : len(prompt_ids)] = -100
        with torch.no_grad():
            mean = model(input_ids=ids, labels=labels).loss.item()
        count = len(output_ids) + 1
        total, tokens = total + mean * count, tokens + count
    assert report["tokens"] == tokens and report["examples"] == 3
    assert report["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    # The adapter is applied: the base alone scores differently.
    evaluate.loss(base_model=tiny_llama, data_path=data, output_file=str(tmp_path / "base.json"))
    assert json.loads((tmp_path / "base.json").read_text())["loss"] != pytest.approx(report["loss"], rel=1e-4)
    # the records were tokenized once, into the cache training uses; the second score reused it
    assert len((tmp_path / "xdg" / "alpaca-kit" / "data" / "builds.log").read_text().splitlines()) == 1


def test_identical_prompts_are_asked_once(tmp_path, capsys):
    # A pair whose two outputs are equal reads the same in both orders; the same pair twice repeats too.
    model = [
        {"instruction": "same", "output": "ref says same"},
        {"instruction": "twice", "output": "model a"},
    ]
    model.append({"instruction": "twice", "output": "model a"})
    reference = [
        {"instruction": "same", "output": "ref says same"},
        {"instruction": "twice", "output": "ref b"},
        {"instruction": "twice", "output": "ref b"},
    ]
    paths = write_json(tmp_path / "m.json", model), write_json(tmp_path / "r.json", reference)
    with ScriptedOpenAIServer(lambda prompt, attempt: TextReply("Output (a)")) as server:
        results = run_pairwise(config(tmp_path, *paths, server))
    assert len(server.log) == 3 and results["n_ties"] == 3
    assert (
        "6 judgments: 0 from the journal, 3 repeating an identical prompt, 3 to request"
        in capsys.readouterr().out
    )
