"""Antithetic twin groups (``train.twin_groups``): pairs of groups with one prompt, one λ and one random stream,
mirrored gSDE noise, and a training signal that is a row's return minus its twin's. Stub LM only: fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from envs.generation import TemperatureVecEnv
from envs.rewards import COMPONENTS, RewardConfig, RewardFunction, twin_of
from kelvin.config import ConfigError
from kelvin.config_loading import load_config
from kelvin.heads import DiversityHeadsPolicy
from policies.features import FeatureSettings
from samplers.core import sample
from stub_lm import NO_EMBEDDER, StubLM, obs_col, stub_config, stub_prompt

PROMPTS = [stub_prompt(0, "len=3,5 go"), stub_prompt(1, "len=4,2 go"), stub_prompt(2, "len=5,5 go")]


def test_rows_naming_one_uniform_draw_the_same_token_and_the_stream_is_unchanged():
    logits = torch.log_softmax(torch.randn(2, 50, generator=torch.Generator().manual_seed(3)), -1)
    logits = logits[[0, 0, 1, 1, 0, 0]]  # rows 0/1, 2/3 and 4/5 have the same logits
    temperature = torch.full((6,), 1.0)
    own = sample(logits, temperature, generator=torch.Generator().manual_seed(7))
    shared = sample(logits, temperature, generator=torch.Generator().manual_seed(7),
                    uniform_rows=torch.tensor([0, 0, 2, 2, 4, 4]))
    assert torch.equal(shared[[0, 2, 4]], own[[0, 2, 4]])  # the source rows draw exactly what they drew alone
    assert torch.equal(shared[[1, 3, 5]], shared[[0, 2, 4]])  # same logits, same uniform: same token
    assert not torch.equal(own[[0, 4]], own[[1, 5]])  # alone, rows 0 and 1 (4 and 5) draw differently


def test_a_rows_twin_is_its_place_in_the_pairs_other_group():
    # groups of 2: (0, 1) (2, 3) form pair 0, (4, 5) (6, 7) pair 1
    assert twin_of(np.arange(8), 2).tolist() == [2, 3, 0, 1, 6, 7, 4, 5]
    assert twin_of(np.arange(4), 1).tolist() == [1, 0, 3, 2]


def test_twin_baseline_by_hand():
    reward = RewardFunction(RewardConfig(group_diversity_credit=2.0))
    sums = {k: np.zeros(2) for k in COMPONENTS}
    sums["logprob"] = np.array([-3.0, -1.0])  # weight 1
    sums["correct"] = np.array([1.0, 0.0])  # weight 6
    sums["group_semantic"] = np.array([0.5, 0.25])  # weight 6, times λ
    sums["group_ngram"] = np.array([0.0, 0.5])  # weight 2, times λ
    lam = np.array([2.0, 2.0])
    # training return = quality + credit * λ * diversity: row 0: -3 + 6 + 2 * 2 * 3 = 15; row 1: -1 + 2 * 2 * 2.5 = 9
    # the term added at the end = (credit - 1) * λ * own diversity - twin's training return
    out = reward.twin_baseline(np.array([1, 0]), sums, lam)
    assert out == pytest.approx([2 * 3.0 - 9.0, 2 * 2.5 - 15.0])
    # a row's whole return (its absolute return plus that term) is its training return minus its twin's
    absolute = np.array([-3 + 6 + 2 * 3.0, -1 + 2 * 2.5])
    assert absolute + out == pytest.approx([15 - 9, 9 - 15])


def _twin_env(seed=0, diversity=(1.0,)):
    config = stub_config(batch_size=8, group_size=2, max_new_tokens=6, seed=seed, diversity_values=list(diversity),
                         features=FeatureSettings(include_diversity=True))
    return TemperatureVecEnv(config, lm=StubLM(), reward=NO_EMBEDDER, prompts=PROMPTS, twins=True)


def _episodes(env, actions, steps=12):
    """Each row's first episode: (return, token ids, prompt id, λ)."""
    env.reset()
    out = {}
    for _ in range(steps):
        _, _, dones, infos = env.step(actions)
        for r in np.flatnonzero(dones):
            i = infos[r]
            out.setdefault(int(r), (i["episode"]["r"], i["token_ids"], i["prompt_id"], i["diversity"]))
    assert sorted(out) == list(range(8))
    return out


def test_twins_share_prompt_lambda_and_random_numbers_and_their_returns_cancel():
    env = _twin_env(diversity=(0.5, 1.0, 2.0))
    same = _episodes(env, np.full((8, 1), 0.3, dtype=np.float32))
    for first in (0, 1, 4, 5):  # row k of group 2t and row k of group 2t + 1
        twin = first + 2
        assert same[first][1:] == same[twin][1:]  # same tokens (same T, same uniforms), prompt and λ
        assert same[first][0] == pytest.approx(0.0, abs=1e-4)  # own return minus the identical twin's
    assert same[0][1] != same[1][1]  # within a group the rows still draw on their own uniforms
    assert same[0][2] != same[4][2]  # the two pairs run different prompts
    # opposite actions in the twins: different tokens, returns that sum to zero pair by pair
    mirrored = np.array([0.4, 0.4, -0.1, -0.1] * 2, dtype=np.float32).reshape(8, 1)  # T = 0.8 / -0.2 in the twins
    opposite = _episodes(_twin_env(diversity=(2.0,)), mirrored)
    assert any(opposite[r][1] != opposite[r + 2][1] for r in (0, 1, 4, 5))
    for first in (0, 1, 4, 5):
        assert opposite[first][0] + opposite[first + 2][0] == pytest.approx(0.0, abs=1e-4)
        assert opposite[first][2:] == opposite[first + 2][2:]


def test_twins_restart_whole_pairs_and_need_an_even_number_of_groups():
    env = _twin_env()
    env.reset()
    with pytest.raises(ValueError, match=r"whole pairs \(2t, 2t \+ 1\)"):
        env.core.reset_groups(np.array([1, 2]))
    config = stub_config(batch_size=6, group_size=2)
    with pytest.raises(ValueError, match="multiple of 2 x env.group_size = 4"):
        TemperatureVecEnv(config, lm=StubLM(), reward=NO_EMBEDDER, prompts=PROMPTS, twins=True)


def test_mirrored_noise_gives_twins_opposite_exploration():
    env = _twin_env()
    col = obs_col(env, "diversity")
    model = PPO(DiversityHeadsPolicy, env, n_steps=4, batch_size=8, seed=0, device="cpu", use_sde=True,
                policy_kwargs={"heads": [0.0, 1.0, 2.0], "diversity_col": col, "twin_rows": 2, "log_std_init": -1.0})
    policy = model.policy
    policy.reset_noise(8)
    obs = torch.as_tensor(env.reset())
    obs[2:4], obs[6:8] = obs[0:2], obs[4:6]  # twins in the same state
    with torch.no_grad():
        mean = policy.get_distribution(obs).distribution.mean
        actions, _, _ = policy(obs)
    noise = actions - mean
    assert torch.allclose(noise[2:4], -noise[0:2], atol=1e-6) and torch.allclose(noise[6:8], -noise[4:6], atol=1e-6)
    assert noise.abs().min() > 1e-4  # it really explores
    assert not torch.allclose(noise[1], noise[0])  # rows of one group keep their own draws
    policy.reset_noise(6)  # a batch that is not in twin pairs: SB3's own draw, no error
    assert policy.action_dist.exploration_matrices.shape[0] == 6


def test_twin_groups_are_refused_where_they_cannot_work():
    ok = load_config(overrides=["train.twin_groups=true", "env.batch_size=64", "ppo.n_steps=64"])
    ok.check_training()
    with pytest.raises(ConfigError, match="train.twin_groups needs") as err:
        load_config(overrides=["train.twin_groups=true", "env.batch_size=36", "env.group_size=4", "ppo.use_sde=false",
                               "ppo.n_steps=64"])
    assert "ppo.use_sde" in str(err.value) and "multiple of 2 x env.group_size = 8" in str(err.value)
