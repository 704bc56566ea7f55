"""Several pairwise runs side by side: a Markdown and a CSV table, and a bar chart with error bars."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from alpaca.evaluation.pairwise import RESULTS_NAME

COLUMNS = (
    "model",
    "reference",
    "judge_model",
    "win_rate",
    "standard_error",
    "n_wins",
    "n_losses",
    "n_ties",
    "n_unparseable",
    "n_pairs",
    "avg_length_model",
    "cost_usd",
    "results_dir",
)


def load_rows(result_dirs: list[str]) -> list[dict]:
    """One row per folder holding a pairwise results.json, best win rate first."""
    if not result_dirs:
        raise ValueError(
            "give one or more folders written by `evaluate.py pairwise` (each with results.json)"
        )
    rows = []
    for folder in result_dirs:
        path = Path(str(folder)).expanduser() / RESULTS_NAME
        if not path.is_file():
            raise ValueError(
                f"{folder!r} has no {RESULTS_NAME}: give folders written by `evaluate.py pairwise`"
            )
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            raise ValueError(
                f"{path}: not readable JSON ({error}); rerun `evaluate.py pairwise` there"
            ) from None
        if not isinstance(results, dict) or "win_rate" not in results:
            raise ValueError(f"{path}: not a pairwise results file (no 'win_rate')")
        row = {name: results.get(name) for name in COLUMNS}
        row["cost_usd"] = (results.get("cost") or {}).get("usd")
        row["results_dir"] = str(folder)
        rows.append(row)
    rows.sort(key=lambda row: -1.0 if row["win_rate"] is None else row["win_rate"], reverse=True)
    return rows


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join("---" for _ in COLUMNS) + "|"
    body = [
        "| " + " | ".join(_cell(row[name]).replace("|", "\\|") for name in COLUMNS) + " |" for row in rows
    ]
    return "\n".join([header, rule, *body]) + "\n"


def csv_table(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: "" if row[name] is None else row[name] for name in COLUMNS})
    return buffer.getvalue()


def bar_chart(rows: list[dict], path: Path) -> None:
    """Win rate per model with its standard error as error bars, and the 50% line (a tie)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [str(row["model"]) for row in rows]
    rates = [row["win_rate"] or 0.0 for row in rows]
    errors = [row["standard_error"] or 0.0 for row in rows]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 2), 4))
    bars = axes.bar(range(len(rows)), rates, yerr=errors, capsize=4, color="#4C72B0")
    axes.bar_label(bars, labels=[f"{rate:.1f}" for rate in rates], label_type="center", color="white")
    axes.axhline(50, color="gray", linestyle="--", linewidth=1)
    axes.set_xticks(range(len(rows)), labels, rotation=20, ha="right")
    axes.set_ylim(0, 100)
    axes.set_ylabel("win rate (%) ± standard error")
    references = sorted({str(row["reference"]) for row in rows})
    axes.set_title(f"against {', '.join(references)}")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def default_output_dir(result_dirs: list[str]) -> Path:
    """The folder that holds all the result folders (their common parent)."""
    parents = [str(Path(str(folder)).expanduser().resolve().parent) for folder in result_dirs]
    return Path(os.path.commonpath(parents))


def write_leaderboard(result_dirs: list[str], output_dir: str = "") -> dict[str, Path]:
    """Write leaderboard.md, leaderboard.csv and leaderboard.png; return their paths."""
    rows = load_rows(result_dirs)
    folder = Path(output_dir).expanduser() if output_dir else default_output_dir(result_dirs)
    if folder.is_file():
        raise ValueError(f"--output_dir={str(folder)!r} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"leaderboard.{kind}" for kind in ("md", "csv", "png")}
    paths["md"].write_text(markdown_table(rows), encoding="utf-8")
    paths["csv"].write_text(csv_table(rows), encoding="utf-8")
    bar_chart(rows, paths["png"])
    return paths
