"""The self-instruct meta-prompt and how seed examples are encoded into a prompt.

This module is the only place the meta-prompt text lives.
"""

import random
import re
from collections.abc import Sequence

# Stanford Alpaca's prompt.txt, with the requirements numbered 1-9 (upstream's file numbered them
# 1, 2, 3, 2, 3, 4, ...). The two typos ("instrucitons", "necssary") are upstream's; they are kept so
# generated data stays comparable with the original 52K.
META_PROMPT = """You are asked to come up with a set of 20 diverse task instructions. These task instructions will be given to a GPT model and we will evaluate the GPT model for completing the instructions.

Here are the requirements:
1. Try not to repeat the verb for each instruction to maximize diversity.
2. The language used for the instruction also should be diverse. For example, you should combine questions with imperative instrucitons.
3. The type of instructions should be diverse. The list should include diverse types of tasks like open-ended generation, classification, editing, etc.
4. A GPT language model should be able to complete the instruction. For example, do not ask the assistant to create any visual or audio output. For another example, do not ask the assistant to wake you up at 5pm or set a reminder because it cannot perform any action.
5. The instructions should be in English.
6. The instructions should be 1 to 2 sentences long. Either an imperative sentence or a question is permitted.
7. You should generate an appropriate input to the instruction. The input field should contain a specific example provided for the instruction. It should involve realistic data and should not contain simple placeholders. The input should provide substantial content to make the instruction challenging but should ideally not exceed 100 words.
8. Not all instructions require input. For example, when a instruction asks about some general information, "what is the highest peak in the world", it is not necssary to provide a specific context. In this case, we simply put "<noinput>" in the input field.
9. The output should be an appropriate response to the instruction and the input. Make sure the output is less than 100 words.

List of 20 tasks:"""

# Chat models answer a message instead of continuing a document; this tells them to continue the
# list in the same format, so the reply parses exactly like a completion would.
CHAT_SYSTEM_MESSAGE = (
    "You continue numbered task lists. Reply only with the continuation of the list in exactly the "
    "same format as the examples (numbered Instruction / Input / Output lines, items separated by ###), "
    "starting with the text of the next instruction."
)

# Upstream stopped before item 20 (its list was ["\n20", "20.", "20."]; the duplicate is dropped
# because some servers reject repeated stop strings).
STOP_SEQUENCES = ("\n20", "20.")

NO_INPUT = "<noinput>"

# A request may use machine-generated examples only from requests at least this many indices
# earlier, and is not sent before those are applied. A fixed lag (not the concurrency) keeps the
# prompts, and so the output, identical for any --max_concurrent_requests.
MACHINE_EXAMPLE_LAG = 64


def encode_prompt(examples: Sequence[dict]) -> str:
    """Encode in-context examples into one self-instruct prompt, ending where item N+1 begins.

    Args:
        examples: dicts with ``instruction``, ``input`` and ``output``.

    Returns:
        The meta-prompt, one ``###`` block per example, and ``###`` plus ``N+1. Instruction:``.
    """
    parts = [META_PROMPT, "\n"]
    for number, example in enumerate(examples, start=1):
        instruction = re.sub(r"\s+", " ", example["instruction"]).strip().rstrip(":")
        task_input = NO_INPUT if example["input"].lower() == "" else example["input"]
        parts.append("###\n")
        parts.append(f"{number}. Instruction: {instruction}\n")
        parts.append(f"{number}. Input:\n{task_input}\n")
        parts.append(f"{number}. Output:\n{example['output']}\n")
    parts.append("###\n")
    parts.append(f"{len(examples) + 1}. Instruction:")
    return "".join(parts)


def request_rng(seed: int, request_index: int) -> random.Random:
    """The random generator of one request: a function of the run seed and the request index only.

    String seeding hashes with SHA-512, so it does not depend on PYTHONHASHSEED or the platform.
    """
    return random.Random(f"selfinstruct:{seed}:{request_index}")


def sample_examples(
    rng: random.Random,
    seed_examples: Sequence[dict],
    machine_examples: Sequence[dict],
    num_prompt_instructions: int,
    num_machine_instructions: int,
) -> list[dict]:
    """Sample the in-context examples of one prompt.

    With ``num_machine_instructions=0`` this is upstream Alpaca: ``num_prompt_instructions`` seed tasks.
    Otherwise up to that many come from machine-generated records, as the original self-instruct did
    (it used 6 human + 2 machine examples), and the rest from the seeds.
    """
    from_machine = min(num_machine_instructions, len(machine_examples))
    examples = rng.sample(list(seed_examples), num_prompt_instructions - from_machine)
    if from_machine:
        examples += rng.sample(list(machine_examples), from_machine)
        rng.shuffle(examples)
    return examples


def chat_messages(prompt: str) -> list[dict]:
    """The chat-completions form of a prompt."""
    return [
        {"role": "system", "content": CHAT_SYSTEM_MESSAGE},
        {"role": "user", "content": prompt},
    ]
