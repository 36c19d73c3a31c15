"""Training's validation: the learned policy against the best fixed temperature and against its own tuned base.

Every policy runs through the same env code on the same ``train.validation_prompts`` prompts of the validation
split (round-robin over categories in the split's mix: 32 prompts hold 13 answerable ones), K = ``env.group_size`` samples each,
with the same random stream (:func:`kelvin.rollout.collect_episodes` with one seed; ``train.validation_streams`` N:
N streams, each prompt's value the mean over its N groups, in prompt-id order: :func:`prompt_means`), at
**every** λ of a fixed grid (``train.validation_diversity``, 0 / 1 / 2 by default). The returns are absolute
(``reward.group_baseline`` off).

**Why a grid.** With λ drawn at random per group, the quantity a margin estimates changed with the draws: the
same two policies re-validated on other streams gave margins 0.9 apart, wider than either interval, and a
policy that lost 0.55 at λ = 1 on the test split looked level. On a grid every run measures the same thing,
and the record says at which λ a policy wins or loses.

**A margin is a paired interval.** The unit is a prompt's group (its K samples), the same for every policy;
its value is the group's mean return averaged over the λ grid (per λ: at that λ). A margin is the mean over
groups of ``reward(learned) - reward(other)``, with a 95% percentile bootstrap interval that resamples the
groups jointly (:func:`envs.text_metrics.paired_bootstrap_ci`). The best fixed temperature is one T for the
whole grid (the setting people use), chosen on the same episodes (which favours it); per λ, the best T at that
λ. A fixed temperature's tokens do not depend on λ, so one run per T is scored at every λ exactly
(:func:`kelvin.tuning.quality_diversity`). The fixed temperatures and the base are deterministic: their
episodes are computed once and cached (:mod:`kelvin.tuning`).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Sequence

import numpy as np

from envs.prompts import load_prompts, select_prompts
from envs.text_metrics import paired_bootstrap_ci
from kelvin.tuning import EpisodeCache, quality_diversity, run_cached, run_fixed
from policies.base import TemperaturePolicy
from policies.tuned_base import interpolation_grid

__all__ = ["Validation", "default_lambdas", "grid_rewards", "group_means", "margin_text", "paired_margin", "prompt_means", "scalars", "summarize_episodes"]


def default_lambdas(env_config) -> tuple[float, ...]:
    """The validation's λ grid when ``train.validation_diversity`` is not set: 3 values evenly over the env's λ
    range, each moved to the nearest λ the env trains on when it draws from ``env.diversity_values`` (once each):
    ``[0, 1]`` validates at 0 and 1, not at an untrained 0.5 whose margin would read 0 and dilute the others."""
    grid = interpolation_grid(env_config.diversity_bounds, 3)
    values = sorted(set(float(v) for v in env_config.diversity_values or ()))
    if not values:
        return tuple(float(v) for v in grid)
    return tuple(sorted({min(values, key=lambda v: (abs(v - g), v)) for g in grid}))


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


def prompt_means(episodes: list[dict], values) -> dict[str, float]:
    """``values`` (one per episode) averaged over each prompt's episodes (its K samples on every random stream),
    keyed by prompt id in sorted order: two runs on the same prompts pair key by key, whatever slots their
    streams' schedules gave the prompts."""
    sums: dict[str, list[float]] = {}
    for e, v in zip(episodes, values):
        sums.setdefault(str(e["prompt_id"]), []).append(float(v))
    return {pid: float(np.mean(sums[pid])) for pid in sorted(sums)}


def group_means(episodes: list[dict], group_size: int, values, by_prompt: bool = False) -> np.ndarray:
    """``values`` (one per episode) averaged over each group (the K samples of one prompt episode): (G,), in the
    order of ``(row // group_size, k)``, the same for every policy run with the same env and seed.

    ``by_prompt``: averaged over each prompt instead (:func:`prompt_means`, in sorted prompt-id order)."""
    if by_prompt:
        return np.asarray(list(prompt_means(episodes, values).values()), dtype=np.float64)
    sums: dict[tuple[int, int], list[float]] = {}
    for e, v in zip(episodes, values):
        sums.setdefault((int(e["row"]) // group_size, int(e["k"])), []).append(float(v))
    return np.asarray([np.mean(sums[key]) for key in sorted(sums)], dtype=np.float64)


def paired_margin(a: np.ndarray, b: np.ndarray, n_resamples: int, seed: int) -> dict[str, float]:
    """``mean(a - b)`` over paired units with its 95% bootstrap interval: ``{mean, low, high}``."""
    mean, low, high = paired_bootstrap_ci(a, b, n_resamples=n_resamples, seed=seed)
    return {"mean": float(mean), "low": float(low), "high": float(high)}


def grid_rewards(episodes: list[dict], lambdas: Sequence[float], group_size: int, reward_config=None,
                 rescore: bool = False, by_prompt: bool = False) -> np.ndarray:
    """Each group's (``by_prompt``: each prompt's, see :func:`group_means`) mean absolute return at each λ of
    ``lambdas``: (L, G).

    ``rescore`` False: ``episodes`` are L blocks of equal length, one per λ in order, each at its own λ (the
    env's returns). ``rescore`` True: ``episodes`` is one run (a fixed temperature, whose tokens do not depend
    on λ), scored at every λ from its components: ``quality + λ · diversity`` (``reward_config``'s weights)."""
    if rescore:
        q, d = quality_diversity(episodes, reward_config)
        return np.stack([group_means(episodes, group_size, q + diversity * d, by_prompt) for diversity in lambdas])
    n = len(episodes) // len(lambdas)
    blocks = [episodes[i * n:(i + 1) * n] for i in range(len(lambdas))]
    if n * len(lambdas) != len(episodes) or any(not np.isclose(e["diversity"], diversity)
                                                for diversity, block in zip(lambdas, blocks) for e in block):
        raise ValueError(f"{len(episodes)} validation episodes are not {len(lambdas)} blocks at λ = {list(lambdas)}")
    return np.stack([group_means(block, group_size, [e["episode"]["r"] for e in block], by_prompt) for block in blocks])


class Validation:
    """The validation prompts' envs and the cached baselines (fixed temperatures, the tuned base) a learned policy
    is measured against. ``on_step`` is called after every env step (a stop request raises there)."""

    def __init__(self, config, lm, base_policy: TemperaturePolicy | None, cache: EpisodeCache | None,
                 on_step: Callable[[], None] | None = None):
        from envs.generation import TemperatureVecEnv

        tc = config.train
        self.config, self.cache, self.on_step, self.lm = config, cache, on_step, lm
        self.prompts = select_prompts(load_prompts(config.env.prompts, split=tc.validation_split,
                                                   categories=config.env.categories), tc.validation_prompts,
                                      tc.validation_mix)
        self.lambdas = tuple(float(v) for v in (tc.validation_diversity or default_lambdas(config.env)))
        self._env_config = replace(config.env, split=tc.validation_split, seed=tc.seed + 1)
        self._reward = replace(config.reward, group_baseline=False)
        # the fixed temperatures run here (their tokens do not depend on λ); each λ of the grid has its own env
        self.env = TemperatureVecEnv(self._env_config, lm=lm, prompts=self.prompts, reward=self._reward)
        self._envs: dict[float, object] = {}
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

    def _env_at(self, diversity: float):
        from envs.generation import TemperatureVecEnv

        if diversity not in self._envs:
            config = replace(self._env_config, diversity_values=[diversity])
            self._envs[diversity] = TemperatureVecEnv(config, lm=self.lm, prompts=self.prompts, reward=self._reward)
        return self._envs[diversity]

    @property
    def seeds(self) -> list[int]:
        """The random streams' seeds (``train.validation_streams`` of them): every policy runs on each."""
        return [self.seed + n for n in range(self.config.train.validation_streams)]

    def _run_grid(self, policy: TemperaturePolicy, key: str | None) -> tuple[list[dict], int]:
        """``policy``'s episodes at every λ of the grid, λ by λ (each block the streams' runs one after the other,
        each ordered by (row, k)), and how many of the runs came from the cache (``key`` None: none is cached)."""
        episodes, hits = [], 0
        for diversity in self.lambdas:
            for seed in self.seeds:
                eps, hit = run_cached(self._env_at(diversity), policy,
                                      None if key is None else f"{key}@{diversity!r}", len(self.prompts), seed,
                                      self.cache, self.on_step)
                episodes += eps
                hits += hit
        return episodes, hits

    def episodes(self, policy: TemperaturePolicy) -> list[dict]:
        """Compact episodes of ``policy`` on the validation prompts at every λ of the grid (not cached)."""
        return self._run_grid(policy, None)[0]

    def prepare(self) -> dict:
        """Run (or read from the cache) every fixed temperature and the base; ``{wall_s, cached}``."""
        t0 = time.perf_counter()
        self.fixed, hits = {}, 0
        for seed in self.seeds:  # a stream's episodes after the previous one's; compare() pools them by prompt
            runs, hit = run_fixed(self.env, self.config.train.validation_temperatures, len(self.prompts), seed,
                                  self.cache, self.on_step)
            self.fixed = {t: self.fixed.get(t, []) + eps for t, eps in runs.items()}
            hits += hit
        runs = len(self.fixed) * len(self.seeds)
        if self.base_policy is not None:
            key = "base:" + repr(sorted(self.base_policy.base.to_dict().items()))
            self.base, hit = self._run_grid(self.base_policy, key)
            hits += hit
            runs += len(self.lambdas) * len(self.seeds)
        self.baselines = {"wall_s": time.perf_counter() - t0, "cached": hits == runs}
        return self.baselines

    def compare(self, learned: list[dict], step: int) -> dict:
        """The validation record of ``learned``'s episodes (from :meth:`episodes`): summaries, the best fixed T,
        the paired margins over the grid and at each λ (``by_diversity``)."""
        if not self.fixed:
            self.prepare()
        n, seed = self.config.train.validation_bootstrap, self.seed
        g, by_prompt = self.config.env.group_size, len(self.seeds) > 1  # one stream: a prompt is one group
        ours = grid_rewards(learned, self.lambdas, g, by_prompt=by_prompt)
        fixed = {t: grid_rewards(eps, self.lambdas, g, self._reward, rescore=True, by_prompt=by_prompt)
                 for t, eps in self.fixed.items()}
        best_t = max(fixed, key=lambda t: (fixed[t].mean(), -t))
        base = None if self.base is None else grid_rewards(self.base, self.lambdas, g, by_prompt=by_prompt)
        summaries = {}
        for t, eps in self.fixed.items():
            summaries[f"{t:g}"] = {**summarize_episodes(eps), "reward": float(fixed[t].mean())}  # over the grid
        record = {
            "step": int(step),
            "prompts": len(self.prompts),
            "answerable_prompts": sum(p.answerable for p in self.prompts),
            "diversity": list(self.lambdas),
            "streams": len(self.seeds),
            "episodes_per_policy": len(learned),
            "learned": summarize_episodes(learned),
            "fixed": summaries,
            "best_fixed_temperature": best_t,
            "best_fixed_reward": float(fixed[best_t].mean()),
            "margin_vs_best_fixed": paired_margin(ours.mean(0), fixed[best_t].mean(0), n, seed),
            "base": None,
            "margin_vs_base": None,
            "by_diversity": {},
        }
        if base is not None:
            record["base"] = {**summarize_episodes(self.base), "reward": float(base.mean())}
            record["margin_vs_base"] = paired_margin(ours.mean(0), base.mean(0), n, seed)
            record["base_vs_best_fixed"] = paired_margin(base.mean(0), fixed[best_t].mean(0), n, seed)
        for i, diversity in enumerate(self.lambdas):
            t_at = max(fixed, key=lambda t: (fixed[t][i].mean(), -t))
            at = {"learned_reward": float(ours[i].mean()), "best_fixed_temperature": t_at,
                  "best_fixed_reward": float(fixed[t_at][i].mean()),
                  "margin_vs_best_fixed": paired_margin(ours[i], fixed[t_at][i], n, seed)}
            if base is not None:
                at.update(base_reward=float(base[i].mean()), margin_vs_base=paired_margin(ours[i], base[i], n, seed))
            record["by_diversity"][f"{diversity:g}"] = at
        return record

    def close(self) -> None:
        self.env.close()
        for env in self._envs.values():
            env.close()


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard scalars of a validation record, ``validation/...``: rewards, the margins with their bounds
    (over the grid and ``..._at_λ`` per λ), the learned policy's temperatures and accuracy."""
    out = {"learned_reward": record["learned"]["reward"], "best_fixed_reward": record["best_fixed_reward"],
           "best_fixed_temperature": record["best_fixed_temperature"]}

    def margins(suffix: str, at: dict) -> None:
        for name in ("best_fixed", "base"):
            m = at.get(f"margin_vs_{name}")
            if m is not None:
                out.update({f"margin_vs_{name}{suffix}": m["mean"], f"margin_vs_{name}{suffix}_low": m["low"],
                            f"margin_vs_{name}{suffix}_high": m["high"]})

    margins("", record)
    for diversity, at in record.get("by_diversity", {}).items():
        margins(f"_at_{diversity}", at)
    if record.get("base") is not None:
        out["base_reward"] = record["base"]["reward"]
    for key in ("temperature_mean", "temperature_std", "accuracy"):
        out[f"learned_{key}"] = record["learned"][key]
    for t, summary in record["fixed"].items():
        out[f"fixed_{t}_reward"] = summary["reward"]
    return {f"validation/{k}": float(v) for k, v in out.items()}


def margin_text(m: dict | None) -> str:
    """``+0.123 [+0.045, +0.201]``."""
    if m is None:
        return "n/a"
    return f"{m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"
