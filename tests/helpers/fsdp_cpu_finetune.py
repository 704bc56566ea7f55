"""finetune.py under real FSDP2 on CPU (gloo), for tests only.

accelerate 1.15 enables FSDP only on GPU-type devices and silently runs DDP on a CPU machine. This
test-only Trainer subclass switches the accelerator to FSDP after it is created, so the sharding and
the full-state-dict save path of finetune.py can be exercised on CPU. It relies on accelerate
internals (pinned in requirements.txt) and is never part of the shipped code path.

    torchrun --nproc_per_node=2 tests/helpers/fsdp_cpu_finetune.py --use_lora=False --base_model=... --fsdp=full_shard
"""

import inspect
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import fire  # noqa: E402
from transformers import Trainer, TrainerCallback  # noqa: E402

import finetune  # noqa: E402
from alpaca.finetune.run import run_finetune  # noqa: E402


class ShardReport(TrainerCallback):
    """Each rank writes, per parameter, how many elements it holds locally vs the full tensor."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step != 1:
            return
        from torch.distributed.tensor import DTensor

        report = {}
        for name, param in self.trainer.model_wrapped.named_parameters():
            local = param.to_local() if isinstance(param, DTensor) else param
            report[name] = {
                "local": local.numel(),
                "full": param.numel(),
                "dtensor": isinstance(param, DTensor),
            }
        rank = int(os.environ.get("RANK", "0"))
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / f"shard_report_rank{rank}.json").write_text(json.dumps(report))


class FSDPOnCPUTrainer(Trainer):
    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        if self.args.fsdp_plugin_args is None:
            return
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
        state = self.accelerator.state
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.is_fsdp_enabled = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(ShardReport(self))


def train(**kwargs):
    """finetune.train's flags (with its defaults) and pass-through, run with the FSDP-on-CPU Trainer."""
    signature = inspect.signature(finetune.train).parameters
    flags = {
        name: kwargs.pop(name, p.default) for name, p in signature.items() if p.kind is not p.VAR_KEYWORD
    }
    return run_finetune(flags, kwargs, trainer_class=FSDPOnCPUTrainer)


if __name__ == "__main__":
    fire.Fire(train, serialize=lambda _: None)
