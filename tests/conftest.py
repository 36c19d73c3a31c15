"""Shared fixtures: one real model per test session (loading the GGUF costs ~20-40 s once)."""

import pytest
import torch


@pytest.fixture(scope="session")
def lm():
    from envs.lm import load_causal_lm

    return load_causal_lm()


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield
