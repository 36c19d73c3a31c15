"""Shared fixtures: one real model and one real smoke training run per test session, and the toy exports
the export tests share (tests/export_helpers.py).

Loading the GGUF costs ~20-40 s once; the smoke run (``configs/smoke.yaml``: 96 steps of real PPO on the
real model, in a ``train.py`` subprocess) about a minute. Tests that need either are marked
``@pytest.mark.slow`` (``pytest -m "not slow"`` is the fast loop); collection refuses an unmarked one.
"""

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"
SLOW_FIXTURES = {"lm", "smoke_run"}


def wait_until(ready, proc: subprocess.Popen | None = None, timeout: float = 600.0) -> bool:
    """Wait until ``ready()`` (a file appears, a process is gone), ``proc`` exits or ``timeout`` seconds pass; returns
    ``ready()``. The one place a test waits on another process: a readiness condition, checked every 50 ms."""
    deadline = time.monotonic() + timeout
    while not ready() and (proc is None or proc.poll() is None) and time.monotonic() < deadline:
        time.sleep(0.05)
    return bool(ready())


def run_train(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a subprocess (one torch thread), output captured."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900, **kwargs)


@dataclass(frozen=True)
class SmokeRun:
    """A finished ``train.py --config configs/smoke.yaml`` run: treat ``run_dir`` as read-only (copy it to change it)."""

    run_dir: Path
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def lm():
    from envs.lm import load_causal_lm

    return load_causal_lm()


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> SmokeRun:
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    proc = run_train(["--config", str(SMOKE), "--run-dir", str(run_dir)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SmokeRun(run_dir, proc.stdout, proc.stderr)


@pytest.fixture(autouse=True, scope="session")
def _sb3_logs_in_the_sessions_tmp(tmp_path_factory):
    """A PPO that learns without ``tensorboard_log`` (the tests that build one directly) makes its logger a folder,
    by default a fresh ``SB3-<time>`` in the system's temp dir, left behind; ``SB3_LOGDIR`` puts them all in one
    folder of this session's pytest tmp."""
    old = os.environ.get("SB3_LOGDIR")
    os.environ["SB3_LOGDIR"] = str(tmp_path_factory.mktemp("sb3-logs"))
    yield
    if old is None:
        os.environ.pop("SB3_LOGDIR", None)
    else:
        os.environ["SB3_LOGDIR"] = old


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def dummy_export(tmp_path_factory):
    """A learned-policy export of an untrained PPO with made-up normalisation statistics."""
    from export_helpers import MAPPING, SPEC, V, dummy_ppo
    from kelvin.export import export_learned

    model = dummy_ppo(SPEC)
    rng = np.random.default_rng(1)
    norm = {"mean": rng.normal(size=SPEC.dim), "var": rng.uniform(0.2, 3.0, SPEC.dim), "clip": 5.0, "epsilon": 1e-8}
    out = export_learned(model.policy, tmp_path_factory.mktemp("exp") / "learned", SPEC, MAPPING, {"top_k": 5},
                         {"name": "toy", "vocab_size": V}, norm, torch.rand(V))
    return out, model, norm


@pytest.fixture
def baseline_dir(tmp_path):
    """A ``pid`` baseline export on the toy spec of tests/export_helpers.py."""
    from export_helpers import MAPPING, SPEC, V
    from kelvin.export import export_baseline
    from policies.registry import make_policy

    return export_baseline(make_policy("pid", SPEC, MAPPING), tmp_path / "pid", None, {"name": "toy", "vocab_size": V})


def pytest_collection_modifyitems(config, items):
    """A test that loads the real model or needs the smoke run must be marked slow (the fast loop skips it)."""
    unmarked = [item.nodeid for item in items
                if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError("tests using the real model or the smoke run must be @pytest.mark.slow: "
                                + ", ".join(unmarked))
