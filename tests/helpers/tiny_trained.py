"""A tiny LoRA adapter trained (a plain torch loop, about a second) to give known answers.

Tests can then check real content: the demo answering "Tell me about alpacas." with the trained
sentence shows that the prompt, the adapter, EOS and response extraction all work end to end.
"""

from pathlib import Path

# (instruction, input, answer): two of the README's example instructions and one with an input.
TRAINED_ANSWERS = [
    ("Tell me about alpacas.", "", "Alpacas are soft, friendly camelids from the Andes."),
    ("Tell me five words that rhyme with 'shock'.", "", "Flock, lock, rock, stock, and sock."),
    (
        "Translate the sentence into Spanish.",
        "I have no mouth but I must scream",
        "No tengo boca pero debo gritar.",
    ),
]


def train_tiny_adapter(base_model: str, output_dir, steps: int = 150, seed: int = 0) -> str:
    """Train LoRA (all linear layers) on `TRAINED_ANSWERS` until memorized; reuse `output_dir` if done."""
    output_dir = Path(output_dir)
    if (output_dir / "adapter_config.json").is_file():
        return str(output_dir)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alpaca.core.prompter import Prompter
    from alpaca.modeling import load_tokenizer

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
    # The random base's logits are nearly flat, so the loss stays high long after the answers are
    # the argmax; stop a few steps after every answer token is predicted (teacher forcing), which
    # leaves a margin for greedy decoding with a KV cache.
    extra_steps = None
    for _ in range(steps):
        all_predicted = True
        for ids, labels in examples:
            output = model(input_ids=ids, labels=labels)
            output.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            answer = labels[0, 1:] != -100
            predicted = output.logits[0, :-1].argmax(-1)[answer]
            all_predicted &= bool((predicted == labels[0, 1:][answer]).all())
        if extra_steps is None and all_predicted:
            extra_steps = 10
        if extra_steps is not None:
            extra_steps -= 1
            if extra_steps == 0:
                break
    else:
        raise AssertionError(f"the tiny adapter did not learn its answers in {steps} steps")
    model.save_pretrained(str(output_dir))
    return str(output_dir)
