"""Answer checking for prompts with known answers: did the completion give an accepted answer?

A prompt of the JSONL set may carry ``"answers": ["Canberra"]``, a list of accepted strings. A
completion is **correct** when one accepted answer appears in it as a whole-word sequence after
both are normalised the same way:

* Unicode compatibility form, accents dropped, lower case (``Brasília`` = ``brasilia``);
* number words become digits (``twelve`` = ``12``, ``one hundred and forty-four`` = ``144``,
  ``a dozen`` is *not* a number), and digit groups lose their separators (``1,000`` = ``1000``);
* punctuation becomes a word break, except the decimal point, the minus sign and the ``/`` of a
  fraction between digits (``3.5``, ``-4``, ``1/2`` stay one word);
* the articles ``a``, ``an``, ``the`` are dropped.

Whole words: ``12`` does not match inside ``112`` or ``12.5``, ``cat`` not inside ``catalog``. A
completion that lists several candidates gets the credit if any of them is accepted; the prompts
are written so that a short direct answer is the natural reply.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

__all__ = ["normalize_answer", "answer_words", "is_correct", "check_answers_field"]

_UNITS = {
    "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
_SCALES = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}
_ARTICLES = {"a", "an", "the"}
_NUMBER_WORDS = set(_UNITS) | set(_TENS) | set(_SCALES)

# A number with separators (1,000 / 12,345.6 / -3.5 / 1/2), or a run of word characters.
_WORD = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:[./]\d+)?|[^\W_]+", re.UNICODE)


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in text if not unicodedata.combining(ch)).lower()


def _split(text: str) -> list[str]:
    """Words and numbers of ``text`` (folded, lower case); digit groups lose their separators."""
    words = []
    for match in _WORD.finditer(_fold(text)):
        word = match.group(0)
        words.append(word.replace(",", "") if word[-1].isdigit() else word)
    return words


def _join_numbers(words: list[str]) -> list[str]:
    """Replace runs of number words (``forty``, ``four``, ``hundred`` ...; ``and`` inside a run) by digits."""
    out: list[str] = []
    i = 0
    while i < len(words):
        if words[i] not in _NUMBER_WORDS or words[i] in _SCALES:
            out.append(words[i])
            i += 1
            continue
        total, current, j = 0, 0, i
        last = i
        while j < len(words):
            w = words[j]
            if w in _UNITS:
                current += _UNITS[w]
            elif w in _TENS:
                current += _TENS[w]
            elif w in _SCALES:
                scale = _SCALES[w]
                if scale == 100:
                    current = max(current, 1) * 100
                else:
                    total += max(current, 1) * scale
                    current = 0
            elif w == "and" and j + 1 < len(words) and words[j + 1] in _NUMBER_WORDS and j > i:
                j += 1
                continue
            else:
                break
            last = j
            j += 1
        out.append(str(total + current))
        i = last + 1
    return out


def answer_words(text: str) -> list[str]:
    """The normalised words of ``text`` (see the module doc)."""
    # "forty-four" -> "forty four": a hyphen between letters is a word break (between digits it is a minus sign)
    text = re.sub(r"(?<=[^\W\d_])-(?=[^\W\d_])", " ", text)
    words = _join_numbers(_split(text))
    return [w for w in words if w not in _ARTICLES]


def normalize_answer(text: str) -> str:
    """``text`` normalised for comparison: ``"The  Forty-Four."`` -> ``"44"``."""
    return " ".join(answer_words(text))


def is_correct(completion: str, answers: Sequence[str]) -> bool:
    """True when one of ``answers`` appears in ``completion`` as whole normalised words."""
    words = answer_words(completion)
    n = len(words)
    for answer in answers:
        target = answer_words(answer)
        k = len(target)
        if k and any(words[i:i + k] == target for i in range(n - k + 1)):
            return True
    return False


def check_answers_field(value, where: str) -> tuple[str, ...] | None:
    """The ``answers`` field of a prompt record, validated: None, or a non-empty list of non-empty strings
    that normalise to at least one word. Errors name ``where`` (file:line) and the fix."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field 'answers' must be a non-empty list of accepted answer strings, "
                         f'e.g. "answers": ["Canberra"]; got {value!r}')
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise ValueError(f"{where}: field 'answers' holds {item!r}; every accepted answer must be a non-empty "
                             'string, e.g. "answers": ["12", "twelve"]')
        if not answer_words(item):
            raise ValueError(f"{where}: field 'answers' holds {item!r}, which has no word left after normalisation (articles and "
                             "punctuation are dropped); give the answer itself")
    return tuple(value)
