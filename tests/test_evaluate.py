"""evaluate.py: metric helpers by hand, bad input, an end-to-end CLI run and determinism on the real model.

The learned policy under test is a real SB3 PPO artifact (model.zip, vecnormalize.pkl, config.yaml in
a run directory) built without training, so the file needs no PPO run: an untrained actor whose
action bias is set to give T ~ 0.7 plus a small observation-dependent part.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml

from kelvin.config import ConfigError
from kelvin.config_loading import load_config
from kelvin.evaluation import (
    METRICS,
    EvaluationError,
    evaluate,
    group_by_prompt,
    hull_front,
    hull_gap,
    hull_hypervolume,
    hypervolume_2d,
    main,
    mean_over_streams,
    pareto_front,
    parse_policy_specs,
    prompt_metrics,
    select_prompts,
)
from envs.prompts import Prompt

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


# ----------------------------------------------------------------------------- fixtures


def _make_run(run_dir: Path, config_path: Path = SMOKE) -> Path:
    """A Kelvin run directory holding an untrained PPO policy with the smoke config's spaces."""
    import gymnasium as gym
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    config = load_config(config_path)
    dim = config.env.feature_spec().dim

    class SpacesOnly(gym.Env):
        observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

        def reset(self, seed=None, options=None):
            return np.zeros(dim, np.float32), {}

        def step(self, action):
            return np.zeros(dim, np.float32), 0.0, True, False, {}

    run_dir.mkdir(parents=True, exist_ok=True)
    venv = VecNormalize(DummyVecEnv([SpacesOnly]))
    model = PPO("MlpPolicy", venv, seed=0, n_steps=8, batch_size=8, device="cpu")
    with torch.no_grad():
        model.policy.action_net.bias.fill_(0.0)  # the default linear mapping on [-1, 2.4]: action 0 -> T = 0.7
    model.save(run_dir / "model.zip")
    venv.save(str(run_dir / "vecnormalize.pkl"))
    config.dump(run_dir / "config.yaml")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return _make_run(tmp_path_factory.mktemp("runs") / "fake")


def _edit_config(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    raw = yaml.safe_load((dst / "config.yaml").read_text())
    edit(raw)
    (dst / "config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return dst


# ----------------------------------------------------------------------------- helpers by hand


def test_hypervolume_of_a_known_front():
    staircase = [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0)]
    assert hypervolume_2d(staircase, (0.0, 0.0)) == pytest.approx(3 * 1 + 2 * 1 + 1 * 1)  # 6
    # Only (2, 2) is strictly better than (1, 1) in both coordinates: a 1 x 1 square.
    assert hypervolume_2d(staircase, (1.0, 1.0)) == pytest.approx(1.0)
    # A dominated point and a duplicate add nothing; order does not matter.
    assert hypervolume_2d(staircase[::-1] + [(1.5, 1.5), (2.0, 2.0)], (0.0, 0.0)) == pytest.approx(6.0)
    assert hypervolume_2d([(-2.0, 0.5)], (-10.0, 0.0)) == pytest.approx(8.0 * 0.5)
    assert hypervolume_2d([(-11.0, 0.5), (-2.0, -0.1)], (-10.0, 0.0)) == 0.0  # behind the reference
    assert hypervolume_2d([], (0.0, 0.0)) == 0.0


def test_pareto_front_keeps_the_non_dominated_points():
    pts = [(1.0, 3.0), (2.0, 2.0), (3.0, 1.0), (1.5, 1.5), (2.0, 2.0), (0.0, 3.0)]
    assert pareto_front(pts) == [2, 1, 0]  # by x descending; (1.5,1.5), the duplicate and (0, 3) dominated


def test_hull_of_a_known_front():
    # (0.5, 0.4) lies under the chord from (0, 1) to (1, 0): mixing those two settings at random beats it
    assert hull_front([(0.0, 1.0), (0.5, 0.4), (1.0, 0.0)]) == [(0.0, 1.0), (1.0, 0.0)]
    assert hull_hypervolume([(0.0, 1.0), (0.5, 0.4), (1.0, 0.0)], (0.0, 0.0)) == pytest.approx(0.5)  # the triangle
    pts = [(0.2, 0.9), (0.6, 0.7), (0.9, 0.2)]  # a concave chain: every point is a vertex
    assert hull_front(pts) == pts
    # flat part left of the first vertex, then two trapezoids: 0.2 * 0.9 + 0.4 * (0.9 + 0.7) / 2 + 0.3 * (0.7 + 0.2) / 2
    assert hull_hypervolume(pts, (0.0, 0.0)) == pytest.approx(0.18 + 0.32 + 0.135)
    assert hull_hypervolume(pts + [(0.5, 0.5), (0.1, 0.1)], (0.0, 0.0)) == pytest.approx(0.635)  # inside: nothing
    # the reference clips: above y = 0.8 only the flat part (0.2 x 0.1) and a triangle (0.2 x 0.1 / 2) remain
    assert hull_hypervolume(pts[:2], (0.0, 0.8)) == pytest.approx(0.02 + 0.01)
    # a reference right of the first vertices: the segment (0.6, 0.7)-(0.9, 0.2) is at 0.7 - 0.1 * 5 / 3 at x = 0.7
    assert hull_hypervolume(pts, (0.7, 0.0)) == pytest.approx(0.2 * (0.7 - 0.5 / 3 + 0.2) / 2)
    assert hull_hypervolume([], (0.0, 0.0)) == 0.0 and hull_hypervolume([(-1.0, 2.0)], (0.0, 0.0)) == 0.0
    # a hull always reaches at least the staircase of its own points
    assert hull_hypervolume(pts, (0.0, 0.0)) >= hypervolume_2d(pts, (0.0, 0.0)) == pytest.approx(0.18 + 0.28 + 0.06)


def test_hull_gap_is_the_distance_above_the_hull():
    pts = [(0.0, 1.0), (1.0, 0.0), (0.5, 0.2)]  # (0.5, 0.2) is under the chord: not on the hull
    assert hull_gap(pts, (0.5, 0.6)) == pytest.approx(0.1)  # the hull is at 0.5 there
    assert hull_gap(pts, (0.25, 0.5)) == pytest.approx(-0.25)  # inside: a mix reaches 0.75
    assert hull_gap(pts, (-1.0, 0.5)) == pytest.approx(-0.5)  # left of the hull: (0, 1) dominates it
    assert hull_gap(pts, (2.0, 0.5)) is None  # right of every setting of the family


def test_compare_hulls_on_fixed_numbers():
    from kelvin.evaluation.fronts import compare_hulls

    # every prompt gives the same values: the interval collapses to the difference of the hulls' areas
    xs = {"a1": np.full(5, 0.2), "a2": np.full(5, 0.8), "b": np.full(5, 0.5)}
    ys = {"a1": np.full(4, 0.9), "a2": np.full(4, 0.5), "b": np.full(4, 0.4)}
    out = compare_hulls(xs, ys, {"A": ["a1", "a2"], "B": ["b"]}, [("A", "B")], (0.0, 0.0), same_prompts=False,
                        n_resamples=50, seed=0)
    # A: 0.2 * 0.9 + 0.6 * (0.9 + 0.5) / 2 = 0.6; B: 0.5 * 0.4 = 0.2
    assert out[("A", "B")] == pytest.approx({"diff": 0.4, "low": 0.4, "high": 0.4})


def _tuning_episode(category, correct, semantic):
    """An end-of-episode info with only ``correct`` and ``group_semantic`` set: a tuning run's episode by hand."""
    comps = {c: 0.0 for c in ("logprob", "repetition", "anomaly", "entropy", "coherence", "text_anomaly",
                              "correct", "group_semantic", "group_ngram")}
    comps.update(correct=correct, group_semantic=semantic)
    return {"category": category, "reward_components": comps}


def test_tables_are_tuned_per_category_and_lambda():
    from envs.rewards import RewardConfig, RewardFunction
    from kelvin.evaluation.families import tune_tables

    reward = RewardFunction(RewardConfig(group_baseline=False))  # correct 6, group_semantic 6
    episodes = {0.0: [_tuning_episode("math", 1.0, 0.0), _tuning_episode("creative_writing", 0.0, 0.1)],
                1.0: [_tuning_episode("math", 0.5, 0.5), _tuning_episode("creative_writing", 0.0, 0.6)]}
    tables = tune_tables(episodes, [0.0, 1.0], reward)
    # λ = 0: math 6 vs 3 -> T 0; creative 0 vs 0 -> the tie goes to the cooler T
    assert tables[0.0] == {"creative_writing": 0.0, "math": 0.0, "other": 0.0}
    # λ = 1: math 6 vs 3 + 3 = 6 -> tie, cooler; creative 0.6 vs 3.6 -> T 1; overall (6 + 0.6) / 2 vs (6 + 3.6) / 2
    assert tables[1.0] == {"creative_writing": 1.0, "math": 0.0, "other": 1.0}


@pytest.mark.parametrize("include_category", [True, False])
def test_the_fixed_t_rival_is_tuned_with_or_without_the_category(include_category, tmp_path, monkeypatch):
    """The headline's rival (the best fixed T at each λ) comes from the table's tuning runs; without the category
    in the observation the table itself cannot run, but the rival must still be there (it was dropped once).
    It answers for the validation split's mix (29 factual questions, 9 creative prompts), not the runs' equal
    shares. At λ = 1, T = 0 scores factual 6, creative 0.6; T = 1 factual 3 + 0.6, creative 3.6. Equal shares:
    3.3 vs 3.6, T = 1; the split's shares: (29 · 6 + 9 · 0.6) / 38 = 4.72 vs 3.6, T = 0."""
    import kelvin.evaluation.run as run_module

    by_t = {0.0: [_tuning_episode("factual_question", 1.0, 0.0), _tuning_episode("creative_writing", 0.0, 0.1)],
            1.0: [_tuning_episode("factual_question", 0.5, 0.1), _tuning_episode("creative_writing", 0.0, 0.6)]}

    class FakeRunner:  # the tuning runs without a model: each fixed T's episodes above
        def __init__(self, *args, **kwargs):
            pass

        def close(self):
            pass

    def fake_run(runner, points, label, progress):
        return {e.cache_key: type("R", (), {"groups": [by_t[e.params["t"]]]})() for e in points}, False

    monkeypatch.setattr(run_module, "Runner", FakeRunner)
    monkeypatch.setattr(run_module, "_run_entries", fake_run)
    config = load_config("configs/smoke.yaml", training=False, overrides=[
        f"env.include_category={str(include_category).lower()}", "evaluation.table_temperatures=[0.0, 1.0]",
        *([] if include_category else ["policy.base=fixed"])])
    families, tables, interrupted = run_module._tables(config, [0.0, 1.0], None, 0, tmp_path, False, False)
    assert not interrupted and tables["table"][1.0] == {"creative_writing": 1.0, "factual_question": 0.0,
                                                          "other": 0.0}
    assert sorted(families) == (["fixed-tuned", "table"] if include_category else ["fixed-tuned"])
    assert [(e.diversity, e.params["t"]) for e in families["fixed-tuned"]] == [(0.0, 0.0), (1.0, 0.0)]


def test_family_points_run_under_a_wide_mapping_with_their_truncation():
    from kelvin.evaluation.families import BASELINE_MAPPING, family_entries
    from samplers.core import Truncation

    config = load_config(SMOKE)
    fams = family_entries(config, Truncation(min_p=0.02))
    assert list(fams) == ["fixed", "minp", "edt", "negative_minp", "hotcold", "fixed@train"]
    assert [e.name for e in fams["fixed"]] == ["fixed:T=0", "fixed:T=0.7", "fixed:T=1"]
    assert fams["negative_minp"][0].truncation == Truncation(min_p=0.1)
    assert fams["fixed@train"][0].truncation == Truncation(min_p=0.02) and fams["fixed"][0].truncation == Truncation()
    assert fams["hotcold"][0].params["spec"] == "hotcold:hot=2,n=1,cold=0.5"
    assert all(e.policy.action_mapping == BASELINE_MAPPING for es in fams.values() for e in es)
    assert len({e.cache_key for es in fams.values() for e in es}) == sum(len(es) for es in fams.values())
    # greedy and T = 1.0 (the fronts' reference) always run, whatever the grid says
    fams = family_entries(load_config(SMOKE, ["evaluation.fixed=[0.5,1.2]"]), Truncation(min_p=0.02))
    assert [e.name for e in fams["fixed"]] == ["fixed:T=0", "fixed:T=0.5", "fixed:T=1", "fixed:T=1.2"]
    assert [e.name for e in fams["fixed@train"]] == ["fixed@train:T=0", "fixed@train:T=0.5", "fixed@train:T=1",
                                                     "fixed@train:T=1.2"]


def test_policy_specs_keep_baseline_parameters_together():
    assert parse_policy_specs("learned:runs/a,pid,edt:theta=1.0,t0=0.8,fixed:0.7") == [
        "learned:runs/a", "pid", "edt:theta=1.0,t0=0.8", "fixed:0.7"]
    assert parse_policy_specs(["all"]) == ["all"]
    with pytest.raises(EvaluationError, match="empty"):
        parse_policy_specs(" , ")


def test_select_prompts_round_robin_over_categories():
    ps = [Prompt(f"t{i}", c, f"{c}-{i}", "test") for c in ("a", "b") for i in range(3)]
    assert [p.id for p in select_prompts(ps, 3)] == ["a-0", "b-0", "a-1"]
    assert len(select_prompts(ps, None)) == 6 and len(select_prompts(ps, 99)) == 6


def test_select_prompts_in_the_splits_mix_gives_each_category_its_share():
    ps = [Prompt(f"t{i}", c, f"{c}-{i}", "test") for c, n in (("a", 6), ("b", 3), ("c", 1)) for i in range(n)]
    assert [p.id for p in select_prompts(ps, 5)] == ["a-0", "b-0", "c-0", "a-1", "b-1"]
    # shares of 5: a 3.0, b 1.5, c 0.5; the one left over goes to b, whose remainder ties c's and comes first
    assert [p.id for p in select_prompts(ps, 5, "split")] == ["a-0", "b-0", "a-1", "b-1", "a-2"]
    assert [p.id for p in select_prompts(ps, 7, "split")] == ["a-0", "b-0", "c-0", "a-1", "b-1", "a-2", "a-3"]
    assert len(select_prompts(ps, 10, "split")) == 10 and select_prompts(ps, None, "split") == ps
    with pytest.raises(ValueError, match="mix='even'"):
        select_prompts(ps, 5, "even")


class _StubEmbedder:
    """Embeds text by a fixed table: orthogonal unit vectors, or the same one."""

    def __init__(self, table):
        self.table = table

    def encode(self, texts):
        import torch

        return torch.tensor([self.table[t] for t in texts], dtype=torch.float32)


def _episode(ids, temps, logprobs, completion, r=1.0, truncated=True, anomaly=0.0, coherence=0.5, correct=None):
    comps = {c: 0.0 for c in ("logprob", "repetition", "anomaly", "entropy", "coherence", "text_anomaly",
                              "correct", "group_semantic", "group_ngram")}
    comps.update(anomaly=anomaly, coherence=coherence, correct=float(bool(correct)))
    return {"token_ids": ids, "temperatures": np.asarray(temps), "logprobs": np.asarray(logprobs),
            "completion": completion, "episode": {"r": r, "l": len(temps)}, "reward_components": comps,
            "TimeLimit.truncated": truncated, "prompt_id": "p", "category": "c", "answerable": correct is not None}


def test_prompt_metrics_by_hand():
    a = _episode([1, 2, 3, 1, 2, 3], [0.5] * 6, [-1.0] * 6, "A", r=2.0, anomaly=-3.0, coherence=0.2)
    b = _episode([4, 5], [-1.0, 0.0], [-2.0, -4.0], "B", r=0.0, truncated=False, coherence=0.4)
    per = prompt_metrics([[a, b]], _StubEmbedder({"A": [1.0, 0.0], "B": [0.0, 1.0]}), repetition_n=3)
    assert per["reward"][0] == pytest.approx(1.0)
    assert per["logprob"][0] == pytest.approx((-1.0 + -3.0) / 2)  # mean per completion, then over samples
    assert per["perplexity"][0] == pytest.approx(math.exp(2.0))
    assert per["coherence"][0] == pytest.approx(0.3)
    assert per["anomaly_rate"][0] == pytest.approx((3 / 6 + 0) / 2)
    assert per["repetition_rate"][0] == pytest.approx((1 / 4 + 0) / 2)  # a: 1 of its 4 trigrams repeats
    assert per["distinct1"][0] == pytest.approx((3 / 6 + 1) / 2)
    assert per["distinct2_across"][0] == pytest.approx(4 / 6)  # a: 5 bigrams (3 distinct) + b: 1
    assert per["distinct1_across"][0] == pytest.approx(5 / 8)
    assert per["semantic_distance"][0] == pytest.approx(1.0)  # orthogonal embeddings
    assert per["eos_rate"][0] == pytest.approx(0.5)
    temps = np.array([0.5] * 6 + [-1.0, 0.0])
    assert per["temperature_mean"][0] == pytest.approx(temps.mean())
    assert per["temperature_std"][0] == pytest.approx(temps.std())
    assert per["negative_fraction"][0] == pytest.approx(1 / 8)
    assert per["near_greedy_fraction"][0] == pytest.approx(1 / 8)
    assert 0.0 <= per["self_bleu"][0] < 0.01  # no shared token
    assert math.isnan(per["accuracy"][0])  # an open prompt has no accuracy


def test_accuracy_is_the_share_of_correct_samples_on_answerable_prompts_only():
    right = _episode([1, 2], [0.5, 0.5], [-1.0, -1.0], "A", correct=True)
    wrong = _episode([3, 4], [0.5, 0.5], [-1.0, -1.0], "B", correct=False)
    per = prompt_metrics([[right, wrong, wrong], [right, right, wrong]],
                         _StubEmbedder({"A": [1.0, 0.0], "B": [0.0, 1.0]}), repetition_n=3)
    np.testing.assert_allclose(per["accuracy"], [1 / 3, 2 / 3])


def test_pass_at_k_is_one_when_any_sample_is_right_on_answerable_prompts_only():
    right = _episode([1, 2], [0.5, 0.5], [-1.0, -1.0], "A", correct=True)
    wrong = _episode([3, 4], [0.5, 0.5], [-1.0, -1.0], "B", correct=False)
    open_ = _episode([5, 6], [0.5, 0.5], [-1.0, -1.0], "A")
    per = prompt_metrics([[wrong, wrong, right, wrong], [wrong] * 4, [right] * 4, [open_] * 4],
                         _StubEmbedder({"A": [1.0, 0.0], "B": [0.0, 1.0]}), repetition_n=3)
    np.testing.assert_array_equal(per["pass_at_k"], [1.0, 0.0, 1.0, np.nan])  # pass@4
    np.testing.assert_array_equal(per["accuracy"], [0.25, 0.0, 1.0, np.nan])  # pass@1


def test_streams_average_each_prompts_metrics_and_recompute_perplexity():
    one = {"reward": np.array([1.0, 4.0]), "logprob": np.array([-1.0, -2.0]), "perplexity": np.array([0.0, 0.0]),
           "pass_at_k": np.array([1.0, np.nan])}
    two = {"reward": np.array([3.0, 0.0]), "logprob": np.array([-3.0, -2.0]), "perplexity": np.array([0.0, 0.0]),
           "pass_at_k": np.array([0.0, np.nan])}
    per = mean_over_streams([one, two])
    np.testing.assert_array_equal(per["reward"], [2.0, 2.0])
    np.testing.assert_array_equal(per["pass_at_k"], [0.5, np.nan])  # an open prompt stays without pass@K
    np.testing.assert_allclose(per["perplexity"], [math.exp(2.0), math.exp(2.0)])  # exp(-mean logprob)


@pytest.mark.slow
def test_two_streams_are_the_mean_of_the_two_seeds_run_alone(run_dir, tmp_path):
    from kelvin.evaluation.run import STREAM_SEED_STRIDE

    config = load_config(SMOKE, ["evaluation.max_prompts=2", "evaluation.batch_size=4"])

    def once(out, seed, streams):
        cfg = replace(config, evaluation=replace(config.evaluation, streams=streams))
        data = evaluate(cfg, out, ["fixed:0.9"], seed=seed, families=False, progress=False)
        return data["setup"]["streams"], data["policies"]["fixed:0.9"]["metrics"]

    (n, both), (_, first), (_, second) = (once(tmp_path / "ab", 3, 2), once(tmp_path / "a", 3, 1),
                                          once(tmp_path / "b", 3 + STREAM_SEED_STRIDE, 1))
    assert n == 2
    for metric in ("reward", "semantic_distance", "logprob", "coherence"):
        assert both[metric]["mean"] == pytest.approx((first[metric]["mean"] + second[metric]["mean"]) / 2), metric
    assert first["reward"]["mean"] != second["reward"]["mean"]  # two streams, two different draws


def test_group_by_prompt_pairs_rows_of_a_group_and_drops_wrapped_slots():
    # 3 prompts, K = 2, 2 groups, 2 episodes per row: slots 0..3 (slot = group + k * n_groups); slot 3 wraps.
    episodes = []
    for row in range(4):
        for k in range(2):
            slot = row // 2 + k * 2
            episodes.append({"row": row, "k": k, "prompt_id": f"p{slot % 3}", "sample": (row, k)})
    groups = group_by_prompt(episodes, n_prompts=3, group_size=2, n_groups=2)
    assert [[e["sample"] for e in g] for g in groups] == [[(0, 0), (1, 0)], [(2, 0), (3, 0)], [(0, 1), (1, 1)]]
    assert [g[0]["prompt_id"] for g in groups] == ["p0", "p1", "p2"]
    episodes[1]["prompt_id"] = "other"  # row 0, k = 1 (slot 2) no longer shares its group's prompt
    with pytest.raises(RuntimeError, match="do not share a prompt"):
        group_by_prompt(episodes, n_prompts=3, group_size=2, n_groups=2)


# ----------------------------------------------------------------------------- bad input (no LLM load)


def test_guarded_prefix_wraps_any_policy_in_the_default_guard(tmp_path):
    from kelvin.evaluation import resolve_policies
    from policies.guard import GuardedPolicy

    negative = load_config(SMOKE, ["env.action.t_min=-1.0"])  # a mapping with negative temperatures
    entries = resolve_policies(["fixed:-0.5", "guarded:fixed:-0.5", "guarded:pid"], negative, None, [])
    plain, guarded, pid = entries
    assert isinstance(guarded.policy, GuardedPolicy) and guarded.policy.policy.params == plain.policy.params
    assert (guarded.name, guarded.family, guarded.label) == ("guarded:fixed:-0.5", "guarded", "Guarded(Fixed(T=-0.5))")
    assert len({e.cache_key for e in entries}) == 3 and pid.policy.hold == 8  # no cache collision
    # with a rate limit in the env's mapping, a guarded policy runs in an env with the guard's own mapping
    # (the rate limit applied inside the guard, before its rules: the samplers' order)
    config = load_config(SMOKE, ["env.action.max_delta=0.3", "env.action.t_min=-1.0"])
    plain, guarded = resolve_policies(["fixed:-0.5", "guarded:fixed:-0.5"], config, None, [])
    assert plain.policy.action_mapping == config.env.action
    assert guarded.policy.action_mapping == replace(config.env.action, max_delta=None)
    assert guarded.policy.policy.action_mapping.max_delta == 0.3
    with pytest.raises(EvaluationError, match="no such run directory"):
        resolve_policies(["guarded:learned:" + str(tmp_path / "nope")], load_config(SMOKE), None, [])


def test_missing_policy_path_is_a_clear_error(tmp_path):
    with pytest.raises(EvaluationError, match="no such run directory"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["learned:" + str(tmp_path / "nope"), "pid"])
    assert not (tmp_path / "out").exists()


def test_run_of_another_model_is_refused(run_dir, tmp_path):
    other = _edit_config(run_dir, tmp_path / "other", lambda raw: raw["model"].update(name="some-other-model"))
    with pytest.raises(EvaluationError, match="trained with model 'some-other-model'"):
        evaluate(load_config(SMOKE), tmp_path / "out", [f"learned:{other}", "pid"])


def test_run_of_another_feature_version_is_refused(run_dir, tmp_path):
    other = _edit_config(run_dir, tmp_path / "v2", lambda raw: raw["env"]["features"].update(version=2))
    with pytest.raises(EvaluationError, match="feature spec version 2"):
        evaluate(load_config(SMOKE), tmp_path / "out", [f"learned:{other}"])


def test_run_of_another_observation_layout_is_refused(run_dir, tmp_path):
    other = _edit_config(run_dir, tmp_path / "nocat", lambda raw: (raw["env"].update(include_category=False),
                                                                    raw.update(policy={"base": "fixed"})))
    with pytest.raises(EvaluationError, match="other observations"):
        evaluate(load_config(SMOKE), tmp_path / "out", [f"learned:{other}"])
    # the evaluation's own settings must match the run too (horizon = max_new_tokens)
    with pytest.raises(EvaluationError, match="horizon"):
        evaluate(load_config(SMOKE, ["env.max_new_tokens=16"]), tmp_path / "out", [f"learned:{run_dir}"])


def test_empty_prompt_file_and_bad_arguments(run_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(EvaluationError, match="contains no prompts"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["pid"], prompts_file=str(empty))
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["pid"], prompts_file=str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="evaluation.samples"):
        load_config(SMOKE, ["evaluation.samples=1"])
    with pytest.raises(EvaluationError, match="did you mean 'edt'"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["edtt"])
    with pytest.raises(EvaluationError, match="needs a run"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["learned"])
    with pytest.raises(EvaluationError, match="listed twice"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["pid", "pid"])
    assert not (tmp_path / "out").exists()  # bad input leaves no trace


def test_an_output_path_that_cannot_be_a_directory_is_refused_before_anything_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(EvaluationError, match=r"--out .*file is a file; give a directory"):
        evaluate(load_config(SMOKE), tmp_path / "file", ["pid"])
    with pytest.raises(EvaluationError, match=r"file is a file, so .*sub cannot be created"):
        evaluate(load_config(SMOKE), tmp_path / "file" / "sub", ["pid"])
    assert (tmp_path / "file").read_text() == "x"


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    code = main(["--config", str(SMOKE), "--policies", f"learned:{tmp_path / 'nope'},pid", "--out", str(tmp_path)])
    assert code == 2
    assert "error: learned policy" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real model

TINY = ["--set", "evaluation.fixed=[0.0,1.0]",
        "--set", "evaluation.minp=[]", "--set", "evaluation.edt=[]", "--set", "evaluation.negative_minp=[-1.0]",
        "--set", "evaluation.hotcold=[[2.0,1,0.5]]", "--set", "evaluation.table_temperatures=[0.0,1.0]"]


@pytest.mark.slow
def test_cli_end_to_end_writes_every_output(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["--config", str(SMOKE), "--run", str(run_dir), "--policies", "learned,pid",
                 "--split", "test", "--out", str(out), *TINY])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "evaluate" in captured.err and "run" in captured.err  # the tqdm bar counts runs
    assert "outside the hull of" in captured.out
    for name in ["report.md", "metrics.json", "metrics.csv", "samples.jsonl", "fronts.png",
                 "temperature_trajectories.png", "temperature_hist.png"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list((out / "tb").glob("events.out.tfevents.*"))

    data = json.loads((out / "metrics.json").read_text())
    learned = [f"learned:{run_dir}@λ=0", f"learned:{run_dir}@λ=2"]  # smoke: diversity_points 2 over λ in [0, 2]
    assert list(data["policies"]) == [*learned, "pid"]
    assert data["reference"] == learned[-1]
    for name, block in data["policies"].items():
        assert set(block["metrics"]) == {m.name for m in METRICS}, name
        assert block["n_prompts"] == 6 and block["n_completions"] == 12  # 6 test prompts (2 answerable) x 2
    assert {k: list(v["points"]) for k, v in data["families"].items()} == {
        "fixed": ["fixed:T=0", "fixed:T=1"], "negative_minp": ["negative_minp:T=-1"],
        "hotcold": ["hotcold:2x1/0.5"], "table": ["table:λ=0", "table:λ=2"],
        # the smoke run trains under min-p 0.02 (the default): fixed T and the table again under it
        "fixed@train": ["fixed@train:T=0", "fixed@train:T=1"], "table@train": ["table@train:λ=0", "table@train:λ=2"]}
    assert data["families"]["fixed@train"]["points"]["fixed@train:T=1"]["truncation"]["min_p"] == 0.02
    greedy = data["families"]["fixed"]["points"]["fixed:T=0"]["metrics"]
    assert greedy["temperature_mean"]["mean"] == 0.0 and greedy["near_greedy_fraction"]["mean"] == 1.0
    neg = data["families"]["negative_minp"]["points"]["negative_minp:T=-1"]["metrics"]
    assert neg["negative_fraction"]["mean"] == 1.0
    assert set(data["tables"]["table"]) == {"0", "2"}  # one tuned table per λ of the learned front
    for table in data["tables"]["table"].values():
        assert set(table.values()) <= {0.0, 1.0}  # each category's T is one of the tuned grid's
    assert [f["name"] for f in data["fronts"]] == ["main", "answerable", "open", "open_logprob", "open_ngram"]
    pass_front = data["fronts"][1]
    assert (pass_front["x"], pass_front["y"], pass_front["x_subset"], pass_front["y_subset"]) == (
        "accuracy", "pass_at_k", "answerable", "answerable")
    for fam, info in pass_front["families"].items():  # pass@K >= pass@1 at every point: any right >= share right
        assert all(p["y"] >= p["x"] for p in info["points"]), fam
    main_front = data["fronts"][0]
    assert (main_front["x"], main_front["y"]) == ("accuracy", "semantic_distance")
    fixed_t1 = next(p for p in main_front["families"]["fixed"]["points"] if p["name"] == "fixed:T=1")
    assert main_front["reference"] == [fixed_t1["x"], 0.0]  # the common reference: fixed T = 1.0's x
    for fam, info in main_front["families"].items():  # each hull HV is that of the reported points
        pts = [(p["x"], p["y"]) for p in info["points"]]
        assert info["hv_common"] == pytest.approx(hull_hypervolume(pts, tuple(main_front["reference"])), rel=1e-12)
    run_front = main_front["learned"][str(run_dir)]
    assert [p["lambda"] for p in run_front["points"]] == [0.0, 2.0]
    for fam, v in run_front["vs"].items():  # each verdict is the one its own interval gives
        assert v["low"] <= v["diff"] + 1e-12 and v["diff"] <= v["high"] + 1e-12, fam
        assert v["verdict"] == ("outside" if v["low"] > 0 else "inside" if v["high"] < 0 else "no difference"), fam
    goal = data["goals"][str(run_dir)]
    assert (goal["lowest_lambda"], goal["highest_lambda"]) == (0.0, 2.0)
    for name in ("main", "answerable"):
        assert goal[f"beats_every_family_on_{name}_front"] == all(v == "outside" for v in goal[f"{name}_front"].values())

    report = (out / "report.md").read_text()
    for needle in ["## Verdict", "95%", "fronts.png", "temperature_trajectories.png", "## Fronts and hulls",
                   "## Sample completions", "hull", "- Main front (HV", "- Answerable front (pass@1 x pass@K) (HV"]:
        assert needle in report, needle
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("kind,policy,label,metric,mean,low,high")
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["policy"] for s in samples} == set(data["policies"]) and len(samples) == 3 * 12

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert "plots/fronts" in ea.Tags()["images"]


def _numbers(data):
    pol = {n: {m: s for m, s in b["metrics"].items() if m != "tokens_per_s"} for n, b in data["policies"].items()}
    return pol, data["paired_differences"]


@pytest.mark.slow
def test_same_seed_same_numbers(run_dir, tmp_path):
    config = load_config(SMOKE, ["evaluation.max_prompts=2", "evaluation.batch_size=4"])

    def once(out):
        return evaluate(config, out, [f"learned:{run_dir}", "pid"], seed=3, families=False, progress=False)

    a, b = once(tmp_path / "a"), once(tmp_path / "b")
    assert _numbers(a) == _numbers(b)  # tokens/s is a timing: the only number allowed to differ
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()


@pytest.mark.slow
def test_ctrl_c_writes_a_partial_report_and_resume_finishes_with_the_same_numbers(run_dir, tmp_path, monkeypatch,
                                                                                   capsys):
    from kelvin.evaluation import run as run_module

    args = ["--config", str(SMOKE), "--policies", f"learned:{run_dir},pid,fixed:0.5", "--no-families",
            "--set", "evaluation.max_prompts=2", "--set", "evaluation.batch_size=4", "--no-progress"]
    full = main([*args, "--out", str(tmp_path / "full")])
    assert full == 0
    real_run, calls = run_module.Runner.run, []

    def ctrl_c_on_the_fourth_run(self, entry):
        calls.append(entry.name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_run(self, entry)

    monkeypatch.setattr(run_module.Runner, "run", ctrl_c_on_the_fourth_run)
    out = tmp_path / "cut"
    assert main([*args, "--out", str(out)]) == 130
    partial = json.loads((out / "metrics.json").read_text())
    assert partial["interrupted"] and list(partial["policies"]) == [f"learned:{run_dir}@λ=0", f"learned:{run_dir}@λ=2",
                                                                    "pid"]
    assert "interrupted (Ctrl-C)" in (out / "report.md").read_text()
    assert "rerun with --resume" in capsys.readouterr().err
    monkeypatch.setattr(run_module.Runner, "run", real_run)
    assert main([*args, "--out", str(out), "--resume"]) == 0
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["warnings"] == [f"--resume: 3 runs reused from {out / 'cache'}"]
    assert _numbers(resumed) == _numbers(json.loads((tmp_path / "full" / "metrics.json").read_text()))


def test_reward_headline_pairs_each_learned_lambda_with_its_rivals_by_hand():
    """learned − rival per prompt, at the same λ only; the base of another run is not a rival."""
    from kelvin.evaluation.headline import reward_headline
    from kelvin.evaluation.policies import PolicyEntry
    from kelvin.evaluation.statistics import PolicyResult
    from policies.actions import ActionMapping
    from policies.features import FeatureSpec
    from policies.registry import make_policy

    policy = make_policy("fixed:0.5", FeatureSpec(horizon=8), ActionMapping())

    def entry(name, family, diversity, run=None):
        return PolicyEntry(name, name, family, policy, params={"n": name}, run_dir=run, diversity=diversity)

    learned = entry("learned@1", "learned", 1.0, "runA")
    rivals = {"table": [entry("table@0", "table", 0.0), entry("table@1", "table", 1.0)],
              "fixed-tuned": [entry("fixed-tuned@1", "fixed-tuned", 1.0)], "edt": [entry("edt", "edt", None)]}
    bases = [entry("baseA@1", "base", 1.0, "runA"), entry("baseB@1", "base", 1.0, "runB")]
    rewards = {"learned@1": [3.0, 5.0], "table@0": [9.0, 9.0], "table@1": [3.0, 3.0], "fixed-tuned@1": [2.0, 4.0],
               "edt": [0.0, 0.0], "baseA@1": [1.0, 1.0], "baseB@1": [0.0, 0.0]}
    everything = [learned, *bases, *[e for es in rivals.values() for e in es]]
    results = {e.cache_key: PolicyResult(e, [], {"reward": np.asarray(rewards[e.name])}, {}, 0.0, 0.0)
               for e in everything}
    rows = reward_headline(results, [learned, *bases], rivals, n_resamples=2000, seed=0)
    got = {r["rival_name"]: (r["mean"], r["low"], r["high"], r["verdict"]) for r in rows}
    assert got == {"table@1": (1.0, 0.0, 2.0, "no difference"),  # differences 0 and 2: bootstrap means 0, 1, 2
                   "fixed-tuned@1": (1.0, 1.0, 1.0, "better"), "baseA@1": (3.0, 2.0, 4.0, "better")}
