"""The one way the top-level scripts run: fire, with user mistakes shown as one line, not a traceback."""

from __future__ import annotations

import sys


def run(component, script: str, argv: list[str] | None = None, **fire_kwargs) -> None:
    """Run `component` with fire; a ValueError (a user's mistake whose message names the flag, file
    or record) becomes `SCRIPT: error: MESSAGE` on stderr and exit status 2."""
    import fire

    drop_bitsandbytes_kernels_warning()
    try:
        fire.Fire(component, command=sys.argv[1:] if argv is None else argv, **fire_kwargs)
    except ValueError as err:
        print(f"{script}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def drop_bitsandbytes_kernels_warning() -> None:
    """Silence one import-time message of bitsandbytes (0.50) on CPUs with AVX512-BF16.

    peft imports bitsandbytes whenever it is installed, and bitsandbytes then logs "Failed to load CPU
    gemm_4bit_forward from kernels-community: No module named 'kernels'" from its CPU backend: every
    command printed it, quantized or not. It only means an optional faster 4-bit kernel is absent.
    The filter drops that message alone, on that logger alone.
    """
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
        lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")
    )
