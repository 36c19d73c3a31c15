"""Nothing lost (issue #23): saves as one transaction, one writer per run directory, a resume that may not change
what the saved model is bound to, and a learned policy that is its files, on file systems with or without hard
links. Inputs that used to be silently wrong, and the messages of a run: tests/test_reliability_inputs.py."""

import errno
import json
import os
import socket
import subprocess
import sys
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
                                "env.features.include_diversity=false", "train.normalize_obs=false",
                                "ppo.policy_kwargs.net_arch=[32]", "policy.base=none"])
    assert model_setting_changes(saved, bound) == [
        "model.name: smollm2-135m-instruct -> /models/other.gguf", "env.max_new_tokens: 8 -> 16",
        "env.features.include_diversity: true -> false", "train.normalize_obs: true -> false",
        "ppo.policy_kwargs.net_arch: [64, 64] -> [32]", "policy.base: table -> none"]
    narrowed = load_config(SMOKE, ["policy.actor_features=[position,diversity]"])
    assert model_setting_changes(saved, narrowed) == ["policy.actor_features: null -> [position, diversity]"]
    twins = load_config(SMOKE, ["train.twin_groups=true"])
    assert model_setting_changes(saved, twins) == ["train.twin_groups: false -> true"]


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
    config = load_config(SMOKE, ["evaluation.diversity=[0.5]"])
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
        evaluate(load_config(SMOKE, ["evaluation.diversity=[0.0, 50.0]"]), tmp_path / "out", [f"learned:{run}"])
    assert str(err.value) == (f"learned:{run}: evaluation.diversity entry=50 is outside the range the policy was trained "
                              "on [0, 2]; choose a value in it (or train with env.diversity_range covering 50)")


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
