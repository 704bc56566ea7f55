"""The one rule for what a test needs but the machine may lack (an optional package, a browser,
llama.cpp's converters): skipped where it is missing, except in CI (CI=true), where it fails the run,
so that CI can never pass by silently skipping."""

import importlib
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def skip_or_fail(reason: str, ci_hint: str = "required in CI") -> None:
    """Skip the calling test (or test module) with `reason`; under CI=true, fail it instead."""
    if in_ci():
        pytest.fail(f"{reason} ({ci_hint})", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def import_or_skip(name: str, install: str):
    """The module `name`; when it cannot be imported, skip the calling test module (fail under CI=true)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        skip_or_fail(f"{name} cannot be imported ({err}); install it with: {install}")
