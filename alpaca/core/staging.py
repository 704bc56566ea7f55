"""Writing an output safely: refuse to clobber what should not be cleared, write into a staging copy,
and swap it in only once it is complete.

The exports, the weight diffs and fine-tuning's output folder all go through `prepare_output_path`
(the checks, before anything loads) and `staged_output` (the swap), so a failed or killed run never
leaves a partial output and an `--overwrite` that fails keeps the old one.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def prepare_output_path(
    path: str, overwrite: bool, flag: str = "--output_dir", protect=(), is_file: bool = False
) -> Path:
    """Check that `path` may be written: a folder (or a file, with `is_file`), refused when it exists
    and is not empty unless `overwrite`, and never the working folder, home or an input. Deletes
    nothing: write through `staged_output`, which replaces the old output only once the new one is
    complete."""
    path = Path(path).expanduser()
    if is_file and path.is_dir():
        raise ValueError(f"{flag}={str(path)!r} is a folder; give a file name")
    if not is_file and path.exists() and not path.is_dir():
        raise ValueError(f"{flag}={str(path)!r} is a file, not a folder; give a folder to write into")
    exists = path.is_file() or (path.is_dir() and any(path.iterdir()))
    if exists and not overwrite:
        raise ValueError(
            f"{flag}={str(path)!r} already exists and is not empty; pass --overwrite to replace it"
        )
    if exists:
        resolved = path.resolve()
        guarded = [Path.cwd().resolve(), Path.home().resolve()] + [
            Path(p).expanduser().resolve() for p in protect if p
        ]
        if any(resolved == g or resolved in g.parents for g in guarded):
            raise ValueError(
                f"{flag}={str(path)!r} holds the working folder, home or an input model; refusing to clear it"
            )
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def clear_killed_staging(path: Path, log=print) -> None:
    """Tidy what a run killed inside `staged_output` left beside `path`: its staging copy (a partial
    output, which for a streamed 7B model is tens of GB) is deleted, and an old output it had moved aside
    to swap in the new one is put back when `path` is missing (a kill between the two renames). Only
    siblings whose writer process is gone are touched: each name carries its writer's pid."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.(tmp|old)$")
    for sibling in sorted(path.parent.glob(f".{path.name}.*")):
        match = pattern.match(sibling.name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        moved_aside = sibling / path.name
        if match.group(2) == "old" and moved_aside.exists() and not path.exists():
            os.replace(moved_aside, path)
            log(f"{path}: put back the previous output that a killed run had moved aside")
        if sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
        log(f"{path}: removed {sibling.name}, left by a run that was killed while writing")


@contextmanager
def staged_output(path: Path, is_file: bool = False):
    """Yield a temporary sibling of `path` to write into; when the block ends without an error, swap it
    in for `path` (replacing an old output), else delete it. So a failed or interrupted export never
    leaves a partial output, and an `--overwrite` that fails keeps the previous output as it was. What a
    killed run left behind (its pid is in the names) is tidied first (`clear_killed_staging`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clear_killed_staging(path)
    prefix = f".{path.name}.{os.getpid()}."
    if is_file:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
        os.close(handle)
        staging = Path(name)
        staging.chmod(0o644)  # mkstemp makes it private; an export is an ordinary file
    else:
        staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".tmp"))
        staging.chmod(0o755)  # mkdtemp makes it private; an export is an ordinary folder
    try:
        yield staging
        if is_file or not path.is_dir():
            os.replace(staging, path)
        else:
            # A folder cannot be renamed over a non-empty one: move the old one aside first.
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=".old"))
            os.replace(path, old / path.name)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.is_dir():
            shutil.rmtree(staging, ignore_errors=True)
        elif staging.exists():
            staging.unlink()
