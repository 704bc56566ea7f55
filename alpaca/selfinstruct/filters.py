"""Upstream's heuristic filters on generated instructions, each with a name for the run summary."""

import re
import string

# Words a text-only model cannot act on (upstream's list, matched as whole words in any case).
BLACKLIST = (
    "image",
    "images",
    "graph",
    "graphs",
    "picture",
    "pictures",
    "file",
    "files",
    "map",
    "maps",
    "draw",
    "plot",
    "go to",
    "video",
    "audio",
    "music",
    "flowchart",
    "diagram",
)
_BLACKLIST_RE = re.compile(r"\b(" + "|".join(re.escape(word) for word in BLACKLIST) + r")\b", re.IGNORECASE)

# The names the summary reports rejections under, in the order the checks run.
FILTER_NAMES = ("too_short", "too_long", "blacklist", "write_a_program", "punctuation", "non_ascii")


def rejection_reason(instruction: str, tokenizer: str = "rouge_score") -> str | None:
    """Return the name of the first filter that rejects ``instruction``, or None to keep it.

    The checks and their order are upstream's ``post_process_gpt3_response``. With
    ``tokenizer="unicode"`` (instructions in other languages) words are counted as the Unicode
    tokenizer splits them (a Chinese character is a word) and the non-ASCII first-character check,
    which only keeps English, is off.
    """
    if tokenizer == "unicode":
        from alpaca.selfinstruct.tokens import unicode_tokens

        num_words = len(unicode_tokens(instruction))
    else:
        num_words = len(instruction.split())
    if num_words <= 3:
        return "too_short"
    if num_words > 150:
        return "too_long"
    if _BLACKLIST_RE.search(instruction):
        return "blacklist"
    # Upstream: the model tended to append "write a program" to tasks, which made it unclear whether
    # the answer should be a program or the result.
    if instruction.startswith("Write a program"):
        return "write_a_program"
    if instruction[0] in string.punctuation:
        return "punctuation"
    if tokenizer != "unicode" and not instruction[0].isascii():
        return "non_ascii"
    return None
