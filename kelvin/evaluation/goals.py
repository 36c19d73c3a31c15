"""What an evaluation concludes: each learned front against each family's hull, and the goals of the
diversity dial (issue #12), all with paired bootstrap intervals over prompts.

* :func:`compute_fronts`: per front of :data:`kelvin.evaluation.fronts.FRONTS`, every family's points
  and hull, every learned run's points (one per λ) and hull, and ``HV(learned hull) - HV(family hull)``
  with its 95% interval, at the common reference point and at the widest one; whether the negative-T
  family extends the union of the families' hulls.
* :func:`goals`: per learned run, at its lowest λ its accuracy against the best fixed temperature's (on
  the answerable prompts); at its highest λ its diversity and quality on the open prompts against
  fixed T = 1.0.
* :func:`category_tables`: per category, the metrics that show where a policy spends its heat.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from envs.text_metrics import paired_bootstrap_ci
from kelvin.evaluation.fronts import FRONTS, VERDICT_FRONTS, compare_hulls, hull_front, hull_gap, hull_hypervolume, reference_point, \
    subset_mask

__all__ = ["category_tables", "compute_fronts", "goals", "learned_runs"]

CATEGORY_METRICS = ["accuracy", "semantic_distance", "coherence", "logprob", "temperature_mean", "negative_fraction"]


def learned_runs(main: list) -> OrderedDict:
    """run directory -> its learned entries, λ ascending (one entry when the policy does not observe λ)."""
    runs: OrderedDict[str, list] = OrderedDict()
    for e in main:
        if e.family == "learned":
            runs.setdefault(e.run_dir, []).append(e)
    for run, entries in runs.items():
        entries.sort(key=lambda e: -1.0 if e.diversity is None else e.diversity)
    return runs


def _answerable(results: dict, any_key: str) -> np.ndarray:
    return np.array([bool(eps[0]["answerable"]) for eps in results[any_key].groups])


def _verdict(low: float, high: float) -> str:
    return "outside" if low > 0 else "inside" if high < 0 else "no difference"


def _run_label(entries: list) -> str:
    label = entries[0].label
    return label.split(" λ=")[0]


def _fixed_t(entry) -> float | None:
    """The temperature of a fixed-T family point (None for other policies)."""
    spec = entry.params.get("spec", "")
    return float(spec.split(":", 1)[1]) if spec.startswith("fixed:") and ":" in spec else None


def compute_fronts(results: dict, main: list, fams: dict, n_resamples: int, seed: int) -> list[dict]:
    """One entry per front (see the module doc); fronts whose prompts are missing (no answerable prompt) are
    left out."""
    runs = learned_runs(main)
    if not runs:
        return []
    answerable = _answerable(results, next(iter(runs.values()))[0].cache_key)
    fronts = []
    for f in FRONTS:
        mx, my = subset_mask(answerable, f.x_subset), subset_mask(answerable, f.y_subset)
        if not mx.any() or not my.any():
            continue
        keys = [e.cache_key for es in fams.values() for e in es] + [e.cache_key for es in runs.values() for e in es]
        xs = {k: np.asarray(results[k].per_prompt[f.x], dtype=np.float64)[mx] for k in keys}
        ys = {k: np.asarray(results[k].per_prompt[f.y], dtype=np.float64)[my] for k in keys}
        point = {k: (float(xs[k].mean()), float(ys[k].mean())) for k in keys}
        fixed = {_fixed_t(e): point[e.cache_key] for e in fams.get("fixed", [])}
        refs = {"common": reference_point(fixed, [p[0] for p in point.values()]),
                "wide": (min(p[0] for p in point.values()), 0.0)}
        groups = {f"family:{fam}": [e.cache_key for e in es] for fam, es in fams.items()}
        groups.update({f"learned:{run}": [e.cache_key for e in es] for run, es in runs.items()})
        pairs = [(f"learned:{run}", f"family:{fam}") for run in runs for fam in fams]
        same = f.x_subset == f.y_subset
        comps = {name: compare_hulls(xs, ys, groups, pairs, ref, same, n_resamples, seed) for name, ref in refs.items()}
        families = {}
        for fam, es in fams.items():
            pts = [point[e.cache_key] for e in es]
            families[fam] = {"points": [{"name": e.name, "label": e.label, "x": point[e.cache_key][0],
                                         "y": point[e.cache_key][1]} for e in es],
                             "hull": [list(p) for p in hull_front(pts)],
                             **{f"hv_{name}": hull_hypervolume(pts, ref) for name, ref in refs.items()}}
        learned = {}
        for run, es in runs.items():
            pts = [point[e.cache_key] for e in es]
            vs = {}
            for fam in fams:
                c, w = comps["common"][(f"learned:{run}", f"family:{fam}")], comps["wide"][(f"learned:{run}", f"family:{fam}")]
                vs[fam] = {**c, "verdict": _verdict(c["low"], c["high"]), "diff_wide": w["diff"], "low_wide": w["low"],
                           "high_wide": w["high"], "verdict_wide": _verdict(w["low"], w["high"])}
            learned[run] = {"label": _run_label(es),
                            "points": [{"name": e.name, "lambda": e.diversity, "x": point[e.cache_key][0],
                                        "y": point[e.cache_key][1]} for e in es],
                            "hull": [list(p) for p in hull_front(pts)],
                            **{f"hv_{name}": hull_hypervolume(pts, ref) for name, ref in refs.items()},
                            "vs": vs,
                            "gaps": {fam: {e.name: hull_gap([point[x.cache_key] for x in fes], point[e.cache_key])
                                           for e in es} for fam, fes in fams.items()}}
        union = [point[e.cache_key] for es in fams.values() for e in es]
        without = [point[e.cache_key] for fam, es in fams.items() if fam != "negative_minp" for e in es]
        hv_all, hv_without = hull_hypervolume(union, refs["common"]), hull_hypervolume(without, refs["common"])
        fronts.append({"name": f.name, "title": f.title, "x": f.x, "x_subset": f.x_subset, "y": f.y,
                       "y_subset": f.y_subset, "reference": list(refs["common"]), "reference_wide": list(refs["wide"]),
                       "families": families, "learned": learned,
                       "negative_minp": None if "negative_minp" not in fams else
                       {"hv_all_families": hv_all, "hv_without": hv_without, "extends": hv_all > hv_without + 1e-12}})
    return fronts


def _paired(a, b, metric: str, mask: np.ndarray, n_resamples: int, seed: int) -> dict:
    x = np.asarray(a.per_prompt[metric], dtype=np.float64)[mask]
    y = np.asarray(b.per_prompt[metric], dtype=np.float64)[mask]
    mean, low, high = paired_bootstrap_ci(x, y, n_resamples=n_resamples, seed=seed)
    return {"mean": mean, "low": low, "high": high, "verdict": "better" if low > 0 else "worse" if high < 0 else
            "no difference"}


def goals(results: dict, main: list, fams: dict, fronts: list[dict], n_resamples: int, seed: int) -> dict:
    """Per learned run: the lowest-λ accuracy goal, the highest-λ diversity-at-better-quality goal, and the
    verdicts of the main and the answerable front against each family (see the module doc)."""
    runs = learned_runs(main)
    fixed = [e for e in fams.get("fixed", [])]
    if not runs or not fixed:
        return {}
    answerable = _answerable(results, next(iter(runs.values()))[0].cache_key)
    verdict_fronts = [f for f in fronts if f["name"] in VERDICT_FRONTS]
    out = {}
    for run, es in runs.items():
        low, high = es[0], es[-1]
        goal: dict = {"label": _run_label(es), "lowest_lambda": low.diversity, "highest_lambda": high.diversity}
        if answerable.any():
            best = max(fixed, key=lambda e: results[e.cache_key].stats["accuracy"]["mean"] or -1.0)
            acc = _paired(results[low.cache_key], results[best.cache_key], "accuracy", answerable, n_resamples, seed)
            goal["accuracy_at_lowest_lambda"] = {"vs": best.name, **acc, "met": acc["mean"] >= 0 and acc["verdict"] != "worse"}
        t1 = next((e for e in fixed if _fixed_t(e) == 1.0), None)
        if t1 is not None and (~answerable).any():
            diffs = {m: _paired(results[high.cache_key], results[t1.cache_key], m, ~answerable, n_resamples, seed)
                     for m in ("semantic_distance", "logprob", "coherence")}
            met = (diffs["semantic_distance"]["verdict"] == "better" and diffs["logprob"]["verdict"] == "better"
                   and diffs["coherence"]["verdict"] != "worse")
            goal["diversity_at_highest_lambda"] = {"vs": t1.name, **diffs, "met": met}
        for front in verdict_fronts:
            if run in front["learned"]:
                vs = front["learned"][run]["vs"]
                goal[f"{front['name']}_front"] = {fam: v["verdict"] for fam, v in vs.items()}
                goal[f"beats_every_family_on_{front['name']}_front"] = all(v["verdict"] == "outside" for v in vs.values())
        out[run] = goal
    return out


def category_tables(results: dict, main: list, fams: dict) -> dict:
    """``{entry name: {category: {metric: mean}}}`` for the compared policies and the fixed-T and table
    family points: where each spends its heat and what it gets for it."""
    entries = list(main) + [e for fam in ("fixed", "table", "table@train") for e in fams.get(fam, [])]
    out = {}
    for e in entries:
        r = results[e.cache_key]
        cats = np.array([eps[0]["category"] for eps in r.groups])
        out[e.name] = {}
        for c in OrderedDict.fromkeys(cats.tolist()):
            row = {}
            for m in CATEGORY_METRICS:
                v = np.asarray(r.per_prompt[m], dtype=np.float64)[cats == c]
                v = v[np.isfinite(v)]
                row[m] = float(v.mean()) if v.size else None
            out[e.name][c] = row
    return out
