"""Prompt sets for the temperature environment.

The packaged set (``envs/data/prompts.jsonl``) holds short chat requests in seven task
categories: 300 open prompts (creative writing, explanation, code, brainstorming, summarisation;
split about 70/15/15) and 179 answerable ones (factual questions, short arithmetic, "what does this
code print"; split about 55/20/25, so that held-out accuracy rests on enough prompts). The
answerable prompts are those SmolLM2-135M-Instruct answers correctly greedily or in at least one of
three draws at T = 0.7 (greedy accuracy 0.70, at T = 0.7 0.58, at T = 1.0 0.34, at T = 1.5 0.04: heat
visibly costs accuracy), and none of them contains its own answer. A line is

    {"id": "creative-001", "text": "...", "category": "creative_writing", "split": "train"}
    {"id": "math-004", "text": "What is 7 times 8?", "category": "math", "split": "test", "answers": ["56"]}

A prompt with ``answers`` (a non-empty list of accepted strings) is **answerable**: the reward's
``correct`` component and the evaluation's accuracy check the completion against it
(:mod:`envs.answers`). The others are open prompts.

``load_prompts`` reads that file or a user file (``.jsonl`` in the same format, or a
``.txt`` file with one prompt per line) and filters it by split and category.

The category conditions the policy: the observation's feature spec maps a name to its slot in a
one-hot of ``len(CATEGORIES) + 1`` entries (:meth:`policies.features.FeatureSpec.category_slot`), the
last slot meaning "other" (any category outside ``CATEGORIES``, such as ``"general"``). A name that is a near-miss
of a built-in one (``"factual_questoin"``, ``"summarization"``, ``"Math"``) is refused with the
name it misses: it would silently become "other".
"""

from __future__ import annotations

import importlib.resources
import json
import os
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from envs.answers import check_answers_field
from samplers.suggest import did_you_mean

__all__ = [
    "CATEGORIES",
    "DEFAULT_CATEGORY",
    "SPLITS",
    "Prompt",
    "category_shares",
    "load_prompts",
    "select_prompts",
]

#: The task categories, in the fixed order of the observation's category one-hot.
CATEGORIES: tuple[str, ...] = (
    "creative_writing",
    "explanation",
    "code",
    "brainstorming",
    "factual_question",
    "summarisation",
    "math",
)

#: Valid values of a prompt's ``split`` field and of ``load_prompts(split=...)``.
SPLITS: tuple[str, ...] = ("train", "validation", "test")

#: Category given to prompts whose file does not name one (JSONL without "category", .txt).
DEFAULT_CATEGORY: str = "general"

_ACCEPTED_FORMATS = (
    ".jsonl (one JSON object per line with a 'text' field and optional "
    "'category', 'id', 'split') or .txt (one prompt per non-empty line)"
)


@dataclass(frozen=True)
class Prompt:
    """One user message to condition generation on.

    Attributes:
        text: The message given to the chat model.
        category: Task category; one of CATEGORIES, or any other name (one-hot slot "other").
        id: Identifier, unique within its file.
        split: "train", "validation" or "test"; None when the file does not say.
        answers: Accepted answers (checked by :func:`envs.answers.is_correct`); None for an
            open prompt.
    """

    text: str
    category: str
    id: str
    split: str | None = None
    answers: tuple[str, ...] | None = None

    @property
    def answerable(self) -> bool:
        """True when the prompt has accepted answers (the ``correct`` reward and accuracy apply)."""
        return self.answers is not None


def load_prompts(
    source: str | os.PathLike[str] | None = None,
    split: str | None = None,
    categories: Iterable[str] | str | None = None,
) -> list[Prompt]:
    """Load prompts from the packaged set or a user file, in file order.

    Args:
        source: None for the packaged set; else a path to a ``.jsonl`` file (``text``
            required; ``category`` defaults to ``"general"``, ``id`` to
            ``"<file stem>-<line number>"``, ``split`` to None; other fields are ignored)
            or a ``.txt`` file (one prompt per non-empty line, category ``"general"``,
            no split).
        split: "train", "validation", "test", or None for all. If the file has no split
            fields at all, every prompt is kept whatever split is asked (the file is
            treated as unsplit). If it has split fields, only prompts of that split are
            kept (prompts without a split are dropped).
        categories: Category names to keep (a single name is accepted too), or None for
            all. Names must be in CATEGORIES or appear in the file.

    Returns:
        The matching prompts; never empty.

    Raises:
        FileNotFoundError: ``source`` does not exist or is not a file.
        ValueError: Unsupported extension, empty file, malformed line (with file:line),
            invalid field, duplicate id, unknown split or category name (with the closest
            valid name), or no prompt left after filtering.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(
            f"Unknown split {split!r}{_suggestion(split, SPLITS)} "
            f"Valid splits: {', '.join(SPLITS)} (or None for all)."
        )
    if isinstance(categories, str):
        categories = [categories]
    wanted = None if categories is None else list(categories)

    if source is None:
        # joinpath with one argument at a time: Python 3.10 accepts no more
        resource = (
            importlib.resources.files(__package__ or "envs")
            .joinpath("data")
            .joinpath("prompts.jsonl")
        )
        with importlib.resources.as_file(resource) as packaged:
            prompts = _read_file(Path(packaged))
        label = "the packaged prompt set"
    else:
        path = Path(source).expanduser()
        prompts = _read_file(path)
        label = str(path)

    present_categories = sorted({p.category for p in prompts})
    present_splits = sorted({p.split for p in prompts if p.split is not None})

    if wanted is not None:
        known = list(CATEGORIES) + [c for c in present_categories if c not in CATEGORIES]
        for name in wanted:
            if name not in known:
                raise ValueError(
                    f"Unknown category {name!r} in categories={wanted!r}"
                    f"{_suggestion(name, known)} Valid names: {', '.join(known)} "
                    f"(the built-in categories plus those found in {label})."
                )
        prompts = [p for p in prompts if p.category in wanted]

    if split is not None and present_splits:
        prompts = [p for p in prompts if p.split == split]

    if not prompts:
        raise ValueError(
            f"No prompts in {label} for split={split!r} and categories={wanted!r}. "
            f"It has splits [{', '.join(present_splits) or 'none'}] and categories "
            f"[{', '.join(present_categories)}]; ask for a combination that exists."
        )
    return prompts


def category_shares(prompts: Sequence[Prompt]) -> dict[str, float]:
    """Each category's share of ``prompts`` ({category: count / len}, in order of first appearance): the weights
    that make a score over equal shares of the categories answer for the split's mix."""
    counts = Counter(p.category for p in prompts)
    return {c: n / len(prompts) for c, n in counts.items()}


def select_prompts(prompts: Sequence[Prompt], max_prompts: int | None, mix: str = "equal") -> list[Prompt]:
    """The first ``max_prompts`` prompts taken round-robin over categories (file order within each).

    ``mix`` sets how many each category gives: ``"equal"``, as many as it can (a category out of prompts drops out
    of the round); ``"split"``, its share of ``prompts`` (largest remainders, ties to the category met first), so
    the selection's mean estimates the mean over all of ``prompts``: the validation split holds 29 factual
    questions of 80, which give 4 of an equal 32 and 12 of a split-mixed 32."""
    prompts = list(prompts)
    if mix not in ("equal", "split"):
        raise ValueError(f"mix={mix!r}: use 'equal' (as many prompts per category) or 'split' (the split's shares)")
    if max_prompts is None or max_prompts >= len(prompts):
        return prompts
    by_cat: OrderedDict[str, list[Prompt]] = OrderedDict()
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    if mix == "split":
        shares = [max_prompts * len(items) for items in by_cat.values()]  # in units of 1 / len(prompts)
        quota = [share // len(prompts) for share in shares]
        by_remainder = sorted(range(len(shares)), key=lambda c: (-(shares[c] % len(prompts)), c))
        for c in by_remainder[:max_prompts - sum(quota)]:
            quota[c] += 1
        by_cat = OrderedDict((cat, items[:q]) for (cat, items), q in zip(by_cat.items(), quota))
    out: list[Prompt] = []
    i = 0
    while len(out) < max_prompts:
        for items in by_cat.values():
            if i < len(items) and len(out) < max_prompts:
                out.append(items[i])
        i += 1
    return out


def _read_file(path: Path) -> list[Prompt]:
    """Parse a .jsonl or .txt prompt file into prompts (unfiltered, non-empty)."""
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"Prompt file {str(path)!r} {what}. Pass a path to {_ACCEPTED_FORMATS}, "
            "or source=None for the packaged set."
        )
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".txt"):
        raise ValueError(
            f"Prompt file {str(path)!r} has unsupported extension {suffix or '(none)'!r}. "
            f"Accepted formats: {_ACCEPTED_FORMATS}."
        )
    try:
        with path.open(encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ValueError(
            f"Prompt file {str(path)!r} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at line {line}): "
            f"is it a binary file? Pass a path to {_ACCEPTED_FORMATS}."
        ) from None

    prompts: list[Prompt] = []
    if suffix == ".txt":
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                prompts.append(
                    Prompt(line.strip(), DEFAULT_CATEGORY, f"{path.stem}-{lineno}", None)
                )
    else:
        first_line_of: dict[str, int] = {}
        for lineno, line in enumerate(lines, start=1):
            if line.strip():
                prompt = _parse_jsonl_line(line, path, lineno)
                if prompt.id in first_line_of:
                    raise ValueError(
                        f"{path}:{lineno}: duplicate id {prompt.id!r} (first used on line "
                        f"{first_line_of[prompt.id]}). Give every prompt a unique 'id', "
                        "or omit 'id' to number prompts by line."
                    )
                first_line_of[prompt.id] = lineno
                prompts.append(prompt)

    if not prompts:
        raise ValueError(
            f"Prompt file {str(path)!r} contains no prompts. Add at least one: "
            f"{_ACCEPTED_FORMATS}."
        )
    return prompts


def _parse_jsonl_line(line: str, path: Path, lineno: int) -> Prompt:
    """Parse and validate one JSONL line; errors name the file and line."""
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{where}: malformed JSON ({exc.msg} at column {exc.colno}). Each line must "
            'be one JSON object, e.g. {"text": "Write a haiku about rain."}.'
        ) from None
    if not isinstance(record, dict):
        raise ValueError(
            f"{where}: expected a JSON object with a 'text' field, got "
            f"{type(record).__name__}."
        )

    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        problem = "is missing" if text is None else f"is empty or not a string ({text!r})"
        raise ValueError(
            f"{where}: field 'text' {problem}. Every line needs a non-empty 'text' string."
        )

    category = record.get("category", DEFAULT_CATEGORY)
    if not isinstance(category, str) or not category.strip():
        raise ValueError(
            f"{where}: field 'category' must be a non-empty string, got {category!r}. "
            f"Omit it to use {DEFAULT_CATEGORY!r}."
        )

    category = category.strip()
    if category not in CATEGORIES:  # a name of one's own conditions the policy as "other"; a near-miss is a typo
        hint = did_you_mean(category, CATEGORIES, cutoff=0.8)
        if hint.startswith("did you mean"):
            raise ValueError(
                f"{where}: category {category!r} is not one of the built-in categories ({hint}); fix the "
                f"spelling (a name outside {', '.join(CATEGORIES)} conditions the policy as 'other')."
            )

    prompt_id = record.get("id", f"{path.stem}-{lineno}")
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)) or not str(
        prompt_id
    ).strip():
        raise ValueError(
            f"{where}: field 'id' must be a non-empty string or integer, got {prompt_id!r}. "
            "Omit it to number prompts by line."
        )

    split = record.get("split")
    if split is not None and split not in SPLITS:
        raise ValueError(
            f"{where}: field 'split' is {split!r}{_suggestion(str(split), SPLITS)} "
            f"Valid splits: {', '.join(SPLITS)}; omit the field for an unsplit prompt."
        )

    answers = check_answers_field(record.get("answers"), where)
    return Prompt(text.strip(), category, str(prompt_id), split, answers)


def _suggestion(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean X?).' for the closest choice (:func:`samplers.core.did_you_mean`), or '.'."""
    hint = did_you_mean(name, choices)
    return f" ({hint})." if hint.startswith("did you mean") else "."
