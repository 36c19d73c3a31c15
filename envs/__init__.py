"""Kelvin environments: LM backend, prompts, rewards, the batched VecEnv and the Gymnasium env.

Importing ``envs`` registers ``kelvin/Temperature-v0`` with Gymnasium (the single-episode
:class:`envs.generation.TemperatureEnv`); heavy modules load only when used.
"""

import gymnasium

ENV_ID = "kelvin/Temperature-v0"

if ENV_ID not in gymnasium.registry:
    gymnasium.register(id=ENV_ID, entry_point="envs.generation:TemperatureEnv")

__all__ = ["ENV_ID"]
