"""Intervals over prompts and paired differences.

A percentile bootstrap over prompts (:func:`envs.text_metrics.bootstrap_ci`, 2000 resamples by
default) gives each metric's 95% interval. Paired differences (``reference - baseline``,
:func:`envs.text_metrics.paired_bootstrap_ci`) resample the prompts jointly, so "better" means the
interval of the difference excludes zero in the metric's good direction. ``tokens_per_s`` is one
timing per run and has no interval (``low = high = None``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from envs.text_metrics import bootstrap_ci, paired_bootstrap_ci
from kelvin.evaluation.metrics import METRICS, Metric

__all__ = ["PolicyResult", "paired_differences", "summarize", "verdict"]


@dataclass
class PolicyResult:
    """Episodes of one policy grouped by prompt, per-prompt metric values and their intervals."""

    entry: object  # kelvin.evaluation.policies.PolicyEntry
    groups: list[list[dict]]  # (P, K) end-of-episode infos, prompt-major, sample k = row within the group
    per_prompt: dict[str, np.ndarray]  # metric -> (P,)
    stats: dict[str, dict]  # metric -> {mean, low, high}
    tokens_per_s: float
    wall_s: float


def summarize(per_prompt: dict[str, np.ndarray], tokens_per_s: float, n_resamples: int, seed: int) -> dict[str, dict]:
    """metric -> ``{mean, low, high}``: percentile bootstrap over prompts (perplexity: exp(-logprob CI)).

    A metric defined on some prompts only (``accuracy``: NaN on open prompts) is summarised over those;
    with none of them, its entry is ``{mean: None, low: None, high: None}``."""
    out: dict[str, dict] = {}
    for m in METRICS:
        if m.ci and m.name != "perplexity":
            values = np.asarray(per_prompt[m.name], dtype=np.float64)
            values = values[np.isfinite(values)]
            if values.size == 0:
                out[m.name] = {"mean": None, "low": None, "high": None}
                continue
            mean, low, high = bootstrap_ci(values, n_resamples=n_resamples, seed=seed)
            out[m.name] = {"mean": mean, "low": low, "high": high}
    lp = out["logprob"]
    out["perplexity"] = {"mean": math.exp(-lp["mean"]), "low": math.exp(-lp["high"]), "high": math.exp(-lp["low"])}
    out["tokens_per_s"] = {"mean": float(tokens_per_s), "low": None, "high": None}
    return {m.name: out[m.name] for m in METRICS}  # the table's order


def verdict(metric: Metric, low: float, high: float) -> str:
    """``better`` / ``worse`` when the interval of a difference excludes 0 (by the metric's direction),
    ``higher`` / ``lower`` for descriptive metrics, else ``no difference``."""
    if low > 0:
        return {1: "better", -1: "worse", 0: "higher"}[metric.direction]
    if high < 0:
        return {1: "worse", -1: "better", 0: "lower"}[metric.direction]
    return "no difference"


def paired_differences(reference: PolicyResult, other: PolicyResult, n_resamples: int, seed: int) -> dict[str, dict]:
    """``reference - other`` per metric over the same prompts: ``{mean, low, high, verdict}``.

    Verdicts read from the reference's side. Perplexity and tokens/s have none (use logprob; one timing).
    """
    out: dict[str, dict] = {}
    for m in METRICS:
        if not m.ci or m.name == "perplexity":
            continue
        a, b = np.asarray(reference.per_prompt[m.name]), np.asarray(other.per_prompt[m.name])
        both = np.isfinite(a) & np.isfinite(b)  # accuracy: the answerable prompts
        if not both.any():
            continue
        mean, low, high = paired_bootstrap_ci(a[both], b[both], n_resamples=n_resamples, seed=seed)
        out[m.name] = {"mean": mean, "low": low, "high": high, "verdict": verdict(m, low, high)}
    return out
