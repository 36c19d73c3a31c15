"""The three figures of a report: quality-diversity fronts, temperature traces, temperature histograms.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot: no global backend or figure
registry touched) and written as PNGs; the learned policy is drawn in red, baselines in tab10 without red.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np

from kelvin.evaluation.fronts import AXIS_LABELS

__all__ = ["LEARNED_COLOR", "plot_fronts", "plot_histograms", "plot_trajectories"]

LEARNED_COLOR = "crimson"


def _palette() -> list:
    """tab10 without its red, which is reserved for the learned policy."""
    import matplotlib

    return [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 3]


def _ci_errors(stats: list[dict]) -> list[list[float]]:
    """Matplotlib's asymmetric error bars (lower, upper) from ``{mean, low, high}`` stats."""
    return [[s["mean"] - s["low"] for s in stats], [s["high"] - s["mean"] for s in stats]]


def _draw_family(ax, family: str, entries: list, results: dict, front: dict, color) -> list[tuple]:
    """One swept family: its line (fixed T: T > 0 solid, T < 0 dashed), faint CIs, value labels.
    Returns the drawn points as (x, y, label, colour)."""
    xm, ym = front["x"], front["y"]
    xs_stats = [results[e.cache_key].stats[xm] for e in entries]
    ys_stats = [results[e.cache_key].stats[ym] for e in entries]
    xs, ys = [s["mean"] for s in xs_stats], [s["mean"] for s in ys_stats]
    info = front["families"][family]
    label = f"{entries[0].label.split('(')[0]} sweep over {info['param']} (HV {info['hypervolume']:.3g})"
    if family == "fixed":  # T < 0 and T > 0 are two regimes: a dashed and a solid line, not one zigzag
        pos = [i for i, e in enumerate(entries) if e.params.get("t", 0) >= 0]
        neg = [i for i, e in enumerate(entries) if e.params.get("t", 0) < 0]
        ax.plot([xs[i] for i in pos], [ys[i] for i in pos], "-o", color=color, ms=5, lw=1.5,
                label=label + ", T > 0 solid, T < 0 dashed")
        ax.plot([xs[i] for i in neg], [ys[i] for i in neg], "--o", color=color, ms=5, lw=1.2)
    else:
        ax.plot(xs, ys, "-o", color=color, ms=5, lw=1.5, label=label)
    ax.errorbar(xs, ys, xerr=_ci_errors(xs_stats), yerr=_ci_errors(ys_stats), fmt="none", ecolor=color, alpha=0.25, lw=1)
    spots: OrderedDict[tuple, list[str]] = OrderedDict()  # points at the same place share one label
    for x, y, e in zip(xs, ys, entries):
        spots.setdefault((round(x, 2), round(y, 2)), []).append(e.name.split("=", 1)[-1])
    drawn = []
    for (x, y), values in spots.items():
        ax.annotate(", ".join(values), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        drawn.append((x, y, f"{info['param']}={', '.join(values)}", color))
    return drawn


def _draw_main(ax, main: list, results: dict, swept: set, xm: str, ym: str) -> list[tuple]:
    """The compared policies: the learned one as a red star with its CIs, other unswept ones as diamonds."""
    drawn = []
    for e in main:
        x, y = results[e.cache_key].stats[xm], results[e.cache_key].stats[ym]
        if e.family == "learned":
            ax.errorbar([x["mean"]], [y["mean"]], xerr=_ci_errors([x]), yerr=_ci_errors([y]), fmt="*", ms=18,
                        color=LEARNED_COLOR, mec="black", mew=0.8, ecolor=LEARNED_COLOR, elinewidth=1.2, capsize=3,
                        zorder=5, label=f"{e.label} (95% CI)")
            drawn.append((x["mean"], y["mean"], e.label, LEARNED_COLOR))
        elif e.cache_key not in swept:
            ax.plot([x["mean"]], [y["mean"]], "D", ms=7, mfc="none", mew=1.5, color="dimgray", zorder=4)
            ax.annotate(e.label, (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, -10), fontsize=7,
                        color="dimgray")
            drawn.append((x["mean"], y["mean"], e.label, "dimgray"))
    return drawn


def _pin_far_points(ax, drawn: list[tuple], ref_x: float) -> None:
    """Points behind the reference x add nothing to the hypervolume; when they would squeeze the rest into a
    corner, the axis starts just before the reference and they are drawn as arrows on its left edge."""
    xs_all = [x for x, _, _, _ in drawn]
    inside = [x for x in xs_all if x >= ref_x]
    if not inside or min(xs_all) >= ref_x:
        return
    span = max(inside) - min(min(inside), ref_x)
    left = min(min(inside), ref_x) - 0.08 * max(span, 1e-6)
    if min(xs_all) >= left:
        return
    ax.set_xlim(left, max(inside) + 0.08 * max(span, 1e-6))
    for x, y, label, color in drawn:
        if x < left:
            ax.plot([left], [y], "<", ms=8, color=color, clip_on=False, zorder=6)
            ax.annotate(f"{label} at x={x:.1f}", (left, y), textcoords="offset points", xytext=(8, -3), fontsize=7,
                        color=color)


def plot_fronts(path: Path, results: dict, main: list, sweeps: dict, fronts: list[dict], subtitle: str):
    """One panel per front: every swept family, the compared policies, the hypervolume reference."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.2 * len(fronts), 6.2))
    axes = fig.subplots(1, len(fronts), squeeze=False)
    colors = _palette()
    family_color = {f: colors[i % len(colors)] for i, f in enumerate(sweeps)}
    swept = {e.cache_key for entries in sweeps.values() for e in entries}
    for ax, front in zip(axes[0], fronts):
        xm, ym, ref = front["x"], front["y"], front["reference"]
        drawn = []
        for family, entries in sweeps.items():
            drawn += _draw_family(ax, family, entries, results, front, family_color[family])
        drawn += _draw_main(ax, main, results, swept, xm, ym)
        _pin_far_points(ax, drawn, ref[0])
        ax.axvline(ref[0], color="gray", lw=0.8, ls=":")
        ax.set_xlabel(AXIS_LABELS.get(xm, xm) + "  → better")
        ax.set_ylabel(AXIS_LABELS.get(ym, ym) + "  → more diverse")
        ax.set_title(f"{xm} vs {ym}\nHV reference point ({ref[0]:g}, {ref[1]:g})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="best", framealpha=0.85)
    fig.suptitle(f"Quality-diversity fronts: baseline families swept over their main parameter\n{subtitle}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def _line_style(c: int, e, colors: list) -> dict:
    if e.family == "learned":
        return dict(lw=2.6, color=LEARNED_COLOR, zorder=5)
    return dict(lw=1.4, color=colors[c % len(colors)])


def _mean_trace(result, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and the mean temperature at each, over every sample still running there."""
    sums, counts = np.zeros(max_new_tokens), np.zeros(max_new_tokens)
    for eps in result.groups:
        for ep in eps:
            t = np.asarray(ep["temperatures"])
            sums[: len(t)] += t
            counts[: len(t)] += 1
    ok = counts > 0
    return np.flatnonzero(ok), sums[ok] / counts[ok]


def plot_trajectories(path: Path, results: dict, main: list, max_new_tokens: int, subtitle: str,
                      n_prompts: int = 3):
    """Temperature over token position: the first sample of the first prompts, and the mean over all."""
    from matplotlib.figure import Figure

    first = results[main[0].cache_key]
    shown = min(n_prompts, len(first.groups))
    n_cols = 2 if shown + 1 > 2 else shown + 1
    n_rows = math.ceil((shown + 1) / n_cols)
    fig = Figure(figsize=(6.4 * n_cols, 3.9 * n_rows + 1.0))
    axes = list(fig.subplots(n_rows, n_cols, squeeze=False).flat)
    for ax in axes[shown + 1:]:
        ax.set_visible(False)
    colors = _palette()
    for j, ax in enumerate(axes[:shown]):
        for c, e in enumerate(main):
            t = np.asarray(results[e.cache_key].groups[j][0]["temperatures"])
            ax.plot(np.arange(len(t)), t, marker=".", ms=4, label=e.label, **_line_style(c, e, colors))
        ax.set_title(f"prompt {first.groups[j][0]['prompt_id']} (sample 1 of K)", fontsize=10)
        ax.set_ylabel("temperature T")
    mean_ax = axes[shown]
    for c, e in enumerate(main):
        mean_ax.plot(*_mean_trace(results[e.cache_key], max_new_tokens), label=e.label, **_line_style(c, e, colors))
    mean_ax.set_title("mean over all prompts and samples (completions still running)", fontsize=10)
    mean_ax.set_ylabel("mean temperature T")
    for ax in axes[: shown + 1]:
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("token position")
        ax.grid(alpha=0.3)
    handles, labels = mean_ax.get_legend_handles_labels()
    n_leg_rows = math.ceil(len(labels) / 3)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=9, frameon=False)
    fig.suptitle(f"Temperature over token position, same prompts and seeds for every policy\n{subtitle}", fontsize=11)
    fig.tight_layout(rect=(0, 0.035 * n_leg_rows * 2 / n_rows + 0.01, 1, 1))
    fig.savefig(path, dpi=120)
    return fig


def plot_histograms(path: Path, results: dict, main: list, t_range: tuple[float, float], subtitle: str):
    """The distribution of the temperatures each policy used (every token), one row per policy."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 1.25 * len(main) + 1.6))
    axes = fig.subplots(len(main), 1, sharex=True, squeeze=False)
    colors = _palette()
    bins = np.linspace(t_range[0], t_range[1], 81)
    for i, e in enumerate(main):
        ax = axes[i][0]
        temps = np.concatenate([np.asarray(ep["temperatures"]) for eps in results[e.cache_key].groups for ep in eps])
        weights = np.full(temps.shape, 1.0 / max(len(temps), 1))
        color = LEARNED_COLOR if e.family == "learned" else colors[i % len(colors)]
        ax.hist(np.clip(temps, t_range[0], t_range[1]), bins=bins, weights=weights, color=color, alpha=0.85)
        ax.axvline(0, color="black", lw=0.6)
        ax.set_ylabel("share of\ntokens", fontsize=8)
        ax.text(0.01, 0.82, f"{e.label}   mean {temps.mean():.2f}, std {temps.std():.2f}, "
                f"T<0: {100 * (temps < 0).mean():.0f}%", transform=ax.transAxes, fontsize=8)
        ax.set_ylim(0, 1.05 if ax.get_ylim()[1] > 0.5 else ax.get_ylim()[1] * 1.35)
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel(f"temperature T (env range [{t_range[0]:g}, {t_range[1]:g}], 80 bins)")
    fig.suptitle(f"Temperatures used per policy (all tokens)\n{subtitle}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
