"""Peak memory of weight diffs: our streaming make_diff / recover against upstream's in-memory recipe.

    python benchmarks/bench_weight_diff.py                                  # SmolLM2 + a 0.44B LLaMA
    python benchmarks/bench_weight_diff.py --models=smollm2                 # the real model only
    python benchmarks/bench_weight_diff.py --models=synthetic --layers=24   # a bigger random LLaMA

Upstream's `weight_diff.py` (Stanford Alpaca) loads the raw and the tuned model in fp32, gives the raw
one `[PAD]` (mean row), subtracts or adds in place and calls save_pretrained: two fp32 models in memory
(about 56 GB for a 7B model). Ours streams one tensor at a time. Each step runs in its own process and
its peak resident memory (ru_maxrss) is reported next to the floor (a process that only imports torch,
transformers and safetensors), so the part that grows with the model is visible. Both recipes recover
the same bits: the benchmark checks every recovered tensor's SHA-256 against the other recipe's.

The parent process stays small (no torch): Linux carries a parent's resident size into a child's
ru_maxrss through fork and exec, which would put a floor under every figure.

The "tuned" model is the raw one with `[PAD]` added and every weight moved, saved in fp32, as
Stanford's training leaves it. Needs about 8x the model's fp32 size of free disk under --workdir.
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

FLOOR = "import torch, transformers, safetensors"


def child_env() -> dict:
    return os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}


def run_measured(code: str) -> tuple[float, float]:
    """Run `code` in a fresh Python; return (peak RSS in MiB, wall seconds)."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=child_env())
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"child failed ({process.returncode}): {code[:200]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


PREPARE = """
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
from alpaca.modeling import resize_embeddings_for_new_tokens
raw, tuned, layers, hidden = {raw!r}, {tuned!r}, {layers}, {hidden}
if {synthetic}:
    from alpaca.tiny import build_tiny_model
    tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(raw); tokenizer.save_pretrained(raw)
else:
    raw = {source!r}
tokenizer = AutoTokenizer.from_pretrained(raw)
model = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
resize_embeddings_for_new_tokens(model, tokenizer, tokenizer.add_special_tokens({{"pad_token": "[PAD]"}}))
torch.manual_seed(1)
with torch.no_grad():
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 1e-3)
model.save_pretrained(tuned); tokenizer.save_pretrained(tuned)
print(sum(p.numel() for p in model.parameters()))
"""

# Stanford Alpaca's weight_diff.py, as published (minus the smoke test and the 7B-only sum check), with
# one fix: upstream loops over every state-dict key, so a tied embedding (SmolLM2) is updated twice.
# make_diff: other = the tuned model, sign -1 (tuned - raw); recover: other = the diff, sign +1.
UPSTREAM = """
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from alpaca.modeling import resize_embeddings_for_new_tokens
raw, other, out, sign = {raw!r}, {other!r}, {out!r}, {sign}
model_other = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32)
model_raw = AutoModelForCausalLM.from_pretrained(raw, dtype=torch.float32)
tokenizer_other, tokenizer_raw = AutoTokenizer.from_pretrained(other), AutoTokenizer.from_pretrained(raw)
if "[PAD]" not in tokenizer_raw.get_vocab():
    resize_embeddings_for_new_tokens(model_raw, tokenizer_raw, tokenizer_raw.add_special_tokens({{"pad_token": "[PAD]"}}))
state_other, state_raw = model_other.state_dict(), model_raw.state_dict()
seen = set()
with torch.no_grad():
    for key, tensor in state_other.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            tensor.add_(sign * state_raw[key])
model_other.save_pretrained(out); tokenizer_other.save_pretrained(out)
"""
UPSTREAM_MAKE = UPSTREAM.replace("{other!r}", "{tuned!r}").replace("{sign}", "-1")
UPSTREAM_RECOVER = UPSTREAM.replace("{other!r}", "{diff!r}").replace("{sign}", "1")
OURS_MAKE = "from alpaca.weights.diffs import make_diff; make_diff({raw!r}, {tuned!r}, {out!r})"
OURS_RECOVER = (
    "from alpaca.weights.diffs import recover; recover({raw!r}, {diff!r}, {out!r}, test_inference=False)"
)


COMPARE = """
import json
from pathlib import Path
from safetensors import safe_open
from alpaca.weights.diffs import tensor_sha256
def hashes(folder):
    out = {{}}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():
                out[name] = tensor_sha256(handle.get_tensor(name))
    return out
ours, upstream = hashes({ours!r}), hashes({upstream!r})
print(json.dumps(sorted(k for k in ours.keys() | upstream.keys() if ours.get(k) != upstream.get(k))))
"""


def bench_model(name: str, workdir: Path, source: str | None, layers: int, hidden: int) -> dict:
    from alpaca.default_model import default_model_folder

    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    raw, tuned = folder / "raw", folder / "tuned"
    tokenizer = str(default_model_folder(install=True)) if source is None else source
    synthetic = source is None
    params_code = PREPARE.format(
        raw=str(raw),
        tuned=str(tuned),
        layers=layers,
        hidden=hidden,
        synthetic=synthetic,
        tokenizer=tokenizer,
        source=source or "",
    )
    output = subprocess.run(
        [sys.executable, "-c", params_code],
        cwd=REPO,
        env=child_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    params = int(output.stdout.strip().splitlines()[-1])
    raw_path = str(raw) if synthetic else source
    floor, _ = run_measured(FLOOR)
    result = {"model": name, "params": params, "fp32_mib": params * 4 / 2**20, "floor_mib": floor}
    for recipe, make, rec in (
        ("upstream", UPSTREAM_MAKE, UPSTREAM_RECOVER),
        ("ours", OURS_MAKE, OURS_RECOVER),
    ):
        diff, out = folder / f"{recipe}_diff", folder / f"{recipe}_recovered"
        result[f"{recipe}_make"] = run_measured(make.format(raw=raw_path, tuned=str(tuned), out=str(diff)))
        result[f"{recipe}_recover"] = run_measured(rec.format(raw=raw_path, diff=str(diff), out=str(out)))
        print(
            f"[{name}] {recipe}: make_diff {result[f'{recipe}_make']}, recover {result[f'{recipe}_recover']}"
        )
    code = COMPARE.format(ours=str(folder / "ours_recovered"), upstream=str(folder / "upstream_recovered"))
    compared = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True, text=True, check=True
    )
    differ = json.loads(compared.stdout.strip().splitlines()[-1])
    result["identical"] = not differ
    if differ:
        raise SystemExit(f"[{name}] the recipes recovered different tensors: {differ[:5]}")
    return result


def main(
    models: str = "smollm2,synthetic",
    layers: int = 12,
    hidden: int = 1536,
    workdir: str = "",
):
    """Measure both recipes on each model (smollm2: the real SmolLM2-135M-Instruct; synthetic: a random
    LLaMA with `layers` layers of width `hidden`, untied embeddings, 32K-class BPE vocabulary)."""
    from alpaca.default_model import default_model_folder

    chosen = models.split(",") if isinstance(models, str) else list(models)
    results = []
    with tempfile.TemporaryDirectory(dir=workdir or None, prefix="bench-weight-diff-") as tmp:
        for name in chosen:
            source = str(default_model_folder(install=True)) if name == "smollm2" else None
            results.append(bench_model(name, Path(tmp), source, layers, hidden))
    print("\npeak RSS in MiB (floor = a process that only imports torch, transformers, safetensors)")
    print(
        "| model | params | fp32 size | floor | step | upstream | ours | ours / upstream | above floor: upstream / ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for step in ("make", "recover"):
            (up, up_s), (ours, ours_s) = r[f"upstream_{step}"], r[f"ours_{step}"]
            above = (up - r["floor_mib"]) / max(ours - r["floor_mib"], 1.0)
            print(
                f"| {r['model']} | {r['params'] / 1e6:.0f}M | {r['fp32_mib']:.0f} | {r['floor_mib']:.0f} | "
                f"{step} | {up:.0f} ({up_s:.1f} s) | {ours:.0f} ({ours_s:.1f} s) | {ours / up:.2f} | {above:.1f}x |"
            )
    print("recovered tensors identical between the recipes:", all(r["identical"] for r in results))
    print(json.dumps(results))


if __name__ == "__main__":
    import fire

    fire.Fire(main)
