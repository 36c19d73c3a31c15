"""The residual policy on a tuned base: the base's lookup and interpolation, a zero residual is exactly the base
(in the actor, in the training env and in an export), the base round-trips, tuning and validation arithmetic by
hand, and bad bases refused with one line. Stub LM only: fast."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from envs.generation import TemperatureVecEnv
from envs.prompts import CATEGORIES, category_shares, load_prompts
from envs.residual import ResidualActionVecEnv
from envs.rewards import RewardConfig
from kelvin.atomic import RunDirError
from kelvin.config import ConfigError
from kelvin.config_loading import load_config
from kelvin.export import export_learned, learned_policy
from kelvin.rundir import RunDir
from kelvin.tuning import EpisodeCache, quality_diversity, tune_tables
from kelvin.validation import Validation, grid_rewards, group_means, paired_margin
from policies.artifact import load_policy
from policies.features import FeatureSettings, FeatureSpec
from policies.registry import make_policy
from policies.tuned_base import BaseError, TunedBase, TunedBasePolicy
from stub_lm import HORIZON, NO_EMBEDDER, STUB_PROMPTS, SYMMETRIC, StubLM, obs_col, stub_config

SPEC = FeatureSpec.of(FeatureSettings(include_diversity=True), 8, CATEGORIES)
TABLE = TunedBase(kind="table", lambdas=(0.0, 1.0, 2.0),
                  temperatures={**{c: (0.2, 0.6, 1.0) for c in CATEGORIES}, "math": (0.0, 0.0, 0.4),
                                "other": (0.5, 0.5, 0.5)})


def _obs(categories: list[int], diversity_values: list[float], spec: FeatureSpec = SPEC) -> torch.Tensor:
    """Raw observations (B, F) with a category one-hot and λ, every other feature 0.3."""
    obs = torch.full((len(diversity_values), spec.dim), 0.3)
    if spec.categories:
        start = spec.index(f"category_{spec.categories[0]}")
        obs[:, start:start + len(spec.categories) + 1] = 0.0
        for row, c in enumerate(categories):
            obs[row, start + c] = 1.0
    obs[:, spec.index("diversity")] = torch.tensor(diversity_values)
    return obs


def test_base_module_picks_the_category_and_interpolates_in_lambda_by_hand():
    module = TABLE.module(SPEC, SYMMETRIC)  # linear on [-2, 2]: action = T / 2
    math_row, other_row = CATEGORIES.index("math"), len(CATEGORIES)
    obs = _obs([0, 0, 0, math_row, math_row, other_row, 0], [0.0, 0.5, 1.0, 1.5, 2.0, 1.3, 5.0])
    expected = torch.tensor([0.2, 0.4, 0.6, 0.2, 0.4, 0.5, 1.0]) / 2  # (0.2+0.6)/2 = 0.4; (0+0.4)/2 = 0.2; λ=5 clamps
    torch.testing.assert_close(module(obs), expected, atol=1e-7, rtol=0)
    assert module(obs)[2] == SYMMETRIC.to_action(torch.tensor([0.6]))[0]  # exact at a grid point
    policy = TunedBasePolicy(TABLE, SPEC, SYMMETRIC)
    torch.testing.assert_close(policy.temperatures(obs), expected * 2, atol=2e-7, rtol=0)


def test_fixed_base_reads_lambda_only():
    base = TunedBase(kind="fixed", lambdas=(0.0, 2.0), temperatures={"all": (0.0, 1.2)})
    spec = FeatureSpec.of(FeatureSettings(include_diversity=True), 8, ())
    out = base.module(spec, SYMMETRIC)(_obs([], [0.0, 1.0, 2.0], spec))
    torch.testing.assert_close(out, torch.tensor([0.0, 0.3, 0.6]), atol=1e-7, rtol=0)


def _stub_env(seed=0):
    config = stub_config(batch_size=4, group_size=2, max_new_tokens=4, seed=seed,
                         features=FeatureSettings(include_diversity=True))
    return TemperatureVecEnv(config, lm=StubLM(), reward=NO_EMBEDDER, prompts=STUB_PROMPTS)


def test_zero_residual_is_exactly_the_base_in_the_actor_the_training_env_and_the_export(tmp_path):
    env = _stub_env()
    spec, mapping = env.feature_spec, env.action_mapping
    base = TunedBase(kind="table", lambdas=(0.0, 1.0, 2.0),
                     temperatures={**{c: (0.3 + 0.1 * i, 0.7, 1.1 - 0.05 * i) for i, c in enumerate(CATEGORIES)},
                                   "other": (0.5, 0.9, 1.3)})
    wrapped = ResidualActionVecEnv(env, base.module(spec, mapping))
    model = PPO("MlpPolicy", wrapped, n_steps=4, batch_size=8, seed=0, device="cpu")
    with torch.no_grad():
        model.policy.action_net.weight.zero_()
        model.policy.action_net.bias.zero_()
    actor = learned_policy(model, None, spec, mapping, base=base)
    reference = TunedBasePolicy(base, spec, mapping)
    obs = wrapped.reset()
    for _ in range(6):  # the env applies base + zero residual: every row at its base temperature
        t_actor = actor.temperatures(obs)
        assert torch.equal(actor.actions(torch.as_tensor(obs)), reference.actions(torch.as_tensor(obs)))
        obs_next, _, _, infos = wrapped.step(np.zeros((4, 1), dtype=np.float32))
        applied = torch.tensor([info["temperature"] for info in infos], dtype=torch.float32)
        active = torch.tensor([info["active"] for info in infos])
        torch.testing.assert_close(applied[active], t_actor[active], atol=1e-6, rtol=0)
        obs = obs_next
    diversity = obs[:, obs_col(env, "diversity")]
    assert len(set(diversity.round(6).tolist())) > 1  # the groups' λ differ: the interpolation is exercised
    out = export_learned(model.policy, tmp_path / "export", spec, mapping, model={"name": "stub", "vocab_size": 8},
                         diversity_range=(0.0, 2.0), base=base)
    assert json.loads((out / "spec.json").read_text())["base"] == base.to_dict()
    exported = load_policy(out)
    probe = torch.as_tensor(obs)
    assert torch.equal(exported.actions(probe), reference.actions(probe))
    env.close()


def test_trained_residual_is_added_to_the_base_and_clipped():
    env = _stub_env()
    spec, mapping = env.feature_spec, env.action_mapping
    base = TunedBase(kind="fixed", lambdas=(0.0,), temperatures={"all": (1.8,)})  # action 0.9 on [-2, 2]
    model = PPO("MlpPolicy", ResidualActionVecEnv(env, base.module(spec, mapping)), n_steps=4, batch_size=8, seed=0)
    with torch.no_grad():
        model.policy.action_net.weight.zero_()
        model.policy.action_net.bias.fill_(0.3)  # residual +0.3: 0.9 + 0.3 = 1.2 -> clipped to 1
    obs = torch.as_tensor(env.reset())
    torch.testing.assert_close(learned_policy(model, None, spec, mapping, base=base).actions(obs), torch.ones(4))
    with torch.no_grad():
        model.policy.action_net.bias.fill_(-0.5)
    torch.testing.assert_close(learned_policy(model, None, spec, mapping, base=base).actions(obs),
                               torch.full((4,), 0.4), atol=1e-6, rtol=0)
    env.close()


def test_base_round_trips_through_the_run_directory(tmp_path):
    run = RunDir(tmp_path)
    assert run.load_base() is None  # a run without a base
    run.base_file.write_text(json.dumps({**TABLE.to_dict(), "tuning": {"prompts": 32}}))
    assert run.load_base() == TABLE
    run.base_file.write_text("{not json")
    with pytest.raises(RunDirError, match="base.json.*damaged"):
        run.load_base()


def test_bad_bases_are_refused_with_one_line_naming_them():
    with pytest.raises(ConfigError, match=r"policy\.base.*'tabel'"):
        load_config(None, ["policy.base=tabel"])
    with pytest.raises(ConfigError, match="env.include_category is false: use policy.base: fixed"):
        load_config(None, ["env.include_category=false"])
    assert load_config(None, ["env.include_category=false", "policy.base=fixed"]).policy.base == "fixed"
    partial = TunedBase(kind="table", lambdas=(0.0, 2.0), temperatures={"code": (0.1, 0.2), "other": (0.5, 0.5)})
    with pytest.raises(BaseError, match="does not cover category 'creative_writing'"):
        partial.check_serves(SPEC, (0.0, 2.0))
    with pytest.raises(BaseError, match=r"λ range \[0, 3\] is outside the range the base was tuned on \[0, 2\]"):
        TABLE.check_serves(SPEC, (0.0, 3.0))
    with pytest.raises(BaseError, match="strictly increasing"):
        TunedBase(kind="fixed", lambdas=(1.0, 0.0), temperatures={"all": (0.1, 0.2)})
    with pytest.raises(BaseError, match="kind='tabel'"):
        TunedBase.from_dict({"kind": "tabel", "lambdas": [0.0], "temperatures": {"all": [0.5]}})


def _episode(category, quality_logprob, semantic, diversity=0.0, row=0, k=0):
    comps = {"logprob": quality_logprob, "repetition": 0.0, "anomaly": 0.0, "entropy": 0.0, "coherence": 0.0,
             "text_anomaly": 0.0, "correct": 0.0, "group_semantic": semantic, "group_ngram": 0.0}
    return {"category": category, "reward_components": comps, "diversity": diversity, "row": row, "k": k}


def test_tune_tables_by_hand():
    """Reward = logprob (weight 1) + λ · 6 · semantic. code: T=0 scores -1 + 0 = -1, T=1 scores -3 + λ·6·0.5:
    T=1 wins once 3λ > 2, i.e. λ > 2/3. math: T=0 always (-0.5 vs -4 + 3λ·0.5... never above at λ <= 2)."""

    runs = {0.0: [_episode("code", -1.0, 0.0), _episode("math", -0.5, 0.0)],
            1.0: [_episode("code", -3.0, 0.5), _episode("math", -4.0, 0.25)]}
    tables = tune_tables(runs, [0.0, 0.5, 1.0, 2.0], RewardConfig())
    assert [tables[diversity]["code"] for diversity in (0.0, 0.5, 1.0, 2.0)] == [0.0, 0.0, 1.0, 1.0]
    assert [tables[diversity]["math"] for diversity in (0.0, 0.5, 1.0, 2.0)] == [0.0, 0.0, 0.0, 0.0]
    # other: mean over both prompts. T=0: -0.75; T=1: -3.5 + λ·6·0.375 = -3.5 + 2.25λ -> wins above λ = 11/9
    assert [tables[diversity]["other"] for diversity in (0.0, 1.0, 2.0)] == [0.0, 0.0, 1.0]
    q, d = quality_diversity(runs[1.0], RewardConfig())
    np.testing.assert_allclose(q + 2.0 * d, [-3.0 + 6.0, -4.0 + 3.0])  # the reward at λ = 2, by hand


def test_tune_tables_pooled_by_hand():
    """The same runs pooled with one episode's worth of every prompt: a category's score of T is
    (its reward + 1 · the mean over both prompts) / 2. math at λ = 2: T=0 (-0.5 - 0.75) / 2 = -0.625, T=1
    (-4 + 3 + (-3.5 + 4.5)) / 2 = 0: T=1, where math alone keeps T=0. code at λ = 1: T=0 (-1 - 0.75) / 2 = -0.875,
    T=1 (0 - 1.25) / 2 = -0.625: still T=1. An overwhelming prior gives every category the overall best."""
    runs = {0.0: [_episode("code", -1.0, 0.0), _episode("math", -0.5, 0.0)],
            1.0: [_episode("code", -3.0, 0.5), _episode("math", -4.0, 0.25)]}
    lambdas = [0.0, 0.5, 1.0, 2.0]
    pooled = tune_tables(runs, lambdas, RewardConfig(), prior_episodes=1.0)
    assert [pooled[diversity]["code"] for diversity in lambdas] == [0.0, 0.0, 1.0, 1.0]
    assert [pooled[diversity]["math"] for diversity in lambdas] == [0.0, 0.0, 0.0, 1.0]
    flat = tune_tables(runs, lambdas, RewardConfig(), prior_episodes=1e9)
    for diversity in lambdas:
        assert flat[diversity]["code"] == flat[diversity]["math"] == flat[diversity]["other"]
    assert [flat[diversity]["other"] for diversity in lambdas] == [0.0, 0.0, 0.0, 1.0]


def test_tune_tables_weighted_by_hand():
    """Two code episodes and one math a temperature. T=0: code -1, math -0.5; T=1: code -3 + 3λ, math -4 + 1.5λ.
    Over episodes T=1 wins where (-10 + 7.5λ) / 3 > -2.5 / 3, λ > 1; weighted code 0.2, math 0.8 it wins where
    -3.8 + 1.8λ > -0.6, λ > 16/9; weighted on code alone, where code wins, λ > 2/3. The categories' own columns
    do not move."""
    runs = {0.0: [_episode("code", -1.0, 0.0), _episode("code", -1.0, 0.0), _episode("math", -0.5, 0.0)],
            1.0: [_episode("code", -3.0, 0.5), _episode("code", -3.0, 0.5), _episode("math", -4.0, 0.25)]}
    lambdas = [0.0, 0.9, 1.5, 1.7, 1.9]
    plain = tune_tables(runs, lambdas, RewardConfig())
    weighted = tune_tables(runs, lambdas, RewardConfig(), weights={"code": 0.2, "math": 0.8})
    code_only = tune_tables(runs, lambdas, RewardConfig(), weights={"code": 0.5, "summarisation": 0.5})
    assert [plain[diversity]["other"] for diversity in lambdas] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert [weighted[diversity]["other"] for diversity in lambdas] == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert [code_only[diversity]["other"] for diversity in lambdas] == [0.0, 1.0, 1.0, 1.0, 1.0]
    for table in (weighted, code_only):
        assert [table[d]["code"] for d in lambdas] == [plain[d]["code"] for d in lambdas] == [0.0, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="no weight to any category"):
        tune_tables(runs, lambdas, RewardConfig(), weights={"summarisation": 1.0})


def test_category_shares_of_the_validation_split():
    shares = category_shares(load_prompts(None, split="validation"))
    assert shares["factual_question"] == 29 / 80 and shares["math"] == 4 / 80
    assert sum(shares.values()) == pytest.approx(1.0) and len(shares) == 7


def test_validation_interval_by_hand():
    """Two groups whose differences are 0 and 2: the bootstrap means are 0, 1, 2 with chances 1/4, 1/2, 1/4, so
    the 95% interval is [0, 2] around the mean 1; constant differences give a zero-width interval."""
    assert paired_margin(np.array([3.0, 5.0]), np.array([3.0, 3.0]), 2000, 0) == {"mean": 1.0, "low": 0.0,
                                                                                   "high": 2.0}
    assert paired_margin(np.array([1.0, 2.0, 3.0]), np.array([0.5, 1.5, 2.5]), 2000, 0) == {
        "mean": 0.5, "low": 0.5, "high": 0.5}
    # group means follow (row // K, k): rows 0-1 are group 0, rows 2-3 group 1; k is the episode index
    episodes = [{"row": r, "k": k} for r in range(4) for k in range(2)]
    values = [10 * r + k for r in range(4) for k in range(2)]
    np.testing.assert_allclose(group_means(episodes, 2, values), [5.0, 6.0, 25.0, 26.0])
    assert not math.isnan(paired_margin(np.array([1.0, 3.0]), np.array([0.0, 0.0]), 50, 1)["low"])


def _stub_validation(streams: int, cache=None) -> Validation:
    config = load_config(None, ["env.batch_size=4", "env.group_size=2", f"env.max_new_tokens={HORIZON}",
                                "env.token_prior=false", "reward.coherence=0.0", "reward.group_semantic=0.0",
                                "ppo.batch_size=32", "policy.base=none", "train.validation_prompts=4",
                                f"train.validation_streams={streams}", "train.validation_temperatures=[0.5,1.0]",
                                "train.validation_diversity=[0.0,2.0]"])
    return Validation(config, StubLM(), None, cache)


def test_validation_streams_average_each_prompt_over_its_streams(tmp_path):
    """train.validation_streams = 2: every policy runs on seed and seed + 1, stream 0 is the one-stream run, and a
    prompt's value is the mean over both streams' groups of it (the seeded schedules put it in different slots)."""
    one, two = _stub_validation(1), _stub_validation(2, EpisodeCache(tmp_path))
    policy = make_policy("fixed:0.8", two.env.feature_spec, two.env.action_mapping)
    single, both = one.episodes(policy), two.episodes(policy)  # λ = 0 block, then λ = 2; 4 prompts x K = 2 a stream
    assert two.seeds == [one.seed, one.seed + 1] and len(both) == 2 * len(single) == 32
    for block in (0, 1):
        first = both[16 * block:16 * block + 8]
        assert [(e["prompt_id"], e["episode"]["r"]) for e in first] == [
            (e["prompt_id"], e["episode"]["r"]) for e in single[8 * block:8 * block + 8]]
    at2 = both[16:]
    assert [e["prompt_id"] for e in at2[:8:2]] != [e["prompt_id"] for e in at2[8::2]]  # the streams' slots differ
    by_hand: dict[str, list[float]] = {}
    for e in at2:
        by_hand.setdefault(e["prompt_id"], []).append(e["episode"]["r"])
    expected = [np.mean(by_hand[pid]) for pid in sorted(by_hand)]  # 4 returns a prompt, in prompt-id order
    np.testing.assert_allclose(grid_rewards(both, (0.0, 2.0), 2, by_prompt=True)[1], expected)
    record = two.compare(both, step=0)
    assert record["streams"] == 2 and record["episodes_per_policy"] == 32
    assert record["by_diversity"]["2"]["learned_reward"] == pytest.approx(np.mean(expected))
    assert {t: len(eps) for t, eps in two.fixed.items()} == {0.5: 16, 1.0: 16}  # 8 episodes a stream
    again = _stub_validation(2, EpisodeCache(tmp_path))
    assert again.prepare()["cached"] and again.fixed == two.fixed  # each stream cached under its own seed


def test_validation_mix_split_takes_the_splits_share_of_each_category():
    """train.validation_mix: ``equal`` takes 32 validation prompts as evenly as the categories allow (4 factual
    questions, where the split holds 29 of 80); ``split``, the default, takes each category's share (12 factual),
    like the test split's mix, and a bad value is refused by the config with the field's name."""
    def counts(mix):
        config = load_config(None, ["env.batch_size=4", "env.group_size=2", "env.token_prior=false",
                                    "ppo.batch_size=32", "policy.base=none"] + [f"train.validation_mix={mix}"] * bool(mix))
        return Counter(p.category for p in Validation(config, StubLM(max_context=4096), None, None).prompts)

    assert counts(None) == counts("split")
    assert counts("equal") == {"creative_writing": 5, "explanation": 5, "code": 5, "brainstorming": 5,
                               "factual_question": 4, "summarisation": 4, "math": 4}
    assert counts("split") == {"factual_question": 12, "creative_writing": 4, "explanation": 4, "code": 4,
                               "brainstorming": 4, "summarisation": 3, "math": 1}
    with pytest.raises(ConfigError, match="validation_mix"):
        counts("stratified")


def test_a_run_from_before_validation_mix_validates_on_the_equal_mix_it_was_trained_with(tmp_path):
    old, new = RunDir(tmp_path / "old"), RunDir(tmp_path / "new")
    for run, text in ((old, "train:\n  seed: 0\n"), (new, "train:\n  seed: 0\n  validation_mix: split\n")):
        run.path.mkdir()
        run.config_file.write_text(text + "policy:\n  base: none\n")
    assert old.load_config().train.validation_mix == "equal" and new.load_config().train.validation_mix == "split"
    assert old.load_config(["train.validation_mix=split"]).train.validation_mix == "split"  # an override wins


def test_validation_grid_by_hand():
    """The validation's λ grid: a fixed temperature's one run is scored at every λ from its components
    (quality + λ · diversity with the reward's weights), a policy's runs are one block per λ at its own λ."""
    def episode(row, logprob, semantic, diversity=0.0, r=0.0):
        components = {k: 0.0 for k in RewardConfig().weights()}
        components.update(logprob=logprob, group_semantic=semantic)
        return {"row": row, "k": 0, "diversity": diversity, "episode": {"r": r}, "reward_components": components}

    # K = 2: rows 0-1 are group 0, rows 2-3 group 1. Weights: logprob 1, group_semantic 6.
    fixed = [episode(0, -1.0, 0.5), episode(1, -3.0, 0.5), episode(2, -2.0, 0.0), episode(3, -2.0, 0.25)]
    # group 0: q = -2, d = 3 -> λ=0: -2, λ=2: 4; group 1: q = -2, d = 0.75 -> λ=0: -2, λ=2: -0.5
    np.testing.assert_allclose(grid_rewards(fixed, (0.0, 2.0), 2, RewardConfig(), rescore=True),
                               [[-2.0, -2.0], [4.0, -0.5]])
    learned = [episode(r, 0, 0, diversity, r=10 * diversity + r) for diversity in (0.0, 2.0) for r in range(4)]
    np.testing.assert_allclose(grid_rewards(learned, (0.0, 2.0), 2), [[0.5, 2.5], [20.5, 22.5]])
    with pytest.raises(ValueError, match="not 2 blocks"):
        grid_rewards(learned[::-1], (0.0, 2.0), 2)


def test_the_default_validation_grid_validates_only_lambdas_the_env_trains_on():
    from envs.config import EnvConfig
    from kelvin.validation import default_lambdas

    assert default_lambdas(EnvConfig()) == (0.0, 1.0, 2.0)  # diversity_range [0, 2]: 3 values evenly
    cases = {(0.0, 1.0): (0.0, 1.0),  # not 0.5, which no training row ever sees
             (2.0, 1.0, 0.0, 1.0): (0.0, 1.0, 2.0), (0.5,): (0.5,),
             (0.0, 0.2, 1.7, 2.0): (0.0, 1.7, 2.0),  # 1 is 0.7 from 1.7, 0.8 from 0.2
             (0.0, 2.0): (0.0, 2.0)}  # 1 lies halfway: the lower, already in the grid
    for values, grid in cases.items():
        assert default_lambdas(EnvConfig(diversity_values=list(values))) == grid, values
