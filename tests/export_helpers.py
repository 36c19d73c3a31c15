"""What tests/test_export.py and tests/test_export_samplers.py share: a toy feature spec and action mapping, an
untrained SB3 PPO on that spec, SB3's own actions as the reference, and reading / rewriting an export's
``spec.json``. The fixtures built from them (``dummy_export``, ``baseline_dir``) are in conftest.py.
"""

import json
from pathlib import Path

import numpy as np
import torch

from policies import FeatureSpec
from policies.actions import ActionMapping

SPEC = FeatureSpec(horizon=8, categories=("code", "creative"))
MAPPING = ActionMapping(kind="linear", t_min=-2.0, t_max=2.0, max_delta=0.75)
V = 50


def dummy_ppo(spec: FeatureSpec, **ppo_kwargs):
    """An untrained SB3 PPO MlpPolicy with the observation space of ``spec`` (no LLM needed)."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    class _Env(gym.Env):
        observation_space = gym.spaces.Box(-np.inf, np.inf, (spec.dim,), np.float32)
        action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

        def reset(self, *, seed=None, options=None):
            return np.zeros(spec.dim, np.float32), {}

        def step(self, action):
            return np.zeros(spec.dim, np.float32), 0.0, False, False, {}

    return PPO("MlpPolicy", _Env(), policy_kwargs={"net_arch": [32, 32]}, device="cpu", seed=0, **ppo_kwargs)


def sb3_actions(model, obs: np.ndarray, norm: dict | None, base=None) -> np.ndarray:
    """The reference: SB3's own numpy path (VecNormalize's formula in numpy, then ``policy.predict``), plus the
    tuned base as the training env's residual wrapper adds it (``base``: a BaseModule, or None)."""
    x = np.asarray(obs, dtype=np.float32)
    if norm is not None:
        x = np.clip((x - norm["mean"]) / np.sqrt(norm["var"] + norm["epsilon"]), -norm["clip"], norm["clip"])
    actions, _ = model.policy.predict(x.astype(np.float32), deterministic=True)
    actions = np.clip(np.asarray(actions, dtype=np.float32), -1.0, 1.0)  # (B, 1)
    if base is None:
        return actions
    with torch.no_grad():
        shift = base(torch.as_tensor(np.asarray(obs, dtype=np.float32))).numpy()  # (B,)
    return np.clip(actions + shift[:, None], -1.0, 1.0)


def read_spec(path: Path) -> dict:
    return json.loads((path / "spec.json").read_text())


def rewrite_spec(path: Path, **changes) -> None:
    spec = read_spec(path)
    spec.update(changes)
    (path / "spec.json").write_text(json.dumps(spec))
