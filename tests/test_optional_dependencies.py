"""A missing optional package skips its tests locally and fails them under CI=true (issue 12)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize("ci, outcome", [("", "1 skipped"), ("true", "1 error")])
def test_a_missing_package_skips_locally_and_fails_in_ci(tmp_path, ci, outcome):
    (tmp_path / "test_needs_it.py").write_text(
        "from helpers.optional import import_or_skip\n"
        "missing = import_or_skip('no_such_package_for_alpaca_tests', 'pip install it')\n"
        "def test_uses_it():\n    assert missing\n"
    )
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(TESTS)}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_needs_it.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in run.stdout, run.stdout
    # pytest exits 5 when a module-level skip leaves nothing to run, 2 on a collection error
    assert run.returncode == (2 if ci else 5), run.stdout
    if ci:
        assert "required in CI" in run.stdout
