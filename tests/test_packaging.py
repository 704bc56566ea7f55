"""`pip install .` ships every subpackage and the prompt templates (issue 12)."""

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_installed_package_finds_its_templates_and_subpackages(tmp_path):
    # Build from a copy so the build's egg-info and build/ folders never land in the working tree.
    source = tmp_path / "source"
    source.mkdir()
    shutil.copy(REPO / "pyproject.toml", source)
    shutil.copytree(REPO / "alpaca", source / "alpaca", ignore=shutil.ignore_patterns("__pycache__"))
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", str(source), "--target", str(target)]
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-q"], check=True, timeout=300)
    assert {p.name for p in (target / "alpaca" / "templates").glob("*.json")} == {
        p.name for p in (REPO / "alpaca" / "templates").glob("*.json")
    }
    probe = (
        "import alpaca.core.prompter as p, alpaca.weights.export, alpaca.evaluation, alpaca.selfinstruct, alpaca.serving;"
        "print(p.TEMPLATES_DIR); print(p.Prompter('alpaca_legacy').generate_prompt('Say hi.'))"
    )
    run = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,  # not the repository: nothing may be found relative to the working directory
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    templates_dir, prompt = run.stdout.split("\n", 1)
    assert Path(templates_dir) == target / "alpaca" / "templates"
    assert prompt.startswith("Below is an instruction") and "Say hi." in prompt
