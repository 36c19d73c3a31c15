"""Shared fixtures: one real model per test session (loading the GGUF costs ~20-40 s once), and one short
real training run whose export the engine tests (transformers, llama.cpp) share."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


@pytest.fixture(scope="session")
def lm():
    from envs.lm import load_causal_lm

    return load_causal_lm()


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """A short real training run (smoke config) in a subprocess; train() writes run_dir/export."""
    run_dir = tmp_path_factory.mktemp("runs") / "smoke"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(SMOKE), "--run-dir", str(run_dir),
                           "--set", "train.total_timesteps=32", "--set", "train.checkpoint_every=0",
                           "--set", "train.validate_every=0"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
