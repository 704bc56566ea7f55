"""Size and held-out loss of each GGUF --outtype on SmolLM2-135M-Instruct + a short LoRA fine-tune.

    python benchmarks/bench_gguf_quant.py                          # trains a short adapter first
    python benchmarks/bench_gguf_quant.py --adapter=./smollm2-demo/lora --outtypes=f16,q8_0,q4_0

The adapter is the demo's recipe (configs/smollm2_demo.yaml: all-linear LoRA r=16, packing) stopped
after --steps steps on the demo's training records (data/alpaca_sample.json minus every 8th). Each
outtype is written by export_gguf.py's entry function (self-check included); the file is then read back,
dequantized into the model, and scored on all 15 held-out records of the demo (loss per response token,
the prompt masked as in training). K-quants (q4_k_m, q5_k_m, q6_k) are measured when llama-cpp-python is
installed. Prints a Markdown table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEFAULT_OUTTYPES = ("f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "q6_k", "q5_k_m", "q4_k_m")


def train_adapter(base_model: str, workdir: Path, steps: int) -> str:
    """The demo's fine-tune (its config file), stopped after `steps` optimizer steps."""
    from alpaca.quickstart import SAMPLE_DATA, finetune_command, split_records

    train, _ = split_records(json.loads(SAMPLE_DATA.read_text(encoding="utf-8")))
    data = workdir / "train.json"
    data.write_text(json.dumps(train), encoding="utf-8")
    out = workdir / "lora"
    command = finetune_command(base_model, data, out, "auto") + [f"--max_steps={steps}"]
    print("training:", " ".join(command[1:]), flush=True)
    subprocess.run(
        command, check=True, env=os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    )
    return str(out)


def held_out_loss(model, tokenizer, held_out, path: Path | None) -> float:
    """Held-out loss of `model` with the dequantized weights of the GGUF at `path` (None: as it is)."""
    from alpaca.core.prompter import Prompter
    from alpaca.metrics import response_loss
    from alpaca.weights.export.quantize import hf_weights, load_weights, read_gguf_arrays

    if path is not None:
        arrays = {name: array for name, (array, _) in read_gguf_arrays(path).items()}
        load_weights(model, hf_weights(arrays, model))
    return response_loss(model, tokenizer, held_out, Prompter("alpaca")).loss


def write_unchecked(model, tokenizer, adapter: str, base: str, path: Path, outtype: str) -> None:
    """The GGUF an export would have written, without its self-check (for a refused outtype's figures)."""
    from alpaca.weights.export.core import MergedModel
    from alpaca.weights.export.gguf import write_gguf

    merged = MergedModel(model, tokenizer, adapter, base, "fp32")
    write_gguf(merged, path, outtype, None, Path(base).name, "bpe")


def main(adapter: str = "", outtypes: str = ",".join(DEFAULT_OUTTYPES), steps: int = 8, workdir: str = ""):
    """Train (unless --adapter), export each outtype, print size and held-out loss.

    Args:
        adapter: an existing SmolLM2 LoRA adapter folder; default: train one (--steps steps).
        outtypes: comma-separated --outtype values; K-quants are skipped without llama-cpp-python.
        steps: optimizer steps of the short fine-tune.
        workdir: where to write the adapter and the files (default: a temporary folder).
    """
    import torch

    from alpaca.default_model import default_model_folder
    from alpaca.modeling import load_adapter, load_base_model, load_plain_tokenizer, merge_lora
    from alpaca.quickstart import SAMPLE_DATA, split_records
    from alpaca.weights.export import export_gguf
    from alpaca.weights.export.quantize import K_OUTTYPES

    base = str(default_model_folder(install=True))
    held_out = split_records(json.loads(SAMPLE_DATA.read_text(encoding="utf-8")))[1]
    root = Path(workdir or tempfile.mkdtemp(prefix="bench-gguf-"))
    root.mkdir(parents=True, exist_ok=True)
    adapter = adapter or train_adapter(base, root, steps)
    try:
        import llama_cpp  # noqa: F401

        has_llama_cpp = True
    except ImportError:
        has_llama_cpp = False
    tokenizer = load_plain_tokenizer(adapter if (Path(adapter) / "tokenizer.json").is_file() else base)
    model = load_base_model(base, dtype=torch.float32).eval()
    rows = [
        (
            "base SmolLM2 (no adapter), fp32 in transformers",
            None,
            held_out_loss(model, tokenizer, held_out, None),
            "",
            "",
        )
    ]
    model = merge_lora(load_adapter(model, adapter)).eval()
    merged_loss = held_out_loss(model, tokenizer, held_out, None)
    merged_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    rows.append(("merged, fp32 in transformers (reference)", None, merged_loss, "", ""))
    for outtype in outtypes.split(","):
        if outtype in K_OUTTYPES and not has_llama_cpp:
            print(f"skipping {outtype}: needs llama-cpp-python")
            continue
        path = root / f"smollm2-lora-{outtype}.gguf"
        start = time.perf_counter()
        try:
            info = export_gguf(base, adapter, str(path), outtype=outtype, overwrite=True)
            check = info.get("quantization", {})
            kept = f"{check['closer']:.1%} / {check['effect_kept']:.0%}" if check else ""
        except ValueError as err:  # refused by the self-check: measure the same file written unchecked
            if "self-check failed" not in str(err) or outtype in K_OUTTYPES:
                raise
            model.load_state_dict(merged_state)  # it holds the last file's weights
            write_unchecked(model, tokenizer, adapter, base, path, outtype)
            kept = "refused: " + str(err).split(": ", 2)[2].split(" (")[0]
        seconds = time.perf_counter() - start
        rows.append(
            (
                outtype,
                path.stat().st_size,
                held_out_loss(model, tokenizer, held_out, path),
                kept,
                f"{seconds:.1f} s",
            )
        )
    print(
        f"\nSmolLM2-135M-Instruct + LoRA ({adapter}); held-out loss on {len(held_out)} records of the demo\n"
    )
    print(
        "| file | size | held-out loss | vs merged fp32 | self-check: KL closer than base / effect kept | export time |"
    )
    print("|---|---|---|---|---|---|")
    for name, size, loss, kept, seconds in rows:
        size_text = f"{size / 2**20:.1f} MiB" if size else ""
        print(f"| {name} | {size_text} | {loss:.4f} | {loss / merged_loss - 1:+.2%} | {kept} | {seconds} |")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
