"""Padding-free packing: exact against unpadded batches, refused where a model would mix examples."""

import json

import pytest
import torch
from helpers.finetune_runs import SAMPLE_DATA, logged_losses, run_finetune_fast

from alpaca.finetune.data import IGNORE_INDEX, PaddingCollator, tokenize_example
from alpaca.finetune.packing import PackingCollator, check_packing_supported, packing_leak


@pytest.fixture(scope="module")
def features(tiny_llama):
    """Six real examples of different lengths (some with an input field), prompt masked or not."""
    from alpaca.core.prompter import Prompter
    from alpaca.modeling import load_tokenizer

    tokenizer, prompter = load_tokenizer(tiny_llama), Prompter("alpaca")
    records = json.loads(SAMPLE_DATA.read_text())[:6]
    return {
        train_on_inputs: [tokenize_example(r, tokenizer, prompter, 96, train_on_inputs) for r in records]
        for train_on_inputs in (True, False)
    }


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_llama):
    """A tiny GPT-2 (learned absolute positions, like OPT) built locally: packing works for it."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(tiny_llama))
    config = GPT2Config(
        vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config).eval()  # eval: dropout off, like from_pretrained


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


def unpacked_reference(model, features):
    """Right-padded batch with an attention mask: per-example logits and the token-weighted mean loss."""
    batch = PaddingCollator(pad_token_id=0)(features)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    token_losses = torch.nn.functional.cross_entropy(
        logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum"
    )
    loss = token_losses / (targets != IGNORE_INDEX).sum()
    return [logits[i, : len(f["input_ids"])] for i, f in enumerate(features)], loss


def packed_forward(model, features):
    batch = PackingCollator()(features)
    with torch.no_grad():
        out = model(**batch)
    lengths = [len(f["input_ids"]) for f in features]
    return list(out.logits[0].split(lengths)), out.loss


def test_collator_builds_one_row_with_restarting_positions_and_masked_first_labels():
    features = [
        {"input_ids": [1, 5, 6, 2], "labels": [1, 5, 6, 2]},
        {"input_ids": [1, 7, 2], "labels": [IGNORE_INDEX, 7, 2]},
        {"input_ids": [1, 8, 9, 10, 2], "labels": [IGNORE_INDEX, IGNORE_INDEX, 9, 10, 2]},
    ]
    batch = PackingCollator()(features)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 1, 7, 2, 1, 8, 9, 10, 2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["labels"].tolist() == [[-100, 5, 6, 2, -100, 7, 2, -100, -100, 9, 10, 2]]
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 4, 7, 12]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 5
    assert batch["use_cache"] is False
    assert "attention_mask" not in batch  # a mask would switch off transformers' packed-sequence detection


@pytest.mark.parametrize("train_on_inputs", [True, False])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_packed_equals_unpacked(arch, train_on_inputs, features, tiny_llama, tiny_gpt2):
    model = load(tiny_llama) if arch == "llama" else tiny_gpt2
    examples = features[train_on_inputs]
    assert len({len(f["input_ids"]) for f in examples}) > 3  # the padded batch really pads
    ref_logits, ref_loss = unpacked_reference(model, examples)
    logits, loss = packed_forward(model, examples)
    # Same logits per example: no example attends to another, positions restart.
    for i, (packed, unpacked) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(packed, unpacked, rtol=0, atol=1e-5, msg=f"example {i}")
    # Same loss: the token-weighted mean over every example's predicted labels.
    assert abs(loss.item() - ref_loss.item()) < 1e-5, (loss.item(), ref_loss.item())
    check_packing_supported(model)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_llama_attention_implementations_keep_examples_apart(attn_implementation, tiny_llama, features):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn_implementation)
    assert packing_leak(model) == 0.0
    examples = features[False]
    ref_logits, ref_loss = unpacked_reference(model, examples)
    logits, loss = packed_forward(model, examples)
    torch.testing.assert_close(torch.cat(logits), torch.cat(ref_logits), rtol=0, atol=1e-5)
    assert abs(loss.item() - ref_loss.item()) < 1e-5


def test_opt_is_refused_because_its_packed_examples_really_mix(tiny_opt, features):
    model = load(tiny_opt)
    # The refusal is not a false alarm: OPT's mask ignores position_ids, so later examples see earlier ones.
    examples = features[True]
    ref_logits, _ = unpacked_reference(model, examples)
    logits, _ = packed_forward(model, examples)
    torch.testing.assert_close(logits[0], ref_logits[0], rtol=0, atol=1e-5)  # nothing before it to see
    assert (logits[1] - ref_logits[1]).abs().max() > 1e-2
    model.train()  # as the Trainer will hold it; the probe must run in eval mode and give it back
    with pytest.raises(
        ValueError, match=r"--packing is not supported for model type 'opt'.*attend to one another"
    ):
        check_packing_supported(model)
    assert model.training  # the probe restores training mode


def test_alibi_model_without_position_ids_is_refused():
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=300, hidden_size=64, n_layer=2, n_head=4, attn_implementation="eager")
    with pytest.raises(ValueError, match="model type 'bloom'"):
        check_packing_supported(BloomForCausalLM(config).to(torch.bfloat16))


def run(base, data, out, **overrides):
    # dropout masks depend on tensor shapes; without it both runs compute the same thing
    return run_finetune_fast(base, data, out, **{"lora_dropout": 0.0, "max_steps": 6, **overrides})


def losses(out):
    return [loss for _, loss in logged_losses(out)]


def test_packed_training_follows_the_unpacked_run(tiny_llama, small_data, tmp_path):
    run(tiny_llama, small_data, tmp_path / "padded")
    metrics = run(tiny_llama, small_data, tmp_path / "packed", packing=True)
    assert metrics["global_step"] == 6
    padded, packed = losses(tmp_path / "padded"), losses(tmp_path / "packed")
    assert len(packed) == 6 and packed[-1] < packed[0] - 0.05, packed
    # Same examples per step, same loss: the two runs train the same adapter, step for step.
    assert packed == pytest.approx(padded, abs=1e-4), (packed, padded)
    assert json.loads((tmp_path / "packed" / "run_config.json").read_text())["packing"] is True


def test_packing_an_unsupported_model_fails_before_training(tiny_opt, small_data, tmp_path):
    with pytest.raises(ValueError, match="model type 'opt'"):
        run(tiny_opt, small_data, tmp_path / "opt", packing=True)
    assert not (tmp_path / "opt" / "adapter_model.safetensors").exists()
    assert not list((tmp_path / "opt").glob("checkpoint-*"))
