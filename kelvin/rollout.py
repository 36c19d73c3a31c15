"""Run a policy through the batched environment and collect whole episodes (paired by seed).

Training's validation and ``evaluate.py`` share this loop: every policy is a
:class:`~policies.base.TemperaturePolicy` (the one protocol; its ``predict`` is SB3's), every policy
gets the same env seed, so row ``r`` of every policy sees the same sequence of prompts
(``GenerationCore``'s schedule) and the same random stream.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from envs.generation import TemperatureVecEnv
from policies.base import TemperaturePolicy

__all__ = ["collect_episodes"]


def collect_episodes(env: TemperatureVecEnv, policy: TemperaturePolicy, episodes_per_row: int = 1, seed: int = 0,
                     on_step: Callable[[], None] | None = None) -> dict:
    """Run ``policy`` until every row has finished ``episodes_per_row`` episodes.

    Returns ``{"episodes": [info, ...], "tokens_per_s": float, "wall_s": float}``; episodes are
    ordered by (row, k), so the same index is the same prompt slot for every policy. Each info is
    the env's end-of-episode info (``episode``, ``reward_components``, ``temperatures``,
    ``completion``, ``prompt_id``, ``category``...) plus ``row`` and ``k``. ``on_step()`` is called after
    every env step (a progress bar).
    """
    if episodes_per_row < 1:
        raise ValueError(f"episodes_per_row={episodes_per_row} must be >= 1")
    env.seed(seed)
    env.warm_prompts(episodes_per_row)  # every prompt of the run, prefilled in batches
    obs = env.reset()
    policy.reset(env.num_envs)
    finished = np.zeros(env.num_envs, dtype=np.int64)
    episodes: dict[tuple[int, int], dict] = {}
    episode_start = np.ones(env.num_envs, dtype=bool)
    tokens = 0
    t0 = time.perf_counter()
    while (finished < episodes_per_row).any():
        actions, _ = policy.predict(obs, state=None, episode_start=episode_start)
        obs, _, dones, infos = env.step(np.asarray(actions, dtype=np.float32).reshape(env.num_envs, -1))
        tokens += sum(1 for r, info in enumerate(infos) if info["active"] and finished[r] < episodes_per_row)
        if on_step is not None:
            on_step()
        for r in np.flatnonzero(dones):
            if finished[r] < episodes_per_row:
                info = dict(infos[r])
                info.update(row=int(r), k=int(finished[r]))
                episodes[(int(r), int(finished[r]))] = info
            finished[r] += 1
        episode_start = dones
    wall = time.perf_counter() - t0
    ordered = [episodes[key] for key in sorted(episodes)]
    return {"episodes": ordered, "tokens_per_s": tokens / wall if wall > 0 else 0.0, "wall_s": wall}
