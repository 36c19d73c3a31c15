"""A PPO-learned temperature policy behind the one policy interface.

The learned policy is the SB3 actor's deterministic action (the Gaussian mean, clipped to
``[-1, 1]``) on observations normalised with the statistics VecNormalize gathered in training:
``clip((obs - mean) / sqrt(var + eps), -clip_obs, clip_obs)``. Normalisation belongs to the policy,
so baselines and the env keep working on raw features.
"""

from __future__ import annotations

import numpy as np
import torch

from policies.actions import ActionMapping
from policies.features import FeatureSpec

__all__ = ["LearnedPolicy"]


class LearnedPolicy:
    """Wraps an SB3 actor-critic policy and observation statistics; answers ``predict`` like SB3."""

    name = "learned"
    stateful = False

    def __init__(self, sb3_policy, feature_spec: FeatureSpec, action_mapping: ActionMapping,
                 obs_mean: np.ndarray | None = None, obs_var: np.ndarray | None = None,
                 clip_obs: float = 10.0, epsilon: float = 1e-8, label: str = "learned (PPO)"):
        self.sb3_policy = sb3_policy
        self.feature_spec = feature_spec
        self.action_mapping = action_mapping
        self.obs_mean = None if obs_mean is None else np.asarray(obs_mean, dtype=np.float32)
        self.obs_var = None if obs_var is None else np.asarray(obs_var, dtype=np.float32)
        self.clip_obs = float(clip_obs)
        self.epsilon = float(epsilon)
        self.label = label

    @classmethod
    def from_sb3(cls, model, vec_normalize=None, feature_spec: FeatureSpec | None = None,
                 action_mapping: ActionMapping | None = None, label: str = "learned (PPO)") -> "LearnedPolicy":
        """From a PPO model and (optionally) the VecNormalize whose statistics it was trained with."""
        mean = var = None
        clip_obs, eps = 10.0, 1e-8
        if vec_normalize is not None and getattr(vec_normalize, "norm_obs", False):
            mean, var = vec_normalize.obs_rms.mean, vec_normalize.obs_rms.var
            clip_obs, eps = vec_normalize.clip_obs, vec_normalize.epsilon
        return cls(model.policy, feature_spec, action_mapping, mean, var, clip_obs, eps, label)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=np.float32)
        if self.obs_mean is None:
            return obs
        return np.clip((obs - self.obs_mean) / np.sqrt(self.obs_var + self.epsilon), -self.clip_obs, self.clip_obs)

    def reset(self, batch_size: int | None = None) -> None:
        """Stateless: nothing to clear."""

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):
        obs = observation.detach().cpu().numpy() if torch.is_tensor(observation) else np.asarray(observation)
        actions, _ = self.sb3_policy.predict(self.normalize(obs), deterministic=deterministic)
        return np.clip(np.asarray(actions, dtype=np.float32), -1.0, 1.0), state

    def temperatures(self, obs, episode_start=None) -> torch.Tensor:
        actions, _ = self.predict(obs)
        return self.action_mapping.to_temperature(torch.as_tensor(actions).reshape(-1))
