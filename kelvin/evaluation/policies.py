"""The policies an evaluation compares: ``--policies`` specs, learned runs (checked against the evaluation's
config; a λ-conditioned one at each λ of its front), baselines and ``guarded:`` wrappers. The swept
baseline families are :mod:`kelvin.evaluation.families`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Sequence

import numpy as np

from kelvin.atomic import RunDirError
from kelvin.config import ConfigError, KelvinConfig
from kelvin.export import learned_policy
from kelvin.rundir import RunDir, content_hash, load_ppo, load_vecnormalize, model_files
from policies.base import TemperaturePolicy
from policies.features import FeatureSpec
from policies.guard import GuardedPolicy
from policies.registry import BASELINE_NAMES, make_policy
from policies.tuned_base import TunedBasePolicy
from samplers.core import Truncation
from samplers.runtime import check_diversity

__all__ = ["EvaluationError", "PolicyEntry", "lambda_grid", "load_learned_policy", "parse_policy_specs",
           "resolve_policies"]


class EvaluationError(ValueError):
    """Evaluation input that cannot be used; the message names the input and what to do."""


@dataclass
class PolicyEntry:
    """A policy to evaluate: its key in the outputs, display label, family and the policy object, and the
    setting it runs under: the truncation (None = the evaluation config's) and the diversity dial λ of
    its groups (None = 0; it matters to a λ-conditioned policy and to the composite reward)."""

    name: str
    label: str
    family: str
    policy: TemperaturePolicy
    params: dict = field(default_factory=dict)
    run_dir: str | None = None
    truncation: Truncation | None = None
    diversity: float | None = None
    model_hash: str | None = None  # a learned policy: content hash of its model and statistics files

    @property
    def cache_key(self) -> str:
        """Two entries with the same key are the same run: it runs once (and ``--resume`` finds it). A learned
        policy is known by the content of its model and statistics files (and its tuned base), not by its run's
        name."""
        what = {"name": self.family, "params": self.params}
        if self.run_dir is not None:
            what = {**what, "run": self.run_dir, "model": self.model_hash}
        return json.dumps({**what, "mapping": asdict(self.policy.action_mapping), "diversity": self.diversity,
                           "truncation": None if self.truncation is None else self.truncation.to_dict()},
                          sort_keys=True, default=str)


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


# --------------------------------------------------------------------------- learned runs
def _spec_differences(a: FeatureSpec, b: FeatureSpec) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: run {da.get(k)!r} vs evaluation {db.get(k)!r}" for k in sorted(set(da) | set(db))
            if k != "names" and da.get(k) != db.get(k)]


def _run_config(target: str, run: RunDir) -> KelvinConfig:
    if not run.config_file.is_file():
        raise EvaluationError(f"learned policy {target!r}: {run.config_file} is missing, so the model, feature spec "
                              "and action mapping it was trained with are unknown; evaluate a run written by train.py")
    try:
        return run.load_config()
    except ConfigError as exc:
        raise EvaluationError(f"learned policy {target!r}: its config cannot be read ({exc})") from exc


def _check_compatible(target: str, run_cfg: KelvinConfig, config: KelvinConfig, run: RunDir,
                      warnings: list[str]) -> None:
    """Errors for another LM, observation layout or action mapping; warnings for milder differences."""
    if run_cfg.model.name != config.model.name:
        raise EvaluationError(
            f"learned policy {target!r} was trained with model {run_cfg.model.name!r} but this evaluation uses "
            f"{config.model.name!r}; its features describe another model's logits. Evaluate with the run's model "
            f"(--config {run.config_file} or --set model.name={run_cfg.model.name})")
    diffs = _spec_differences(run_cfg.env.feature_spec(), config.env.feature_spec())
    if diffs:
        raise EvaluationError(
            f"learned policy {target!r} was trained on other observations ({'; '.join(diffs)}). Evaluate with the "
            f"run's env settings (--config {run.config_file}; horizon comes from env.max_new_tokens, categories "
            "from env.include_category)")
    if run_cfg.env.action != config.env.action:
        raise EvaluationError(
            f"learned policy {target!r} was trained with action mapping {asdict(run_cfg.env.action)} but this "
            f"evaluation uses {asdict(config.env.action)}; its actions would mean other temperatures. Use the run's "
            "env.action block")
    if (run_cfg.model.chat_template, run_cfg.model.system_prompt) != (config.model.chat_template,
                                                                      config.model.system_prompt):
        warnings.append(f"{target}: trained with chat_template={run_cfg.model.chat_template}, system_prompt="
                        f"{run_cfg.model.system_prompt!r}; evaluated with chat_template={config.model.chat_template}, "
                        f"system_prompt={config.model.system_prompt!r}")
    if asdict(run_cfg.reward) != asdict(config.reward):
        warnings.append(f"{target}: the evaluation's reward block differs from the one it was trained with; the "
                        "composite reward is the evaluation's")
    if run_cfg.env.truncation != config.env.truncation:
        warnings.append(f"{target}: trained with truncation {run_cfg.env.truncation.to_dict()}, evaluated with "
                        f"{config.env.truncation.to_dict()}")


def load_learned_policy(target: str, config: KelvinConfig,
                        warnings: list[str]) -> tuple[TemperaturePolicy, str, str]:
    """The :class:`~policies.learned.LearnedPolicy` of a run directory or checkpoint, checked against the
    evaluation's config; its run directory; and the content hash of its model and statistics files.

    Errors (:class:`EvaluationError`) for a missing path, a run without ``config.yaml``, another LM,
    another feature-spec version or observation layout, another action mapping, an observation size
    the model does not take, an unreadable model file, statistics of another save than the model's (as
    ``--resume`` checks them), or missing statistics of a run that normalised its observations. Reward or
    truncation differences only warn.
    """
    try:
        run, model_path, norm_path = model_files(target)
    except (FileNotFoundError, RunDirError) as exc:
        raise EvaluationError(f"learned policy {target!r}: {exc}") from None
    run_cfg = _run_config(target, run)
    _check_compatible(target, run_cfg, config, run, warnings)
    spec = config.env.feature_spec()
    try:
        model = load_ppo(model_path)
        vec = None if norm_path is None else load_vecnormalize(norm_path, step=model.num_timesteps)
    except RunDirError as exc:
        raise EvaluationError(f"learned policy {target!r}: {exc}") from exc
    if norm_path is None and run_cfg.train.normalize_obs:
        raise EvaluationError(f"learned policy {target!r}: the run normalised its observations "
                              f"(train.normalize_obs) but no statistics lie next to {model_path.name}; restore them "
                              "or evaluate another checkpoint")
    shape = tuple(model.observation_space.shape)
    if shape != (spec.dim,):
        raise EvaluationError(
            f"learned policy {target!r} takes observations of shape {shape} but this feature spec has {spec.dim} "
            f"features ({', '.join(spec.names)}); it was trained with another observation layout")
    if model_path == run.best_model_file:
        name = f"{run.path.name}/best"  # train.keep_best's pick, not the last update
    else:
        name = run.path.name if model_path.name == "model.zip" else f"{run.path.name}/{model_path.stem}"
    try:
        base = run.load_base()
        if base is not None:
            base.check_serves(spec, run_cfg.env.diversity_bounds, owner=f"learned policy {target!r}")
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    return (learned_policy(model, vec, spec, config.env.action, label=f"learned ({name})", base=base), str(run.path),
            content_hash(model_path, norm_path, *([run.base_file] if base is not None else [])))


def load_base_policy(target: str, config: KelvinConfig, warnings: list[str]) -> tuple[TemperaturePolicy, str]:
    """A run's tuned base alone (its residual at zero: what PPO started from), checked like :func:`load_learned_policy`."""
    run = RunDir(target)
    run_cfg = _run_config(target, run)
    _check_compatible(target, run_cfg, config, run, warnings)
    try:
        base = run.load_base()
    except RunDirError as exc:
        raise EvaluationError(f"base policy {target!r}: {exc}") from None
    if base is None:
        raise EvaluationError(f"base policy {target!r}: {run.base_file} is missing; the run was trained without a "
                              "tuned base (policy.base: none), so there is no base to evaluate")
    spec = config.env.feature_spec()
    try:
        base.check_serves(spec, run_cfg.env.diversity_bounds, owner=f"base policy {target!r}")
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    return TunedBasePolicy(base, spec, config.env.action, label=f"base ({run.path.name}, {base.kind})"), str(run.path)


# --------------------------------------------------------------------------- specs -> entries
def _entry(spec: str, config: KelvinConfig, run: str | None, warnings: list[str]) -> PolicyEntry:
    """The entry of one expanded ``--policies`` item."""
    if spec.startswith("guarded:"):  # any policy behind the samplers' default guard rails, in their order
        inner = _entry(spec[len("guarded:"):], config, run, warnings)
        policy = GuardedPolicy(inner.policy)
        return PolicyEntry(f"guarded:{inner.name}", policy.label, "guarded", policy,
                           params={"inner": inner.name, **policy.params}, run_dir=inner.run_dir,
                           model_hash=inner.model_hash)
    if spec.startswith("base:"):  # a run's tuned base alone: what PPO adds is learned - base
        target = spec.partition(":")[2] or run
        policy, run_dir = load_base_policy(target, config, warnings)
        return PolicyEntry(f"base:{target}", policy.label, "base", policy, run_dir=run_dir,
                           truncation=RunDir(run_dir).load_config().env.truncation,
                           model_hash=content_hash(RunDir(run_dir).base_file))
    if spec == "learned" or spec.startswith("learned:"):
        target = spec.partition(":")[2] or run
        if not target:
            raise EvaluationError("policy 'learned' needs a run: give --run runs/NAME or learned:runs/NAME")
        policy, run_dir, model_hash = load_learned_policy(target, config, warnings)
        return PolicyEntry(f"learned:{target}", policy.label, "learned", policy, run_dir=run_dir,
                           truncation=RunDir(run_dir).load_config().env.truncation, model_hash=model_hash)
    try:
        policy = make_policy(spec, config.env.feature_spec(), config.env.action)
    except ValueError as exc:
        raise EvaluationError(f"--policies item {spec!r}: {exc}") from exc
    return PolicyEntry(spec, policy.label, policy.name, policy, params=policy.params)


def lambda_grid(entry: PolicyEntry, config: KelvinConfig) -> list[float]:
    """The λ values a learned policy is evaluated at: ``evaluation.diversity`` (each inside the range its run was
    trained on, else an :class:`EvaluationError`), else ``evaluation.diversity_points`` values evenly over that range;
    ``[]`` for a policy that does not observe λ."""
    if entry.run_dir is None or not entry.policy.feature_spec.include_diversity:
        return []
    ev = config.evaluation
    low, high = RunDir(entry.run_dir).load_config().env.diversity_bounds
    if ev.diversity is not None:
        try:  # a network is not to be trusted on a λ it never saw: the samplers' own check
            return [check_diversity(v, None, (low, high), owner=f"{entry.name}: evaluation.diversity entry")
                    for v in ev.diversity]
        except ValueError as exc:
            raise EvaluationError(str(exc)) from None
    return [float(v) for v in np.linspace(low, high, ev.diversity_points)] if high > low else [float(low)]


def _at_lambdas(entry: PolicyEntry, config: KelvinConfig) -> list[PolicyEntry]:
    """A λ-conditioned learned policy becomes one entry per λ (its front); any other entry stays one."""
    grid = lambda_grid(entry, config)
    if not grid:
        return [entry]
    return [replace(entry, name=f"{entry.name}@λ={diversity:g}", label=f"{entry.label} λ={diversity:g}",
                    diversity=diversity, params={**entry.params, "lambda": diversity}) for diversity in grid]


def resolve_policies(specs: Sequence[str], config: KelvinConfig, run: str | None,
                     warnings: list[str]) -> list[PolicyEntry]:
    """Policy entries for ``--policies`` items (``all``, ``learned[:RUN]``, baseline specs, ``guarded:`` + any
    of those = that policy behind the samplers' default guard rails); unique names. A learned policy that
    observes the diversity dial λ gives one entry per λ (:func:`lambda_grid`)."""
    expanded: list[str] = []
    for s in specs:
        if s.strip().lower() == "all":
            expanded += (["learned"] if run else []) + list(BASELINE_NAMES)
        else:
            expanded.append(s.strip())
    entries = [e for s in expanded for e in _at_lambdas(_entry(s, config, run, warnings), config)]
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise EvaluationError(f"policy {e.name!r} is listed twice in --policies; list each policy once")
        seen.add(e.name)
    return entries
