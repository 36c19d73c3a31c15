"""Baselines by short name: ``make_policy("edt:theta=1.0,t0=0.8", spec, mapping)``.

Spec strings are ``NAME`` or ``NAME:PARAMS`` where ``PARAMS`` is a comma-separated list of
``key=value`` (keys are the constructor's keyword arguments, matched case-insensitively; values
are numbers, ``inf``, or ``none`` for parameters that accept None). ``fixed`` also takes a bare
value: ``fixed:0.7`` = ``fixed:t=0.7``. Presets (``greedy``, ``pid-positive``) start from their
preset values and accept the same keys.

| name           | policy                               |
|----------------|--------------------------------------|
| `fixed`        | FixedTemperature(t=1.0)              |
| `greedy`       | FixedTemperature(t=0.0)              |
| `pid`          | PIDController()                      |
| `pid-positive` | PIDController.positive()             |
| `edt`          | EntropyDynamicTemperature()          |
| `maxprob`      | MaxProbRule()                        |
| `entropy`      | EntropyRule()                        |
| `median`       | MedianRule()                         |
| `combined`     | CombinedRule()                       |
| `dynatemp`     | DynaTemp()                           |
| `surprise`     | SurpriseController()                 |
| `hotcold`      | HotColdSchedule()                    |
| `table`        | CategoryTable() (``table:code=0.3``) |

``policy.to_config()`` -> ``{"name": ..., "params": {...}}`` and :func:`policy_from_config`
round-trip a policy through JSON.
"""

from __future__ import annotations

import math
from typing import Any

from policies.actions import ActionMapping
from policies.base import BaselinePolicy
from policies import baselines
from policies.features import FeatureSpec
from samplers.suggest import did_you_mean

__all__ = ["BASELINE_NAMES", "all_baselines", "make_policy", "policy_from_config"]

# short name -> (class, preset parameters)
_REGISTRY: dict[str, tuple[type[BaselinePolicy], dict[str, Any]]] = {
    "fixed": (baselines.FixedTemperature, {}),
    "greedy": (baselines.FixedTemperature, {"t": 0.0}),
    "pid": (baselines.PIDController, {}),
    "pid-positive": (baselines.PIDController, dict(baselines.PIDController.POSITIVE_PRESET)),
    "edt": (baselines.EntropyDynamicTemperature, {}),
    "maxprob": (baselines.MaxProbRule, {}),
    "entropy": (baselines.EntropyRule, {}),
    "median": (baselines.MedianRule, {}),
    "combined": (baselines.CombinedRule, {}),
    "dynatemp": (baselines.DynaTemp, {}),
    "surprise": (baselines.SurpriseController, {}),
    "hotcold": (baselines.HotColdSchedule, {}),
    "table": (baselines.CategoryTable, {}),
}

BASELINE_NAMES: list[str] = list(_REGISTRY)
"""Every short name :func:`make_policy` understands, in table order."""


def _lookup(name: str) -> tuple[type[BaselinePolicy], dict[str, Any]]:
    key = name.strip().lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown policy {name!r}; {did_you_mean(key, BASELINE_NAMES, always_list=True)}")
    return _REGISTRY[key]


def _canonical_key(policy: str, cls: type[BaselinePolicy], key: str, feature_spec: FeatureSpec) -> str:
    """The constructor parameter ``key`` names (case-insensitive), or a ValueError listing valid ones."""
    valid = list(cls.param_defaults(feature_spec))
    by_lower = {v.lower(): v for v in valid}
    k = key.strip()
    if k in valid:
        return k
    if k.lower() in by_lower:
        return by_lower[k.lower()]
    raise ValueError(f"unknown parameter {key!r} for policy {policy!r}; {did_you_mean(k, valid, always_list=True)}")


def _coerce(policy: str, cls: type[BaselinePolicy], key: str, value: Any, feature_spec: FeatureSpec) -> Any:
    """A parameter value from a spec string or a config: a number (or None where allowed)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "off")):
        if key in cls.optional_params:
            return None
        raise ValueError(f"parameter {key!r} of policy {policy!r} cannot be None; give a number")
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise ValueError(
                f"parameter {key}={value!r} of policy {policy!r} is not a number; write e.g. {key}=0.5"
            ) from None
    elif isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"parameter {key}={value!r} of policy {policy!r} must be a number")
    else:
        number = float(value)
    if math.isnan(number):
        raise ValueError(f"parameter {key}=nan of policy {policy!r} must be a real number")
    default = cls.param_defaults(feature_spec)[key]
    if isinstance(default, int) and not isinstance(default, bool):
        if not number.is_integer():
            raise ValueError(f"parameter {key}={value!r} of policy {policy!r} must be an integer")
        return int(number)
    return number


def _build(name: str, params: dict[str, Any], feature_spec: FeatureSpec,
           action_mapping: ActionMapping | None) -> BaselinePolicy:
    cls, preset = _lookup(name)
    short = name.strip().lower()
    resolved = dict(preset)
    for key, value in params.items():
        k = _canonical_key(short, cls, key, feature_spec)
        resolved[k] = _coerce(short, cls, k, value, feature_spec)
    policy = cls(feature_spec, action_mapping, **resolved)
    policy.name = short
    return policy


def make_policy(spec: str, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None) -> BaselinePolicy:
    """A baseline from a spec string: ``fixed:0.7``, ``greedy``, ``pid``, ``edt:theta=1.0,t0=0.8``, ...

    Raises ValueError for an unknown name (with the closest known one), an unknown parameter
    (listing the valid ones), a non-numeric value, or a value the policy rejects.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"policy spec must be a non-empty string like 'edt' or 'fixed:0.7'; got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    cls, _ = _lookup(name)
    params: dict[str, Any] = {}
    items = [item.strip() for item in rest.split(",") if item.strip()]
    for i, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            if i == 0 and cls.positional is not None:
                key, value = cls.positional, item
            else:
                raise ValueError(
                    f"policy spec {spec!r}: {item!r} is not key=value; write e.g. "
                    f"'{name.strip()}:{next(iter(cls.param_defaults(feature_spec)))}=...' "
                    f"(valid parameters: {', '.join(cls.param_defaults(feature_spec))})"
                )
        k = _canonical_key(name.strip().lower(), cls, key, feature_spec)
        if k in params:
            raise ValueError(f"policy spec {spec!r} sets {k!r} twice")
        params[k] = value
    return _build(name, params, feature_spec, action_mapping)


def policy_from_config(config: dict, feature_spec: FeatureSpec,
                       action_mapping: ActionMapping | None = None) -> BaselinePolicy:
    """Rebuild a baseline from ``policy.to_config()`` (``{"name": ..., "params": {...}}``)."""
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"policy config must be a dict with 'name' (and 'params'); got {config!r}")
    extra = set(config) - {"name", "params"}
    if extra:
        raise ValueError(f"policy config has unknown keys {sorted(extra)}; expected 'name' and 'params'")
    params = config.get("params") or {}
    if not isinstance(params, dict):
        raise ValueError(f"policy config 'params' must be a dict; got {params!r}")
    return _build(str(config["name"]), params, feature_spec, action_mapping)


def all_baselines(feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None) -> list[BaselinePolicy]:
    """The default instance of every baseline, in :data:`BASELINE_NAMES` order."""
    return [make_policy(name, feature_spec, action_mapping) for name in BASELINE_NAMES]
