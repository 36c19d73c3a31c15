"""The one policy protocol: every temperature policy (learned, exported, baseline, guarded) is a
:class:`TemperaturePolicy` with one torch-native core, :meth:`~TemperaturePolicy.actions`.

    actions(obs (B, F) float32, episode_start (B,) bool | None) -> (B,) float32 in [-1, 1]

``obs`` is the **raw** observation table of :mod:`policies.features` (columns looked up by name
through the :class:`~policies.features.FeatureSpec`); the actions mean temperatures through the
policy's :class:`~policies.actions.ActionMapping`. Everything else is derived from the core, once,
here:

* :meth:`~TemperaturePolicy.predict` has exactly the signature and shapes of stable-baselines3's
  ``PolicyPredictor.predict(obs, state, episode_start, deterministic) -> (actions (B, 1), state)``
  (numpy in and out, or torch in), so ``evaluate.py``, training's validation and SB3's own tools run
  one loop over every policy;
* :meth:`~TemperaturePolicy.temperatures` gives the (B,) temperatures the env and every sampler
  apply for those actions: the mapping, with its rate limit against the observation's
  ``prev_temperature`` (not on a row's first token, ``position`` 0). The env's state is in the
  observation, so this is exactly the env's ``to_temperature(action, previous, first_step)``.

Implementations: :class:`BaselinePolicy` (formulas and controllers: they compute temperatures
natively in one protected hook, :meth:`BaselinePolicy._temperatures`, and this module maps them to
actions), :class:`policies.learned.LearnedPolicy` (the exported actor network; also
:class:`policies.artifact.ExportedPolicy`) and :class:`policies.guard.GuardedPolicy`.

Per-row state
-------------
Stateful policies (PID, the surprise controller, the guard rails) keep their state **inside** the
policy, one row per batch row, on the observation's device; the ``state`` argument of ``predict``
is passed through untouched (``None`` in, ``None`` out). A row starts afresh when

* ``episode_start[i]`` is True (SB3's convention: ``obs[i]`` is the first observation of a new
  episode; ``evaluate_policy`` passes all True on the first call, then the ``dones``),
* the batch size changes (all rows start afresh: the state is lazily re-sized), or
* :meth:`TemperaturePolicy.reset` was called (all rows).

:attr:`TemperaturePolicy.row_state` lets an engine that steps some of its rows at a time swap rows in and out.

Serialisation
-------------
``to_config()`` gives ``{"name": short_name, "params": {...}}`` (parameters only, JSON-safe);
:func:`policies.registry.policy_from_config` rebuilds a baseline for a feature spec and action mapping.
"""

from __future__ import annotations

import abc
import inspect
import math
import numbers
from typing import Any, ClassVar

import numpy as np
import torch

from policies.actions import ActionMapping
from policies.features import FeatureSpec

__all__ = ["BaselinePolicy", "TemperaturePolicy", "as_observation", "check_real"]


def _fmt(value: Any) -> str:
    """Parameter value for a label: ``1.0``, ``1.5``, ``-0.1``, ``1e-06``, ``None``."""
    if isinstance(value, float):
        return f"{value:.1f}" if value.is_integer() else f"{value:g}"
    return str(value)


class TemperaturePolicy(abc.ABC):
    """Base class of every temperature policy: raw features in, actions (and temperatures) out.

    Subclasses implement :meth:`actions` and call ``super().__init__(feature_spec, action_mapping,
    **params)`` with the parameters that rebuild them (``params`` / ``to_config``).
    """

    name: ClassVar[str] = ""
    """Short name (``make_policy("edt")``); presets (``pid-positive``, ``greedy``) override it per instance."""
    stateful: ClassVar[bool] = False
    """True when the policy keeps per-row state between calls."""

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, **params: Any):
        if not isinstance(feature_spec, FeatureSpec):
            raise TypeError(f"{type(self).__name__} needs a policies.features.FeatureSpec as feature_spec; "
                            f"got {type(feature_spec).__name__}")
        if action_mapping is None:
            action_mapping = ActionMapping()
        if not isinstance(action_mapping, ActionMapping):
            raise TypeError(f"{type(self).__name__} needs a policies.actions.ActionMapping as action_mapping; "
                            f"got {type(action_mapping).__name__}")
        self.feature_spec = feature_spec
        self.action_mapping = action_mapping
        self._params: dict[str, Any] = dict(params)
        self._state: dict[str, torch.Tensor] | None = None
        self._prev_col = feature_spec.index("prev_temperature")
        self._position_col = feature_spec.index("position")

    # ------------------------------------------------------------------ the core
    @abc.abstractmethod
    def actions(self, obs: torch.Tensor, episode_start: torch.Tensor | None = None) -> torch.Tensor:
        """Actions (B,) float32 in [-1, 1] on ``obs``'s device for raw observations ``obs`` (B, F) float32.

        ``episode_start`` (B,) bool marks rows whose observation is the first of a new episode
        (stateful policies reset those rows first); stateless policies ignore it.
        """

    def tokens_done(self, obs: torch.Tensor) -> torch.Tensor:
        """(B,) float: the tokens each row has generated so far (its ``position`` column times the horizon), the
        index of the token the action is for."""
        return torch.round(obs[:, self._position_col] * self.feature_spec.horizon)

    # ------------------------------------------------------------------ derived once
    def temperatures(self, obs, episode_start=None) -> torch.Tensor:
        """The (B,) temperatures the env and the samplers apply for this policy on raw observations (B, F).

        ``action_mapping.to_temperature(actions)`` with the mapping's rate limit against the observation's
        ``prev_temperature`` column, except on a row's first token (``position`` 0). Accepts what
        :meth:`predict` accepts (numpy or torch, (B, F) or (F,)).
        """
        obs = self._as_obs(obs)
        if obs.ndim == 1:
            obs = obs.unsqueeze(0)  # (1, F)
        starts = self._as_mask(episode_start, obs.shape[0], obs.device)
        with torch.no_grad():
            a = self.actions(obs, starts)  # (B,)
            return self.action_mapping.to_temperature(a, previous=obs[:, self._prev_col],
                                                      first_step=obs[:, self._position_col] == 0)

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = True):  # noqa: ARG002 (SB3)
        """SB3 ``PolicyPredictor.predict``: actions (B, 1) float32 numpy in [-1, 1] and ``state`` unchanged.

        ``observation`` is an np.ndarray or torch tensor of shape (B, F), or (F,) for one
        observation (then the actions have shape (1,), as SB3 squeezes a single observation).
        ``deterministic`` is accepted for the protocol: every Kelvin policy acts deterministically
        (a learned policy acts with its Gaussian's mean).
        """
        obs = self._as_obs(observation)
        single = obs.ndim == 1
        if single:
            obs = obs.unsqueeze(0)  # (1, F)
        starts = self._as_mask(episode_start, obs.shape[0], obs.device)
        with torch.no_grad():
            actions = self.actions(obs, starts)  # (B,)
        actions = actions.detach().to("cpu", torch.float32).numpy().reshape(-1, 1)  # (B, 1)
        return (actions[0] if single else actions), state

    # ------------------------------------------------------------------ parameters
    @property
    def params(self) -> dict[str, Any]:
        """The resolved parameters (a copy): ``type(self)(spec, mapping, **params)`` rebuilds the policy."""
        return dict(self._params)

    def to_config(self) -> dict:
        """``{"name": short_name, "params": {...}}``: a JSON-safe spec (parameters only)."""
        return {"name": self.name, "params": self.params}

    @property
    def label(self) -> str:
        """Human label for plots and tables."""
        return type(self).__name__

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ per-row state
    def reset(self, batch_size: int | None = None) -> None:
        """Forget all per-row state; with ``batch_size``, size it now (every row fresh)."""
        self._state = None
        if batch_size is not None and self.stateful:
            if batch_size < 1:
                raise ValueError(f"batch_size={batch_size} must be >= 1")
            self._state = self._initial_state(batch_size, torch.device("cpu"))

    @property
    def row_state(self) -> dict[str, torch.Tensor] | None:
        """The per-row state of a stateful policy (tensors with a leading (B,) axis; None before its first
        step). Engines that step some of their rows at a time swap rows in and out through it."""
        return self._state

    @row_state.setter
    def row_state(self, state: dict[str, torch.Tensor] | None) -> None:
        self._state = state

    def _initial_state(self, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:  # noqa: ARG002 (stateless)
        """Fresh per-row state: a dict of tensors with a leading (B,) axis. Stateful subclasses override."""
        return {}

    def _begin_step(self, batch_size: int, episode_start: torch.Tensor | None,
                    device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The per-row state for this step and the (B,) mask of rows that started afresh.

        Re-sizes (all rows fresh) when the batch size changed, moves the state to ``device``,
        and resets rows where ``episode_start`` is True.
        """
        state = self._state
        first = next(iter(state.values())) if state else None
        if first is None or first.shape[0] != batch_size:
            self._state = self._initial_state(batch_size, device)
            return self._state, torch.ones(batch_size, dtype=torch.bool, device=device)
        if first.device != device:
            state = {k: v.to(device) for k, v in state.items()}
        if episode_start is None:
            fresh = torch.zeros(batch_size, dtype=torch.bool, device=device)
        else:
            fresh = episode_start.to(device=device, dtype=torch.bool).reshape(-1)
            init = self._initial_state(batch_size, device)
            state = {k: torch.where(fresh.view((-1,) + (1,) * (v.ndim - 1)), init[k], v) for k, v in state.items()}
        self._state = state
        return state, fresh

    # ------------------------------------------------------------------ input checks
    def _as_obs(self, observation) -> torch.Tensor:
        return as_observation(observation, self.feature_spec, type(self).__name__)

    @staticmethod
    def _as_mask(episode_start, batch_size: int, device: torch.device) -> torch.Tensor | None:
        if episode_start is None:
            return None
        if isinstance(episode_start, torch.Tensor):
            mask = episode_start.to(device=device).reshape(-1).bool()
        else:
            mask = torch.as_tensor(np.asarray(episode_start, dtype=bool).reshape(-1), device=device)
        if mask.shape[0] != batch_size:
            raise ValueError(f"episode_start has {mask.shape[0]} entries but the observation has {batch_size} rows")
        return mask


class BaselinePolicy(TemperaturePolicy):
    """A policy given by a formula or a controller: it computes temperatures natively.

    Subclasses set the class attributes below, take their parameters as keyword-only constructor
    arguments with defaults (the registry reads them from the signature, so the config mirrors the
    constructor), validate them, call ``super().__init__(feature_spec, action_mapping, **params)``
    with every parameter, and implement :meth:`_temperatures`. :meth:`actions` maps those
    temperatures with the action mapping (which clips them into ``[t_min, t_max]``).
    """

    display_name: ClassVar[str] = ""
    """Name used in :attr:`label` (``"EDT"``)."""
    reads: ClassVar[tuple[str, ...]] = ()
    """Feature names this policy reads (resolved to column indices once, in ``__init__``)."""
    label_params: ClassVar[dict[str, str]] = {}
    """Parameters shown in :attr:`label`, with the symbol to show (``{"t0": "T0", "theta": "θ"}``)."""
    positional: ClassVar[str | None] = None
    """Parameter a bare value sets in a spec string (``fixed:0.7`` sets ``t``)."""
    optional_params: ClassVar[frozenset[str]] = frozenset()
    """Parameters that accept ``None`` (e.g. ``max_delta=None``: rate limit off)."""

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, **params: Any):
        super().__init__(feature_spec, action_mapping, **params)
        self._col: dict[str, int] = {n: feature_spec.index(n) for n in self.reads}

    @abc.abstractmethod
    def _temperatures(self, obs: torch.Tensor, episode_start: torch.Tensor | None) -> torch.Tensor:
        """The policy's own temperatures (B,) float32 for raw observations (B, F), before the mapping's clip."""

    def actions(self, obs: torch.Tensor, episode_start: torch.Tensor | None = None) -> torch.Tensor:
        return self.action_mapping.to_action(self._temperatures(obs, episode_start))  # (B,)

    def column(self, obs: torch.Tensor, name: str) -> torch.Tensor:
        """The raw feature ``name`` of every row: (B,)."""
        return obs[:, self._col[name]]

    @classmethod
    def param_defaults(cls, feature_spec: FeatureSpec | None = None) -> dict[str, Any]:  # noqa: ARG003 (overridden)
        """The keyword-only constructor parameters and their defaults, in signature order (a policy whose
        parameters depend on the observation, like a per-category table, reads them from ``feature_spec``)."""
        sig = inspect.signature(cls.__init__)
        return {p.name: p.default for p in sig.parameters.values() if p.kind is inspect.Parameter.KEYWORD_ONLY}

    @property
    def label(self) -> str:
        """Human label for plots and tables, e.g. ``EDT(T0=1.0, θ=1.5)``."""
        shown = ", ".join(f"{sym}={_fmt(self._params[p])}" for p, sym in self.label_params.items())
        return f"{self.display_name or type(self).__name__}({shown})"


# ---------------------------------------------------------------------- validation helpers
def as_observation(observation, feature_spec: FeatureSpec, owner: str) -> torch.Tensor:
    """``observation`` (an np.ndarray, torch tensor or list of shape (B, F) or (F,)) as float32 torch,
    checked against ``feature_spec``; errors name ``owner`` and the expected shape."""
    if isinstance(observation, torch.Tensor):
        obs = observation.detach().to(torch.float32)
    elif isinstance(observation, (np.ndarray, list, tuple)):
        obs = torch.as_tensor(np.asarray(observation, dtype=np.float32))
    else:
        raise TypeError(f"observation must be an np.ndarray or torch.Tensor of shape (B, F) or (F,); "
                        f"got {type(observation).__name__}")
    dim = feature_spec.dim
    if obs.ndim not in (1, 2) or obs.shape[-1] != dim:
        raise ValueError(f"observation has shape {tuple(obs.shape)}; {owner} expects (B, {dim}) or ({dim},) "
                         f"for this feature spec ({', '.join(feature_spec.names)})")
    return obs


def check_real(owner: str, name: str, value: Any, *, optional: bool = False, finite: bool = True) -> Any:
    """``float(value)``, or a ValueError naming ``owner``'s parameter ``name``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner} {name}={value!r} must be a real number")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{owner} {name}={value!r} must be a finite real number")
    return value
