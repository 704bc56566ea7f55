"""The pairwise judge's prompt and how its verdict is read.

This module is the only place the judge prompt lives. It follows AlpacaEval 1's ranking style: the
instruction (and input), then two outputs labelled ``Output (a)`` and ``Output (b)``, and the judge
answers with exactly one of those two labels. Any chat or completions endpoint can follow it: no
function calling and no logprobs are needed.

Reading a verdict (``parse_verdict``) is deliberately conservative: a reply is read as (a) or (b)
only when it names one output unambiguously; anything else (both named without a clear preference,
"neither", "tie", a refusal, an empty reply) is *unparseable*. An unparseable verdict is counted as
such and never guessed.
"""

from __future__ import annotations

import re

DEFAULT_JUDGE_MODEL = "gpt-4.1"

JUDGE_SYSTEM_MESSAGE = (
    "You are a fair and careful judge of AI assistants. You compare two outputs for the same "
    'instruction and answer with exactly "Output (a)" or "Output (b)", nothing else.'
)

_PREAMBLE = (
    "Which of the two outputs below follows the instruction better? Judge how helpful, correct and "
    "relevant each output is. Do not let the length of an output, or the order in which the two are "
    "shown, sway your choice."
)
_QUESTION = 'Which output is better? Answer with exactly "Output (a)" or "Output (b)".'


def build_judge_prompt(instruction: str, input: str | None, output_a: str, output_b: str) -> str:
    """The judge's prompt for one order of one pair (the input section only when there is an input)."""
    sections = [_PREAMBLE, f"## Instruction\n{instruction}"]
    if input:
        sections.append(f"## Input\n{input}")
    sections += [f"## Output (a)\n{output_a}", f"## Output (b)\n{output_b}", f"## Verdict\n{_QUESTION}"]
    return "\n\n".join(sections) + "\n"


def judge_messages(prompt: str) -> list[dict]:
    """The chat-completions form of a judge prompt."""
    return [{"role": "system", "content": JUDGE_SYSTEM_MESSAGE}, {"role": "user", "content": prompt}]


# A completions model continues the document; a new section heading means it has moved on.
COMPLETIONS_STOP = ("\n##",)

# "Output (a)", "output a", "Output(A)", "**Output (b)**" (markdown is removed first) or a bare "(a)".
# Without brackets the letter must end the phrase ("Output A.", "Output b is better"), so that "the
# output a user wants" is no verdict.
_UNBRACKETED = r"\boutput\s+{x}(?=\s*(?:$|[.,;:!?)]|\s(?:is|was|wins)\b))"
_MENTION = re.compile(
    r"\boutput\s*\(\s*([ab])\s*\)|" + _UNBRACKETED.format(x="([ab])") + r"|\(([ab])\)", re.IGNORECASE
)
_BARE = re.compile(r"(?:output\s*)?\(?\s*([ab])\s*\)?", re.IGNORECASE)
_LABEL = r"(?:output\s*\(\s*{x}\s*\)|" + _UNBRACKETED + r"|\({x}\))"
# Phrases that make one of two named outputs the choice: "Output (a) is better", "I prefer Output (b)",
# "the better output is Output (a)", "Answer: Output (b)".
_CHOICE_PATTERNS = (
    r"{label}\s+(?:is|was)\s+(?:clearly\s+|much\s+|slightly\s+|definitely\s+)?(?:the\s+)?"
    r"(?:better|best|preferred|superior|stronger|winner)",
    r"(?:better|best|preferred|stronger|winning|superior)\s+(?:output|response|answer|one|choice)\s+"
    r"(?:is|would\s+be)\s*:?\s*{label}",
    r"\b(?:answer|verdict|choice|winner|decision)\s*(?:is)?\s*:\s*{label}",
    r"\bi\s+(?:would\s+)?(?:prefer|choose|pick|select|go\s+with)\s+{label}",
)
# Words that turn a lone mention into something other than a choice ("not Output (a)", "neither").
_NEGATIVE = re.compile(
    r"\b(?:not|no|neither|nor|worse|worst|tie|tied|equal|equally|both|cannot|can't|unsure|unclear)\b",
    re.IGNORECASE,
)
_CLAUSE_END = re.compile(r"[.,;:!?\n]|\bbecause\b|\bsince\b|\bas it\b", re.IGNORECASE)


def _strip_markdown(text: str) -> str:
    return re.sub(r"[*_`\"“”#>]", "", text)


def _letters(match: re.Match) -> str:
    return next(group for group in match.groups() if group).lower()


def _lone_mention_verdict(segment: str, match: re.Match) -> str | None:
    """The one output named in `segment`, unless its clause negates or qualifies it."""
    sentence_start = max(segment.rfind(mark, 0, match.start()) for mark in ".!?\n")
    before = segment[sentence_start + 1 : match.start()]
    rest = segment[match.end() :]
    end = _CLAUSE_END.search(rest)
    after = rest[: end.start()] if end else rest
    return None if _NEGATIVE.search(before) or _NEGATIVE.search(after) else _letters(match)


def _segment_verdict(segment: str) -> str | None:
    """The verdict one line gives, or None."""
    mentions = list(_MENTION.finditer(segment))
    if {_letters(match) for match in mentions} in ({"a"}, {"b"}):
        return _lone_mention_verdict(segment, mentions[0])
    chosen = set()
    for pattern in _CHOICE_PATTERNS:
        for letter in "ab":
            label = _LABEL.format(x=letter)
            if re.search(pattern.format(label=label), segment, re.IGNORECASE):
                chosen.add(letter)
    return chosen.pop() if len(chosen) == 1 else None


def parse_verdict(text: str | None) -> str | None:
    """``"a"``, ``"b"`` or None (unparseable) for a judge's reply.

    Rules, in order: the reply (markdown, quotes and surrounding punctuation removed) is just a label
    (``Output (a)``, ``(b)``, ``a``); otherwise the first line that names an output decides: one output
    named, not negated in its clause, is the verdict (negated: unparseable); both named, exactly one
    must be singled out by a choice phrase ("Output (a) is better", "I prefer Output (b)", "Answer:
    Output (a)"), and a line that names both without one ("Comparing Output (a) and Output (b):") is
    passed over for the next.
    """
    if not isinstance(text, str):
        return None
    cleaned = _strip_markdown(text).strip()
    bare = _BARE.fullmatch(cleaned.strip(" \t\r\n.:!;,'"))
    if bare:
        return bare.group(1).lower()
    for line in cleaned.splitlines():
        mentions = {_letters(match) for match in _MENTION.finditer(line)}
        if not mentions:
            continue
        verdict = _segment_verdict(line)
        if verdict is not None or len(mentions) == 1:
            return verdict
    return None
