"""``evaluate()``: every policy through the same env code, on the same prompts, with the same seed.

Row ``r`` of every policy sees the same prompt schedule and the same random stream
(:func:`kelvin.rollout.collect_episodes`), drawing ``K`` samples per prompt (the env's ``group_size``:
the ``K`` rows of a group share their prompt and their diversity setting λ). Each run happens in an env
built for it: its action mapping (a ``guarded:`` policy runs under the guard's mapping, the samplers'
order), its truncation and its λ; rewards are absolute (no group baseline).

The pipeline: the compared policies (``--policies``; a λ-conditioned learned policy at each λ of its
front), the baseline families (:mod:`kelvin.evaluation.families`; the per-category tables tuned on the
validation split first), then fronts and hulls (:mod:`kelvin.evaluation.fronts`), the goals
(:mod:`kelvin.evaluation.goals`) and the written outputs (:mod:`kelvin.evaluation.report`).

**Nothing is lost.** The output directory is checked before anything runs. Every finished run is
written at once to ``out/cache/`` (atomically); ``--resume`` reuses every cached run whose setting
(model, prompts, seed, K, tokens, reward) matches. Ctrl-C stops after the current run and writes the
report from what is done (``data["interrupted"]``; the CLI exits 130); a rerun with ``--resume`` picks
up where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import platform
import shlex
import sys
import time
from collections import OrderedDict
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

from envs.config import MAX_SEED
from envs.prompts import Prompt, category_shares, load_prompts, select_prompts
from kelvin.atomic import unusable_output_dir, write_atomic, write_text_atomic
from kelvin.config import KelvinConfig
from kelvin.evaluation.families import FAMILY_TITLES, family_entries, table_entries, tune_tables, tuned_fixed_entries
from kelvin.evaluation.headline import dial_check, reward_headline
from kelvin.evaluation.goals import category_tables, compute_fronts, goals
from kelvin.evaluation.metrics import METRICS, group_by_prompt, mean_over_streams, prompt_metrics
from kelvin.evaluation.plots import plot_hulls, plot_histograms, plot_trajectories
from kelvin.evaluation.policies import EvaluationError, PolicyEntry, lambda_grid, parse_policy_specs, resolve_policies
from kelvin.evaluation.report import write_csv, write_report, write_samples, write_tensorboard
from kelvin.evaluation.statistics import PolicyResult, paired_differences, summarize
from policies.features import FEATURE_SPEC_VERSION

__all__ = ["check_output_dir", "evaluate", "select_prompts"]


STREAM_SEED_STRIDE = 1_000_003
"""``evaluation.streams``: stream s of a policy runs with seed ``seed + s * STREAM_SEED_STRIDE`` (stream 0: the seed)."""


def check_output_dir(out: Path) -> None:
    """Refuse, before anything runs, an output directory that cannot be written: a file, a path under a file, or a
    directory (or its nearest existing parent) that refuses a new file. Creates nothing: bad input leaves no trace."""
    problem = unusable_output_dir(out)
    if problem is None:
        return
    kind, folder, reason = problem
    if kind == "file" and folder == out:
        raise EvaluationError(f"--out {out} is a file; give a directory for the report (it is created if missing)")
    if kind == "file":
        raise EvaluationError(f"--out {out}: {folder} is a file, so {out} cannot be created; choose another directory")
    raise EvaluationError(f"--out {out}: {folder} is not writable ({reason}); choose another directory")


def _prompts(config: KelvinConfig, prompts_file: str | None, split: str | None, max_prompts: int | None) -> list[Prompt]:
    try:
        return select_prompts(load_prompts(prompts_file, split=split, categories=config.env.categories), max_prompts)
    except FileNotFoundError as exc:
        raise EvaluationError(f"--prompts: {exc}") from exc
    except ValueError as exc:
        raise EvaluationError(f"prompts: {exc}") from exc


class Runner:
    """Runs entries on one prompt set (one env per mapping, truncation and λ), caching each finished run."""

    def __init__(self, config: KelvinConfig, prompts: list[Prompt], seed: int, cache_dir: Path | None,
                 resume: bool, bar=None):
        import torch

        from envs.embedder import get_default_embedder
        from envs.lm import load_causal_lm

        torch.manual_seed(seed)
        self.config, self.prompts, self.seed, self.bar = config, prompts, seed, bar
        self.lm = load_causal_lm(config.model)
        self.embedder = get_default_embedder("cpu")  # the reward's embedder: loaded once
        self.k = config.env.group_size
        self.n_groups = config.env.batch_size // self.k
        self.per_row = math.ceil(len(prompts) / self.n_groups)
        self.envs: dict[str, Any] = {}
        self.cache_dir, self.resume = cache_dir, resume
        self.signature = json.dumps({"model": config.model.name, "prompts": [p.id for p in prompts], "seed": seed,
                                     "k": self.k, "n_groups": self.n_groups, "tokens": config.env.max_new_tokens,
                                     "streams": config.evaluation.streams,
                                     "reward": asdict(config.reward)}, sort_keys=True)
        self.reused = 0

    def _env(self, entry: PolicyEntry):
        from envs.generation import TemperatureVecEnv

        cfg = self.config.env
        truncation = entry.truncation if entry.truncation is not None else cfg.truncation
        diversity = 0.0 if entry.diversity is None else entry.diversity
        env_cfg = replace(cfg, action=entry.policy.action_mapping, truncation=truncation, diversity_values=[diversity])
        key = json.dumps([asdict(env_cfg.action), truncation.to_dict(), diversity], sort_keys=True)
        if key not in self.envs:
            self.envs[key] = TemperatureVecEnv(env_cfg, lm=self.lm, prompts=self.prompts,
                                               reward=replace(self.config.reward, group_baseline=False))  # absolute
        return self.envs[key]

    def _cache_file(self, entry: PolicyEntry) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha1((self.signature + entry.cache_key).encode()).hexdigest()[:20]
        return self.cache_dir / f"{digest}.pkl"

    def run(self, entry: PolicyEntry) -> PolicyResult:
        from kelvin.rollout import collect_episodes

        path = self._cache_file(entry)
        if self.resume and path is not None and path.is_file():
            try:
                with open(path, "rb") as fh:
                    cached = pickle.load(fh)
                if cached["signature"] == self.signature and cached["key"] == entry.cache_key:
                    self.reused += 1
                    return PolicyResult(entry, cached["groups"], cached["per_prompt"], cached["stats"],
                                        cached["tokens_per_s"], cached["wall_s"])
            except (OSError, EOFError, pickle.UnpicklingError, KeyError):
                pass  # an unreadable cache file runs again
        bar = self.bar
        groups, per_stream, tokens, wall = None, [], 0.0, 0.0
        for stream in range(self.config.evaluation.streams):  # stream 0 is the plain seed
            out = collect_episodes(self._env(entry), entry.policy, episodes_per_row=self.per_row,
                                   seed=(self.seed + stream * STREAM_SEED_STRIDE) % (MAX_SEED + 1),
                                   on_step=None if bar is None else (lambda: bar.update(1)))
            stream_groups = group_by_prompt(out["episodes"], len(self.prompts), self.k, self.n_groups)
            per_stream.append(prompt_metrics(stream_groups, self.embedder, self.config.reward.repetition_n))
            groups = stream_groups if groups is None else [a + b for a, b in zip(groups, stream_groups)]
            tokens, wall = tokens + out["tokens_per_s"] * out["wall_s"], wall + out["wall_s"]
        per = mean_over_streams(per_stream)
        tokens_per_s = tokens / wall if wall > 0 else 0.0
        stats = summarize(per, tokens_per_s, self.config.evaluation.bootstrap, self.seed)
        result = PolicyResult(entry, groups, per, stats, tokens_per_s, wall)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, pickle.dumps({"signature": self.signature, "key": entry.cache_key, "groups": groups,
                                  "per_prompt": per, "stats": stats, "tokens_per_s": tokens_per_s, "wall_s": wall}))
        return result

    def close(self) -> None:
        for env in self.envs.values():
            env.close()


def _run_entries(runner: Runner, entries: list[PolicyEntry], what: str, progress: bool) -> tuple[dict, bool]:
    """Run each entry once; ``(results by cache key, interrupted)``. Ctrl-C stops after the current run."""
    results: dict[str, PolicyResult] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(entries), unit="run", desc=what, dynamic_ncols=True, file=sys.stderr)
    try:
        for entry in entries:
            if entry.cache_key in results:
                continue
            if bar is not None:
                bar.set_postfix_str(entry.name[:40])
            results[entry.cache_key] = runner.run(entry)
            if bar is not None:
                bar.update(1)
    except KeyboardInterrupt:
        print(f"\nCtrl-C: stopped after {len(results)} of {len(entries)} runs; writing what is done "
              "(rerun with --resume to continue)", file=sys.stderr, flush=True)
        return results, True
    finally:
        if bar is not None:
            bar.close()
    return results, False


def _tables(config: KelvinConfig, lambdas: list[float], train_truncation, seed: int, out: Path, resume: bool,
            progress: bool) -> tuple[dict[str, list[PolicyEntry]], dict, bool]:
    """The per-category table families and the headline's fixed-T rivals (the best T at each λ), tuned by the same
    fixed-T runs on the validation split: ``({family: entries}, {family: {λ: table}}, interrupted)``. Without the
    category in the observation (``env.include_category`` false) only the rivals: a table cannot be applied.
    The runs take ``evaluation.table_prompts`` of each category; the rival (and the table's ``other``) is the best
    T on the validation split's mix of categories (each category's mean weighted by its share of the split), not
    on those equal shares (configs/results.yaml: 6 factual questions of 40, where the split holds 29 of 80)."""
    from envs.rewards import RewardFunction
    from kelvin.evaluation.families import BASELINE_MAPPING, NO_TRUNCATION

    ev = config.evaluation
    pool = load_prompts(config.env.prompts, split="validation", categories=config.env.categories)
    by_cat: OrderedDict[str, list[Prompt]] = OrderedDict()
    for p in pool:
        by_cat.setdefault(p.category, []).append(p)
    prompts = [p for items in by_cat.values() for p in items[: ev.table_prompts]]
    k = config.env.group_size
    n_groups = max(1, min(config.env.batch_size // k, len(prompts)))
    tune_cfg = replace(config, env=replace(config.env, batch_size=n_groups * k, split="validation"))
    runner = Runner(tune_cfg, prompts, seed, out / "cache" / "tuning", resume)
    variants = {"table": NO_TRUNCATION}
    if train_truncation is not None and train_truncation.active:
        variants["table@train"] = train_truncation
    families, tables, interrupted = {}, {}, False
    reward = RewardFunction(replace(config.reward, group_baseline=False))
    shares = category_shares(pool)  # the rival answers for the split's mix, not the runs' equal shares
    try:
        for family, truncation in variants.items():
            from policies.registry import make_policy

            points = [PolicyEntry(f"tune:{family}:T={t:g}", f"T={t:g}", "tune",
                                  make_policy(f"fixed:{t:g}", tune_cfg.env.feature_spec(), BASELINE_MAPPING),
                                  params={"t": t}, truncation=truncation) for t in ev.table_temperatures]
            done, interrupted = _run_entries(runner, points, f"tune {family}", progress)
            if interrupted:
                break
            episodes = {e.params["t"]: [ep for g in done[e.cache_key].groups for ep in g] for e in points}
            tables[family] = tune_tables(episodes, lambdas, reward, weights=shares)
            if config.env.include_category:  # a table reads the category one-hot; without it, only the fixed-T rival
                families[family] = table_entries(tables[family], family, truncation, config)
            rival = "fixed-tuned" + family[len("table"):]  # the headline's fixed-T rival, tuned by the same runs
            families[rival] = tuned_fixed_entries(tables[family], rival, truncation, config)
    finally:
        runner.close()
    return families, tables, interrupted


def _setup(config: KelvinConfig, prompts: list[Prompt], lm, split: str | None, prompts_file: str | None, seed: int,
           command: str | None) -> dict:
    """The ``setup`` block of ``metrics.json``: what ran, on what, how (``wall_s`` is added at the end)."""
    import torch

    env = config.env
    return {
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "model": config.model.name, "device": str(lm.device), "split": split,
        "prompt_source": prompts_file or "packaged prompt set", "n_prompts": len(prompts),
        "n_answerable": sum(p.answerable for p in prompts), "n_open": sum(not p.answerable for p in prompts),
        "prompt_ids": [p.id for p in prompts], "prompt_texts": {p.id: p.text for p in prompts},
        "samples": env.group_size, "streams": config.evaluation.streams, "n_groups": env.batch_size // env.group_size, "batch_size": env.batch_size,
        "max_new_tokens": env.max_new_tokens, "seed": seed, "n_resamples": config.evaluation.bootstrap, "alpha": 0.05,
        "action_mapping": asdict(env.action), "truncation": env.truncation.to_dict(),
        "feature_spec_version": FEATURE_SPEC_VERSION, "config": config.to_dict(),
        "python": platform.python_version(), "torch": torch.__version__,
    }


def _policy_block(e: PolicyEntry, results: dict[str, PolicyResult]) -> dict:
    r = results[e.cache_key]
    return {"label": e.label, "family": e.family, "params": e.params, "run_dir": e.run_dir,
            "truncation": None if e.truncation is None else e.truncation.to_dict(), "diversity": e.diversity,
            "n_prompts": len(r.groups), "n_completions": sum(len(g) for g in r.groups), "wall_s": r.wall_s,
            "metrics": r.stats}


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _reference(main: list[PolicyEntry]) -> PolicyEntry:
    """The learned entry the paired differences are taken from (the middle λ of the first learned run), else
    the first compared policy."""
    learned = [e for e in main if e.family == "learned"]
    if not learned:
        return main[0]
    first = [e for e in learned if e.run_dir == learned[0].run_dir]
    return first[len(first) // 2]


def _write_outputs(out: Path, data: dict, config: KelvinConfig, main: list[PolicyEntry], results: dict, paired: dict,
                   warnings: list[str], t_start: float) -> None:
    """Figures, then ``report.md``, ``metrics.json``, ``metrics.csv``, ``samples.jsonl`` and ``tb/``."""
    setup, env_cfg = data["setup"], config.env
    out.mkdir(parents=True, exist_ok=True)
    reference = next(e for e in main if e.name == data["reference"])
    streams = f" x {setup['streams']} streams" if setup["streams"] > 1 else ""
    subtitle = (f"{config.model.name}, split {setup['split']}, {setup['n_prompts']} prompts x {setup['samples']} "
                f"samples{streams}, {env_cfg.max_new_tokens} tokens, seed {setup['seed']}")
    figures: dict[str, Path] = {}
    if data["fronts"]:
        figures["fronts"] = out / "fronts.png"
        plot_hulls(figures["fronts"], data["fronts"], subtitle)
    figures["temperature_trajectories"] = out / "temperature_trajectories.png"
    plot_trajectories(figures["temperature_trajectories"], results, main, env_cfg.max_new_tokens, subtitle)
    figures["temperature_hist"] = out / "temperature_hist.png"
    t_range = (min(e.policy.action_mapping.t_min for e in main), max(e.policy.action_mapping.t_max for e in main))
    plot_histograms(figures["temperature_hist"], results, main, t_range, subtitle)
    setup["wall_s"] = time.perf_counter() - t_start
    write_report(out / "report.md", data, main, results, reference, paired, warnings)
    write_text_atomic(out / "metrics.json", json.dumps(data, indent=2, default=_json_default, allow_nan=False))
    write_csv(out / "metrics.csv", data)
    write_samples(out / "samples.jsonl", main, results)
    write_tensorboard(out / "tb", data, (out / "report.md").read_text(), figures)


def evaluate(config: KelvinConfig, out_dir: str | Path, policies: Sequence[str], *, run: str | None = None,
             split: str | None = "test", prompts_file: str | None = None, seed: int = 0, families: bool = True,
             resume: bool = False, progress: bool = True, command: str | None = None) -> dict:
    """Evaluate ``policies`` (spec strings) and the baseline families on the same prompts and seeds; write every
    output to ``out_dir`` (see the module doc). Sizes and grids come from ``config.evaluation``.

    Returns the ``metrics.json`` content. Raises :class:`EvaluationError` for bad input before the LM is loaded
    (an output directory that cannot be written, a missing run, another model or feature version, an empty
    prompt file, a bad spec).
    """
    t_start = time.perf_counter()
    ev = config.evaluation
    out = Path(out_dir)
    check_output_dir(out)
    warnings: list[str] = []
    prompts = _prompts(config, prompts_file, split, ev.max_prompts)
    k = ev.samples
    n_groups = max(1, min(ev.batch_size // k, len(prompts)))
    # One process whatever env.workers says: a policy's numbers must not depend on how many Ray workers trained it
    # (one random stream cannot be split across shards), and evaluation batches its rows itself.
    config = replace(config, env=replace(config.env, group_size=k, batch_size=n_groups * k, seed=seed, split=split,
                                         prompts=prompts_file, workers=1, ray_address=None))
    main = resolve_policies(parse_policy_specs(policies), config, run, warnings)
    learned = [e for e in main if e.family == "learned"]
    train_truncation = learned[0].truncation if learned else None
    lambdas = sorted({d for e in learned for d in lambda_grid(e, config)}) or (list(ev.diversity or [0.0]))

    interrupted = False
    fams: dict[str, list[PolicyEntry]] = {}
    tables: dict = {}
    if families:
        fams = family_entries(config, train_truncation)
        if ev.table_temperatures:
            table_fams, tables, interrupted = _tables(config, lambdas, train_truncation, seed, out, resume, progress)
            fams.update(table_fams)
    rivals = {f: fams.pop(f) for f in list(fams) if f.startswith("fixed-tuned")}  # the headline's, not a front
    entries = list(OrderedDict((e.cache_key, e) for e in main + [e for es in (*fams.values(), *rivals.values())
                                                                 for e in es]).values())
    runner = Runner(config, prompts, seed, out / "cache", resume)
    try:
        results, stopped = ({}, True) if interrupted else _run_entries(runner, entries, "evaluate", progress)
    finally:
        runner.close()
    interrupted = interrupted or stopped
    if runner.reused:
        warnings.append(f"--resume: {runner.reused} runs reused from {out / 'cache'}")
    main = [e for e in main if e.cache_key in results]
    if not main:
        raise EvaluationError("interrupted before the first compared policy finished; nothing to report (rerun with "
                              "--resume)")
    fams = {f: es for f, es in fams.items() if all(e.cache_key in results for e in es)}  # complete families only
    rivals = {f: es for f, es in rivals.items() if all(e.cache_key in results for e in es)}
    if interrupted:
        warnings.append("interrupted (Ctrl-C): the report covers the runs finished so far")

    reference = _reference(main)
    paired = {e.name: paired_differences(results[reference.cache_key], results[e.cache_key], ev.bootstrap, seed)
              for e in main if e is not reference and e.family != "learned"}
    fronts = compute_fronts(results, main, fams, ev.bootstrap, seed) if fams else []
    data: dict[str, Any] = {
        "setup": _setup(config, prompts, runner.lm, split, prompts_file, seed, command),
        "interrupted": interrupted,
        "reference": reference.name,
        "policies": {e.name: _policy_block(e, results) for e in main},
        "paired_differences": {"reference": reference.name, "baselines": paired},
        "families": {f: {"title": FAMILY_TITLES[f], "points": {e.name: _policy_block(e, results) for e in es}}
                     for f, es in fams.items()},
        "tables": {f: {f"{diversity:g}": t for diversity, t in ts.items()} for f, ts in tables.items()},
        "fronts": fronts,
        "headline": reward_headline(results, main, {**fams, **rivals}, ev.bootstrap, seed),
        "dial": dial_check(results, main),
        "goals": goals(results, main, fams, fronts, ev.bootstrap, seed) if fams else {},
        "categories": category_tables(results, main, fams),
        "metric_definitions": {m.name: {"group": m.group, "unit": m.unit, "direction": m.direction, "doc": m.doc}
                               for m in METRICS},
        "warnings": warnings,
    }
    _write_outputs(out, data, config, main, results, paired, warnings, t_start)
    return data
