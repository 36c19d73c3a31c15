"""Action -> temperature: how a policy's action in ``Box(-1, 1)`` becomes a sampling temperature.

Two mappings (``ActionMapping.kind``):

``linear``
    T = t_min + (a + 1) / 2 * (t_max - t_min). Simple, but when the range spans 0 the
    distribution jumps from argmin (T -> 0-) to argmax (T -> 0+) in the middle of the action
    range: the "greedy cliff".

``inverse``
    Linear in the inverse temperature beta = 1 / T, which is continuous through beta = 0 (the
    uniform distribution). Needs t_min < 0 < t_max. Actions in [-1, 0) cover
    beta in [-beta_max, -1/|t_min|] (T from -1/beta_max to t_min), actions in [0, 1] cover
    beta in [1/t_max, beta_max] (T from t_max down to 1/beta_max), with
    beta_max = 1 / min_abs_temperature. The sign changes at a = 0, between T = t_min and
    T = t_max, where both distributions are at their flattest, instead of at the greedy cliff.

After the mapping, an optional rate limit keeps |T_t - T_{t-1}| <= max_delta per row (not on
the first step of an episode; :func:`rate_limit`, shared with the PID baseline and the guard rails),
and a final clamp keeps T in [t_min, t_max]. NaN actions are
rejected; actions outside [-1, 1] are clipped (SB3's PPO samples from an unbounded Gaussian and
clips, so clipping is the documented behaviour, not an error).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Literal, Optional

import torch
from pydantic import ConfigDict, Field, StrictFloat
from pydantic.dataclasses import dataclass

__all__ = ["ActionMapping", "anomaly_reset", "rate_limit"]

MAPPING_KINDS = ("linear", "inverse")


def rate_limit(t: torch.Tensor, previous: torch.Tensor, max_delta: float | None,
               active: torch.Tensor | None = None) -> torch.Tensor:
    """``clamp(t, previous - max_delta, previous + max_delta)`` on the ``active`` rows (B,) bool (None = all).

    The one rate limit of Kelvin: the action mapping's (``max_delta``), the PID baseline's and the guard
    rails' all call it. ``max_delta`` None returns ``t`` unchanged. All tensors (B,).
    """
    if max_delta is None:
        return t
    previous = torch.as_tensor(previous, dtype=t.dtype, device=t.device).reshape(-1)
    limited = torch.minimum(torch.maximum(t, previous - max_delta), previous + max_delta)
    if active is None:
        return limited
    return torch.where(torch.as_tensor(active, device=t.device).reshape(-1), limited, t)


def anomaly_reset(t: torch.Tensor, held: torch.Tensor, safe_lo: float, safe_hi: float) -> torch.Tensor:
    """``clamp(t, safe_lo, safe_hi)`` on the ``held`` rows (B,) bool: the one anomaly reset (PID baseline,
    guard rails). It ignores any rate limit: safety first."""
    return torch.where(held, t.clamp(safe_lo, safe_hi), t)


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ActionMapping:
    """Maps actions in [-1, 1] to temperatures, and back (for baselines that think in T).

    The ``env.action`` block of a config; its defaults put action 0 at T = 0.7, the centre of
    [-1, 2.4], never on the greedy cliff. A pydantic dataclass: every field is checked against its
    type and range when it is built (see :mod:`kelvin.config` for why pydantic).
    """

    kind: Literal["linear", "inverse"] = "linear"
    """``linear`` in T, or ``inverse`` (linear in beta = 1/T; needs t_min < 0 < t_max)."""
    t_min: StrictFloat = Field(-1.0, allow_inf_nan=False)
    """Lowest temperature the env may use (negative temperatures stay reachable)."""
    t_max: StrictFloat = Field(2.4, allow_inf_nan=False)
    """Highest temperature the env may use."""
    min_abs_temperature: StrictFloat = Field(0.05, gt=0, allow_inf_nan=False)
    """``inverse`` only: the smallest |T| reachable (|beta| <= 1 / min_abs_temperature)."""
    max_delta: Optional[StrictFloat] = Field(None, gt=0, allow_inf_nan=False, examples=[0.2])
    """Rate limit: largest |T_t - T_(t-1)| per step within an episode; None = off."""

    def __post_init__(self):
        if not (self.t_min < self.t_max):
            raise ValueError(f"t_min={self.t_min} must be below t_max={self.t_max}; set a non-empty temperature range")
        if self.kind == "inverse":
            if not (self.t_min < 0 < self.t_max):
                raise ValueError(f"kind='inverse' needs t_min < 0 < t_max (got [{self.t_min}, {self.t_max}]); use "
                                 "kind='linear' for a one-signed range")
            if not self.min_abs_temperature < min(-self.t_min, self.t_max):
                raise ValueError(f"min_abs_temperature={self.min_abs_temperature} must be in (0, min(|t_min|, t_max))")

    def to_dict(self) -> dict:
        return asdict(self)

    # ------------------------------------------------------------------ forward
    def to_temperature(self, actions: torch.Tensor, previous: torch.Tensor | None = None,
                       first_step: torch.Tensor | None = None) -> torch.Tensor:
        """Actions (B,) -> temperatures (B,), with the rate limit against ``previous`` where not ``first_step``."""
        a = torch.as_tensor(actions, dtype=torch.float32).reshape(-1)  # (B,)
        if torch.isnan(a).any():
            rows = torch.nonzero(torch.isnan(a)).flatten().tolist()
            raise ValueError(f"action is NaN in rows {rows}; policies must output real numbers in [-1, 1]")
        a = a.clamp(-1.0, 1.0)
        if self.kind == "linear":
            t = self.t_min + (a + 1.0) * 0.5 * (self.t_max - self.t_min)
            # One float32 step of the action moves T by ~(t_max - t_min) * 2^-24, so a |T| that small is the
            # rounding of T = 0 (greedy through to_action gave T = -6e-8 for [-1, 2.4]: argmin, the least
            # likely token), not a choice: make it exactly 0.
            t = torch.where(t.abs() <= 4.0 * (self.t_max - self.t_min) * 2.0 ** -24, torch.zeros_like(t), t)
        else:
            beta_max = 1.0 / self.min_abs_temperature
            b_neg_hi = -1.0 / abs(self.t_min)  # beta at a -> 0-
            b_pos_lo = 1.0 / self.t_max  # beta at a = 0
            beta = torch.where(
                a < 0,
                -beta_max + (a + 1.0) * (b_neg_hi + beta_max),
                b_pos_lo + a * (beta_max - b_pos_lo),
            )
            t = 1.0 / beta
        if previous is not None:
            active = None if first_step is None else ~torch.as_tensor(first_step, device=t.device).reshape(-1)
            t = rate_limit(t, previous, self.max_delta, active)
        return t.clamp(self.t_min, self.t_max)

    # ------------------------------------------------------------------ inverse
    def to_action(self, temperatures: torch.Tensor) -> torch.Tensor:
        """Temperatures (B,) -> the actions (B,) that map to them (clipped into the range)."""
        t = torch.as_tensor(temperatures, dtype=torch.float32).reshape(-1)
        if torch.isnan(t).any():
            raise ValueError("temperature is NaN; a policy must produce real temperatures")
        t = t.clamp(self.t_min, self.t_max)
        if self.kind == "linear":
            return (2.0 * (t - self.t_min) / (self.t_max - self.t_min) - 1.0).clamp(-1.0, 1.0)
        beta_max = 1.0 / self.min_abs_temperature
        beta = 1.0 / t  # T = 0 -> +-inf, clipped below
        beta = torch.where(t == 0, torch.full_like(t, beta_max), beta)
        b_neg_hi = -1.0 / abs(self.t_min)
        b_pos_lo = 1.0 / self.t_max
        a_neg = (beta.clamp(-beta_max, b_neg_hi) + beta_max) / (b_neg_hi + beta_max) - 1.0
        a_pos = (beta.clamp(b_pos_lo, beta_max) - b_pos_lo) / (beta_max - b_pos_lo)
        return torch.where(beta < 0, a_neg.clamp(-1.0, -1e-7), a_pos).clamp(-1.0, 1.0)
