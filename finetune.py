"""Fine-tune a causal LM on instruction data: LoRA (default; 8-bit / 4-bit base optional) or all weights.

    python finetune.py --base_model=huggyllama/llama-7b --data_path=yahma/alpaca-cleaned
    python finetune.py --base_model=... --data_path=alpaca_data.json --load_in_4bit          # QLoRA
    torchrun --nproc_per_node=4 finetune.py --use_lora=False --model_name_or_path=... \\
        --data_path=./alpaca_data.json --bf16 True --fsdp "full_shard auto_wrap" ...          # Stanford

Every Alpaca-LoRA flag keeps its name and default; Stanford's train.py names are aliases; any other
Hugging Face `TrainingArguments` flag passes through. `python finetune.py --help` lists the flags.
"""

from __future__ import annotations

import sys

from alpaca.core.settings import flag_values, flags_from
from alpaca.finetune.settings import FinetuneConfig


@flags_from(FinetuneConfig, extra="training_args")
def train(flags: FinetuneConfig, **training_args) -> dict:
    """Fine-tune `base_model` on Alpaca-format instruction data.

    Any other transformers TrainingArguments flag passes through (--fsdp, --deepspeed, --bf16, --tf32,
    --save_strategy, --optim, ...); flags that transformers 5 renamed or removed are mapped. A mistyped
    flag is an error before anything loads. --config=FILE (YAML or JSON: configs/*.yaml, or a run's
    run_config.json to replay it) gives values; flags on the command line win.

    Each flag's default and help line live in alpaca/finetune/settings.py (the Args below come from it).
    """
    from alpaca.core.log import log
    from alpaca.core.threads import set_num_threads
    from alpaca.finetune.run import run_finetune

    set_num_threads(flags.num_threads, log=log)
    # the flags as given (None: the mode decides); run_finetune resolves them into the run's FinetuneConfig
    return run_finetune(flag_values(flags), training_args)


if __name__ == "__main__":
    from alpaca.core.cli import run
    from alpaca.finetune.resolve import accepted_keys, settings_from_run_config

    # `train` takes **training_args, so fire would read --help as one of them; ask for the help page.
    wants_help = {"-h", "--help"} & set(sys.argv[1:])
    # metrics are logged already; fire printing the returned dict on every rank is noise
    run(
        train,
        "finetune.py",
        ["--", "--help"] if wants_help else None,
        known_keys=accepted_keys,
        read_config=settings_from_run_config,
        serialize=lambda _: None,
    )
