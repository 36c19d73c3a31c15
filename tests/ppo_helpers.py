"""Helpers for tests that run a small real PPO (Pendulum) and look at the policy after each update."""

from __future__ import annotations

from typing import Callable

import torch
from stable_baselines3 import PPO


def record_after_train(model: PPO, read: Callable[[PPO], torch.Tensor]) -> list[torch.Tensor]:
    """Wrap ``model.train`` (one PPO update) so that ``read(model)`` is recorded right after each update, before
    any callback sees it; returns the list the records go to."""
    records: list[torch.Tensor] = []
    train = model.train

    def train_and_record():
        train()
        records.append(read(model))

    model.train = train_and_record
    return records
