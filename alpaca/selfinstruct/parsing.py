"""Turn a model reply into instruction / input / output candidates, as upstream did."""

import re
from dataclasses import dataclass, field

from alpaca.selfinstruct.filters import rejection_reason
from alpaca.selfinstruct.prompts import NO_INPUT


@dataclass
class ParsedReply:
    """The candidates found in one reply and what was dropped on the way.

    Attributes:
        candidates: records (``instruction``, ``input``, ``output``) that passed the heuristic filters.
        items: items found after splitting on ``###`` (including dropped ones).
        truncated: 1 when the last item was dropped because the reply hit the length limit.
        malformed: items without exactly one Instruction / Input / Output header each.
        rejected: rejections by filter name (see ``filters.FILTER_NAMES``).
    """

    candidates: list[dict] = field(default_factory=list)
    items: int = 0
    truncated: int = 0
    malformed: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


def _strip_repeated_header(text: str, first_number: int) -> str:
    """Chat models often restate ``###`` / ``N+1. Instruction:`` before the text; completions never do."""
    stripped = text.lstrip()
    if stripped.startswith("###"):
        stripped = stripped[3:].lstrip()
    match = re.match(rf"{first_number}\.\s+Instruction:", stripped)
    return stripped[match.end() :] if match else text


def parse_reply(
    text: str,
    finish_reason: str | None,
    num_prompt_instructions: int,
    chat: bool,
    tokenizer: str = "rouge_score",
) -> ParsedReply:
    """Split a reply into candidates, upstream's ``post_process_gpt3_response`` step by step.

    Args:
        text: the reply text (the continuation after ``N+1. Instruction:``).
        finish_reason: ``"length"`` when the reply was cut by ``max_tokens``.
        num_prompt_instructions: N, the number of examples in the prompt.
        chat: the reply came from the chat endpoint (a restated first header is tolerated).
        tokenizer: how the length filters count words (``filters.rejection_reason``).
    """
    parsed = ParsedReply()
    first_number = num_prompt_instructions + 1
    if chat:
        text = _strip_repeated_header(text, first_number)
    items = re.split("###", f"{first_number}. Instruction:" + text)
    parsed.items = len(items)
    for position, item in enumerate(items):
        # The last item of a reply cut by the length limit is probably incomplete.
        if position == len(items) - 1 and finish_reason == "length":
            parsed.truncated += 1
            continue
        number = position + first_number
        parts = re.split(rf"{number}\.\s+(Instruction|Input|Output):", item)
        # Upstream only counted the parts; also requiring the headers in order keeps a reply with
        # Input before Instruction from being read with its fields swapped.
        if len(parts) != 7 or parts[1::2] != ["Instruction", "Input", "Output"]:
            parsed.malformed += 1
            continue
        instruction = parts[2].strip()
        task_input = parts[4].strip()
        task_input = "" if task_input.lower() == NO_INPUT else task_input
        output = parts[6].strip()
        reason = rejection_reason(instruction, tokenizer)
        if reason is not None:
            parsed.rejected[reason] = parsed.rejected.get(reason, 0) + 1
            continue
        parsed.candidates.append({"instruction": instruction, "input": task_input, "output": output})
    return parsed
