"""Nothing lost, nothing silently wrong (issue #23): saves as one transaction, a resume that may not change what
the saved model is bound to, one writer per run directory, and inputs that used to be silently wrong."""

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SMOKE

from kelvin.atomic import RunDirError, SaveError
from kelvin.rundir import RunDir, RunDirLocked, Snapshot, load_vecnormalize


# --------------------------------------------------------------------------- saves as one transaction (D1)
def _snapshot(step: int) -> Snapshot:
    """A small PPO model (Pendulum) and its normaliser at ``step``: what Snapshot.take records, without the LM."""
    import gymnasium as gym
    from stable_baselines3 import PPO
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    vec = VecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    model = PPO("MlpPolicy", vec, n_steps=8, batch_size=8, device="cpu")
    model.num_timesteps = step
    return Snapshot.take(model, vec)


def _run_with_a_saved_pair(tmp_path: Path) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config_file.write_text("{}\n")
    _snapshot(32).write(run.model_file, run.normalizer_file)
    return run


def _temps(path: Path) -> list[str]:
    return sorted(p.name for p in path.rglob(".kelvin-tmp-*"))


def test_a_full_disk_while_the_model_is_written_keeps_the_previous_pair(tmp_path, monkeypatch):
    run = _run_with_a_saved_pair(tmp_path)
    newer = _snapshot(64)
    names: dict[int, str] = {}
    real_open, real_fdopen = os.open, os.fdopen

    def track_open(path, *args, **kwargs):
        fd = real_open(path, *args, **kwargs)
        names[fd] = str(path)
        return fd

    class FullDisk:  # half the bytes go in, then ENOSPC
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, data):
            self.fh.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fdopen(fd, *args, **kwargs):
        fh = real_fdopen(fd, *args, **kwargs)
        return FullDisk(fh) if names.get(fd, "").endswith("-model.zip") else fh

    monkeypatch.setattr(os, "open", track_open)
    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(SaveError, match=r"cannot write .*model.zip: the disk is full .*previous model.zip is kept"):
        newer.write(run.model_file, run.normalizer_file)
    monkeypatch.undo()
    # the statistics of step 64 were complete, yet never replaced those of step 32: the pair still loads
    assert load_vecnormalize(run.normalizer_file).kelvin_step == 32
    point = run.resume_point(normalized=True)
    assert (point.step, point.model_file, point.norm_file) == (32, run.model_file, run.normalizer_file)
    assert _temps(run.path) == []


def test_a_rename_that_fails_puts_the_previous_normaliser_back(tmp_path, monkeypatch):
    run = _run_with_a_saved_pair(tmp_path)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == run.model_file:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SaveError, match=r"cannot write .*model.zip: the file system is read-only"):
        _snapshot(64).write(run.model_file, run.normalizer_file)
    monkeypatch.undo()
    assert load_vecnormalize(run.normalizer_file).kelvin_step == 32
    assert run.resume_point(normalized=True).step == 32
    assert _temps(run.path) == []
    _snapshot(64).write(run.model_file, run.normalizer_file)  # the next save goes through
    assert run.resume_point(normalized=True).step == 64 and _temps(run.path) == []


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the files being written through /proc")
def test_a_full_disk_during_the_final_save_of_a_resume_keeps_the_run(smoke_run, tmp_path):
    import shutil

    from conftest import ROOT, run_train
    from test_faults import _FULL_DISK

    full_on_model = _FULL_DISK.replace('(full or "step_64" in name)', 'name.endswith("-model.zip")')  # only model.zip
    assert full_on_model != _FULL_DISK

    run_dir = tmp_path / "resumed"
    shutil.copytree(smoke_run.run_dir, run_dir)
    shutil.rmtree(run_dir / "checkpoints")  # a run without checkpoints: model.zip and its statistics are all it has
    more = ["--set", "train.total_timesteps=128", "--set", "train.checkpoint_every=0", "--set", "train.validate_every=0"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", full_on_model, "--resume", str(run_dir), *more], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    model = run_dir / "model.zip"
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {model}: the disk is full (OSError errno 28); the previous model.zip is kept: free some "
        f"space and try again. Training stopped at step 128; the newest model that loads is {model} (step 96): "
        f"continue from it with --resume {run_dir} once the cause is fixed")
    point = RunDir(run_dir).resume_point(normalized=True)
    assert (point.step, point.model_file) == (96, model) and _temps(run_dir) == []
    proc = run_train(["--resume", str(run_dir), *more])  # what the message says works
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert RunDir(run_dir).resume_point(normalized=True).step == 128

# --------------------------------------------------------------------------- one writer per run directory (D3)
def _new_run_dir(tmp_path: Path, overrides: list[str] | None = None) -> RunDir:
    """A run directory as train.py leaves it once started (config.yaml), before its first save."""
    from kelvin.config_loading import load_config

    run = RunDir(tmp_path / "run")
    run.checkpoint_dir.mkdir(parents=True)
    run.config_file.write_text(load_config(SMOKE, overrides).to_yaml())
    return run


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_stale(tmp_path, capsys):
    from kelvin.training import main

    run = _new_run_dir(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    host = socket.gethostname()
    lock = {"pid": holder.pid, "host": host, "since": "2026-12-03T00:00:00Z"}
    try:
        run.lock_file.write_text(json.dumps(lock))
        refused = (f"error: run directory {run.path} is in use: pid {holder.pid} on host {host} (since "
                   f"2026-12-03T00:00:00Z) holds train.lock; wait for it to end (or stop it), or, if that process "
                   f"is gone, delete {run.lock_file}\n")
        assert main(["--resume", str(run.path)]) == 2
        assert capsys.readouterr().err == refused
        # nor may a new run replace the directory of a run that trains
        assert main(["--config", str(SMOKE), "--run-dir", str(run.path), "--overwrite"]) == 2
        assert capsys.readouterr().err == refused
        assert json.loads(run.lock_file.read_text()) == lock and run.config_file.is_file()
        # readers take no lock
        assert RunDir(run.path).load_config().train.total_timesteps == 96
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(RuntimeWarning, match=f"taking over the stale lock of pid {holder.pid} on host"):
        with run.lock():
            assert run.lock_holder()["pid"] == os.getpid()
            with pytest.raises(RunDirError, match=f"is in use: pid {os.getpid()} on host"):
                with RunDir(run.path).lock():
                    pass
    assert not run.lock_file.exists()  # released at the end



@pytest.mark.slow
def test_a_second_train_py_in_a_running_run_is_refused(tmp_path):
    import signal

    from conftest import run_train
    from test_faults import _popen_train, _wait_for_first_checkpoint

    run_dir = tmp_path / "busy"
    first = _popen_train(["--config", str(SMOKE), "--run-dir", str(run_dir), "--set", "train.total_timesteps=100000",
                          "--set", "train.validate_every=0"])
    try:
        _wait_for_first_checkpoint(run_dir, first)
        second = run_train(["--resume", str(run_dir)])
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr.startswith(f"error: run directory {run_dir} is in use: pid {first.pid} on host "
                                        f"{socket.gethostname()} (since "), second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=600)
    assert first.returncode == 143 and not (run_dir / "train.lock").exists()

# --------------------------------------------------------------------------- a resume may not change the model's settings (D2)
def test_resume_refuses_changing_what_the_model_is_bound_to_before_touching_config_yaml(tmp_path, capsys):
    from kelvin.training import main

    run = _new_run_dir(tmp_path)
    before = run.config_file.read_bytes()
    code = main(["--resume", str(run.path), "--set", "env.include_category=false", "--set", "env.action.t_max=2.0",
                 "--set", "policy.base=fixed"])
    assert code == 2
    assert capsys.readouterr().err == (
        f"error: --resume {run.path}: the saved model is bound to settings this config changes "
        "(env.include_category: true -> false; env.action.t_max: 2.4 -> 2.0; policy.base: table -> fixed); drop "
        "those --set overrides (nothing was changed), or train a new run with them\n")
    assert run.config_file.read_bytes() == before
    assert sorted(p.name for p in run.path.iterdir()) == ["checkpoints", "config.yaml"]  # no lock left behind


def test_model_setting_changes_lists_only_what_binds_the_model():
    from kelvin.config import model_setting_changes
    from kelvin.config_loading import load_config

    saved = load_config(SMOKE)
    free = load_config(SMOKE, ["train.total_timesteps=4096", "ppo.learning_rate=1e-4", "env.batch_size=8",
                               "reward.coherence=1.0"])
    assert model_setting_changes(saved, free) == []
    bound = load_config(SMOKE, ["model.name=/models/other.gguf", "env.max_new_tokens=16",
                                "env.features.include_diversity_weight=false", "train.normalize_obs=false",
                                "ppo.policy_kwargs.net_arch=[32]", "policy.base=none"])
    assert model_setting_changes(saved, bound) == [
        "model.name: smollm2-135m-instruct -> /models/other.gguf", "env.max_new_tokens: 8 -> 16",
        "env.features.include_diversity_weight: true -> false", "train.normalize_obs: true -> false",
        "ppo.policy_kwargs.net_arch: [64, 64] -> [32]", "policy.base: table -> none"]


# --------------------------------------------------------------------------- evaluation checks only what it uses (B1)
def test_evaluation_config_may_shrink_the_batch_below_the_ppo_minibatch(tmp_path):
    from dataclasses import replace

    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config

    config = load_config(SMOKE, ["env.batch_size=2"], training=False)  # PPO's minibatch (32) > 8 x 2: not its concern
    rebuilt = replace(config, env=replace(config.env, batch_size=2, group_size=2))  # what evaluate() builds
    assert rebuilt.env.batch_size == 2
    with pytest.raises(ConfigError, match=r"smoke.yaml: ppo.batch_size=32 exceeds the rollout size .* = 16"):
        load_config(SMOKE, ["env.batch_size=2"])  # for training it is
    with pytest.raises(ConfigError, match=r"^ppo.batch_size=32 exceeds the rollout size"):
        rebuilt.check_training()


def test_a_settings_error_raised_inside_the_code_is_one_line(capsys):
    from kelvin.cli import run_cli
    from policies.actions import ActionMapping

    def body():
        ActionMapping(t_min=3.0, t_max=1.0)

    assert run_cli(body) == 2
    assert capsys.readouterr().err == "error: ActionMapping: t_min=3.0 must be below t_max=1.0; set a non-empty " \
                                      "temperature range\n"


@pytest.mark.slow
def test_evaluate_with_one_prompt_runs(tmp_path, capsys):
    from kelvin.evaluation import main

    out = tmp_path / "out"
    code = main(["--config", str(SMOKE), "--policies", "fixed:0.7", "--no-families", "--set", "evaluation.max_prompts=1",
                 "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 0 and "validation error" not in err, err
    assert json.loads((out / "metrics.json").read_text())["setup"]["n_prompts"] == 1


# --------------------------------------------------------------------------- a learned policy is its files (C)
def _learned_run(tmp_path: Path) -> Path:
    """A run directory (test_evaluate's untrained policy) with a checkpoint whose actor differs from model.zip."""
    import shutil

    import torch
    from stable_baselines3 import PPO
    from test_evaluate import _make_run

    run = _make_run(tmp_path / "run")
    (run / "checkpoints").mkdir()
    model = PPO.load(run / "model.zip", device="cpu")
    with torch.no_grad():
        model.policy.action_net.bias.fill_(0.5)
    model.save(run / "checkpoints" / "step_32.zip")
    shutil.copy(run / "vecnormalize.pkl", run / "checkpoints" / "step_32_vecnormalize.pkl")
    return run


def test_two_models_of_one_run_are_two_runs_of_the_evaluation(tmp_path):
    import shutil

    from kelvin.config_loading import load_config
    from kelvin.evaluation.policies import resolve_policies

    run = _learned_run(tmp_path)
    config = load_config(SMOKE, ["evaluation.lambdas=[0.5]"])
    final, checkpoint = resolve_policies([f"learned:{run}", f"learned:{run}/checkpoints/step_32.zip"], config, None, [])
    assert final.cache_key != checkpoint.cache_key  # each row shows its own model's numbers
    shutil.copy(run / "checkpoints" / "step_32.zip", run / "model.zip")  # the same files: the same run (and cache)
    again, _ = resolve_policies([f"learned:{run}", f"learned:{run}/checkpoints/step_32.zip"], config, None, [])
    assert again.cache_key == checkpoint.cache_key


def test_evaluation_and_export_refuse_statistics_of_another_save(tmp_path):
    from kelvin.config_loading import load_config
    from kelvin.evaluation import EvaluationError, evaluate
    from kelvin.export import export_run
    from kelvin.atomic import RunDirError

    run = _learned_run(tmp_path)
    (run / "vecnormalize.pkl").write_bytes(_snapshot(64).normalizer)  # a later save's statistics, beside step 0
    with pytest.raises(EvaluationError, match="holds the statistics of step 64, its model is at step 0"):
        evaluate(load_config(SMOKE), tmp_path / "out", [f"learned:{run}"])
    with pytest.raises(RunDirError, match="holds the statistics of step 64, its model is at step 0"):
        export_run(run, tmp_path / "export")
    (run / "checkpoints" / "step_32_vecnormalize.pkl").unlink()  # a normalising run without its statistics
    with pytest.raises(EvaluationError, match=r"normalised its observations \(train.normalize_obs\) but no statistics"):
        evaluate(load_config(SMOKE), tmp_path / "out", [f"learned:{run}/checkpoints/step_32.zip"])
    assert not (tmp_path / "out").exists() and not (tmp_path / "export").exists()


def test_evaluation_refuses_a_lambda_outside_the_trained_range(tmp_path):
    from kelvin.config_loading import load_config
    from kelvin.evaluation import EvaluationError, evaluate

    run = _learned_run(tmp_path)
    with pytest.raises(EvaluationError) as err:
        evaluate(load_config(SMOKE, ["evaluation.lambdas=[0.0, 50.0]"]), tmp_path / "out", [f"learned:{run}"])
    assert str(err.value) == (f"learned:{run}: evaluation.lambdas entry=50 is outside the range the policy was trained "
                              "on [0, 2]; choose a value in it (or train with env.diversity_range covering 50)")


# --------------------------------------------------------------------------- labels that tell the truth (C)
def test_a_fixed_temperature_outside_its_mapping_is_refused(tmp_path):
    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config
    from kelvin.evaluation import EvaluationError, evaluate
    from policies.actions import ActionMapping
    from policies.registry import make_policy

    spec = load_config(SMOKE).env.feature_spec()
    for t, ran in (("-2.0", "-1"), ("9", "2.4"), ("inf", "2.4")):
        with pytest.raises(ValueError) as err:
            make_policy(f"fixed:{t}", spec, ActionMapping())
        assert str(err.value) == (f"FixedTemperature t={float(t):g} is outside its action mapping's range [-1, 2.4] "
                                  f"(it would run at {ran}); choose a T in the range, or widen it (env.action.t_min / "
                                  "env.action.t_max)")
    assert make_policy("fixed:2.4", spec, ActionMapping()).t == 2.4 and make_policy("fixed:-1", spec, None).t == -1
    with pytest.raises(EvaluationError, match=r"--policies item 'fixed:9': FixedTemperature t=9 is outside"):
        evaluate(load_config(SMOKE), tmp_path / "out", ["fixed:9"])
    with pytest.raises(ConfigError, match=r"train.validation_temperatures=\[0.7, 3.0\]: 3 outside env.action's range "):
        load_config(SMOKE, ["train.validation_temperatures=[0.7, 3.0]"])


def test_a_near_miss_of_a_category_is_refused(tmp_path):
    from envs.prompts import load_prompts

    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"text": "Capital of France?", "category": "factual_questoin"}) + "\n")
    with pytest.raises(ValueError) as err:
        load_prompts(path)
    assert str(err.value) == (f"{path}:1: category 'factual_questoin' is not one of the built-in categories (did you "
                              "mean 'factual_question'?); fix the spelling (a name outside creative_writing, "
                              "explanation, code, brainstorming, factual_question, summarisation, math conditions the "
                              "policy as 'other').")
    for near in ("summarization", "Math"):
        path.write_text(json.dumps({"text": "x", "category": near}) + "\n")
        with pytest.raises(ValueError, match=f"category '{near}' is not one of the built-in"):
            load_prompts(path)
    path.write_text(json.dumps({"text": "x", "category": "planning"}) + "\n")  # a name of one's own: "other"
    assert load_prompts(path)[0].category == "planning"


def test_unknown_reset_options_are_refused():
    from stub_lm import NO_EMBEDDER, STUB_PROMPTS, SYMMETRIC, StubLM

    from envs.generation import TemperatureEnv

    env = TemperatureEnv(lm=StubLM(), max_new_tokens=3, reward=NO_EMBEDDER, action=SYMMETRIC, prompts=STUB_PROMPTS,
                         token_prior=False)
    with pytest.raises(ValueError) as err:
        env.reset(options={"promt": "Name a colour."})
    assert str(err.value) == ("reset(options=...): unknown option 'promt'; did you mean 'prompt'? (valid: prompt, "
                              "category, diversity)")
    _, info = env.reset(options={"prompt": "Name a colour.", "category": "explanation"})
    assert (info["prompt"], info["category"]) == ("Name a colour.", "explanation")


def test_a_key_given_twice_in_a_config_is_refused(tmp_path):
    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config

    path = tmp_path / "twice.yaml"
    path.write_text("env:\n  batch_size: 4\n  group_size: 2\n  batch_size: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value) == (f"{path}: key 'batch_size' is given twice, at line 2 and line 4; keep one (YAML would "
                              "silently use the last)")
    path.write_text("env:\n  batch_size: 4\nppo:\n  n_steps: 8\nenv:\n  group_size: 2\n")
    with pytest.raises(ConfigError, match="key 'env' is given twice, at line 1 and line 5"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set 'env.action=\{t_min: -1.0, t_min: 0.0\}': key 't_min' is given "
                                          "twice, at line 1 and line 1"):
        load_config(None, ["env.action={t_min: -1.0, t_min: 0.0}"])
    from kelvin.config_loading import _yaml_load

    merged = _yaml_load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")  # a merge key, then an override: still YAML's
    assert merged == {"a": {"x": 1, "y": 2}, "b": {"x": 3, "y": 2}}


def test_booleans_and_complex_numbers_are_not_numbers_to_the_samplers():
    import torch

    from samplers.core import apply_temperature, sample
    from samplers.runtime import check_diversity

    logits = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    with pytest.raises(TypeError, match=r"^temperature must hold real numbers; got a tensor of dtype torch.bool"):
        sample(logits, torch.tensor([True, False]))
    with pytest.raises(ValueError, match="temperature must be a real number"):
        sample(logits, True)
    with pytest.raises(TypeError, match=r"^logits must hold real numbers; got a tensor of dtype torch.bool"):
        sample(logits > 2, 1.0)
    with pytest.raises(TypeError, match=r"^logits must hold real numbers; got a tensor of dtype torch.complex64: pass "
                                        "the model's real-valued scores, e.g. logits.float\\(\\)"):
        apply_temperature(logits.to(torch.complex64), 1.0)
    with pytest.raises(ValueError, match=r"^diversity=True must be a finite number >= 0"):
        check_diversity(True, None, (0.0, 2.0))
    assert check_diversity(1, None, (0.0, 2.0)) == 1.0


# --------------------------------------------------------------------------- what a run says it did (C)
def _summary(**fields) -> dict:
    base = {"run_dir": "runs/x", "timesteps": 0, "resumed_finished": False, "completed": False, "saved": False,
            "updates": 0, "interrupted": True, "signal": "SIGTERM", "discarded_steps": 0, "wall_s": 1.0,
            "validation": None, "export": None, "exit_code": 143}
    return {**base, **fields}


def test_the_report_of_a_run_says_what_was_saved(capsys):
    from kelvin.config_loading import load_config
    from kelvin.training import _report

    config = load_config(SMOKE)
    assert _report(_summary(), config) == 143
    assert capsys.readouterr().out == ("interrupted (nothing saved): SIGTERM before the first PPO update of this "
                                       "session completed; continue with --resume runs/x\n")
    assert _report(_summary(timesteps=64, saved=True, updates=2, discarded_steps=5), config) == 143
    assert capsys.readouterr().out.startswith("interrupted (model saved): SIGTERM at step 69; saved the model of "
                                              "step 64 (2 PPO updates)")
    finished = _summary(timesteps=96, resumed_finished=True, completed=True, interrupted=False)
    for summary in (finished, {k: v for k, v in finished.items() if k != "resumed_finished"} | {"finished": True}):
        assert _report(summary, config) == 0  # "finished": the field's name in earlier releases
        assert capsys.readouterr().out.startswith("runs/x is finished: 96 steps")


@pytest.mark.slow
def test_sigterm_while_starting_saves_nothing_and_says_so(tmp_path):
    import signal

    from conftest import ROOT

    run_dir = tmp_path / "early"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--config", str(SMOKE), "--run-dir", str(run_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (run_dir / "train.lock").exists() and proc.poll() is None:  # the lock: the signal handlers are in place
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    assert out == (f"interrupted (nothing saved): SIGTERM before the first PPO update of this session completed; "
                   f"continue with --resume {run_dir}\n")
    assert not (run_dir / "model.zip").exists() and not (run_dir / "train.lock").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["saved"], summary["completed"], summary["resumed_finished"]) == (False, False, False)
    assert "finished" not in summary


@pytest.mark.slow
def test_a_completed_run_says_so_in_its_summary(smoke_run):
    summary = json.loads((smoke_run.run_dir / "summary.json").read_text())
    assert (summary["completed"], summary["saved"], summary["resumed_finished"]) == (True, True, False)


# --------------------------------------------------------------------------- errors that read (B)
def test_a_device_torch_does_not_know_is_refused_at_load(tmp_path, capsys):
    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config
    from kelvin.training import main

    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, ["train.policy_device=banana"])
    assert str(err.value) == (f"{SMOKE}: train: policy_device='banana' is not a device torch knows; use auto, cpu, "
                              "cuda, cuda:N or mps")
    with pytest.raises(ConfigError, match="model: device='cuda:x' is not a device torch knows"):
        load_config(SMOKE, ["model.device=cuda:x"])
    assert load_config(SMOKE, ["train.policy_device=cuda:1", "model.device=auto"]).train.policy_device == "cuda:1"
    assert main(["--config", str(SMOKE), "--run-dir", str(tmp_path / "run"), "--set", "train.policy_device=banana"]) == 2
    assert "policy_device='banana'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # the corrected rerun is not refused


def test_ctrl_c_while_the_entry_point_imports_is_one_line(tmp_path, monkeypatch, capsys):
    from kelvin.cli import run_main

    (tmp_path / "slow_to_import.py").write_text("raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert run_main("slow_to_import") == 130
    assert capsys.readouterr().err == "interrupted (SIGINT)\n"


def test_a_seed_out_of_range_names_the_flag(capsys):
    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config
    from kelvin.evaluation import main

    with pytest.raises(SystemExit) as exit_:
        main(["--seed", str(10**23), "--policies", "pid"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --seed: '100000000000000000000000' is not a seed: give an integer in [0, 4294967295]")
    with pytest.raises(ConfigError, match=r"train.seed=100000000000000000000000: must be an integer in \[0, 4294967295\]"):
        load_config(SMOKE, [f"train.seed={10**23}"])


def test_the_event_writer_thread_traceback_is_not_printed(monkeypatch):
    import threading

    from kelvin.training import _event_writer_errors_in_main_thread

    printed = []
    monkeypatch.setattr(threading, "excepthook", lambda args: printed.append(str(args.exc_value)))

    class _AsyncWriterThread(threading.Thread):  # TensorBoard's writer thread, by name
        def run(self):
            raise OSError(30, "Read-only file system")  # raised again in the training thread at its next write

    class Other(threading.Thread):
        def run(self):
            raise RuntimeError("any other thread's error")

    with _event_writer_errors_in_main_thread():
        for thread in (_AsyncWriterThread(), Other()):
            thread.start()
            thread.join()
    assert printed == ["any other thread's error"]


@pytest.fixture
def read_only_able(tmp_path):
    """A tmpfs that the test may remount read-only (root in a container that allows mounts), else skip."""
    mount = tmp_path / "fs"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "none", str(mount)], capture_output=True).returncode:
        pytest.skip("needs root and mount to turn a file system read-only")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_file_system_turning_read_only_is_one_true_line(read_only_able):
    from test_faults import _popen_train, _wait_for_first_checkpoint

    run_dir = read_only_able / "run"
    proc = _popen_train(["--config", str(SMOKE), "--run-dir", str(run_dir), "--set", "train.total_timesteps=100000",
                         "--set", "train.validate_every=0"])
    _wait_for_first_checkpoint(run_dir, proc)
    subprocess.run(["mount", "-o", "remount,ro", str(read_only_able)], check=True)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1
    progress = ("Loading weights", "tuned base (", "validation baselines (")  # start-up lines, before the failure
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(progress)]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith(f"error: cannot write {run_dir}/") and "the file system is read-only" in lines[0]
    point = RunDir(run_dir).resume_point(normalized=True)
    assert point is not None and f"the newest model that loads is {point.model_file} (step {point.step})" in lines[0]


# --------------------------------------------------------------------------- file systems without hard links
def test_saves_and_the_lock_work_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(os, "link", no_links)
    run = _run_with_a_saved_pair(tmp_path)  # the first save had nothing to keep
    _snapshot(64).write(run.model_file, run.normalizer_file)
    assert run.resume_point(normalized=True).step == 64 and _temps(run.path) == []
    with run.lock():
        assert run.lock_holder()["pid"] == os.getpid()
        with pytest.raises(RunDirLocked, match=f"is in use: pid {os.getpid()} on host"):
            with RunDir(run.path).lock():
                pass
    assert not run.lock_file.exists() and _temps(run.path) == []


def test_a_lock_that_cannot_be_read_is_refused_not_taken(tmp_path):
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.lock_file.write_text("")  # e.g. caught between its creation and its first write
    with pytest.raises(RunDirLocked) as err:
        with run.lock():
            pass
    assert str(err.value) == (f"run directory {run.path} is in use: a process (the lock cannot be read) holds "
                              f"train.lock; wait for it to end (or stop it), or, if that process is gone, delete "
                              f"{run.lock_file}")
    assert run.lock_file.read_text() == ""
