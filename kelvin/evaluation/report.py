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
from pathlib import Path

import numpy as np

from kelvin.evaluation.fronts import FRONT_BY_NAME, VERDICT_FRONTS
from kelvin.evaluation.metrics import HEADLINE, METRIC_BY_NAME, METRICS
from kelvin.atomic import write_text_atomic

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


def _fmt_iv(d: dict, digits: int = 3) -> str:
    return f"{d['diff']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}]"


_HULL_WORDS = {"outside": "✅ outside the hull", "inside": "❌ inside the hull", "no difference": "≈ on the hull"}


def _goal_lines(goal: dict) -> list[str]:
    lines = [f"**{goal['label']}**\n"]
    for name in VERDICT_FRONTS:
        title = FRONT_BY_NAME[name].label
        verdicts = goal.get(f"{name}_front")
        if verdicts is None:
            continue
        beat = [f for f, v in verdicts.items() if v == "outside"]
        lost = [f for f, v in verdicts.items() if v == "inside"]
        tied = [f for f, v in verdicts.items() if v == "no difference"]
        head = (f"beats every family on the {name} front" if goal[f"beats_every_family_on_{name}_front"] else
                f"beats {len(beat)} of {len(verdicts)} families on the {name} front")
        lines.append(f"- {title} (HV of its hull minus each family's, 95% CI excluding 0): **{head}**"
                     + (f"; outside the hull of {', '.join(beat)}" if beat else "")
                     + (f"; no difference from {', '.join(tied)}" if tied else "")
                     + (f"; inside the hull of {', '.join(lost)}" if lost else "") + ".")
    acc = goal.get("accuracy_at_lowest_lambda")
    if acc:
        lines.append(f"- At its lowest λ ({goal['lowest_lambda']:g}) accuracy minus the best fixed T's ({acc['vs']}): "
                     f"{acc['mean']:+.3f} [{acc['low']:+.3f}, {acc['high']:+.3f}] ({acc['verdict']}): goal "
                     f"{'met' if acc['met'] else 'NOT met'}.")
    div = goal.get("diversity_at_highest_lambda")
    if div:
        parts = "; ".join(f"{m} {div[m]['mean']:+.3f} [{div[m]['low']:+.3f}, {div[m]['high']:+.3f}] ({div[m]['verdict']})"
                          for m in ("semantic_distance", "logprob", "coherence"))
        lines.append(f"- At its highest λ ({goal['highest_lambda']:g}) on open prompts, minus {div['vs']}: {parts}: "
                     f"more diverse at better quality: {'met' if div['met'] else 'NOT met'}.")
    return lines + [""]


def _verdict_section(data: dict) -> list[str]:
    lines = ["## Verdict\n"]
    if data.get("interrupted"):
        lines.append("**Interrupted:** this report covers the runs finished before Ctrl-C (`--resume` continues).\n")
    goals = data.get("goals") or {}
    if not goals:
        lines.append("No learned policy with families to compare: see the tables below.\n")
        return lines
    lines.append("A family's bar is its convex hull (mixing two of its settings at random is free); a learned front "
                 "beats it when the hypervolume of the learned hull minus the family's has a 95% paired bootstrap "
                 "interval above 0. Fronts and reference points: see below.\n")
    for goal in goals.values():
        lines += _goal_lines(goal)
    return lines


def _headline_section(data: dict) -> list[str]:
    """The objective itself at each λ: learned reward minus each rival's at that λ (kelvin/evaluation/headline.py)."""
    rows = data.get("headline") or []
    if not rows:
        return []
    from kelvin.evaluation.headline import RIVAL_FAMILIES

    lines = ["## Headline: the reward at each λ\n",
             "The held-out reward (the return the policy was trained on, quality + λ · diversity) of each learned "
             "run at each λ minus each rival's at the same λ, paired over the test prompts (95% bootstrap). Rivals: "
             + "; ".join(f"`{k}` = {v}" for k, v in RIVAL_FAMILIES.items()) + ".\n"]
    table = [[r["learned"], f"{r['lambda']:g}", _md_escape(r["rival_label"]), _fmt(r["learned_reward"]),
              _fmt(r["rival_reward"]), _fmt_diff(r), r["verdict"]] for r in rows]
    lines.append(_table(["learned", "λ", "rival", "learned reward", "rival reward", "learned − rival", "verdict"],
                        table))
    for d in data.get("dial") or []:
        pts = ", ".join(f"λ={p['lambda']:g}: accuracy {_fmt(p['accuracy'])}, semantic distance (open) "
                        f"{_fmt(p['semantic_distance_open'])}" for p in d["points"])
        lines.append(f"\n- The dial of {d['run']}: {pts}. Accuracy at the lowest λ >= at the highest: "
                     f"{d['accuracy_falls_with_lambda']}; diversity rises with λ: {d['diversity_rises_with_lambda']}.")
    return lines + [""]


def _fronts_section(data: dict) -> list[str]:
    fronts = data.get("fronts") or []
    if not fronts:
        return []
    lines = ["## Fronts and hulls\n", "![fronts](fronts.png)\n",
             "Each family is swept over its setting (points) and its convex hull drawn dashed; each learned run is "
             "drawn at every diversity setting λ (stars) with its hull. The reference point is y = 0 and x = the "
             "fixed-T family's x at T = 1.0, the hottest setting in common use (`common`); `wide` repeats the "
             "comparison with x at the lowest x of any point.\n"]
    for f in fronts:
        rx, ry = f["reference"]
        lines.append(f"### {f['name']}: {f['title']}\n")
        lines.append(f"x = {f['x']} on {f['x_subset']} prompts, y = {f['y']} on {f['y_subset']} prompts; reference "
                     f"({rx:.4g}, {ry:g}) (wide: {f['reference_wide'][0]:.4g}).\n")
        runs = list(f["learned"].items())
        header = ["family", "hull HV"] + [f"{info['label']}: ΔHV [95% CI]" for _, info in runs] + \
                 [f"{info['label']}: ΔHV wide" for _, info in runs]
        rows = [["**learned hull**", " / ".join(f"{info['hv_common']:.4g}" for _, info in runs)]
                + ["" for _ in runs] * 2]
        for fam, info in f["families"].items():
            rows.append([fam, f"{info['hv_common']:.4g}"]
                        + [f"{_fmt_iv(r['vs'][fam], 4)} {_HULL_WORDS[r['vs'][fam]['verdict']]}" for _, r in runs]
                        + [f"{r['vs'][fam]['diff_wide']:+.4f} [{r['vs'][fam]['low_wide']:+.4f}, "
                           f"{r['vs'][fam]['high_wide']:+.4f}]" for _, r in runs])
        lines += [_table(header, rows), ""]
        for run, info in runs:
            pts = ", ".join(f"λ={p['lambda']:g}: ({p['x']:.3f}, {p['y']:.3f})" if p["lambda"] is not None else
                            f"({p['x']:.3f}, {p['y']:.3f})" for p in info["points"])
            lines.append(f"- {info['label']} points: {pts}.")
        neg = f.get("negative_minp")
        if neg is not None:
            lines.append(f"- Negative T inside min-p 0.1 {'extends' if neg['extends'] else 'does not extend'} the union "
                         f"of the families' hulls (HV {neg['hv_all_families']:.4g} with it, {neg['hv_without']:.4g} "
                         "without).")
        lines.append("")
    return lines


def _tables_tuned_section(data: dict) -> list[str]:
    tables = data.get("tables") or {}
    if not tables:
        return []
    lines = ["## Per-category tables (tuned on the validation split for each λ)\n"]
    for fam, by_lambda in tables.items():
        cats = list(next(iter(by_lambda.values())))
        rows = [[f"λ={diversity}"] + [f"{t[c]:g}" for c in cats] for diversity, t in by_lambda.items()]
        lines += [f"**{fam}**\n", _table(["λ"] + cats, rows), ""]
    return lines


def _category_section(data: dict, main: list) -> list[str]:
    cats_data = data.get("categories") or {}
    if not cats_data:
        return []
    names = [e.name for e in main] + [n for n in cats_data if n not in {e.name for e in main}]
    categories = list(dict.fromkeys(c for n in names for c in cats_data[n]))
    lines = ["## By category (means over the category's prompts; no interval)\n"]
    for metric in ("accuracy", "semantic_distance", "coherence", "temperature_mean", "negative_fraction"):
        cols = [c for c in categories if any(cats_data[n].get(c, {}).get(metric) is not None for n in names)]
        if not cols:
            continue
        rows = [[n] + [_fmt(cats_data[n].get(c, {}).get(metric)) for c in cols] for n in names]
        lines += [f"**{metric}**\n", _table(["policy"] + cols, rows), ""]
    return lines


def _families_section(data: dict) -> list[str]:
    fams = data.get("families") or {}
    if not fams:
        return []
    metrics = ["accuracy", "semantic_distance", "coherence", "logprob", "distinct2_across", "temperature_mean"]
    lines = ["## Family points (mean [95% CI] over all prompts of the split; accuracy over the answerable ones)\n"]
    for fam, info in fams.items():
        rows = [[name.split(":", 1)[1]] + [_fmt_ci(block["metrics"][m]) if block["metrics"][m]["mean"] is not None
                                           else "-" for m in metrics] for name, block in info["points"].items()]
        lines += [f"**{fam}**: {info['title']}\n", _table(["setting"] + metrics, rows), ""]
    return lines


def _paired_section(main: list, reference, paired: dict) -> list[str]:
    if not paired:
        return []
    metrics = [m for m in HEADLINE if m not in ("perplexity", "tokens_per_s", "reward")]
    labels = {e.name: e.label for e in main}
    rows = [[labels[name]] + [f"{_fmt_diff(d[m])} {_ARROWS[d[m]['verdict']]}" if m in d else "-" for m in metrics]
            for name, d in paired.items()]
    return [f"## Paired differences vs {reference.label}\n", _table(["baseline"] + metrics, rows), ""]


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


def write_report(path: Path, data: dict, main: list, results: dict, reference, paired: dict, warnings: list[str],
                 n_samples_shown: int = 3) -> None:
    """``report.md``: every section in order."""
    setup = data["setup"]
    lines = [*_setup_section(setup, reference, warnings),
             *_verdict_section(data),
             *_headline_section(data),
             *_fronts_section(data),
             *_tables_section(main, results),
             *_category_section(data, main),
             *_paired_section(main, reference, paired),
             *_tables_tuned_section(data),
             *_families_section(data),
             *_groups_section(main, results),
             "## Temperature traces\n", "![trajectories](temperature_trajectories.png)\n",
             "![histogram](temperature_hist.png)\n",
             *_samples_section(main, results, setup["prompt_texts"], n_samples_shown),
             *_definitions_section()]
    write_text_atomic(path, "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- data files
def write_csv(path: Path, data: dict) -> None:
    """``metrics.csv``: one row per (policy or family point or paired difference, metric)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "policy", "label", "metric", "mean", "low", "high", "reference", "verdict"])
        blocks = [("policy", n, b) for n, b in data["policies"].items()]
        blocks += [("family", n, b) for fam in data["families"].values() for n, b in fam["points"].items()]
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
    out += [(f"family/{m}/{_slug(name)}", block["metrics"][m]["mean"]) for fam in data["families"].values()
            for name, block in fam["points"].items()
            for m in ("accuracy", "logprob", "semantic_distance", "distinct2_across", "coherence")]
    for f in data["fronts"]:
        out += [(f"hull_hypervolume/{f['name']}/{fam}", info["hv_common"]) for fam, info in f["families"].items()]
        out += [(f"hull_hypervolume/{f['name']}/{_slug(info['label'])}", info["hv_common"])
                for info in f["learned"].values()]
        out += [(f"hull_difference/{f['name']}/{_slug(info['label'])}/{fam}", v["diff"])
                for info in f["learned"].values() for fam, v in info["vs"].items()]
    return [(tag, value) for tag, value in out if value is not None]


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
