"""Crash-safe persistence: an append-only journal, an atomically replaced regen.json, and exports.

Upstream rewrote all of ``regen.json`` after every request, so saving cost grew with the file and a
kill during the write left it truncated. Here each applied request becomes one journal line, appended
and fsynced (cost proportional to the new records); ``regen.json`` is rebuilt from memory now and
then and at the end, through a temporary file and ``os.replace``, so it is always either the old or the
new complete file. A rerun reads the journal, drops a torn last line, and continues after the last
applied request.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from alpaca.files import write_json_atomic

JOURNAL_NAME = "regen_journal.jsonl"
REGEN_NAME = "regen.json"
ALPACA_EXPORT_NAME = "alpaca_data.json"
JOURNAL_VERSION = 1


@dataclass
class JournalState:
    """What earlier runs left behind.

    Attributes:
        seed: the run seed recorded by the first run (None for a new journal).
        records: kept records in the order they were accepted.
        record_requests: for each record, the index of the request that produced it (-1: imported).
        next_request: the index of the first request not yet applied.
        totals: summed per-request counters (requests, failures, tokens, rejections...).
        adopted: the records come from a regen.json without a journal (an upstream run's output).
    """

    seed: int | None = None
    records: list[dict] = field(default_factory=list)
    record_requests: list[int] = field(default_factory=list)
    next_request: int = 0
    totals: dict = field(default_factory=dict)
    adopted: bool = False


def add_counts(totals: dict, counts: dict) -> None:
    """Add numeric counters (nested one level for per-filter rejections) into ``totals``."""
    for key, value in counts.items():
        if isinstance(value, dict):
            add_counts(totals.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            totals[key] = totals.get(key, 0) + value


def write_json_atomically(path: Path, data) -> None:
    """Upstream's jdump layout (indent 4, ASCII escapes), written atomically."""
    write_json_atomic(path, data, indent=4, ensure_ascii=True)


class Journal:
    """The append-only journal of one output folder.

    Args:
        output_dir: the run's output folder (holds the journal, regen.json and the exports).
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / JOURNAL_NAME
        self.regen_path = self.output_dir / REGEN_NAME
        self._handle = None

    def load(self) -> JournalState:
        """Read the journal; without one, adopt an existing regen.json (upstream's resume file)."""
        if self.path.exists():
            return self._read()
        state = JournalState()
        if self.regen_path.exists():
            state.records = self._read_regen()
            state.record_requests = [-1] * len(state.records)
            state.adopted = True
        return state

    def _read_regen(self) -> list[dict]:
        try:
            records = json.loads(self.regen_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{self.regen_path}: not valid JSON ({error.msg} at line {error.lineno}); move it away to "
                "start fresh, or restore it."
            ) from None
        if not isinstance(records, list) or not all(
            isinstance(record, dict) and isinstance(record.get("instruction"), str) for record in records
        ):
            raise ValueError(f"{self.regen_path}: expected a JSON list of records with an 'instruction'.")
        return records

    def _read(self) -> JournalState:
        state = JournalState()
        data = self.path.read_bytes()
        good_end = 0
        for line in data.splitlines(keepends=True):
            # A line without its newline, or that does not parse, was torn by a kill mid-write.
            if not line.endswith(b"\n"):
                break
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break
            self._apply_entry(state, entry)
            good_end += len(line)
        if good_end < len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(good_end)
        return state

    @staticmethod
    def _apply_entry(state: JournalState, entry: dict) -> None:
        kind = entry.get("kind")
        if kind == "header":
            state.seed = entry.get("seed")
        elif kind == "import":
            state.records += entry["records"]
            state.record_requests += [-1] * len(entry["records"])
        elif kind == "request":
            state.records += entry["records"]
            state.record_requests += [entry["request"]] * len(entry["records"])
            state.next_request = entry["request"] + 1
            add_counts(state.totals, entry["counts"])

    def start(self, seed: int, imported: list[dict]) -> None:
        """Open the journal for appending; a new one gets a header (and any adopted regen.json records)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        is_new = not self.path.exists()
        self._handle = self.path.open("ab")
        if is_new:
            self._append({"kind": "header", "version": JOURNAL_VERSION, "seed": seed})
            if imported:
                self._append({"kind": "import", "records": imported})

    def append_request(self, request_index: int, records: list[dict], counts: dict) -> None:
        """Durably record one applied request: its kept records and its counters."""
        self._append({"kind": "request", "request": request_index, "records": records, "counts": counts})

    def _append(self, entry: dict) -> None:
        # One write of one complete line, then fsync: a kill leaves at most a torn last line.
        self._handle.write(json.dumps(entry).encode("utf-8") + b"\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write_regen(self, records: list[dict]) -> None:
        """Replace regen.json with all records (upstream's output format)."""
        write_json_atomically(self.regen_path, records)

    def write_alpaca_export(self, records: list[dict]) -> Path:
        """Write alpaca_data.json: the records with ``instruction``, ``input`` and ``output`` only."""
        path = self.output_dir / ALPACA_EXPORT_NAME
        write_json_atomically(
            path,
            [{key: record.get(key, "") for key in ("instruction", "input", "output")} for record in records],
        )
        return path
