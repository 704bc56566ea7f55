"""One run per output: an exclusive lock beside an output folder or file.

Two runs writing the same output undo each other's work (two `evaluate.py pairwise` runs into one
folder both paid for every judgment and both appended to the journal). Every run that writes an output
folder or file (fine-tuning on rank 0, self-instruct generation, pairwise judging, batch generation,
every export and weight diff) holds `fcntl.flock` on `.NAME.lock` beside its output `NAME` (or on
`.lock` inside a folder that is only ever added to) for as long as it writes. The lock file records the holder's pid, host and command, so a second run stops at once
with one line naming it. The operating system drops the lock when its process ends, however it ends,
so a lock left by a killed run is simply taken over (with a line saying so); a run that ends normally
deletes its lock file.

The lock sits beside the output, not in it: fine-tuning refuses a non-empty output folder, and
`--overwrite` and the exports swap whole folders in and out. `flock` is reliable on local file
systems; on NFS it depends on the server.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

LOCK_INSIDE = ".lock"
# Locks this process holds: lock path -> (pid, depth). A run may take the same lock again (an entry
# function calling another that locks the same output); a forked child does not inherit them.
_held: dict[Path, tuple[int, int]] = {}


class OutputInUse(ValueError):
    """Another live run holds the output's lock (a user-facing error: one line naming the holder)."""


def lock_path(output: str | Path, inside: bool = False) -> Path:
    """`.NAME.lock` beside the output `NAME`, or `NAME/.lock` inside a folder that is only ever added
    to (symlinks resolved, so two names for one folder share it)."""
    output = Path(output).expanduser().resolve()
    return output / LOCK_INSIDE if inside else output.parent / f".{output.name}.lock"


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        info = json.loads(raw)
        return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
    except (ValueError, KeyError, TypeError):
        return "a run that has not written its details yet" if not raw else raw.decode("utf-8", "replace")


def _open_locked(path: Path, output: str | Path, flag: str) -> int:
    """Open `path` and take its lock without waiting; refuse naming the holder when another run has it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise OutputInUse(
                f"{flag}={str(output)!r} is in use by another run ({holder}; lock {path}): wait for it to "
                "end or stop it, or choose another output"
            ) from None
        # The holder that just ended deleted the file: this lock is on a file nobody else will open.
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextmanager
def output_lock(
    output: str | Path,
    flag: str = "--output_dir",
    inside: bool = False,
    log: Callable[[str], None] | None = None,
):
    """Hold the exclusive lock of `output` (a folder or file, existing or not) for the block; `inside`
    puts it in the folder (for tools whose default output is the working folder, whose parent may not
    be writable).

    Raises OutputInUse, naming the holder (pid, host, command), when another live run holds it.
    """
    log = log or (lambda message: print(message, file=sys.stderr))
    path = lock_path(output, inside)
    pid, depth = _held.get(path, (None, 0))
    if pid == os.getpid():
        _held[path] = (pid, depth + 1)
        try:
            yield path
        finally:
            _held[path] = (pid, depth)
        return
    # folders made only to hold the lock are removed again when they end empty (a refused run leaves
    # nothing behind)
    made = [folder for folder in (path.parent, *path.parent.parents) if not folder.exists()]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = _open_locked(path, output, flag)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(
            f"{flag}={str(output)!r}: part of that path is a file, not a folder; give a folder path"
        ) from None
    except PermissionError as err:
        raise ValueError(
            f"{flag}={str(output)!r}: cannot create its lock file {path} ({err.strerror})"
        ) from None
    try:
        if os.fstat(fd).st_size:
            log(f"{path}: taking over the lock left by {_holder(fd)}, which ended without releasing it")
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else "python",
        }
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        _held[path] = (os.getpid(), 1)
        try:
            yield path
        finally:
            del _held[path]
            path.unlink(missing_ok=True)  # still locked: a run waiting to open it retries on a new file
    finally:
        os.close(fd)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:  # not empty: the run wrote its output there
                break


def check_output_free(output: str | Path, flag: str = "--output_dir", inside: bool = False) -> None:
    """Refuse now, before a slow model load, when another run holds `output`'s lock (the run takes the
    lock itself later)."""
    path = lock_path(output, inside)
    pid, _ = _held.get(path, (None, 0))
    if pid == os.getpid() or not path.exists():
        return
    fd = _open_locked(path, output, flag)
    os.close(fd)


def locks_output(
    flag: str,
    output_of: Callable[[dict], str | Path | None],
    inside: bool = False,
    settings_ok: Callable[[dict], bool] | None = None,
):
    """Decorate a run function so that it holds `output_lock` for the output `output_of(arguments)`
    names (arguments by parameter name; None or "" means no output, no lock). When `settings_ok` says
    the settings are wrong, the function runs unlocked: it refuses them itself, and no lock (or folder
    for it) is made for a mistyped output."""

    def decorate(function):
        signature = inspect.signature(function)

        @functools.wraps(function)
        def run(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            output = output_of(bound.arguments)
            if not output or (settings_ok is not None and not settings_ok(bound.arguments)):
                return function(*args, **kwargs)
            with output_lock(output, flag, inside):
                return function(*args, **kwargs)

        return run

    return decorate
