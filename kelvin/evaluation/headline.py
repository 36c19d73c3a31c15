"""The evaluation's headline: the objective itself, at each λ of a learned policy's front.

At each diversity setting λ the learned policy was evaluated at, its held-out **reward** (the return it was
trained on: quality + λ · diversity, absolute) minus that of each rival at the same λ, with a paired 95%
bootstrap interval over the test prompts (DESIGN.md, "Evaluation"):

| rival | what it is | tuned on |
|---|---|---|
| ``fixed-tuned`` | the one fixed temperature with the best validation reward at that λ | validation split, the table family's grid |
| ``table`` | the per-category temperature table at that λ | the same validation runs |
| ``base`` | the run's own tuned base alone (``base:RUN``: the residual at zero) | train split, before PPO |

Every rival from the fixed grid gets the same tuning budget (the table family's validation runs); the base
is what PPO started from, so ``learned − base`` is what PPO added.
"""

from __future__ import annotations

from kelvin.evaluation.statistics import verdict
from kelvin.evaluation.metrics import METRIC_BY_NAME
from envs.text_metrics import paired_bootstrap_ci

__all__ = ["RIVAL_FAMILIES", "dial_check", "reward_headline"]

RIVAL_FAMILIES = {"fixed-tuned": "best fixed T (tuned on validation at λ)", "table": "per-category table at λ",
                  "fixed-tuned@train": "best fixed T at the learned truncation (tuned on validation at λ)",
                  "table@train": "per-category table at the learned truncation", "base": "its tuned base (residual 0)"}


def _diversity_of(entry) -> float | None:
    return None if entry.diversity is None else round(float(entry.diversity), 9)


def reward_headline(results: dict, main: list, fams: dict, n_resamples: int, seed: int) -> list[dict]:
    """One row per (learned run, λ, rival): ``{run, lambda, rival, rival_name, learned, rival_reward, mean, low,
    high, verdict}``, the difference ``learned − rival`` of the per-prompt reward at that λ."""
    rivals = [e for f, es in fams.items() if f in RIVAL_FAMILIES for e in es]
    rivals += [e for e in main if e.family == "base"]
    rows = []
    for e in main:
        if e.family != "learned" or _diversity_of(e) is None:
            continue
        ours = results[e.cache_key].per_prompt["reward"]
        for r in rivals:
            if _diversity_of(r) != _diversity_of(e) or (r.family == "base" and r.run_dir != e.run_dir):
                continue
            theirs = results[r.cache_key].per_prompt["reward"]
            mean, low, high = paired_bootstrap_ci(ours, theirs, n_resamples=n_resamples, seed=seed)
            rows.append({"run": e.run_dir, "learned": e.name, "lambda": float(e.diversity), "rival": r.family,
                         "rival_name": r.name, "rival_label": r.label, "learned_reward": float(ours.mean()),
                         "rival_reward": float(theirs.mean()), "mean": float(mean), "low": float(low),
                         "high": float(high), "verdict": verdict(METRIC_BY_NAME["reward"], low, high)})
    return rows


def dial_check(results: dict, main: list) -> list[dict]:
    """Does each learned run's diversity dial run the right way? Per run: accuracy (answerable prompts) and
    semantic distance (open prompts) at each λ, and whether accuracy at the lowest λ is at least that at the
    highest and semantic distance rises from the lowest λ to the highest."""
    import numpy as np

    runs: dict[str, list] = {}
    for e in main:
        if e.family == "learned" and e.diversity is not None:
            runs.setdefault(e.run_dir, []).append(e)
    out = []
    for run, entries in runs.items():
        entries = sorted(entries, key=lambda e: e.diversity)
        points = []
        for e in entries:
            per = results[e.cache_key].per_prompt
            acc, sem = np.asarray(per["accuracy"], dtype=float), np.asarray(per["semantic_distance"], dtype=float)
            answerable = np.isfinite(acc)
            points.append({"lambda": float(e.diversity),
                           "accuracy": float(acc[answerable].mean()) if answerable.any() else None,
                           "semantic_distance_open": float(sem[~answerable].mean()) if (~answerable).any() else None})
        lo, hi = points[0], points[-1]
        out.append({"run": run, "points": points,
                    "accuracy_falls_with_lambda": None if lo["accuracy"] is None else lo["accuracy"] >= hi["accuracy"],
                    "diversity_rises_with_lambda": None if lo["semantic_distance_open"] is None
                    else hi["semantic_distance_open"] > lo["semantic_distance_open"]})
    return out
