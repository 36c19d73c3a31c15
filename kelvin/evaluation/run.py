"""``evaluate()``: every policy through the same env code, on the same prompts, with the same seed.

Row ``r`` of every policy sees the same prompt schedule and the same random stream
(:func:`kelvin.rollout.collect_episodes`), drawing ``K`` samples per prompt (the env's
``group_size``: the ``K`` rows of a group share their prompt). A ``guarded:`` policy runs in an env
whose action mapping is the guard's (the policy's without its rate limit: the guard applies it itself,
then its rules), which is the order every sampler applies.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from envs.prompts import Prompt, load_prompts
from kelvin.config import KelvinConfig
from kelvin.evaluation.fronts import compute_fronts
from kelvin.evaluation.metrics import METRICS, group_by_prompt, prompt_metrics
from kelvin.evaluation.plots import plot_fronts, plot_histograms, plot_trajectories
from kelvin.evaluation.policies import SWEEP_GRIDS, EvaluationError, PolicyEntry, parse_policy_specs, \
    resolve_policies, sweep_entries
from kelvin.evaluation.report import write_csv, write_report, write_samples, write_tensorboard
from kelvin.evaluation.statistics import PolicyResult, paired_differences, summarize
from policies.features import FEATURE_SPEC_VERSION

__all__ = ["evaluate", "select_prompts"]


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


def _check_arguments(samples: int, max_prompts: int | None, n_resamples: int) -> None:
    if int(samples) != samples or samples < 2:
        raise EvaluationError(f"--samples={samples} must be an integer >= 2: diversity across samples needs at "
                              "least two samples per prompt")
    if max_prompts is not None and max_prompts < 1:
        raise EvaluationError(f"--max-prompts={max_prompts} must be >= 1")
    if n_resamples < 1:
        raise EvaluationError(f"n_resamples={n_resamples} must be >= 1")


def _prompts(config: KelvinConfig, prompts_file: str | None, split: str | None, max_prompts: int | None) -> list[Prompt]:
    try:
        return select_prompts(load_prompts(prompts_file, split=split, categories=config.env.categories), max_prompts)
    except FileNotFoundError as exc:
        raise EvaluationError(f"--prompts: {exc}") from exc
    except ValueError as exc:
        raise EvaluationError(f"prompts: {exc}") from exc


def _run_all(config: KelvinConfig, prompts: list[Prompt], entries: list[PolicyEntry], per_row: int, seed: int,
             n_resamples: int, progress: bool) -> tuple[dict[str, PolicyResult], Any]:
    """Run each distinct policy once (one env per action mapping); results by cache key, and the LM."""
    import torch

    from envs.embedder import get_default_embedder
    from envs.generation import TemperatureVecEnv
    from envs.lm import load_causal_lm
    from kelvin.rollout import collect_episodes

    torch.manual_seed(seed)
    lm = load_causal_lm(config.model)
    embedder = get_default_embedder("cpu")  # the reward's embedder (coherence, group diversity): loaded once
    env_cfg, k = config.env, config.env.group_size
    n_groups, n_prompts = env_cfg.batch_size // k, len(prompts)
    envs: dict = {}  # action mapping -> env (the same env code, prompts and seed for every policy)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(entries) * per_row * env_cfg.max_new_tokens, unit="step", desc="evaluate",
                   dynamic_ncols=True, file=sys.stderr)
    results: dict[str, PolicyResult] = {}
    try:
        for i, entry in enumerate(entries):
            mapping = entry.policy.action_mapping
            if mapping not in envs:
                envs[mapping] = TemperatureVecEnv(replace(env_cfg, action=mapping), lm=lm, prompts=prompts,
                                                  reward=replace(config.reward, group_baseline=False))  # absolute
            if bar is not None:
                bar.set_postfix_str(f"{i + 1}/{len(entries)} {entry.name}")
            out = collect_episodes(envs[mapping], entry.policy, episodes_per_row=per_row, seed=seed,
                                   on_step=None if bar is None else (lambda: bar.update(1)))
            if bar is not None:  # runs end early on EOS: move the bar to this run's end
                bar.update(max(0, (i + 1) * per_row * env_cfg.max_new_tokens - bar.n))
            groups = group_by_prompt(out["episodes"], n_prompts, k, n_groups)
            per = prompt_metrics(groups, embedder, config.reward.repetition_n)
            results[entry.cache_key] = PolicyResult(entry, groups, per, summarize(per, out["tokens_per_s"],
                                                                                  n_resamples, seed),
                                                    out["tokens_per_s"], out["wall_s"])
    finally:
        if bar is not None:
            bar.close()
        for env in envs.values():
            env.close()
    order = [eps[0]["prompt_id"] for eps in results[entries[0].cache_key].groups]
    for r in results.values():
        if [eps[0]["prompt_id"] for eps in r.groups] != order:
            raise RuntimeError(f"policy {r.entry.name} saw other prompts than {entries[0].name}; pairing is broken")
    return results, lm


def _setup(config: KelvinConfig, prompts: list[Prompt], first: PolicyResult, lm, split: str | None,
           prompts_file: str | None, seed: int, n_resamples: int, command: str | None) -> dict:
    """The ``setup`` block of ``metrics.json``: what ran, on what, how (``wall_s`` is added at the end)."""
    import torch

    env = config.env
    return {
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "model": config.model.name, "device": str(lm.device), "split": split,
        "prompt_source": prompts_file or "packaged prompt set", "n_prompts": len(prompts),
        "prompt_ids": [eps[0]["prompt_id"] for eps in first.groups], "prompt_texts": {p.id: p.text for p in prompts},
        "samples": env.group_size, "n_groups": env.batch_size // env.group_size, "batch_size": env.batch_size,
        "max_new_tokens": env.max_new_tokens, "seed": seed, "n_resamples": n_resamples, "alpha": 0.05,
        "action_mapping": asdict(env.action), "truncation": env.truncation.to_dict(),
        "feature_spec_version": FEATURE_SPEC_VERSION, "config": config.to_dict(),
        "python": platform.python_version(), "torch": torch.__version__,
    }


def _policy_block(e: PolicyEntry, results: dict[str, PolicyResult]) -> dict:
    r = results[e.cache_key]
    return {"label": e.label, "family": e.family, "params": e.params, "run_dir": e.run_dir, "n_prompts": len(r.groups),
            "n_completions": sum(len(g) for g in r.groups), "wall_s": r.wall_s, "metrics": r.stats}


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _write_outputs(out: Path, data: dict, config: KelvinConfig, main: list[PolicyEntry], sweeps: dict,
                   results: dict, paired: dict, warnings: list[str], t_start: float) -> None:
    """Figures, then ``report.md``, ``metrics.json``, ``metrics.csv``, ``samples.jsonl`` and ``tb/``."""
    setup, env_cfg = data["setup"], config.env
    reference = next(e for e in main if e.name == data["reference"])
    subtitle = (f"{config.model.name}, split {setup['split']}, {setup['n_prompts']} prompts x {setup['samples']} "
                f"samples, {env_cfg.max_new_tokens} tokens, seed {setup['seed']}")
    figures: dict[str, Path] = {}
    if data["fronts"]:
        figures["fronts"] = out / "fronts.png"
        plot_fronts(figures["fronts"], results, main, sweeps, data["fronts"], subtitle)
    figures["temperature_trajectories"] = out / "temperature_trajectories.png"
    plot_trajectories(figures["temperature_trajectories"], results, main, env_cfg.max_new_tokens, subtitle)
    figures["temperature_hist"] = out / "temperature_hist.png"
    plot_histograms(figures["temperature_hist"], results, main, (env_cfg.action.t_min, env_cfg.action.t_max), subtitle)
    setup["wall_s"] = time.perf_counter() - t_start
    write_report(out / "report.md", data, main, results, reference, paired, data["fronts"], warnings)
    (out / "metrics.json").write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=False))
    write_csv(out / "metrics.csv", data)
    write_samples(out / "samples.jsonl", main, results)
    write_tensorboard(out / "tb", data, (out / "report.md").read_text(), figures)


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
    _check_arguments(samples, max_prompts, n_resamples)
    warnings: list[str] = []
    prompts = _prompts(config, prompts_file, split, max_prompts)
    k = int(samples)
    n_groups = max(1, min(config.env.batch_size // k, len(prompts)))
    config = replace(config, env=replace(config.env, group_size=k, batch_size=n_groups * k, seed=seed, split=split,
                                         prompts=prompts_file))
    main = resolve_policies(parse_policy_specs(policies), config, run, warnings)
    grids = sweep_grids if sweep_grids is not None else SWEEP_GRIDS
    sweeps = sweep_entries(config, grids) if sweep else {}
    unique = list(OrderedDict((e.cache_key, e) for e in main + [e for es in sweeps.values() for e in es]).values())
    results, lm = _run_all(config, prompts, unique, math.ceil(len(prompts) / n_groups), seed, n_resamples, progress)

    reference = next((e for e in main if e.family == "learned"), main[0])
    if reference.family != "learned":
        warnings.append(f"no learned policy given: paired differences are against {reference.label}")
    paired = {e.name: paired_differences(results[reference.cache_key], results[e.cache_key], n_resamples, seed)
              for e in main if e is not reference}
    fronts = compute_fronts(results, main, sweeps, grids) if sweeps else []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "setup": _setup(config, prompts, results[main[0].cache_key], lm, split, prompts_file, seed, n_resamples,
                        command),
        "reference": reference.name,
        "policies": {e.name: _policy_block(e, results) for e in main},
        "paired_differences": {"reference": reference.name, "baselines": paired},
        "sweep": {fam: {"param": grids[fam][0], "points": {e.name: _policy_block(e, results) for e in entries}}
                  for fam, entries in sweeps.items()},
        "fronts": fronts,
        "metric_definitions": {m.name: {"group": m.group, "unit": m.unit, "direction": m.direction, "doc": m.doc}
                               for m in METRICS},
        "warnings": warnings,
    }
    _write_outputs(out, data, config, main, sweeps, results, paired, warnings, t_start)
    return data
