"""Random LoRA adapters for the tiny models."""


def make_random_adapter(
    base_model: str, output_dir, target_modules=("q_proj", "v_proj"), seed: int = 1, b_scale: float = 1.0
) -> str:
    """Save a LoRA adapter with random, non-zero A and B, so it visibly changes the model (B times
    `b_scale`, to make a small update)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_model)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=list(target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    if b_scale != 1.0:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:
                    param.mul_(b_scale)
    peft_model.save_pretrained(str(output_dir))
    return str(output_dir)
