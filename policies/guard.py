r"""Guard rails around any temperature policy: bounds, rate limit, anomaly reset, fallback.

:class:`GuardedPolicy` wraps a :class:`~policies.base.TemperaturePolicy` (a baseline, a
:class:`~policies.learned.LearnedPolicy`, an exported one) and is one itself. Per step and per row,
in this exact order (the order every sampler applies):

0. **The policy's temperature**: its actions through its own action mapping, *with the mapping's
   rate limit* against the observation's ``prev_temperature`` (as the env applies it in training).
1. **Fallback**: a row whose observation holds NaN / inf, or for which the policy raised or
   returned a non-finite action, gets ``fallback_temperature`` (the policy sees the bad rows
   zeroed, so one bad row does not take the batch down; when the policy raises, every row falls
   back). Counter ``fallback``: rows that fell back.
2. **Clamp**: ``T = clamp(T, t_min, t_max)``. Counter ``clamp``: rows whose (finite) policy output
   was outside the bounds.
3. **Rate limit**: ``|T_t - T_(t-1)| <= max_delta`` against the guard's own previous output of the
   row; not on a row's first step (``episode_start``, first call, new batch size, :meth:`reset`),
   and not on fallback rows (a fallback is applied at once). Counter ``rate_limit``: rows the
   limit changed.
4. **Anomaly reset**: where the observation's ``anomaly`` feature exceeds ``anomaly_threshold``,
   ``T = clamp(T, *safe_range)``, ignoring the rate limit (safety first), and the row stays in the
   safe range for the next ``hold`` tokens even when the feature drops (without the hold a policy
   stuck at T < 0 alternates: one anomalous token, one reset, one anomalous token ...); after that
   the rate limit brings it back gradually. Counter ``anomaly_reset``: row-steps the reset or the
   hold changed.

The guard's decision is the last word: its own action mapping is the policy's without a rate limit
(``max_delta=None``), so an env or sampler that maps its actions applies its temperatures as they are
(a reset is never rate limited again). ``evaluate.py guarded:X`` runs this same order.

``guard.counters`` is a dict ``{clamp, rate_limit, anomaly_reset, fallback}`` of intervention
counts since construction or :meth:`GuardedPolicy.reset_counters`; ``guard.decisions`` counts the
(row, step) pairs seen, so ``counters[k] / decisions`` is a rate. Counting happens on the device
(no sync per step); reading ``counters`` syncs once. With ``enabled=False`` the guard passes the
policy's temperatures through untouched and counts nothing.

Settings (:class:`GuardSettings`, read from any ``guard`` argument by :func:`resolve_guard`): bounds from the wrapped policy's action mapping,
``max_delta = 0.5`` per token, ``safe_range = (0.1, 0.7)`` (ordinary, sharpened sampling: where the
anomalous-token regime of negative temperatures ends) and ``fallback_temperature = 0.7``, both
clipped into the bounds, ``hold = 8`` tokens, ``anomaly_threshold = 0.5`` (the
``anomaly`` feature is an EMA of the per-token indicator of :class:`anomaly.detector.AnomalyDetector`;
0.5 fires after about four anomalous draws in a row).

Serialisation: ``to_config()`` -> ``{"name": "guarded", "params": {...}, "policy": inner config}``;
:meth:`GuardedPolicy.from_config` rebuilds it (pass ``policy=`` for a policy that is not a baseline).

The samplers (:class:`samplers.runtime.PolicyRuntime` and every engine adapter on it) guard every
policy by default through :func:`apply_guard`: ``guard=True`` (the defaults, or the ``guard`` block
an export wrote into ``spec.json``), ``guard={"max_delta": 0.3}`` or a :class:`GuardSettings` (settings),
``guard=False`` (off).
By hand::

    policy = GuardedPolicy(load_policy("runs/default/export"), max_delta=0.3)
    policy.counters    # {"clamp": 0, "rate_limit": 12, "anomaly_reset": 0, "fallback": 0}
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, fields, replace
from typing import Annotated, Optional

import torch
from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, ValidationError
from pydantic.dataclasses import dataclass as settings_dataclass

from policies.actions import ActionMapping, anomaly_reset, rate_limit
from policies.base import TemperaturePolicy
from samplers.suggest import did_you_mean

__all__ = ["GUARD_COUNTERS", "GUARD_SETTINGS", "GuardSettings", "GuardedPolicy", "apply_guard", "resolve_guard"]

GUARD_COUNTERS = ("clamp", "rate_limit", "anomaly_reset", "fallback")
"""Intervention kinds, the keys of :attr:`GuardedPolicy.counters`."""


DEFAULT_MAX_DELTA = 0.5
DEFAULT_SAFE_RANGE = (0.1, 0.7)
DEFAULT_FALLBACK_TEMPERATURE = 0.7
DEFAULT_ANOMALY_THRESHOLD = 0.5
DEFAULT_HOLD = 8


def _real(value):
    """Any real number (an int, a numpy float) as a float; anything else (a bool, a string) as it is, for the
    strict float check to reject."""
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else value


def _rate(value):
    """``max_delta``: +inf means no rate limit, as None does."""
    value = _real(value)
    return None if isinstance(value, float) and math.isinf(value) and value > 0 else value


def _tokens(value):
    """``hold``: None = 0 tokens; a whole float (8.0, from JSON) = that integer."""
    if value is None:
        return 0
    return int(value) if isinstance(value, float) and value.is_integer() else value


Real = Annotated[StrictFloat, BeforeValidator(_real), Field(allow_inf_nan=False)]
"""A finite real number (an int or a numpy float is converted; a bool or a string is an error)."""


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class GuardSettings:
    """The guard rails' settings: the ``guard`` block of an export's ``spec.json``, a sampler's ``guard={...}``,
    the keyword arguments of :class:`GuardedPolicy` (the rules are in the module doc).

    A frozen pydantic dataclass (the style of :mod:`kelvin.config`): each field's type and range is checked when
    it is built. The bounds, ``safe_range`` and ``fallback_temperature`` default to None, "from the policy's
    action mapping"; :meth:`resolved` fills them in and checks them against the bounds. Build one from a
    sampler's ``guard`` argument with :func:`resolve_guard`, which also turns a bad value into one line.
    """

    t_min: Optional[Real] = None
    """Lowest temperature the guard lets through; None = the policy's ``action_mapping.t_min``."""
    t_max: Optional[Real] = None
    """Highest temperature the guard lets through; None = the policy's ``action_mapping.t_max``."""
    max_delta: Annotated[Optional[Real], BeforeValidator(_rate)] = Field(DEFAULT_MAX_DELTA, gt=0)
    """Rate limit: largest |T_t - T_(t-1)| per token; None (or inf) = no rate limit."""
    safe_range: Optional[tuple[Real, Real]] = None
    """``(lo, hi)`` the anomaly reset clamps into, inside the bounds; None = (0.1, 0.7) clipped into the bounds."""
    fallback_temperature: Optional[Real] = None
    """Temperature of a row whose observation or policy output is not finite; None = 0.7 clipped into the
    bounds."""
    anomaly_threshold: Optional[Real] = DEFAULT_ANOMALY_THRESHOLD
    """The ``anomaly`` feature above which a row resets into ``safe_range``; None = no anomaly reset."""
    hold: Annotated[StrictInt, BeforeValidator(_tokens)] = Field(DEFAULT_HOLD, ge=0)
    """Tokens a reset row stays in ``safe_range`` after the feature drops (None or 0 = no hold)."""
    enabled: StrictBool = True
    """False: the policy's temperatures pass through untouched (no guard)."""

    def resolved(self, action_mapping: ActionMapping, owner: str = "guard") -> "GuardSettings":
        """These settings with the defaults of ``action_mapping`` filled in and checked against the bounds: a
        policy trained on [-2, -0.1] gets safe range and fallback -0.1. Raises ValueError naming ``owner``'s
        setting and the fix."""
        t_min = action_mapping.t_min if self.t_min is None else self.t_min
        t_max = action_mapping.t_max if self.t_max is None else self.t_max
        if not t_min < t_max:
            raise ValueError(f"{owner} bounds t_min={t_min} >= t_max={t_max}: the temperature range is empty; "
                             "set t_min below t_max")

        def clip(x: float) -> float:
            return min(max(x, t_min), t_max)

        safe_lo, safe_hi = ((clip(DEFAULT_SAFE_RANGE[0]), clip(DEFAULT_SAFE_RANGE[1])) if self.safe_range is None
                            else self.safe_range)
        if not t_min <= safe_lo <= safe_hi <= t_max:
            raise ValueError(f"{owner} safe_range=({safe_lo}, {safe_hi}) must be ordered and inside the bounds "
                             f"[t_min={t_min}, t_max={t_max}]")
        fallback = clip(DEFAULT_FALLBACK_TEMPERATURE) if self.fallback_temperature is None else self.fallback_temperature
        if not t_min <= fallback <= t_max:
            raise ValueError(f"{owner} fallback_temperature={fallback} must lie in the bounds [t_min={t_min}, "
                             f"t_max={t_max}]")
        return replace(self, t_min=t_min, t_max=t_max, safe_range=(safe_lo, safe_hi), fallback_temperature=fallback)

    def to_dict(self) -> dict:
        """JSON-safe (``safe_range`` a list): the ``guard`` block of ``spec.json``, a guard's ``params``."""
        out = asdict(self)
        out["safe_range"] = None if self.safe_range is None else list(self.safe_range)
        return out


GUARD_SETTINGS = tuple(f.name for f in fields(GuardSettings))
"""Keys of a guard setting (the fields of :class:`GuardSettings`)."""

_MUST = {
    "t_min": "a finite number (None = the policy's action mapping's t_min)",
    "t_max": "a finite number (None = the policy's action mapping's t_max)",
    "max_delta": "a number > 0, or None to switch the rate limit off",
    "safe_range": "a pair (lo, hi) of finite numbers, e.g. (0.1, 0.7)",
    "fallback_temperature": "a finite number inside the bounds, e.g. 0.7",
    "anomaly_threshold": "a finite number, or None to switch the anomaly reset off",
    "hold": "a whole number of tokens >= 0 (0 = no hold after a reset)",
    "enabled": "true or false",
}
"""What each setting must be, for the one-line error of :func:`resolve_guard`."""


def _settings(values: dict, owner: str) -> GuardSettings:
    """``GuardSettings(**values)``, or a ValueError naming ``owner``'s setting, its value and what it must be."""
    unknown = sorted(set(values) - set(GUARD_SETTINGS), key=str)
    if unknown:
        raise ValueError(f"{owner}: unknown setting {unknown[0]!r}; "
                         f"{did_you_mean(unknown[0], GUARD_SETTINGS, always_list=True)}")
    try:
        return GuardSettings(**values)
    except ValidationError as exc:
        name = str(exc.errors()[0]["loc"][0])
        raise ValueError(f"{owner} {name}={values[name]!r} must be {_MUST[name]}") from None


def resolve_guard(guard: "bool | dict | GuardSettings | None", action_mapping: ActionMapping, *,
                  base: GuardSettings | None = None, owner: str = "guard") -> GuardSettings:
    """The one reading of a ``guard`` argument (samplers, exports, :class:`GuardedPolicy`): the
    :class:`GuardSettings` it asks for, resolved for ``action_mapping``.

    ``base`` is the setting the argument changes (an export's ``guard`` block; default: no guard). None keeps
    ``base``; False switches the guard off; True switches it on with ``base``'s settings (the defaults without
    a base); a dict updates ``base``'s settings and switches the guard on unless it says ``enabled``; a
    :class:`GuardSettings` is taken as it is. A bad setting is a ValueError naming ``owner``'s setting, its value
    and the fix; any other ``guard`` a TypeError.
    """
    if base is None:
        base = GuardSettings(enabled=False)
    if guard is None:
        settings = base
    elif isinstance(guard, bool):
        settings = replace(base, enabled=guard)
    elif isinstance(guard, GuardSettings):
        settings = guard
    elif isinstance(guard, dict):
        settings = _settings({**asdict(base), "enabled": True, **guard}, owner)
    else:
        raise TypeError(f"{owner}={guard!r} must be True (guard rails on), False (off), None (the default setting) "
                        f"or a dict of settings ({', '.join(GUARD_SETTINGS)})")
    return settings.resolved(action_mapping, owner)


def apply_guard(policy: TemperaturePolicy, guard: "bool | dict | GuardSettings | None" = True) -> TemperaturePolicy:
    """``policy`` behind guard rails as a sampler's ``guard`` argument asks (:func:`resolve_guard`; None or
    ``{"enabled": False}`` = off). A policy that is already a :class:`GuardedPolicy` is returned as it is
    (``guard=False`` unwraps it).
    """
    if not isinstance(policy, TemperaturePolicy):
        raise TypeError(f"apply_guard needs a Kelvin TemperaturePolicy; got {type(policy).__name__}")
    if isinstance(policy, GuardedPolicy):
        if guard is False or guard is None:
            return policy.policy
        if isinstance(guard, GuardSettings) or (isinstance(guard, dict) and guard):
            raise ValueError("the policy is already a GuardedPolicy; give guard settings either there or here, "
                             "not both")
        return policy
    settings = resolve_guard(guard, policy.action_mapping)
    return GuardedPolicy(policy, **asdict(settings)) if settings.enabled else policy


class GuardedPolicy(TemperaturePolicy):
    """A temperature policy wrapped in guard rails (see the module doc for the exact rules)."""

    name = "guarded"
    stateful = True

    def __init__(self, policy: TemperaturePolicy, *, t_min: float | None = None, t_max: float | None = None,
                 max_delta: float | None = DEFAULT_MAX_DELTA, safe_range: tuple[float, float] | None = None,
                 fallback_temperature: float | None = None, anomaly_threshold: float | None = DEFAULT_ANOMALY_THRESHOLD,
                 hold: int = DEFAULT_HOLD, enabled: bool = True):
        owner = "GuardedPolicy"
        if not isinstance(policy, TemperaturePolicy):
            raise TypeError(f"{owner} wraps a Kelvin TemperaturePolicy (a baseline, a LearnedPolicy, "
                            f"policies.load_policy(path)) with its feature_spec and action_mapping; "
                            f"got {type(policy).__name__}")
        if isinstance(policy, GuardedPolicy):
            raise TypeError(f"{owner}: the policy is already guarded ({policy.label}); wrap the inner policy "
                            "(guard.policy) instead of guarding twice")
        settings = resolve_guard(dict(t_min=t_min, t_max=t_max, max_delta=max_delta, safe_range=safe_range,
                                      fallback_temperature=fallback_temperature, anomaly_threshold=anomaly_threshold,
                                      hold=hold, enabled=enabled), policy.action_mapping, owner=owner)
        # The guard's actions are final temperatures: its mapping is the policy's without a rate limit.
        super().__init__(policy.feature_spec, replace(policy.action_mapping, max_delta=None), **settings.to_dict())
        self.settings = settings
        """The resolved :class:`GuardSettings`; each of its fields is an attribute of the guard too."""
        for key in GUARD_SETTINGS:
            setattr(self, key, getattr(settings, key))
        self.policy = policy
        self.last_error: BaseException | None = None
        self._warned = False
        self._anomaly_col = policy.feature_spec.index("anomaly")
        self.reset_counters()

    # ------------------------------------------------------------------ counters
    def reset_counters(self) -> None:
        """Set every intervention counter (and ``decisions``) to 0."""
        self._counts: torch.Tensor | None = None  # (4,) int64 on the observations' device
        self._decisions = 0

    @property
    def counters(self) -> dict[str, int]:
        """Interventions per kind since construction / :meth:`reset_counters` (see the module doc)."""
        values = [0] * len(GUARD_COUNTERS) if self._counts is None else self._counts.tolist()
        return dict(zip(GUARD_COUNTERS, (int(v) for v in values)))

    @property
    def decisions(self) -> int:
        """(row, step) pairs the guard has decided (the denominator of intervention rates)."""
        return self._decisions

    # ------------------------------------------------------------------ serialisation
    def to_config(self) -> dict:
        return {"name": self.name, "params": self.params, "policy": self.policy.to_config()}

    @classmethod
    def from_config(cls, config: dict, feature_spec=None, action_mapping=None, policy=None) -> "GuardedPolicy":
        """Rebuild from :meth:`to_config`; ``policy`` is the wrapped policy, or None to rebuild a baseline
        from ``config["policy"]`` (then ``feature_spec`` / ``action_mapping`` are needed)."""
        if not isinstance(config, dict) or config.get("name") != cls.name:
            raise ValueError(f"GuardedPolicy config must be a dict with name {cls.name!r}; got {config!r}")
        extra = set(config) - {"name", "params", "policy"}
        if extra:
            raise ValueError(f"GuardedPolicy config has unknown keys {sorted(extra)}; expected name, params, policy")
        if policy is None:
            from policies.registry import policy_from_config

            if feature_spec is None or "policy" not in config:
                raise ValueError("GuardedPolicy.from_config needs policy=... or a baseline config under 'policy' "
                                 "and the feature_spec to rebuild it")
            policy = policy_from_config(config["policy"], feature_spec, action_mapping)
        params = dict(config.get("params") or {})
        if "safe_range" in params:
            params["safe_range"] = tuple(params["safe_range"])
        return cls(policy, **params)

    @property
    def label(self) -> str:
        return f"Guarded({self.policy.label})" if self.enabled else self.policy.label

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"GuardedPolicy({self.policy!r}, {args})"

    # ------------------------------------------------------------------ per step
    def reset(self, batch_size: int | None = None) -> None:
        """Forget the rate limiter's per-row state (and the wrapped policy's)."""
        super().reset(batch_size)
        self.policy.reset(batch_size)


    def _initial_state(self, batch_size, device):
        return {"t_prev": torch.zeros(batch_size, dtype=torch.float32, device=device),  # (B,)
                "has_prev": torch.zeros(batch_size, dtype=torch.bool, device=device),  # (B,)
                "hold_left": torch.zeros(batch_size, dtype=torch.long, device=device)}  # (B,) tokens of hold left

    def actions(self, obs: torch.Tensor, episode_start: torch.Tensor | None = None) -> torch.Tensor:
        """The guarded temperatures as actions of :attr:`action_mapping` (the policy's, without a rate limit)."""
        return self.action_mapping.to_action(self._guarded(obs, episode_start))  # (B,)

    def temperatures(self, obs, episode_start=None) -> torch.Tensor:
        """The guarded temperatures (B,) themselves: the base class's derivation through :meth:`actions` and the
        mapping would give the same values up to float32 rounding of the round trip; the guard's decision is the
        last word, so the samplers apply it exactly (a reset to 0.1 is 0.1)."""
        obs = self._as_obs(obs)
        if obs.ndim == 1:
            obs = obs.unsqueeze(0)  # (1, F)
        with torch.no_grad():
            return self._guarded(obs, self._as_mask(episode_start, obs.shape[0], obs.device))  # (B,)

    def _policy_temperatures(self, obs: torch.Tensor, episode_start: torch.Tensor | None) -> torch.Tensor:
        """Step 0: the wrapped policy's temperatures (B,) as the env applies them; NaN where its action is not
        finite (that row falls back), all NaN when it raises."""
        try:
            a = self.policy.actions(obs, episode_start).to(device=obs.device, dtype=torch.float32).reshape(-1)
            if a.shape[0] != obs.shape[0]:
                raise ValueError(f"the wrapped policy returned {a.shape[0]} actions for {obs.shape[0]} rows")
        except Exception as err:  # noqa: BLE001 - any failure of the policy falls back, by design
            self.last_error = err
            if not self._warned:
                warnings.warn(f"GuardedPolicy: the wrapped policy raised {type(err).__name__}: {err}; falling back "
                              f"to T = {self.fallback_temperature} (counted in guard.counters['fallback'])",
                              RuntimeWarning, stacklevel=4)
                self._warned = True
            return torch.full((obs.shape[0],), math.nan, dtype=torch.float32, device=obs.device)
        ok = torch.isfinite(a)  # (B,)
        t = self.policy.action_mapping.to_temperature(torch.where(ok, a, torch.zeros_like(a)),
                                                      previous=obs[:, self._prev_col],
                                                      first_step=obs[:, self._position_col] == 0)
        return torch.where(ok, t, torch.full_like(t, math.nan))  # (B,)

    def _guarded(self, obs: torch.Tensor, episode_start: torch.Tensor | None) -> torch.Tensor:
        """Guarded temperatures (B,) for raw observations ``obs`` (B, F): steps 0-4 of the module doc."""
        if not self.enabled:
            return self._policy_temperatures(obs, episode_start)
        b = obs.shape[0]
        s, _ = self._begin_step(b, episode_start, obs.device)
        finite_obs = torch.isfinite(obs).all(dim=1)  # (B,)
        clean = torch.where(finite_obs.unsqueeze(1), obs, torch.zeros_like(obs))  # (B, F)
        raw = self._policy_temperatures(clean, episode_start)  # (B,)
        fallback = ~finite_obs | ~torch.isfinite(raw)  # (B,)
        t = torch.where(fallback, torch.full_like(raw, self.fallback_temperature), raw)
        clamped = ~fallback & ((t < self.t_min) | (t > self.t_max))
        t = t.clamp(self.t_min, self.t_max)
        bounded = rate_limit(t, s["t_prev"], self.max_delta, s["has_prev"] & ~fallback)
        limited = bounded != t
        t = bounded
        reset = torch.zeros_like(fallback)
        hold_left = s["hold_left"]  # (B,)
        if self.anomaly_threshold is not None:
            anomalous = clean[:, self._anomaly_col] > self.anomaly_threshold  # (B,); NaN rows were zeroed
            held = anomalous | (hold_left > 0)  # (B,) fired now, or still inside the hold of an earlier reset
            safe = anomaly_reset(t, held, *self.safe_range)
            reset = safe != t
            t = safe
            hold_left = torch.where(anomalous, torch.full_like(hold_left, self.hold), (hold_left - 1).clamp_min(0))
        counts = torch.stack([clamped.sum(), limited.sum(), reset.sum(), fallback.sum()])  # (4,)
        self._counts = counts if self._counts is None else self._counts.to(counts.device) + counts
        self._decisions += b
        self._state = {"t_prev": t, "has_prev": torch.ones_like(s["has_prev"]), "hold_left": hold_left}
        return t  # (B,)
