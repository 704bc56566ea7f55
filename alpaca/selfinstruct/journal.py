"""Crash-safe persistence: an append-only journal, an atomically replaced regen.json, and exports.

Upstream rewrote all of ``regen.json`` after every request, so saving cost grew with the file and a
kill during the write left it truncated. Here each applied request becomes one journal line, appended
and fsynced (cost proportional to the new records); ``regen.json`` is rebuilt from memory now and
then and at the end, through a temporary file and ``os.replace``, so it is always either the old or the
new complete file. A rerun reads the journal, sets a torn last line aside (into a ``.torn-TIME``
file), and continues after the last applied request; a damaged line anywhere else stops it, naming the
line, with nothing deleted. Replies that were paid for but not applied when a run stopped (requests in
flight past its stop) are journaled too, so a rerun uses them instead of buying them again.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from alpaca.core.files import read_journal, write_json_atomic
from alpaca.openai_jobs.journal import JournalWriter

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
        stored_replies: replies paid for but not applied when a run stopped, by request index.
        requests_without_new: how many requests in a row, up to the last applied, kept nothing.
    """

    seed: int | None = None
    records: list[dict] = field(default_factory=list)
    record_requests: list[int] = field(default_factory=list)
    next_request: int = 0
    totals: dict = field(default_factory=dict)
    adopted: bool = False
    stored_replies: dict[int, dict] = field(default_factory=dict)
    requests_without_new: int = 0


def add_counts(totals: dict, counts: dict) -> None:
    """Add numeric counters (nested one level for per-filter rejections) into ``totals``."""
    for key, value in counts.items():
        if isinstance(value, dict):
            add_counts(totals.setdefault(key, {}), value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            totals[key] = totals.get(key, 0) + value


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _are_records(records) -> bool:
    return isinstance(records, list) and all(
        isinstance(record, dict) and isinstance(record.get("instruction"), str) for record in records
    )


def _are_counts(counts) -> bool:
    return isinstance(counts, dict) and all(
        isinstance(value, (int, float, dict)) and not isinstance(value, bool) for value in counts.values()
    )


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
        self._writer = JournalWriter(self.path)

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
            records = json.loads(self.regen_path.read_bytes().decode("utf-8"))
        except (ValueError, RecursionError) as error:
            # Not JSON, not UTF-8, nested too deeply, or an integer over Python's 4,300-digit limit.
            where = f" at line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
            raise ValueError(
                f"{self.regen_path}: not valid JSON ({getattr(error, 'msg', error)}{where}); move it away "
                "to start fresh, or restore it."
            ) from None
        if not isinstance(records, list) or not all(
            isinstance(record, dict) and isinstance(record.get("instruction"), str) for record in records
        ):
            raise ValueError(f"{self.regen_path}: expected a JSON list of records with an 'instruction'.")
        return records

    def _read(self) -> JournalState:
        """Apply every journal line; only a damaged last line (a kill's signature) is set aside.

        A kill mid-append leaves at most the last line torn (each entry is one write ending in a
        newline). A bad line anywhere else was damaged on disk or by hand, and every line after it
        is a paid-for request: the run stops naming it, and nothing is deleted.
        """
        state = JournalState()
        for entry in read_journal(self.path, lambda line: self._parse_entry(state, line), "request"):
            self._apply_entry(state, entry)
        return state

    @staticmethod
    def _parse_entry(state: "JournalState", line: bytes) -> tuple[dict | None, str]:
        """The entry on ``line`` and "" when it is well-formed and in order, else None and the problem."""
        try:
            entry = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as error:
            return None, f"not valid UTF-8 (byte {error.start + 1})"
        except RecursionError:
            return None, "not a journal entry (JSON nested too deeply)"
        except ValueError as error:
            return None, f"not valid JSON ({getattr(error, 'msg', error)})"
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind == "header":
            return entry, "" if entry.get("seed") is None or _is_int(
                entry.get("seed")
            ) else "a header without a seed"
        if kind == "import":
            return entry, "" if _are_records(entry.get("records")) else "an import without a list of records"
        if kind == "request":
            request = entry.get("request")
            if not (
                _is_int(request) and _are_records(entry.get("records")) and _are_counts(entry.get("counts"))
            ):
                return None, "a request entry without a request number, records and counts"
            if request < state.next_request:
                return None, f"request {request} again, after request {state.next_request - 1}"
            return entry, ""
        if kind == "reply":
            if not (
                _is_int(entry.get("request"))
                and isinstance(entry.get("request_sha256"), str)
                and isinstance(entry.get("reply"), dict)
                and _are_counts(entry.get("counts"))
            ):
                return None, "a reply entry without a request number, request hash, reply and counts"
            return entry, ""
        return None, "not a journal entry (no known 'kind')"

    @staticmethod
    def _apply_entry(state: JournalState, entry: dict) -> None:
        kind = entry["kind"]
        if kind == "header":
            state.seed = entry.get("seed")
        elif kind == "import":
            state.records += entry["records"]
            state.record_requests += [-1] * len(entry["records"])
        elif kind == "request":
            state.records += entry["records"]
            state.record_requests += [entry["request"]] * len(entry["records"])
            state.next_request = entry["request"] + 1
            state.requests_without_new = 0 if entry["records"] else state.requests_without_new + 1
            state.stored_replies.pop(entry["request"], None)
            add_counts(state.totals, entry["counts"])
        elif kind == "reply":
            # A reply paid for but not applied (the run stopped first): counted now, used by a rerun.
            state.stored_replies[entry["request"]] = entry
            add_counts(state.totals, entry["counts"])

    def start(self, seed: int, imported: list[dict]) -> None:
        """Open the journal for appending; a new one gets a header (and any adopted regen.json records)."""
        is_new = self._writer.open({"kind": "header", "version": JOURNAL_VERSION, "seed": seed})
        if is_new and imported:
            self._writer.append({"kind": "import", "records": imported})

    def append_request(self, request_index: int, records: list[dict], counts: dict) -> None:
        """Durably record one applied request: its kept records and its counters."""
        self._writer.append(
            {"kind": "request", "request": request_index, "records": records, "counts": counts}
        )

    def append_reply(self, request_index: int, request_sha256: str, reply: dict, counts: dict) -> None:
        """Durably keep a reply that was paid for but not applied, so a rerun uses it instead of buying it.

        Args:
            request_sha256: a hash of the endpoint, model and prompt; a rerun whose request differs sends
                it anew.
            reply: the reply's fields (text, finish reason, usage...).
            counts: its tokens and retries, counted in the totals from now on.
        """
        self._writer.append(
            {
                "kind": "reply",
                "request": request_index,
                "request_sha256": request_sha256,
                "reply": reply,
                "counts": counts,
            }
        )

    def close(self) -> None:
        self._writer.close()

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
