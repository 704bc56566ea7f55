"""Tokenized training data in an Arrow cache: prepared once, then shared by reruns, resumes, every
`torchrun` rank and `evaluate.py loss`.

Where: `$XDG_CACHE_HOME/alpaca-kit/data/` (default `~/.cache/alpaca-kit/data/`), beside the converted
GGUF models, so that runs with different output folders and `evaluate.py` share it. Clearing it is
always safe when no run is preparing data: `rm -rf ~/.cache/alpaca-kit/data`.

The key is a sha256 over everything that determines the examples: the records (the file's bytes or the
dataset's fingerprint), the tokenizer (its full serialized state, added tokens included), the prompt
template and chat template text, `cutoff_len`, `train_on_inputs`, and the code version (the source of
the modules that tokenize, and the transformers / tokenizers versions). A change to any of them is a
new key, so a stale cache is never read; `run_config.json` records the key (`data_cache_id`, and `data_report.cache_id`; a name ending in
`key` would be masked as a secret there).

Written atomically: a build goes into `.KEY.tmp-PID-RANDOM/` and is renamed to `KEY/` once complete
(its `prep.json` written last); a reader only opens `KEY/prep.json`. A build killed half-way (`kill -9`)
leaves a temporary folder that is never read and is removed by the next build of that key.

Shared: the first process to take the key's file lock (`.KEY.lock`) prepares and the others wait for it,
then all memory-map the same files. Under `torchrun` the other ranks give rank 0 a head start, so rank
0 prepares. `builds.log` has one line per build (key, rank, records, seconds).

Layout of a row (one per record, in record order): `index`, `input_ids`, `labels`, `length`, `trained`
(unmasked labels), `status` (0 ok, 1 truncated, 2 skipped: its ids are not kept), `turns`,
`conversation`. Training reads `input_ids`, `labels` and `length` from the memory-mapped table.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from alpaca.core.chat import adds_bos, is_conversation
from alpaca.core.files import write_json_atomic
from alpaca.finetune.batched import STATUS_CODES, tokenize_records
from alpaca.finetune.conversations import IGNORE_INDEX
from alpaca.finetune.data import DataReport, percentiles
from alpaca.finetune.sources import DataSource, iter_records

CACHE_FORMAT = 2  # 2: parts written by write_part (was Dataset.from_generator)
PACKAGE = Path(__file__).resolve().parent.parent
# the modules whose code decides the examples: editing one is a new code version, so a new key
CODE_FILES = (
    "finetune/batched.py",
    "finetune/conversations.py",
    "finetune/sources.py",
    "finetune/prepared.py",
    "core/chat.py",
    "core/prompter.py",
)
TRAINING_COLUMNS = ["input_ids", "labels", "length"]
BATCH_RECORDS = 1024  # records per tokenizer call and per Arrow record batch


def data_cache_root() -> Path:
    """`$XDG_CACHE_HOME/alpaca-kit/data`, or `~/.cache/alpaca-kit/data`."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "alpaca-kit" / "data"


def code_version() -> str:
    """A hash of the tokenizing code and the libraries it calls."""
    import tokenizers
    import transformers

    digest = hashlib.sha256(f"{CACHE_FORMAT} {transformers.__version__} {tokenizers.__version__}".encode())
    for name in CODE_FILES:
        digest.update((PACKAGE / name).read_bytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of everything that decides a tokenizer's ids: its serialized state (vocabulary, merges,
    normalizer, pre-tokenizer, post-processor, added tokens) and its special tokens."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:  # a slow (Python) tokenizer: its vocabulary file and vocabulary
        vocab_file = getattr(tokenizer, "vocab_file", None)
        if vocab_file and Path(vocab_file).is_file():
            digest.update(Path(vocab_file).read_bytes())
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode("utf-8"))
    special = {
        "special_tokens": tokenizer.all_special_tokens,
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "adds_bos": adds_bos(tokenizer),
    }
    digest.update(json.dumps(special, sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()


def cache_key(source: DataSource, tokenizer, prompter, chat_template, cutoff_len, train_on_inputs):
    """`(key, parts)`: the cache key and what it hashes (saved in `prep.json` for a reader to check)."""
    parts = {
        "data_content_sha256": source.content_sha256,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "prompt_template_sha256": hashlib.sha256(
            json.dumps(prompter.template, sort_keys=True).encode("utf-8")
        ).hexdigest(),
        "chat_template_sha256": hashlib.sha256((chat_template or "").encode("utf-8")).hexdigest(),
        "cutoff_len": int(cutoff_len),
        "train_on_inputs": bool(train_on_inputs),
        "code_version": code_version(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32], parts


def features():
    from datasets import Features, Sequence, Value

    return Features(
        {
            "index": Value("int64"),
            "input_ids": Sequence(Value("int32")),
            "labels": Sequence(Value("int32")),
            "length": Value("int32"),
            "trained": Value("int32"),
            "status": Value("int8"),
            "turns": Value("int32"),
            "conversation": Value("bool"),
        }
    )


@dataclass
class PreparationJob:
    """What a preparing process needs (pickled to each worker when `num_proc` > 1)."""

    source: DataSource
    tokenizer: object
    prompter: object
    chat_template: str | None
    cutoff_len: int
    train_on_inputs: bool

    def table(self, batch: list[tuple[int, dict]]):
        """The rows of `batch`'s records as one Arrow table (columns built in C, not row by row)."""
        import pyarrow as pa

        examples = tokenize_records(
            batch,
            self.tokenizer,
            self.prompter,
            self.cutoff_len,
            self.train_on_inputs,
            self.source.data_path,
            self.chat_template,
        )
        columns = {name: [] for name in features()}
        for (index, record), example in zip(batch, examples):
            skipped = example["status"] == "skipped"
            ids = [] if skipped else example["input_ids"]
            labels = [] if skipped else example["labels"]
            columns["index"].append(index)
            columns["input_ids"].append(ids)
            columns["labels"].append(labels)
            columns["length"].append(len(ids))
            columns["trained"].append(len(labels) - labels.count(IGNORE_INDEX))
            columns["status"].append(STATUS_CODES[example["status"]])
            columns["turns"].append(example.get("turns", 0))
            columns["conversation"].append(is_conversation(record))
        return pa.Table.from_pydict(columns, schema=features().arrow_schema)


def write_part(job: PreparationJob, ranges: list[tuple[int, int]], path: str) -> int:
    """Tokenize the records of the contiguous `ranges` into one Arrow file, in record order, a batch of
    `BATCH_RECORDS` at a time (memory bounded by a batch); returns the number of rows."""
    from datasets.arrow_writer import ArrowWriter

    with ArrowWriter(features=features(), path=path) as writer:
        batch = []
        for item in iter_records(job.source, ranges[0][0], ranges[-1][1]):
            batch.append(item)
            if len(batch) == BATCH_RECORDS:
                writer.write_table(job.table(batch))
                batch = []
        if batch:
            writer.write_table(job.table(batch))
        rows, _ = writer.finalize()
    return rows


def split_ranges(ranges: list, parts: int) -> list[list]:
    """`ranges` cut into at most `parts` contiguous groups of near-equal size (record order kept)."""
    parts = max(1, min(parts, len(ranges)))
    size, extra = divmod(len(ranges), parts)
    groups, start = [], 0
    for i in range(parts):
        stop = start + size + (i < extra)
        groups.append(ranges[start:stop])
        start = stop
    return groups


def write_parts(job: PreparationJob, folder: Path, num_proc: int) -> list[str]:
    """Every record into `folder/part-NNNNN.arrow` files, `num_proc` processes writing one part each;
    returns the file names in record order."""
    groups = split_ranges(job.source.ranges(), num_proc)
    names = [f"part-{i:05d}.arrow" for i in range(len(groups))]
    arguments = [(job, group, str(folder / name)) for group, name in zip(groups, names)]
    if len(groups) == 1:
        write_part(*arguments[0])
        return names
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # fork where there is one (Linux: no re-import in each worker); each task's job, tokenizer included,
    # is pickled to its worker. A worker that dies (killed, out of memory) fails the build with
    # BrokenProcessPool instead of leaving it waiting for a part that never comes.
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    from concurrent.futures.process import BrokenProcessPool

    try:
        with ProcessPoolExecutor(len(groups), mp_context=context) as pool:
            for future in [pool.submit(write_part, *task) for task in arguments]:
                future.result()
    except BrokenProcessPool as err:
        raise RuntimeError(
            f"a data preparation process (--num_proc={num_proc}) died before it finished (killed, or out of "
            "memory); nothing was cached: run again, with a lower --num_proc if memory is short"
        ) from err
    return names


@contextmanager
def key_lock(root: Path, key: str):
    """An exclusive lock on one cache key, across processes (the ranks, concurrent runs)."""
    import fcntl

    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{key}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def lock_is_held(root: Path, key: str) -> bool:
    import fcntl

    with open(root / f".{key}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def give_rank0_a_head_start(root: Path, key: str, seconds: float = 60.0) -> None:
    """Under torchrun, local ranks other than 0 wait until local rank 0 holds the key's lock or the cache
    is ready (at most `seconds`), so that rank 0 of each machine is the one that prepares (the lock and
    the cache are per machine unless the cache folder is shared)."""
    if int(os.environ.get("LOCAL_RANK", "0") or 0) == 0:
        return
    root.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (root / key / "prep.json").is_file():
        if lock_is_held(root, key):
            return
        time.sleep(0.05)


def build(root: Path, key: str, parts: dict, job: PreparationJob, num_proc: int, log=print) -> None:
    """Tokenize every record into `root/KEY/` through a temporary folder renamed when complete."""
    for stale in root.glob(f".{key}.tmp-*"):  # a build killed half-way (we hold the key's lock)
        shutil.rmtree(stale, ignore_errors=True)
    temporary = root / f".{key}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    temporary.mkdir(parents=True)
    started = time.time()
    try:
        files = write_parts(job, temporary, num_proc)
        dataset = open_parts(temporary, files)
        summary = dict(summarize(dataset), key=key, parts=parts, files=files)
        summary.update(seconds=round(time.time() - started, 2), built_at=time.strftime("%Y-%m-%d %H:%M:%S"))
        del dataset
        write_json_atomic(temporary / "prep.json", summary)
        os.rename(temporary, root / key)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    line = f"{summary['built_at']} {key} rank={os.environ.get('RANK', '0')} pid={os.getpid()} "
    line += f"records={summary['records']} seconds={summary['seconds']} num_proc={num_proc}\n"
    with open(root / "builds.log", "a", encoding="utf-8") as handle:
        handle.write(line)
    log(f"data prepared in {summary['seconds']:.1f} s ({summary['records']} records) into {root / key}")


def summarize(dataset) -> dict:
    """Counts over the whole table (kept in `prep.json`, so a rerun does not recompute them)."""
    import numpy as np

    table = dataset.data
    status = table.column("status").to_numpy()
    kept = status != STATUS_CODES["skipped"]
    lengths = table.column("length").to_numpy()[kept]
    skipped_indices = table.column("index").to_numpy()[~kept][:50]
    return {
        "records": len(status),
        "kept": int(kept.sum()),
        "skipped": int((~kept).sum()),
        "truncated": int((status == STATUS_CODES["truncated"]).sum()),
        "conversations": int(np.asarray(table.column("conversation").to_numpy(zero_copy_only=False)).sum()),
        "turns": int(table.column("turns").to_numpy().sum()),
        "skipped_indices": [int(i) for i in skipped_indices],
        "length_percentiles": percentiles(np.sort(lengths).tolist()) if kept.any() else {},
    }


@dataclass
class PreparedData:
    """The memory-mapped table of every record's example, its summary, and where it came from."""

    dataset: object
    summary: dict
    key: str
    folder: Path
    reused: bool


def open_prepared(folder: Path):
    """The table (memory-mapped) and summary of a finished cache folder."""
    summary = json.loads((folder / "prep.json").read_text(encoding="utf-8"))
    return open_parts(folder, summary["files"]), summary


def open_parts(folder: Path, files: list[str]):
    """The Arrow files, memory-mapped, as one `datasets.Dataset`."""
    from datasets import Dataset, concatenate_datasets

    parts = [Dataset.from_file(str(folder / name)) for name in files]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def prepare_examples(
    source: DataSource,
    tokenizer,
    prompter,
    cutoff_len: int,
    train_on_inputs: bool,
    chat_template: str | None = None,
    num_proc: int = 1,
    cache_root: Path | None = None,
    log=print,
) -> PreparedData:
    """Every record's example, from the cache when it holds this key, else prepared into it."""
    if num_proc < 1:
        raise ValueError(f"--num_proc must be at least 1, got {num_proc}")
    root = Path(cache_root) if cache_root else data_cache_root()
    key, parts = cache_key(source, tokenizer, prompter, chat_template, cutoff_len, train_on_inputs)
    folder, reused = root / key, True
    if not (folder / "prep.json").is_file():
        give_rank0_a_head_start(root, key)
        with key_lock(root, key):
            if not (folder / "prep.json").is_file():
                job = PreparationJob(source, tokenizer, prompter, chat_template, cutoff_len, train_on_inputs)
                build(root, key, parts, job, num_proc, log)
                reused = False
    dataset, summary = open_prepared(folder)
    if reused:
        log(f"data: reusing the prepared examples in {folder} ({summary['records']} records)")
    return PreparedData(dataset, summary, key, folder, reused)


def split_prepared(prepared: PreparedData, val_set_size: int, seed: int, source: str = ""):
    """`(train, val, report)` as `data.build_datasets` splits them (the same seeded shuffle), as views of
    the memory-mapped table with the columns training reads (`input_ids`, `labels`, `length`)."""
    import numpy as np

    summary, dataset = prepared.summary, prepared.dataset
    status = dataset.data.column("status").to_numpy()
    kept = np.flatnonzero(status != STATUS_CODES["skipped"])
    if not len(kept):
        raise ValueError(
            f"{source!r}: all {summary['records']} records were skipped because their prompt alone is at "
            f"least --cutoff_len={prepared.summary['parts']['cutoff_len']} tokens; raise --cutoff_len"
        )
    if val_set_size >= len(kept):
        raise ValueError(
            f"--val_set_size={val_set_size} leaves no training data: only {len(kept)} usable examples; "
            "lower it (0 disables validation)"
        )
    train_rows, val_rows = kept, kept[:0]
    if val_set_size > 0:
        order = list(range(len(kept)))
        random.Random(seed).shuffle(order)
        val_rows, train_rows = kept[order[:val_set_size]], kept[order[val_set_size:]]
    columns = dataset.select_columns(TRAINING_COLUMNS)
    train = columns.select(train_rows, keep_in_memory=True)
    val = columns.select(val_rows, keep_in_memory=True) if len(val_rows) else []
    trained = dataset.data.column("trained").to_numpy()
    report = DataReport(
        source=source,
        **{k: summary[k] for k in ("records", "kept", "skipped", "truncated", "conversations", "turns")},
        skipped_indices=summary["skipped_indices"],
        train_examples=len(train_rows),
        val_examples=len(val_rows),
        trained_tokens=int(trained[train_rows].sum()),
        length_percentiles=summary["length_percentiles"],
        cache_id=prepared.key,
        cache_dir=str(prepared.folder),
        cache_reused=prepared.reused,
    )
    return train, val, report
