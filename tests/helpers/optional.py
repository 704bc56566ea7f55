"""Optional test dependencies: skipped where they are missing, except in CI (CI=true), where a missing
package fails the run, so that CI can never pass by silently skipping."""

import importlib
import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def import_or_skip(name: str, install: str):
    """The module `name`; when it cannot be imported, skip the calling test module (fail under CI=true)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        reason = f"{name} cannot be imported ({err}); install it with: {install}"
        if in_ci():
            pytest.fail(f"{reason} (required in CI)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)
