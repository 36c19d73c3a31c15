"""Training's validation: the learned policy against the best fixed temperature and against its own tuned base.

Every policy runs through the same env code on the same ``train.validation_prompts`` prompts of the validation
split (round-robin over categories: 32 prompts hold 8 answerable ones), K = ``env.group_size`` samples each,
with the same λ draws and the same random stream (:func:`kelvin.rollout.collect_episodes` with one seed). The
returns are absolute (``reward.group_baseline`` off).

**A margin is a paired interval.** The unit is a group (one prompt, its K samples, its λ): the same unit for
every policy. A margin is the mean over groups of ``reward(learned) - reward(other)``, with a 95% percentile
bootstrap interval that resamples the groups jointly (:func:`envs.text_metrics.paired_bootstrap_ci`). The best
fixed temperature is chosen on the same episodes (which favours it). The fixed temperatures and the base are
deterministic, so their episodes are computed once, before training, and cached (:mod:`kelvin.tuning`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import numpy as np

from envs.prompts import load_prompts, select_prompts
from envs.text_metrics import paired_bootstrap_ci
from kelvin.tuning import EpisodeCache, run_cached, run_fixed
from policies.base import TemperaturePolicy

__all__ = ["Validation", "group_means", "margin_text", "paired_margin", "summarize_episodes"]


def summarize_episodes(episodes: list[dict]) -> dict[str, float]:
    """Mean return, length, temperature statistics and every reward component of a list of episodes."""
    from envs.rewards import EPISODE_COMPONENTS, STEP_COMPONENTS

    if not episodes:
        return {}
    temps = np.concatenate([np.asarray(e["temperatures"], dtype=np.float64) for e in episodes])
    out = {
        "reward": float(np.mean([e["episode"]["r"] for e in episodes])),
        "length": float(np.mean([e["episode"]["l"] for e in episodes])),
        "temperature_mean": float(temps.mean()) if temps.size else 0.0,
        "temperature_std": float(temps.std()) if temps.size else 0.0,
        "negative_fraction": float((temps < 0).mean()) if temps.size else 0.0,
    }
    for k in STEP_COMPONENTS + EPISODE_COMPONENTS:
        out[k] = float(np.mean([e["reward_components"][k] for e in episodes]))
    answered = [e["correct"] for e in episodes if e.get("answerable")]
    out["accuracy"] = float(np.mean(answered)) if answered else float("nan")
    out["answerable_episodes"] = len(answered)
    return out


def group_means(episodes: list[dict], group_size: int, values) -> np.ndarray:
    """``values`` (one per episode) averaged over each group (the K samples of one prompt episode): (G,), in the
    order of ``(row // group_size, k)``, the same for every policy run with the same env and seed."""
    sums: dict[tuple[int, int], list[float]] = {}
    for e, v in zip(episodes, values):
        sums.setdefault((int(e["row"]) // group_size, int(e["k"])), []).append(float(v))
    return np.asarray([np.mean(sums[key]) for key in sorted(sums)], dtype=np.float64)


def paired_margin(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int) -> dict[str, float]:
    """``mean(a - b)`` over paired units with its 95% bootstrap interval: ``{mean, low, high}``."""
    mean, low, high = paired_bootstrap_ci(a, b, n_resamples=n_resamples, seed=seed)
    return {"mean": float(mean), "low": float(low), "high": float(high)}


class Validation:
    """The validation prompts' env and the cached baselines (fixed temperatures, the tuned base) a learned policy
    is measured against. ``on_step`` is called after every env step (a stop request raises there)."""

    def __init__(self, config, lm, base_policy: TemperaturePolicy | None, cache: EpisodeCache | None,
                 on_step: Callable[[], None] | None = None):
        from envs.generation import TemperatureVecEnv

        tc = config.train
        self.config, self.cache, self.on_step = config, cache, on_step
        self.prompts = select_prompts(load_prompts(config.env.prompts, split=tc.validation_split,
                                                   categories=config.env.categories), tc.validation_prompts)
        self.env = TemperatureVecEnv(replace(config.env, split=tc.validation_split, seed=tc.seed + 1), lm=lm,
                                     prompts=self.prompts, reward=replace(config.reward, group_baseline=False))
        self.seed = tc.seed + 10_007
        self.base_policy = base_policy
        self.fixed: dict[float, list[dict]] = {}
        self.base: list[dict] | None = None
        self.baselines = {"wall_s": 0.0, "cached": False}

    @property
    def feature_spec(self):
        return self.env.feature_spec

    @property
    def action_mapping(self):
        return self.env.action_mapping

    def episodes(self, policy: TemperaturePolicy, key: str | None = None) -> list[dict]:
        """Compact episodes of ``policy`` on the validation prompts (cached under ``key`` when given)."""
        return run_cached(self.env, policy, key, len(self.prompts), self.seed, self.cache, self.on_step)[0]

    def prepare(self) -> dict:
        """Run (or read from the cache) every fixed temperature and the base; ``{wall_s, cached}``."""
        t0 = time.perf_counter()
        self.fixed, hits = run_fixed(self.env, self.config.train.validation_temperatures, len(self.prompts), self.seed,
                                     self.cache, self.on_step)
        runs = len(self.fixed)
        if self.base_policy is not None:
            key = "base:" + repr(sorted(self.base_policy.base.to_dict().items()))
            self.base, hit = run_cached(self.env, self.base_policy, key, len(self.prompts), self.seed, self.cache,
                                        self.on_step)
            hits += hit
            runs += 1
        self.baselines = {"wall_s": time.perf_counter() - t0, "cached": hits == runs}
        return self.baselines

    def _group_rewards(self, episodes: list[dict]) -> np.ndarray:
        """Each group's mean return (the env's absolute return at the group's λ): (G,)."""
        return group_means(episodes, self.config.env.group_size, [e["episode"]["r"] for e in episodes])

    def compare(self, learned: list[dict], step: int) -> dict:
        """The validation record of ``learned``'s episodes: summaries, the best fixed T, the paired margins."""
        if not self.fixed:
            self.prepare()
        n, seed = self.config.train.validation_bootstrap, self.seed
        ours = self._group_rewards(learned)
        fixed_groups = {t: self._group_rewards(eps) for t, eps in self.fixed.items()}
        best_t = max(fixed_groups, key=lambda t: (fixed_groups[t].mean(), -t))
        record = {
            "step": int(step),
            "prompts": len(self.prompts),
            "answerable_prompts": sum(p.answerable for p in self.prompts),
            "episodes_per_policy": len(learned),
            "learned": summarize_episodes(learned),
            "fixed": {f"{t:g}": summarize_episodes(eps) for t, eps in self.fixed.items()},
            "best_fixed_temperature": best_t,
            "best_fixed_reward": float(fixed_groups[best_t].mean()),
            "margin_vs_best_fixed": paired_margin(ours, fixed_groups[best_t], n, seed),
            "base": None,
            "margin_vs_base": None,
        }
        if self.base is not None:
            record["base"] = summarize_episodes(self.base)
            record["margin_vs_base"] = paired_margin(ours, self._group_rewards(self.base), n, seed)
            record["base_vs_best_fixed"] = paired_margin(self._group_rewards(self.base), fixed_groups[best_t], n, seed)
        return record

    def close(self) -> None:
        self.env.close()


def margin_text(m: dict | None) -> str:
    """``+0.123 [+0.045, +0.201]``."""
    if m is None:
        return "n/a"
    return f"{m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"
