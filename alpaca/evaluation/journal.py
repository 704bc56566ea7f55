"""The judging journal: one appended, fsynced line per judged request, so a killed run resumes.

Each judgment is keyed by a hash of what was asked (endpoint, judge model, max_tokens, temperature
and the full prompt), so a rerun in the same folder sends only the requests whose judgment is not in
the journal yet, whatever changed in between (new pairs, another judge model). Only a kill mid-append
can damage a line, and only the last one: that line is set aside into a ``.torn-TIME`` file and its
request is judged again. A damaged line anywhere else stops the run, naming the line; nothing is
deleted, since every line after it is a paid-for judgment.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from alpaca.core.files import read_journal
from alpaca.openai_jobs.journal import JournalWriter, request_hash

JOURNAL_NAME = "judge_journal.jsonl"
JOURNAL_VERSION = 1
_JUDGMENT_FIELDS = {"request_sha256": str, "text": str, "prompt_tokens": int, "completion_tokens": int}


def judgment_hash(api: str, judge_model: str, max_tokens: int, temperature: float, prompt: str) -> str:
    """What a stored judgment answered; a different value for any of these is a different request."""
    return request_hash([api, judge_model, max_tokens, temperature, prompt], ensure_ascii=False)


def _problem(line: bytes) -> tuple[dict | None, str]:
    """The entry on `line` and "", or None and what is wrong with it."""
    try:
        entry = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as error:
        return None, f"not valid UTF-8 (byte {error.start + 1})"
    except (ValueError, RecursionError) as error:
        return None, f"not valid JSON ({getattr(error, 'msg', error)})"
    if not isinstance(entry, dict) or entry.get("kind") not in ("header", "judgment"):
        return None, "not a journal entry (no known 'kind')"
    if entry["kind"] == "judgment":
        for name, kind in _JUDGMENT_FIELDS.items():
            if not isinstance(entry.get(name), kind) or isinstance(entry.get(name), bool):
                return None, f"a judgment without a valid {name!r}"
    return entry, ""


class JudgeJournal:
    """The append-only journal of one output folder.

    Args:
        output_dir: the run's folder (holds the journal, annotations.json and results.json).
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / JOURNAL_NAME
        self._writer = JournalWriter(self.path, ensure_ascii=False)

    def load(self) -> dict[str, dict]:
        """Every judgment in the journal, by request hash (empty when there is no journal)."""
        if not self.path.exists():
            return {}
        judgments = {}
        for entry in read_journal(self.path, _problem, "judgment"):
            if entry["kind"] == "judgment":
                judgments[entry["request_sha256"]] = entry
        return judgments

    def open(self) -> None:
        """Open for appending; a new (or emptied) journal starts with a header line."""
        self._writer.open({"kind": "header", "version": JOURNAL_VERSION})

    def append(self, entry: dict) -> None:
        self._writer.append(entry)

    def close(self) -> None:
        self._writer.close()
