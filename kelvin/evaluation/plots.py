"""The three figures of a report: quality-diversity fronts and hulls, temperature traces, temperature histograms.

Figures are built with ``matplotlib.figure.Figure`` (no pyplot: no global backend or figure
registry touched) and written as PNGs; the learned policy is drawn in red, baselines in tab10 without red.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from kelvin.evaluation.fronts import AXIS_LABELS

__all__ = ["LEARNED_COLOR", "plot_histograms", "plot_hulls", "plot_trajectories", "plot_validation_history"]

LEARNED_COLOR = "crimson"


def _palette() -> list:
    """tab10 without its red, which is reserved for the learned policy."""
    import matplotlib

    return [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 3]


_LEARNED_COLORS = ["crimson", "darkred", "orangered", "deeppink", "firebrick", "salmon"]


def _family_styles(names: list[str]) -> dict:
    colors = _palette()
    return {f: colors[i % len(colors)] for i, f in enumerate(names)}


def plot_hulls(path: Path, fronts: list[dict], subtitle: str):
    """One panel per front: every family's points and convex hull (dashed), every learned run's points
    (labelled with λ) and hull (bold), the reference point's box (grey lines)."""
    from matplotlib.figure import Figure

    n = len(fronts)
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(7.4 * cols, 6.0 * rows))
    axes = list(fig.subplots(rows, cols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    styles = _family_styles(sorted({f for fr in fronts for f in fr["families"]}))
    for ax, front in zip(axes, fronts):
        for fam, info in front["families"].items():
            color = styles[fam]
            xs, ys = [p["x"] for p in info["points"]], [p["y"] for p in info["points"]]
            ax.plot(xs, ys, "o", ms=4, color=color, alpha=0.8)
            hull = np.asarray(info["hull"])
            if len(hull):
                ax.plot(hull[:, 0], hull[:, 1], "--", lw=1.2, color=color,
                        label=f"{fam} (hull HV {info['hv_common']:.3g})")
        for i, (run, info) in enumerate(front["learned"].items()):
            color = _LEARNED_COLORS[i % len(_LEARNED_COLORS)]
            xs, ys = [p["x"] for p in info["points"]], [p["y"] for p in info["points"]]
            ax.plot(xs, ys, "*", ms=13, color=color, mec="black", mew=0.6, zorder=6)
            for p in info["points"]:
                if p["lambda"] is not None:
                    ax.annotate(f"λ={p['lambda']:g}", (p["x"], p["y"]), textcoords="offset points", xytext=(5, 4),
                                fontsize=7, color=color)
            hull = np.asarray(info["hull"])
            ax.plot(hull[:, 0], hull[:, 1], "-", lw=2.4, color=color, zorder=5,
                    label=f"{info['label']} (hull HV {info['hv_common']:.3g})")
        rx, ry = front["reference"]
        ax.axvline(rx, color="gray", lw=0.8, ls=":")
        ax.axhline(ry, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(AXIS_LABELS.get(front["x"], front["x"]) + f" [{front['x_subset']} prompts]  → better")
        ax.set_ylabel(AXIS_LABELS.get(front["y"], front["y"]) + f" [{front['y_subset']}]  → more diverse")
        ax.set_title(f"{front['name']}: {front['title']}\nhypervolume above ({rx:.3g}, {ry:g}) (dotted)", fontsize=9.5)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best", framealpha=0.85)
    fig.suptitle(f"Learned fronts (one point per diversity setting λ) against each family's convex hull\n{subtitle}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def _line_style(c: int, e, colors: list) -> dict:
    if e.family == "learned":
        return dict(lw=2.6, color=LEARNED_COLOR, zorder=5)
    return dict(lw=1.4, color=colors[c % len(colors)])


def mean_temperature_by_position(episodes, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and the mean temperature at each, over every episode still running there (``episodes``: dicts
    with ``temperatures``; scripts/position_temperatures.py reads a learned policy against its base with it)."""
    sums, counts = np.zeros(max_new_tokens), np.zeros(max_new_tokens)
    for ep in episodes:
        t = np.asarray(ep["temperatures"], dtype=np.float64)[:max_new_tokens]
        sums[: len(t)] += t
        counts[: len(t)] += 1
    ok = counts > 0
    return np.flatnonzero(ok), sums[ok] / counts[ok]


def _mean_trace(result, max_new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    return mean_temperature_by_position((ep for eps in result.groups for ep in eps), max_new_tokens)


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


def plot_validation_history(path: Path, histories: dict[str, list[dict]], subtitle: str = "") -> Path:
    """Training's validation margins against the PPO update, one line per run with its paired 95% band: against
    the best fixed temperature (left) and against the run's own tuned base (right). ``histories``: run name ->
    ``validation.json``'s ``history``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, key, title in zip(axes, ("margin_vs_best_fixed", "margin_vs_base"),
                              ("learned − best fixed T", "learned − its tuned base")):
        for i, (name, history) in enumerate(histories.items()):
            points = [(h["updates"], h[key]) for h in history if h.get(key)]
            if not points:
                continue
            x = np.asarray([u for u, _ in points], dtype=float)
            mean = np.asarray([m["mean"] for _, m in points])
            low, high = np.asarray([m["low"] for _, m in points]), np.asarray([m["high"] for _, m in points])
            color = _LEARNED_COLORS[i % len(_LEARNED_COLORS)] if len(histories) > 1 else LEARNED_COLOR
            ax.plot(x, mean, marker="o", color=color, label=name)
            ax.fill_between(x, low, high, color=color, alpha=0.15)
        ax.axhline(0.0, color="grey", lw=1)
        ax.set_title(title)
        ax.set_xlabel("PPO updates")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation reward margin (paired 95% CI)")
    axes[0].legend(fontsize=8)
    if subtitle:
        fig.suptitle(subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return Path(path)
