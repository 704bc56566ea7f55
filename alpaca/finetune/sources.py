"""Training records read in bounded memory: checked one by one, hashed, counted, and read again by range.

A JSONL file is read line by line (never whole), a Hugging Face dataset is Arrow and memory-mapped, so
neither needs its records in a Python list; a JSON list (`[...]`) is parsed whole, as JSON has no
streaming reader in the standard library: convert files larger than memory to JSONL. The detection rule
is `alpaca.core.files.read_json_values`'s (content, not file name).

`scan_source` makes one pass: every record is validated (errors name the record's index), the records'
hash (the same `data_sha256` as `run_config.json` has always recorded), the number of records and of
conversations, and the byte offset of every `SHARD_RECORDS`-th JSONL record, from which
`iter_records` reads any range again. The scan is kept in the data cache, keyed by the file's bytes, so
a rerun with the same file does not read it twice.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from alpaca.core.chat import conversation_messages, is_conversation
from alpaca.core.files import _parse_json, read_json_records, write_json_atomic

REQUIRED_FIELDS = ("instruction", "output")
SHARD_RECORDS = 2048  # records between remembered JSONL offsets: the unit of parallel preparation
SCAN_VERSION = 1


def validate_record(record, index: int, source: str) -> None:
    """Raise a ValueError naming the record: missing, null or non-string fields.

    `instruction` and `output` must be strings (`output` may be empty); `input` may be absent or null.
    A null `output` is an error rather than an empty answer: training on it would teach the model to
    answer nothing. A conversation is checked turn by turn (`alpaca.core.chat.conversation_messages`).
    """
    if not isinstance(record, dict):
        raise ValueError(f"{source!r} record {index} is a {type(record).__name__}, not an object")
    if is_conversation(record):
        conversation_messages(record, index, source)
        return
    for key in REQUIRED_FIELDS:
        if key not in record:
            raise ValueError(f"{source!r} record {index} has no {key!r} field (fields: {sorted(record)})")
    for key in ("instruction", "input", "output"):
        value = record.get(key)
        if key == "input" and value is None:
            continue
        if key in record and not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise ValueError(f"{source!r} record {index}: {key!r} must be a string, not {kind}")
    if not record["instruction"].strip():
        raise ValueError(f"{source!r} record {index} has an empty 'instruction'")


def open_hf_dataset(data_path: str):
    """The train split of a hub dataset name or a local dataset folder (data files or `save_to_disk`),
    as a memory-mapped `datasets.Dataset`."""
    from datasets import load_dataset, load_from_disk

    path = Path(data_path).expanduser()
    try:
        saved_to_disk = any((path / name).is_file() for name in ("dataset_dict.json", "dataset_info.json"))
        if path.is_dir() and saved_to_disk:
            dataset = load_from_disk(str(path))
            return dataset["train"] if hasattr(dataset, "keys") else dataset
        return load_dataset(data_path, split="train")
    except Exception as err:  # the hub raises many types; the user needs the name and the cause
        raise ValueError(
            f"--data_path={data_path!r} is neither a local .json/.jsonl file nor a loadable Hugging Face "
            f"dataset ({type(err).__name__}: {err})"
        ) from err


def source_kind(data_path: str) -> str:
    """`jsonl` (streamed), `json` (a JSON list or `{"train": [...]}`, parsed whole) or `hf`."""
    path = Path(data_path).expanduser()
    if path.suffix in (".json", ".jsonl") and not path.is_dir():
        if not path.is_file():
            raise ValueError(f"--data_path={data_path!r}: no such file")
        with open(path, "rb") as handle:
            for raw in handle:
                line = raw.decode("utf-8-sig", errors="replace").strip()
                if not line:
                    continue
                if line.startswith("["):
                    return "json"
                if not line.startswith("{"):
                    return "jsonl"  # read_json_values reads it as JSONL too (and names the bad line)
                try:
                    first = json.loads(line)
                except (ValueError, RecursionError):
                    return "json"  # a pretty-printed object: read_json_values decides
                whole_object = isinstance(first, dict) and isinstance(first.get("train"), list)
                return "json" if whole_object else "jsonl"
        return "json"  # empty: read_json_values says so
    if data_path.startswith((".", "/", "~")) and not path.exists():
        raise ValueError(f"--data_path={data_path!r}: no such file or folder")
    return "hf"


def iter_jsonl(path: Path, what: str, offset: int = 0, line_no: int = 1):
    """`(record, line number, byte offset of its line)` for each non-blank line from `offset`."""
    with open(path, "rb") as handle:
        handle.seek(offset)
        for raw in handle:
            start, offset = offset, offset + len(raw)
            try:
                text = raw.decode("utf-8-sig" if start == 0 else "utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(
                    f"{what} is not valid UTF-8 (byte {start + err.start}, line {line_no}); save it as UTF-8"
                ) from err
            if text.strip():
                yield _parse_json(text, what, line_no), line_no, start
            line_no += 1


@dataclass
class DataSource:
    """What `scan_source` learned about the data; enough to read any range of records again."""

    data_path: str
    kind: str
    content_sha256: str  # of the file's bytes, or of the dataset's fingerprint
    records_sha256: str = ""  # of the records themselves: run_config.json's data_sha256
    records: int = 0
    conversations: int = 0
    # (first record index, byte offset, line number) every SHARD_RECORDS records (JSONL only)
    offsets: list = field(default_factory=list)

    @property
    def has_conversations(self) -> bool:
        return self.conversations > 0

    def ranges(self, size: int = SHARD_RECORDS) -> list[tuple[int, int]]:
        return [(start, min(start + size, self.records)) for start in range(0, self.records, size)]


def content_sha256(data_path: str, kind: str) -> str:
    """A fast key of the data's content: the file's bytes, or a dataset's fingerprint."""
    digest = hashlib.sha256(f"{kind}\n".encode())
    if kind == "hf":
        digest.update(open_hf_dataset(data_path)._fingerprint.encode())
        return digest.hexdigest()
    with open(Path(data_path).expanduser(), "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def iter_records(source: DataSource, start: int = 0, stop: int | None = None):
    """`(index, record)` for the records `start` to `stop` (all by default), read from the source."""
    stop = source.records if stop is None else stop
    what = f"data file {str(Path(source.data_path).expanduser())!r}"
    if source.kind == "jsonl":
        first, offset, line_no = 0, 0, 1
        for entry in source.offsets:
            if entry[0] <= start:
                first, offset, line_no = entry
        index = first
        for record, _, _ in iter_jsonl(Path(source.data_path).expanduser(), what, offset, line_no):
            if index >= stop:
                return
            if index >= start:
                yield index, record
            index += 1
    elif source.kind == "json":
        records = read_json_records(Path(source.data_path).expanduser(), what)
        yield from ((index, records[index]) for index in range(start, min(stop, len(records))))
    else:
        dataset = open_hf_dataset(source.data_path)
        yield from enumerate(dataset.select(range(start, min(stop, len(dataset)))), start=start)


def scan_source(data_path: str, cache_root: Path | None = None) -> DataSource:
    """Validate and hash every record once, in bounded memory (see the module's docstring); the result
    is kept under `cache_root/sources/` keyed by the content, so a rerun skips the pass."""
    kind = source_kind(data_path)
    source = DataSource(data_path, kind, content_sha256(data_path, kind))
    saved = cache_root / "sources" / f"{source.content_sha256}-v{SCAN_VERSION}.json" if cache_root else None
    if saved is not None and saved.is_file():
        try:
            return DataSource(**dict(json.loads(saved.read_text(encoding="utf-8")), data_path=data_path))
        except (ValueError, TypeError):
            pass  # unreadable: scan again and rewrite it
    digest = hashlib.sha256(b"[")
    what = f"data file {str(Path(data_path).expanduser())!r}"
    if kind == "jsonl":
        rows = (
            (record, (line_no, offset))
            for record, line_no, offset in iter_jsonl(Path(data_path).expanduser(), what)
        )
    elif kind == "json":
        rows = ((record, None) for record in read_json_records(Path(data_path).expanduser(), what))
    else:
        rows = ((record, None) for record in open_hf_dataset(data_path))
    for index, (record, where) in enumerate(rows):
        validate_record(record, index, data_path)
        if index % SHARD_RECORDS == 0 and where is not None:
            source.offsets.append([index, where[1], where[0]])
        # the same bytes as json.dumps(records, ...) of the whole list (checkpoints.run_identity's hash)
        digest.update((", " if index else "").encode())
        digest.update(json.dumps(record, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
        source.records += 1
        source.conversations += is_conversation(record)
    if not source.records:
        raise ValueError(f"{data_path!r} holds no records")
    digest.update(b"]")
    source.records_sha256 = digest.hexdigest()
    if saved is not None:
        write_json_atomic(saved, {k: v for k, v in asdict(source).items() if k != "data_path"})
    return source
