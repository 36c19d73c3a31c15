"""Exported policies: artifact round trip, loading without SB3, bad artifacts, and the export of a trained run.

The exported policy inside the samplers (processors, guard rails, parity with the env) is tested in
tests/test_export_samplers.py; the toy spec and PPO both files use are in tests/export_helpers.py.
"""

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export_helpers import MAPPING, SPEC, V, dummy_ppo, read_spec, rewrite_spec, sb3_actions
from kelvin.export import export_baseline, export_learned
from policies import FeatureSpec, load_artifact, load_policy
from policies.artifact import ARTIFACT_FORMAT_VERSION, ArtifactError, ExportedPolicy
from policies.features import Featurizer
from policies.registry import BASELINE_NAMES, make_policy
from samplers.hf import PolicyLogitsProcessor

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _random_obs(spec: FeatureSpec, n: int, seed: int = 0) -> np.ndarray:
    """Raw observations from the real featurizer on random logits (realistic ranges), plus noise."""
    g = torch.Generator().manual_seed(seed)
    f = Featurizer(spec, n)
    obs = f.observe(torch.randn(n, V, generator=g) * 3)
    for _ in range(3):
        f.update(torch.randint(0, V, (n,), generator=g), torch.rand(n, generator=g) * 2)
        obs = f.observe(torch.randn(n, V, generator=g) * 3)
    return obs.numpy()


# =========================================================================== artifact round trip
def test_learned_export_files_and_spec(dummy_export):
    out, _, norm = dummy_export
    assert sorted(p.name for p in out.iterdir()) == ["policy.pt", "spec.json", "token_prior.pt"]
    spec = json.loads((out / "spec.json").read_text())
    assert spec["format_version"] == 1 and spec["kind"] == "learned" and spec["baseline"] is None
    assert spec["feature_spec"] == SPEC.to_dict()
    assert spec["action_mapping"] == MAPPING.to_dict()
    assert spec["truncation"] == {"top_k": 5, "top_p": 1.0, "min_p": 0.0, "top_n_sigma": None}
    assert spec["model"]["name"] == "toy" and spec["model"]["vocab_size"] == V
    assert spec["obs_normalization"]["clip"] == 5.0 and spec["obs_normalization"]["epsilon"] == 1e-8
    np.testing.assert_allclose(spec["obs_normalization"]["mean"], norm["mean"])
    assert spec["files"] == {"policy": "policy.pt", "token_prior": "token_prior.pt"}
    assert spec["created"].endswith("+00:00")


def test_learned_export_matches_sb3_in_process(dummy_export):
    out, model, norm = dummy_export
    loaded = load_policy(out)
    assert isinstance(loaded, ExportedPolicy)
    obs = _random_obs(SPEC, 64)
    obs[:8] *= 50  # some observations beyond the normalisation clip
    a_ref = sb3_actions(model, obs, norm)
    a_exp, state = loaded.predict(obs, state="kept", episode_start=np.ones(64, bool))
    assert a_exp.shape == (64, 1) and a_exp.dtype == np.float32 and state == "kept"
    np.testing.assert_allclose(a_exp, a_ref, atol=1e-6, rtol=0)
    assert np.abs(a_exp).max() <= 1.0
    single, _ = loaded.predict(obs[0])
    assert single.shape == (1,)
    obs_t = torch.as_tensor(obs)  # temperatures: the mapping with its rate limit against the observed history
    expected = MAPPING.to_temperature(torch.as_tensor(a_ref).reshape(-1), previous=obs_t[:, SPEC.index("prev_temperature")],
                                      first_step=obs_t[:, SPEC.index("position")] == 0)
    torch.testing.assert_close(loaded.temperatures(obs_t), expected, atol=1e-5, rtol=0)
    art = load_artifact(out)
    assert art.truncation.top_k == 5 and art.token_prior.shape == (V,) and art.vocab_size == V


def test_a_gsde_policy_exports_its_mean_action(tmp_path):
    """gSDE only changes how PPO explores; deterministic actions are the same mean network, which the export
    carries (a policy trained with ppo.use_sde ships like any other)."""
    model = dummy_ppo(SPEC, use_sde=True, sde_sample_freq=4)
    with torch.no_grad():  # an untrained action_net starts near 0: give it weight so the comparison means something
        model.policy.action_net.weight.mul_(100.0)
    out = export_learned(model.policy, tmp_path / "sde", SPEC, MAPPING)
    obs = _random_obs(SPEC, 16)
    a_ref = sb3_actions(model, obs, None)
    assert np.abs(a_ref).max() > 0.1
    a_exp, _ = load_policy(out).predict(obs)
    np.testing.assert_allclose(a_exp, a_ref, atol=1e-6, rtol=0)


DIAL = FeatureSpec(horizon=8, categories=("code", "creative"), include_diversity=True)


def test_the_trained_lambda_range_is_in_the_artifact_and_a_lambda_outside_it_is_refused(tmp_path):
    model = dummy_ppo(DIAL)
    with pytest.raises(ValueError, match=r"reads the diversity dial.*give diversity_range=\(low, high\)"):
        export_learned(model.policy, tmp_path / "none", DIAL, MAPPING)
    out = export_learned(model.policy, tmp_path / "dial", DIAL, MAPPING, diversity_range=(0.0, 2.0))
    assert json.loads((out / "spec.json").read_text())["diversity"] == {"range": [0.0, 2.0]}
    assert load_artifact(out).diversity_range == (0.0, 2.0)
    proc = PolicyLogitsProcessor.from_pretrained(out, diversity=1.5)
    proc.runtime.start(3)
    col = DIAL.index("diversity")
    obs = proc.runtime.featurizer.observe(torch.randn(3, V))
    assert obs[:, col].tolist() == [1.5] * 3  # λ is what the policy observes
    proc.runtime.reset_rows([1], diversity=0.25)
    assert proc.runtime.featurizer.observe(torch.randn(3, V))[:, col].tolist() == [1.5, 0.25, 1.5]
    with pytest.raises(ValueError, match=r"diversity=3 is outside the range the policy was trained on \[0, 2\]"):
        PolicyLogitsProcessor.from_pretrained(out, diversity=3.0)
    with pytest.raises(ValueError, match=r"diversity=-0.5 must be a finite number >= 0"):
        proc.runtime.start(2, diversity=-0.5)
    with pytest.raises(ValueError, match=r"diversity=nan must be a finite number"):
        proc.runtime.reset_rows([0], diversity=float("nan"))
    no_dial = export_learned(dummy_ppo(SPEC).policy, tmp_path / "plain", SPEC, MAPPING)
    assert json.loads((no_dial / "spec.json").read_text())["diversity"] is None
    with pytest.raises(ValueError, match="this policy has no diversity dial"):
        PolicyLogitsProcessor.from_pretrained(no_dial, diversity=0.5)
    spec = json.loads((out / "spec.json").read_text())
    spec["diversity"] = {"range": [2.0, 1.0]}
    (out / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match=r"spec.json: diversity.range=\[2.0, 1.0\] must be finite"):
        load_artifact(out)


def test_building_the_learned_policy_draws_no_random_numbers(dummy_export):
    """Training validates through learned_policy(): a draw from the global torch generator there (a fresh Linear's
    random init) would change PPO's later exploration noise, so a run that validates would train another model."""
    from kelvin.export import learned_policy

    _, model, _ = dummy_export
    before = torch.get_rng_state()
    policy = learned_policy(model, None, SPEC, MAPPING)
    assert torch.equal(torch.get_rng_state(), before)
    obs = _random_obs(SPEC, 8)
    np.testing.assert_array_equal(policy.predict(obs)[0], sb3_actions(model, obs, None))


ROUND_TRIP_SCRIPT = r"""
import json, sys
import numpy as np
import policies
policy = policies.load_policy(sys.argv[1])
obs = np.load(sys.argv[2])
actions, _ = policy.predict(obs, episode_start=np.ones(len(obs), bool))
temps = policy.temperatures(obs)
np.save(sys.argv[3], actions)
print(json.dumps({"sb3": "stable_baselines3" in sys.modules, "type": type(policy).__name__,
                  "temps_finite": bool(np.isfinite(temps.numpy()).all())}))
"""


def _load_in_fresh_process(export_dir: Path, obs: np.ndarray, tmp_path: Path) -> tuple[np.ndarray, dict]:
    np.save(tmp_path / "obs.npy", obs)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP_SCRIPT, str(export_dir), str(tmp_path / "obs.npy"),
                           str(tmp_path / "actions.npy")], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.load(tmp_path / "actions.npy"), json.loads(proc.stdout.strip().splitlines()[-1])


def test_round_trip_in_fresh_process_without_sb3(dummy_export, tmp_path):
    out, model, norm = dummy_export
    obs = _random_obs(SPEC, 32, seed=3)
    actions, info = _load_in_fresh_process(out, obs, tmp_path)
    assert info == {"sb3": False, "type": "ExportedPolicy", "temps_finite": True}
    np.testing.assert_allclose(actions, sb3_actions(model, obs, norm), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_every_baseline_round_trips_to_its_class(name, tmp_path):
    policy = make_policy(name, SPEC, MAPPING)
    out = export_baseline(policy, tmp_path / name, {"min_p": 0.05}, {"name": "toy", "vocab_size": V})
    spec = json.loads((out / "spec.json").read_text())
    assert spec["kind"] == "baseline" and spec["baseline"] == policy.to_config()
    assert spec["files"] == {"policy": None, "token_prior": None} and not (out / "policy.pt").exists()
    loaded = load_policy(out)
    assert type(loaded) is type(policy) and loaded.params == policy.params and loaded.name == policy.name
    assert loaded.feature_spec == SPEC and loaded.action_mapping == MAPPING
    policy.reset(4)
    loaded.reset(4)
    for step in range(3):  # stateful baselines keep per-row state: same sequence of actions
        obs = _random_obs(SPEC, 4, seed=step)
        starts = np.array([step == 0, False, step == 1, False]) if step else np.ones(4, bool)
        a1, _ = policy.predict(obs, episode_start=starts)
        a2, _ = loaded.predict(obs, episode_start=starts)
        np.testing.assert_array_equal(a1, a2)


def test_baseline_params_survive_json(tmp_path):
    policy = make_policy("edt:theta=1.0,t0=0.8", SPEC, MAPPING)
    loaded = load_policy(export_baseline(policy, tmp_path / "edt"))
    assert loaded.params["theta"] == 1.0 and loaded.params["t0"] == 0.8 and loaded.label == policy.label


# =========================================================================== bad artifacts
def test_newer_format_version_says_upgrade(baseline_dir):
    rewrite_spec(baseline_dir, format_version=ARTIFACT_FORMAT_VERSION + 1)
    with pytest.raises(ArtifactError, match="newer Kelvin; upgrade Kelvin"):
        load_policy(baseline_dir)


def test_missing_files_are_named(baseline_dir, dummy_export, tmp_path):
    with pytest.raises(FileNotFoundError, match="no export directory"):
        load_policy(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"spec\.json is missing"):
        load_policy(empty)
    import shutil

    learned = tmp_path / "learned"
    shutil.copytree(dummy_export[0], learned)
    (learned / "policy.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"policy\.pt is missing"):
        load_policy(learned)
    shutil.copytree(dummy_export[0], tmp_path / "learned2")
    (tmp_path / "learned2" / "token_prior.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"token_prior\.pt is missing"):
        load_artifact(tmp_path / "learned2")


def test_feature_spec_version_mismatch(baseline_dir):
    spec = read_spec(baseline_dir)
    spec["feature_spec"]["version"] = 99
    (baseline_dir / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match="feature spec version 99.*Retrain the policy"):
        load_policy(baseline_dir)


def test_corrupted_json_and_network(baseline_dir, dummy_export, tmp_path):
    text = (baseline_dir / "spec.json").read_text()
    (baseline_dir / "spec.json").write_text(text[: len(text) // 2])
    with pytest.raises(ArtifactError, match=r"not valid JSON \(line \d+, column \d+"):
        load_policy(baseline_dir)
    import shutil

    learned = tmp_path / "learned"
    shutil.copytree(dummy_export[0], learned)
    (learned / "policy.pt").write_bytes(b"not a torchscript archive")
    with pytest.raises(ArtifactError, match=r"policy\.pt cannot be loaded.*corrupted"):
        load_policy(learned)


def test_inconsistent_specs_are_rejected(baseline_dir):
    rewrite_spec(baseline_dir, kind="oracle")
    with pytest.raises(ArtifactError, match="kind='oracle' is unknown"):
        load_policy(baseline_dir)
    rewrite_spec(baseline_dir, kind="baseline", truncation={"top_k": -3})
    with pytest.raises(ArtifactError, match="invalid truncation.*top_k"):
        load_policy(baseline_dir)
    rewrite_spec(baseline_dir, truncation=None, baseline={"name": "pdi", "params": {}})
    with pytest.raises(ArtifactError, match="did you mean 'pid'"):
        load_policy(baseline_dir)
    spec = read_spec(baseline_dir)
    del spec["action_mapping"]
    (baseline_dir / "spec.json").write_text(json.dumps(spec))
    with pytest.raises(ArtifactError, match=r"lacks the keys \['action_mapping'\]"):
        load_policy(baseline_dir)


def test_export_rejects_a_mismatched_policy(tmp_path):
    model = dummy_ppo(FeatureSpec(horizon=8))  # 15 features, SPEC has 18
    with pytest.raises(ArtifactError, match="observes shape"):
        export_learned(model.policy, tmp_path / "x", SPEC, MAPPING)
    with pytest.raises(TypeError, match="baseline TemperaturePolicy"):
        export_baseline(object(), tmp_path / "y")


def test_cli_errors_are_clear(tmp_path, capsys):
    from kelvin.export import main

    assert main([str(tmp_path / "no_run/"), str(tmp_path / "o")]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert main(["pdi", str(tmp_path / "o"), "--config", str(SMOKE)]) == 2
    assert "unknown policy 'pdi'; did you mean 'pid'" in capsys.readouterr().err
    assert main(["pid", str(tmp_path / "o"), "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml is missing" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    assert main([str(run), str(tmp_path / "o")]) == 2
    assert "config.yaml is missing" in capsys.readouterr().err


# =========================================================================== the real model
@pytest.mark.slow
def test_training_writes_the_export(smoke_run):
    smoke_run = smoke_run.run_dir
    export = smoke_run / "export"
    spec = json.loads((export / "spec.json").read_text())
    summary = json.loads((smoke_run / "summary.json").read_text())
    assert summary["export"] == str(export)
    assert spec["kind"] == "learned" and spec["model"]["name"] == "smollm2-135m-instruct"
    assert spec["model"]["vocab_size"] == 49152 and spec["files"]["token_prior"] == "token_prior.pt"
    assert spec["feature_spec"]["horizon"] == 8 and spec["obs_normalization"] is not None
    assert spec["source"]["run_dir"] == str(smoke_run.resolve())


@pytest.mark.slow
def test_re_export_of_a_run_and_a_checkpoint(smoke_run, lm, tmp_path):
    smoke_run = smoke_run.run_dir
    from kelvin.export import export_run

    again = export_run(smoke_run, tmp_path / "again", lm=lm)
    first, second = load_artifact(smoke_run / "export"), load_artifact(again)
    assert second.spec["source"]["token_prior"].startswith("training env")  # train()'s prior, reused
    assert torch.equal(first.token_prior, second.token_prior)
    obs = torch.as_tensor(_random_obs(first.feature_spec, 16, seed=9))
    assert torch.equal(first.policy.actions(obs), second.policy.actions(obs))
    with pytest.raises(FileNotFoundError, match=r"step_7\.zip is missing"):
        export_run(smoke_run, tmp_path / "ckpt", lm=lm, checkpoint="step_7")


@pytest.mark.slow
def test_trained_policy_round_trips_without_sb3(smoke_run, tmp_path):
    smoke_run = smoke_run.run_dir
    from stable_baselines3 import PPO

    from kelvin.rundir import normalization_stats

    export = smoke_run / "export"
    art = load_artifact(export)
    with open(smoke_run / "vecnormalize.pkl", "rb") as fh:
        norm = normalization_stats(pickle.load(fh))
    obs = _random_obs(art.feature_spec, 32, seed=5)
    actions, info = _load_in_fresh_process(export, obs, tmp_path)
    assert info["sb3"] is False and info["type"] == "ExportedPolicy"
    from kelvin.rundir import RunDir

    base = RunDir(smoke_run).load_base().module(art.feature_spec, art.action_mapping)
    reference = sb3_actions(PPO.load(smoke_run / "model.zip", device="cpu"), obs, norm, base)
    np.testing.assert_allclose(actions, reference, atol=1e-6, rtol=0)
