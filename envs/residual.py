"""The training side of a residual policy: PPO's action is a correction added to the tuned base's action.

:class:`ResidualActionVecEnv` wraps the VecEnv PPO trains on (inside ``VecNormalize``, so it reads the
**raw** observation, as the exported actor does). For each row it computes the base action from the
row's current observation (its category one-hot and λ: :class:`policies.tuned_base.BaseModule`) and
sends ``clip(base + clip(residual, -1, 1), -1, 1)`` to the env. The exported
:class:`policies.learned.ActorModule` computes exactly that with the deterministic residual, so the
policy PPO learns is the policy every sampler runs.
"""

from __future__ import annotations

import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper

from policies.tuned_base import BaseModule

__all__ = ["ResidualActionVecEnv"]


class ResidualActionVecEnv(VecEnvWrapper):
    """``venv`` with actions read as residuals on ``base`` (a :class:`~policies.tuned_base.BaseModule`)."""

    def __init__(self, venv: VecEnv, base: BaseModule):
        self.base = base.eval()
        self._obs: np.ndarray | None = None  # (N, F) raw observation the next actions answer
        super().__init__(venv)

    def base_actions(self, obs: np.ndarray) -> np.ndarray:
        """The base's actions (N,) float32 for raw observations (N, F)."""
        with torch.no_grad():
            return self.base(torch.as_tensor(obs, dtype=torch.float32)).numpy().astype(np.float32)

    def reset(self) -> np.ndarray:
        self._obs = self.venv.reset()
        return self._obs

    def step_async(self, actions: np.ndarray) -> None:
        if self._obs is None:
            raise RuntimeError("ResidualActionVecEnv.step_async before reset(): the base reads the observation")
        residual = np.clip(np.asarray(actions, dtype=np.float32).reshape(self.num_envs, -1), -1.0, 1.0)  # (N, 1)
        self.venv.step_async(np.clip(residual + self.base_actions(self._obs)[:, None], -1.0, 1.0))

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        self._obs = obs
        return obs, rewards, dones, infos
