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

from alpaca.weights.files import DEFAULT_MAX_SHARD_SIZE  # a constant; torch is imported only when run


def make_diff(
    path_raw: str,
    path_tuned: str,
    path_diff: str,
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
):
    """Write the weight diff tuned - raw (fp32) with the tuned tokenizer and per-tensor hashes.

    Args:
        path_raw: the raw (base) model folder, hub id or .gguf file.
        path_tuned: the fine-tuned model folder.
        path_diff: folder to write the diff into; must be empty or absent unless --overwrite.
        device: where to do the arithmetic (cpu, cuda, ...).
        overwrite: replace an existing non-empty path_diff (only once the new diff is complete).
        max_shard_size: largest safetensors file to write (5GB, 500MB, ...); save_pretrained's default.
    """
    from alpaca.weights.diffs import make_diff as make

    make(path_raw, path_tuned, path_diff, device=device, overwrite=overwrite, max_shard_size=max_shard_size)


def recover(
    path_raw: str,
    path_diff: str,
    path_tuned: str = "",
    device: str = "cpu",
    test_inference: bool = True,
    check_integrity_naively: bool = True,
    overwrite: bool = False,
    prompt_template: str = "alpaca_legacy",
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE,
):
    """Recover the fine-tuned weights as raw + diff and check each tensor against the diff's hashes.

    Args:
        path_raw: the raw (base) model folder, hub id or .gguf file the diff was made against.
        path_diff: the weight diff folder.
        path_tuned: folder to save the recovered model and tokenizer into (optional, as upstream).
        device: where to do the arithmetic (cpu, cuda, ...).
        test_inference: generate from a fixed instruction afterwards (in --prompt_template) and print it.
        check_integrity_naively: also check the sum of all parameters against the sum recorded in the
            diff, or Alpaca-7B's 50637.1836 for diffs that record none (upstream's check).
        overwrite: replace an existing non-empty path_tuned (only once the recovered model has passed
            its checks).
        prompt_template: the template of the smoke-test prompt: alpaca_legacy (Stanford's training prompt),
            alpaca, or a template file.
        max_shard_size: largest safetensors file to write (5GB, 500MB, ...); save_pretrained's default.
    """
    from alpaca.weights.diffs import recover as recover_weights

    recover_weights(
        path_raw,
        path_diff,
        path_tuned or None,
        device=device,
        test_inference=test_inference,
        check_integrity_naively=check_integrity_naively,
        overwrite=overwrite,
        prompt_template=prompt_template,
        max_shard_size=max_shard_size,
    )


def verify(path_tuned: str, integrity_file: str = "", device: str = "cpu"):
    """Check a recovered model, tensor by tensor, against the SHA-256 recorded when its diff was made.

    Args:
        path_tuned: the recovered model folder (recover writes weight_diff_integrity.json into it).
        integrity_file: the integrity record to check against; default PATH_TUNED/weight_diff_integrity.json.
        device: where to load the model (cpu, cuda, ...).
    """
    from alpaca.weights.diffs import verify as verify_weights

    verify_weights(path_tuned, integrity_file or None, device=device)


if __name__ == "__main__":
    from alpaca.core.cli import run

    run({"make_diff": make_diff, "recover": recover, "verify": verify}, "weight_diff.py")
