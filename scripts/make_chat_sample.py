"""Write data/chat_sample.jsonl: multi-turn conversations built from data/alpaca_sample.json.

    python scripts/make_chat_sample.py

The records are taken in order and grouped into conversations of 1, 2 and 3 exchanges (cycling); each
user turn is a record's instruction, followed by its input after a blank line; each assistant turn is
its output. Every third conversation opens with a system message, and every fourth is written in
ShareGPT form (`conversations`, `from`: human / gpt / system, `value`) instead of OpenAI form
(`messages`, `role`, `content`), so both readers are exercised by the same file.
"""

from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SYSTEM_PROMPTS = (
    "You are a helpful assistant. Answer clearly and briefly.",
    "You are a patient tutor who explains each step.",
    "Reply in plain English without lists unless asked.",
)
SHAREGPT = {"system": "system", "user": "human", "assistant": "gpt"}


def conversations(records: list[dict]) -> list[dict]:
    out, start, index = [], 0, 0
    while start < len(records):
        size = (1, 2, 3)[index % 3]
        group = records[start : start + size]
        messages = []
        if index % 3 == 2:
            messages.append({"role": "system", "content": SYSTEM_PROMPTS[(index // 3) % len(SYSTEM_PROMPTS)]})
        for record in group:
            user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
            messages += [
                {"role": "user", "content": user},
                {"role": "assistant", "content": record["output"]},
            ]
        if index % 4 == 3:
            out.append(
                {"conversations": [{"from": SHAREGPT[m["role"]], "value": m["content"]} for m in messages]}
            )
        else:
            out.append({"messages": messages})
        start, index = start + size, index + 1
    return out


def main() -> None:
    records = json.loads((REPO / "data" / "alpaca_sample.json").read_text(encoding="utf-8"))
    lines = [json.dumps(conversation, ensure_ascii=False) for conversation in conversations(records)]
    (REPO / "data" / "chat_sample.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} conversations to data/chat_sample.jsonl")


if __name__ == "__main__":
    main()
