"""The reward's arithmetic (envs/rewards.py) on hand-made inputs: repetition, the diversity components on known
vectors and bigrams, correctness, the group's leave-one-out baseline and the exact diversity credit. The same
rewards inside the env: tests/test_env.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from envs.generation import TemperatureVecEnv
from envs.rewards import (CREDIT_TERMS, EPISODE_COMPONENTS, STEP_COMPONENTS, RewardConfig, RewardFunction,
                          closes_repeated_ngram, group_ngram_terms, leave_one_out_baseline)
from stub_lm import NO_EMBEDDER, STUB_PROMPTS, StubLM, stub_config


def test_closes_repeated_ngram_directly():
    tokens = torch.tensor([[3, 4, 5, 3, 4, 5], [3, 4, 5, 6, 7, 1]])
    closes = [closes_repeated_ngram(tokens, torch.tensor([p, p]), 3).tolist() for p in range(6)]
    assert closes == [[False, False], [False, False], [False, False], [False, False], [False, False],
                      [True, False]]


class _FixedEmbedder:
    """Embeds each text as the vector given for it (the reward's diversity maths on known cosines)."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors

    def encode(self, texts):
        return torch.nn.functional.normalize(torch.tensor([self.vectors[t] for t in texts], dtype=torch.float32), dim=-1)


def test_group_semantic_on_three_embeddings_with_known_cosines():
    """e1 = (1, 0, 0), e2 = (0, 1, 0), e3 = (1, 1, 0) / sqrt 2: cos12 = 0, cos13 = cos23 = 1/sqrt 2.
    Each sample's distance to the others: (1 + (1 - 0.70711)) / 2 = 0.64645 for e1 and e2,
    (1 - 0.70711) = 0.29289 for e3; a second group of one sample has no other: 0."""
    vectors = {"a": [1, 0, 0], "b": [0, 1, 0], "c": [1, 1, 0], "d": [0, 0, 1], "p": [0, 0, 1]}
    model = RewardFunction(RewardConfig(coherence=1.0), embedder=_FixedEmbedder(vectors))
    out = model.episode_components([[0, 1, 2], [3]], ["q", "q", "q", "r"], ["p"] * 4, [None] * 4,
                                   ["a", "b", "c", "d"], [[1], [2], [3], [4]])
    assert out["group_semantic"].tolist() == pytest.approx([0.646447, 0.646447, 0.292893, 0.0], abs=1e-6)
    assert out["coherence"].tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0], abs=1e-6)  # cosine to "p"


def test_group_ngram_counts_the_bigrams_no_other_sample_has():
    model = RewardFunction(NO_EMBEDDER)
    tokens = [[1, 2, 3, 4], [1, 2, 5, 6], [7, 8], [9]]
    out = model.episode_components([[0, 1, 2], [3]], ["q"] * 4, ["p"] * 4, [None] * 4, ["x"] * 4, tokens)
    # sample 0: bigrams (1,2) (2,3) (3,4), (1,2) also in sample 1 -> 2/3; sample 1: (1,2) (2,5) (5,6) -> 2/3;
    # sample 2: (7,8) alone -> 1; sample 3: no bigram -> 0
    assert out["group_ngram"].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0, 0.0])
    assert out["coherence"].tolist() == [0.0] * 4 and out["group_semantic"].tolist() == [0.0] * 4


def test_correct_only_on_answerable_prompts():
    model = RewardFunction(NO_EMBEDDER)
    out = model.episode_components([[0], [1], [2]], ["q1", "q2", "q3"], ["p"] * 3, [["12", "twelve"], ["Paris"], None],
                                   ["It is Twelve.", "It is Lyon.", "Twelve"], [[1]] * 3)
    assert out["correct"].tolist() == [1.0, 0.0, 0.0]


def test_leave_one_out_baseline_by_hand():
    model = RewardFunction(NO_EMBEDDER)  # quality weights: logprob 1, repetition 0.5, anomaly 1, coherence 0, text 4, correct 6
    sums = {k: np.zeros(3) for k in STEP_COMPONENTS + EPISODE_COMPONENTS}
    sums["logprob"] = np.array([-1.0, -2.0, -4.0])
    sums["correct"] = np.array([1.0, 0.0, 1.0])
    sums["group_semantic"] = np.array([9.0, 9.0, 9.0])  # diversity: not part of the quality return
    quality = model.quality_return(sums)
    assert quality.tolist() == pytest.approx([5.0, -2.0, 2.0])
    # group [0, 1] and a sample alone: minus the mean of the others, nothing for a group of one
    assert leave_one_out_baseline([[0, 1], [2]], quality).tolist() == pytest.approx([2.0, -5.0, 0.0])
    assert leave_one_out_baseline([[0, 1, 2]], quality).tolist() == pytest.approx([0.0, -3.5, -1.5])
    assert model.group_baseline([[0, 1], [2]], sums).tolist() == pytest.approx([2.0, -5.0, 0.0])


def test_group_ngram_terms_by_hand():
    # a = (1 2 3) and b = (2 3 4) share (2 3), which no one else has: each halves the other's novel share, c alone;
    # their own novel shares from the same pass: 1 of 2 bigrams each for a and b, c's one bigram
    novel, effect = group_ngram_terms([(1, 2, 3), (2, 3, 4), (5, 6)])
    assert (novel.tolist(), effect.tolist()) == ([0.5, 0.5, 1.0], [-0.5, -0.5, 0.0])
    model = RewardFunction(NO_EMBEDDER)
    tokens = [[1, 2, 3, 4], [1, 2, 5, 6], [7, 8], [9]]
    out = model.episode_components([[0, 1, 2], [3]], ["q"] * 4, ["p"] * 4, [None] * 4, ["x"] * 4, tokens)
    # sample 0 takes (1 2) from sample 1's 3 bigrams (1/3) and sample 1 from sample 0's; a group of one: 0
    assert out["group_ngram_effect"].tolist() == pytest.approx([-1 / 3, -1 / 3, 0.0, 0.0])


def test_exact_credit_moves_with_the_groups_total_ngram_diversity():
    # what sample 0's own novelty and its effect on the others gain when its tokens change is exactly what the
    # group's total group_ngram gains: the credit is the gradient of the group's total, not twice its own term
    model = RewardFunction(NO_EMBEDDER)
    others = [[1, 2, 5, 6], [2, 3, 7], [6, 9, 9]]
    for before, after in (([1, 2, 3, 4], [8, 8, 8]), ([5, 6, 9], [1, 2, 3]), ([2, 3], [2, 3, 7, 1])):
        totals, credits = [], []
        for first in (before, after):
            tokens = [first, *others]
            out = model.episode_components([[0, 1, 2, 3]], ["q"] * 4, ["p"] * 4, [None] * 4, ["x"] * 4, tokens)
            totals.append(out["group_ngram"].sum())
            credits.append(out["group_ngram"][0] + out["group_ngram_effect"][0])
        assert credits[1] - credits[0] == pytest.approx(totals[1] - totals[0])


def test_exact_diversity_credit_by_hand():
    exact = RewardFunction(RewardConfig(group_diversity_credit="exact"))
    twice = RewardFunction(RewardConfig(group_diversity_credit=2.0))
    sums = {k: np.zeros(2) for k in STEP_COMPONENTS + EPISODE_COMPONENTS + CREDIT_TERMS}
    sums["group_semantic"] = np.array([0.5, 0.25])  # weight 6, times λ
    sums["group_ngram"] = np.array([0.0, 0.5])  # weight 2, times λ
    sums["group_ngram_effect"] = np.array([-0.25, 0.0])
    lam = np.array([2.0, 1.0])
    # exact: λ (6 semantic + 2 effect): 2 (3 - 0.5), 1 (1.5 + 0); twice: λ (6 semantic + 2 ngram): 2 * 3, 1 * 2.5
    assert exact.group_baseline([[0, 1]], sums, lam).tolist() == pytest.approx([5.0, 1.5])
    assert twice.group_baseline([[0, 1]], sums, lam).tolist() == pytest.approx([6.0, 2.5])
    with pytest.raises(ValueError, match="group_diversity_credit"):
        RewardConfig(group_diversity_credit="exakt")
    with pytest.raises(ValueError, match="group_diversity_credit=-1.0: give a number >= 0"):
        RewardConfig(group_diversity_credit=-1.0)


def test_the_env_pays_the_exact_credit_at_a_groups_end():
    # rows 0 and 1 greedy, 2 and 3 hot: the same seeded episodes under credit 1 (no extra) and exact: the rewards differ only on the groups' last
    # step, by λ times group_ngram's weight times each sample's effect on the others (the stub has no embedder)
    rewards, infos = {}, {}
    for credit in (1.0, "exact"):
        config = stub_config(batch_size=4, group_size=4, diversity_values=[1.5])
        env = TemperatureVecEnv(config, lm=StubLM(), prompts=STUB_PROMPTS,
                                reward=RewardConfig(coherence=0.0, group_semantic=0.0, group_diversity_credit=credit))
        env.reset()
        steps = []
        while True:
            _, r, dones, info = env.step(np.array([[0.0], [0.0], [0.9], [0.9]], dtype=np.float32))
            steps.append(r)
            if dones.all():
                break
        rewards[credit], infos[credit] = np.stack(steps), info
    tokens = [infos["exact"][r]["token_ids"] for r in range(4)]
    assert tokens == [infos[1.0][r]["token_ids"] for r in range(4)]
    effect = group_ngram_terms(tokens)[1]
    assert effect[:2].tolist() == [-1.0, -1.0]  # the two greedy samples share every bigram, only with each other
    assert rewards["exact"][:-1] == pytest.approx(rewards[1.0][:-1])
    assert rewards["exact"][-1] == pytest.approx(rewards[1.0][-1] + 1.5 * 2.0 * effect, abs=1e-5)
