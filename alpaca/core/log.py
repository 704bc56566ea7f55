"""Rank-0 logging: under torchrun every rank runs the same code, and only rank 0 should print."""

import os


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def log(message: str) -> None:
    """Print on rank 0 only, so torchrun runs don't repeat every line."""
    if is_main_process():
        print(message, flush=True)
