"""Make and apply weight diffs (Stanford Alpaca's format, plus per-tensor SHA-256 integrity).

    python weight_diff.py make_diff --path_raw=<raw llama> --path_tuned=<fine-tuned> --path_diff=<out>
    python weight_diff.py recover --path_raw=<raw llama> --path_diff=<diff> --path_tuned=<out>

Diffs are `tuned - raw` in fp32, so Stanford's published Alpaca-7B diff recovers with this script.
This script imports neither the training code nor the OpenAI client.
"""


def make_diff(path_raw: str, path_tuned: str, path_diff: str, device: str = "cpu", overwrite: bool = False):
    """Write the weight diff tuned - raw (fp32) with the tuned tokenizer and per-tensor hashes.

    Args:
        path_raw: the raw (base) model folder or hub id.
        path_tuned: the fine-tuned model folder.
        path_diff: folder to write the diff into; must be empty or absent unless --overwrite.
        device: where to do the arithmetic (cpu, cuda, ...).
        overwrite: replace the contents of an existing non-empty path_diff.
    """
    from alpaca.weights import make_diff as make

    make(path_raw, path_tuned, path_diff, device=device, overwrite=overwrite)


def recover(
    path_raw: str,
    path_diff: str,
    path_tuned: str = "",
    device: str = "cpu",
    test_inference: bool = True,
    check_integrity_naively: bool = True,
    overwrite: bool = False,
):
    """Recover the fine-tuned weights as raw + diff and check each tensor against the diff's hashes.

    Args:
        path_raw: the raw (base) model folder or hub id the diff was made against.
        path_diff: the weight diff folder.
        path_tuned: folder to save the recovered model and tokenizer into (optional, as upstream).
        device: where to do the arithmetic (cpu, cuda, ...).
        test_inference: generate from a fixed Alpaca prompt afterwards and print it.
        check_integrity_naively: also check the sum of all parameters against the sum recorded in the
            diff, or Alpaca-7B's 50637.1836 for diffs that record none (upstream's check).
        overwrite: replace the contents of an existing non-empty path_tuned.
    """
    from alpaca.weights import recover as recover_weights

    recover_weights(
        path_raw,
        path_diff,
        path_tuned or None,
        device=device,
        test_inference=test_inference,
        check_integrity_naively=check_integrity_naively,
        overwrite=overwrite,
    )


if __name__ == "__main__":
    from alpaca.cli import run

    run({"make_diff": make_diff, "recover": recover}, "weight_diff.py")
