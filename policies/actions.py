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
the first step of an episode), and a final clamp keeps T in [t_min, t_max]. NaN actions are
rejected; actions outside [-1, 1] are clipped (SB3's PPO samples from an unbounded Gaussian and
clips, so clipping is the documented behaviour, not an error).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

__all__ = ["ActionMapping"]

MAPPING_KINDS = ("linear", "inverse")


@dataclass(frozen=True)
class ActionMapping:
    """Maps actions in [-1, 1] to temperatures, and back (for baselines that think in T)."""

    kind: str = "linear"
    """``linear`` in T, or ``inverse`` (linear in beta = 1/T; needs t_min < 0 < t_max)."""
    t_min: float = -2.0
    """Lowest temperature the env may use."""
    t_max: float = 2.0
    """Highest temperature the env may use."""
    min_abs_temperature: float = 0.05
    """``inverse`` only: the smallest |T| reachable (|beta| <= 1 / min_abs_temperature)."""
    max_delta: float | None = None
    """Rate limit: largest |T_t - T_(t-1)| per step within an episode; None = off."""

    def __post_init__(self):
        if self.kind not in MAPPING_KINDS:
            raise ValueError(f"env.action_mapping={self.kind!r} is unknown; use one of {MAPPING_KINDS}")
        if not (self.t_min < self.t_max):
            raise ValueError(
                f"env.t_min={self.t_min} must be below env.t_max={self.t_max}; set a non-empty temperature range"
            )
        if self.kind == "inverse":
            if not (self.t_min < 0 < self.t_max):
                raise ValueError(
                    f"env.action_mapping='inverse' needs t_min < 0 < t_max (got [{self.t_min}, {self.t_max}]); "
                    "use action_mapping='linear' for a one-signed range"
                )
            if not (0 < self.min_abs_temperature < min(-self.t_min, self.t_max)):
                raise ValueError(
                    f"env.min_abs_temperature={self.min_abs_temperature} must be in (0, min(|t_min|, t_max))"
                )
        if self.max_delta is not None and not self.max_delta > 0:
            raise ValueError(f"env.max_delta={self.max_delta} must be > 0, or null to switch the rate limit off")

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
        if self.max_delta is not None and previous is not None:
            prev = torch.as_tensor(previous, dtype=t.dtype, device=t.device).reshape(-1)
            limited = torch.minimum(torch.maximum(t, prev - self.max_delta), prev + self.max_delta)
            if first_step is not None:
                limited = torch.where(torch.as_tensor(first_step, device=t.device).reshape(-1), t, limited)
            t = limited
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
