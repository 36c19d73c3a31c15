"""train.py end to end: a real PPO run on the real model with smoke.yaml, in a subprocess (the session's
shared ``smoke_run``, tests/conftest.py)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, SMOKE, run_train, wait_until

from envs.prompts import CATEGORIES

PROMISED_SCALARS = {
    "rollout/ep_rew_mean", "rollout/ep_len_mean", "rollout/temperature_mean", "rollout/temperature_std",
    "rollout/negative_fraction", "rollout/near_greedy_fraction", "rollout/anomaly_rate",
    "reward/logprob", "reward/repetition", "reward/anomaly", "reward/entropy",
    "episode/coherence", "episode/text_anomaly", "episode/correct", "episode/group_semantic", "episode/group_ngram",
    "perf/tokens_per_s", "perf/model_share", "perf/env_share", "perf/waiting_share",
    "train/value_loss", "train/policy_gradient_loss", "train/entropy_loss", "train/approx_kl",
    "validation/learned_reward", "validation/best_fixed_reward", "validation/best_fixed_temperature",
    "validation/margin_vs_best_fixed", "validation/margin_vs_best_fixed_low", "validation/margin_vs_best_fixed_high",
    "validation/margin_vs_base", "validation/margin_vs_base_low", "validation/margin_vs_base_high",
    "validation/base_reward", "validation/margin_vs_base_at_0", "validation/margin_vs_base_at_2_low",
    "validation/margin_vs_best_fixed_at_2_high",
}


def _tags(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir / "tb" / "PPO_1"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    return ea


@pytest.mark.slow
def test_smoke_run_writes_every_promised_file(smoke_run):
    run_dir = smoke_run.run_dir
    for name in ["config.yaml", "command.txt", "model.zip", "vecnormalize.pkl", "validation.json", "summary.json",
                 "base.json"]:
        assert (run_dir / name).is_file(), name
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*.zip")) == ["step_32.zip", "step_64.zip",
                                                                                    "step_96.zip"]
    assert list((run_dir / "tb" / "PPO_1").glob("events.out.tfevents.*"))
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["env"]["batch_size"] == 4 and resolved["ppo"]["n_steps"] == 8
    assert "gamma" in resolved["ppo"] and "total_timesteps" in resolved["train"]  # defaults filled in
    assert "train.py" in (run_dir / "command.txt").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["timesteps"] == 96 and not summary["interrupted"]
    val = json.loads((run_dir / "validation.json").read_text())
    assert set(val["fixed"]) == {"0.7", "1"}
    assert val["fixed"]["0.7"]["temperature_mean"] == pytest.approx(0.7, abs=1e-5)
    # the margins carry paired intervals around their means, and the base was validated on the same episodes
    for name in ("margin_vs_best_fixed", "margin_vs_base"):
        m = val[name]
        assert m["low"] <= m["mean"] <= m["high"]
    assert val["margin_vs_best_fixed"]["mean"] == pytest.approx(val["learned"]["reward"] - val["best_fixed_reward"])
    assert val["margin_vs_base"]["mean"] == pytest.approx(val["learned"]["reward"] - val["base"]["reward"])
    assert [h["step"] for h in val["history"]] == [64, 96]  # validate_every 2 and after the last update
    assert "prompts x 2 at λ = 0, 2, paired 95% CI" in smoke_run.stdout
    assert smoke_run.stdout.splitlines()[-1].startswith("  vs its base at each λ: λ=0 ")
    # the grid (configs/smoke.yaml: λ = 0 and 2): each prompt at each λ; the margins average the two, per λ as well
    assert val["diversity"] == [0.0, 2.0] and set(val["by_diversity"]) == {"0", "2"}
    assert val["episodes_per_policy"] == 2 * 2 * 2  # 2 prompts x 2 samples x 2 λ
    per_lam = [val["by_diversity"][k]["margin_vs_base"]["mean"] for k in ("0", "2")]
    assert val["margin_vs_base"]["mean"] == pytest.approx(sum(per_lam) / 2)
    last = val["history"][-1]["by_diversity"]  # each validation keeps its margins per λ
    assert [last[k]["margin_vs_base"] for k in ("0", "2")] == [val["by_diversity"][k]["margin_vs_base"] for k in ("0", "2")]
    base = json.loads((run_dir / "base.json").read_text())
    assert base["kind"] == "table" and base["lambdas"] == [0.0, 2.0] and base["tuning"]["prompts"] == 4
    assert set(base["temperatures"]) == {*CATEGORIES, "other"}
    assert {t for row in base["temperatures"].values() for t in row} <= {0.0, 1.0}  # from policy.base_temperatures


@pytest.mark.slow
def test_event_files_hold_the_promised_tags(smoke_run):
    run_dir = smoke_run.run_dir
    ea = _tags(run_dir)
    tags = ea.Tags()
    missing = PROMISED_SCALARS - set(tags["scalars"])
    assert not missing, missing
    assert "rollout/temperature_hist" in tags["histograms"]
    assert any(t.startswith("validation/samples") for t in tags["tensors"])
    # one point per rollout (96 steps / (8 steps x 4 rows) = 3), at the step each rollout ended
    assert [e.step for e in ea.Scalars("rollout/temperature_mean")] == [32, 64, 96]


@pytest.mark.slow
def test_saved_model_acts_as_its_export(smoke_run):
    """model.zip + vecnormalize.pkl, loaded with SB3, act exactly as the export train() wrote."""
    import numpy as np
    import torch

    from kelvin.export import learned_policy
    from kelvin.rundir import RunDir, load_ppo, load_vecnormalize
    from policies import Featurizer, load_policy

    run = RunDir(smoke_run.run_dir)
    exported = load_policy(run.export_dir)
    spec = exported.feature_spec
    f = Featurizer(spec, 3)
    obs = f.observe(torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3)  # (3, F) raw features
    saved = learned_policy(load_ppo(run.model_file), load_vecnormalize(run.normalizer_file), spec,
                           exported.action_mapping, base=run.load_base())
    a_saved, _ = saved.predict(obs)
    a_exported, _ = exported.predict(obs)
    assert a_saved.shape == (3, 1)
    np.testing.assert_array_equal(a_saved, a_exported)


@pytest.mark.slow
def test_resume_continues_the_step_count(smoke_run, tmp_path):
    import shutil

    run_dir = tmp_path / "resumed"
    shutil.copytree(smoke_run.run_dir, run_dir)
    proc = run_train(["--resume", str(run_dir), "--set", "train.total_timesteps=128"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["timesteps"] == 128
    steps = [e.step for e in _tags(run_dir).Scalars("rollout/ep_rew_mean")]
    assert max(steps) > 96  # the curve continues past the first run's last step, in the same PPO_1 directory
    assert len((run_dir / "command.txt").read_text().splitlines()) == 2


@pytest.mark.slow
def test_corrupt_or_missing_checkpoint_is_a_clear_error(tmp_path, smoke_run):
    proc = run_train(["--resume", str(tmp_path / "nope")])
    assert proc.returncode == 2 and "no such run directory" in proc.stderr
    import shutil

    run_dir = tmp_path / "corrupt"
    shutil.copytree(smoke_run.run_dir, run_dir)
    (run_dir / "model.zip").write_bytes(b"not a zip file")
    for step in (32, 64, 96):
        (run_dir / "checkpoints" / f"step_{step}.zip").unlink()
    proc = run_train(["--resume", str(run_dir)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"no model of {run_dir} loads ({run_dir / 'model.zip'}: cannot load" in proc.stderr


@pytest.mark.slow
def test_ctrl_c_leaves_a_loadable_model(tmp_path):
    from stable_baselines3 import PPO

    run_dir = tmp_path / "interrupted"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(SMOKE), "--run-dir", str(run_dir),
                             "--set", "train.total_timesteps=100000", "--set", "train.validate_every=0"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: bool(list((run_dir / "checkpoints").glob("step_*.zip"))), proc, timeout=300)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted (model saved)" in out and "Ctrl-C: stopping after this step" in err
    model = PPO.load(run_dir / "model.zip", device="cpu")
    assert model.num_timesteps >= 32
    assert (run_dir / "vecnormalize.pkl").is_file()


def test_bad_config_names_the_key_and_suggests(tmp_path):
    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config

    with pytest.raises(ConfigError, match="(?i)learning_rat.*did you mean 'learning_rate'"):
        load_config(SMOKE, ["ppo.learning_rat=1e-4"])
    with pytest.raises(ConfigError, match="env.max_new_token.*max_new_tokens"):
        load_config(SMOKE, ["env.max_new_token=5"])
    with pytest.raises(ConfigError, match="group_size"):
        load_config(SMOKE, ["env.group_size=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("env: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    cfg = load_config(SMOKE, ["ppo.learning_rate=1e-4", "env.action.t_min=-1.5"])
    assert cfg.ppo.learning_rate == 1e-4 and cfg.env.action.t_min == -1.5
    proc = run_train(["--config", str(SMOKE), "--run-dir", str(tmp_path / "x"), "--set", "ppo.n_step=4"])
    assert proc.returncode == 2 and "n_steps" in proc.stderr


@pytest.mark.slow
def test_a_second_run_of_the_same_settings_reads_its_baselines_and_base_from_the_cache(smoke_run, tmp_path):
    """The fixed temperatures' and the base's validation episodes, and the base tuning's, are deterministic: a second
    run with the same config computes none of them (it says so) and gets the same numbers and the same base."""
    proc = run_train(["--config", str(SMOKE), "--run-dir", str(tmp_path / "again"),
                      "--set", "train.total_timesteps=32"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tuned base (table) on 4 train prompts x 2 temperatures: cached" in proc.stderr
    assert "validation baselines (2 fixed T + the base, 2 prompts): cached" in proc.stderr
    first = json.loads((smoke_run.run_dir / "validation.json").read_text())
    second = json.loads((tmp_path / "again" / "validation.json").read_text())
    assert second["fixed"] == first["fixed"] and second["base"] == first["base"]
    base = lambda d: {k: v for k, v in json.loads((d / "base.json").read_text()).items() if k != "tuning"}  # noqa: E731
    assert base(tmp_path / "again") == base(smoke_run.run_dir)
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert summary["perf"]["baselines_cached"] is True
    # 2 fixed T (one run each, scored at every λ), the base at each of the 2 λ of the grid, 2 tuning runs
    assert sorted(p.suffix for p in (tmp_path / "again" / "cache").iterdir()) == [".json"] * 6
