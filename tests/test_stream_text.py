"""Streamed text only grows and ends as the plain reply: `StreamDecoder` (used by the API's stream) and
`ResponseGenerator.stream` (the page's stream), on the tiny LLaMA (byte-fallback tokens) and SmolLM2
(byte-level BPE) with emoji and CJK."""

import random

import pytest

from alpaca.inference.decoding import StreamDecoder, byte_token_ids, make_settings
from alpaca.inference.loading import load_generators

PROMPTS = ["日本語で答えて 😀", "Tell me about alpacas.", "Écris un poème 🎉", "你好，世界", "Emoji: 🦙🦙🦙"]


@pytest.fixture(scope="module")
def tiny_generator(tiny_llama):
    return load_generators(tiny_llama, lora_weights="")[0]


def check_settles(tokenizer, sequences, context_ids=()) -> None:
    """For every prefix of every sequence: the settled text is a prefix of the whole text of any
    longer prefix, and grows."""
    for token_ids in sequences:
        decoder = StreamDecoder(tokenizer, context_ids)
        whole = decoder.text(token_ids)
        shown = ""
        for end in range(len(token_ids) + 1):
            settled = decoder.settled_text(token_ids[:end])
            assert whole.startswith(settled), (token_ids[:end], settled, whole)
            assert settled.startswith(shown)
            shown = settled


def test_a_byte_run_is_held_until_an_ordinary_token_closes_it(tiny_generator):
    tokenizer = tiny_generator.tokenizer
    byte = {value: tokenizer.convert_tokens_to_ids(f"<0x{value:02X}>") for value in (0xE6, 0x97, 0xA5, 0x80)}
    the = tokenizer.convert_tokens_to_ids("▁the")
    context = tokenizer.encode("### Response:\n")
    decoder = StreamDecoder(tokenizer, context)
    ni = [byte[0xE6], byte[0x97], byte[0xA5]]  # "日" as three byte tokens
    # As a whole, one more byte makes the run invalid: all four bytes read as U+FFFD, "日" included.
    assert decoder.text([the, *ni]) == " the日"
    assert decoder.text([the, *ni, byte[0x80], the]) == " the" + "\ufffd" * 4 + " the"
    assert decoder.settled_text([the, *ni]) == " the"
    assert decoder.settled_text([the, *ni, byte[0x80]]) == " the"
    assert decoder.settled_text([the, *ni, byte[0x80], the]) == " the" + "\ufffd" * 4 + " the"
    assert decoder.settled_text([the, *ni, the]) == " the日 the"


def test_random_tokens_heavy_in_bytes_settle_into_prefixes(tiny_generator):
    tokenizer = tiny_generator.tokenizer
    bytes_ = sorted(byte_token_ids(tokenizer))
    assert len(bytes_) == 256
    rng = random.Random(0)
    ordinary = [i for i in range(3, len(tokenizer)) if i not in set(bytes_)]
    sequences = [
        [rng.choice(bytes_) if rng.random() < 0.6 else rng.choice(ordinary) for _ in range(24)]
        for _ in range(60)
    ]
    check_settles(tokenizer, sequences, tokenizer.encode("### Response:\n"))


def check_page_streams(generator, prompts, max_new_tokens: int) -> list[str]:
    """The page's stream (greedy, one beam) grows by extension and ends as `generate`'s reply."""
    settings = make_settings(temperature=0, num_beams=1, max_new_tokens=max_new_tokens)
    replies = []
    for prompt in prompts:
        updates = list(generator.stream(prompt, None, settings))
        for before, after in zip(updates, updates[1:]):
            assert after.startswith(before) and after != before, (prompt, before, after)
        expected = generator.generate(prompt, None, settings)
        assert updates[-1] == expected, prompt
        replies.append(expected)
    return replies


def test_tiny_llama_page_stream_ends_as_the_plain_reply(tiny_generator):
    # The last four ended differently from the plain reply before (the stream's pieces, joined, were
    # not the whole decoded); found among random CJK / emoji prompts.
    prompts = [*PROMPTS, "你你日", "文文本日aem", "好🌊j☕m好ga", "ap世kß好語a"]
    replies = check_page_streams(tiny_generator, prompts, max_new_tokens=64)
    assert any("\ufffd" in reply for reply in replies)


@pytest.mark.realmodel
def test_smollm2_page_stream_and_decoder_with_emoji_and_cjk(smollm2):
    generator = load_generators(smollm2, lora_weights="")[0]
    prompts = ["Reply with three emoji that describe the sea, and nothing else.", "日本の首都はどこですか？"]
    replies = check_page_streams(generator, prompts, max_new_tokens=40)
    assert any(any(ord(ch) > 0x2E80 for ch in reply) for reply in replies), replies
    tokenizer = generator.tokenizer
    assert not byte_token_ids(tokenizer)
    # Emoji and CJK split into byte-level pieces that end mid-character, cut at every token.
    text = "海 🌊🐚 日本語 café ☕ 🦙🦙 終わり"
    sequences = [tokenizer.encode(text, add_special_tokens=False)]
    rng = random.Random(0)
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(16)] for _ in range(20)]
    check_settles(tokenizer, sequences, tokenizer.encode("Answer:\n", add_special_tokens=False))
