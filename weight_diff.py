"""Make and apply weight diffs (Stanford Alpaca's format, plus per-tensor SHA-256 integrity).

    python weight_diff.py make_diff --path_raw=<raw llama> --path_tuned=<fine-tuned> --path_diff=<out>
    python weight_diff.py recover --path_raw=<raw llama> --path_diff=<diff> --path_tuned=<out>
    python weight_diff.py verify --path_tuned=<out>

Diffs are `tuned - raw` in fp32, so Stanford's published Alpaca-7B diff recovers with this script.
Both directions stream one tensor at a time through the weight files, so a 7B model needs a few GB of
memory, not two fp32 models (about 56 GB) as upstream.
`recover` copies the diff's per-tensor SHA-256 record beside the recovered model; `verify` checks a
recovered model against it at any later time. `--path_raw` may also be a `.gguf` file.
This script imports neither the training code nor the OpenAI client.
"""

from alpaca.core.settings import flags_from
from alpaca.weights.settings import MakeDiffConfig, RecoverConfig, VerifyConfig  # torch loads only when run


@flags_from(MakeDiffConfig)
def make_diff(config: MakeDiffConfig):
    """Write the weight diff tuned - raw (fp32) with the tuned tokenizer and per-tensor hashes."""
    from alpaca.weights.diffs import make_diff as make

    make(
        config.path_raw,
        config.path_tuned,
        config.path_diff,
        device=config.device,
        overwrite=config.overwrite,
        max_shard_size=config.max_shard_size,
    )


@flags_from(RecoverConfig)
def recover(config: RecoverConfig):
    """Recover the fine-tuned weights as raw + diff and check each tensor against the diff's hashes."""
    from alpaca.weights.diffs import recover as recover_weights

    recover_weights(
        config.path_raw,
        config.path_diff,
        config.path_tuned or None,
        device=config.device,
        test_inference=config.test_inference,
        check_integrity_naively=config.check_integrity_naively,
        overwrite=config.overwrite,
        prompt_template=config.prompt_template,
        max_shard_size=config.max_shard_size,
    )


@flags_from(VerifyConfig)
def verify(config: VerifyConfig):
    """Check a recovered model, tensor by tensor, against the SHA-256 recorded when its diff was made."""
    from alpaca.weights.diffs import verify as verify_weights

    verify_weights(config.path_tuned, config.integrity_file or None, device=config.device)


if __name__ == "__main__":
    from alpaca.core.cli import run

    run({"make_diff": make_diff, "recover": recover, "verify": verify}, "weight_diff.py")
