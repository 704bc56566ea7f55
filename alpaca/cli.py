"""The one way the top-level scripts run: fire, with user mistakes shown as one line, not a traceback."""

from __future__ import annotations

import sys


def run(component, script: str, argv: list[str] | None = None, **fire_kwargs) -> None:
    """Run `component` with fire; a ValueError (a user's mistake whose message names the flag, file
    or record) becomes `SCRIPT: error: MESSAGE` on stderr and exit status 2."""
    import fire

    try:
        fire.Fire(component, command=sys.argv[1:] if argv is None else argv, **fire_kwargs)
    except ValueError as err:
        print(f"{script}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
