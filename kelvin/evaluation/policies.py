"""The policies an evaluation runs: ``--policies`` specs, learned runs (checked against the evaluation's
config), baselines, ``guarded:`` wrappers, and the baseline families swept for the fronts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from kelvin.config import ConfigError, KelvinConfig
from kelvin.export import learned_policy
from kelvin.rundir import RunDir, RunDirError, load_ppo, load_vecnormalize, model_files
from policies.base import TemperaturePolicy
from policies.features import FeatureSpec
from policies.guard import GuardedPolicy
from policies.registry import BASELINE_NAMES, make_policy
from samplers.core import did_you_mean

__all__ = ["EvaluationError", "PolicyEntry", "SWEEP_GRIDS", "load_learned_policy", "parse_policy_specs",
           "parse_sweep_grid", "resolve_policies", "sweep_entries"]

# family -> (parameter swept, grid). Fixed T includes negatives (inverted distributions).
SWEEP_GRIDS: dict[str, tuple[str, list[float]]] = {
    "fixed": ("t", [-1.0, -0.5, -0.2, 0.2, 0.5, 0.7, 1.0, 1.3]),
    "edt": ("theta", [0.5, 1.5, 3.0, 6.0, 12.0]),
    "pid": ("target", [0.3, 0.5, 0.7, 0.9]),
    "dynatemp": ("delta", [0.0, 0.25, 0.5, 0.75, 1.0]),
}


class EvaluationError(ValueError):
    """Evaluation input that cannot be used; the message names the input and what to do."""


@dataclass
class PolicyEntry:
    """A policy to evaluate: its key in the outputs, display label, family and the policy object."""

    name: str
    label: str
    family: str
    policy: TemperaturePolicy
    params: dict = field(default_factory=dict)
    run_dir: str | None = None

    @property
    def cache_key(self) -> str:
        """Two entries with the same key are the same policy: it runs once."""
        if self.family == "learned":
            return f"learned:{self.run_dir}"
        return json.dumps({"name": self.family, "params": self.params}, sort_keys=True, default=str)


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


def load_learned_policy(target: str, config: KelvinConfig, warnings: list[str]) -> tuple[TemperaturePolicy, str]:
    """The :class:`~policies.learned.LearnedPolicy` of a run directory or checkpoint, checked against the
    evaluation's config; and its run directory.

    Errors (:class:`EvaluationError`) for a missing path, a run without ``config.yaml``, another LM,
    another feature-spec version or observation layout, another action mapping, an observation size
    the model does not take, or an unreadable model file. Reward or truncation differences only warn.
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
        vec = None if norm_path is None else load_vecnormalize(norm_path)
    except RunDirError as exc:
        raise EvaluationError(f"learned policy {target!r}: {exc}") from exc
    shape = tuple(model.observation_space.shape)
    if shape != (spec.dim,):
        raise EvaluationError(
            f"learned policy {target!r} takes observations of shape {shape} but this feature spec has {spec.dim} "
            f"features ({', '.join(spec.names)}); it was trained with another observation layout")
    if norm_path is None:
        warnings.append(f"{target}: no VecNormalize statistics found next to {model_path.name}; using raw observations")
    name = run.path.name if model_path.name == "model.zip" else f"{run.path.name}/{model_path.stem}"
    return learned_policy(model, vec, spec, config.env.action, label=f"learned ({name})"), str(run.path)


# --------------------------------------------------------------------------- specs -> entries
def _entry(spec: str, config: KelvinConfig, run: str | None, warnings: list[str]) -> PolicyEntry:
    """The entry of one expanded ``--policies`` item."""
    if spec.startswith("guarded:"):  # any policy behind the samplers' default guard rails, in their order
        inner = _entry(spec[len("guarded:"):], config, run, warnings)
        policy = GuardedPolicy(inner.policy)
        return PolicyEntry(f"guarded:{inner.name}", policy.label, "guarded", policy,
                           params={"inner": inner.name, **policy.params}, run_dir=inner.run_dir)
    if spec == "learned" or spec.startswith("learned:"):
        target = spec.partition(":")[2] or run
        if not target:
            raise EvaluationError("policy 'learned' needs a run: give --run runs/NAME or learned:runs/NAME")
        policy, run_dir = load_learned_policy(target, config, warnings)
        return PolicyEntry(f"learned:{target}", policy.label, "learned", policy, run_dir=run_dir)
    try:
        policy = make_policy(spec, config.env.feature_spec(), config.env.action)
    except ValueError as exc:
        raise EvaluationError(f"--policies item {spec!r}: {exc}") from exc
    return PolicyEntry(spec, policy.label, policy.name, policy, params=policy.params)


def resolve_policies(specs: Sequence[str], config: KelvinConfig, run: str | None,
                     warnings: list[str]) -> list[PolicyEntry]:
    """Policy entries for ``--policies`` items (``all``, ``learned[:RUN]``, baseline specs, ``guarded:`` + any
    of those = that policy behind the samplers' default guard rails); unique names."""
    expanded: list[str] = []
    for s in specs:
        if s.strip().lower() == "all":
            expanded += (["learned"] if run else []) + list(BASELINE_NAMES)
        else:
            expanded.append(s.strip())
    entries = [_entry(s, config, run, warnings) for s in expanded]
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise EvaluationError(f"policy {e.name!r} is listed twice in --policies; list each policy once")
        seen.add(e.name)
    return entries


def sweep_entries(config: KelvinConfig, grids: dict[str, tuple[str, list[float]]]) -> dict[str, list[PolicyEntry]]:
    """One entry per grid point of every baseline family (``fixed:t=0.5``, ``edt:theta=3`` ...)."""
    spec, mapping = config.env.feature_spec(), config.env.action
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
    grids: dict[str, Any] = {k: (p, list(v)) for k, (p, v) in SWEEP_GRIDS.items()}
    for item in items or []:
        key, eq, values = item.partition("=")
        if not eq:
            raise EvaluationError(f"--sweep-grid {item!r}: expected FAMILY=v1,v2,... (e.g. fixed=0.5,1.0) or FAMILY= "
                                  "to leave the family out")
        family, _, param = key.strip().partition(":")
        if family not in BASELINE_NAMES:
            raise EvaluationError(f"--sweep-grid {item!r}: unknown family {family!r}; "
                                  f"{did_you_mean(family, BASELINE_NAMES)}")
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
