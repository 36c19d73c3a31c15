"""Fixed-temperature runs, cached; per-category temperature tables; the tuned base of a residual policy.

**Cached, not recomputed.** A fixed temperature's episodes are deterministic given the model, the
prompts, the env and reward settings and the seed (DESIGN.md, "Devices and speed"). :class:`EpisodeCache`
keeps them, keyed by a hash of exactly those inputs, in the run directory (``cache/``) and in the machine's
cache (``$KELVIN_CACHE/episodes`` or ``~/.cache/kelvin/episodes``): training's validation baselines and the
base tuning of a second run with the same settings cost nothing. Settings that do not change a token
(``env.overlap``, ``env.workers``, ``env.ray_address``) are left out of the key.

**Tables.** :func:`tune_tables` picks, for each λ, the temperature of a grid with the highest mean reward
in each category. The reward of an episode at any λ is ``quality + λ · diversity`` with the episode's
own components, and a fixed temperature's tokens do not depend on λ, so one run per temperature scores
every λ (exactly: the same sum the env computes). The evaluation's per-category table family and the
residual policy's base (:func:`tune_base`, on the **train** split) are both tuned by it.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from envs.prompts import Prompt, load_prompts, select_prompts
from kelvin.rollout import collect_episodes
from kelvin.atomic import write_text_atomic
from policies.tuned_base import ALL, TunedBase, interpolation_grid

__all__ = ["CACHE_VERSION", "EpisodeCache", "base_runs", "compact_episode", "quality_diversity", "run_cached",
           "run_fixed", "tune_base", "tune_tables"]

CACHE_VERSION = 1
"""Bump when a change of the env, sampler or reward code changes the episodes of the same inputs."""

_KEPT = ("row", "k", "group", "prompt_id", "category", "answerable", "correct", "diversity", "reward_components",
         "episode", "temperatures", "completion", "TimeLimit.truncated")


def compact_episode(info: dict) -> dict:
    """The JSON-safe part of an end-of-episode info that validation, tuning and reports read."""
    out = {k: info[k] for k in _KEPT if k in info}
    out["temperatures"] = [float(t) for t in np.asarray(info.get("temperatures", ()), dtype=np.float64)]
    out["episode"] = {k: float(v) for k, v in info["episode"].items()}
    out["reward_components"] = {k: float(v) for k, v in info["reward_components"].items()}
    return out


def quality_diversity(episodes: Sequence[dict], reward_config) -> tuple[np.ndarray, np.ndarray]:
    """The weighted quality return and diversity return of each episode (R,), (R,), from its components."""
    from envs.rewards import DIVERSITY_COMPONENTS

    weights = reward_config.weights()
    q = np.asarray([sum(w * e["reward_components"][k] for k, w in weights.items() if k not in DIVERSITY_COMPONENTS)
                    for e in episodes], dtype=np.float64)
    d = np.asarray([sum(w * e["reward_components"][k] for k, w in weights.items() if k in DIVERSITY_COMPONENTS)
                    for e in episodes], dtype=np.float64)
    return q, d


class EpisodeCache:
    """Episodes of deterministic runs as JSON files named by the hash of their inputs. ``dirs`` are read in
    order (the first that holds a key answers); a new entry is written, atomically, to the last one (the
    machine's cache), and :meth:`keep_in` copies every entry used so far to another (a run directory, once
    the run has started: a run that fails to start leaves its directory empty)."""

    def __init__(self, *dirs: Path | None):
        self.dirs = [Path(d) for d in dirs if d is not None]
        self.used: dict[str, tuple[list[dict], str]] = {}

    @staticmethod
    def default_dir(model_config) -> Path:
        from envs.lm import cache_root

        return cache_root(getattr(model_config, "cache_dir", None)) / "episodes"

    @staticmethod
    def key(env, policy_key: str, seed: int, episodes_per_row: int) -> str:
        """Hash of everything a run's episodes depend on: model, prompts, env and reward settings, seed, policy."""
        core = env.core
        cfg = {k: v for k, v in asdict(env.config).items() if k not in ("overlap", "workers", "ray_address", "seed")}
        reward = asdict(core.reward.config)
        if not reward["group_baseline"]:  # the training signal's credit changes no absolute return
            reward.pop("group_diversity_credit", None)
        lm = core.lm
        payload = {"version": CACHE_VERSION, "model": [getattr(lm, "name", None), str(lm.device),
                                                       str(getattr(getattr(lm, "model", None), "dtype", ""))],
                   "prompts": [[p.id, p.text, p.category, p.answers] for p in core.prompts],
                   "env": cfg, "reward": reward, "seed": int(seed),
                   "episodes_per_row": int(episodes_per_row), "policy": policy_key}
        text = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def get(self, key: str) -> list[dict] | None:
        for d in self.dirs:
            path = d / f"{key}.json"
            if path.is_file():
                try:
                    data = json.loads(path.read_text())
                    self.used[key] = (data["episodes"], data["about"])
                    return data["episodes"]
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # a damaged entry is recomputed
        return None

    def put(self, key: str, episodes: list[dict], about: str) -> None:
        self.used[key] = (episodes, about)
        if self.dirs:
            self._write(self.dirs[-1], key)

    def keep_in(self, directory: Path) -> None:
        """Write every entry used so far to ``directory`` too (those it has not got)."""
        for key in self.used:
            if not (Path(directory) / f"{key}.json").is_file():
                self._write(Path(directory), key)

    def _write(self, directory: Path, key: str) -> None:
        episodes, about = self.used[key]
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_text_atomic(directory / f"{key}.json", json.dumps({"about": about, "episodes": episodes}))
        except OSError as exc:  # a read-only machine cache costs time, never the run
            print(f"note: could not cache {about} in {directory} ({exc.strerror or exc})", file=sys.stderr)


def run_cached(env, policy, policy_key: str | None, n_prompts: int, seed: int, cache: EpisodeCache | None,
               on_step: Callable[[], None] | None = None) -> tuple[list[dict], bool]:
    """Episodes of ``policy`` on the first ``n_prompts`` prompts of ``env``'s schedule, K samples each (compact,
    ordered by (row, k)), and whether they came from ``cache``. ``policy_key`` None: not cached (a policy
    that changes, the learned one)."""
    per_row = max(1, math.ceil(n_prompts / (env.num_envs // env.config.group_size)))
    key = None if cache is None or policy_key is None else EpisodeCache.key(env, policy_key, seed, per_row)
    if key is not None:
        hit = cache.get(key)
        if hit is not None:
            return hit, True
    episodes = [compact_episode(e) for e in collect_episodes(env, policy, episodes_per_row=per_row, seed=seed,
                                                             on_step=on_step)["episodes"]]
    if key is not None:
        cache.put(key, episodes, about=policy_key)
    return episodes, False


def run_fixed(env, temperatures: Sequence[float], n_prompts: int, seed: int, cache: EpisodeCache | None,
              on_step: Callable[[], None] | None = None) -> tuple[dict[float, list[dict]], int]:
    """:func:`run_cached` for each fixed temperature: ``({T: episodes}, how many came from the cache)``."""
    from policies.registry import make_policy

    runs, hits = {}, 0
    for t in temperatures:
        policy = make_policy(f"fixed:{t}", env.feature_spec, env.action_mapping)
        runs[float(t)], hit = run_cached(env, policy, f"fixed:{float(t)!r}", n_prompts, seed, cache, on_step)
        hits += hit
    return runs, hits


def tune_tables(episodes_by_t: dict[float, list[dict]], lambdas: Sequence[float], reward,
                prior_episodes: float = 0.0, weights: dict[str, float] | None = None) -> dict[float, dict[str, float]]:
    """For each λ, the temperature of ``episodes_by_t`` (T -> end-of-episode infos) with the highest mean reward
    in each category: ``{λ: {category: T}}``. Reward = the absolute quality return + λ times the diversity
    return of each episode (``reward`` a :class:`envs.rewards.RewardFunction` or its config); ties go to the lower
    temperature. ``other`` (a category the runs did not see, or every prompt) gets the overall best.

    ``prior_episodes`` > 0 pools each category with every prompt (partial pooling): a category's score of T is
    ``(n_c * mean_c(T) + prior * mean_all(T)) / (n_c + prior)`` with ``n_c`` its episodes, so a category seen on
    a few prompts keeps the overall best unless its own episodes outweigh the prior. Why
    (docs/results-earlier.md, section "The pooled base"): a table tuned on 4-5 prompts a category lost 0.63 /
    0.53 reward at λ = 1 to one T per λ on the validation / test split; pooled with 8 prompts' worth, no λ had an
    interval below 0.

    ``weights`` ({category: share}, e.g. :func:`envs.prompts.category_shares` of a whole split) makes the overall
    score of T (``other``, and the prior) the weighted mean of the categories' means (a category without episodes
    or without weight drops out, the rest are renormalised) instead of the mean over episodes: tuned on equal
    shares of the categories, one T per λ then answers for the split's mix."""
    config = getattr(reward, "config", reward)
    temps = sorted(episodes_by_t)
    parts = {}  # T -> (categories (R,), quality (R,), diversity (R,))
    for t in temps:
        eps = episodes_by_t[t]
        parts[t] = (np.asarray([e["category"] for e in eps]), *quality_diversity(eps, config))
    categories = sorted({c for cats, _, _ in parts.values() for c in cats})
    tables: dict[float, dict[str, float]] = {}
    for diversity in lambdas:
        rewards = {t: q + diversity * d for t, (_, q, d) in parts.items()}
        overall = {t: _overall(rewards[t], parts[t][0], weights) for t in temps}

        def score(t: float, cat: str) -> float:
            mask = parts[t][0] == cat
            n = int(mask.sum())
            return float((rewards[t][mask].sum() + prior_episodes * overall[t]) / (n + prior_episodes)) if n else -np.inf
        table = {c: max(temps, key=lambda t, c=c: (score(t, c), -t)) for c in categories}
        table["other"] = max(temps, key=lambda t: (overall[t], -t))
        tables[float(diversity)] = table
    return tables


def _overall(rewards: np.ndarray, categories: np.ndarray, weights: dict[str, float] | None) -> float:
    """The mean of ``rewards``, or with ``weights`` the weighted mean of each category's mean (see tune_tables)."""
    if not len(rewards):
        return -np.inf
    if weights is None:
        return float(np.mean(rewards))
    seen = [c for c in dict.fromkeys(categories.tolist()) if weights.get(c, 0.0) > 0]
    if not seen:
        raise ValueError(f"weights {weights} give no weight to any category tuned on ({sorted(set(categories))})")
    total = sum(weights[c] for c in seen)
    return float(sum(weights[c] * rewards[categories == c].mean() for c in seen) / total)


def tuning_prompts(config) -> list[Prompt]:
    """The train-split prompts the base is tuned on: ``policy.base_prompts`` of them, round-robin over categories."""
    prompts = load_prompts(config.env.prompts, split=config.env.split, categories=config.env.categories)
    return select_prompts(prompts, config.policy.base_prompts)


def base_runs(config, lm, prompts: Sequence[Prompt], cache: EpisodeCache | None,
              on_step: Callable[[], None] | None = None, split: str | None = None) -> tuple[dict[float, list[dict]], int]:
    """Every temperature of ``policy.base_temperatures`` on ``prompts`` (of ``split``, default the env's) with the
    base tuning's env seed, random stream and reward (absolute returns): :func:`run_fixed`'s ``({T: episodes},
    hits)``. :func:`tune_base` runs it on its prompts; ``scripts/base_pooling.py`` on more, and on held-out splits."""
    from envs.generation import TemperatureVecEnv

    env = TemperatureVecEnv(replace(config.env, split=split or config.env.split, seed=config.train.seed + 2), lm=lm,
                            prompts=prompts, reward=replace(config.reward, group_baseline=False))
    try:
        return run_fixed(env, config.policy.base_temperatures, len(prompts), config.train.seed + 20_011, cache, on_step)
    finally:
        env.close()


def tune_base(config, lm, cache: EpisodeCache | None, on_step: Callable[[], None] | None = None) -> tuple[TunedBase, dict]:
    """Tune the base of a residual policy (``config.policy.base``: ``table`` or ``fixed``) on the train split with
    the training reward (absolute returns): every temperature of ``policy.base_temperatures`` runs once on the
    same prompts and random stream, and each (category, λ) of the grid gets the best one. Returns the base and
    a record ``{prompts, answerable, temperatures, lambdas, wall_s, cached}``."""
    pc = config.policy
    t0 = time.perf_counter()
    prompts = tuning_prompts(config)
    runs, hits = base_runs(config, lm, prompts, cache, on_step)
    lambdas = interpolation_grid(config.env.diversity_bounds, pc.base_diversity_points)
    tables = tune_tables(runs, lambdas, config.reward, prior_episodes=pc.base_prior_prompts * config.env.group_size)
    if pc.base == "fixed":
        rows = {ALL: tuple(tables[diversity]["other"] for diversity in lambdas)}
    else:
        # a category the tuning prompts did not hold (a small base_prompts) gets the overall best, as "other" does
        names = sorted({c for table in tables.values() for c in table} | set(config.env.feature_spec().categories))
        rows = {c: tuple(tables[diversity].get(c, tables[diversity]["other"]) for diversity in lambdas) for c in names}
    base = TunedBase(kind=pc.base, lambdas=lambdas, temperatures=rows)
    record = {"prompts": len(prompts), "answerable": sum(p.answerable for p in prompts),
              "temperatures": [float(t) for t in pc.base_temperatures], "lambdas": list(lambdas),
              "wall_s": time.perf_counter() - t0, "cached": hits == len(pc.base_temperatures)}
    return base, record

