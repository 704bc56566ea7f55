"""The prepared-data cache (`alpaca.finetune.prepared`) and the streaming reader (`alpaca.finetune.sources`):
reuse, a new key for every changed input, atomic builds that survive `kill -9`, resumes, and record
indices in streamed validation errors."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alpaca.core.prompter import Prompter
from alpaca.finetune.data import load_records
from alpaca.finetune.prepared import cache_key, prepare_examples
from alpaca.finetune.sources import scan_source

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "alpaca_sample.json"


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    from alpaca.modeling import load_tokenizer

    return load_tokenizer(tiny_llama)


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n")
    return str(path)


def prepare(path, tokenizer, root, prompter=None, cutoff_len=128, chat_template=None):
    source = scan_source(str(path), root)
    prompter = prompter or Prompter("alpaca")
    return prepare_examples(source, tokenizer, prompter, cutoff_len, False, chat_template, cache_root=root)


def builds(root: Path) -> list[str]:
    log = root / "builds.log"
    return log.read_text().splitlines() if log.is_file() else []


@pytest.mark.parametrize("kind", ["json", "jsonl", "hf"])
def test_records_hash_is_run_configs_data_sha256(tmp_path, kind):
    """The streamed hash equals the one run_config.json always recorded (resumes of older runs match)."""
    records = json.loads(SAMPLE.read_text())[:40]
    if kind == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(records))
    elif kind == "jsonl":
        path = Path(write_jsonl(tmp_path / "d.jsonl", records))
    else:
        from datasets import Dataset, DatasetDict

        path = tmp_path / "saved"
        DatasetDict({"train": Dataset.from_list(records)}).save_to_disk(str(path))
    loaded = load_records(str(path))
    expected = hashlib.sha256(json.dumps(loaded, sort_keys=True, ensure_ascii=False, default=str).encode())
    source = scan_source(str(path), tmp_path / "cache")
    assert source.kind == kind and source.records == 40
    assert source.records_sha256 == expected.hexdigest()
    assert scan_source(str(path), tmp_path / "cache") == source  # the second time from the cache


def test_streamed_jsonl_errors_name_the_record_and_line(tmp_path):
    records = json.loads(SAMPLE.read_text())[:5]
    bad = dict(records[3], output=None)
    path = write_jsonl(tmp_path / "d.jsonl", records[:3] + [bad] + records[4:])
    with pytest.raises(ValueError, match="record 3: 'output' must be a string, not null"):
        scan_source(path)
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(json.dumps(records[0]).encode() + b'\n{"instruction": "caf\xe9", "output": "c"}\n')
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(byte \d+, line 2\)"):
        scan_source(str(broken))


def test_rerun_reuses_and_every_changed_input_makes_a_new_key(tmp_path, tokenizer, tiny_llama):
    records = json.loads(SAMPLE.read_text())[:30]
    root = tmp_path / "cache"
    data = write_jsonl(tmp_path / "d.jsonl", records)
    first = prepare(data, tokenizer, root)
    assert not first.reused and len(builds(root)) == 1
    again = prepare(data, tokenizer, root)
    assert again.reused and again.key == first.key and len(builds(root)) == 1
    keys = {first.key}

    def check_new(prepared, what):
        assert not prepared.reused and prepared.key not in keys, what
        keys.add(prepared.key)

    # a changed data file (one character of one output)
    changed = [dict(r) for r in records]
    changed[7]["output"] += "!"
    check_new(prepare(write_jsonl(tmp_path / "d.jsonl", changed), tokenizer, root), "data")
    write_jsonl(tmp_path / "d.jsonl", records)
    assert prepare(data, tokenizer, root).reused  # back to the first content
    # a changed tokenizer: one added token
    from alpaca.modeling import load_tokenizer

    other = load_tokenizer(tiny_llama)
    other.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    check_new(prepare(data, other, root), "tokenizer")
    # a changed prompt template, and a chat template
    check_new(prepare(data, tokenizer, root, prompter=Prompter("alpaca_short")), "template")
    check_new(
        prepare(data, tokenizer, root, chat_template=(REPO / "templates" / "chatml.jinja").read_text()),
        "chat",
    )
    # a changed cutoff
    check_new(prepare(data, tokenizer, root, cutoff_len=64), "cutoff")
    assert len(builds(root)) == 6


def test_hf_dataset_folder_prepares_like_the_json_file(tmp_path, tokenizer):
    from datasets import Dataset, DatasetDict

    records = json.loads(SAMPLE.read_text())[:30]
    folder = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_list(records)}).save_to_disk(str(folder))
    from_hf = prepare(folder, tokenizer, tmp_path / "a")
    from_json = prepare(write_jsonl(tmp_path / "d.jsonl", records), tokenizer, tmp_path / "b")
    assert from_hf.dataset["input_ids"] == from_json.dataset["input_ids"]
    assert from_hf.dataset["labels"] == from_json.dataset["labels"]


CHILD = """
import sys
from alpaca.core.prompter import Prompter
from alpaca.finetune.prepared import prepare_examples
from alpaca.finetune.sources import scan_source
from alpaca.modeling import load_tokenizer

data, tokenizer_dir, root = sys.argv[1:]
source = scan_source(data, None)
print("preparing", flush=True)
prepare_examples(source, load_tokenizer(tokenizer_dir), Prompter("alpaca"), 128, False, cache_root=root)
"""


def test_a_build_killed_half_way_is_never_used(tmp_path, tokenizer, tiny_llama):
    records = json.loads(SAMPLE.read_text())
    data = write_jsonl(tmp_path / "big.jsonl", records * 150)  # ~19K records: seconds to tokenize
    root = tmp_path / "cache"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    child = subprocess.Popen([sys.executable, "-c", CHILD, data, tiny_llama, str(root)], env=env, cwd=REPO)
    deadline = time.time() + 120
    try:
        while time.time() < deadline and child.poll() is None:
            written = [p for p in root.glob(".*.tmp-*/**/*.arrow") if p.stat().st_size > 0]
            if written:
                break
            time.sleep(0.05)
        assert child.poll() is None, "the child finished before it could be killed: give it more records"
        assert written, "the child never started writing"
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait()
    source = scan_source(data, None)
    key, _ = cache_key(source, tokenizer, Prompter("alpaca"), None, 128, False)
    assert not (root / key).exists() and list(root.glob(f".{key}.tmp-*"))  # only the torn build
    prepared = prepare_examples(source, tokenizer, Prompter("alpaca"), 128, False, cache_root=root)
    assert not prepared.reused and prepared.summary["records"] == len(records) * 150
    assert not list(root.glob(f".{key}.tmp-*"))  # the torn build was removed
    assert len(builds(root)) == 1
    assert (
        prepared.dataset["input_ids"][: len(records)]
        == prepared.dataset["input_ids"][len(records) : 2 * len(records)]
    )


def test_resume_and_rerun_reuse_the_cache(tiny_llama, small_data, tmp_path, monkeypatch, finetune_fast):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    out = tmp_path / "run"
    finetune_fast(tiny_llama, small_data, out, max_steps=2, save_steps=1, group_by_length=True)
    first = json.loads((out / "run_config.json").read_text())
    assert first["data_report"]["cache_reused"] is False
    key = first["data_cache_id"]
    assert first["data_report"]["cache_id"] == key and len(key) == 32
    finetune_fast(
        tiny_llama,
        small_data,
        out,
        max_steps=3,
        save_steps=1,
        group_by_length=True,
        resume_from_checkpoint=True,
    )
    resumed = json.loads((out / "run_config.json").read_text())
    assert resumed["data_report"]["cache_reused"] is True and resumed["data_cache_id"] == key
    assert len(builds(tmp_path / "xdg" / "alpaca-kit" / "data")) == 1


def test_a_preparing_process_killed_fails_the_build_clearly(tmp_path, tokenizer, monkeypatch):
    """`--num_proc=2`: a worker killed with SIGKILL (as the OOM killer does) fails the build with an error
    naming --num_proc instead of hanging; nothing is cached, and the next build succeeds."""
    import alpaca.finetune.prepared as prepared_module

    records = json.loads(SAMPLE.read_text())
    data = write_jsonl(tmp_path / "data.jsonl", records * 40)  # 4,800 records: 3 ranges, 2 workers
    root, parent = tmp_path / "cache", os.getpid()
    real = prepared_module.tokenize_records

    def dies_in_a_worker(*args, **kwargs):
        if os.getpid() != parent:  # the forked worker inherits this patch
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    monkeypatch.setattr(prepared_module, "tokenize_records", dies_in_a_worker)
    source = scan_source(data, None)
    with pytest.raises(RuntimeError, match=r"--num_proc=2\) died"):
        prepare_examples(source, tokenizer, Prompter("alpaca"), 128, False, num_proc=2, cache_root=root)
    key, _ = cache_key(source, tokenizer, Prompter("alpaca"), None, 128, False)
    assert not (root / key).exists() and not list(root.glob(".*.tmp-*")) and not builds(root)
    monkeypatch.setattr(prepared_module, "tokenize_records", real)
    prepared = prepare_examples(
        source, tokenizer, Prompter("alpaca"), 128, False, num_proc=2, cache_root=root
    )
    assert not prepared.reused and prepared.summary["records"] == len(records) * 40
    assert prepared.dataset["index"] == list(range(len(records) * 40))  # record order across the parts
