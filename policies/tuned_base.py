"""The tuned base of a residual policy: one temperature per task category and diversity dial λ.

A learned policy acts as ``T = map(base(category, λ) + residual(obs))`` (DESIGN.md, "Residual on a tuned
base"). Before PPO, training tunes the base on the train split with the training reward
(:func:`kelvin.tuning.tune_base`); the actor's last layer starts at zero, so at update 0 the deterministic
policy *is* the base and PPO learns only the correction.

:class:`TunedBase` is the base as data (``base.json`` in a run directory, ``spec.json`` ``base`` in an
export): the λ grid it was tuned at, and one temperature per λ for each category (``kind: table``, plus
``other`` for a category the table does not know) or for every prompt (``kind: fixed``, the variant for a
deployment that does not know the task). :class:`BaseModule` is the same base as a torch module over the
**raw** observation: it reads the category one-hot and the λ column, interpolates the action linearly in λ
between grid points (constant outside the grid, which the samplers' range check never lets a user reach),
and returns the base action (B,). It lives inside the exported actor (:class:`policies.learned.ActorModule`),
so every sampler (transformers, llama.cpp, vLLM) applies the base exactly as the env does.

The base is interpolated in the action mapping's space, which is the space the residual is added in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from policies.actions import ActionMapping
from policies.base import TemperaturePolicy
from policies.features import FeatureSpec

__all__ = ["BASE_KINDS", "BaseModule", "TunedBase", "TunedBasePolicy", "interpolation_grid", "interpolation_weights"]

BASE_KINDS = ("table", "fixed", "none")
"""``policy.base``: a per-category table, one temperature for every prompt, or no base (PPO from scratch)."""

ALL = "all"
"""The one row of a ``fixed`` base."""


class BaseError(ValueError):
    """A base that cannot serve a policy; the message names what is missing and what to do."""


@dataclass(frozen=True)
class TunedBase:
    """Temperatures tuned per (category, λ): ``temperatures[row][i]`` is the base temperature at ``lambdas[i]``.

    ``kind`` ``table``: one row per category plus ``other``; ``fixed``: one row, ``all``.
    """

    kind: str
    lambdas: tuple[float, ...]
    temperatures: dict[str, tuple[float, ...]]

    def __post_init__(self):
        if self.kind not in ("table", "fixed"):
            raise BaseError(f"base kind={self.kind!r} must be 'table' or 'fixed'")
        grid = tuple(float(x) for x in self.lambdas)
        if not grid or any(not math.isfinite(x) for x in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
            raise BaseError(f"base lambdas={list(self.lambdas)} must be finite and strictly increasing")
        rows = {str(k): tuple(float(t) for t in v) for k, v in self.temperatures.items()}
        for name, temps in rows.items():
            if len(temps) != len(grid) or not all(math.isfinite(t) for t in temps):
                raise BaseError(f"base temperatures[{name!r}] must hold {len(grid)} finite temperatures (one per λ "
                                f"of {list(grid)}); got {list(temps)}")
        wanted = {ALL} if self.kind == "fixed" else None
        if wanted is not None and set(rows) != wanted:
            raise BaseError(f"a fixed base has one row named {ALL!r}; got {sorted(rows)}")
        if self.kind == "table" and "other" not in rows:
            raise BaseError("a table base needs an 'other' row (the temperature of a category it does not know)")
        object.__setattr__(self, "lambdas", grid)
        object.__setattr__(self, "temperatures", rows)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        return {"kind": self.kind, "lambdas": list(self.lambdas),
                "temperatures": {k: list(v) for k, v in self.temperatures.items()}}

    @classmethod
    def from_dict(cls, data: dict, source: str = "base") -> "TunedBase":
        if not isinstance(data, dict) or not {"kind", "lambdas", "temperatures"} <= set(data):
            raise BaseError(f"{source}: expected an object with kind, lambdas and temperatures; got {data!r:.200}")
        try:
            return cls(kind=data["kind"], lambdas=tuple(data["lambdas"]), temperatures=dict(data["temperatures"]))
        except (TypeError, ValueError) as exc:
            raise BaseError(f"{source}: {exc}") from None

    # ------------------------------------------------------------------ use
    def check_serves(self, spec: FeatureSpec, diversity_bounds: tuple[float, float], owner: str = "policy.base") -> None:
        """Refuse a base that cannot serve a policy observing ``spec`` over the λ range ``diversity_bounds``."""
        if self.kind == "table":
            if not spec.categories:
                raise BaseError(f"{owner}: a per-category table needs the category in the observation "
                                "(env.include_category: true); use policy.base: fixed without it")
            missing = [c for c in spec.categories if c not in self.temperatures]
            if missing:
                raise BaseError(f"{owner}: the base table does not cover category {missing[0]!r} (it has "
                                f"{', '.join(sorted(self.temperatures))}); tune it again (a new run)")
        lo, hi = diversity_bounds
        if len(self.lambdas) > 1 or lo != hi:
            if not spec.include_diversity:
                raise BaseError(f"{owner}: a base tuned per λ reads λ from the observation "
                                "(env.features.include_diversity: true); set it, or use policy.base: none")
            if lo < self.lambdas[0] - 1e-9 or hi > self.lambdas[-1] + 1e-9:
                raise BaseError(f"{owner}: λ range [{lo:g}, {hi:g}] is outside the range the base was tuned on "
                                f"[{self.lambdas[0]:g}, {self.lambdas[-1]:g}]; keep env.diversity_range inside it "
                                "or start a new run")

    def module(self, spec: FeatureSpec, mapping: ActionMapping) -> "BaseModule":
        """This base as a :class:`BaseModule` over ``spec``'s raw observations, in ``mapping``'s action space."""
        if self.kind == "table":
            names = spec.category_slots
            rows = [self.temperatures[c] for c in names]
            cat_start = spec.index(f"category_{names[0]}")
        else:
            rows = [self.temperatures[ALL]]
            cat_start = -1
        temps = torch.tensor(rows, dtype=torch.float32)  # (R, L)
        actions = mapping.to_action(temps.reshape(-1)).reshape(temps.shape)  # (R, L)
        diversity_col = spec.index("diversity") if spec.include_diversity else -1
        return BaseModule(torch.tensor(self.lambdas, dtype=torch.float32), actions, cat_start, diversity_col)


class BaseModule(torch.nn.Module):
    """Raw observations (B, F) -> the base's actions (B,): pick the category's row, interpolate in λ.

    ``actions`` (R, L) holds the base action of row r at ``lambdas[l]``; R = 1 (a ``fixed`` base, or
    :meth:`zero`) reads no category. ``cat_start`` is the first one-hot column, ``diversity_col`` the λ column
    (-1: none, the first column of ``actions`` is used). TorchScript-able.
    """

    def __init__(self, lambdas: torch.Tensor, actions: torch.Tensor, cat_start: int = -1, diversity_col: int = -1):
        super().__init__()
        self.register_buffer("lambdas", torch.as_tensor(lambdas, dtype=torch.float32).reshape(-1).contiguous())
        self.register_buffer("actions", torch.as_tensor(actions, dtype=torch.float32).reshape(-1, self.lambdas.numel()))
        self.n_rows = int(self.actions.shape[0])
        self.cat_start = int(cat_start)
        self.diversity_col = int(diversity_col)
        if self.n_rows > 1 and self.cat_start < 0:
            raise BaseError("a base with several rows reads the category one-hot: give cat_start")

    @classmethod
    def zero(cls) -> "BaseModule":
        """The base of a policy without one: action 0 everywhere (never added: ``ActorModule.has_base`` is False)."""
        return cls(torch.zeros(1), torch.zeros(1, 1))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.to(torch.float32)  # (B, F)
        if self.n_rows > 1:
            rows = x[:, self.cat_start:self.cat_start + self.n_rows] @ self.actions  # (B, L): the one-hot picks a row
        else:
            rows = self.actions.expand(x.shape[0], -1)  # (B, L)
        if self.lambdas.shape[0] == 1 or self.diversity_col < 0:
            return rows[:, 0]
        return (rows * interpolation_weights(self.lambdas, x[:, self.diversity_col])).sum(1)  # (B,)


def interpolation_weights(grid: torch.Tensor, diversity: torch.Tensor) -> torch.Tensor:
    """The weights (B, L) that interpolate values given at the L points of ``grid`` (increasing) linearly at each
    λ of ``diversity`` (B,): two neighbours share 1, every other weight is exactly 0; constant outside the grid.

    ``(values * weights).sum(1)`` is then exact at grid points. The base (:class:`BaseModule`) interpolates its
    actions with it, and a policy with one residual head per grid point (``policy.diversity_heads``,
    :class:`policies.learned.ActorModule`) its heads. TorchScript-able.
    """
    n = grid.shape[0]
    if n == 1:
        return torch.ones(diversity.shape[0], 1, dtype=diversity.dtype, device=diversity.device)
    d = diversity.contiguous()
    hi = torch.searchsorted(grid, d).clamp(1, n - 1)  # (B,) first grid point >= λ
    lo = hi - 1
    w = ((d - grid[lo]) / (grid[hi] - grid[lo])).clamp(0.0, 1.0)  # (B,)
    out = torch.zeros(d.shape[0], n, dtype=d.dtype, device=d.device)
    out.scatter_(1, lo.view(-1, 1), (1.0 - w).view(-1, 1))
    return out.scatter_add(1, hi.view(-1, 1), w.view(-1, 1))


class TunedBasePolicy(TemperaturePolicy):
    """A run's tuned base alone (the residual at zero), behind the one policy protocol: validation's and
    evaluation's ``base:RUN_DIR``. Stateless and deterministic."""

    name = "base"

    def __init__(self, base: TunedBase, feature_spec: FeatureSpec, action_mapping: ActionMapping,
                 label: str | None = None):
        super().__init__(feature_spec, action_mapping)
        self.base = base
        self.module = base.module(feature_spec, action_mapping)
        self._label = label or f"base ({base.kind})"

    @property
    def label(self) -> str:
        return self._label

    def actions(self, obs: torch.Tensor, episode_start: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        self.module = self.module.to(obs.device)
        with torch.no_grad():
            return self.module(obs).clamp(-1.0, 1.0)  # (B,)


def interpolation_grid(bounds: Sequence[float], points: int) -> tuple[float, ...]:
    """``points`` λ values evenly spread over ``bounds`` (one value when the range is a point)."""
    lo, hi = float(bounds[0]), float(bounds[1])
    if hi <= lo or points <= 1:
        return (lo,)
    return tuple(lo + (hi - lo) * i / (points - 1) for i in range(points))
