"""Chat formats: conversations in OpenAI or ShareGPT form, the chat template a run trains and serves
with, and the Jinja rendering of an Alpaca prompt template so that an Alpaca-trained model carries its
own format into llama.cpp and Hugging Face chat tools.

`--chat_template` takes:
    ""           no chat template: Alpaca records are formatted with --prompt_template_name (default)
    tokenizer    the tokenizer's own template (`tokenizer.chat_template`, as apply_chat_template uses)
    chatml       the shipped ChatML template (templates/chatml.jinja), for base models that have none
    PATH         a Jinja file

Conversations are rendered with transformers' `apply_chat_template` (its Jinja environment), so a
template behaves here as it does in every Hugging Face tool.
"""

from __future__ import annotations

import json
import string
from dataclasses import asdict, dataclass
from pathlib import Path

from alpaca.core.prompter import TEMPLATES_DIR

SHIPPED_CHAT_TEMPLATES = {"chatml": TEMPLATES_DIR / "chatml.jinja"}
ROLES = ("system", "user", "assistant")
# ShareGPT's `from` names (and the OpenAI names, which some ShareGPT files use)
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
}
# Tokens that end a turn in the common chat formats; the tokenizer's EOS is always one too.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def is_conversation(record) -> bool:
    """Whether a record is a conversation (`messages` or `conversations`) rather than an Alpaca record."""
    return isinstance(record, dict) and ("messages" in record or "conversations" in record)


def conversation_messages(record: dict, index: int, source: str) -> list[dict]:
    """The record's turns as OpenAI messages `[{"role", "content"}]`, checked.

    Raises a ValueError naming the record and the turn: not a list, an unknown role, content that is
    not a non-empty string, no assistant turn, a system message after the first turn.
    """
    where = f"{source!r} record {index}"
    if "messages" in record:
        turns, role_key, content_key, names = record["messages"], "role", "content", {r: r for r in ROLES}
    else:
        turns, role_key, content_key, names = record["conversations"], "from", "value", SHAREGPT_ROLES
    field = "messages" if "messages" in record else "conversations"
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{where}: {field!r} must be a non-empty list of turns")
    messages = []
    for number, turn in enumerate(turns):
        at = f"{where}, turn {number}"
        if not isinstance(turn, dict):
            raise ValueError(
                f"{at} is a {type(turn).__name__}, not an object with {role_key!r} and {content_key!r}"
            )
        role = turn.get(role_key)
        if role not in names:
            raise ValueError(f"{at}: unknown {role_key} {role!r}; use one of {sorted(names)}")
        content = turn.get(content_key)
        if not isinstance(content, str):
            kind = "missing" if content_key not in turn else f"a {type(content).__name__}"
            raise ValueError(f"{at}: {content_key!r} must be a string, not {kind}")
        if not content.strip():
            raise ValueError(f"{at}: {content_key!r} is empty")
        if names[role] == "system" and number > 0:
            raise ValueError(f"{at}: a system message may only be the first turn")
        messages.append({"role": names[role], "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: no assistant turn, so nothing to learn")
    return messages


def alternation_break(messages: list[dict]) -> str | None:
    """Where two user or two assistant turns follow each other (`turn N: two user turns in a row`),
    or None. Many chat templates (Llama 2, Mistral) cannot render such a conversation."""
    previous = None
    for number, message in enumerate(messages):
        role = message["role"]
        if role != "system" and role == previous:
            return f"turn {number}: two {role} turns in a row; merge them or put the other role between"
        previous = role
    return None


def alpaca_record_messages(record: dict) -> list[dict]:
    """An Alpaca record as one user turn (instruction, then the input after a blank line) and one
    assistant turn, for training an instruct model in its own chat format on Alpaca data."""
    user = record["instruction"]
    if record.get("input"):
        user = f"{user}\n\n{record['input']}"
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"] or ""}]


def resolve_chat_template(value: str, tokenizer, flag: str = "--chat_template") -> str:
    """The Jinja source the flag names: the tokenizer's own, a shipped one, or a file."""
    if value == "tokenizer":
        text = getattr(tokenizer, "chat_template", None)
        if isinstance(text, dict):  # several named templates: the default one
            text = text.get("default")
        if not text:
            raise ValueError(
                f"{flag}=tokenizer: this tokenizer has no chat template; use {flag}=chatml (shipped) or a "
                "Jinja file"
            )
        return text
    path = SHIPPED_CHAT_TEMPLATES.get(value) or Path(value).expanduser()
    if not path.is_file():
        raise ValueError(
            f"{flag}={value!r}: not tokenizer, a shipped template ({', '.join(SHIPPED_CHAT_TEMPLATES)}) "
            "or an existing Jinja file"
        )
    return path.read_text(encoding="utf-8")


def render(template: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The conversation as text, through transformers' chat-template renderer."""
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as err:  # jinja2 errors and the template's own raise_exception
        raise ValueError(
            f"the chat template cannot render this conversation: {type(err).__name__}: {err}"
        ) from err


def end_of_turn_ids(tokenizer) -> set[int]:
    """Token ids that end an assistant turn: the tokenizer's EOS and the chat formats' end tokens it
    knows as single tokens."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return ids


def adds_bos(tokenizer) -> bool:
    """Whether encoding text adds the BOS token in front (LLaMA-1/2 do; SmolLM2, Llama 3 templates
    write it themselves)."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def jinja_string(text: str) -> str:
    """A Jinja string literal holding `text` exactly (quotes, backslashes and newlines escaped)."""
    return json.dumps(text, ensure_ascii=False)


def format_to_jinja(format_text: str, values: dict[str, str]) -> str:
    """A `str.format` prompt (`{instruction}`, literal `{{ }}`) as Jinja output expressions, each
    placeholder replaced by the Jinja expression in `values`."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(format_text):
        if literal:
            parts.append("{{ " + jinja_string(literal) + " }}")
        if name is not None:
            parts.append("{{ " + values[name] + " }}")
    return "".join(parts)


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat, as llama.cpp and `generate.py` tokenize it: special tokens in the
    text are parsed, and the BOS is added where the tokenizer adds one (LLaMA-1/2) unless the template
    already wrote it. A sentencepiece tokenizer then puts its word-start mark on the first word exactly
    as when training tokenized the same prompt."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token
    if adds_bos(tokenizer) and not (bos and text.startswith(bos)):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def alpaca_record_chat(record: dict, with_answer: bool = False) -> list[dict]:
    """An Alpaca record as a chat in the convention of `alpaca_chat_template` and the API: with an
    input, the instruction is the system message and the input the user message; without one, the
    instruction is the user message. `with_answer` adds the output as the assistant's reply."""
    if record.get("input"):
        messages = [
            {"role": "system", "content": record["instruction"]},
            {"role": "user", "content": record["input"]},
        ]
    else:
        messages = [{"role": "user", "content": record["instruction"]}]
    return messages + ([{"role": "assistant", "content": record["output"]}] if with_answer else [])


def alpaca_chat_template(template: dict) -> str:
    """A Jinja chat template that renders the Alpaca prompt template `template` exactly as training
    formats records.

    The convention is the API's (`generate.py --api`, `template_fields`): without a system message
    a user message is the instruction (`prompt_no_input`); with one (first turn only), the system
    message is the instruction and the first user message its input (`prompt_input`), so "Translate
    into French" + "Good morning" reads as the template intends. An assistant message is the response
    followed by EOS, as training appends it. A record's training prompt is therefore rendered by a chat
    of one user message (the instruction), or of a system message (the instruction) and a user message
    (the input). The prompt already ends in the response header, so `add_generation_prompt` adds
    nothing. The BOS is not written: the tokenizer adds it where training had it (`encode_rendered`).
    Later turns render as further Alpaca exchanges, one after another (the model was trained on single
    exchanges; multi-turn chats are outside what it learned).
    """
    first_with_input = format_to_jinja(
        template["prompt_input"], {"instruction": "system_input", "input": "message['content']"}
    )
    no_input = format_to_jinja(template["prompt_no_input"], {"instruction": "message['content']"})
    return (
        "{% set system_input = messages[0]['content'] if messages[0]['role'] == 'system' else '' %}"
        + "{% set ns = namespace(first=true) %}"
        + "{% for message in messages %}"
        + "{% if message['role'] == 'user' %}"
        + "{% if ns.first and system_input %}"
        + first_with_input
        + "{% else %}"
        + no_input
        + "{% endif %}"
        + "{% set ns.first = false %}"
        + "{% elif message['role'] == 'assistant' %}"
        + "{{ message['content'] + eos_token }}"
        + "{% endif %}"
        + "{% endfor %}"
    )


FORMAT_FILE = "training_format.json"


@dataclass
class TrainingFormat:
    """The format a model was trained in, saved with the adapter (`training_format.json`) so that
    generation, serving and the exports use it without a flag.

    `kind` is `prompt_template` (Alpaca records in a JSON prompt template) or `chat_template`
    (conversations, or Alpaca records as one exchange, in a Jinja chat template). `chat_template` is
    the Jinja source that renders a chat exactly as training did: the trained chat template, or for a
    prompt template its Jinja rendering (`alpaca_chat_template`).
    """

    kind: str
    prompt_template: str
    chat_template_flag: str
    chat_template: str

    @property
    def is_chat(self) -> bool:
        return self.kind == "chat_template"

    def to_dict(self) -> dict:
        return asdict(self)


def training_format(chat_template_flag: str, prompt_template_name: str, tokenizer, has_conversations: bool):
    """The run's format: `--chat_template` when given; else conversations in the tokenizer's own
    template and Alpaca records in the prompt template (today's default)."""
    from alpaca.core.prompter import load_template

    flag = chat_template_flag or ("tokenizer" if has_conversations else "")
    if flag:
        try:
            text = resolve_chat_template(flag, tokenizer)
        except ValueError as err:
            if not chat_template_flag:
                raise ValueError(
                    "the data holds conversations and the tokenizer has no chat template: give "
                    "--chat_template=chatml (shipped) or a Jinja file"
                ) from err
            raise
        return TrainingFormat("chat_template", prompt_template_name, flag, text)
    text = alpaca_chat_template(load_template(prompt_template_name))
    return TrainingFormat("prompt_template", prompt_template_name, "", text)


def save_training_format(folder, training: TrainingFormat) -> None:
    from alpaca.core.files import write_json_atomic

    write_json_atomic(Path(folder) / FORMAT_FILE, training.to_dict())


def read_training_format(folder) -> TrainingFormat | None:
    """The format recorded in an adapter or model folder, or None (trained before formats were recorded,
    or a hub id)."""
    path = Path(str(folder)).expanduser() / FORMAT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return TrainingFormat(
            **{key: data[key] for key in ("kind", "prompt_template", "chat_template_flag", "chat_template")}
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"{path} is not a valid training format file ({err}); train again or delete it"
        ) from err


def chat_special_tokens(flag: str, tokenizer) -> list[str]:
    """ChatML's two tokens when `--chat_template=chatml` is used with a tokenizer that lacks them: they
    are added as special tokens (new embedding rows, trained), so each marker is one token as in every
    ChatML model and `<|im_end|>` can end a turn."""
    if flag != "chatml":
        return []
    vocab = tokenizer.get_vocab()
    return [token for token in ("<|im_start|>", "<|im_end|>") if token not in vocab]


def recorded_format(lora_weights: str) -> TrainingFormat:
    """The format an adapter was trained in: its `training_format.json`; for an adapter trained before
    formats were recorded, the prompt template its `run_config.json` names; else (a hub adapter such as
    Alpaca-LoRA's) the default Alpaca template, which every Alpaca-LoRA adapter was trained with."""
    from alpaca.core.prompter import DEFAULT_TEMPLATE, load_template

    recorded = read_training_format(lora_weights) if lora_weights else None
    if recorded is not None:
        return recorded
    name = DEFAULT_TEMPLATE
    run_config = Path(str(lora_weights)).expanduser() / "run_config.json"
    if lora_weights and run_config.is_file():
        try:
            name = json.loads(run_config.read_text(encoding="utf-8")).get("prompt_template_name") or name
        except ValueError:
            pass
    return TrainingFormat("prompt_template", name, "", alpaca_chat_template(load_template(name)))


class ChatPrompter:
    """The prompter of a model trained in a chat template (`TrainingFormat.is_chat`), with the face of
    `alpaca.core.prompter.Prompter`, so the page, batch mode and the API prompt it as it was trained.

    An instruction (and its input, after a blank line, as training formatted Alpaca records) is one
    user turn, rendered with the generation prompt. A chat template has no text markers to stop at:
    its end-of-turn token ends a reply (`end_ids`), so `template` is None and there are no stop
    strings. A leading BOS written by the template is left to the tokenizer where it adds one itself,
    so the prompt's ids are `encode_rendered`'s.
    """

    template = None

    def __init__(self, training: TrainingFormat, tokenizer):
        self.training = training
        self.chat_template = training.chat_template
        self.template_name = f"chat template ({training.chat_template_flag or 'tokenizer'})"
        self.tokenizer = tokenizer
        self.end_ids = sorted(end_of_turn_ids(tokenizer))

    def render_chat(self, messages: list[dict]) -> str:
        """The prompt for a conversation whose reply comes next."""
        text = render(self.chat_template, messages, self.tokenizer, add_generation_prompt=True)
        bos = self.tokenizer.bos_token
        if bos and adds_bos(self.tokenizer) and text.startswith(bos):
            text = text[len(bos) :]
        return text

    def generate_prompt(self, instruction: str, input: str | None = None, label: str | None = None) -> str:
        record = {"instruction": instruction, "input": input or "", "output": ""}
        prompt = self.render_chat(alpaca_record_messages(record)[:1])
        return f"{prompt}{label}" if label else prompt

    def get_response(self, output: str, prompt: str | None = None) -> str:
        if prompt is not None and output.startswith(prompt):
            return output[len(prompt) :].strip()
        return output.strip()


def chat_prompter_for(lora_weights: str, tokenizer):
    """A `ChatPrompter` when the adapter was trained in a chat template, else None."""
    training = read_training_format(lora_weights) if lora_weights else None
    return ChatPrompter(training, tokenizer) if training is not None and training.is_chat else None
