"""The training modes the tiny models cannot vouch for, a few steps each on the real SmolLM2-135M:
full fine-tuning, padding-free packing and 4-bit (QLoRA) loading. Each trains on the same 4 examples
every step, so the loss must fall, and each saved output must load and change the model."""

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.realmodel

# one micro-batch of the same 4 short examples per step: the loss falls unless training is broken
FAST = dict(batch_size=4, micro_batch_size=4, cutoff_len=80, max_steps=3, lora_dropout=0.0)


@pytest.fixture(scope="module")
def four_examples(tmp_path_factory, sample_subset):
    return sample_subset(tmp_path_factory.mktemp("real-data") / "d.json", 4)


def assert_loss_falls(losses):
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
    assert losses[-1] < losses[0], losses


def logits(model, text="### Instruction:\nName a color.\n\n### Response:\n", tokenizer_dir=None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    with torch.no_grad():
        return model(**tokenizer(text, return_tensors="pt")).logits


def test_full_finetune_real_model(smollm2, four_examples, finetune_fast, loss_log, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    finetune_fast(smollm2, four_examples, out, use_lora=False, learning_rate=5e-5, **FAST)
    assert_loss_falls([loss for _, loss in loss_log(out)])
    tuned = AutoModelForCausalLM.from_pretrained(str(out))
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    after, before = logits(tuned, tokenizer_dir=str(out)), logits(base, tokenizer_dir=smollm2)
    assert torch.isfinite(after).all()
    width = before.shape[-1]  # the tuned model may have gained a [PAD] row
    assert (after[..., :width] - before).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["packing", "4bit"])
def test_lora_modes_real_model(mode, smollm2, four_examples, finetune_fast, loss_log, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / mode
    flags = {"packing": True} if mode == "packing" else {"load_in_4bit": True}
    finetune_fast(smollm2, four_examples, out, learning_rate=2e-3, **FAST, **flags)
    assert_loss_falls([loss for _, loss in loss_log(out)])
    config = json.loads((out / "run_config.json").read_text())
    assert config["packing"] is (mode == "packing") and config["load_in_4bit"] is (mode == "4bit")
    base = AutoModelForCausalLM.from_pretrained(smollm2)
    before = logits(base, tokenizer_dir=smollm2)
    after = logits(PeftModel.from_pretrained(base, str(out)), tokenizer_dir=str(out))
    assert torch.isfinite(after).all() and (after - before).abs().max() > 1e-2
    assert Path(out / "adapter_model.safetensors").stat().st_size > 100_000
