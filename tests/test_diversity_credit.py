"""scripts/diversity_credit.py: the one-row deviation and the credit arithmetic on hand-made episodes (fast)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from envs.rewards import COMPONENTS, CREDIT_TERMS, RewardConfig
from policies.actions import ActionMapping
from policies.features import FeatureSettings, FeatureSpec, position_bin_onehot
from policies.tuned_base import TunedBase, TunedBasePolicy

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "diversity_credit.py"
_spec = importlib.util.spec_from_file_location("diversity_credit", _PATH)
diversity_credit = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(diversity_credit)


def _episode(row, correct=0.0, logprob=0.0, semantic=0.0, ngram=0.0, effect=0.0):
    components = {k: 0.0 for k in COMPONENTS + CREDIT_TERMS}
    components.update(correct=correct, logprob=logprob, group_semantic=semantic, group_ngram=ngram,
                      group_ngram_effect=effect)
    return {"row": row, "k": 0, "prompt_id": "p", "reward_components": components}


def test_one_row_of_each_group_deviates_on_its_first_tokens():
    spec = FeatureSpec.of(FeatureSettings(include_diversity=True), 8, ())
    mapping = ActionMapping(kind="linear", t_min=0.0, t_max=2.4)  # T = 1.2 (action + 1): T 0.6 is action -0.5
    base = TunedBasePolicy(TunedBase(kind="fixed", lambdas=(0.0, 2.0), temperatures={"all": (0.6, 0.6)}), spec, mapping)
    obs = torch.zeros(6, spec.dim)
    obs[:, spec.index("position")] = torch.tensor([0.0, 0.0, 3.0, 4.0, 4.0, 2.0]) / 8
    first = diversity_credit.OneRowDeviation(base, 0.25, tokens=(0, 4), group_size=2)
    # rows 0, 2 and 4 lead their groups of 2; row 2 is at token 3 (inside the first 4), row 4 at token 4 (outside)
    torch.testing.assert_close(first.actions(obs), torch.tensor([-0.25, -0.5, -0.25, -0.5, -0.5, -0.5]))
    later = diversity_credit.OneRowDeviation(base, 0.25, tokens=(4, 8), group_size=2)
    torch.testing.assert_close(later.actions(obs), torch.tensor([-0.5, -0.5, -0.5, -0.5, -0.25, -0.5]))


def test_credit_signals_by_hand():
    # a group of 2: the first sample loses 1 of quality, raises its own semantic term 0.2 -> 0.4 and its bigram
    # share 0.5 -> 1.0; the other's semantic term rises as much (symmetric), its bigram share only 0.5 -> 0.6,
    # which the first's effect term records (-0.5 -> -0.4)
    before = [_episode(0, semantic=0.2, ngram=0.5, effect=-0.5), _episode(1, correct=1.0, semantic=0.2, ngram=0.5)]
    after = [_episode(0, logprob=-1.0, semantic=0.4, ngram=1.0, effect=-0.4),
             _episode(1, correct=1.0, semantic=0.4, ngram=0.6)]
    terms = diversity_credit.deviation_terms(before, after, 2, RewardConfig())  # weights: semantic 6, ngram 2
    expected = {"quality_own": -1.0, "quality_others": 0.0, "diversity_own": 6 * 0.2 + 2 * 0.5,
                "diversity_others": 6 * 0.2 + 2 * 0.1, "ngram_effect_own": 2 * 0.1, "group_semantic_own": 1.2,
                "group_semantic_others": 1.2, "group_ngram_own": 1.0, "group_ngram_others": 0.2}
    assert {k: v.tolist() for k, v in terms.items()} == {k: pytest.approx([v]) for k, v in expected.items()}
    signals = diversity_credit.credit_signals(terms, lam=1.0)
    # credit 1: -1 + 2.2; credit 2: -1 + 4.4; exact: -1 + 2.2 + 1.2 + 0.2; the group: -1 + 2.2 + 1.4
    assert {k: v.tolist() for k, v in signals.items()} == {"credit 1": pytest.approx([1.2]),
                                                          "credit 2": pytest.approx([3.4]),
                                                          "exact": pytest.approx([2.6]),
                                                          "group": pytest.approx([2.6])}
    with pytest.raises(ValueError, match="same env and seed"):
        diversity_credit.deviation_terms(before, after[::-1], 2, RewardConfig())


def test_episode_noise_is_held_per_episode_and_bin_and_replays_by_seed():
    spec = FeatureSpec.of(FeatureSettings(include_diversity=True, position_bins=(4,)), 8, ())
    mapping = ActionMapping(kind="linear", t_min=0.0, t_max=2.4)
    base = TunedBasePolicy(TunedBase(kind="fixed", lambdas=(0.0, 2.0), temperatures={"all": (0.6, 0.6)}), spec, mapping)

    def run(seed, positions, group_size=1):  # positions: one list of 3 rows' token positions per step
        noisy = diversity_credit.EpisodeNoise(base, 0.1, seed=seed, group_size=group_size)
        out = []
        for step in positions:
            obs = torch.zeros(3, spec.dim)
            position = torch.tensor(step)
            obs[:, spec.index("position")] = position.float() / 8
            obs[:, spec.index("position_bin_0"):spec.index("position_bin_1") + 1] = position_bin_onehot(
                position, torch.tensor(spec.position_bins))  # the featurizer's one-hot: tokens 0-3, then the rest
            out.append(noisy.actions(obs) + 0.5)  # the noise alone (the base's action is -0.5)
        return torch.stack(out), noisy.table

    # two 8-token episodes for rows 0 and 1; row 2 starts its second episode one step late
    steps = [[p, p, p] for p in range(8)] + [[p, p, max(p - 1, 0) if p else 7] for p in range(8)]
    noise, table = run(0, steps)
    for row in range(2):
        for episode in range(2):
            block = noise[8 * episode:8 * episode + 8, row]
            torch.testing.assert_close(block[:4], table[row, episode, 0].expand(4))  # tokens 0-3: bin 0
            torch.testing.assert_close(block[4:], table[row, episode, 1].expand(4))  # tokens 4-7: bin 1
    torch.testing.assert_close(noise[9, 2], table[2, 1, 0])  # row 2's second episode starts at step 9
    torch.testing.assert_close(noise[8, 2], table[2, 0, 1])  # ...and step 8 is still its first episode's last token
    assert len(set(table[:3, :2].flatten().tolist())) == 12  # independent draws
    again, _ = run(0, steps)
    torch.testing.assert_close(again, noise)
    other, _ = run(1, steps)
    assert not torch.equal(other, noise)
    shared, table = run(0, [[p, p, p] for p in range(8)], group_size=3)  # one group of 3: row 0's draws for all
    torch.testing.assert_close(shared, shared[:, :1].expand(8, 3))
    torch.testing.assert_close(shared[0, 0], table[0, 0, 0])
