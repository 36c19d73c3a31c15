"""The Ray env (envs/distributed.py) on 2 local workers: the exact autoreset arrays of the stub scenario, the same
rollouts as the in-process shards, a killed worker, train.py with ``env.workers=2`` (every file, Ctrl-C, --resume),
and no Ray process left behind. All slow: each test starts its own Ray instance (and the train tests a model
copy per worker)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SMOKE, run_train, wait_until
from ray import cloudpickle

import stub_lm
from envs.distributed import RayVecEnv, WorkerDiedError, make_vec_env
from envs.generation import TemperatureVecEnv
from kelvin.config_loading import load_config
from stub_lm import NO_EMBEDDER, STUB_PROMPTS, StubLM, check_exact_autoreset, stub_config

pytestmark = pytest.mark.slow

# Ray workers cannot import tests/: ship the stub module's code with the pickled StubLM class.
cloudpickle.register_pickle_by_value(stub_lm)


def _live(pids: set[int]) -> set[int]:
    """The pids of ``pids`` still running (zombies count as gone)."""
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state != "Z":
            alive.add(pid)
    return alive


def _descendants(root: int) -> set[int]:
    """Every process below ``root`` in the process tree (read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _tagged(tag: str) -> set[int]:
    """Processes whose environment holds ``KELVIN_TEST_TAG=tag`` (a train.py subprocess and all it started)."""
    needle = f"KELVIN_TEST_TAG={tag}".encode()
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    out.add(int(entry.name))
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
    return _live(out)


def _gone(pids: set[int], timeout: float = 30.0) -> set[int]:
    """``pids`` still alive after waiting up to ``timeout`` seconds for them to exit."""
    wait_until(lambda: not _live(pids), timeout=timeout)
    return _live(pids)


def _stub_ray_env(**fields) -> RayVecEnv:
    """2 workers x 2 rows (one group of 2 each) over the stub prompts: the 4-row scenario of tests/test_env.py."""
    return make_vec_env(stub_config(batch_size=2, workers=2, **fields), reward=NO_EMBEDDER, prompts=STUB_PROMPTS,
                        model=StubLM)


def test_ray_env_plays_the_exact_autoreset_arrays_and_the_in_process_shards_rollouts():
    torch.set_num_threads(1)
    env = _stub_ray_env()
    try:
        assert isinstance(env, RayVecEnv) and env.num_envs == 4
        assert [s.rows for s in env.shards] == [range(0, 2), range(2, 4)]
        ray_pids = _descendants(os.getpid())
        assert {s.pid for s in env.shards} <= ray_pids  # the workers are this process's Ray instance's
        # row r meets the prompts row r of one 4-row env meets, with every autoreset array of the stub scenario
        check_exact_autoreset(env)

        # the same seed gives the rollouts of two in-process shards built the same way, array for array
        shards = [TemperatureVecEnv(stub_config(batch_size=2), lm=StubLM(), reward=NO_EMBEDDER, prompts=STUB_PROMPTS,
                                    shard=(i, 2)) for i in range(2)]
        before = dict(env.timings)
        env.seed(3)
        for s in shards:
            s.seed(3)
        obs = env.reset()
        np.testing.assert_array_equal(obs, np.concatenate([s.reset() for s in shards]))
        rng = np.random.default_rng(7)
        completions = []
        for _ in range(12):
            actions = rng.uniform(-1, 1, size=(4, 1)).astype(np.float32)
            obs, rewards, dones, infos = env.step(actions)
            ref = [s.step(actions[2 * i:2 * i + 2]) for i, s in enumerate(shards)]
            np.testing.assert_array_equal(obs, np.concatenate([r[0] for r in ref]))
            np.testing.assert_array_equal(rewards, np.concatenate([r[1] for r in ref]))
            np.testing.assert_array_equal(dones, np.concatenate([r[2] for r in ref]))
            for row, info in enumerate(infos):
                expected = dict(ref[row // 2][3][row % 2])
                if "group" in expected:  # end of episode: shard 1's group 0 is the driver's group 1
                    expected["group"] += row // 2
                    completions.append(info["completion"])
                assert info.keys() == expected.keys()
                for key, value in expected.items():
                    if key == "episode":  # its "t" is wall time
                        assert (info[key]["r"], info[key]["l"]) == (value["r"], value["l"])
                    elif isinstance(value, np.ndarray):
                        np.testing.assert_array_equal(info[key], value)
                    else:
                        assert info[key] == value, key
        assert len(completions) >= 8 and len(set(completions)) > 1  # real token draws, not one fixed string
        # one timings interface: tokens and waiting row-steps summed over the shards
        for key in ("tokens", "waiting_rows"):
            assert env.timings[key] - before[key] == sum(s.timings[key] for s in shards), key
        assert env.timings["tokens"] - before["tokens"] == 48  # the stub's rows of a group end together: no waiting
        # an error inside a worker comes back with its type and the shard named, and closes the env
        actions = np.zeros((4, 1), dtype=np.float32)
        actions[3] = np.nan
        with pytest.raises(ValueError, match=r"env shard 1 of 2 \(rows 2-3, pid .*\) failed during step: .*action"):
            env.step(actions)
        assert env.closed
    finally:
        env.close()
    assert _gone(ray_pids) == set(), "Ray processes left after close()"


def test_a_killed_worker_is_an_error_naming_its_shard_and_nothing_is_left():
    torch.set_num_threads(1)
    env = _stub_ray_env()
    ray_pids = _descendants(os.getpid())
    victim = env.shards[1]
    env.reset()
    env.step(np.zeros((4, 1), dtype=np.float32))
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(WorkerDiedError, match=rf"env shard 1 of 2 \(rows 2-3, pid {victim.pid} on .*\) died during "
                                              r"step.*train.py --resume RUN_DIR"):
        env.step(np.zeros((4, 1), dtype=np.float32))
    assert env.closed  # the env closed itself: the other worker and the Ray instance it started are stopped
    assert _gone(ray_pids) == set(), "Ray processes left after a worker died"
    with pytest.raises(RuntimeError, match="RayVecEnv is closed"):
        env.step(np.zeros((4, 1), dtype=np.float32))
    env.close()  # idempotent


def _relative_files(run_dir: Path) -> list[str]:
    """The files of a run directory, sorted, with the event files' host-specific names and the episode cache's hashed
    names (a worker's batch is part of the hashed settings) replaced by placeholders."""
    out = []
    for p in run_dir.rglob("*"):
        if p.is_file():
            rel = p.relative_to(run_dir).as_posix()
            if "tfevents" in rel:
                rel = rel.split("events.out.tfevents.")[0] + "events.out.tfevents.*"
            elif rel.startswith("cache/"):
                rel = "cache/*.json"
            out.append(rel)
    return sorted(out)


def test_train_with_two_workers_writes_every_file_a_normal_run_writes(smoke_run, tmp_path):
    run_dir = tmp_path / "ray"
    # 2 workers x 2 rows = the 4 rows of smoke.yaml, so the step counts, checkpoints and files are the same
    proc = run_train(["--config", str(SMOKE), "--run-dir", str(run_dir), "--set", "env.workers=2",
                      "--set", "env.batch_size=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _relative_files(run_dir) == _relative_files(smoke_run.run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["timesteps"] == 96 and not summary["interrupted"]
    # the learner's timings are both workers' sum: every one of the 96 row-steps drew a token or waited
    perf = summary["perf"]
    assert perf["tokens"] > 0 and perf["tokens"] + round(perf["waiting_share"] * 96) == 96
    assert load_config(run_dir / "config.yaml").env.workers == 2
    assert "paired 95% CI): learned" in proc.stdout and "vs its base" in proc.stdout


def _start_train(args: list[str], tag: str) -> subprocess.Popen:
    """``train.py ARGS`` in its own process group (signalled as a terminal signals its foreground group), every
    process it starts marked with ``KELVIN_TEST_TAG=tag``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", KELVIN_TEST_TAG=tag)
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, after: int, tag: str) -> list[int]:
    """Wait until the run saves a checkpoint past step ``after``; returns its 2 Ray workers' pids."""
    wait_until(lambda: any(int(p.stem.split("_")[1]) > after for p in (run_dir / "checkpoints").glob("step_*.zip")),
               proc)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    started = _tagged(tag)
    workers = [p for p in started if b"ShardWorker" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(workers) == 2, sorted(started)  # the tag finds the Ray processes, so "none left" below means it
    return workers


def test_ctrl_c_and_a_killed_worker_save_the_model_leave_no_ray_process_and_resume(tmp_path):
    from stable_baselines3 import PPO

    run_dir = tmp_path / "run"
    long_run = ["--set", "train.total_timesteps=100000", "--set", "train.validate_every=0"]
    tag = uuid.uuid4().hex
    proc = _start_train(["--config", str(SMOKE), "--run-dir", str(run_dir), "--set", "env.workers=2",
                         "--set", "env.batch_size=2", *long_run], tag)
    try:
        _wait_for_checkpoint(proc, run_dir, 0, tag)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted (model saved)" in out
    assert _gone(_tagged(tag)) == set(), "Ray processes outlived train.py after Ctrl-C"
    steps = PPO.load(run_dir / "model.zip", device="cpu").num_timesteps
    assert steps >= 32

    # --resume continues on fresh workers; then one of them is killed: an error naming the shard, the model saved
    tag = uuid.uuid4().hex
    proc = _start_train(["--resume", str(run_dir), *long_run], tag)
    try:
        workers = _wait_for_checkpoint(proc, run_dir, steps, tag)
        os.kill(workers[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert "WorkerDiedError: env shard" in err and "died during step" in err, err[-3000:]
    assert _gone(_tagged(tag)) == set(), "Ray processes outlived train.py after a worker died"
    assert PPO.load(run_dir / "model.zip", device="cpu").num_timesteps >= steps + 32  # saved, and it had continued
