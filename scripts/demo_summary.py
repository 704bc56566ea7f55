"""Print what `make demo` produced: the loss before and after training, and the generations."""

import json
import sys
from pathlib import Path

demo_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "demo-output")
history = json.loads((demo_dir / "lora-alpaca" / "loss_history.json").read_text())
train = [entry["loss"] for entry in history if "loss" in entry]
evals = [entry["eval_loss"] for entry in history if "eval_loss" in entry]
print(f"\ntraining loss {train[0]:.3f} -> {train[-1]:.3f}; validation loss {evals[0]:.3f} -> {evals[-1]:.3f}")
print(f"adapter, tokenizer, run_config.json and loss.png in {demo_dir / 'lora-alpaca'}")
print("generations (a 2-layer random model with a small adapter: expect noise, not answers):")
for record in json.loads((demo_dir / "generations.json").read_text()):
    print(f"\n### {record['instruction']} {record.get('input', '')}".rstrip())
    print(repr(record["output"]))
