"""``train.keep_best``: the run ships its best validated policy (``best/``), the base when none beats it; the
export, ``evaluate.py`` and the probe read it, ``--resume`` still continues ``model.zip``. Fast: real SB3
snapshots of a small PPO on Pendulum and hand-made validation records; slow: a real smoke run and
``scripts/keep_best.py`` on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import PPO

from kelvin.callbacks import KeepBest
from kelvin.evaluation.policies import load_learned_policy
from kelvin.rundir import RunDir, Snapshot, load_ppo, model_files
from conftest import ROOT, SMOKE, run_train


def _snapshot(value: float, step: int) -> Snapshot:
    """A real PPO save whose last-layer bias is ``value`` (tells the snapshots apart once written)."""
    model = PPO("MlpPolicy", gym.make("Pendulum-v1"), n_steps=32, batch_size=32, seed=0, device="cpu")
    with torch.no_grad():
        model.policy.action_net.bias.fill_(value)
    model.num_timesteps = step
    return Snapshot.take(model)


def _record(step: int, vs_base: float | None, vs_fixed: float = -1.0) -> dict:
    margin = lambda m: {"mean": m, "low": m - 0.1, "high": m + 0.1}  # noqa: E731
    return {"step": step, "margin_vs_best_fixed": margin(vs_fixed),
            "margin_vs_base": None if vs_base is None else margin(vs_base)}


def _kept_bias(run: RunDir) -> float:
    return float(load_ppo(run.best_model_file).policy.action_net.bias.detach()[0])


def test_the_best_margin_against_the_base_is_kept_and_the_base_when_none_beats_it(tmp_path):
    run = RunDir(tmp_path)
    keep = KeepBest(run, start=_snapshot(0.0, 0))
    assert not run.best_dir.exists()  # nothing is written before a validation
    # the first validation loses to the base: the base (the start, residual zero) is kept
    assert keep.offer(_record(100, -0.05), 1, lambda: _snapshot(1.0, 100)) is False
    assert keep.record == {"updates": 0, "step": 0, "criterion": "margin_vs_base", "value": 0.0, "margin": None,
                           "what": "the base (the residual at zero, as the run started)"}
    assert _kept_bias(run) == 0.0
    # a win replaces it; a smaller one and a tie do not; a larger one does
    assert keep.offer(_record(200, 0.2), 2, lambda: _snapshot(2.0, 200)) is True
    assert keep.offer(_record(300, 0.1), 3, lambda: _snapshot(3.0, 300)) is False
    assert keep.offer(_record(400, 0.2), 4, lambda: _snapshot(4.0, 400)) is False
    assert _kept_bias(run) == 2.0 and keep.record["updates"] == 2 and keep.record["step"] == 200
    assert keep.offer(_record(500, 0.3, vs_fixed=5.0), 5, lambda: _snapshot(5.0, 500)) is True
    assert _kept_bias(run) == 5.0
    assert json.loads(run.best_record_file.read_text()) == keep.record == {
        "updates": 5, "step": 500, "criterion": "margin_vs_base", "value": 0.3,
        "margin": {"mean": 0.3, "low": 0.3 - 0.1, "high": 0.3 + 0.1}, "what": "the validated policy"}
    # a resumed run goes on from the record it left (its start is not the base: none is given)
    again = KeepBest(run)
    assert again.offer(_record(600, 0.25), 6, lambda: _snapshot(6.0, 600)) is False
    assert again.offer(_record(700, 0.35), 7, lambda: _snapshot(7.0, 700)) is True and _kept_bias(run) == 7.0


def test_without_a_base_the_margin_against_the_best_fixed_t_ranks_and_the_first_is_kept(tmp_path):
    run = RunDir(tmp_path)
    keep = KeepBest(run)  # policy.base: none: no start to fall back on
    assert keep.offer(_record(100, None, vs_fixed=-0.4), 1, lambda: _snapshot(1.0, 100)) is True
    assert keep.record["criterion"] == "margin_vs_best_fixed" and keep.record["value"] == -0.4
    assert keep.offer(_record(200, None, vs_fixed=-0.5), 2, lambda: _snapshot(2.0, 200)) is False
    assert _kept_bias(run) == 1.0


def test_a_run_with_a_kept_policy_ships_it_and_a_checkpoint_still_loads_as_itself(tmp_path):
    run = RunDir(tmp_path)
    _snapshot(9.0, 900).write(run.model_file, run.normalizer_file)
    (run.path / "config.yaml").write_text("{}\n")
    assert run.policy_files() == (run.model_file, run.normalizer_file) and model_files(tmp_path)[1] == run.model_file
    KeepBest(run).offer(_record(100, 0.1), 1, lambda: _snapshot(1.0, 100))
    assert run.policy_files() == (run.best_model_file, run.best_normalizer_file)
    assert model_files(tmp_path)[1] == run.best_model_file and run.model_for(None)[0] == run.best_model_file
    assert model_files(run.best_model_file)[0] == run  # best/model.zip given directly: the same run
    assert [step for step, *_ in run.saved_models()] == [900]  # --resume never continues the kept policy
    run.model_file.unlink()  # a run killed before its final save still ships the policy it kept
    assert model_files(tmp_path)[1] == run.best_model_file


@pytest.mark.slow
def test_a_run_keeps_its_best_validated_policy_exports_it_and_the_script_agrees(tmp_path):
    """A smoke run validating after each update keeps a policy in best/ and exports it; scripts/keep_best.py,
    validating the same run's saved models afterwards, gets the run's own final margin exactly."""
    run_dir = tmp_path / "kept"
    proc = run_train(["--config", str(SMOKE), "--run-dir", str(run_dir), "--set", "train.keep_best=true",
                      "--set", "train.validate_every=1", "--set", "train.total_timesteps=64"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = RunDir(run_dir)
    kept = json.loads(run.best_record_file.read_text())
    validation = json.loads(run.validation_file.read_text())
    history = validation["history"]
    assert [h["updates"] for h in history] == [0, 2]  # after the first rollout (before its update), and at the end
    values = [0.0] + [h["margin_vs_base"]["mean"] for h in history]  # the base, then each validated policy
    assert kept["value"] == max(values) and validation["kept"] == kept
    assert kept["updates"] == [0, 0, 2][values.index(max(values))]
    assert proc.stdout.splitlines()[-1].startswith(f"kept (train.keep_best): update {kept['updates']}, ")
    spec = json.loads((run.export_dir / "spec.json").read_text())
    assert spec["source"]["model_file"] == str(run.best_model_file.resolve())
    assert load_ppo(run.model_file).num_timesteps == 64  # model.zip is the last update
    summary = json.loads(run.summary_file.read_text())
    assert summary["kept"] == kept
    script = subprocess.run([sys.executable, str(ROOT / "scripts" / "keep_best.py"), str(run_dir), "--every", "1",
                             "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert script.returncode == 0, script.stderr[-2000:]
    again = json.loads(run.best_record_file.read_text())
    assert [v["updates"] for v in again["validated"]] == [1, 2]  # checkpoint_every 32: each update's, then model.zip
    assert again["validated"][-1]["margin_vs_base"] == history[-1]["margin_vs_base"]  # the final policy, exactly
    assert again["picked_by"] == "scripts/keep_best.py"
    assert json.loads((run.export_dir / "spec.json").read_text())["source"]["model_file"] == \
        str(run.best_model_file.resolve())
    config = run.load_config()
    assert load_learned_policy(str(run_dir), config, [])[0].label == "learned (kept/best)"  # the pick, marked
    cached = len(list(run.cache_dir.iterdir()))
    finer = subprocess.run([sys.executable, str(ROOT / "scripts" / "keep_best.py"), str(run_dir), "--every", "2",
                            "--streams", "2", "--prompts", "1", "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finer.returncode == 0, finer.stderr[-2000:]
    again = json.loads(run.best_record_file.read_text())
    assert again["streams"] == 2 and again["prompts"] == 1 and [v["updates"] for v in again["validated"]] == [2]
    assert len(list(run.cache_dir.iterdir())) > cached  # the new baselines (model.zip alone), computed and cached
    zero = subprocess.run([sys.executable, str(ROOT / "scripts" / "keep_best.py"), str(run_dir), "--every", "0",
                           "--overwrite"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert zero.returncode == 2 and "--every 0: give a number of PPO updates >= 1" in zero.stderr  # not the default
    assert run.best_record_file.exists()  # refused before anything was replaced
