"""Reading JSON / JSONL record files with one detection rule, and writing result files so that a
crash never leaves half of one; header checks of weight files."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json_atomic(path: str | Path, data, indent: int = 2, ensure_ascii: bool = False) -> None:
    """Write JSON to a temporary file in the same folder, fsync it, then rename it over `path`, so
    readers (and a rerun after `kill -9`) see the old file or the new one, never a torn one."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=indent, ensure_ascii=ensure_ascii, default=str)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _parse_json(text: str, what: str, line: int | None = None):
    """json.loads with every failure turned into a ValueError that says where (`line`: the JSONL line).

    Besides syntax errors, Python's parser raises RecursionError on deeply nested arrays and a bare
    ValueError for an integer longer than `sys.get_int_max_str_digits()` (4,300 digits); neither names
    the file on its own.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if line is not None:
            raise ValueError(f"{what} line {line}: not valid JSON (column {err.colno}: {err.msg})") from err
        raise ValueError(
            f"{what} is not valid JSON (line {err.lineno}, column {err.colno}: {err.msg})"
        ) from err
    except RecursionError as err:
        if line is not None:
            raise ValueError(f"{what} line {line}: JSON nested too deeply") from err
        raise ValueError(f"{what} is nested too deeply to be read as JSON") from err
    except ValueError as err:  # e.g. "Exceeds the limit (4300 digits) for integer string conversion"
        if line is not None:
            raise ValueError(f"{what} line {line}: not valid JSON ({err})") from err
        raise ValueError(f"{what} cannot be read as JSON: {err}") from err


def read_json_values(
    path: str | Path, what: str, allow_empty: bool = False
) -> list[tuple[object, int | None]]:
    """`(value, line)` for each record of a JSON list or a JSONL file, told apart by content, not by the
    file's name; `line` is the JSONL line number (None for a JSON list), for the caller's messages.

    The one rule, for training data, batch input, evaluation outputs and seed tasks alike: a document
    starting with `[` is a JSON list; one that parses whole as an object holding a `train` list gives
    that list; anything else is read as JSONL (one JSON value per non-blank line), so a JSONL file named
    `.json` works and so does a JSON list named `.jsonl`. `what` names the file in errors (e.g.
    `data file 'x.json'`); an empty file is an error unless `allow_empty`.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise ValueError(
            f"{what} is not valid UTF-8 (byte {err.start}, line {line}); save it as UTF-8"
        ) from err
    stripped = text.lstrip()
    if not stripped:
        if allow_empty:
            return []
        raise ValueError(f"{what} is empty: it needs a JSON list of records or JSONL (one record a line)")
    if stripped.startswith("["):
        return [(value, None) for value in _parse_json(text, what)]
    if stripped.startswith("{"):
        try:
            whole = json.loads(text)
        except (ValueError, RecursionError):
            whole = None
        if isinstance(whole, dict) and isinstance(whole.get("train"), list):
            return [(value, None) for value in whole["train"]]
        if isinstance(whole, dict) and len([ln for ln in text.split("\n") if ln.strip()]) > 1:
            raise ValueError(f"{what} holds one JSON object; give a JSON list of records or JSONL")
    return [
        (_parse_json(line, what, line_no), line_no)
        # split on newlines only: str.splitlines also splits on U+2028 and others, which JSON strings may hold
        for line_no, line in enumerate(text.split("\n"), start=1)
        if line.strip()
    ]


def read_json_records(path: str | Path, what: str) -> list:
    """The records of a JSON list or a JSONL file (see `read_json_values` for the detection rule)."""
    return [value for value, _ in read_json_values(path, what)]


def safetensors_problem(path: str | Path) -> str | None:
    """Why a `.safetensors` file cannot be loaded (missing, truncated, garbage), or None when its header
    parses and the file holds every byte that header promises. Reads the header only."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"truncated ({size} bytes)"
            length = int.from_bytes(head, "little")
            if length > size - 8:
                return f"truncated or not a safetensors file (header of {length} bytes, file of {size})"
            header = json.loads(handle.read(length))
        ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "not a safetensors file (unreadable header)"
    needed = 8 + length + max(ends, default=0)
    if size < needed:
        return f"truncated ({size} of {needed} bytes)"
    return None


def torch_file_problem(path: str | Path, check_crc_below: int = 256 << 20) -> str | None:
    """Why a file written by `torch.save` cannot be loaded, or None. `torch.save` writes a zip archive
    whose directory comes last, so a file cut short by a kill has no readable directory; files under
    `check_crc_below` bytes also have every member's CRC checked (catches garbage inside). Nothing is
    unpickled."""
    import zipfile

    path = Path(path)
    if not path.is_file():
        return "missing"
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "not a torch.save file (no data.pkl)"
            if path.stat().st_size < check_crc_below and archive.testzip() is not None:
                return "corrupt (a CRC check failed)"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"truncated or not a torch.save file ({err})"
    return None


def read_journal(path: str | Path, parse, what: str):
    """Yield the entries of an append-only JSONL journal in order; `parse(line) -> (entry, problem)`.

    Each entry is appended as one write ending in a newline, so a kill mid-append damages at most the
    last line: that line is copied to a `.torn-TIME` side file and cut off, so later appends stay whole
    lines. A damaged line anywhere else was damaged on disk or by hand, and every line after it is
    paid-for work: it raises a ValueError naming the line, and nothing is deleted. A whole last entry
    whose newline was not written yet gets it. `what` says what a line holds ("request", "judgment").
    `parse` runs lazily, after the caller applied the entries before, so it may check their order.
    """
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    last = max((index for index, line in enumerate(lines) if line.strip()), default=-1)
    offset = 0
    for index, line in enumerate(lines):
        if line.strip():
            entry, problem = parse(line)
            if problem and index == last:
                _set_aside_torn_tail(path, offset, data[offset:], problem, what)
                return
            if problem:
                raise ValueError(
                    f"{path} line {index + 1}: {problem}. Nothing was changed: the lines after it hold "
                    f"paid-for {what}s. Repair that line, or delete it (losing only that {what}), and rerun."
                )
            yield entry
        offset += len(line) + 1
    if data and not data.endswith(b"\n"):
        with path.open("ab") as handle:
            handle.write(b"\n")


def _set_aside_torn_tail(path: Path, offset: int, tail: bytes, problem: str, what: str) -> None:
    """Copy the torn last line to a new side file, then cut it off the journal."""
    import sys
    import time

    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup, number = path.with_name(f"{path.name}.torn-{stamp}"), 1
    while backup.exists():
        number += 1
        backup = path.with_name(f"{path.name}.torn-{stamp}-{number}")
    with backup.open("wb") as handle:
        handle.write(tail)
        handle.flush()
        os.fsync(handle.fileno())
    with path.open("r+b") as handle:
        handle.truncate(offset)
        os.fsync(handle.fileno())
    print(
        f"warning: {path}: the last line was torn ({problem}), as a kill mid-write leaves it; its "
        f"{len(tail)} bytes were moved to {backup} and that {what} will be done again.",
        file=sys.stderr,
    )
