"""The two ways to split an instruction into words for the ROUGE-L filter and the length filters.

``rouge_score`` (the default) is upstream's: rouge_score's rougeL tokenizer, which lower-cases, keeps
only runs of ``[a-z0-9]`` and drops everything else. It is what makes the filter's scores identical to
upstream's, and it suits English, but it drops every other script: two identical Chinese instructions
score 0 (both token lists are empty) and "Café" becomes ``caf``.

``unicode`` (opt-in, ``--rouge_tokenizer=unicode``) is for instructions in other languages: NFKC
normalization (full-width letters become ASCII, ligatures split), lower-casing, then words are runs
of letters, digits and combining marks of any script, and each Han, Hiragana or Katakana character is
a token of its own (those scripts do not separate words with spaces). On ASCII text it gives exactly
rouge_score's tokens. Thai, Lao, Khmer and Myanmar also write without spaces and are not split: a
phrase in them is one token.
"""

import unicodedata
from collections.abc import Callable

from rouge_score.tokenize import tokenize as _rouge_tokenize

TOKENIZERS = ("rouge_score", "unicode")

# Han (unified ideographs, extension A, compatibility, extensions B and beyond), Hiragana, Katakana.
_ONE_TOKEN_PER_CHARACTER = (
    (0x3040, 0x30FF),
    (0x31F0, 0x31FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xF900, 0xFAFF),
    (0x20000, 0x3134F),
)


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's rougeL tokens (lower-case, non-alphanumeric runs split, no stemming)."""
    return _rouge_tokenize(text, None)


def _is_ideographic(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in _ONE_TOKEN_PER_CHARACTER)


def unicode_tokens(text: str) -> list[str]:
    """Words of any script (letters, digits, combining marks) and single Han / kana characters."""
    tokens, word = [], []
    for char in unicodedata.normalize("NFKC", text).lower():
        if _is_ideographic(char):
            if word:
                tokens.append("".join(word))
                word = []
            tokens.append(char)
        elif unicodedata.category(char)[0] in "LNM":
            word.append(char)
        elif word:
            tokens.append("".join(word))
            word = []
    if word:
        tokens.append("".join(word))
    return tokens


def tokenizer(name: str) -> Callable[[str], list[str]]:
    """The tokenizer called ``name`` (one of ``TOKENIZERS``)."""
    if name not in TOKENIZERS:
        raise ValueError(f"--rouge_tokenizer must be one of {', '.join(TOKENIZERS)}, not {name!r}")
    return rouge_tokens if name == "rouge_score" else unicode_tokens
