"""Quality-diversity fronts: Pareto fronts, hypervolumes, and where the learned point sits.

Each baseline family is swept over its main parameter into a front; its hypervolume against a
reference point is the bar (a user can mix two settings at random, so the front's piecewise-linear
hull is reachable). The learned policy is one point (its front comes from sweeping λ).
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["AXIS_LABELS", "FRONT_AXES", "FRONT_AXES_DOC", "compute_fronts", "dominates", "front_gap",
           "hypervolume_2d", "pareto_front"]

# (x = quality metric, y = diversity metric, reference point (x_ref, y_ref)). The first is the main front.
FRONT_AXES: list[tuple[str, str, tuple[float, float]]] = [
    ("logprob", "semantic_distance", (-10.0, 0.0)),
    ("coherence", "distinct2_across", (0.0, 0.0)),
]
"""Fronts and their hypervolume reference points.

Main front: x = exact mean base log-prob per token (nats), y = semantic distance across the K samples.
Log-prob is the quality axis because it is exact, per token, and is the quantity temperature trades
directly against diversity (coherence is a single noisy cosine on short completions and barely moves
with T). Semantic distance is the diversity axis because it measures differences in meaning, not
in tokenisation. Reference point (-10 nats/token, 0): -10 is the reward's ``logprob_clip`` (text
averaging below e^-10 per token is noise), 0 is K identical samples. The second front (coherence vs
distinct-2 across samples, reference (0, 0): unrelated to the prompt, no distinct bigram) checks that
the conclusion does not hinge on the choice of axes.
"""

FRONT_AXES_DOC = (
    "x = exact mean base-model log-prob per token (quality: how likely the base model finds the text; it is exact "
    "and moves directly with temperature, whereas coherence is one noisy cosine per short completion), y = mean "
    "pairwise semantic distance of the K samples (diversity of meaning, not of tokenisation). Reference point "
    "(-10 nats/token, 0): -10 is the reward's logprob clip, 0 means identical samples. The second panel "
    "(coherence vs distinct-2 across samples, reference (0, 0)) checks that the picture does not hinge on the axes."
)

AXIS_LABELS = {
    "logprob": "quality: mean base-model log-prob per token (nats, T = 1)",
    "coherence": "quality: coherence to the prompt (cosine, MiniLM)",
    "semantic_distance": "diversity: semantic distance across K samples (1 - cos)",
    "distinct2_across": "diversity: distinct-2 across K samples (fraction)",
}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (both coordinates maximised), by x descending.

    ``q`` dominates ``p`` when ``q >= p`` in both coordinates and ``q != p``; of duplicates one is kept.
    """
    pts = [(float(x), float(y)) for x, y in points]
    order = sorted(range(len(pts)), key=lambda i: (-pts[i][0], -pts[i][1], i))
    front: list[int] = []
    best_y = -math.inf
    for i in order:
        if pts[i][1] > best_y:
            front.append(i)
            best_y = pts[i][1]
    return front


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` (both coordinates maximised) and dominating ``reference``.

    The union of the rectangles ``[ref_x, x] x [ref_y, y]``; points not strictly better than the
    reference in both coordinates add nothing. Example: ``{(1, 3), (2, 2), (3, 1)}`` against
    ``(0, 0)`` gives 3 + 2 + 1 = 6.
    """
    rx, ry = float(reference[0]), float(reference[1])
    pts = [(float(x), float(y)) for x, y in points if x > rx and y > ry]
    if any(not (math.isfinite(x) and math.isfinite(y)) for x, y in pts):
        raise ValueError("hypervolume_2d needs finite coordinates")
    area, best_y = 0.0, ry
    for x, y in sorted(pts, key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            area += (x - rx) * (y - best_y)
            best_y = y
    return area


def front_gap(points: Sequence[tuple[float, float]], p: tuple[float, float]) -> float | None:
    """``p``'s y minus the height of the Pareto front of ``points`` at ``p``'s x (both maximised).

    The front is the piecewise-linear curve through its points (what a mix of two neighbouring
    settings reaches); positive = ``p`` is above it (more y at equal x). None when ``p``'s x lies
    outside the front's x range (no interpolation there). Example: front ``{(0, 1), (1, 0)}``,
    ``p = (0.5, 0.6)`` -> 0.6 - 0.5 = +0.1.
    """
    pts = sorted((float(points[i][0]), float(points[i][1])) for i in pareto_front(points))  # x up, y down
    x, y = float(p[0]), float(p[1])
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y - (y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return y - pts[0][1]  # a one-point front at exactly p's x


def dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
    """``q`` is at least as good as ``p`` in both coordinates and better in one (maximisation)."""
    return q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1])


def _point(result, xm: str, ym: str) -> tuple[float, float]:
    return result.stats[xm]["mean"], result.stats[ym]["mean"]


def _learned_info(result, sweeps: dict, results: dict, xm: str, ym: str, refpt) -> dict:
    """Where one learned point sits: what dominates it, its hypervolume and its gap to each family's front."""
    p = _point(result, xm, ym)
    dominated_by = [s.name for entries in sweeps.values() for s in entries
                    if dominates(_point(results[s.cache_key], xm, ym), p)]
    gaps = {family: front_gap([_point(results[s.cache_key], xm, ym) for s in entries], p)
            for family, entries in sweeps.items()}
    y_stat = result.stats[ym]
    return {"x": p[0], "y": p[1], "dominated_by": dominated_by, "hypervolume": hypervolume_2d([p], refpt),
            "front_gap": gaps, "y_half_width": 0.5 * (y_stat["high"] - y_stat["low"])}


def compute_fronts(results: dict, main: list, sweeps: dict, grids: dict) -> list[dict]:
    """One entry per :data:`FRONT_AXES` pair: each swept family's front and hypervolume, and each learned
    policy's position (``results`` maps a cache key to its :class:`~kelvin.evaluation.statistics.PolicyResult`)."""
    fronts = []
    for xm, ym, refpt in FRONT_AXES:
        families = {}
        for family, entries in sweeps.items():
            pts = [_point(results[e.cache_key], xm, ym) for e in entries]
            families[family] = {"param": grids[family][0], "points": [e.name for e in entries],
                                "front": [entries[i].name for i in pareto_front(pts)],
                                "hypervolume": hypervolume_2d(pts, refpt)}
        learned = {e.name: _learned_info(results[e.cache_key], sweeps, results, xm, ym, refpt)
                   for e in main if e.family == "learned"}
        fronts.append({"x": xm, "y": ym, "reference": list(refpt), "families": families, "learned": learned})
    return fronts
