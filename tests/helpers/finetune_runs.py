"""Sample-data subsets, fast finetune.py runs on the tiny models, and the losses they log."""

import json
from pathlib import Path

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "data" / "alpaca_sample.json"


def write_sample_subset(path, count: int) -> str:
    """Write the first `count` short records (output under 200 characters) of the sample data to `path`."""
    records = [r for r in json.loads(SAMPLE_DATA.read_text()) if len(r["output"]) < 200][:count]
    Path(path).write_text(json.dumps(records))
    return str(path)


def run_finetune_fast(base, data, out, **overrides):
    """Run finetune.py's entry function with settings fast enough for a tiny model."""
    import finetune

    args = dict(
        base_model=base,
        data_path=data,
        output_dir=str(out),
        batch_size=8,
        micro_batch_size=4,
        cutoff_len=128,
        val_set_size=0,
        learning_rate=1e-2,
        warmup_steps=0,
        max_steps=10,
        logging_steps=1,
        save_steps=100,
        seed=7,
    )
    args.update(overrides)
    return finetune.train(**args)


def logged_losses(out) -> list[tuple[int, float]]:
    """(step, training loss) pairs from a run's loss_history.json."""
    history = json.loads((Path(out) / "loss_history.json").read_text())
    return [(e["step"], e["loss"]) for e in history if "loss" in e]
