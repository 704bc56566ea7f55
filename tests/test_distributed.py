"""Real 2-process torchrun runs on CPU (gloo): DDP LoRA, DDP full, FSDP full (through the test shim)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.finetune_runs import write_sample_subset
from helpers.ports import free_port
from safetensors.torch import load_file

import finetune

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_24(tmp_path_factory):
    return write_sample_subset(tmp_path_factory.mktemp("data") / "d.json", 24)


def torchrun(script: str, *args: str, timeout: int = 240, **env_extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", MASTER_ADDR="127.0.0.1", **env_extra)
    env.pop("WORLD_SIZE", None)
    cmd = [
        TORCHRUN,
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        script,
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


# cutoff 256 keeps all 24 examples, so every global batch is full: with a partial last batch DDP repeats
# examples to even out the ranks, and a single process would see different data.
COMMON = [
    "--batch_size=8",
    "--micro_batch_size=4",
    "--cutoff_len=256",
    "--warmup_steps=0",
    "--logging_steps=1",
    "--val_set_size=0",
    "--seed=3",
]


def test_ddp_lora_two_ranks(tiny_llama, data_24, tmp_path):
    out = tmp_path / "ddp_lora"
    proc = torchrun(
        "finetune.py",
        f"--base_model={tiny_llama}",
        f"--data_path={data_24}",
        f"--output_dir={out}",
        "--num_epochs=1",
        "--learning_rate=1e-2",
        *COMMON,
        XDG_CACHE_HOME=str(tmp_path / "xdg"),  # an empty prepared-data cache
    )
    # the data was tokenized once, by rank 0; rank 1 read the same cache files
    builds = (tmp_path / "xdg" / "alpaca-kit" / "data" / "builds.log").read_text().splitlines()
    assert len(builds) == 1 and " rank=0 " in builds[0], builds
    report = json.loads((out / "run_config.json").read_text())["data_report"]
    assert report["cache_reused"] is False and report["cache_id"] in builds[0]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["num_processes"] == 2 and "MULTI_CPU" in metrics["distributed_type"]
    # 2 ranks x 4 examples = the global batch of 8 in one step, so one epoch is ceil(n / 8) steps;
    # a rank training alone (upstream's silent failure on CPU) would take twice as many.
    assert metrics["global_step"] == -(-metrics["train_examples"] // 8)
    assert proc.stdout.count("resolved configuration:") == 1  # rank 0 logs, rank 1 stays quiet
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(out))(ids).logits
    assert (before - after).abs().max() > 1e-4


def reference_single_process(base, data, out, **flags):
    """What one process saves after the same steps with the same global batch (8 per micro-batch)."""
    finetune.train(
        base_model=base,
        data_path=data,
        output_dir=str(out),
        use_lora=False,
        batch_size=8,
        micro_batch_size=8,
        cutoff_len=256,
        warmup_steps=0,
        logging_steps=1,
        val_set_size=0,
        seed=3,
        **flags,
    )
    return load_file(str(out / "model.safetensors"))


def test_ddp_full_two_ranks_equals_single_process(tiny_opt, data_24, tmp_path):
    # Plain SGD (a pass-through TrainingArguments flag): Adam divides by the gradient's magnitude, which
    # turns float summation-order noise on near-zero gradients (OPT's position rows) into visible steps.
    out = tmp_path / "ddp_full"
    torchrun(
        "finetune.py",
        "--use_lora=False",
        f"--base_model={tiny_opt}",
        f"--data_path={data_24}",
        f"--output_dir={out}",
        "--max_steps=3",
        "--learning_rate=0.5",
        "--optim=sgd",
        *COMMON,
    )
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["global_step"] == 3 and metrics["train_examples"] == 24
    ddp = load_file(str(out / "model.safetensors"))
    single = reference_single_process(
        tiny_opt, data_24, tmp_path / "single", max_steps=3, learning_rate=0.5, optim="sgd"
    )
    base = load_file(str(Path(tiny_opt) / "model.safetensors"))
    changed = [key for key in base if not torch.equal(ddp[key][: base[key].shape[0]], base[key])]
    assert len(changed) >= len(base) - 1, set(base) - set(changed)
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=0, atol=1e-6)


def test_fsdp_full_two_ranks_shards_and_saves_the_full_model(tiny_llama, data_24, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "fsdp"
    torchrun(
        "tests/helpers/fsdp_cpu_finetune.py",
        "--use_lora=False",
        f"--base_model={tiny_llama}",
        f"--data_path={data_24}",
        f"--output_dir={out}",
        "--max_steps=3",
        "--learning_rate=1e-3",
        "--fsdp=full_shard auto_wrap",
        *COMMON,
    )
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["distributed_type"] == "DistributedType.FSDP" and metrics["num_processes"] == 2
    reports = [json.loads((out / f"shard_report_rank{r}.json").read_text()) for r in (0, 1)]
    for name, entry in reports[0].items():
        assert entry["dtensor"], name
        # each rank holds about half of every tensor, and together they hold all of it
        assert abs(entry["local"] - entry["full"] / 2) <= entry["full"] / 2 / 8 + 64, name
        assert entry["local"] + reports[1][name]["local"] == entry["full"], name

    fsdp = load_file(str(out / "model.safetensors"))
    single = reference_single_process(
        tiny_llama, data_24, tmp_path / "single", max_steps=3, learning_rate=1e-3
    )
    assert fsdp.keys() == single.keys()
    for key in single:
        assert fsdp[key].shape == single[key].shape, key
        torch.testing.assert_close(fsdp[key], single[key], rtol=0, atol=1e-5)
    model = AutoModelForCausalLM.from_pretrained(str(out))  # a normal HF folder
    assert model.get_input_embeddings().weight.shape[0] == 2001  # [PAD] added by Stanford's rule
