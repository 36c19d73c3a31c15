"""Evaluation: a learned temperature policy against PID, EDT, fixed and other baselines.

``evaluate(config, out_dir, policies=[...])`` runs every policy through the **same** environment
code, on the **same** prompts, with the **same** seed (:func:`kelvin.rollout.collect_episodes`: row
``r`` of every policy sees the same prompt schedule and the same random stream), drawing ``K``
samples per prompt (the env's ``group_size``: the ``K`` rows of a group share their prompt). It
writes into ``out_dir``:

| file                             | what                                                                    |
|----------------------------------|-------------------------------------------------------------------------|
| ``report.md``                    | setup, verdicts, tables with 95% CIs, paired differences, plots, samples |
| ``metrics.json``                 | every policy (and sweep point): metric -> ``{mean, low, high}``; paired differences; fronts and hypervolumes |
| ``metrics.csv``                  | the same numbers, one row per (policy, metric)                          |
| ``samples.jsonl``                | every completion of the compared policies with its temperature trace    |
| ``fronts.png``                   | quality-diversity fronts of the baseline families, the learned policy a star |
| ``temperature_trajectories.png`` | temperature over token position, every policy on the same prompts       |
| ``temperature_hist.png``         | distribution of the temperatures each policy used                       |
| ``tb/events.*``                  | TensorBoard: ``<metric>/<policy>`` means, paired differences, hypervolumes, the report and plots |

Statistics. Every metric is first reduced to **one value per prompt** (the mean over the prompt's
``K`` samples, or a set statistic over them such as Self-BLEU), then a percentile bootstrap over
prompts (:func:`envs.text_metrics.bootstrap_ci`, 2000 resamples) gives the 95% interval. Paired
differences (``learned - baseline``, :func:`envs.text_metrics.paired_bootstrap_ci`) resample the
prompts jointly, so "better" means the interval of the difference excludes zero in the metric's
good direction. ``tokens_per_s`` is one timing per run and has no interval (``low = high = null``).
"""

from __future__ import annotations

import csv
import json
import math
import pickle
import platform
import re
import shlex
import sys
import time
import zipfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from envs.prompts import Prompt, load_prompts
from envs.rewards import EPISODE_COMPONENTS, STEP_COMPONENTS
from envs.text_metrics import (
    bootstrap_ci,
    distinct_n,
    distinct_n_corpus,
    mean_pairwise_distance_batched,
    paired_bootstrap_ci,
    repeated_ngram_rate,
    self_bleu,
)
from kelvin.config import ConfigError, KelvinConfig, load_config
from policies.features import FEATURE_SPEC_VERSION, FeatureSpec
from policies.registry import BASELINE_NAMES, make_policy

__all__ = [
    "EvaluationError",
    "METRICS",
    "SWEEP_GRIDS",
    "FRONT_AXES",
    "evaluate",
    "group_by_prompt",
    "hypervolume_2d",
    "main",
    "parse_policy_specs",
    "parse_sweep_grid",
    "front_gap",
    "pareto_front",
    "prompt_metrics",
    "select_prompts",
]


class EvaluationError(ValueError):
    """Evaluation input that cannot be used; the message names the input and what to do."""


# --------------------------------------------------------------------------- metric table


@dataclass(frozen=True)
class Metric:
    """One reported metric: how it is named, grouped, read and which direction is good."""

    name: str
    group: str  # reward | quality | diversity | temperature | speed
    unit: str
    direction: int  # +1 higher is better, -1 lower is better, 0 neither (descriptive)
    doc: str
    ci: bool = True  # False: one value per run, no interval over prompts


_COMPONENT_DOCS = {
    "logprob": "sum over tokens of clip(ln p_base, -clip, 0) / clip",
    "repetition": "-(number of tokens closing a repeated n-gram)",
    "anomaly": "-(number of anomalous tokens)",
    "entropy": "sum over tokens of min(H(tempered), cap) / cap",
    "coherence": "cosine(prompt, completion), MiniLM",
    "text_anomaly": "-(text anomaly score of the completion)",
    "distinct": "distinct-2 of the completion's tokens",
    "novelty": "1 - max cosine to earlier samples of the same prompt",
}

METRICS: list[Metric] = [
    Metric("reward", "reward", "return", +1, "composite reward: the episode return the policy was trained on"),
    *[Metric(f"reward/{c}", "reward", "per episode", +1, f"reward component as the env pays it ({_COMPONENT_DOCS[c]})")
      for c in STEP_COMPONENTS + EPISODE_COMPONENTS],
    Metric("logprob", "quality", "nats/token", +1,
           "exact mean base-model log-probability (T = 1, no clip) of the drawn tokens, EOS included"),
    Metric("perplexity", "quality", "", -1,
           "exp(-logprob): base-model perplexity of the completions; interval = exp(-interval of logprob)"),
    Metric("coherence", "quality", "cosine", +1, "cosine(prompt, completion) with all-MiniLM-L6-v2"),
    Metric("repetition_rate", "quality", "fraction", -1,
           "share of the completion's token n-grams (n = reward.repetition_n) already seen earlier in it"),
    Metric("anomaly_rate", "quality", "fraction", -1,
           "share of tokens the featurizer flags anomalous (token prior or base probability < e^-9.21)"),
    Metric("text_anomaly", "quality", "score", -1, "text anomaly score of the completion (anomaly/rules.py), 0 = clean"),
    Metric("length", "quality", "tokens", 0, "tokens drawn per completion (EOS included)"),
    Metric("eos_rate", "quality", "fraction", 0, "share of completions that ended with EOS before max_new_tokens"),
    Metric("distinct1", "diversity", "fraction", +1, "distinct-1 of each completion's tokens"),
    Metric("distinct2", "diversity", "fraction", +1, "distinct-2 of each completion's tokens"),
    Metric("distinct1_across", "diversity", "fraction", +1, "distinct-1 over the K samples of a prompt together"),
    Metric("distinct2_across", "diversity", "fraction", +1, "distinct-2 over the K samples of a prompt together"),
    Metric("self_bleu", "diversity", "BLEU", -1, "Self-BLEU (4-gram, token ids) across the K samples; 1 = identical"),
    Metric("semantic_distance", "diversity", "1 - cos", +1,
           "mean pairwise cosine distance of the K samples' MiniLM embeddings"),
    Metric("temperature_mean", "temperature", "T", 0, "mean temperature over the tokens of the K samples"),
    Metric("temperature_std", "temperature", "T", 0, "spread: std of the temperature over those tokens"),
    Metric("negative_fraction", "temperature", "fraction", 0, "share of tokens drawn at T < 0"),
    Metric("near_greedy_fraction", "temperature", "fraction", 0, "share of tokens drawn at |T| < 0.05"),
    Metric("tokens_per_s", "speed", "tokens/s", +1,
           "generated tokens per second of wall time (model, featurizer, policy, reward); one timing per run",
           ci=False),
]
METRIC_BY_NAME = {m.name: m for m in METRICS}

HEADLINE = ["reward", "logprob", "perplexity", "coherence", "distinct2_across", "self_bleu", "semantic_distance",
            "repetition_rate", "anomaly_rate", "temperature_mean", "tokens_per_s"]
"""Metrics in the report's first table and in the paired-difference table."""

# family -> (parameter swept, grid). Fixed T includes negatives (inverted distributions).
SWEEP_GRIDS: dict[str, tuple[str, list[float]]] = {
    "fixed": ("t", [-1.0, -0.5, -0.2, 0.2, 0.5, 0.7, 1.0, 1.3]),
    "edt": ("theta", [0.5, 1.5, 3.0, 6.0, 12.0]),
    "pid": ("target", [0.3, 0.5, 0.7, 0.9]),
    "dynatemp": ("delta", [0.0, 0.25, 0.5, 0.75, 1.0]),
}

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

AXIS_LABELS = {
    "logprob": "quality: mean base-model log-prob per token (nats, T = 1)",
    "coherence": "quality: coherence to the prompt (cosine, MiniLM)",
    "semantic_distance": "diversity: semantic distance across K samples (1 - cos)",
    "distinct2_across": "diversity: distinct-2 across K samples (fraction)",
}

NEAR_GREEDY = 0.05
LEARNED_COLOR = "crimson"


def _palette() -> list:
    """tab10 without its red, which is reserved for the learned policy."""
    import matplotlib

    return [c for i, c in enumerate(matplotlib.colormaps["tab10"].colors) if i != 3]


# --------------------------------------------------------------------------- small pure helpers


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


def parse_policy_specs(text: str | Sequence[str]) -> list[str]:
    """Split ``--policies`` on commas, keeping baseline parameters together.

    ``"learned:runs/a,pid,edt:theta=1.0,t0=0.8,fixed:0.7"`` -> ``["learned:runs/a", "pid",
    "edt:theta=1.0,t0=0.8", "fixed:0.7"]``: an item ``key=value`` with no ``:`` before its ``=``
    continues the previous spec.
    """
    items = [text] if isinstance(text, str) else list(text)
    specs: list[str] = []
    for chunk in items:
        for part in str(chunk).split(","):
            part = part.strip()
            if not part:
                continue
            head = part.split("=", 1)[0]
            if "=" in part and ":" not in head and specs and not specs[-1].startswith("learned"):
                specs[-1] = f"{specs[-1]},{part}"
            else:
                specs.append(part)
    if not specs:
        raise EvaluationError("--policies is empty; give e.g. --policies learned:runs/NAME,pid,edt,fixed:0.7 or all")
    return specs


def select_prompts(prompts: Sequence[Prompt], max_prompts: int | None) -> list[Prompt]:
    """The first ``max_prompts`` prompts taken round-robin over categories (file order within each)."""
    prompts = list(prompts)
    if max_prompts is None or max_prompts >= len(prompts):
        return prompts
    by_cat: OrderedDict[str, list[Prompt]] = OrderedDict()
    for p in prompts:
        by_cat.setdefault(p.category, []).append(p)
    out: list[Prompt] = []
    i = 0
    while len(out) < max_prompts:
        for items in by_cat.values():
            if i < len(items) and len(out) < max_prompts:
                out.append(items[i])
        i += 1
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "policy"


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


def _md_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ⏎ ").replace("\r", " ")


# --------------------------------------------------------------------------- policies


@dataclass
class PolicyEntry:
    """A policy to evaluate: its key in the outputs, display label, family and the policy object."""

    name: str
    label: str
    family: str
    policy: Any
    params: dict = field(default_factory=dict)
    run_dir: str | None = None

    @property
    def cache_key(self) -> str:
        if self.family == "learned":
            return f"learned:{self.run_dir}"
        return json.dumps({"name": self.family, "params": self.params}, sort_keys=True, default=str)


def _learned_paths(target: str) -> tuple[Path, Path, Path | None]:
    """(run dir, model zip, normaliser pickle or None) for a run directory or a checkpoint zip."""
    path = Path(target).expanduser()
    if not path.exists():
        raise EvaluationError(f"learned policy {target!r}: no such run directory or model file; give the --run-dir "
                              "of a train.py run (holding model.zip and config.yaml) or a checkpoint .zip")
    if path.is_dir():
        model = path / "model.zip"
        if not model.is_file():
            raise EvaluationError(f"learned policy {target!r}: {model} is missing; is this a finished Kelvin run "
                                  "directory? (checkpoints/step_N.zip can be given directly)")
        norm = path / "vecnormalize.pkl"
        return path, model, norm if norm.is_file() else None
    if path.suffix != ".zip":
        raise EvaluationError(f"learned policy {target!r}: expected a run directory or a .zip model file")
    m = re.fullmatch(r"step_(\d+)\.zip", path.name)
    norm = path.with_name(f"step_{m.group(1)}_vecnormalize.pkl") if m else path.with_name("vecnormalize.pkl")
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run_dir, path, norm if norm.is_file() else None


def _spec_differences(a: FeatureSpec, b: FeatureSpec) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: run {da.get(k)!r} vs evaluation {db.get(k)!r}" for k in sorted(set(da) | set(db))
            if k != "names" and da.get(k) != db.get(k)]


def load_learned_policy(target: str, config: KelvinConfig, warnings: list[str]):
    """A :class:`~policies.learned.LearnedPolicy` from a run, checked against the evaluation config.

    Errors (:class:`EvaluationError`) for a missing path, a run without ``config.yaml``, another LM,
    another feature-spec version or observation layout, another action mapping, an observation size
    the model does not take, or an unreadable model file. Reward or truncation differences only warn.
    """
    from policies.learned import LearnedPolicy

    run_dir, model_path, norm_path = _learned_paths(target)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise EvaluationError(f"learned policy {target!r}: {cfg_path} is missing, so the model, feature spec and "
                              "action mapping it was trained with are unknown; evaluate a run written by train.py")
    try:
        run_cfg = load_config(cfg_path)
    except ConfigError as exc:
        raise EvaluationError(f"learned policy {target!r}: its config cannot be read ({exc})") from exc
    if run_cfg.model.name != config.model.name:
        raise EvaluationError(
            f"learned policy {target!r} was trained with model {run_cfg.model.name!r} but this evaluation uses "
            f"{config.model.name!r}; its features describe another model's logits. Evaluate with the run's model "
            f"(--config {cfg_path} or --set model.name={run_cfg.model.name})")
    if (run_cfg.model.chat_template, run_cfg.model.system_prompt) != (config.model.chat_template,
                                                                      config.model.system_prompt):
        warnings.append(f"{target}: trained with chat_template={run_cfg.model.chat_template}, system_prompt="
                        f"{run_cfg.model.system_prompt!r}; evaluated with chat_template={config.model.chat_template}, "
                        f"system_prompt={config.model.system_prompt!r}")
    run_version = run_cfg.env.features.get("version", FEATURE_SPEC_VERSION)
    if run_version != FEATURE_SPEC_VERSION:
        raise EvaluationError(
            f"learned policy {target!r} was trained with feature spec version {run_version}, this Kelvin computes "
            f"version {FEATURE_SPEC_VERSION}; its observations would mean something else. Retrain the policy or "
            "evaluate it with the Kelvin release it was trained with")
    run_spec, spec = run_cfg.env.feature_spec(), config.env.feature_spec()
    diffs = _spec_differences(run_spec, spec)
    if diffs:
        raise EvaluationError(
            f"learned policy {target!r} was trained on other observations ({'; '.join(diffs)}). Evaluate with the "
            f"run's env settings (--config {cfg_path}; horizon comes from env.max_new_tokens, categories from "
            "env.include_category)")
    run_map, mapping = run_cfg.env.action_mapping_obj(), config.env.action_mapping_obj()
    if run_map != mapping:
        raise EvaluationError(
            f"learned policy {target!r} was trained with action mapping {asdict(run_map)} but this evaluation uses "
            f"{asdict(mapping)}; its actions would mean other temperatures. Use the run's env.action_mapping, "
            "env.t_min, env.t_max, env.min_abs_temperature and env.max_delta")
    if asdict(run_cfg.reward) != asdict(config.reward):
        warnings.append(f"{target}: the evaluation's reward block differs from the one it was trained with; the "
                        "composite reward is the evaluation's")
    if run_cfg.env.truncation != config.env.truncation:
        warnings.append(f"{target}: trained with truncation {run_cfg.env.truncation}, evaluated with "
                        f"{config.env.truncation}")
    try:
        from stable_baselines3 import PPO

        with zipfile.ZipFile(model_path) as zf:
            if zf.testzip() is not None:
                raise zipfile.BadZipFile("corrupt member")
        model = PPO.load(model_path, device="cpu")
        vec = None
        if norm_path is not None:
            with open(norm_path, "rb") as fh:
                vec = pickle.load(fh)  # what VecNormalize.load does, without wrapping an env
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as exc:
        raise EvaluationError(f"learned policy {target!r}: cannot load {model_path} ({type(exc).__name__}: {exc}); "
                              "retrain or pick another checkpoint") from exc
    shape = tuple(model.observation_space.shape)
    if shape != (spec.dim,):
        raise EvaluationError(
            f"learned policy {target!r} takes observations of shape {shape} but this feature spec has {spec.dim} "
            f"features ({', '.join(spec.names)}); it was trained with another observation layout")
    if norm_path is None:
        warnings.append(f"{target}: no VecNormalize statistics found next to {model_path.name}; using raw observations")
    name = run_dir.name if model_path.name == "model.zip" else f"{run_dir.name}/{model_path.stem}"
    return LearnedPolicy.from_sb3(model, vec, spec, mapping, label=f"learned ({name})"), str(run_dir)


def resolve_policies(specs: Sequence[str], config: KelvinConfig, run: str | None,
                     warnings: list[str]) -> list[PolicyEntry]:
    """Policy entries for ``--policies`` items (``all``, ``learned[:RUN]``, baseline specs, ``guarded:`` + any
    of those = that policy behind the samplers' default guard rails); unique names."""
    spec, mapping = config.env.feature_spec(), config.env.action_mapping_obj()
    expanded: list[str] = []
    for s in specs:
        if s.strip().lower() == "all":
            expanded += (["learned"] if run else []) + list(BASELINE_NAMES)
        else:
            expanded.append(s.strip())
    entries: list[PolicyEntry] = []
    for s in expanded:
        if s.startswith("guarded:"):  # any policy behind the samplers' default guard rails (policies/guard.py)
            from policies.guard import GuardedPolicy

            inner = resolve_policies([s[len("guarded:"):]], config, run, warnings)[0]
            policy = GuardedPolicy(inner.policy)
            entries.append(PolicyEntry(f"guarded:{inner.name}", policy.label, "guarded", policy,
                                       params={"inner": inner.name, **policy.params}, run_dir=inner.run_dir))
        elif s == "learned" or s.startswith("learned:"):
            target = s.partition(":")[2] or run
            if not target:
                raise EvaluationError("policy 'learned' needs a run: give --run runs/NAME or learned:runs/NAME")
            policy, run_dir = load_learned_policy(target, config, warnings)
            name = f"learned:{target}"
            entries.append(PolicyEntry(name, policy.label, "learned", policy, run_dir=run_dir))
        else:
            try:
                policy = make_policy(s, spec, mapping)
            except ValueError as exc:
                raise EvaluationError(f"--policies item {s!r}: {exc}") from exc
            entries.append(PolicyEntry(s, policy.label, policy.name, policy, params=policy.params))
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise EvaluationError(f"policy {e.name!r} is listed twice in --policies; list each policy once")
        seen.add(e.name)
    return entries


def sweep_entries(config: KelvinConfig, grids: dict[str, tuple[str, list[float]]]) -> dict[str, list[PolicyEntry]]:
    """One entry per grid point of every baseline family (``fixed:t=0.5``, ``edt:theta=3`` ...)."""
    spec, mapping = config.env.feature_spec(), config.env.action_mapping_obj()
    out: dict[str, list[PolicyEntry]] = {}
    for family, (param, values) in grids.items():
        items = []
        for v in values:
            name = f"{family}:{param}={v:g}"
            try:
                policy = make_policy(name, spec, mapping)
            except ValueError as exc:
                raise EvaluationError(f"sweep point {name!r}: {exc}") from exc
            items.append(PolicyEntry(name, policy.label, family, policy, params=policy.params))
        if items:
            out[family] = items
    return out


def parse_sweep_grid(items: Sequence[str] | None) -> dict[str, tuple[str, list[float]]]:
    """``--sweep-grid fixed=0.5,1.0`` / ``edt:theta=1,3`` / ``pid=`` (drop) over :data:`SWEEP_GRIDS`."""
    grids = {k: (p, list(v)) for k, (p, v) in SWEEP_GRIDS.items()}
    for item in items or []:
        key, eq, values = item.partition("=")
        if not eq:
            raise EvaluationError(f"--sweep-grid {item!r}: expected FAMILY=v1,v2,... (e.g. fixed=0.5,1.0) or FAMILY= "
                                  "to leave the family out")
        family, _, param = key.strip().partition(":")
        if family not in BASELINE_NAMES:
            import difflib

            close = difflib.get_close_matches(family, BASELINE_NAMES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise EvaluationError(f"--sweep-grid {item!r}: unknown family {family!r}.{hint}")
        param = param or (grids[family][0] if family in grids else "")
        if not param:
            raise EvaluationError(f"--sweep-grid {item!r}: name the parameter, e.g. {family}:PARAM=1,2")
        try:
            vals = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise EvaluationError(f"--sweep-grid {item!r}: values must be numbers separated by commas") from None
        if vals:
            grids[family] = (param, vals)
        else:
            grids.pop(family, None)
    return grids


# --------------------------------------------------------------------------- running and metrics


class _ProgressPolicy:
    """Forwards to a policy and ticks a progress bar once per env step (one loop: collect_episodes)."""

    def __init__(self, policy, bar):
        self.policy, self.bar, self.steps = policy, bar, 0

    def reset(self, batch_size=None):
        if hasattr(self.policy, "reset"):
            self.policy.reset(batch_size)

    def predict(self, observation, state=None, episode_start=None, deterministic=True):
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)
        return self.policy.predict(observation, state=state, episode_start=episode_start, deterministic=deterministic)


@dataclass
class PolicyResult:
    """Episodes of one policy grouped by prompt, per-prompt metric values and their intervals."""

    entry: PolicyEntry
    groups: list[list[dict]]  # (P, K) end-of-episode infos, prompt-major, sample k = row within the group
    per_prompt: dict[str, np.ndarray]  # metric -> (P,)
    stats: dict[str, dict]  # metric -> {mean, low, high}
    tokens_per_s: float
    wall_s: float


def group_by_prompt(episodes: list[dict], n_prompts: int, group_size: int, n_groups: int) -> list[list[dict]]:
    """Episodes of the prompt slots ``0 .. n_prompts - 1`` as (P, K) lists (slot = group + k * n_groups)."""
    groups: list[list[dict | None]] = [[None] * group_size for _ in range(n_prompts)]
    for e in episodes:
        g, j = divmod(e["row"], group_size)
        slot = g + e["k"] * n_groups
        if slot < n_prompts:
            groups[slot][j] = e
    for slot, eps in enumerate(groups):
        if any(e is None for e in eps):
            raise RuntimeError(f"prompt slot {slot} has {sum(e is not None for e in eps)} of {group_size} samples")
        if len({e["prompt_id"] for e in eps}) != 1:
            raise RuntimeError(f"the samples of prompt slot {slot} do not share a prompt")
    return groups  # type: ignore[return-value]


def prompt_metrics(groups: list[list[dict]], embedder, repetition_n: int) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` (except the run-level ones) as one value per prompt: (P,) each."""
    n = len(groups)
    per = {m.name: np.zeros(n) for m in METRICS if m.ci}
    texts = [e["completion"] for eps in groups for e in eps]
    k = len(groups[0]) if groups else 0
    if n:
        emb = embedder.encode(texts).reshape(n, k, -1)  # (P, K, D)
        per["semantic_distance"] = mean_pairwise_distance_batched(emb).cpu().numpy().astype(np.float64)
    for i, eps in enumerate(groups):
        ids = [list(e["token_ids"]) for e in eps]
        lengths = np.array([e["episode"]["l"] for e in eps], dtype=np.float64)
        comps = {c: np.array([e["reward_components"][c] for e in eps]) for c in STEP_COMPONENTS + EPISODE_COMPONENTS}
        temps = np.concatenate([np.asarray(e["temperatures"], dtype=np.float64) for e in eps])
        per["reward"][i] = np.mean([e["episode"]["r"] for e in eps])
        for c, v in comps.items():
            per[f"reward/{c}"][i] = v.mean()
        per["logprob"][i] = np.mean([np.mean(e["logprobs"]) for e in eps])
        per["coherence"][i] = comps["coherence"].mean()
        per["repetition_rate"][i] = np.mean([repeated_ngram_rate(t, repetition_n) for t in ids])
        per["anomaly_rate"][i] = np.mean(-comps["anomaly"] / np.maximum(lengths, 1))
        per["text_anomaly"][i] = np.mean(-comps["text_anomaly"])
        per["length"][i] = lengths.mean()
        per["eos_rate"][i] = np.mean([not e["TimeLimit.truncated"] for e in eps])
        per["distinct1"][i] = np.mean([distinct_n(t, 1) for t in ids])
        per["distinct2"][i] = np.mean([distinct_n(t, 2) for t in ids])
        per["distinct1_across"][i] = distinct_n_corpus(ids, 1)
        per["distinct2_across"][i] = distinct_n_corpus(ids, 2)
        per["self_bleu"][i] = self_bleu(ids, max_n=4)
        per["temperature_mean"][i] = temps.mean()
        per["temperature_std"][i] = temps.std()
        per["negative_fraction"][i] = (temps < 0).mean()
        per["near_greedy_fraction"][i] = (np.abs(temps) < NEAR_GREEDY).mean()
    per["perplexity"] = np.exp(-per["logprob"])  # per prompt, for reference; the interval is derived below
    return per


def summarize(per_prompt: dict[str, np.ndarray], tokens_per_s: float, n_resamples: int, seed: int) -> dict[str, dict]:
    """metric -> ``{mean, low, high}``: percentile bootstrap over prompts (perplexity: exp(-logprob CI))."""
    out: dict[str, dict] = {}
    for m in METRICS:
        if not m.ci:
            continue
        if m.name == "perplexity":
            lp = out["logprob"]
            out["perplexity"] = {"mean": math.exp(-lp["mean"]), "low": math.exp(-lp["high"]),
                                 "high": math.exp(-lp["low"])}
            continue
        mean, low, high = bootstrap_ci(per_prompt[m.name], n_resamples=n_resamples, seed=seed)
        out[m.name] = {"mean": mean, "low": low, "high": high}
    out["tokens_per_s"] = {"mean": float(tokens_per_s), "low": None, "high": None}
    return out


def _verdict(metric: Metric, low: float, high: float) -> str:
    if low > 0:
        return {1: "better", -1: "worse", 0: "higher"}[metric.direction]
    if high < 0:
        return {1: "worse", -1: "better", 0: "lower"}[metric.direction]
    return "no difference"


def paired_differences(reference: PolicyResult, other: PolicyResult, n_resamples: int, seed: int) -> dict[str, dict]:
    """``reference - other`` per metric over the same prompts: ``{mean, low, high, verdict}``.

    Verdicts read from the reference's side: ``better`` when the interval excludes 0 in the metric's
    good direction, ``worse`` when it excludes 0 in the other, ``higher``/``lower`` for descriptive
    metrics, else ``no difference``. Perplexity and tokens/s have none (use logprob; one timing).
    """
    out: dict[str, dict] = {}
    for m in METRICS:
        if not m.ci or m.name == "perplexity":
            continue
        mean, low, high = paired_bootstrap_ci(reference.per_prompt[m.name], other.per_prompt[m.name],
                                              n_resamples=n_resamples, seed=seed)
        out[m.name] = {"mean": mean, "low": low, "high": high, "verdict": _verdict(m, low, high)}
    return out


# --------------------------------------------------------------------------- plots


def _plot_fronts(path: Path, results: dict[str, PolicyResult], main: list[PolicyEntry],
                 sweeps: dict[str, list[PolicyEntry]], fronts: list[dict], subtitle: str):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched

    fig = Figure(figsize=(7.2 * len(fronts), 6.2))
    axes = fig.subplots(1, len(fronts), squeeze=False)
    colors = _palette()
    family_color = {f: colors[i % len(colors)] for i, f in enumerate(sweeps)}
    for ax, front in zip(axes[0], fronts):
        xm, ym, ref = front["x"], front["y"], front["reference"]
        offscale: list[tuple[float, float, str, object]] = []  # (x, y, label, colour) of every drawn point
        for family, entries in sweeps.items():
            pts = [(results[e.cache_key].stats[xm], results[e.cache_key].stats[ym], e) for e in entries]
            xs = [p[0]["mean"] for p in pts]
            ys = [p[1]["mean"] for p in pts]
            hv = front["families"][family]["hypervolume"]
            param = front["families"][family]["param"]
            label = f"{entries[0].label.split('(')[0]} sweep over {param} (HV {hv:.3g})"
            if family == "fixed":  # T < 0 and T > 0 are two regimes: a dashed and a solid line, not one zigzag
                neg = [i for i, e in enumerate(entries) if e.params.get("t", 0) < 0]
                pos = [i for i, e in enumerate(entries) if e.params.get("t", 0) >= 0]
                ax.plot([xs[i] for i in pos], [ys[i] for i in pos], "-o", color=family_color[family], ms=5, lw=1.5,
                        label=label + ", T > 0 solid, T < 0 dashed")
                ax.plot([xs[i] for i in neg], [ys[i] for i in neg], "--o", color=family_color[family], ms=5, lw=1.2)
            else:
                ax.plot(xs, ys, "-o", color=family_color[family], ms=5, lw=1.5, label=label)
            ax.errorbar(xs, ys, xerr=[[p[0]["mean"] - p[0]["low"] for p in pts], [p[0]["high"] - p[0]["mean"] for p in pts]],
                        yerr=[[p[1]["mean"] - p[1]["low"] for p in pts], [p[1]["high"] - p[1]["mean"] for p in pts]],
                        fmt="none", ecolor=family_color[family], alpha=0.25, lw=1)
            spots: OrderedDict[tuple, list[str]] = OrderedDict()  # points at the same place share one label
            for px, py, e in pts:
                spots.setdefault((round(px["mean"], 2), round(py["mean"], 2)), []).append(e.name.split("=", 1)[-1])
            for (px, py), values in spots.items():
                ax.annotate(", ".join(values), (px, py), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=family_color[family])
                offscale.append((px, py, f"{param}={', '.join(values)}", family_color[family]))
        swept = {e.cache_key for entries in sweeps.values() for e in entries}
        for e in main:
            r = results[e.cache_key]
            x, y = r.stats[xm], r.stats[ym]
            if e.family == "learned":
                ax.errorbar([x["mean"]], [y["mean"]], xerr=[[x["mean"] - x["low"]], [x["high"] - x["mean"]]],
                            yerr=[[y["mean"] - y["low"]], [y["high"] - y["mean"]]], fmt="*", ms=18, color=LEARNED_COLOR,
                            mec="black", mew=0.8, ecolor=LEARNED_COLOR, elinewidth=1.2, capsize=3, zorder=5,
                            label=f"{e.label} (95% CI)")
                offscale.append((x["mean"], y["mean"], e.label, LEARNED_COLOR))
            elif e.cache_key not in swept:
                ax.plot([x["mean"]], [y["mean"]], "D", ms=7, mfc="none", mew=1.5, color="dimgray", zorder=4)
                ax.annotate(e.label, (x["mean"], y["mean"]), textcoords="offset points", xytext=(5, -10), fontsize=7,
                            color="dimgray")
                offscale.append((x["mean"], y["mean"], e.label, "dimgray"))
        # Points behind the reference x add nothing to the hypervolume; when they would squeeze the rest into a
        # corner, the axis starts just before the reference and they are drawn as arrows on its left edge.
        xs_all = [x for x, _, _, _ in offscale]
        inside = [x for x in xs_all if x >= ref[0]]
        if inside and min(xs_all) < ref[0]:
            span = max(inside) - min(min(inside), ref[0])
            left = min(min(inside), ref[0]) - 0.08 * max(span, 1e-6)
            if min(xs_all) < left:
                ax.set_xlim(left, max(inside) + 0.08 * max(span, 1e-6))
                for x, y, label, color in offscale:
                    if x < left:
                        ax.plot([left], [y], "<", ms=8, color=color, clip_on=False, zorder=6)
                        ax.annotate(f"{label} at x={x:.1f}", (left, y), textcoords="offset points", xytext=(8, -3),
                                    fontsize=7, color=color)
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


def _plot_trajectories(path: Path, results: dict[str, PolicyResult], main: list[PolicyEntry], max_new_tokens: int,
                       subtitle: str, n_prompts: int = 3):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched

    first = results[main[0].cache_key]
    shown = min(n_prompts, len(first.groups))
    n_cols = 2 if shown + 1 > 2 else shown + 1
    n_rows = math.ceil((shown + 1) / n_cols)
    fig = Figure(figsize=(6.4 * n_cols, 3.9 * n_rows + 1.0))
    grid = fig.subplots(n_rows, n_cols, squeeze=False)
    axes = [list(grid.flat)]
    for ax in axes[0][shown + 1:]:
        ax.set_visible(False)
    colors = _palette()

    def style(c: int, e: PolicyEntry) -> dict:
        if e.family == "learned":
            return dict(lw=2.6, color=LEARNED_COLOR, zorder=5)
        return dict(lw=1.4, color=colors[c % len(colors)])

    for j in range(shown):
        ax = axes[0][j]
        prompt = first.groups[j][0]["prompt_id"]
        for c, e in enumerate(main):
            ep = results[e.cache_key].groups[j][0]
            t = np.asarray(ep["temperatures"])
            ax.plot(np.arange(len(t)), t, marker=".", ms=4, label=e.label, **style(c, e))
        ax.axhline(0, color="black", lw=0.6)
        ax.set_title(f"prompt {prompt} (sample 1 of K)", fontsize=10)
        ax.set_xlabel("token position")
        ax.set_ylabel("temperature T")
        ax.grid(alpha=0.3)
    ax = axes[0][shown]
    for c, e in enumerate(main):
        r = results[e.cache_key]
        sums, counts = np.zeros(max_new_tokens), np.zeros(max_new_tokens)
        for eps in r.groups:
            for ep in eps:
                t = np.asarray(ep["temperatures"])
                sums[: len(t)] += t
                counts[: len(t)] += 1
        ok = counts > 0
        ax.plot(np.flatnonzero(ok), sums[ok] / counts[ok], label=e.label, **style(c, e))
    ax.axhline(0, color="black", lw=0.6)
    ax.set_title("mean over all prompts and samples (completions still running)", fontsize=10)
    ax.set_xlabel("token position")
    ax.set_ylabel("mean temperature T")
    ax.grid(alpha=0.3)
    handles, labels = axes[0][shown].get_legend_handles_labels()
    n_leg_rows = math.ceil(len(labels) / 3)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=9, frameon=False)
    fig.suptitle(f"Temperature over token position, same prompts and seeds for every policy\n{subtitle}", fontsize=11)
    fig.tight_layout(rect=(0, 0.035 * n_leg_rows * 2 / n_rows + 0.01, 1, 1))
    fig.savefig(path, dpi=120)
    return fig


def _plot_histograms(path: Path, results: dict[str, PolicyResult], main: list[PolicyEntry], t_range: tuple[float, float],
                     subtitle: str):
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched

    n = len(main)
    fig = Figure(figsize=(8, 1.25 * n + 1.6))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)
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


# --------------------------------------------------------------------------- report


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _metric_table(metrics: list[str], main: list[PolicyEntry], results: dict[str, PolicyResult]) -> str:
    header = ["policy"] + [f"{m}" + (f" ({METRIC_BY_NAME[m].unit})" if METRIC_BY_NAME[m].unit else "") for m in metrics]
    rows = [[e.label] + [_fmt_ci(results[e.cache_key].stats[m]) for m in metrics] for e in main]
    return _table(header, rows)


_ARROWS = {"better": "✅ better", "worse": "❌ worse", "no difference": "≈ n.s.", "higher": "↑ higher", "lower": "↓ lower"}


def _write_report(path: Path, data: dict, main: list[PolicyEntry], results: dict[str, PolicyResult],
                  reference: PolicyEntry, paired: dict[str, dict], fronts: list[dict], warnings: list[str],
                  n_samples_shown: int = 3):
    setup = data["setup"]
    ref_is_learned = reference.family == "learned"
    who = "the learned policy" if ref_is_learned else f"the reference policy {reference.label}"
    lines: list[str] = []
    lines.append(f"# Kelvin evaluation: {reference.label} vs baselines\n")
    lines.append(f"Command: `{setup['command']}`\n")
    lines.append(_table(["setting", "value"], [
        ["model", f"`{setup['model']}` on {setup['device']}"],
        ["prompts", f"{setup['n_prompts']} ({setup['prompt_source']}, split `{setup['split']}`)"],
        ["samples per prompt (K)", str(setup["samples"])],
        ["max new tokens", str(setup["max_new_tokens"])],
        ["seed", f"{setup['seed']} (same prompt schedule and random stream for every policy)"],
        ["action mapping", f"{setup['action_mapping']['kind']} in [{setup['action_mapping']['t_min']:g}, "
                           f"{setup['action_mapping']['t_max']:g}]"],
        ["truncation", ", ".join(f"{k}={v}" for k, v in setup["truncation"].items())],
        ["intervals", f"95% percentile bootstrap over prompts ({setup['n_resamples']} resamples); "
                      "K samples of a prompt are aggregated first"],
        ["wall time", f"{setup['wall_s']:.0f} s"],
    ]))
    lines.append("")
    if warnings:
        lines.append("**Warnings**\n")
        lines += [f"- {w}" for w in warnings]
        lines.append("")

    lines.append("## Verdict\n")
    lines.append(f"Paired differences `{reference.label} - baseline` over the same prompts. \"Better\" means the 95% "
                 "interval of the difference excludes zero in the metric's good direction; otherwise the data do "
                 "not separate the two policies.\n")
    counts = {v: sum(paired[e.name]["reward"]["verdict"] == v for e in main if e is not reference)
              for v in ("better", "no difference", "worse")}
    if len(main) > 1:
        lines.append(f"On the composite reward {who} is better than {counts['better']} of {len(main) - 1} baselines, "
                     f"indistinguishable from {counts['no difference']} and worse than {counts['worse']}.\n")
    for e in main:
        if e is reference:
            continue
        d = paired[e.name]
        r = d["reward"]
        if r["verdict"] == "better":
            head = f"**{who.capitalize()} beats {e.label}** on the composite reward"
        elif r["verdict"] == "worse":
            head = f"**{who.capitalize()} is worse than {e.label}** on the composite reward"
        else:
            head = f"**{who.capitalize()} does not beat {e.label}**: no significant difference in composite reward"
        parts = []
        for m in ("logprob", "coherence", "semantic_distance", "distinct2_across", "anomaly_rate"):
            v = d[m]
            parts.append(f"{m} {v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}] {v['verdict']}")
        lines.append(f"- {head} ({r['mean']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]). " + "; ".join(parts) + ".")
    if ref_is_learned and fronts and fronts[0]["learned"]:
        f0 = fronts[0]
        for name, info in f0["learned"].items():
            dom = info["dominated_by"]
            if dom:
                lines.append(f"- On the {f0['x']} / {f0['y']} plane the learned point is dominated (in means) by: "
                             f"{', '.join(dom)}.")
            else:
                lines.append(f"- On the {f0['x']} / {f0['y']} plane no swept baseline dominates the learned point "
                             "(in means).")
            gaps = {f: g for f, g in (info.get("front_gap") or {}).items() if g is not None}
            if gaps:
                half = info["y_half_width"]
                said = "; ".join(f"{g:+.3f} vs the {f} front" for f, g in gaps.items())
                if all(g > half for g in gaps.values()):
                    verdict = ("above every family's front by more than its own 95% half-width: a trade-off no "
                               "swept baseline reaches")
                elif all(g < -half for g in gaps.values()):
                    verdict = ("below every family's front by more than its own 95% half-width: some setting of "
                               "each baseline gives more diversity at the same quality")
                else:
                    verdict = ("on the baselines' fronts within its own 95% half-width: its composite-reward gain "
                               "comes from the operating point it picks on the trade-off, not from a trade-off "
                               "the baselines cannot reach")
                lines.append(f"- At the learned point's {f0['x']} ({info['x']:.3f}), its {f0['y']} ({info['y']:.3f}, "
                             f"95% half-width {half:.3f}) is {said} (piecewise-linear fronts): {verdict}.")
    lines.append("")

    lines.append("## Headline metrics (mean [95% CI])\n")
    lines.append(_metric_table(HEADLINE, main, results))
    lines.append("\nPerplexity is exp(-logprob), its interval exp(-interval of logprob). tokens/s is one timing per "
                 "run on this machine (no interval); runs share the CPU/GPU with nothing else only if the machine "
                 "was idle.\n")
    cats = list(OrderedDict.fromkeys(eps[0]["category"] for eps in results[main[0].cache_key].groups))
    if len(cats) > 1:
        lines.append("## Composite reward by category (mean over the category's prompts; no interval)\n")
        rows = []
        for e in main:
            r = results[e.cache_key]
            by_cat = {c: [] for c in cats}
            for eps, value in zip(r.groups, r.per_prompt["reward"]):
                by_cat[eps[0]["category"]].append(value)
            rows.append([e.label] + [_fmt(float(np.mean(by_cat[c]))) for c in cats])
        sizes = {c: sum(eps[0]["category"] == c for eps in results[main[0].cache_key].groups) for c in cats}
        lines.append(_table(["policy"] + [f"{c} (n={sizes[c]})" for c in cats], rows))
        lines.append("")
    lines.append("## Paired differences vs " + reference.label + "\n")
    diff_metrics = [m for m in HEADLINE if m not in ("perplexity", "tokens_per_s")]
    rows = []
    for e in main:
        if e is reference:
            continue
        rows.append([e.label] + [f"{paired[e.name][m]['mean']:+.3f} [{paired[e.name][m]['low']:+.3f}, "
                                 f"{paired[e.name][m]['high']:+.3f}] {_ARROWS[paired[e.name][m]['verdict']]}"
                                 for m in diff_metrics])
    if rows:
        lines.append(_table(["baseline"] + diff_metrics, rows))
    lines.append("")
    lines.append("## Reward components (per episode, as the env pays them; mean [95% CI])\n")
    lines.append(_metric_table([m.name for m in METRICS if m.group == "reward"], main, results))
    lines.append("")
    lines.append("## Quality\n")
    lines.append(_metric_table([m.name for m in METRICS if m.group == "quality"], main, results))
    lines.append("")
    lines.append("## Diversity\n")
    lines.append(_metric_table([m.name for m in METRICS if m.group == "diversity"], main, results))
    lines.append("")
    lines.append("## Temperature\n")
    lines.append(_metric_table([m.name for m in METRICS if m.group == "temperature"], main, results))
    lines.append("")

    lines.append("## Quality-diversity fronts\n")
    if fronts:
        lines.append("![fronts](fronts.png)\n")
        lines.append("Each baseline family is swept over its main parameter (line, points labelled with the value; "
                     "faint bars are 95% CIs); the learned policy is the red star. Hypervolume (HV) is the area a "
                     "family's Pareto front dominates above the reference point; larger is better. Axes: "
                     + FRONT_AXES_DOC + "\n")
        for f in fronts:
            rows = [[fam, info["param"], ", ".join(info["front"]), f"{info['hypervolume']:.4g}"]
                    for fam, info in f["families"].items()]
            for name, info in f["learned"].items():
                rows.append([f"**{name}** (single point)", "-", "-", f"{info['hypervolume']:.4g}"])
            lines.append(f"**{f['x']} (x) vs {f['y']} (y)**, reference point ({f['reference'][0]:g}, "
                         f"{f['reference'][1]:g})\n")
            lines.append(_table(["family", "swept", "Pareto-optimal points", "hypervolume"], rows))
            lines.append("")
    else:
        lines.append("Sweeps were switched off (--no-sweep).\n")

    lines.append("## Temperature traces\n")
    lines.append("![trajectories](temperature_trajectories.png)\n")
    lines.append("![histogram](temperature_hist.png)\n")

    lines.append("## Sample completions (same prompt, same seed, sample 1 of K)\n")
    first = results[main[0].cache_key]
    for j in range(min(n_samples_shown, len(first.groups))):
        ep0 = first.groups[j][0]
        prompt = setup["prompt_texts"].get(ep0["prompt_id"], "")
        lines.append(f"**{ep0['prompt_id']}** ({ep0['category']}): {_md_escape(prompt)}\n")
        rows = []
        for e in main:
            ep = results[e.cache_key].groups[j][0]
            trace = " ".join(f"{t:.2f}" for t in np.asarray(ep["temperatures"])[:48])
            rows.append([e.label, _md_escape(ep["completion"][:400]), f"{ep['episode']['r']:.2f}",
                         f"{float(np.mean(ep['logprobs'])):.2f}", f"`{trace}`"])
        lines.append(_table(["policy", "completion", "reward", "logprob", "temperatures (per token)"], rows))
        lines.append("")

    lines.append("## Metric definitions\n")
    lines.append(_table(["metric", "group", "direction", "definition"],
                        [[m.name, m.group, {1: "higher better", -1: "lower better", 0: "descriptive"}[m.direction],
                          m.doc] for m in METRICS]))
    lines.append("")
    path.write_text("\n".join(lines) + "\n")


FRONT_AXES_DOC = (
    "x = exact mean base-model log-prob per token (quality: how likely the base model finds the text; it is exact "
    "and moves directly with temperature, whereas coherence is one noisy cosine per short completion), y = mean "
    "pairwise semantic distance of the K samples (diversity of meaning, not of tokenisation). Reference point "
    "(-10 nats/token, 0): -10 is the reward's logprob clip, 0 means identical samples. The second panel "
    "(coherence vs distinct-2 across samples, reference (0, 0)) checks that the picture does not hinge on the axes."
)


# --------------------------------------------------------------------------- main entry


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def evaluate(config: KelvinConfig, out_dir: str | Path, policies: Sequence[str], *, run: str | None = None,
             split: str | None = "test", prompts_file: str | None = None, samples: int = 4,
             max_prompts: int | None = None, seed: int = 0, sweep: bool = True,
             sweep_grids: dict[str, tuple[str, list[float]]] | None = None, n_resamples: int = 2000,
             progress: bool = True, command: str | None = None) -> dict:
    """Evaluate ``policies`` (spec strings) on the same prompts and seeds; write every output to ``out_dir``.

    Returns the ``metrics.json`` content. Raises :class:`EvaluationError` for bad input before the
    LM is loaded (missing run, other model or feature version, empty prompt file, bad spec).
    """
    t_start = time.perf_counter()
    if int(samples) != samples or samples < 2:
        raise EvaluationError(f"--samples={samples} must be an integer >= 2: diversity across samples needs at "
                              "least two samples per prompt")
    if max_prompts is not None and max_prompts < 1:
        raise EvaluationError(f"--max-prompts={max_prompts} must be >= 1")
    if n_resamples < 1:
        raise EvaluationError(f"n_resamples={n_resamples} must be >= 1")
    warnings: list[str] = []
    try:
        all_prompts = load_prompts(prompts_file, split=split, categories=config.env.categories)
    except FileNotFoundError as exc:
        raise EvaluationError(f"--prompts: {exc}") from exc
    except ValueError as exc:
        raise EvaluationError(f"prompts: {exc}") from exc
    prompts = select_prompts(all_prompts, max_prompts)
    n_prompts = len(prompts)
    k = int(samples)
    n_groups = max(1, min(config.env.batch_size // k, n_prompts))
    env_cfg = replace(config.env, group_size=k, batch_size=n_groups * k, seed=seed, split=split,
                      prompts=prompts_file)
    config = replace(config, env=env_cfg)
    specs = parse_policy_specs(policies)
    main = resolve_policies(specs, config, run, warnings)
    grids = sweep_grids if sweep_grids is not None else SWEEP_GRIDS
    sweeps = sweep_entries(config, grids) if sweep else {}

    # ---- the one model, the one env
    import torch

    from envs.embedder import get_default_embedder
    from envs.generation import TemperatureVecEnv
    from envs.lm import load_causal_lm
    from kelvin.rollout import collect_episodes

    torch.manual_seed(seed)
    lm = load_causal_lm(config.model)
    env = TemperatureVecEnv(env_cfg, lm=lm, reward=config.reward, prompts=prompts)
    embedder = get_default_embedder("cpu")  # the reward's embedder (coherence, novelty): loaded once
    per_row = math.ceil(n_prompts / n_groups)

    unique: OrderedDict[str, PolicyEntry] = OrderedDict()
    for e in main + [e for entries in sweeps.values() for e in entries]:
        unique.setdefault(e.cache_key, e)
    results: dict[str, PolicyResult] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(unique) * per_row * env_cfg.max_new_tokens, unit="step", desc="evaluate",
                   dynamic_ncols=True, file=sys.stderr)
    try:
        for i, (key, entry) in enumerate(unique.items()):
            if bar is not None:
                bar.set_postfix_str(f"{i + 1}/{len(unique)} {entry.name}")
            wrapped = _ProgressPolicy(entry.policy, bar)
            out = collect_episodes(env, wrapped, episodes_per_row=per_row, seed=seed)
            if bar is not None:  # runs end early on EOS: move the bar to this run's end
                bar.update(max(0, (i + 1) * per_row * env_cfg.max_new_tokens - bar.n))
            groups = group_by_prompt(out["episodes"], n_prompts, k, n_groups)
            per = prompt_metrics(groups, embedder, config.reward.repetition_n)
            results[key] = PolicyResult(entry, groups, per, summarize(per, out["tokens_per_s"], n_resamples, seed),
                                        out["tokens_per_s"], out["wall_s"])
    finally:
        if bar is not None:
            bar.close()
        env.close()
    prompt_order = [eps[0]["prompt_id"] for eps in results[main[0].cache_key].groups]
    for key, r in results.items():
        if [eps[0]["prompt_id"] for eps in r.groups] != prompt_order:
            raise RuntimeError(f"policy {r.entry.name} saw other prompts than {main[0].name}; pairing is broken")

    # ---- paired differences and fronts
    reference = next((e for e in main if e.family == "learned"), main[0])
    if reference.family != "learned":
        warnings.append(f"no learned policy given: paired differences are against {reference.label}")
    ref_result = results[reference.cache_key]
    paired = {e.name: paired_differences(ref_result, results[e.cache_key], n_resamples, seed)
              for e in main if e is not reference}
    fronts = []
    if sweeps:
        for xm, ym, refpt in FRONT_AXES:
            fam_info = {}
            for family, entries in sweeps.items():
                pts = [(results[e.cache_key].stats[xm]["mean"], results[e.cache_key].stats[ym]["mean"]) for e in entries]
                idx = pareto_front(pts)
                fam_info[family] = {"param": grids[family][0], "points": [e.name for e in entries],
                                    "front": [entries[i].name for i in idx],
                                    "hypervolume": hypervolume_2d(pts, refpt)}
            learned_info = {}
            for e in main:
                if e.family != "learned":
                    continue
                p = (results[e.cache_key].stats[xm]["mean"], results[e.cache_key].stats[ym]["mean"])
                dom = [s.name for entries in sweeps.values() for s in entries
                       if dominates((results[s.cache_key].stats[xm]["mean"], results[s.cache_key].stats[ym]["mean"]), p)]
                gaps = {}
                for family, entries in sweeps.items():
                    pts = [(results[s.cache_key].stats[xm]["mean"], results[s.cache_key].stats[ym]["mean"])
                           for s in entries]
                    gaps[family] = front_gap(pts, p)
                y_stat = results[e.cache_key].stats[ym]
                learned_info[e.name] = {"x": p[0], "y": p[1], "dominated_by": dom,
                                        "hypervolume": hypervolume_2d([p], refpt), "front_gap": gaps,
                                        "y_half_width": 0.5 * (y_stat["high"] - y_stat["low"])}
            fronts.append({"x": xm, "y": ym, "reference": list(refpt), "families": fam_info, "learned": learned_info})

    # ---- outputs
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = str(lm.device)
    setup = {
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "model": config.model.name, "device": device, "split": split,
        "prompt_source": prompts_file or "packaged prompt set", "n_prompts": n_prompts,
        "prompt_ids": prompt_order, "prompt_texts": {p.id: p.text for p in prompts},
        "samples": k, "n_groups": n_groups, "batch_size": env_cfg.batch_size,
        "max_new_tokens": env_cfg.max_new_tokens, "seed": seed, "n_resamples": n_resamples, "alpha": 0.05,
        "action_mapping": asdict(env_cfg.action_mapping_obj()), "truncation": env_cfg.truncation,
        "feature_spec_version": FEATURE_SPEC_VERSION, "config": config.to_dict(),
        "python": platform.python_version(), "torch": torch.__version__,
    }

    def policy_block(e: PolicyEntry) -> dict:
        r = results[e.cache_key]
        return {"label": e.label, "family": e.family, "params": e.params, "run_dir": e.run_dir,
                "n_prompts": len(r.groups), "n_completions": sum(len(g) for g in r.groups),
                "wall_s": r.wall_s, "metrics": r.stats}

    data: dict[str, Any] = {
        "setup": setup,
        "reference": reference.name,
        "policies": {e.name: policy_block(e) for e in main},
        "paired_differences": {"reference": reference.name, "baselines": paired},
        "sweep": {fam: {"param": grids[fam][0], "points": {e.name: policy_block(e) for e in entries}}
                  for fam, entries in sweeps.items()},
        "fronts": fronts,
        "metric_definitions": {m.name: {"group": m.group, "unit": m.unit, "direction": m.direction, "doc": m.doc}
                               for m in METRICS},
        "warnings": warnings,
    }
    subtitle = (f"{config.model.name}, split {split}, {n_prompts} prompts x {k} samples, "
                f"{env_cfg.max_new_tokens} tokens, seed {seed}")
    figures: dict[str, Path] = {}
    if fronts:
        figures["fronts"] = out / "fronts.png"
        _plot_fronts(figures["fronts"], results, main, sweeps, fronts, subtitle)
    figures["temperature_trajectories"] = out / "temperature_trajectories.png"
    _plot_trajectories(figures["temperature_trajectories"], results, main, env_cfg.max_new_tokens, subtitle)
    figures["temperature_hist"] = out / "temperature_hist.png"
    _plot_histograms(figures["temperature_hist"], results, main, (env_cfg.t_min, env_cfg.t_max), subtitle)
    setup["wall_s"] = time.perf_counter() - t_start
    _write_report(out / "report.md", data, main, results, reference, paired, fronts, warnings)
    (out / "metrics.json").write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=False))
    _write_csv(out / "metrics.csv", data)
    _write_samples(out / "samples.jsonl", main, results)
    _write_tensorboard(out / "tb", data, main, (out / "report.md").read_text(), figures)
    return data


def _write_csv(path: Path, data: dict) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["kind", "policy", "label", "metric", "mean", "low", "high", "reference", "verdict"])
        for name, block in data["policies"].items():
            for m, s in block["metrics"].items():
                w.writerow(["policy", name, block["label"], m, s["mean"], s["low"], s["high"], "", ""])
        for fam, sw in data["sweep"].items():
            for name, block in sw["points"].items():
                for m, s in block["metrics"].items():
                    w.writerow(["sweep", name, block["label"], m, s["mean"], s["low"], s["high"], "", ""])
        ref = data["paired_differences"]["reference"]
        for name, diffs in data["paired_differences"]["baselines"].items():
            label = data["policies"][name]["label"]
            for m, s in diffs.items():
                w.writerow(["paired_difference", name, label, m, s["mean"], s["low"], s["high"], ref, s["verdict"]])


def _write_samples(path: Path, main: list[PolicyEntry], results: dict[str, PolicyResult]) -> None:
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


def _write_tensorboard(path: Path, data: dict, main: list[PolicyEntry], report: str, figures: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(path))
    try:
        for name, block in data["policies"].items():
            slug = _slug(name)
            for m, s in block["metrics"].items():
                writer.add_scalar(f"{m}/{slug}", s["mean"], 0)  # intervals: metrics.json / report
        for name, diffs in data["paired_differences"]["baselines"].items():
            for m, s in diffs.items():
                writer.add_scalar(f"paired_difference/{m}/{_slug(name)}", s["mean"], 0)
        for fam, sw in data["sweep"].items():
            for name, block in sw["points"].items():
                for m in ("reward", "logprob", "semantic_distance", "distinct2_across", "coherence"):
                    writer.add_scalar(f"sweep/{m}/{_slug(name)}", block["metrics"][m]["mean"], 0)
        for f in data["fronts"]:
            for fam, info in f["families"].items():
                writer.add_scalar(f"hypervolume/{f['x']}_vs_{f['y']}/{fam}", info["hypervolume"], 0)
            for name, info in f["learned"].items():
                writer.add_scalar(f"hypervolume/{f['x']}_vs_{f['y']}/{_slug(name)}", info["hypervolume"], 0)
        writer.add_text("report", report, 0)
        import matplotlib.image

        for tag, png in figures.items():  # the written PNGs, not a second rendering
            image = matplotlib.image.imread(str(png))  # (H, W, 4) float in [0, 1]
            writer.add_image(f"plots/{tag}", image[..., :3], 0, dataformats="HWC")
    finally:
        writer.close()


def main(argv: list[str] | None = None) -> int:
    """Command line of ``evaluate.py``."""
    import argparse

    parser = argparse.ArgumentParser(
        description="Evaluate temperature policies (learned and baselines) on the same prompts and seeds (Kelvin).",
        epilog="Example: evaluate.py --config configs/default.yaml --policies learned:runs/NAME,pid,edt,fixed:0.7 "
               "--split test --out reports/NAME")
    parser.add_argument("--config", default=None,
                        help="YAML config (default: the run's config.yaml when --run or learned:RUN is given, else "
                             "configs/default.yaml)")
    parser.add_argument("--policies", default="all",
                        help="comma-separated: learned[:RUN_DIR], baseline specs (pid, edt, fixed:0.7, "
                             "edt:theta=1.0,t0=0.8 ...), guarded:SPEC (that policy behind the exported samplers' "
                             "default guard rails, e.g. guarded:learned:runs/NAME) or all (= learned if --run, plus "
                             "every baseline). "
                             f"Baselines: {', '.join(BASELINE_NAMES)} (default: %(default)s)")
    parser.add_argument("--run", default=None, metavar="RUN_DIR", help="run directory of the learned policy")
    parser.add_argument("--split", default="test", help="prompt split: train, validation, test or all (default: test)")
    parser.add_argument("--prompts", default=None, metavar="FILE", help="a .jsonl or .txt prompt file (default: "
                        "the packaged set)")
    parser.add_argument("--samples", type=int, default=4, metavar="K",
                        help="samples per prompt (the env's group_size), >= 2 (default: %(default)s)")
    parser.add_argument("--max-prompts", type=int, default=None, metavar="N",
                        help="use N prompts, round-robin over categories (default: all of the split)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt order and token draws (default: 0)")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="sweep each baseline family over its main parameter for the fronts (default: on)")
    parser.add_argument("--sweep-grid", action="append", default=[], metavar="FAMILY[:PARAM]=V1,V2",
                        help="replace a family's sweep grid, e.g. fixed=0.5,1.0 or edt:theta=1,3; FAMILY= drops it "
                             "(defaults: " + "; ".join(f"{f} {p} {v}" for f, (p, v) in SWEEP_GRIDS.items()) + ")")
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--out", default=None, help="output directory (default: reports/<run or config name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                        help="override a config value, e.g. --set env.max_new_tokens=16 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    try:
        specs = parse_policy_specs(args.policies)
        learned_target = args.run or next((s.partition(":")[2] for s in specs if s.startswith("learned:")), None)
        config_path = args.config
        if config_path is None:
            if learned_target:
                paths = _learned_paths(learned_target)
                config_path = paths[0] / "config.yaml"
            else:
                config_path = "configs/default.yaml"
        config = load_config(config_path, args.overrides)
        split = None if args.split in ("all", "none", "") else args.split
        name = Path(learned_target).name if learned_target else Path(config_path).stem
        out = Path(args.out or Path("reports") / name)
        data = evaluate(config, out, specs, run=args.run, split=split, prompts_file=args.prompts,
                        samples=args.samples, max_prompts=args.max_prompts, seed=args.seed, sweep=args.sweep,
                        sweep_grids=parse_sweep_grid(args.sweep_grid), n_resamples=args.bootstrap,
                        progress=not args.no_progress, command=command)
    except (EvaluationError, ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ref = data["reference"]
    print(f"wrote {out}/report.md, metrics.json, metrics.csv, PNGs and tb/ ({data['setup']['wall_s']:.0f} s)")
    for name, diffs in data["paired_differences"]["baselines"].items():
        r = diffs["reward"]
        print(f"reward {ref} - {name}: {r['mean']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] -> {r['verdict']}")
    return 0
