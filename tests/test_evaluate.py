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

from kelvin.config import load_config
from kelvin.evaluation.metrics import METRIC_BY_NAME
from kelvin.evaluation.statistics import verdict
from kelvin.evaluation import (
    METRICS,
    EvaluationError,
    evaluate,
    group_by_prompt,
    hypervolume_2d,
    main,
    front_gap,
    pareto_front,
    parse_policy_specs,
    parse_sweep_grid,
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


def test_front_gap_against_the_interpolated_front():
    pts = [(0.0, 1.0), (1.0, 0.0), (-0.5, 0.5)]  # (-0.5, 0.5) is dominated by (0, 1): not on the front
    assert front_gap(pts, (0.5, 0.6)) == pytest.approx(0.1)  # the segment is at 0.5 there
    assert front_gap(pts, (0.25, 0.5)) == pytest.approx(-0.25)  # below: the front reaches 0.75
    assert front_gap(pts, (1.0, 0.0)) == pytest.approx(0.0)  # a front point itself
    assert front_gap(pts, (2.0, 0.5)) is None and front_gap(pts, (-0.2, 0.5)) is None  # outside its x range
    assert front_gap([(0.0, 1.0), (1.0, 0.0), (0.5, 0.2)], (0.5, 0.6)) == pytest.approx(0.4)  # through (0.5, 0.2)
    assert front_gap([(1.0, 2.0)], (1.0, 2.5)) == pytest.approx(0.5)


def test_policy_specs_keep_baseline_parameters_together():
    assert parse_policy_specs("learned:runs/a,pid,edt:theta=1.0,t0=0.8,fixed:0.7") == [
        "learned:runs/a", "pid", "edt:theta=1.0,t0=0.8", "fixed:0.7"]
    assert parse_policy_specs(["all"]) == ["all"]
    with pytest.raises(EvaluationError, match="empty"):
        parse_policy_specs(" , ")


def test_sweep_grid_overrides():
    grids = parse_sweep_grid(["fixed=0.5,1", "edt:theta=1,3", "pid="])
    assert grids["fixed"] == ("t", [0.5, 1.0]) and grids["edt"] == ("theta", [1.0, 3.0]) and "pid" not in grids
    with pytest.raises(EvaluationError, match="(?i)did you mean 'fixed'"):
        parse_sweep_grid(["fixd=1"])


def test_select_prompts_round_robin_over_categories():
    ps = [Prompt(f"t{i}", c, f"{c}-{i}", "test") for c in ("a", "b") for i in range(3)]
    assert [p.id for p in select_prompts(ps, 3)] == ["a-0", "b-0", "a-1"]
    assert len(select_prompts(ps, None)) == 6 and len(select_prompts(ps, 99)) == 6


class _StubEmbedder:
    """Embeds text by a fixed table: orthogonal unit vectors, or the same one."""

    def __init__(self, table):
        self.table = table

    def encode(self, texts):
        import torch

        return torch.tensor([self.table[t] for t in texts], dtype=torch.float32)


def _episode(ids, temps, logprobs, completion, r=1.0, truncated=True, anomaly=0.0, coherence=0.5):
    comps = {c: 0.0 for c in ("logprob", "repetition", "anomaly", "entropy", "coherence", "text_anomaly",
                              "correct", "group_semantic", "group_ngram")}
    comps.update(anomaly=anomaly, coherence=coherence)
    return {"token_ids": ids, "temperatures": np.asarray(temps), "logprobs": np.asarray(logprobs),
            "completion": completion, "episode": {"r": r, "l": len(temps)}, "reward_components": comps,
            "TimeLimit.truncated": truncated, "prompt_id": "p", "category": "c"}


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

    entries = resolve_policies(["fixed:-0.5", "guarded:fixed:-0.5", "guarded:pid"], load_config(SMOKE), None, [])
    plain, guarded, pid = entries
    assert isinstance(guarded.policy, GuardedPolicy) and guarded.policy.policy.params == plain.policy.params
    assert (guarded.name, guarded.family, guarded.label) == ("guarded:fixed:-0.5", "guarded", "Guarded(Fixed(T=-0.5))")
    assert len({e.cache_key for e in entries}) == 3 and pid.policy.hold == 8  # no cache collision
    # with a rate limit in the env's mapping, a guarded policy runs in an env with the guard's own mapping
    # (the rate limit applied inside the guard, before its rules: the samplers' order)
    config = load_config(SMOKE, ["env.action.max_delta=0.3"])
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
    other = _edit_config(run_dir, tmp_path / "nocat", lambda raw: raw["env"].update(include_category=False))
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
    with pytest.raises(EvaluationError, match="must be an integer >= 2"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["pid"], samples=1)
    with pytest.raises(EvaluationError, match="did you mean 'edt'"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["edtt"])
    with pytest.raises(EvaluationError, match="needs a run"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["learned"])
    with pytest.raises(EvaluationError, match="listed twice"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["pid", "pid"])


def test_cli_reports_bad_input_with_exit_code_2(tmp_path, capsys):
    code = main(["--config", str(SMOKE), "--policies", f"learned:{tmp_path / 'nope'},pid", "--out", str(tmp_path)])
    assert code == 2
    assert "error: learned policy" in capsys.readouterr().err


# ----------------------------------------------------------------------------- real model

TINY = ["--samples", "2", "--max-prompts", "2", "--bootstrap", "200"]


@pytest.mark.slow
def test_cli_end_to_end_writes_every_output(run_dir, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(["--config", str(SMOKE), "--run", str(run_dir), "--policies", "learned,pid,edt,fixed:0.7",
                 "--split", "test", "--out", str(out), *TINY, "--sweep-grid", "fixed=-0.5,0.7",
                 "--sweep-grid", "edt=1.5", "--sweep-grid", "pid=", "--sweep-grid", "dynatemp="])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "evaluate" in captured.err and "step" in captured.err  # the tqdm bar
    assert "reward learned:" in captured.out
    for name in ["report.md", "metrics.json", "metrics.csv", "samples.jsonl", "fronts.png",
                 "temperature_trajectories.png", "temperature_hist.png"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert list((out / "tb").glob("events.out.tfevents.*"))

    data = json.loads((out / "metrics.json").read_text())
    learned = f"learned:{run_dir}"
    assert list(data["policies"]) == [learned, "pid", "edt", "fixed:0.7"]
    assert data["reference"] == learned
    for name, block in data["policies"].items():
        assert set(block["metrics"]) == {m.name for m in METRICS}, name
        assert block["n_prompts"] == 2 and block["n_completions"] == 4
        for metric, s in block["metrics"].items():
            assert set(s) == {"mean", "low", "high"}
            if metric != "tokens_per_s":
                assert s["low"] <= s["mean"] + 1e-9 and s["mean"] <= s["high"] + 1e-9, (name, metric, s)
    assert data["policies"]["fixed:0.7"]["metrics"]["temperature_mean"]["mean"] == pytest.approx(0.7, abs=1e-5)
    assert data["policies"]["fixed:0.7"]["metrics"]["temperature_std"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert set(data["paired_differences"]["baselines"]) == {"pid", "edt", "fixed:0.7"}
    for diffs in data["paired_differences"]["baselines"].values():
        assert {"reward", "logprob", "semantic_distance"} <= set(diffs)
        for metric, d in diffs.items():  # each verdict is the one its own interval gives
            assert d["verdict"] == verdict(METRIC_BY_NAME[metric], d["low"], d["high"]), metric
    assert set(data["sweep"]) == {"fixed", "edt"} and len(data["sweep"]["fixed"]["points"]) == 2
    neg = data["sweep"]["fixed"]["points"]["fixed:t=-0.5"]["metrics"]
    assert neg["negative_fraction"]["mean"] == pytest.approx(1.0)
    # a sweep point equal to a listed policy is run once: same numbers
    assert data["sweep"]["fixed"]["points"]["fixed:t=0.7"]["metrics"] == data["policies"]["fixed:0.7"]["metrics"]
    front = data["fronts"][0]
    assert (front["x"], front["y"], front["reference"]) == ("logprob", "semantic_distance", [-10.0, 0.0])
    assert set(front["families"]) == {"fixed", "edt"} and learned in front["learned"]
    assert set(front["learned"][learned]["front_gap"]) == {"fixed", "edt"}
    for family, info in front["families"].items():  # each hypervolume is that of the reported points' means
        points = [data["sweep"][family]["points"][name]["metrics"] for name in info["points"]]
        expected = hypervolume_2d([(m["logprob"]["mean"], m["semantic_distance"]["mean"]) for m in points], (-10.0, 0.0))
        assert info["hypervolume"] == pytest.approx(expected, rel=1e-12)

    report = (out / "report.md").read_text()
    for needle in ["## Verdict", "95%", "fronts.png", "temperature_trajectories.png", "temperature_hist.png",
                   "## Sample completions", "excludes zero", "hypervolume"]:
        assert needle in report, needle
    assert sum(line.startswith("- **The learned policy") for line in report.splitlines()) == 3
    csv_lines = (out / "metrics.csv").read_text().splitlines()
    assert csv_lines[0].startswith("kind,policy,label,metric,mean,low,high")
    assert any(line.startswith("paired_difference,pid,") for line in csv_lines)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 * 4 and {s["policy"] for s in samples} == set(data["policies"])

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert {"reward/pid", "logprob/edt", "paired_difference/reward/pid"} <= set(ea.Tags()["scalars"])
    assert "plots/fronts" in ea.Tags()["images"]


@pytest.mark.slow
def test_same_seed_same_numbers(run_dir, tmp_path):
    def once(out):
        return evaluate(load_config(SMOKE), out, [f"learned:{run_dir}", "pid"], samples=2, max_prompts=2, seed=3,
                        sweep=False, n_resamples=200, progress=False)

    def numbers(data):
        pol = {n: {m: s for m, s in b["metrics"].items() if m != "tokens_per_s"} for n, b in data["policies"].items()}
        return pol, data["paired_differences"]

    a, b = once(tmp_path / "a"), once(tmp_path / "b")
    assert numbers(a) == numbers(b)  # tokens/s is a timing: the only number allowed to differ
    assert (tmp_path / "a" / "samples.jsonl").read_text() == (tmp_path / "b" / "samples.jsonl").read_text()
