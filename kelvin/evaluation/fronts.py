"""Quality-diversity fronts, convex hulls and hypervolumes: does a learned front leave a family's hull?

**A family's bar is its convex hull.** A user can mix two settings of a family at random (per request),
so every point inside the convex hull of its points, and everything it dominates, is reachable without
Kelvin. :func:`hull_front` is the upper-right boundary of that region; :func:`hull_hypervolume` its
area above a reference point. The learned policy's points (one per diversity setting λ) get the same
treatment: a user can mix λ values too.

**The comparison** (per front, per learned run, per family): ``HV(learned hull) - HV(family hull)``
with a 95% percentile bootstrap over prompts, paired (every point of every policy is recomputed on
the same resampled prompts); when the x and y metrics live on different prompt sets (the main front:
accuracy on answerable prompts, diversity on open ones) each set is resampled separately. "Beats the
family" means the interval is above zero.

**Fronts** (:data:`FRONTS`): the main one, where one temperature cannot serve both axes, is accuracy on
the answerable prompts (x) against semantic distance across the K samples of the open prompts (y); the
answerable front puts pass@1 (accuracy) against pass@K (any of the K samples right: what a best-of-K or
majority-vote user gets from diverse samples); the open-prompt fronts put a quality of the open completions (coherence, base log-prob) against their
diversity (semantic distance, distinct-2 across K): beating a hull there needs a per-token schedule,
not only a per-task one.

**Reference point** (:func:`reference_point`): y = 0 (K identical samples) and x = the fixed-T family's
x at T = 1.0, the hottest setting in common use (the lowest x of its points with T <= 1 when T = 1.0 was
not swept). Settings whose quality is worse than plain sampling at T = 1 add nothing to any hull: the
comparison is made on the region people use, not on the garbage a very hot setting produces. The same
comparison against the widest box (x = the lowest x of any point) is reported beside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["FRONTS", "FRONT_BY_NAME", "Front", "compare_hulls", "dominates", "hull_front", "hull_gap",
           "hull_hypervolume", "hypervolume_2d", "pareto_front", "reference_point"]


@dataclass(frozen=True)
class Front:
    """One quality-diversity plane: metric and prompt subset of each axis."""

    name: str
    x: str
    x_subset: str  # "answerable", "open" or "all"
    y: str
    y_subset: str
    title: str
    heading: str = ""  # the report's short name of a verdict front; "" = "<Name> front"

    @property
    def label(self) -> str:
        return self.heading or f"{self.name.capitalize()} front"


FRONTS: list[Front] = [
    Front("main", "accuracy", "answerable", "semantic_distance", "open",
          "accuracy on answerable prompts vs semantic distance across samples of open prompts"),
    Front("answerable", "accuracy", "answerable", "pass_at_k", "answerable",
          "answerable prompts: pass@1 (accuracy) vs pass@K (any of the K samples correct)",
          "Answerable front (pass@1 x pass@K)"),
    Front("open", "coherence", "open", "semantic_distance", "open",
          "open prompts: coherence vs semantic distance across samples"),
    Front("open_logprob", "logprob", "open", "semantic_distance", "open",
          "open prompts: base log-prob per token vs semantic distance across samples"),
    Front("open_ngram", "coherence", "open", "distinct2_across", "open",
          "open prompts: coherence vs distinct-2 across samples"),
]

FRONT_BY_NAME = {f.name: f for f in FRONTS}
VERDICT_FRONTS = ("main", "answerable")
"""The fronts whose hull verdicts the goals, the report and the CLI give per run (``<name>_front``)."""

AXIS_LABELS = {
    "accuracy": "accuracy on answerable prompts",
    "pass_at_k": "pass@K on answerable prompts",
    "logprob": "base-model log-prob per token (nats)",
    "coherence": "coherence to the prompt (cosine)",
    "semantic_distance": "semantic distance across K samples (1 - cos)",
    "distinct2_across": "distinct-2 across K samples",
}


# --------------------------------------------------------------------------- 2-D geometry
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


def dominates(q: tuple[float, float], p: tuple[float, float]) -> bool:
    """``q`` is at least as good as ``p`` in both coordinates and better in one (maximisation)."""
    return q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1])


def hypervolume_2d(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by ``points`` themselves (no mixing: a staircase) above ``reference``.

    Example: ``{(1, 3), (2, 2), (3, 1)}`` against ``(0, 0)`` gives 3 + 2 + 1 = 6.
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


def hull_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Vertices of the upper-right boundary of the convex hull of ``points`` (both coordinates maximised),
    x ascending and y descending: what mixing settings at random reaches. Dominated and non-finite points
    drop out. Example: ``{(0, 1), (0.5, 0.4), (1, 0)}`` -> ``[(0, 1), (1, 0)]`` ((0.5, 0.4) lies under the
    chord)."""
    pts = sorted({(float(x), float(y)) for x, y in points if math.isfinite(x) and math.isfinite(y)},
                 key=lambda p: (p[0], -p[1]))
    pareto: list[tuple[float, float]] = []
    for x, y in reversed(pts):  # x descending: a point stays when it beats every point to its right in y
        if not pareto or y > pareto[-1][1]:
            pareto.append((x, y))
    hull: list[tuple[float, float]] = []
    for p in reversed(pareto):  # x ascending; keep the upper (concave) chain
        while len(hull) >= 2:
            (ax, ay), (bx, by) = hull[-2], hull[-1]
            if (bx - ax) * (p[1] - ay) - (by - ay) * (p[0] - ax) >= 0:  # b on or under the chord a-p
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _clipped_area(x0: float, y0: float, x1: float, y1: float, rx: float, ry: float) -> float:
    """Area between a segment (x0, y0)-(x1, y1), x0 < x1, and the line y = ry, right of x = rx, above ry."""
    if x1 <= rx:
        return 0.0
    if x0 < rx:
        y0 = y0 + (y1 - y0) * (rx - x0) / (x1 - x0)
        x0 = rx
    h0, h1 = y0 - ry, y1 - ry
    if h0 <= 0 and h1 <= 0:
        return 0.0
    if h0 >= 0 and h1 >= 0:
        return 0.5 * (h0 + h1) * (x1 - x0)
    xc = x0 + (x1 - x0) * h0 / (h0 - h1)  # where the segment crosses y = ry
    return 0.5 * h0 * (xc - x0) if h0 > 0 else 0.5 * h1 * (x1 - xc)


def hull_hypervolume(points: Sequence[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by the convex hull of ``points`` (with everything it dominates) above ``reference``.

    Example: ``{(0.2, 0.9), (0.6, 0.7), (0.9, 0.2)}`` against ``(0, 0)``: 0.2 * 0.9 + 0.4 * 0.8 + 0.3 * 0.45
    = 0.635; a point inside the hull changes nothing.
    """
    rx, ry = float(reference[0]), float(reference[1])
    hull = hull_front(points)
    if not hull:
        return 0.0
    segments = [((rx, hull[0][1]), hull[0])] + list(zip(hull, hull[1:]))  # the flat part left of the first vertex
    return sum(_clipped_area(a[0], a[1], b[0], b[1], rx, ry) for a, b in segments if b[0] > a[0])


def hull_gap(points: Sequence[tuple[float, float]], p: tuple[float, float]) -> float | None:
    """``p``'s y minus the hull boundary of ``points`` at ``p``'s x: positive = outside the hull, beyond
    any mix of those settings; None right of the hull (no setting of the family reaches that x)."""
    hull = hull_front(points)
    x, y = float(p[0]), float(p[1])
    if not hull or x > hull[-1][0]:
        return None
    if x <= hull[0][0]:
        return y - hull[0][1]
    for (x0, y0), (x1, y1) in zip(hull, hull[1:]):
        if x0 <= x <= x1:
            return y - (y0 + (y1 - y0) * (x - x0) / (x1 - x0))
    return None


# --------------------------------------------------------------------------- per-prompt coordinates
def reference_point(fixed_points: dict[float, tuple[float, float]], all_x: Sequence[float]) -> tuple[float, float]:
    """The reference point of a front (module doc): y = 0 and x = the fixed family's x at T = 1.0 (the lowest
    x of its points with T <= 1 without one; the lowest x of any point without a fixed family)."""
    if 1.0 in fixed_points:
        return float(fixed_points[1.0][0]), 0.0
    common = [xy[0] for t, xy in fixed_points.items() if 0 <= t <= 1.0]
    return float(min(common) if common else min(all_x)), 0.0


def subset_mask(answerable: np.ndarray, subset: str) -> np.ndarray:
    """(P,) bool of the prompts an axis is measured on."""
    if subset == "answerable":
        return answerable.copy()
    if subset == "open":
        return ~answerable
    return np.ones_like(answerable)


def compare_hulls(xs: dict[str, np.ndarray], ys: dict[str, np.ndarray], groups: dict[str, list[str]],
                  pairs: list[tuple[str, str]], reference: tuple[float, float], same_prompts: bool,
                  n_resamples: int, seed: int) -> dict[tuple[str, str], dict]:
    """``HV(hull of groups[a]) - HV(hull of groups[b])`` for each pair ``(a, b)``, with a paired bootstrap.

    ``xs[e]`` / ``ys[e]``: one value per prompt of point ``e`` on the x / y axis's prompts (every point on
    the same prompts, in the same order); ``groups``: name -> its points. With ``same_prompts`` one
    resample serves both axes, else each axis's prompts are resampled on their own. Returns per pair
    ``{diff, low, high}`` (95% percentile interval of the difference).
    """
    names = sorted({e for g in groups.values() for e in g})
    X = np.stack([xs[e] for e in names])  # (N, Px)
    Y = np.stack([ys[e] for e in names])  # (N, Py)
    rng = np.random.default_rng(seed)
    ix = rng.integers(0, X.shape[1], size=(n_resamples, X.shape[1]))  # (R, Px)
    iy = ix if same_prompts else rng.integers(0, Y.shape[1], size=(n_resamples, Y.shape[1]))
    bx = X[:, ix].mean(axis=2)  # (N, R)
    by = Y[:, iy].mean(axis=2)
    row = {e: i for i, e in enumerate(names)}
    mx, my = X.mean(axis=1), Y.mean(axis=1)

    def hv(group: list[str], cx: np.ndarray, cy: np.ndarray) -> float:
        return hull_hypervolume([(cx[row[e]], cy[row[e]]) for e in group], reference)

    out = {}
    for a, b in pairs:
        point = hv(groups[a], mx, my) - hv(groups[b], mx, my)
        draws = np.array([hv(groups[a], bx[:, r], by[:, r]) - hv(groups[b], bx[:, r], by[:, r])
                          for r in range(n_resamples)])
        low, high = np.percentile(draws, [2.5, 97.5])
        out[(a, b)] = {"diff": float(point), "low": float(low), "high": float(high)}
    return out
