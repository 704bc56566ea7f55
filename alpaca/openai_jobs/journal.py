"""What every job's journal shares: one JSON line per entry, appended and fsynced, and the hash that
says which request a stored reply answered.

Self-instruct (``regen_journal.jsonl``) and pairwise judging (``judge_journal.jsonl``) each write their
own entries through a ``JournalWriter`` and read them back with ``alpaca.core.files.read_journal``,
which sets a torn last line (a kill's signature) aside.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path


def request_hash(fields: Sequence, ensure_ascii: bool = True) -> str:
    """A sha256 of what was asked (the endpoint, the model, ... and the prompt, as each job lists them):
    a stored reply answers a request only when their hashes match.

    Each job keeps its own fields and JSON form (``ensure_ascii``), so the journals it wrote before
    still resume.
    """
    key = json.dumps(list(fields), ensure_ascii=ensure_ascii)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class JournalWriter:
    """Appends entries to one journal file, each as one line written at once and fsynced.

    Args:
        path: the journal file.
        ensure_ascii: write non-ASCII text as JSON escapes (self-instruct's journal) or as UTF-8.
    """

    def __init__(self, path: str | os.PathLike, ensure_ascii: bool = True):
        self.path = Path(path)
        self.ensure_ascii = ensure_ascii
        self._handle = None

    def open(self, header: dict) -> bool:
        """Open for appending; a new journal starts with ``header``. Returns whether it was new.

        A journal that is empty (a kill tore its very first line, which was then set aside) is new too:
        it still needs its header.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        is_new = not self.path.exists() or self.path.stat().st_size == 0
        self._handle = self.path.open("ab")
        if is_new:
            self.append(header)
        return is_new

    def append(self, entry: dict) -> None:
        # One write of one complete line, then fsync: a kill leaves at most a torn last line.
        line = json.dumps(entry, ensure_ascii=self.ensure_ascii).encode("utf-8") + b"\n"
        self._handle.write(line)
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
