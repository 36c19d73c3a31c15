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

from kelvin.rundir import RunDir, RunDirError, SaveError, Snapshot, load_vecnormalize


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
