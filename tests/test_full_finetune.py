"""Full fine-tuning (Stanford Alpaca's recipe) through finetune.py's entry function."""

import json

import pytest
import torch
from helpers.finetune_runs import SAMPLE_DATA

import finetune
from alpaca.core.prompter import Prompter
from alpaca.finetune.data import IGNORE_INDEX, load_records, tokenize_example
from alpaca.finetune.resolve import resolve_config
from alpaca.modeling import PAD_TOKEN, load_tokenizer, resize_embeddings_for_new_tokens


def stanford_labels(record, tokenizer, max_length):
    """Stanford's train.py rule, rewritten: tokenize source and source+target separately, mask the
    first len(source) tokens of the example."""
    prompter = Prompter("alpaca_legacy")
    source = prompter.generate_prompt(record["instruction"], record.get("input"))
    target = f"{record['output']}{tokenizer.eos_token}"
    example_ids = tokenizer(source + target, max_length=max_length, truncation=True)["input_ids"]
    source_len = len(tokenizer(source, max_length=max_length, truncation=True)["input_ids"])
    labels = list(example_ids)
    labels[:source_len] = [IGNORE_INDEX] * source_len
    return example_ids, labels


def test_labels_match_stanford_exactly(tiny_llama):
    tokenizer = load_tokenizer(tiny_llama, add_pad_token=True)
    prompter = Prompter("alpaca_legacy")
    for record in load_records(str(SAMPLE_DATA)):
        ours = tokenize_example(record, tokenizer, prompter, cutoff_len=512, train_on_inputs=False)
        ids, labels = stanford_labels(record, tokenizer, 512)
        assert ours["input_ids"] == ids, record["instruction"]
        assert ours["labels"] == labels, record["instruction"]
        kept = [t for t in labels if t != IGNORE_INDEX]
        assert tokenizer.decode(kept) == record["output"] + tokenizer.eos_token


def test_pad_token_added_with_mean_initialised_rows(tiny_llama):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(tiny_llama, add_pad_token=True)
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == 2000
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    old_in = model.get_input_embeddings().weight.detach().clone()
    old_out = model.get_output_embeddings().weight.detach().clone()
    assert resize_embeddings_for_new_tokens(model, tokenizer) == 1
    new_in = model.get_input_embeddings().weight
    new_out = model.get_output_embeddings().weight
    assert new_in.shape[0] == new_out.shape[0] == 2001
    torch.testing.assert_close(new_in[-1], old_in.mean(0))
    torch.testing.assert_close(new_out[-1], old_out.mean(0))
    torch.testing.assert_close(new_in[:-1], old_in)  # existing rows untouched


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_full_finetune_learns_saves_and_reloads(arch, tiny_llama, tiny_opt, small_data_24, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tiny_llama if arch == "llama" else tiny_opt
    out = tmp_path / "full"
    metrics = finetune.train(
        base_model=base,
        data_path=small_data_24,
        output_dir=str(out),
        use_lora=False,
        batch_size=8,
        micro_batch_size=4,
        max_steps=8,
        cutoff_len=128,
        learning_rate=3e-3,
        warmup_steps=0,
        logging_steps=1,
        save_steps=100,
    )
    assert metrics["global_step"] == 8
    history = json.loads((out / "loss_history.json").read_text())
    losses = [e["loss"] for e in history if "loss" in e]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses

    model = AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.pad_token == PAD_TOKEN and len(tokenizer) == model.get_input_embeddings().weight.shape[0]
    original = AutoModelForCausalLM.from_pretrained(base)
    changed = [
        name
        for name, p in original.named_parameters()
        if not torch.equal(p, model.state_dict()[name][: p.shape[0]])
    ]
    assert len(changed) == len(list(original.parameters()))  # every weight trained

    config = json.loads((out / "run_config.json").read_text())
    assert config["use_lora"] is False
    assert config["sources"]["learning_rate"] == "flag"
    assert config["sources"]["lr_scheduler_type"] == "default (Stanford Alpaca recipe)"
    assert config["lr_scheduler_type"] == "cosine" and config["train_on_inputs"] is False
    assert config["val_set_size"] == 0 and config["cutoff_len"] == 128


def test_stanford_recipe_defaults():
    config = resolve_config(
        {"base_model": "x/y", "use_lora": False, "data_path": "d.json", "output_dir": "o"}, {}
    )
    assert (config.batch_size, config.learning_rate, config.num_epochs, config.cutoff_len) == (
        128,
        2e-5,
        3,
        512,
    )
    assert (config.weight_decay, config.warmup_steps, config.lr_scheduler_type) == (0.0, 0.03, "cosine")
    assert config.train_on_inputs is False and config.val_set_size == 0
    assert config.sources["learning_rate"] == "default (Stanford Alpaca recipe)"
    lora = resolve_config({"base_model": "x/y", "data_path": "d.json", "output_dir": "o"}, {})
    assert (lora.batch_size, lora.learning_rate, lora.cutoff_len, lora.val_set_size) == (128, 3e-4, 256, 2000)
    assert lora.train_on_inputs is True and lora.warmup_steps == 100


def test_stanford_command_flags_map_to_ours(tiny_llama, small_data_24, tmp_path, capsys):
    """The flags of Stanford's README command (train.py replaced by finetune.py --use_lora=False)."""
    out = tmp_path / "stanford"
    finetune.train(
        use_lora=False,
        output_dir=str(out),
        data_path=small_data_24,
        max_steps=2,
        **{
            "model_name_or_path": tiny_llama,
            "bf16": True,
            "num_train_epochs": 3,
            "per_device_train_batch_size": 4,
            "per_device_eval_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "evaluation_strategy": "no",
            "save_strategy": "steps",
            "save_steps": 2000,
            "save_total_limit": 1,
            "learning_rate": 2e-5,
            "weight_decay": 0.0,
            "warmup_ratio": 0.03,
            "lr_scheduler_type": "cosine",
            "logging_steps": 1,
            "fsdp": "full_shard auto_wrap",
            "fsdp_transformer_layer_cls_to_wrap": "LlamaDecoderLayer",
            "tf32": True,
            "model_max_length": 128,
        },
    )
    printed = capsys.readouterr().out
    from alpaca.modeling import cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16()
    if native_bf16:
        assert "bf16 autocast on the CPU" in printed
    else:
        assert "training in fp32" in printed
    assert "--evaluation_strategy is now --eval_strategy" in printed
    assert "--fsdp needs several processes" in printed
    config = json.loads((out / "run_config.json").read_text())
    assert (
        config["base_model"] == tiny_llama and config["sources"]["base_model"] == "flag --model_name_or_path"
    )
    assert config["cutoff_len"] == 128 and config["micro_batch_size"] == 4 and config["batch_size"] == 8
    assert config["warmup_steps"] == 0.03 and config["num_epochs"] == 3
    assert config["precision_resolved"] == ("bf16" if native_bf16 else "fp32")
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "flags, extra, message",
    [
        ({"base_model": "a/b"}, {"model_name_or_path": "c/d"}, "conflicts with --base_model"),
        ({"cutoff_len": 256}, {"model_max_length": 512}, "conflicts with --cutoff_len"),
        ({"warmup_steps": 10}, {"warmup_ratio": 0.03}, "conflicts with --warmup_steps"),
        (
            {"batch_size": 64},
            {"gradient_accumulation_steps": 8, "per_device_train_batch_size": 4},
            "global batch of 32",
        ),
        ({"use_lora": False}, {"deepspeed": "configs/missing.json"}, "no such config file"),
        ({"load_in_4bit": True}, {"fsdp": "full_shard"}, "--fsdp with a quantized"),
        ({"use_lora": False}, {"deepspeed": "configs/ds_zero3_offload.json"}, "needs the deepspeed package"),
        ({"wandb_project": "alpaca"}, {}, "needs the wandb package"),
    ],
)
def test_conflicting_and_bad_flags(flags, extra, message, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    # as on a machine without the optional packages, whatever this one has installed
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("deepspeed", "wandb") else real_find_spec(name, *a),
    )
    base = {"base_model": "a/b", "data_path": "d.json", "output_dir": "o"}
    base.update(flags)
    with pytest.raises(ValueError, match=message):
        resolve_config(base, extra)


def test_wrong_fsdp_wrap_class_fails_before_loading(tiny_opt, small_data_24, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # configure_fsdp only keeps FSDP for several ranks
    import alpaca.finetune.run as training

    loaded = []
    monkeypatch.setattr(training, "prepare_tokenizer_and_model", lambda *a, **k: loaded.append(1))
    with pytest.raises(
        ValueError,
        match=r"OPTForCausalLM has no such layer class; its decoder layer is \['OPTDecoderLayer'\]",
    ):
        finetune.train(
            base_model=tiny_opt,
            data_path=small_data_24,
            output_dir=str(tmp_path / "x"),
            use_lora=False,
            batch_size=8,
            fsdp="full_shard auto_wrap",
            fsdp_transformer_layer_cls_to_wrap="LlamaDecoderLayer",
        )
    assert not loaded


def test_fsdp_wrap_class_defaults_to_the_decoder_layer(tiny_opt, monkeypatch):
    from alpaca.finetune.distributed import configure_fsdp

    monkeypatch.setenv("WORLD_SIZE", "2")
    config = resolve_config(
        {
            "base_model": tiny_opt,
            "use_lora": False,
            "data_path": "d.json",
            "output_dir": "o",
            "batch_size": 8,
        },
        {"fsdp": "full_shard auto_wrap offload"},
    )
    configure_fsdp(config)
    assert config.extra_training_args["fsdp"] is True
    assert config.extra_training_args["fsdp_config"]["transformer_layer_cls_to_wrap"] == ["OPTDecoderLayer"]
    assert config.extra_training_args["fsdp_config"]["cpu_offload"] is True
    assert "OPTForCausalLM" in config.sources["fsdp_transformer_layer_cls_to_wrap"]


def test_world_size_must_divide_the_global_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="not a multiple of micro_batch_size x world size = 4 x 3"):
        resolve_config({"base_model": "a/b", "data_path": "d", "output_dir": "o", "batch_size": 128}, {})


def test_fsdp_config_file_from_configs(tiny_llama, monkeypatch):
    from alpaca.finetune.distributed import configure_fsdp

    monkeypatch.setenv("WORLD_SIZE", "4")
    config = resolve_config(
        {"base_model": tiny_llama, "use_lora": False, "data_path": "d.json", "output_dir": "o"},
        {"fsdp": True, "fsdp_config": "configs/fsdp_full_shard.json"},
    )
    configure_fsdp(config)
    fsdp_config = config.extra_training_args["fsdp_config"]
    assert fsdp_config["version"] == 2 and fsdp_config["transformer_layer_cls_to_wrap"] == [
        "LlamaDecoderLayer"
    ]
    config.extra_training_args.update(fsdp=True, fsdp_config="configs/nope.json")
    with pytest.raises(ValueError, match="nope.json'.*no such file"):
        configure_fsdp(config)
