"""A tiny LoRA adapter trained (a plain torch loop, about a second) to give known answers.

Tests can then check real content: the demo answering "Tell me about alpacas." with the trained
sentence shows that the prompt, the adapter, EOS and response extraction all work end to end.
"""

from pathlib import Path

# (instruction, input, answer): two of the README's example instructions and one with an input.
TRAINED_ANSWERS = [
    ("Tell me about alpacas.", "", "Alpacas are soft, friendly camelids from the Andes."),
    ("Tell me five words that rhyme with 'shock'.", "", "Flock, lock, rock, stock, and sock."),
    ("Translate the sentence into Spanish.", "I have no mouth but I must scream", "No tengo boca pero debo gritar."),
]


def train_tiny_adapter(base_model: str, output_dir, steps: int = 60, seed: int = 0) -> str:
    """Train LoRA (all linear layers) on `TRAINED_ANSWERS` until memorized; reuse `output_dir` if done."""
    output_dir = Path(output_dir)
    if (output_dir / "adapter_config.json").is_file():
        return str(output_dir)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alpaca.modeling import load_tokenizer
    from alpaca.prompter import Prompter

    torch.manual_seed(seed)
    tokenizer = load_tokenizer(base_model)
    prompter = Prompter("alpaca")
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"),
    )
    examples = []
    for instruction, input, answer in TRAINED_ANSWERS:
        prompt = prompter.generate_prompt(instruction, input)
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + answer)["input_ids"] + [tokenizer.eos_token_id]
        labels = [-100] * len(prompt_ids) + ids[len(prompt_ids) :]
        examples.append((torch.tensor([ids]), torch.tensor([labels])))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        total = 0.0
        for ids, labels in examples:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            total += loss.item()
        print(_, total / len(examples))
        if total / len(examples) < 0.01:
            break
    model.save_pretrained(str(output_dir))
    return str(output_dir)
