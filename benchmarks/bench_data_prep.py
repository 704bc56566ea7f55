"""Data preparation: one record at a time (before issue 21) against batched into the Arrow cache, and the
cached rerun, with each measurement's peak RSS.

    python benchmarks/bench_data_prep.py                          # 52K records: old, new, rerun
    python benchmarks/bench_data_prep.py --records=1000000 --paths=new,rerun --synthetic
    python benchmarks/bench_data_prep.py --num_proc=2 --paths=new
    python benchmarks/bench_data_prep.py --paths=tokenizer-single,tokenizer-batched,old,new,rerun
    python benchmarks/bench_data_prep.py --paths=tokenizer-single,tokenizer-batched,old,new --tokenizer_threads

Every measurement runs in a fresh process (its peak RSS, `ru_maxrss`, is its own; imports and the
tokenizer load are excluded from the time but not from the RSS), one torch thread, on a JSONL file the
benchmark writes into a temporary folder (deleted at the end). The fast tokenizer's own threads (Rust,
one per core, for batch calls) are off (`TOKENIZERS_PARALLELISM=false`, as `make` and the tests set it)
unless `--tokenizer_threads` turns them on for every path (the library's default when the variable is
unset, as for `python finetune.py`):

  old     `load_records` + `data.build_datasets`: every record tokenized on its own (two or three
          tokenizer calls), the examples held as Python lists.
  new     `sources.scan_source` + `prepared.prepare_examples` + `split_prepared`: one streaming pass
          to validate and hash, then batched tokenization into a fresh Arrow cache.
  rerun   the same as `new` a second time: the scan and the examples come from the cache.
  tokenizer-single, tokenizer-batched   the tokenizer alone on the same texts, one call per text vs 256
          records per call: the ratio batching can give at most on this machine at this moment.

Records: `../shared/data/gsm8k_train_alpaca.json` replicated to `--records` (real lengths), or with
`--synthetic` records of random words (instruction 5-30 words, input 0-20, output 10-200) written by the
benchmark. Tokenizer: SmolLM2-135M-Instruct's (`python -m alpaca.default_model`), `cutoff_len` 512, the
prompt masked, as a full fine-tune masks it.
"""

from __future__ import annotations

import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GSM8K = REPO.parent / "shared" / "data" / "gsm8k_train_alpaca.json"
sys.path.insert(0, str(REPO))


def write_records(path: Path, count: int, synthetic: bool) -> None:
    rng = random.Random(0)
    if synthetic or not GSM8K.is_file():
        words = [w.strip(".,") for w in (REPO / "README.md").read_text().split() if w.isalpha()] or ["word"]

        def text(low, high):
            return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

        records = (
            {"instruction": text(5, 30), "input": text(0, 20), "output": text(10, 200)} for _ in range(count)
        )
    else:
        base = json.loads(GSM8K.read_text())
        records = (base[i % len(base)] for i in range(count))
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")


def measure(path: str, data: str, tokenizer_dir: str, cache: str, num_proc: int, cutoff_len: int) -> dict:
    """One measurement, in this process."""
    from alpaca.core.prompter import Prompter
    from alpaca.modeling import load_tokenizer

    tokenizer, prompter = load_tokenizer(tokenizer_dir), Prompter("alpaca")
    if path.startswith("tokenizer"):
        return tokenizer_alone(path, data, tokenizer, prompter)
    started = time.perf_counter()
    if path == "old":
        from alpaca.finetune.data import build_datasets, load_records

        records = load_records(data)
        train, _, report = build_datasets(records, tokenizer, prompter, cutoff_len, False, 0, 42, data)
    else:
        from alpaca.finetune.prepared import prepare_examples, split_prepared
        from alpaca.finetune.sources import scan_source

        root = Path(cache)
        source = scan_source(data, root)
        prepared = prepare_examples(
            source,
            tokenizer,
            prompter,
            cutoff_len,
            False,
            num_proc=num_proc,
            cache_root=root,
            log=lambda *_: None,
        )
        train, _, report = split_prepared(prepared, 0, 42, data)
        assert prepared.reused == (path == "rerun")
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {
        "path": path,
        "records": report.records,
        "seconds": round(seconds, 2),
        "records_per_s": round(report.records / seconds),
        "peak_rss_mib": round(max(peak, children)),
        "trained_tokens": report.trained_tokens,
        "num_proc": num_proc,
    }


def tokenizer_alone(path: str, data: str, tokenizer, prompter) -> dict:
    """The tokenizer's own ratio, the ceiling of batching: the prompt and prompt + output of every record
    tokenized one call each (`tokenizer-single`) or 256 records per call (`tokenizer-batched`)."""
    from alpaca.finetune.data import load_records

    records = load_records(data)
    prompts = [prompter.generate_prompt(r["instruction"], r.get("input") or None) for r in records]
    fulls = [p + r["output"] for p, r in zip(prompts, records)]
    started = time.perf_counter()
    if path == "tokenizer-single":
        for prompt, full in zip(prompts, fulls):
            tokenizer(prompt)
            tokenizer(full)
    else:
        for start in range(0, len(prompts), 256):
            tokenizer(prompts[start : start + 256])
            tokenizer(fulls[start : start + 256])
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"path": path, "records": len(records), "seconds": round(seconds, 2)} | {
        "records_per_s": round(len(records) / seconds),
        "peak_rss_mib": round(peak),
        "trained_tokens": None,
        "num_proc": 1,
    }


def main(
    records: int = 52_000,
    paths: str = "old,new,rerun",
    synthetic: bool = False,
    num_proc: int = 1,
    cutoff_len: int = 512,
    tokenizer: str = "",
    tokenizer_threads: bool = False,
) -> list[dict]:
    """Write the data, run each path in a fresh process, print a table."""
    if not tokenizer:
        from alpaca.default_model import default_model_folder

        tokenizer = str(default_model_folder(install=True))
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-data-prep-") as folder:
        data = Path(folder) / "data.jsonl"
        write_records(data, records, synthetic)
        print(
            f"{records} records, {data.stat().st_size / 2**20:.0f} MiB of JSONL; tokenizer {tokenizer}",
            flush=True,
        )
        for path in paths.split(",") if isinstance(paths, str) else paths:
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
            env["TOKENIZERS_PARALLELISM"] = "true" if tokenizer_threads else "false"
            args = [path, str(data), tokenizer, str(Path(folder) / "cache"), str(num_proc), str(cutoff_len)]
            output = subprocess.run(
                [sys.executable, __file__, "--measure", *args],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            results.append(json.loads(output.strip().splitlines()[-1]))
            print(json.dumps(results[-1]), flush=True)
    cpu = "avx512_bf16" if "avx512_bf16" in Path("/proc/cpuinfo").read_text() else "no avx512_bf16"
    threads = "tokenizer threads on" if tokenizer_threads else "one tokenizer thread"
    print(
        f"\n| path | records | seconds | records/s | peak RSS (MiB) |   "
        f"({os.cpu_count()} cores, {cpu}, {threads}, --num_proc={num_proc})"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['path']} | {r['records']:,} | {r['seconds']} | {r['records_per_s']:,} | {r['peak_rss_mib']:,} |"
        )
    old = next((r for r in results if r["path"] == "old"), None)
    for r in results:
        if old and r["path"] in ("new", "rerun"):
            print(f"{r['path']}: {old['seconds'] / r['seconds']:.2f}x the one-at-a-time path's speed")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        path, data, tokenizer_dir, cache, num_proc, cutoff = sys.argv[2:]
        print(json.dumps(measure(path, data, tokenizer_dir, cache, int(num_proc), int(cutoff))))
    else:
        import fire

        fire.Fire(main, serialize=lambda _: None)
