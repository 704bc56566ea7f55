"""One run per output: a second run into the same output folder or file stops at once with one line
naming the first (pid, host, command); a lock left by a killed run is taken over. Two real
`evaluate.py pairwise` processes into one folder, and every other writer's entry function against a
real process holding the lock."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.scripted_server import ScriptedOpenAIServer, TextReply

from alpaca.core.locks import OutputInUse, lock_path, output_lock

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def pairwise_command(tmp_path: Path, base_url: str, output_dir: Path) -> list[str]:
    model = [{"instruction": f"task {i}", "output": f"model {i}"} for i in range(8)]
    reference = [{"instruction": f"task {i}", "output": f"ref {i}"} for i in range(8)]
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "reference.json").write_text(json.dumps(reference))
    return [
        sys.executable,
        "evaluate.py",
        "pairwise",
        f"--model_outputs={tmp_path / 'model.json'}",
        f"--reference_outputs={tmp_path / 'reference.json'}",
        f"--output_dir={output_dir}",
        f"--base_url={base_url}",
        "--judge_model=judge",
        "--max_concurrent_requests=1",
        "--progress=False",
    ]


def test_two_pairwise_runs_into_one_folder_judge_once_and_a_killed_runs_lock_is_taken_over(tmp_path):
    output_dir = tmp_path / "eval"
    with ScriptedOpenAIServer(lambda prompt, attempt: TextReply("Output (a)"), latency_s=0.3) as server:
        command = pairwise_command(tmp_path, server.base_url, output_dir)
        first = subprocess.Popen(
            command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while not server.log:
            assert first.poll() is None and time.monotonic() < deadline, "the first run did not start"
            time.sleep(0.02)
        second = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert lines[0].startswith(
            f"evaluate.py: error: --output_dir='{output_dir}' is in use by another run"
        )
        assert f"pid {first.pid} on {socket.gethostname()}" in lines[0] and "evaluate.py pairwise" in lines[0]
        assert first.wait(timeout=60) == 0, first.stderr.read().decode()
        first.stderr.close()
        # Each of the 16 judgments (8 pairs, both orders) was asked once, by the first run only.
        assert len(server.log) == 16
        assert not lock_path(output_dir).exists()  # a run that ends deletes its lock

        # A run killed mid-way leaves its lock file; the OS dropped the lock, so the next run takes it.
        killed_dir = tmp_path / "killed"
        command = pairwise_command(tmp_path, server.base_url, killed_dir)
        victim = subprocess.Popen(
            command, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        asked = len(server.log)
        while len(server.log) < asked + 2:
            assert victim.poll() is None and time.monotonic() < deadline + 60, "the run did not start"
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        assert f'"pid": {victim.pid}' in lock_path(killed_dir).read_text()
        rerun = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
        assert rerun.returncode == 0, rerun.stderr
        assert f"taking over the lock left by pid {victim.pid}" in rerun.stderr
        assert json.loads((killed_dir / "results.json").read_text())


@pytest.fixture
def holder(tmp_path):
    """`holder(*outputs)`: a separate process holding the locks of `outputs` ((path, inside) pairs)."""
    processes = []

    def hold(*outputs):
        script = (
            "import sys, contextlib\n"
            "from alpaca.core.locks import output_lock\n"
            "with contextlib.ExitStack() as stack:\n"
            "    for path, inside in zip(sys.argv[1::2], sys.argv[2::2]):\n"
            "        stack.enter_context(output_lock(path, inside=inside == '1'))\n"
            "    print('held', flush=True)\n"
            "    sys.stdin.read()\n"
        )
        args = [word for path, inside in outputs for word in (str(path), "1" if inside else "0")]
        process = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=REPO,
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        processes.append(process)
        assert process.stdout.readline() == "held\n"
        return process

    yield hold
    for process in processes:
        process.stdin.close()
        process.wait(timeout=30)


def test_every_writer_refuses_an_output_another_process_holds(
    holder, tmp_path, tiny_llama, tiny_llama_adapter, small_data
):
    import export_gguf
    import export_hf_checkpoint
    import export_state_dict_checkpoint
    import finetune
    import generate
    import generate_instruction
    import weight_diff

    out = {name: tmp_path / name for name in ("lora", "hf", "meta", "diff", "tuned", "regen")}
    out["gguf"] = tmp_path / "model.gguf"
    out["batch"] = tmp_path / "batch.json"
    inputs = tmp_path / "in.json"
    inputs.write_text(json.dumps([{"instruction": "Say hi."}]))
    process = holder(*[(path, name == "regen") for name, path in out.items()])
    named = f"in use by another run \\(pid {process.pid} on "
    calls = {
        "lora": lambda: finetune.train(
            base_model=tiny_llama, data_path=small_data, output_dir=str(out["lora"])
        ),
        "hf": lambda: export_hf_checkpoint.main(tiny_llama, tiny_llama_adapter, str(out["hf"])),
        "meta": lambda: export_state_dict_checkpoint.main(tiny_llama, tiny_llama_adapter, str(out["meta"])),
        "gguf": lambda: export_gguf.main(tiny_llama, tiny_llama_adapter, str(out["gguf"])),
        "diff": lambda: weight_diff.make_diff(tiny_llama, tiny_llama, str(out["diff"])),
        "tuned": lambda: weight_diff.recover(tiny_llama, str(out["diff"]), str(out["tuned"])),
        "batch": lambda: generate.main(
            base_model=tiny_llama, lora_weights="", input_file=str(inputs), output_file=str(out["batch"])
        ),
        "regen": lambda: generate_instruction.generate_instruction_following_data(
            output_dir=str(out["regen"]),
            base_url="http://127.0.0.1:9/v1",
            seed_tasks_path=str(REPO / "data" / "seed_tasks_sample.jsonl"),
        ),
    }
    for name, call in calls.items():
        with pytest.raises(OutputInUse, match=named):
            call()
        assert name != "lora" or not out["lora"].exists()


def test_the_same_process_may_take_its_own_lock_again(tmp_path):
    with output_lock(tmp_path / "out") as path:
        with output_lock(tmp_path / "out"):
            assert path.exists()
        assert path.exists()
    assert not path.exists()
