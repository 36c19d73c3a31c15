"""The written outputs of an evaluation: ``report.md``, ``metrics.csv``, ``samples.jsonl``, TensorBoard.

``report.md`` is assembled from one function per section (setup, verdict, headline table, rewards by
category, paired differences, metric groups, fronts, traces, samples, definitions), each returning
its Markdown lines.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from kelvin.evaluation.fronts import FRONT_AXES_DOC
from kelvin.evaluation.metrics import HEADLINE, METRIC_BY_NAME, METRICS

__all__ = ["write_csv", "write_report", "write_samples", "write_tensorboard"]

_ARROWS = {"better": "✅ better", "worse": "❌ worse", "no difference": "≈ n.s.", "higher": "↑ higher", "lower": "↓ lower"}


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    ax = abs(x)
    if ax != 0 and (ax >= 1e4 or ax < 10 ** -digits):
        return f"{x:.2e}"
    return f"{x:.{digits}f}"


def _fmt_ci(stat: dict, digits: int = 3) -> str:
    if stat.get("low") is None:
        return _fmt(stat["mean"], digits)
    return f"{_fmt(stat['mean'], digits)} [{_fmt(stat['low'], digits)}, {_fmt(stat['high'], digits)}]"


def _fmt_diff(d: dict) -> str:
    return f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ").replace("\r", " ")


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "policy"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _metric_table(metrics: list[str], main: list, results: dict) -> str:
    header = ["policy"] + [f"{m}" + (f" ({METRIC_BY_NAME[m].unit})" if METRIC_BY_NAME[m].unit else "") for m in metrics]
    rows = [[e.label] + [_fmt_ci(results[e.cache_key].stats[m]) for m in metrics] for e in main]
    return _table(header, rows)


# --------------------------------------------------------------------------- sections
def _setup_section(setup: dict, reference, warnings: list[str]) -> list[str]:
    mapping = setup["action_mapping"]
    lines = [f"# Kelvin evaluation: {reference.label} vs baselines\n", f"Command: `{setup['command']}`\n",
             _table(["setting", "value"], [
                 ["model", f"`{setup['model']}` on {setup['device']}"],
                 ["prompts", f"{setup['n_prompts']} ({setup['prompt_source']}, split `{setup['split']}`)"],
                 ["samples per prompt (K)", str(setup["samples"])],
                 ["max new tokens", str(setup["max_new_tokens"])],
                 ["seed", f"{setup['seed']} (same prompt schedule and random stream for every policy)"],
                 ["action mapping", f"{mapping['kind']} in [{mapping['t_min']:g}, {mapping['t_max']:g}]"],
                 ["truncation", ", ".join(f"{k}={v}" for k, v in setup["truncation"].items())],
                 ["intervals", f"95% percentile bootstrap over prompts ({setup['n_resamples']} resamples); "
                               "K samples of a prompt are aggregated first"],
                 ["wall time", f"{setup['wall_s']:.0f} s"],
             ]), ""]
    if warnings:
        lines += ["**Warnings**\n", *[f"- {w}" for w in warnings], ""]
    return lines


def _baseline_verdict(who: str, e, d: dict) -> str:
    r = d["reward"]
    if r["verdict"] == "better":
        head = f"**{who.capitalize()} beats {e.label}** on the composite reward"
    elif r["verdict"] == "worse":
        head = f"**{who.capitalize()} is worse than {e.label}** on the composite reward"
    else:
        head = f"**{who.capitalize()} does not beat {e.label}**: no significant difference in composite reward"
    parts = [f"{m} {_fmt_diff(d[m])} {d[m]['verdict']}"
             for m in ("logprob", "coherence", "semantic_distance", "distinct2_across", "anomaly_rate")]
    return f"- {head} ({_fmt_diff(r)}). " + "; ".join(parts) + "."


def _front_verdict(front: dict) -> list[str]:
    """Where each learned point sits on the main front: dominated by whom, and its gap to each family's front."""
    lines = []
    for info in front["learned"].values():
        dom = info["dominated_by"]
        plane = f"the {front['x']} / {front['y']} plane"
        lines.append(f"- On {plane} the learned point is dominated (in means) by: {', '.join(dom)}." if dom else
                     f"- On {plane} no swept baseline dominates the learned point (in means).")
        gaps = {f: g for f, g in (info.get("front_gap") or {}).items() if g is not None}
        if not gaps:
            continue
        half = info["y_half_width"]
        said = "; ".join(f"{g:+.3f} vs the {f} front" for f, g in gaps.items())
        if all(g > half for g in gaps.values()):
            verdict = "above every family's front by more than its own 95% half-width: a trade-off no swept baseline reaches"
        elif all(g < -half for g in gaps.values()):
            verdict = ("below every family's front by more than its own 95% half-width: some setting of each baseline "
                       "gives more diversity at the same quality")
        else:
            verdict = ("on the baselines' fronts within its own 95% half-width: its composite-reward gain comes from the "
                       "operating point it picks on the trade-off, not from a trade-off the baselines cannot reach")
        lines.append(f"- At the learned point's {front['x']} ({info['x']:.3f}), its {front['y']} ({info['y']:.3f}, "
                     f"95% half-width {half:.3f}) is {said} (piecewise-linear fronts): {verdict}.")
    return lines


def _verdict_section(main: list, reference, paired: dict, fronts: list[dict]) -> list[str]:
    ref_is_learned = reference.family == "learned"
    who = "the learned policy" if ref_is_learned else f"the reference policy {reference.label}"
    lines = ["## Verdict\n",
             f"Paired differences `{reference.label} - baseline` over the same prompts. \"Better\" means the 95% "
             "interval of the difference excludes zero in the metric's good direction; otherwise the data do not "
             "separate the two policies.\n"]
    others = [e for e in main if e is not reference]
    counts = {v: sum(paired[e.name]["reward"]["verdict"] == v for e in others) for v in ("better", "no difference", "worse")}
    if others:
        lines.append(f"On the composite reward {who} is better than {counts['better']} of {len(others)} baselines, "
                     f"indistinguishable from {counts['no difference']} and worse than {counts['worse']}.\n")
    lines += [_baseline_verdict(who, e, paired[e.name]) for e in others]
    if ref_is_learned and fronts and fronts[0]["learned"]:
        lines += _front_verdict(fronts[0])
    return lines + [""]


def _category_section(main: list, results: dict) -> list[str]:
    groups = results[main[0].cache_key].groups
    cats = list(OrderedDict.fromkeys(eps[0]["category"] for eps in groups))
    if len(cats) < 2:
        return []
    rows = []
    for e in main:
        r = results[e.cache_key]
        by_cat: dict[str, list[float]] = {c: [] for c in cats}
        for eps, value in zip(r.groups, r.per_prompt["reward"]):
            by_cat[eps[0]["category"]].append(value)
        rows.append([e.label] + [_fmt(float(np.mean(by_cat[c]))) for c in cats])
    sizes = {c: sum(eps[0]["category"] == c for eps in groups) for c in cats}
    return ["## Composite reward by category (mean over the category's prompts; no interval)\n",
            _table(["policy"] + [f"{c} (n={sizes[c]})" for c in cats], rows), ""]


def _paired_section(main: list, reference, paired: dict) -> list[str]:
    metrics = [m for m in HEADLINE if m not in ("perplexity", "tokens_per_s")]
    rows = [[e.label] + [f"{_fmt_diff(paired[e.name][m])} {_ARROWS[paired[e.name][m]['verdict']]}" for m in metrics]
            for e in main if e is not reference]
    return [f"## Paired differences vs {reference.label}\n", *([_table(["baseline"] + metrics, rows)] if rows else []), ""]


def _tables_section(main: list, results: dict) -> list[str]:
    lines = ["## Headline metrics (mean [95% CI])\n", _metric_table(HEADLINE, main, results),
             "\nPerplexity is exp(-logprob), its interval exp(-interval of logprob). tokens/s is one timing per "
             "run on this machine (no interval); runs share the CPU/GPU with nothing else only if the machine "
             "was idle.\n"]
    return lines


def _groups_section(main: list, results: dict) -> list[str]:
    lines = []
    for group, title in (("reward", "Reward components (per episode, as the env pays them; mean [95% CI])"),
                         ("quality", "Quality"), ("diversity", "Diversity"), ("temperature", "Temperature")):
        lines += [f"## {title}\n", _metric_table([m.name for m in METRICS if m.group == group], main, results), ""]
    return lines


def _fronts_section(fronts: list[dict]) -> list[str]:
    if not fronts:
        return ["## Quality-diversity fronts\n", "Sweeps were switched off (--no-sweep).\n"]
    lines = ["## Quality-diversity fronts\n", "![fronts](fronts.png)\n",
             "Each baseline family is swept over its main parameter (line, points labelled with the value; faint "
             "bars are 95% CIs); the learned policy is the red star. Hypervolume (HV) is the area a family's Pareto "
             "front dominates above the reference point; larger is better. Axes: " + FRONT_AXES_DOC + "\n"]
    for f in fronts:
        rows = [[fam, info["param"], ", ".join(info["front"]), f"{info['hypervolume']:.4g}"]
                for fam, info in f["families"].items()]
        rows += [[f"**{name}** (single point)", "-", "-", f"{info['hypervolume']:.4g}"]
                 for name, info in f["learned"].items()]
        lines += [f"**{f['x']} (x) vs {f['y']} (y)**, reference point ({f['reference'][0]:g}, {f['reference'][1]:g})\n",
                  _table(["family", "swept", "Pareto-optimal points", "hypervolume"], rows), ""]
    return lines


def _samples_section(main: list, results: dict, prompt_texts: dict, n_shown: int) -> list[str]:
    lines = ["## Sample completions (same prompt, same seed, sample 1 of K)\n"]
    first = results[main[0].cache_key]
    for j in range(min(n_shown, len(first.groups))):
        ep0 = first.groups[j][0]
        lines.append(f"**{ep0['prompt_id']}** ({ep0['category']}): {_md_escape(prompt_texts.get(ep0['prompt_id'], ''))}\n")
        rows = []
        for e in main:
            ep = results[e.cache_key].groups[j][0]
            trace = " ".join(f"{t:.2f}" for t in np.asarray(ep["temperatures"])[:48])
            rows.append([e.label, _md_escape(ep["completion"][:400]), f"{ep['episode']['r']:.2f}",
                         f"{float(np.mean(ep['logprobs'])):.2f}", f"`{trace}`"])
        lines += [_table(["policy", "completion", "reward", "logprob", "temperatures (per token)"], rows), ""]
    return lines


def _definitions_section() -> list[str]:
    rows = [[m.name, m.group, {1: "higher better", -1: "lower better", 0: "descriptive"}[m.direction], m.doc]
            for m in METRICS]
    return ["## Metric definitions\n", _table(["metric", "group", "direction", "definition"], rows), ""]


def write_report(path: Path, data: dict, main: list, results: dict, reference, paired: dict, fronts: list[dict],
                 warnings: list[str], n_samples_shown: int = 3) -> None:
    """``report.md``: every section in order."""
    setup = data["setup"]
    lines = [*_setup_section(setup, reference, warnings),
             *_verdict_section(main, reference, paired, fronts),
             *_tables_section(main, results),
             *_category_section(main, results),
             *_paired_section(main, reference, paired),
             *_groups_section(main, results),
             *_fronts_section(fronts),
             "## Temperature traces\n", "![trajectories](temperature_trajectories.png)\n",
             "![histogram](temperature_hist.png)\n",
             *_samples_section(main, results, setup["prompt_texts"], n_samples_shown),
             *_definitions_section()]
    path.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- data files
def write_csv(path: Path, data: dict) -> None:
    """``metrics.csv``: one row per (policy or sweep point or paired difference, metric)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "policy", "label", "metric", "mean", "low", "high", "reference", "verdict"])
        blocks = [("policy", n, b) for n, b in data["policies"].items()]
        blocks += [("sweep", n, b) for sw in data["sweep"].values() for n, b in sw["points"].items()]
        for kind, name, block in blocks:
            for m, s in block["metrics"].items():
                w.writerow([kind, name, block["label"], m, s["mean"], s["low"], s["high"], "", ""])
        ref = data["paired_differences"]["reference"]
        for name, diffs in data["paired_differences"]["baselines"].items():
            label = data["policies"][name]["label"]
            for m, s in diffs.items():
                w.writerow(["paired_difference", name, label, m, s["mean"], s["low"], s["high"], ref, s["verdict"]])


def write_samples(path: Path, main: list, results: dict) -> None:
    """``samples.jsonl``: every completion of the compared policies with its temperature trace."""
    with open(path, "w") as fh:
        for e in main:
            for eps in results[e.cache_key].groups:
                for j, ep in enumerate(eps):
                    fh.write(json.dumps({
                        "policy": e.name, "prompt_id": ep["prompt_id"], "category": ep["category"], "sample": j,
                        "completion": ep["completion"], "reward": ep["episode"]["r"], "length": ep["episode"]["l"],
                        "temperatures": [round(float(t), 4) for t in ep["temperatures"]],
                        "logprobs": [round(float(t), 4) for t in ep["logprobs"]],
                    }) + "\n")


def _scalars(data: dict) -> list[tuple[str, float]]:
    """Every TensorBoard scalar of an evaluation: ``(tag, value)``."""
    out = [(f"{m}/{_slug(name)}", s["mean"]) for name, block in data["policies"].items()
           for m, s in block["metrics"].items()]  # intervals: metrics.json / report
    out += [(f"paired_difference/{m}/{_slug(name)}", s["mean"])
            for name, diffs in data["paired_differences"]["baselines"].items() for m, s in diffs.items()]
    out += [(f"sweep/{m}/{_slug(name)}", block["metrics"][m]["mean"]) for sw in data["sweep"].values()
            for name, block in sw["points"].items()
            for m in ("reward", "logprob", "semantic_distance", "distinct2_across", "coherence")]
    for f in data["fronts"]:
        plane = f"hypervolume/{f['x']}_vs_{f['y']}"
        out += [(f"{plane}/{fam}", info["hypervolume"]) for fam, info in f["families"].items()]
        out += [(f"{plane}/{_slug(name)}", info["hypervolume"]) for name, info in f["learned"].items()]
    return out


def write_tensorboard(path: Path, data: dict, report: str, figures: dict) -> None:
    """``tb/``: means, paired differences, hypervolumes, the report text and the written PNGs."""
    import matplotlib.image
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(path))
    try:
        for tag, value in _scalars(data):
            writer.add_scalar(tag, value, 0)
        writer.add_text("report", report, 0)
        for tag, png in figures.items():  # the written PNGs, not a second rendering
            image = matplotlib.image.imread(str(png))  # (H, W, 4) float in [0, 1]
            writer.add_image(f"plots/{tag}", image[..., :3], 0, dataformats="HWC")
    finally:
        writer.close()
