r"""Rules that spot anomalous text and anomalous vocabulary tokens.

At negative temperatures (and at very high ones) a model drifts into the "anomalous token"
regime: streams of rare, under-trained tokens (SmolLM2 emits "emeteries", "MetaInfo", ...),
odd Unicode, symbol soup, scripts mixed within a few characters. These rules score that
cheaply, without a model, at two levels.

**Text level** — :func:`text_anomaly_reasons` returns named scores in [0, 1];
:func:`text_anomaly_score` is their maximum; ``*_batch`` / :func:`text_anomaly_scores` run
a list of texts. ``ramp(x, lo, hi) = clip((x - lo) / (hi - lo), 0, 1)``.

| reason | measures | range | thresholds (0 at or below ``lo``, 1 at ``hi``) |
| --- | --- | --- | --- |
| `char_run` | longest run of one repeated non-whitespace character | [0, 1] | letters, symbols: ramp(run, 3, 12) (0 below 4, "!!!!" = 0.11, 12 x "!" = 1); separators ``-=_*#~.+/`` and box lines, and digits: ramp(run, 40, 160) (an 80-column rule = 0.33); whitespace runs (indentation, blank lines) are ignored |
| `symbol_soup` | densest 32-character window (whitespace excluded) of unusual symbols | [0, 1] | per-character weight: letters, digits, marks, ``()[]{}:;=+-*/<>_.,'"#%!?|`` and backtick, non-ASCII punctuation (quotes, dashes, CJK), a short allowlist of common symbols (°±×÷€£¥©®™→≤≥≈…•): 0; rare ASCII ``@$&\^~``: 0.5; emoji: 0.5; other non-ASCII symbols, control/format/private-use/unassigned characters, U+FFFD: 1. Window score = ramp(weight / width, 0.08, 0.25) * min(1, weight / 3) (8 odd symbols in 32 characters = 1) |
| `script_mixing` | Unicode scripts among the letters (digits, punctuation, spaces ignored) of 32-letter windows | [0, 1] | max(ramp(#scripts, 2, 4), ramp(#script switches, 6, 16)); Hiragana/Katakana/Han/Hangul/fullwidth count as one script (CJK); one foreign script beside Latin is normal |
| `token_repetition` | repeated words in 8-word windows of the last 32 whitespace words (lower-cased, outer punctuation stripped, pure-punctuation words dropped): each occurrence after the first of a word counts 1, or 0.5 for a function word ("the", "and", ...) or a word of 1-2 characters; the sum is divided by 8 | [0, 1] | ramp(max over windows, 0.25, 0.625): 2 content repeats in 8 words = 0, 5 = 1 (an 8-word loop over 3 words = 1); fewer than 4 words: 0 |
| `glued_words` | share of the last 32 whitespace words that are several vocabulary pieces glued together: a Latin letter run of >= 22 letters, or of >= 14 letters with an inner lower->Upper hump ("carbohydAlmostEqualgetcwd"); words holding ``._()=:`` are code and never count | [0, 1] | ramp(glued / max(#words, 12), 0.05, 0.25): 1 glued word in 12 = 0.17, 3 in 12 = 1 |

Prose, markdown lists and Python code score below 0.3 on every reason (see
``tests/test_anomaly_rules.py``). SmolLM2-135M-Instruct sampled at T = -1 over the full
vocabulary writes word salad such as ``" arsen Pregn interspersMetaInfoevelopedemeteries]//
affilifaissunsqueezeyalgia ... MontgomeryemeteriesMetaInfo"``: the pieces join without
spaces, so `glued_words` is the reason that fires there (0.86 on that 40-token sample).

**Token level** — :func:`token_flags` decodes every vocabulary id once and gives each a
prior in [0, 1], the maximum of:

| reason | measures | score |
| --- | --- | --- |
| non-printable | control (except ``\t\n\r``), format (zero-width), private-use, unassigned or surrogate characters | 1.0 when present |
| byte fragment | U+FFFD: the piece is part of a multi-byte character and undecodable alone (byte-level BPE) | 0.5 (legitimate inside emoji or CJK, garbage when drawn alone) |
| symbol soup | unusual symbols (weights as above) in the token | ramp(share of non-space chars with weight > 0, 0.5, 1) * ramp(sum of the weights of the *distinct* symbols, 1, 3) ("@", "\|\|" = 0, "@$^~" = 0.5, "@$^~¤¬" = 1) |
| mixed scripts | letters of two or more script groups inside one token (Latin with Greek does not count: " μm") | 1.0 |
| char run | longest run of one repeated character | the `char_run` ramps above ("!!!!!!!!" = 0.56) |

Special tokens get 0. The result is cached per (tokenizer class, name, vocabulary size).
:func:`token_anomaly_reasons` splits the prior into the named reasons :data:`TOKEN_REASONS`
(`char_run`; `symbol_soup` = non-printable, byte fragment, symbol soup; `script_mixing`).
Tokens that look like plain words ("emeteries") cannot be told apart from their string;
a negative-temperature probe discovers those (:mod:`anomaly.discovery`), and
:func:`combine_token_flags` raises them (:func:`anomaly.prior.build_token_prior` does both).
"""

from __future__ import annotations

import functools
import re
import threading
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "TEXT_REASONS",
    "TOKEN_REASONS",
    "combine_token_flags",
    "text_anomaly_reasons",
    "text_anomaly_reasons_batch",
    "text_anomaly_score",
    "text_anomaly_scores",
    "token_anomaly_reasons",
    "token_anomaly_score",
    "token_flags",
]

TEXT_REASONS = ("char_run", "symbol_soup", "script_mixing", "token_repetition", "glued_words")
"""Names of the text-level reasons, in the order :func:`text_anomaly_reasons` returns them."""

# ---- thresholds (documented in the module table) ---------------------------------------
CHAR_RUN_LO, CHAR_RUN_HI = 3, 12
SEPARATOR_RUN_LO, SEPARATOR_RUN_HI = 40, 160
SEPARATOR_CHARS = frozenset("-=_*#~.+/─━═│║")

SOUP_WINDOW = 32
SOUP_FRACTION_LO, SOUP_FRACTION_HI = 0.08, 0.25
SOUP_MIN_WEIGHT = 3.0

SCRIPT_WINDOW = 32
SCRIPT_COUNT_LO, SCRIPT_COUNT_HI = 2, 4
SCRIPT_SWITCH_LO, SCRIPT_SWITCH_HI = 6, 16

REPETITION_TAIL_WORDS = 32
REPETITION_WINDOW = 8
REPETITION_MIN_WORDS = 4
REPETITION_LO, REPETITION_HI = 0.25, 0.625
REPETITION_FUNCTION_WORD_WEIGHT = 0.5
_FUNCTION_WORDS = frozenset(
    "the and for but nor not yet are was were has had have its his her our you your she they "
    "them him who whom this that these those with from into than then there their what when "
    "which while will would can could shall should may might must been being does did also "
    "some any all one".split()
)

GLUED_TAIL_WORDS = 32
GLUED_LONG_RUN = 22  # letters in one run without a hump ("affilifaissunsqueezeyalgia" = 26)
GLUED_HUMP_RUN = 14  # letters in one run with an inner lower->Upper hump ("carbohydAlmostEqual")
GLUED_MIN_WORDS = 12  # share = glued / max(words, 12): one long word in a short text is not salad
GLUED_LO, GLUED_HI = 0.05, 0.25
_CODE_CHARS = frozenset("._()=:")  # a word holding these is code (a.getElementById(x)), not salad

TOKEN_SOUP_FRACTION_LO, TOKEN_SOUP_FRACTION_HI = 0.5, 1.0
TOKEN_SOUP_WEIGHT_LO, TOKEN_SOUP_WEIGHT_HI = 1.0, 3.0
TOKEN_NONPRINTABLE_SCORE = 1.0
TOKEN_BYTE_FRAGMENT_SCORE = 0.5
TOKEN_MIXED_SCRIPT_SCORE = 1.0
_TOKEN_COMPATIBLE_SCRIPTS = frozenset({"LATIN", "GREEK"})  # units and science: " μm", "αβ-"

# ---- character classes -----------------------------------------------------------------
_ASCII_NORMAL = frozenset("()[]{}:;=+-*/<>_.,'\"#%!?`|")  # | : markdown tables, pipes
_ASCII_RARE = frozenset("@$&\\^~")
_COMMON_SYMBOLS = frozenset("°±×÷·€£¥¢©®™→←↑↓↔⇒≤≥≠≈∞√∑∏∫∂∆∇µ§¶…•′″")
_ALLOWED_CONTROLS = frozenset("\t\n\r")
_WEIGHT_RARE = 0.5
_WEIGHT_EMOJI = 0.5
_WEIGHT_ODD = 1.0

# Scripts that are written together count as one group; stylistic variants map to Latin.
_SCRIPT_GROUPS = {
    "CJK": "CJK",
    "HIRAGANA": "CJK",
    "KATAKANA": "CJK",
    "KATAKANA-HIRAGANA": "CJK",  # U+30FC prolonged sound mark, U+30A0 double hyphen
    "HANGUL": "CJK",
    "BOPOMOFO": "CJK",
    "IDEOGRAPHIC": "CJK",
    "KANGXI": "CJK",
    "FULLWIDTH": "CJK",
    "HALFWIDTH": "CJK",
}
_STYLE_PREFIXES = frozenset(
    {"MATHEMATICAL", "DOUBLE-STRUCK", "SCRIPT", "BLACK-LETTER", "SUPERSCRIPT", "SUBSCRIPT",
     "MODIFIER", "PLANCK", "KELVIN", "ANGSTROM", "TURNED", "FEMININE", "MASCULINE", "SMALL",
     "CIRCLED", "PARENTHESIZED", "SQUARED", "NEGATIVE", "REVERSED"}
)


def _is_emoji(cp: int) -> bool:
    return 0x1F000 <= cp <= 0x1FAFF or 0x2600 <= cp <= 0x27BF


@functools.lru_cache(maxsize=65536)
def _char_weight(ch: str) -> float | None:
    """Symbol-soup weight of one character; None for whitespace (not counted at all)."""
    if ch.isspace():
        return None
    if ch.isascii():
        if ch.isalnum() or ch in _ASCII_NORMAL:
            return 0.0
        if ch in _ASCII_RARE:
            return _WEIGHT_RARE
        return _WEIGHT_ODD  # ASCII control characters (\t\n\r are whitespace)
    if ch == "\ufffd":
        return _WEIGHT_ODD
    cat = unicodedata.category(ch)
    if cat[0] in "LNMP" or ch in _COMMON_SYMBOLS:
        return 0.0
    if cat[0] == "S":
        return _WEIGHT_EMOJI if _is_emoji(ord(ch)) else _WEIGHT_ODD
    return _WEIGHT_ODD  # Cc, Cf, Co, Cn, Cs


@functools.lru_cache(maxsize=65536)
def _is_nonprintable(ch: str) -> bool:
    """Control (except tab/newline/CR), format, private-use, unassigned, surrogate, or U+FFFD."""
    if ch == "\ufffd":
        return True
    if ch in _ALLOWED_CONTROLS or ch == " ":
        return False
    return unicodedata.category(ch)[0] == "C"


@functools.lru_cache(maxsize=65536)
def _char_script(ch: str) -> str | None:
    """Script group of a letter (first word of its Unicode name, grouped), None otherwise."""
    if not unicodedata.category(ch).startswith("L"):
        return None
    name = unicodedata.name(ch, "")
    if not name:
        return "UNKNOWN"
    first = name.split(" ", 1)[0]
    if first == "MICRO":  # U+00B5 MICRO SIGN is a Greek mu
        return "GREEK"
    if first in _STYLE_PREFIXES:
        return "GREEK" if "GREEK" in name else "LATIN"
    return _SCRIPT_GROUPS.get(first, first)


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(min(1.0, max(0.0, (x - lo) / (hi - lo))))


# ---- text-level reasons ----------------------------------------------------------------
_RUN_RE = re.compile(r"(\S)\1{3,}")  # runs of >= 4 identical non-space characters


def _run_score(ch: str, length: int) -> float:
    if ch in SEPARATOR_CHARS or ch.isdigit():
        return _ramp(length, SEPARATOR_RUN_LO, SEPARATOR_RUN_HI)
    return _ramp(length, CHAR_RUN_LO, CHAR_RUN_HI)


def _char_run_score(text: str) -> float:
    best = 0.0
    for m in _RUN_RE.finditer(text):
        best = max(best, _run_score(m.group(1), m.end() - m.start()))
    return best


def _symbol_soup_score(text: str) -> float:
    weights = [w for w in map(_char_weight, text) if w is not None]
    n = len(weights)
    if n == 0:
        return 0.0
    width = min(SOUP_WINDOW, n)
    csum = np.concatenate(([0.0], np.cumsum(weights)))  # (n + 1,)
    window = csum[width:] - csum[:-width]  # (n - width + 1,) weight per window
    frac = np.clip((window / width - SOUP_FRACTION_LO) / (SOUP_FRACTION_HI - SOUP_FRACTION_LO), 0.0, 1.0)
    amount = np.minimum(1.0, window / SOUP_MIN_WEIGHT)
    return float((frac * amount).max())


def _script_mixing_score(text: str) -> float:
    scripts = [s for s in map(_char_script, text) if s is not None]
    n = len(scripts)
    if n < 2:
        return 0.0
    width = min(SCRIPT_WINDOW, n)
    switches = np.concatenate(([0], np.cumsum([a != b for a, b in zip(scripts, scripts[1:])])))  # (n,)
    stride = max(1, width // 4)
    starts = list(range(0, n - width + 1, stride))
    if starts[-1] != n - width:
        starts.append(n - width)
    best = 0.0
    for s in starts:
        n_scripts = len(set(scripts[s : s + width]))
        n_switches = int(switches[s + width - 1] - switches[s])
        best = max(
            best,
            _ramp(n_scripts, SCRIPT_COUNT_LO, SCRIPT_COUNT_HI),
            _ramp(n_switches, SCRIPT_SWITCH_LO, SCRIPT_SWITCH_HI),
        )
        if best >= 1.0:
            break
    return best


_PUNCT_STRIP = "".join(sorted(_ASCII_NORMAL | _ASCII_RARE)) + "“”‘’«»—–…"


def _repeat_weight(word: str) -> float:
    """How much a repeat of ``word`` counts: function words and 1-2 character words repeat
    naturally (and short identifiers do in code), so they count half."""
    return REPETITION_FUNCTION_WORD_WEIGHT if len(word) <= 2 or word in _FUNCTION_WORDS else 1.0


def _token_repetition_score(text: str) -> float:
    words = [w.strip(_PUNCT_STRIP).lower() for w in text.split()]
    words = [w for w in words if w][-REPETITION_TAIL_WORDS:]  # last 32 words
    n = len(words)
    if n < REPETITION_MIN_WORDS:
        return 0.0
    width = min(REPETITION_WINDOW, n)
    worst = 0.0
    for start in range(n - width + 1):
        seen: set[str] = set()
        repeats = 0.0
        for w in words[start : start + width]:
            if w in seen:
                repeats += _repeat_weight(w)
            else:
                seen.add(w)
        worst = max(worst, repeats / width)
    return _ramp(worst, REPETITION_LO, REPETITION_HI)


_LETTER_RUN_RE = re.compile(r"[A-Za-z]+")  # Latin only: CJK and Thai write without spaces
_HUMP_RE = re.compile(r"[a-z][A-Z]")


def _is_glued_word(word: str) -> bool:
    """A whitespace word that is really several vocabulary pieces glued together."""
    if len(word) < GLUED_HUMP_RUN or any(c in _CODE_CHARS for c in word):
        return False
    for run in _LETTER_RUN_RE.findall(word):
        if len(run) >= GLUED_LONG_RUN:
            return True
        if len(run) >= GLUED_HUMP_RUN and _HUMP_RE.search(run):
            return True
    return False


def _glued_words_score(text: str) -> float:
    words = text.split()[-GLUED_TAIL_WORDS:]
    if not words:
        return 0.0
    share = sum(map(_is_glued_word, words)) / max(len(words), GLUED_MIN_WORDS)
    return _ramp(share, GLUED_LO, GLUED_HI)


def text_anomaly_reasons(text: str) -> dict[str, float]:
    """Named anomaly scores of one text, each in [0, 1] (see the module table).

    Keys, in order: ``char_run``, ``symbol_soup``, ``script_mixing``, ``token_repetition``,
    ``glued_words``.
    """
    if not isinstance(text, str):
        raise TypeError(f"text_anomaly_reasons expects a str, got {type(text).__name__}.")
    return {
        "char_run": _char_run_score(text),
        "symbol_soup": _symbol_soup_score(text),
        "script_mixing": _script_mixing_score(text),
        "token_repetition": _token_repetition_score(text),
        "glued_words": _glued_words_score(text),
    }


def text_anomaly_score(text: str) -> float:
    """Overall anomaly of one text in [0, 1]: the maximum of :func:`text_anomaly_reasons`."""
    return max(text_anomaly_reasons(text).values())


def text_anomaly_reasons_batch(texts: Sequence[str]) -> dict[str, np.ndarray]:
    """:func:`text_anomaly_reasons` over a batch: reason -> float32 array ``(N,)``."""
    rows = [text_anomaly_reasons(t) for t in texts]
    return {r: np.asarray([row[r] for row in rows], dtype=np.float32) for r in TEXT_REASONS}


def text_anomaly_scores(texts: Sequence[str]) -> np.ndarray:
    """:func:`text_anomaly_score` over a batch: float32 array ``(N,)``."""
    return np.asarray([text_anomaly_score(t) for t in texts], dtype=np.float32)


# ---- token level -----------------------------------------------------------------------

TOKEN_REASONS = ("char_run", "symbol_soup", "script_mixing")
"""Named per-token reasons of :func:`token_anomaly_reasons`."""


def token_anomaly_reasons(piece: str) -> dict[str, float]:
    """Named anomaly priors in [0, 1] of one decoded vocabulary piece (see the module table).

    ``char_run``: the `char run` row; ``symbol_soup``: the `non-printable`, `byte fragment` and
    `symbol soup` rows; ``script_mixing``: the `mixed scripts` row.
    """
    if not piece:
        return {r: 0.0 for r in TOKEN_REASONS}
    n_symbols = 0
    n_visible = 0
    symbols: set[str] = set()
    scripts: set[str] = set()
    has_fragment = False
    nonprintable = False
    for ch in piece:
        if ch == "\ufffd":
            has_fragment = True
            continue
        if _is_nonprintable(ch):
            nonprintable = True
        w = _char_weight(ch)
        if w is None:
            continue
        n_visible += 1
        if w > 0.0:
            n_symbols += 1
            symbols.add(ch)
        s = _char_script(ch)
        if s is not None:
            scripts.add(s)
    groups = len(scripts - _TOKEN_COMPATIBLE_SCRIPTS) + bool(scripts & _TOKEN_COMPATIBLE_SCRIPTS)
    soup = TOKEN_NONPRINTABLE_SCORE if nonprintable else (TOKEN_BYTE_FRAGMENT_SCORE if has_fragment else 0.0)
    if n_symbols and n_visible:
        # Each distinct symbol counts once: a run of one symbol is the char-run rule's business.
        soup_weight = sum(_char_weight(ch) for ch in symbols)
        soup = max(soup, _ramp(n_symbols / n_visible, TOKEN_SOUP_FRACTION_LO, TOKEN_SOUP_FRACTION_HI)
                   * _ramp(soup_weight, TOKEN_SOUP_WEIGHT_LO, TOKEN_SOUP_WEIGHT_HI))
    return {
        "char_run": _char_run_score(piece) if len(piece) >= 4 else 0.0,
        "symbol_soup": soup,
        "script_mixing": TOKEN_MIXED_SCRIPT_SCORE if groups >= 2 else 0.0,
    }


def token_anomaly_score(piece: str) -> float:
    """Anomaly prior in [0, 1] of one decoded vocabulary piece: the max of :func:`token_anomaly_reasons`."""
    return max(token_anomaly_reasons(piece).values())


_TOKEN_FLAG_CACHE: dict[tuple[str, str, int], torch.Tensor] = {}
_TOKEN_FLAG_LOCK = threading.Lock()


def _decode_vocabulary(tokenizer, vocab_size: int) -> list[str]:
    """Each id decoded on its own (byte-level pieces of a multi-byte character give U+FFFD)."""
    ids = [[i] for i in range(vocab_size)]
    if hasattr(tokenizer, "batch_decode"):
        return tokenizer.batch_decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    if hasattr(tokenizer, "decode_batch"):  # a bare `tokenizers.Tokenizer`
        return tokenizer.decode_batch(ids, skip_special_tokens=False)
    raise TypeError(
        f"token_flags needs a transformers tokenizer (batch_decode) or a tokenizers.Tokenizer "
        f"(decode_batch), got {type(tokenizer).__name__}."
    )


def _tokenizer_key(tokenizer) -> tuple[str, str, int]:
    vocab_size = len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.get_vocab_size()
    return type(tokenizer).__name__, str(getattr(tokenizer, "name_or_path", "")), int(vocab_size)


def token_flags(tokenizer) -> torch.Tensor:
    """Per-token anomaly prior for the whole vocabulary: float32 tensor ``(V,)`` in [0, 1].

    ``V = len(tokenizer)`` (added tokens included). Every id is decoded once (one batched
    call) and scored by :func:`token_anomaly_score`; ``tokenizer.all_special_ids`` get 0.
    Cached per (tokenizer class, ``name_or_path``, V); each call returns a fresh copy, so
    callers may modify it.
    """
    key = _tokenizer_key(tokenizer)
    with _TOKEN_FLAG_LOCK:
        cached = _TOKEN_FLAG_CACHE.get(key)
    if cached is None:
        vocab_size = key[2]
        flags = torch.tensor([token_anomaly_score(p) for p in _decode_vocabulary(tokenizer, vocab_size)],
                             dtype=torch.float32).reshape(-1)  # (V,)
        special = [i for i in getattr(tokenizer, "all_special_ids", []) if 0 <= i < vocab_size]
        flags[special] = 0.0
        with _TOKEN_FLAG_LOCK:
            cached = _TOKEN_FLAG_CACHE.setdefault(key, flags)
    return cached.clone()


def combine_token_flags(
    base_flags: torch.Tensor,
    discovered_ids: Iterable[int] | torch.Tensor,
    weight: float | torch.Tensor = 1.0,
) -> torch.Tensor:
    """A new flag vector with ``discovered_ids`` raised to at least ``weight``.

    ``base_flags`` (V,) is left unchanged. ``weight`` is a scalar in [0, 1] or one value per
    discovered id. Flags only go up: ``out[i] = max(base[i], weight)`` for discovered ids.
    Duplicated ids are fine (the largest weight wins).
    """
    base = torch.as_tensor(base_flags)
    if base.ndim != 1:
        raise ValueError(f"base_flags must be a 1-D (V,) tensor, got shape {tuple(base.shape)}.")
    ids = torch.as_tensor(list(discovered_ids) if not isinstance(discovered_ids, torch.Tensor) else discovered_ids)
    ids = ids.to(device=base.device, dtype=torch.long).reshape(-1)
    out = base.clone()
    if ids.numel() == 0:
        return out
    vocab_size = base.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(
            f"discovered_ids must lie in [0, {vocab_size}) (the vocabulary of base_flags), "
            f"got min {int(ids.min())}, max {int(ids.max())}."
        )
    w = torch.as_tensor(weight, dtype=out.dtype, device=out.device)
    if w.ndim == 0:
        w = w.expand(ids.shape[0])
    elif w.shape != ids.shape:
        raise ValueError(
            f"weight must be a scalar or one value per discovered id ({ids.shape[0]}), got shape {tuple(w.shape)}."
        )
    if bool(((w < 0) | (w > 1) | torch.isnan(w)).any()):
        raise ValueError("weight must lie in [0, 1] (flags are anomaly probabilities).")
    raised = torch.full_like(out, 0.0).scatter_reduce(0, ids, w, reduce="amax", include_self=True)  # (V,)
    return torch.maximum(out, raised)
