"""Tests for the packaged prompt set and the prompt loader (envs/prompts.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from envs.prompts import (
    CATEGORIES,
    DEFAULT_CATEGORY,
    SPLITS,
    Prompt,
    load_prompts,
)


@pytest.fixture(scope="module")
def packaged() -> list[Prompt]:
    return load_prompts()


def _write_jsonl(path, records) -> None:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")


# --- the packaged set --------------------------------------------------------------


def test_categories_fixed_order():  # the order of the observation's category one-hot: a trained policy depends on it
    assert CATEGORIES == ("creative_writing", "explanation", "code", "brainstorming", "factual_question",
                          "summarisation", "math")


def test_packaged_size_and_balance(packaged):
    assert len(packaged) == 479
    counts = Counter(p.category for p in packaged)
    assert set(counts) == set(CATEGORIES)
    assert all(counts[c] >= 50 for c in CATEGORIES if c != "math"), counts
    assert counts["math"] >= 20


def test_packaged_every_split_nonempty_per_category(packaged):
    counts = Counter((p.category, p.split) for p in packaged)
    for category in CATEGORIES:
        for split in SPLITS:
            assert counts[category, split] > 0, (category, split)
        total = sum(counts[category, s] for s in SPLITS)
        assert counts[category, "train"] / total >= 0.5


def test_packaged_answerable_prompts(packaged):
    from envs.answers import is_correct

    answerable = [p for p in packaged if p.answerable]
    assert len(answerable) == 179
    assert sum(not p.id.startswith("factual-") for p in answerable) >= 80  # the ones added beside the factual set
    assert Counter(p.split for p in answerable) == {"train": 103, "validation": 35, "test": 41}
    assert {p.category for p in answerable} == {"factual_question", "math", "code"}
    assert all(p.category != "factual_question" for p in packaged if not p.answerable)
    for p in answerable:  # echoing the prompt never counts as answering it
        assert not is_correct(p.text, p.answers), p.id


def test_packaged_ids_and_texts_unique(packaged):
    ids = [p.id for p in packaged]
    assert len(set(ids)) == len(ids)
    texts = [" ".join(p.text.lower().split()) for p in packaged]
    assert len(set(texts)) == len(texts)


def test_packaged_prompts_short(packaged):
    words = [len(p.text.split()) for p in packaged]
    assert max(words) <= 120
    assert sum(w < 40 for w in words) > len(words) / 2


def test_packaged_summarisation_contains_passage(packaged):
    # The passage to summarise is part of the prompt, so these are the longest prompts.
    for p in packaged:
        if p.category == "summarisation":
            assert len(p.text.split()) >= 25, p.id


def test_packaged_fields_valid(packaged):
    for p in packaged:
        assert isinstance(p, Prompt)
        assert p.text.strip() == p.text and p.text
        assert p.split in SPLITS


def test_splits_disjoint_and_complete(packaged):
    by_split = {s: load_prompts(split=s) for s in SPLITS}
    ids = {s: {p.id for p in ps} for s, ps in by_split.items()}
    texts = {s: {p.text for p in ps} for s, ps in by_split.items()}
    for a, b in [("train", "validation"), ("train", "test"), ("validation", "test")]:
        assert not ids[a] & ids[b]
        assert not texts[a] & texts[b]
    assert set().union(*ids.values()) == {p.id for p in packaged}
    for s, ps in by_split.items():
        assert all(p.split == s for p in ps)


def test_filter_by_category_and_split(packaged):
    code = load_prompts(categories=["code"])
    assert code and all(p.category == "code" for p in code)
    assert len(code) == sum(p.category == "code" for p in packaged)

    two = load_prompts(split="test", categories=["explanation", "summarisation"])
    assert {p.category for p in two} == {"explanation", "summarisation"}
    assert all(p.split == "test" for p in two)

    # a single name is accepted as well as a list
    assert load_prompts(categories="code") == code


def test_loading_is_deterministic(packaged):
    assert load_prompts() == packaged


# --- user files ----------------------------------------------------------------------


def test_user_jsonl_defaults(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        json.dumps({"text": "Write a haiku about tea.", "category": "creative_writing"})
        + "\n\n"  # blank lines are skipped
        + json.dumps({"text": "  Say hello.  ", "id": "hello", "extra": 1})
        + "\n"
        + json.dumps({"text": "Plan a picnic.", "category": "planning", "id": 7})
        + "\n",
        encoding="utf-8",
    )
    prompts = load_prompts(path)
    assert prompts == [
        Prompt("Write a haiku about tea.", "creative_writing", "mine-1", None),
        Prompt("Say hello.", DEFAULT_CATEGORY, "hello", None),
        Prompt("Plan a picnic.", "planning", "7", None),
    ]
    # no split fields in the file: any split keeps every prompt
    assert load_prompts(str(path), split="test") == prompts
    # categories found in the file are valid filter names
    assert [p.id for p in load_prompts(path, categories=["planning"])] == ["7"]


def test_user_jsonl_with_splits(tmp_path):
    path = tmp_path / "split.jsonl"
    _write_jsonl(
        path,
        [
            {"text": "a", "split": "train"},
            {"text": "b", "split": "test"},
            {"text": "c"},
        ],
    )
    assert [p.text for p in load_prompts(path, split="test")] == ["b"]
    with pytest.raises(ValueError, match=r"split='validation'.*splits \[test, train\]"):
        load_prompts(path, split="validation")


def test_user_txt(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("First prompt.\n\n   \nSecond prompt.  \n", encoding="utf-8")
    prompts = load_prompts(path)
    assert prompts == [
        Prompt("First prompt.", "general", "list-1", None),
        Prompt("Second prompt.", "general", "list-4", None),
    ]
    assert load_prompts(path, split="train") == prompts


# --- errors ----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "absent.jsonl"
    with pytest.raises(FileNotFoundError, match=r"absent\.jsonl.*does not exist.*\.jsonl.*\.txt"):
        load_prompts(path)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_prompts(tmp_path)


@pytest.mark.parametrize("name,content,match", [
    ("prompts.csv", "text\nhello\n", r"unsupported extension '\.csv'.*Accepted formats"),
    ("empty.jsonl", "", "contains no prompts"),
    ("blank.txt", "\n  \n", "contains no prompts"),
    ("bad.jsonl", '{"text": "ok"}\n{"text": "broken"\n', r"bad\.jsonl:2: malformed JSON"),
    ("list.jsonl", '["text", "hi"]\n', r"list\.jsonl:1: expected a JSON object"),
])
def test_a_bad_file_names_its_problem(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_prompts(path)


@pytest.mark.parametrize(
    "record,match",
    [
        ({"category": "code"}, r"notext\.jsonl:2: field 'text' is missing"),
        ({"text": "   "}, r"notext\.jsonl:2: field 'text' is empty"),
        ({"text": 3}, r"notext\.jsonl:2: field 'text' is empty or not a string"),
    ],
)
def test_missing_or_empty_text(tmp_path, record, match):
    path = tmp_path / "notext.jsonl"
    _write_jsonl(path, [{"text": "fine"}, record])
    with pytest.raises(ValueError, match=match):
        load_prompts(path)


def test_invalid_split_value_in_file(tmp_path):
    path = tmp_path / "dev.jsonl"
    _write_jsonl(path, [{"text": "a", "split": "tset"}])
    with pytest.raises(ValueError, match=r"dev\.jsonl:1: field 'split'.*did you mean 'test'"):
        load_prompts(path)


def test_duplicate_id(tmp_path):
    path = tmp_path / "dup.jsonl"
    _write_jsonl(path, [{"text": "a", "id": "x"}, {"text": "b", "id": "x"}])
    with pytest.raises(ValueError, match=r"dup\.jsonl:2: duplicate id 'x' \(first used on line 1"):
        load_prompts(path)


def test_unknown_split_name_suggests_closest():
    with pytest.raises(ValueError, match=r"Unknown split 'validaton' \(did you mean 'validation'"):
        load_prompts(split="validaton")


def test_unknown_category_filter_suggests_closest():
    with pytest.raises(
        ValueError, match=r"Unknown category 'summarization'.*did you mean 'summarisation'"
    ):
        load_prompts(categories=["code", "summarization"])


def test_no_prompts_after_filtering(tmp_path):
    path = tmp_path / "few.jsonl"
    _write_jsonl(path, [{"text": "a", "category": "code", "split": "train"}])
    # 'explanation' is a built-in name, so it is valid, but the file has none of it
    with pytest.raises(
        ValueError, match=r"No prompts .* categories=\['explanation'\].*categories \[code\]"
    ):
        load_prompts(path, categories=["explanation"])


# --- category slots (policies.features.FeatureSpec, the one home of the mapping) -----------


def test_category_slots_of_the_env_spec():
    from envs.generation import EnvConfig
    from policies.features import OTHER_CATEGORY

    spec = EnvConfig().feature_spec()
    assert spec.category_slots == (*CATEGORIES, OTHER_CATEGORY)
    assert [spec.category_slot(c) for c in CATEGORIES] == list(range(len(CATEGORIES)))
    assert spec.category_slot(DEFAULT_CATEGORY) == spec.category_slot("no_such_category") == len(CATEGORIES)
    assert [n for n in spec.names if n.startswith("category_")] == [f"category_{c}" for c in spec.category_slots]
    assert spec.category_rows(["math", None, "other", 2], 4) == [CATEGORIES.index("math"), 7, 7, 2]
    with pytest.raises(ValueError, match="unknown category 'mth'; did you mean 'math'"):
        spec.category_rows("mth", 2)
    with pytest.raises(ValueError, match="must be a name"):
        spec.category_rows(True, 1)
    assert EnvConfig(include_category=False).feature_spec().category_slots == ()
