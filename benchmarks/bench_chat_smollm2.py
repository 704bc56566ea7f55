"""A chat LoRA on SmolLM2-135M-Instruct in its own chat template: what it changes, measured.

    python benchmarks/bench_chat_smollm2.py [--max_new_tokens=128] [--precision=auto]

1. data/chat_sample.jsonl split like the demo: every 8th conversation held out, the rest trained.
2. finetune.py --config=configs/smollm2_chat.yaml (a real subprocess) on the training conversations.
3. Before (the base model) and after (base + adapter), on the held-out conversations:
   - the loss on assistant tokens (each reply and its <|im_end|>), as training computes it
     (`evaluate.py loss`);
   - greedy replies to each held-out conversation's last user turn, without stop strings: how many end
     at <|im_end|> by themselves within --max_new_tokens.
Prints a table and writes bench-chat-output/chat_figures.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def split(records: list[dict], every: int = 8) -> tuple[list[dict], list[dict]]:
    held = [r for i, r in enumerate(records) if i % every == every - 1]
    return [r for i, r in enumerate(records) if i % every != every - 1], held


def replies_end_at_end_of_turn(
    model, tokenizer, template: str, conversations: list[list[dict]], max_new_tokens: int
):
    """(ended, total, replies): greedy replies to each conversation's last user turn."""
    import torch

    from alpaca.core.chat import encode_rendered, end_of_turn_ids, render

    ends = sorted(end_of_turn_ids(tokenizer))
    ended, replies = 0, []
    for messages in conversations:
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        ids = encode_rendered(tokenizer, render(template, messages[: last_user + 1], tokenizer, True))
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=ends,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, len(ids) :].tolist()
        stopped = any(token in ends for token in new)
        ended += stopped
        replies.append({"reply": tokenizer.decode(new, skip_special_tokens=True), "ended": stopped})
    return ended, len(conversations), replies


def main(max_new_tokens: int = 128, precision: str = "auto", output_dir: str = "bench-chat-output") -> dict:
    import torch

    from alpaca.core.chat import conversation_messages, read_training_format, resolve_chat_template
    from alpaca.default_model import default_model_folder
    from alpaca.evaluation.loss import held_out_loss
    from alpaca.finetune.data import load_records
    from alpaca.modeling import cpu_has_native_bf16, load_adapter, load_base_model, load_tokenizer

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = str(default_model_folder())
    records = load_records(str(REPO / "data" / "chat_sample.jsonl"))
    train, held = split(records)
    (out / "train.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in train) + "\n")
    (out / "held_out.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in held) + "\n")
    if precision == "auto":
        precision = "bf16" if cpu_has_native_bf16() else "fp32"
    adapter = out / "adapter"
    command = [
        sys.executable,
        str(REPO / "finetune.py"),
        f"--config={REPO / 'configs' / 'smollm2_chat.yaml'}",
        f"--base_model={base}",
        f"--data_path={out / 'train.jsonl'}",
        f"--output_dir={adapter}",
        f"--precision={precision}",
        "--overwrite",
    ]
    print("$ " + " ".join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True, cwd=REPO)
    train_s = time.time() - start
    held_path = str(out / "held_out.jsonl")
    before = held_out_loss(base, "", held_path, cutoff_len=512)
    after = held_out_loss(base, str(adapter), held_path, cutoff_len=512)
    conversations = [conversation_messages(r, i, "held out") for i, r in enumerate(held)]
    model = load_base_model(base, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(base)
    template = resolve_chat_template("tokenizer", tokenizer)
    assert read_training_format(str(adapter)).chat_template == template
    ended_before, total, replies_before = replies_end_at_end_of_turn(
        model, tokenizer, template, conversations, max_new_tokens
    )
    tuned = load_adapter(model, str(adapter)).eval()
    ended_after, _, replies_after = replies_end_at_end_of_turn(
        tuned, tokenizer, template, conversations, max_new_tokens
    )
    figures = {
        "held_out_conversations": total,
        "train_conversations": len(train),
        "precision": precision,
        "train_seconds": round(train_s, 1),
        "loss_before": round(before.loss, 4),
        "loss_after": round(after.loss, 4),
        "assistant_tokens": after.tokens,
        "ended_at_im_end_before": ended_before,
        "ended_at_im_end_after": ended_after,
        "max_new_tokens": max_new_tokens,
        "replies_before": replies_before,
        "replies_after": replies_after,
    }
    (out / "chat_figures.json").write_text(json.dumps(figures, indent=2, ensure_ascii=False))
    print(f"held-out assistant-token loss: {before.loss:.3f} -> {after.loss:.3f} ({after.tokens} tokens)")
    print(
        f"replies ending at <|im_end|> within {max_new_tokens} tokens: {ended_before}/{total} -> {ended_after}/{total}"
    )
    print(f"training: {train_s:.0f} s ({precision})")
    return figures


if __name__ == "__main__":
    import fire

    fire.Fire(main, serialize=lambda _: None)
