"""Inference in the trained format, without a flag: a chat-trained adapter is prompted in its chat
template by generate, the page's Chat tab, batch mode and the API (token ids equal to training's), and
its replies end at the end-of-turn token; an Alpaca-trained adapter keeps its prompt template."""

import json
from pathlib import Path

import pytest
from helpers.finetune_runs import run_finetune_fast, write_sample_subset

from alpaca.core.chat import ChatPrompter, conversation_messages, read_training_format
from alpaca.finetune.conversations import tokenize_conversation
from alpaca.finetune.data import load_records
from alpaca.inference.batch import run_batch
from alpaca.inference.decoding import DecodingSettings
from alpaca.inference.loading import load_generators

REPO = Path(__file__).resolve().parent.parent
CHAT_SAMPLE = REPO / "data" / "chat_sample.jsonl"
GREEDY = DecodingSettings(temperature=0.0, num_beams=1, max_new_tokens=8)


@pytest.fixture(scope="module")
def chat_adapter(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat") / "lora"
    run_finetune_fast(tiny_llama, str(CHAT_SAMPLE), out, max_steps=2, chat_template="chatml", cutoff_len=256)
    return str(out)


@pytest.fixture(scope="module")
def alpaca_adapter(tiny_llama, tmp_path_factory):
    data = write_sample_subset(tmp_path_factory.mktemp("data") / "a.json", 16)
    out = tmp_path_factory.mktemp("alpaca") / "lora"
    run_finetune_fast(tiny_llama, str(data), out, max_steps=2)
    return str(out)


@pytest.fixture(scope="module")
def chat_generators(tiny_llama, chat_adapter):
    return load_generators(tiny_llama, chat_adapter)


def conversations(count: int = 6) -> list[list[dict]]:
    records = load_records(str(CHAT_SAMPLE))
    return [conversation_messages(r, i, "s") for i, r in enumerate(records)][-count:]


def training_prompt_ids(tokenizer, template: str, messages: list[dict]) -> list[int]:
    """The ids training used before the conversation's last reply."""
    example = tokenize_conversation(messages, tokenizer, template, 4096, False)
    return example["input_ids"][: example["trained_positions"][-1].start]


def test_a_chat_adapter_is_prompted_in_its_chat_template(chat_generators, chat_adapter):
    main = chat_generators[0]
    assert main.name.endswith("lora") and isinstance(main.prompter, ChatPrompter)
    template = read_training_format(chat_adapter).chat_template
    assert main.tokenizer.chat_template == template
    im_end = main.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in main.end_ids and main.stop_strings == ()
    # the base alone, offered for comparison, is prompted the same way
    assert isinstance(chat_generators[1].prompter, ChatPrompter)
    for messages in conversations():
        prompt = main.prompt_for_messages(messages[:-1])
        assert main.tokenizer(prompt)["input_ids"] == training_prompt_ids(main.tokenizer, template, messages)
    # an instruction is one user turn
    prompt = main.prompt_for("Say hi.")
    assert prompt == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"


def test_replies_end_at_the_end_of_turn_token(chat_generators, monkeypatch):
    main = chat_generators[0]
    seen = {}
    original = main.model.generate

    def recording(*args, **kwargs):
        seen["eos"] = kwargs["generation_config"].eos_token_id
        return original(*args, **kwargs)

    monkeypatch.setattr(main.model, "generate", recording)
    main.chat_replies([conversations(1)[0][:-1]], GREEDY)
    im_end = main.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in seen["eos"] and main.tokenizer.eos_token_id in seen["eos"]


def test_streamed_chat_ends_with_the_plain_reply(chat_generators):
    main = chat_generators[0]
    for messages in conversations(3):
        plain = main.chat_replies([messages[:-1]], GREEDY)[0].text
        streamed = list(main.stream_chat(messages[:-1], GREEDY))
        assert streamed[-1] == plain


def test_batch_mode_takes_messages_records(chat_generators, tmp_path):
    main = chat_generators[0]
    chats = [m[:-1] for m in conversations(3)]
    records = [{"messages": m} for m in chats] + [{"instruction": "Say hi.", "input": ""}]
    input_file = tmp_path / "in.jsonl"
    input_file.write_text("\n".join(json.dumps(r) for r in records))
    results = run_batch(
        main, str(input_file), str(tmp_path / "out.json"), GREEDY, batch_size=2, progress=False
    )
    expected = [reply.text for reply in main.chat_replies(chats, GREEDY)] + [
        main.generate("Say hi.", None, GREEDY)
    ]
    assert [r["output"] for r in results] == expected
    assert results[0]["messages"] == chats[0]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]})
    )
    with pytest.raises(ValueError, match="record 0: the conversation must end with a user message"):
        run_batch(main, str(bad), str(tmp_path / "bad_out.json"), GREEDY, progress=False)


def test_the_api_speaks_the_trained_format_by_default(chat_generators, tiny_llama, alpaca_adapter):
    from alpaca.serving.openai_protocol import OpenAIBackend, ServingConfig

    main = chat_generators[0]
    backend = OpenAIBackend(
        main, scheduler=None, config=ServingConfig(model_id="m", chat_format="trained", default_max_tokens=8)
    )
    assert backend.config.chat_format == "tokenizer"
    im_end = main.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in backend.chat_eos_ids
    template = main.prompter.chat_template
    for messages in conversations(3):
        ids = backend._chat_prompt(messages[:-1], max_tokens=8)
        assert list(ids) == training_prompt_ids(main.tokenizer, template, messages)
    alpaca_main = load_generators(tiny_llama, alpaca_adapter)[0]
    alpaca_backend = OpenAIBackend(
        alpaca_main,
        scheduler=None,
        config=ServingConfig(model_id="m", chat_format="trained", default_max_tokens=8),
    )
    assert alpaca_backend.config.chat_format == "template"
    assert not isinstance(alpaca_main.prompter, ChatPrompter)


@pytest.mark.slow
def test_the_page_has_a_chat_tab_that_streams_in_the_trained_format(chat_generators):
    from gradio_client import Client

    from alpaca.inference.page import build_demo

    main = chat_generators[0]
    demo = build_demo(chat_generators, defaults=GREEDY)
    demo.queue().launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        history = [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]
        # the first turn through the page's API, then a second one with history
        reply = client.predict("Say hi.", 0.0, 1.0, 40, 1, 8, 0, api_name="/chat")
        assert reply == main.chat_replies([[history[0]]], GREEDY)[0].text
        expected = main.chat_replies([[*history, {"role": "user", "content": "Again."}]], GREEDY)[0].text
        assert (
            list(main.stream_chat([*history, {"role": "user", "content": "Again."}], GREEDY))[-1] == expected
        )
    finally:
        demo.close()
