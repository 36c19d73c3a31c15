"""Faults a run must survive (issue #15): SIGTERM, SIGKILL, a full disk, damaged files, a run directory
that is not the run's, and bad inputs that used to end in a raw traceback.

Each fault test asserts what is kept and that nothing is lost beyond the last completed PPO update: the
model a stopped run leaves equals, parameter for parameter, the checkpoint of the same step of the
session's uninterrupted smoke run (same config and seed; determinism holds bit for bit), and a resumed
run ends with one PPO update per rollout, as an uninterrupted one. Training subprocesses use
``configs/smoke.yaml`` (32 env steps per rollout, ``n_epochs=2``: a model at step S has ``2 * S / 32``
optimiser passes in ``_n_updates``).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SMOKE, run_train, wait_until

from kelvin.atomic import RunDirError, SaveError, write_atomic
from kelvin.rundir import RunDir

STEPS_PER_ROLLOUT = 32  # smoke.yaml: n_steps 8 x batch_size 4
N_EPOCHS = 2  # smoke.yaml: ppo.n_epochs (SB3 counts _n_updates per epoch)


# --------------------------------------------------------------------------- helpers
def _popen_train(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_checkpoint(run_dir: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until ``checkpoints/step_32.zip`` exists (it appears whole: written by rename), the process still running."""
    target = run_dir / "checkpoints" / f"step_{STEPS_PER_ROLLOUT}.zip"
    wait_until(target.is_file, proc, timeout)
    assert proc.poll() is None, f"training ended before its first checkpoint:\n{proc.communicate()[1][-3000:]}"
    assert target.is_file(), "no first checkpoint in time"


def _load(model_file: Path):
    from stable_baselines3 import PPO

    return PPO.load(model_file, device="cpu")


def _assert_same_model(a_file: Path, b_file: Path) -> None:
    """Same step, same update count, bit-identical policy parameters and optimiser state."""
    a, b = _load(a_file), _load(b_file)
    assert (a.num_timesteps, a._n_updates) == (b.num_timesteps, b._n_updates)
    sa, sb = a.policy.state_dict(), b.policy.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"parameter {k} differs between {a_file} and {b_file}"
    oa, ob = a.policy.optimizer.state_dict()["state"], b.policy.optimizer.state_dict()["state"]
    for i in oa:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa[i][k], ob[i][k]), f"optimiser {k} of parameter {i} differs"


def _assert_same_normalizer(a_file: Path, b_file: Path) -> None:
    from kelvin.rundir import load_vecnormalize

    a, b = load_vecnormalize(a_file), load_vecnormalize(b_file)
    np.testing.assert_array_equal(a.obs_rms.mean, b.obs_rms.mean)
    np.testing.assert_array_equal(a.obs_rms.var, b.obs_rms.var)
    assert a.obs_rms.count == b.obs_rms.count


def _assert_no_update_lost(model_file: Path) -> None:
    model = _load(model_file)
    assert model._n_updates == N_EPOCHS * model.num_timesteps // STEPS_PER_ROLLOUT, (
        f"{model_file}: {model._n_updates} optimiser passes at step {model.num_timesteps}")


def _temps(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".kelvin-tmp-*")]


# --------------------------------------------------------------------------- signals
@pytest.mark.slow
def test_sigterm_saves_the_last_update_and_resume_loses_none(smoke_run, tmp_path):
    run_dir = tmp_path / "term"
    # total_timesteps only bounds the run (constant learning rate and clip range): the trajectory is the smoke run's
    proc = _popen_train(["--config", str(SMOKE), "--run-dir", str(run_dir), "--set", "train.total_timesteps=100000"])
    _wait_for_first_checkpoint(run_dir, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 143, err[-3000:]
    assert "SIGTERM: stopping after this step and saving the model" in err
    assert out.startswith("interrupted (model saved): SIGTERM"), out
    assert "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    step = summary["timesteps"]
    assert summary["signal"] == "SIGTERM" and summary["interrupted"] and step in (32, 64, 96), summary
    # What SIGTERM keeps is the state after the last completed update, exactly the uninterrupted run's at that step
    ref_model, ref_norm = RunDir(smoke_run.run_dir).checkpoint_files(step)
    _assert_same_model(run_dir / "model.zip", ref_model)
    _assert_same_normalizer(run_dir / "vecnormalize.pkl", ref_norm)
    _assert_no_update_lost(run_dir / "model.zip")
    assert (run_dir / "export" / "spec.json").is_file() and not _temps(run_dir)

    # --resume continues to the smoke run's length: every rollout learned from, as in the uninterrupted run
    proc = run_train(["--resume", str(run_dir), "--set", "train.total_timesteps=96"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    final, ref_final = _load(run_dir / "model.zip"), _load(smoke_run.run_dir / "model.zip")
    assert final.num_timesteps == ref_final.num_timesteps == 96
    assert final._n_updates == ref_final._n_updates == N_EPOCHS * 3


@pytest.mark.slow
def test_sigkill_then_resume_from_the_newest_checkpoint(smoke_run, tmp_path):
    run_dir = tmp_path / "killed"
    proc = _popen_train(["--config", str(SMOKE), "--run-dir", str(run_dir), "--set", "train.total_timesteps=100000",
                         "--set", "train.validate_every=0"])
    _wait_for_first_checkpoint(run_dir, proc)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    run = RunDir(run_dir)
    steps = run.checkpoints()
    assert steps and steps == list(range(32, 32 * len(steps) + 1, 32))  # one per update, none torn
    point = run.resume_point(normalized=True)
    assert point.step == steps[-1]  # the newest checkpoint loads: at most one rollout's steps lost
    _assert_no_update_lost(point.model_file)
    if point.step <= 96:
        _assert_same_model(point.model_file, RunDir(smoke_run.run_dir).checkpoint_files(point.step)[0])

    target = point.step + STEPS_PER_ROLLOUT  # one more rollout
    proc = run_train(["--resume", str(run_dir), "--set", f"train.total_timesteps={target}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = _load(run_dir / "model.zip")
    assert final.num_timesteps == target
    _assert_no_update_lost(run_dir / "model.zip")
    assert not _temps(run_dir)


# --------------------------------------------------------------------------- full disk
_FULL_DISK = """
import errno, os, runpy, sys
real_fdopen = os.fdopen
full = []

class FullDisk:
    # a file on a disk that fills up: half the bytes go in, then ENOSPC
    def __init__(self, fh): self.fh = fh
    def __enter__(self): return self
    def __exit__(self, *exc): self.fh.close()
    def write(self, data):
        self.fh.write(data[: len(data) // 2]); self.fh.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

def fdopen(fd, *args, **kwargs):
    fh = real_fdopen(fd, *args, **kwargs)
    name = os.readlink(f"/proc/self/fd/{fd}")
    if ".kelvin-tmp-" in name and (full or "step_64" in name):
        full.append(name)  # from the second checkpoint on, the disk stays full
        return FullDisk(fh)
    return fh

os.fdopen = fdopen
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names the files being written through /proc")
def test_full_disk_keeps_the_last_checkpoint_and_says_so(smoke_run, tmp_path):
    run_dir = tmp_path / "full"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, "--config", str(SMOKE), "--run-dir", str(run_dir),
                           "--set", "train.validate_every=0"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {run_dir / 'checkpoints' / 'step_64_vecnormalize.pkl'}: the disk "
                           "is full"), last
    assert "Training stopped at step 64" in last and f"--resume {run_dir}" in last
    assert "Traceback" not in proc.stderr
    # Kept: the first checkpoint, whole and equal to the uninterrupted run's; nothing torn, no temporary file
    run = RunDir(run_dir)
    assert run.checkpoints() == [32] and not run.model_file.exists() and not _temps(run_dir)
    _assert_same_model(run.checkpoint_files(32)[0], smoke_run.run_dir / "checkpoints" / "step_32.zip")
    assert run.resume_point(normalized=True).step == 32


def test_write_atomic_keeps_the_old_file_when_a_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    target.write_text("old")
    real_fsync = os.fsync

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(SaveError, match=r"cannot write .*summary.json: the disk is full .*previous summary.json is kept"):
        write_atomic(target, b"new")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]

    def refuse(path):  # a save that does not load back never replaces the file
        raise RunDirError(f"cannot load {path}")

    with pytest.raises(SaveError, match="does not load back"):
        write_atomic(target, b"torn", check=refuse)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    write_atomic(target, b"new")
    assert target.read_text() == "new"


# --------------------------------------------------------------------------- damaged files
@pytest.mark.slow
def test_truncated_checkpoints_are_skipped_naming_each(smoke_run, tmp_path):
    run_dir = tmp_path / "truncated"
    shutil.copytree(smoke_run.run_dir, run_dir)
    run = RunDir(run_dir)
    model = run.model_file.read_bytes()
    run.model_file.write_bytes(model[:30_000])  # passes as a zip header; cut inside a member
    proc = run_train(["--resume", str(run_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"warning: skipping {run.model_file}: cannot load" in proc.stderr
    assert proc.stdout.startswith(f"{run_dir} is finished: 96 steps")  # step_96 stands in for it: nothing lost
    assert "Traceback" not in proc.stderr

    step96 = run.checkpoint_files(96)[0]
    step96.write_bytes(step96.read_bytes()[: len(model) // 2])
    with pytest.warns(RuntimeWarning) as caught:
        point = run.resume_point(normalized=True)
    assert point.step == 64 and point.model_file == run.checkpoint_files(64)[0]
    assert [str(w.message).split(":")[0] for w in caught] == [f"skipping {run.model_file}", f"skipping {step96}"]

    for step in run.checkpoints():
        run.checkpoint_files(step)[0].write_bytes(b"PK\x03\x04 not a zip")
    proc = run_train(["--resume", str(run_dir)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: no model of {run_dir} loads (")


@pytest.mark.slow
def test_a_garbage_normalizer_is_named(smoke_run, tmp_path):
    run_dir = tmp_path / "garbage"
    shutil.copytree(smoke_run.run_dir, run_dir)
    (run_dir / "vecnormalize.pkl").write_bytes(b"garbage\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "kelvin.export", str(run_dir), str(tmp_path / "out")], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot read {run_dir / 'vecnormalize.pkl'}")
    proc = run_train(["--resume", str(run_dir)])  # resume skips model.zip (its statistics are gone) for step_96
    assert proc.returncode == 0 and f"skipping {run_dir / 'model.zip'}: cannot read" in proc.stderr


# --------------------------------------------------------------------------- run-directory ownership
@pytest.mark.slow
def test_run_directory_ownership(smoke_run, tmp_path):
    # a finished run: --resume says so and exits 0 (it used to crash: 'KelvinCallback' has no attribute 'model')
    proc = run_train(["--resume", str(smoke_run.run_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == (f"{smoke_run.run_dir} is finished: 96 steps of train.total_timesteps=96; to train "
                                   f"on, raise it: --resume {smoke_run.run_dir} --set train.total_timesteps=N")
    # a new run into a run directory is refused: nothing of the old run is touched
    before = sorted(p.name for p in smoke_run.run_dir.iterdir())
    proc = run_train(["--config", str(SMOKE), "--run-dir", str(smoke_run.run_dir), "--set", "train.seed=1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: run directory {smoke_run.run_dir} is not empty") and "--overwrite" in line
    assert f"--resume {smoke_run.run_dir}" in line and sorted(p.name for p in smoke_run.run_dir.iterdir()) == before
    # a file given as run directory; --debug shows the traceback
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    proc = run_train(["--config", str(SMOKE), "--run-dir", str(a_file)])
    assert proc.returncode == 2 and proc.stderr.strip() == (f"error: run directory {a_file} is a file, not a "
                                                            "directory; give another --run-dir")
    proc = run_train(["--config", str(SMOKE), "--run-dir", str(a_file), "--debug"])
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "RunDirError" in proc.stderr


def test_overwrite_replaces_a_run_and_nothing_else(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    for name in ["config.yaml", "model.zip", "summary.json", "checkpoints/step_32.zip"]:
        (run_dir / name).write_text("old")
    with pytest.raises(RunDirError, match="not empty .*--resume .*--overwrite"):
        RunDir(run_dir).claim()
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"not a Kelvin run's \(notes.txt\); nothing was deleted"):
        RunDir(run_dir).claim(overwrite=True)
    assert (run_dir / "model.zip").is_file()
    (run_dir / "notes.txt").unlink()
    # what a run on a tuned base (the default) and with train.keep_best writes besides: replaced as well
    for name in ["base.json", "cache/fixed.json", "best/model.zip", "best/best.json"]:
        (run_dir / name).parent.mkdir(exist_ok=True)
        (run_dir / name).write_text("old")
    RunDir(run_dir).claim(overwrite=True)
    assert run_dir.is_dir() and not any(run_dir.iterdir())
    # every path RunDir names lies under one of the entries --overwrite removes
    run = RunDir(run_dir)
    named = {getattr(run, attr).relative_to(run_dir).parts[0] for attr in dir(RunDir)
             if isinstance(getattr(RunDir, attr), property)}
    assert named == set(RunDir.OWN_ENTRIES)


def test_read_only_run_directory(tmp_path):
    if os.geteuid() == 0:  # root writes into a chmod 0o500 directory; /sys refuses it too
        locked = Path("/sys")
        try:
            fd, name = tempfile.mkstemp(dir=locked)
        except OSError:
            pass
        else:
            os.close(fd)
            os.unlink(name)
            pytest.skip("no read-only directory for root here")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
    try:
        with pytest.raises(RunDirError, match=rf"cannot write to the parent directory {locked} of {locked / 'new'} "
                                              r"\(.*\); make it writable or give another --run-dir"):
            RunDir(locked / "new").claim()
        if locked != Path("/sys"):
            with pytest.raises(RunDirError, match=rf"cannot write to the run directory {locked} .*make it writable"):
                RunDir(locked).claim()
    finally:
        if locked != Path("/sys"):
            locked.chmod(0o700)


# --------------------------------------------------------------------------- bad inputs: one line, named
@pytest.mark.slow
def test_damaged_model_files_are_one_line_errors(tmp_path):
    from envs.lm import _resolve_source

    gguf = _resolve_source("smollm2-135m-instruct")
    truncated = tmp_path / "truncated.gguf"
    with open(gguf.directory / gguf.gguf_file, "rb") as fh:
        truncated.write_bytes(fh.read(3_000_000))
    stub = tmp_path / "stub"
    stub.mkdir()
    (stub / "config.json").write_text("{}")
    for name in (truncated, stub):
        run_dir = tmp_path / f"run-{name.name}"
        proc = run_train(["--config", str(SMOKE), "--run-dir", str(run_dir), "--set", f"model.name={name}"])
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith(f"error: cannot load the model at {name} ("), last
        assert not any(run_dir.iterdir())  # a run that did not start leaves nothing to refuse later


def test_binary_prompt_file_is_named(tmp_path):
    from envs.prompts import load_prompts

    binary = tmp_path / "prompts.jsonl"
    binary.write_bytes(b'{"text": "ok"}\n\x89PNG\r\n\x1a\n\xd0\xff')
    with pytest.raises(ValueError, match=rf"Prompt file '{binary}' is not UTF-8 text \(byte 0x89 at line 2\)"):
        load_prompts(binary)


def test_sample_refuses_a_generator_that_is_not_one():
    from samplers.core import sample

    logits = torch.randn(2, 11)
    with pytest.raises(TypeError, match=r"sample\(generator='x'\): expected a torch.Generator .* got a str"):
        sample(logits, 1.0, generator="x")


@pytest.mark.slow
def test_env_refuses_bad_actions_and_an_empty_prompt(lm):
    from envs.config import EnvConfig
    from envs.generation import TemperatureEnv, TemperatureVecEnv
    from envs.rewards import RewardConfig

    reward = RewardConfig(coherence=0.0, group_semantic=0.0)
    env = TemperatureEnv(lm=lm, max_new_tokens=2, reward=reward)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"expected one action .*got shape \(2,\)"):
        env.step(np.zeros(2, dtype=np.float32))
    with pytest.raises(ValueError, match="the prompt is empty"):
        env.reset(options={"prompt": ""})
    vec = TemperatureVecEnv(EnvConfig(batch_size=2, group_size=1, max_new_tokens=2), lm=lm, reward=reward)
    vec.reset()
    with pytest.raises(ValueError, match=r"expected 2 actions \(one per row\), got 3"):
        vec.step(np.zeros(3, dtype=np.float32))


def test_export_refuses_an_output_path_that_is_a_file_before_loading(tmp_path, capsys):
    from kelvin.export import main

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        assert main(["pid", str(out)]) == 2
        assert capsys.readouterr().err == (f"error: export directory {out}: {a_file} is a file, not a directory; "
                                           "give another output directory\n")


def test_normalizer_pairing_with_its_model_step(tmp_path):
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from kelvin.rundir import load_vecnormalize

    vec = VecNormalize(DummyVecEnv([lambda: gym.make("Pendulum-v1")]))
    plain = tmp_path / "plain.pkl"
    vec.save(str(plain))  # saved outside Kelvin: no step recorded, nothing to check (and no recursion in getattr)
    assert "kelvin_step" not in load_vecnormalize(plain, step=64).__dict__
    vec.kelvin_step = 32  # what Snapshot.take records
    paired = tmp_path / "paired.pkl"
    vec.save(str(paired))
    assert load_vecnormalize(paired, step=32).kelvin_step == 32
    with pytest.raises(RunDirError, match="holds the statistics of step 32, its model is at step 64"):
        load_vecnormalize(paired, step=64)
