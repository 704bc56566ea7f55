"""What a fine-tuning run reports and saves: run_config.json (secrets masked), step and warmup
figures, the loss plot, the saved adapter or model, the final metrics."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

from alpaca.core.files import write_json_atomic
from alpaca.core.log import is_main_process, log
from alpaca.finetune.settings import SECRET_MASK, FinetuneConfig

# A setting whose name ends like one of these holds a credential (hub_token, wandb_api_key, ...).
SECRET_NAME = re.compile(r"(^|_)(token|api_key|key|password|passwd|secret|credentials?)$", re.IGNORECASE)
MASK = SECRET_MASK


def mask_secrets(value, key: str = ""):
    """A copy of `value` with every token/key/password-like setting replaced by `***`, at any depth."""
    if key and SECRET_NAME.search(key) and value not in (None, "", False):
        return MASK
    if isinstance(value, dict):
        return {k: mask_secrets(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_secrets(v) for v in value]
    return value


def mask_command_line(argv: list[str]) -> str:
    """The command line with the values of secret flags (`--hub_token=x` or `--hub_token x`) masked."""
    words, hide_next = [], False
    for word in argv:
        if hide_next:
            words.append(MASK)
            hide_next = False
            continue
        name, equals, _ = word.lstrip("-").partition("=")
        if word.startswith("--") and SECRET_NAME.search(name.replace("-", "_")):
            if equals:
                word = f"--{name}={MASK}"
            else:
                hide_next = True
        words.append(word)
    return " ".join(words)


def save_run_config(config: FinetuneConfig, extra: dict | None = None) -> Path:
    """Print the resolved configuration (with where each default came from) and save it, with every
    secret-like setting masked (the Trainer's own training_args.bin still holds them: keep output
    folders private when passing --hub_token)."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = config.to_dict()
    if extra:
        data.update(extra)
    data = mask_secrets(data)
    data["command"] = mask_command_line(sys.argv)
    if is_main_process():
        write_json_atomic(out / "run_config.json", data)
        log("resolved configuration:")
        for key, value in data.items():
            if key in ("sources", "command"):
                continue
            source = config.sources.get(key, "")
            log(f"  {key} = {value!r}" + (f"   [{source}]" if source else ""))
    return out / "run_config.json"


def optimizer_steps(config: FinetuneConfig, n_train: int) -> int:
    """Optimizer steps the Trainer will take: max_steps, or epochs x updates per epoch, where an epoch
    is ceil(examples / (micro batch x world size)) micro-batches per rank, ceil-divided by accumulation
    (transformers 5.23, `set_initial_training_values`)."""
    if config.max_steps > 0:
        return config.max_steps
    micro_batches = math.ceil(n_train / (config.micro_batch_size * config.world_size))
    per_epoch = max(math.ceil(micro_batches / config.gradient_accumulation_steps), 1)
    return math.ceil(config.num_epochs * per_epoch)


def warmup_report(config: FinetuneConfig, total_steps: int) -> tuple[int, str | None]:
    """Warmup steps the Trainer will use, and a warning when the warmup is not shorter than the run,
    giving the peak learning rate actually reached (the schedule is computed, not guessed)."""
    warmup = (
        int(config.warmup_steps) if config.warmup_steps >= 1 else math.ceil(total_steps * config.warmup_steps)
    )
    if warmup < total_steps or warmup == 0:
        return warmup, None
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    try:
        scheduler = get_scheduler(config.lr_scheduler_type, optimizer, warmup, total_steps)
    except (ValueError, TypeError):  # schedules needing more arguments: report the steps only
        scheduler = None
    peak = None
    if scheduler is not None:
        rates = []
        for _ in range(total_steps):  # the rate each optimizer step uses, as the Trainer steps it
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        peak = max(rates)
    reached = (
        f"the learning rate peaks at {peak:.3g} ({100 * peak / config.learning_rate:.0f}% of --learning_rate="
        f"{config.learning_rate:g})"
        if peak is not None
        else "the learning rate never reaches --learning_rate"
    )
    return warmup, (
        f"warning: the warmup ({warmup} steps) is not shorter than the run ({total_steps} optimizer steps): "
        f"{reached}. Lower --warmup_steps (or use --warmup_ratio=0.03)"
    )


def plot_losses(log_history: list[dict], path: str | Path) -> Path | None:
    """Save a PNG of the training (and validation) loss against the step."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="training loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("fine-tuning loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def save_outputs(trainer, tokenizer, config: FinetuneConfig) -> None:
    """Save the adapter (or full model) once through its own save method, the tokenizer, the loss
    history and plot. Upstream patched `model.state_dict`, which made newer peft write an empty
    (443-byte) adapter; `save_model` gathers FSDP/DeepSpeed shards and writes on rank 0 only."""
    trainer.model.config.use_cache = True  # the saved model generates with a KV cache
    trainer.save_model(config.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(config.output_dir)
        history = trainer.state.log_history
        write_json_atomic(Path(config.output_dir) / "loss_history.json", history)
        plot_losses(history, Path(config.output_dir) / "loss.png")


def count_trainable(model) -> tuple[int, int]:
    """(trainable, total) parameters. A bitsandbytes 4-bit weight is a packed tensor holding two values
    per byte: count the unpacked size its `quant_state` records (SmolLM2: 134.5M, not 81.9M)."""

    def size(param) -> int:
        shape = getattr(getattr(param, "quant_state", None), "shape", None)
        return math.prod(shape) if shape is not None else param.numel()

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total


def report_run(config: FinetuneConfig, report, model, extra: dict) -> None:
    """The pre-flight report: data, trainable parameters, optimizer and warmup steps (warning when the
    warmup is not shorter than the run); printed once and saved in run_config.json."""
    total_steps = optimizer_steps(config, report.train_examples)
    warmup, warmup_warning = warmup_report(config, total_steps)
    trainable, total = count_trainable(model)
    extra = dict(extra, data_report=report.to_dict(), optimizer_steps=total_steps)
    extra.update(warmup_steps_resolved=warmup, trainable_params=trainable, total_params=total)
    save_run_config(config, extra)
    log(report.summary())
    log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    log(f"optimizer steps: {total_steps} (warmup {warmup})")
    if warmup_warning:
        log(warmup_warning)


def final_metrics(trainer, result, n_train: int) -> dict:
    metrics = dict(result.metrics)
    metrics["global_step"] = trainer.state.global_step
    metrics["num_processes"] = trainer.accelerator.num_processes
    metrics["distributed_type"] = str(trainer.accelerator.distributed_type)
    metrics["train_examples"] = n_train
    return metrics
