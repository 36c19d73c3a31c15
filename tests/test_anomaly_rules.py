"""Anomaly rules: crafted strings per reason, normal text stays low, vocabulary flags."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from anomaly.rules import (
    TEXT_REASONS,
    combine_token_flags,
    text_anomaly_reasons,
    text_anomaly_reasons_batch,
    text_anomaly_score,
    text_anomaly_scores,
    token_anomaly_score,
    token_flags,
)

PROSE = (
    "Temperature sampling controls how random a language model's output is. At low "
    "temperatures the model picks the most likely word almost every time, which makes the "
    "text predictable and sometimes repetitive. At high temperatures the distribution "
    "flattens, so rarer words appear more often and the text becomes more varied, but also "
    "more likely to wander off topic."
)

PYTHON = '''def mean(values: list[float]) -> float:
    """Return the arithmetic mean of `values`."""
    if not values:
        raise ValueError("values is empty")
    total = 0.0
    for v in values:
        total += v
    return total / len(values)


class Point:
    def __init__(self, x: float, y: float) -> None:
        self.x, self.y = x, y

    @property
    def norm(self) -> float:
        return (self.x ** 2 + self.y ** 2) ** 0.5  # Euclidean, 100% exact
'''

MARKDOWN_LIST = (
    "Here is how to start:\n\n- **Step 1:** install Python.\n- **Step 2:** run "
    "`pip install kelvin`.\n- **Step 3:** read the docs.\n\n1. apples\n2. bananas\n3. cherries"
)

NORMAL_TEXTS = {
    "prose": PROSE,
    "python": PYTHON,
    "markdown_list": MARKDOWN_LIST,
    "shell": "ls -la ~/data | grep csv && echo $HOME > /tmp/out.txt",
    "latex": r"The energy is $E = \frac{1}{2} m v^2$ and $\sum_i x_i^2 \le \alpha$.",
    "chinese_with_latin": "我喜欢使用Python编程，也喜欢用PyTorch训练模型。日本語のテキストも混ざる。",
    "russian_with_latin": "Я использую Python и PyTorch для обучения моделей.",
    "greek_symbols": "where α and β are parameters, γ is the learning rate and ε a small constant.",
    "emoji": "Great job! 🎉 You did it 😊",
    "rule": "Results\n" + "=" * 40 + "\n| a | b |\n|---|---|\n| 1 | 2 |",
    "big_number": "The population grew from 1000000 to 25000000 in a century.",
    "javascript": (
        "const button = document.getElementById('submit');\n"
        "button.addEventListener('click', () => fetchUserProfile(userId).then(renderProfilePage));"
    ),
    "brand_names": "I use JavaScript and TypeScript in PowerPoint, LinkedIn and WordPress, plus TensorFlow.",
    "long_words": "Internationalization and the Donaudampfschifffahrtsgesellschaft are long words.",
}

# SmolLM2-135M-Instruct at T = -1 over the full vocabulary (40 tokens, seed 0): word salad.
NEGATIVE_T_SAMPLE = (
    " arsen Pregn interspersMetaInfoevelopedemeteries]// affilifaissunsqueezeyalgia oprotortunately "
    "Bordaderie carbohydAlmostEqualgetcwd recognising hemisp pancreatitisgetcwd Penn colonel|'\\ "
    "collabolicy\ufffdIntf pestic dilemuthors MontgomeryemeteriesMetaInfo Narratives]//emeteryuthors Boy"
)


def test_reason_names_and_ranges():
    reasons = text_anomaly_reasons("anything at all")
    assert tuple(reasons) == TEXT_REASONS
    assert all(0.0 <= v <= 1.0 for v in reasons.values())
    assert text_anomaly_reasons("") == {r: 0.0 for r in TEXT_REASONS}
    with pytest.raises(TypeError):
        text_anomaly_reasons(None)


def test_token_repetition():
    text = "Temperature is a concept emeteries emeteries MetaInfo emeteries MetaInfo MetaInfo emeteries"
    reasons = text_anomaly_reasons(text)
    # Last 8 words: 3 distinct, 5 repeats of content words -> 5/8 = 0.625 -> ramp = 1.
    assert reasons["token_repetition"] == pytest.approx(1.0)
    assert text_anomaly_score(text) == pytest.approx(1.0)
    # A loop of a function word counts half: 7 repeats * 0.5 / 8 = 0.4375 -> 0.5.
    assert text_anomaly_reasons("the the the the the the the the")["token_repetition"] == pytest.approx(0.5)
    assert text_anomaly_reasons("a b c")["token_repetition"] == 0.0  # too few words


def test_char_run():
    assert text_anomaly_reasons("!!!!!!!!!!!!")["char_run"] == pytest.approx(1.0)  # run 12
    assert text_anomaly_reasons("Wow!!!")["char_run"] == 0.0  # run 3: below 4
    assert text_anomaly_reasons("aaaaaaa")["char_run"] == pytest.approx((7 - 3) / 9)
    assert text_anomaly_reasons("x" + " " * 40 + "y")["char_run"] == 0.0  # whitespace ignored
    assert text_anomaly_reasons("-" * 80)["char_run"] == pytest.approx((80 - 40) / 120)  # separator


def test_symbol_soup():
    assert text_anomaly_reasons("@#$%^&*~|\\`@#$^~")["symbol_soup"] == pytest.approx(1.0)
    garbage = "The answer is \ufffd\ufffd\ufffd \u200b\u200b ⍟⏃⎔ and more"
    assert text_anomaly_reasons(garbage)["symbol_soup"] > 0.8
    # A burst inside long prose is found by the sliding window.
    assert text_anomaly_reasons(PROSE + " ⍟⏃⎔⌬⍾⎈⌘⏚ " + PROSE)["symbol_soup"] > 0.8
    assert text_anomaly_reasons("Tom & Jerry")["symbol_soup"] < 0.1


def test_script_mixing():
    assert text_anomaly_reasons("Hello мир 世界 مرحبا")["script_mixing"] == pytest.approx(1.0)
    # Alternating scripts letter by letter (two scripts, many switches).
    assert text_anomaly_reasons("aбaбaбaбaбaбaбaбaб")["script_mixing"] > 0.9
    # Japanese mixes Kanji, Hiragana and Katakana: one CJK group.
    assert text_anomaly_reasons("日本語のテキストです")["script_mixing"] == 0.0


def test_glued_words():
    # 18 words, 4 glued: "interspers|MetaInfo..." (hump), "affilifaissunsqueezeyalgia" (26 letters),
    # "carbohyd|AlmostEqual..." and "Montgomeryemeteries|MetaInfo" -> 4/18 = 0.222 -> 0.86.
    reasons = text_anomaly_reasons(NEGATIVE_T_SAMPLE)
    assert reasons["glued_words"] == pytest.approx((4 / 18 - 0.05) / 0.20)
    assert text_anomaly_score(NEGATIVE_T_SAMPLE) > 0.8
    # Code identifiers attached to code punctuation never count.
    assert text_anomaly_reasons("self.assertAlmostEqual(result, expected)")["glued_words"] == 0.0
    # One long word in a short text: 1 / max(4, 12) -> 0.17.
    assert text_anomaly_reasons("see pancreatitisgetcwdMetaInfo here")["glued_words"] == pytest.approx(
        (1 / 12 - 0.05) / 0.20
    )


@pytest.mark.parametrize("name", sorted(NORMAL_TEXTS))
def test_normal_text_scores_low(name):
    reasons = text_anomaly_reasons(NORMAL_TEXTS[name])
    assert max(reasons.values()) < 0.3, reasons


def test_batch_api_matches_single():
    texts = [PROSE, "!!!!!!!!!!!!", "Hello мир 世界 مرحبا"]
    scores = text_anomaly_scores(texts)
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert scores.tolist() == pytest.approx([text_anomaly_score(t) for t in texts])
    batch = text_anomaly_reasons_batch(texts)
    assert set(batch) == set(TEXT_REASONS)
    assert batch["char_run"].tolist() == pytest.approx([0.0, 1.0, 0.0])


# ----------------------------------------------------------------------------- token level


def test_token_anomaly_score_pieces():
    for normal in ["hello", " the", "##ing", "()", '"""', "...", "::", "@", "||", "😊", "の日本", ""]:
        assert token_anomaly_score(normal) == 0.0, normal
    assert token_anomaly_score("\x1a") == 1.0  # control character
    assert token_anomaly_score("\u200b") == 1.0  # zero-width space
    assert token_anomaly_score("\ufffd") == 0.5  # byte fragment
    assert token_anomaly_score("aб") == 1.0  # two scripts inside one token
    assert token_anomaly_score("@$^~") == pytest.approx(0.5)  # 4 rare symbols, weight 2
    assert token_anomaly_score("!!!!!!!!") == pytest.approx((8 - 3) / 9)


class _StubTokenizer:
    """The few tokenizer members token_flags reads."""

    name_or_path = "stub-tokenizer"

    def __init__(self, pieces: list[str], special: list[int]):
        self.pieces = pieces
        self.all_special_ids = special

    def __len__(self) -> int:
        return len(self.pieces)

    def batch_decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return ["".join(self.pieces[i] for i in row) for row in ids]


def test_token_flags_stub_special_ids_zero():
    pieces = ["<s>", "hello", "\x00", "\ufffd", "@$^~", "aб", "</s>\x00"]
    flags = token_flags(_StubTokenizer(pieces, special=[0, 6]))
    assert flags.shape == (7,) and flags.dtype == torch.float32
    assert flags.tolist() == pytest.approx([0.0, 0.0, 1.0, 0.5, 0.5, 1.0, 0.0])


@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from envs.embedder import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()), local_files_only=True)


def test_token_flags_real_tokenizer(minilm_tokenizer):
    tok = minilm_tokenizer
    flags = token_flags(tok)  # ~0.6 s for 30522 pieces on one core (no time is asserted: machines are noisy)
    assert flags.shape == (len(tok),)
    assert float(flags.min()) >= 0.0 and float(flags.max()) <= 1.0
    for word in ["the", "temperature", "volcano", "##ing", "(", "."]:
        assert flags[tok.convert_tokens_to_ids(word)] == 0.0, word
    assert all(flags[i] == 0.0 for i in tok.all_special_ids)
    # Cached: same values, fresh copy each call.
    again = token_flags(tok)
    assert torch.equal(again, flags) and again is not flags
    again[0] = 1.0
    assert token_flags(tok)[0] == 0.0


def test_combine_token_flags():
    base = torch.tensor([0.0, 0.2, 0.9, 0.0])
    out = combine_token_flags(base, [1, 2, 2])
    assert out.tolist() == pytest.approx([0.0, 1.0, 1.0, 0.0])
    assert base.tolist() == pytest.approx([0.0, 0.2, 0.9, 0.0])  # input untouched
    # Flags only go up; per-id weights.
    out = combine_token_flags(base, torch.tensor([1, 2, 3]), weight=torch.tensor([0.5, 0.5, 0.7]))
    assert out.tolist() == pytest.approx([0.0, 0.5, 0.9, 0.7])
    assert torch.equal(combine_token_flags(base, []), base)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        combine_token_flags(base, [4])
    with pytest.raises(ValueError, match="weight"):
        combine_token_flags(base, [1], weight=1.5)
