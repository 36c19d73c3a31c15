"""How much should a per-category base table lean on the overall best temperature? (``policy.base_prior_prompts``)

Runs every temperature of ``policy.base_temperatures`` on ``--train-prompts`` train prompts (and on the whole of
each ``--heldout`` split), cached like the base tuning itself, then:

1. **Cross-validation inside the train split**: ``--repeats`` times, tune the table on ``--tune-prompts`` random
   train prompts with each prior of ``--priors`` (:func:`kelvin.tuning.tune_tables`) and score it on the other
   train prompts, at every λ of the base's grid; print the mean over repeats of (table - one T per λ), with its
   standard error. The prior with the highest gain is the one to use; the held-out splits below do not choose it.
2. **Held-out splits**: tune on the first ``--tune-prompts`` train prompts (the base's own, round-robin over
   categories) and print, per λ, the reward on each held-out split of each prior's table minus one T per λ, with
   a paired 95% bootstrap interval over prompts.

``.venv/bin/python scripts/base_pooling.py --config configs/default.yaml`` (about 10 minutes on a 2-core CPU the
first time, seconds after: the episodes are cached).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.lm import load_causal_lm  # noqa: E402
from envs.prompts import load_prompts, select_prompts  # noqa: E402
from envs.text_metrics import paired_bootstrap_ci  # noqa: E402
from kelvin.config_loading import load_config  # noqa: E402
from kelvin.tuning import EpisodeCache, base_runs, quality_diversity, tune_tables  # noqa: E402
from policies.tuned_base import interpolation_grid  # noqa: E402


def fixed_runs(config, lm, cache, split: str, n: int | None) -> dict[float, list[dict]]:
    prompts = select_prompts(load_prompts(config.env.prompts, split=split, categories=config.env.categories), n)
    return base_runs(config, lm, prompts, cache, split=split)[0]


def prompt_rewards(runs: dict[float, list[dict]], reward, lambdas) -> tuple[list[str], list[str], np.ndarray]:
    """Prompt ids, their categories and each prompt's mean reward: (T, λ, prompts), in the order of the first T's run."""
    ids = list(dict.fromkeys(e["prompt_id"] for e in runs[min(runs)]))
    cats = {e["prompt_id"]: e["category"] for e in runs[min(runs)]}
    out = np.zeros((len(runs), len(lambdas), len(ids)))
    for i, t in enumerate(sorted(runs)):
        q, d = quality_diversity(runs[t], reward)
        for j, lam in enumerate(lambdas):
            by_id: dict[str, list[float]] = {}
            for e, r in zip(runs[t], q + lam * d):
                by_id.setdefault(e["prompt_id"], []).append(float(r))
            out[i, j] = [np.mean(by_id[p]) for p in ids]
    return ids, [cats[p] for p in ids], out


def score(tables, temps, cats, rewards, lambdas, fixed: bool) -> np.ndarray:
    """Each prompt's reward under a table (or its ``other`` column, one T per λ): (λ, prompts)."""
    out = np.zeros((len(lambdas), len(cats)))
    for j, lam in enumerate(lambdas):
        table = tables[float(lam)]
        picks = [temps.index(table["other"] if fixed else table.get(c, table["other"])) for c in cats]
        out[j] = rewards[picks, j, np.arange(len(cats))]
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--train-prompts", type=int, default=128)
    ap.add_argument("--tune-prompts", type=int, default=None, help="default: policy.base_prompts")
    ap.add_argument("--priors", default="0,2,4,8,16,32", help="values of policy.base_prior_prompts to compare")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--heldout", default="validation,test", help="splits to score on, whole ('' for none)")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    n_tune = args.tune_prompts or config.policy.base_prompts
    priors = [float(p) for p in args.priors.split(",")]
    lambdas = interpolation_grid(config.env.diversity_bounds, config.policy.base_diversity_points)
    temps = sorted(float(t) for t in config.policy.base_temperatures)
    lm = load_causal_lm(config.model)
    cache = EpisodeCache(EpisodeCache.default_dir(config.model))
    k = config.env.group_size

    train = fixed_runs(config, lm, cache, config.env.split, args.train_prompts)
    ids, cats, rewards = prompt_rewards(train, config.reward, lambdas)
    rng = np.random.default_rng(config.train.seed)
    gains = {p: [] for p in priors}
    for _ in range(args.repeats):
        perm = rng.permutation(len(ids))
        tune, held = set(np.asarray(ids)[perm[:n_tune]]), perm[n_tune:]
        sub = {t: [e for e in eps if e["prompt_id"] in tune] for t, eps in train.items()}
        held_cats, held_rewards = [cats[i] for i in held], rewards[:, :, held]
        for p in priors:
            tables = tune_tables(sub, lambdas, config.reward, prior_episodes=p * k)
            diff = (score(tables, temps, held_cats, held_rewards, lambdas, False)
                    - score(tables, temps, held_cats, held_rewards, lambdas, True))
            gains[p].append(diff.mean())
    print(f"cross-validation on {len(ids)} train prompts: tune on {n_tune}, score on the other {len(ids) - n_tune}, "
          f"{args.repeats} repeats; table - one T per λ, mean over λ = {list(lambdas)}:")
    for p in priors:
        g = np.asarray(gains[p])
        print(f"  base_prior_prompts {p:g}: {g.mean():+.3f} ± {g.std(ddof=1) / np.sqrt(len(g)):.3f}")

    first = {p.id for p in select_prompts(
        load_prompts(config.env.prompts, split=config.env.split, categories=config.env.categories), n_tune)}
    sub = {t: [e for e in eps if e["prompt_id"] in first] for t, eps in train.items()}
    for split in filter(None, args.heldout.split(",")):
        hids, hcats, hrewards = prompt_rewards(fixed_runs(config, lm, cache, split, None), config.reward, lambdas)
        print(f"{split} ({len(hids)} prompts), tuned on the base's {len(first)} train prompts: table - one T per λ")
        for p in priors:
            tables = tune_tables(sub, lambdas, config.reward, prior_episodes=p * k)
            ours = score(tables, temps, hcats, hrewards, lambdas, False)
            ref = score(tables, temps, hcats, hrewards, lambdas, True)
            cells = []
            for j, lam in enumerate(lambdas):
                mean, low, high = paired_bootstrap_ci(ours[j], ref[j], n_resamples=2000, seed=0)
                cells.append(f"λ={lam:g} {mean:+.3f} [{low:+.3f}, {high:+.3f}]")
            print(f"  base_prior_prompts {p:g}: " + " | ".join(cells))


if __name__ == "__main__":
    main()
