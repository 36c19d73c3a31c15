"""The answer checker on crafted completions, and the answers field of the prompt file."""

import json

import pytest

from envs.answers import answer_words, is_correct, normalize_answer
from envs.prompts import load_prompts


@pytest.mark.parametrize("text, expected", [
    ("The Forty-Four.", "44"),
    ("one hundred and forty-four", "144"),
    ("It is 1,000 km away", "it is 1000 km away"),
    ("Brasília!", "brasilia"),
    ("x = -3.5 and 1/2", "x -3.5 and 1/2"),
    ("two thousand and five", "2005"),
    ("An apple, a pear and THE plum", "apple pear and plum"),
    ("seventy-five percent", "75 percent"),
])
def test_normalisation(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize("completion, answers, correct", [
    ("The capital of Australia is Canberra.", ["Canberra"], True),
    ("CANBERRA", ["canberra"], True),  # case
    ("It's the Pacific Ocean!", ["Pacific"], True),  # punctuation around the word
    ("A spider has eight legs.", ["8"], True),  # number words on the completion's side
    ("12", ["twelve"], True),  # ... and on the answer's side
    ("There are one hundred and forty-four.", ["144"], True),
    ("The answer is 112.", ["12"], False),  # a wrong answer that contains the digits of the right one
    ("About 12.5 metres.", ["12"], False),  # a decimal is one number
    ("It is -4 degrees.", ["4"], False),  # a negative number is not its absolute value
    ("The Mona Lisa was painted by Leonardo da Vinci.", ["Leonardo", "da Vinci"], True),  # aliases
    ("It was painted by Raphael.", ["Leonardo", "da Vinci"], False),
    ("The currency is the catalogue.", ["cat"], False),  # whole words only
    ("It prints [1, 2, 3].", ["[1, 2, 3]"], True),  # brackets and commas are word breaks on both sides
    ("The chemical symbol of gold is Au.", ["Au"], True),
    ("", ["Paris"], False),
])
def test_is_correct_on_crafted_completions(completion, answers, correct):
    assert is_correct(completion, answers) is correct


def test_articles_alone_are_no_answer():
    assert answer_words("the") == []


@pytest.mark.parametrize("answers, match", [
    ("Canberra", "non-empty list"),
    ([], "non-empty list"),
    (["Paris", ""], "non-empty string"),
    (["Paris", 7], "non-empty string"),
    (["the"], "no word left"),
])
def test_malformed_answers_field_names_the_field_and_line(tmp_path, answers, match):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": "Capital of France?"}) + "\n" + json.dumps({"text": "Q?", "answers": answers}) + "\n")
    with pytest.raises(ValueError, match=match) as err:
        load_prompts(path)
    assert f"{path}:2" in str(err.value) and "'answers'" in str(err.value)


def test_answers_field_is_read_and_optional(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"text": "Capital of France?", "answers": ["Paris"]}) + "\n" +
                    json.dumps({"text": "Write a poem."}) + "\n")
    closed, open_ = load_prompts(path)
    assert closed.answers == ("Paris",) and closed.answerable
    assert open_.answers is None and not open_.answerable
