"""Baseline temperature policies: fixed, PID, EDT, confidence rules, DynaTemp, surprise controller.

Every baseline reads the **raw** features of :mod:`policies.features` by name and computes the
temperature itself (the protected hook :meth:`~policies.base.BaselinePolicy._temperatures`); the
base class maps it to an action with the env's :class:`~policies.actions.ActionMapping`, which clips
it into ``[t_min, t_max]``, and derives ``predict`` and ``temperatures`` from that. The formulas below are the temperatures *before* that clip: a rule whose
formula leaves the env's range (the entropy rule over a 49k vocabulary reaches T ~ 8.8) is clipped
by the mapping, exactly as a learned policy's action is.

| short name     | class                       | T                                                   | stateful |
|----------------|-----------------------------|-----------------------------------------------------|----------|
| `fixed`        | FixedTemperature            | t (default 1.0; `fixed:0.7`, `fixed:-0.5`)          | no       |
| `greedy`       | FixedTemperature            | 0                                                   | no       |
| `pid`          | PIDController               | base + kp e + ki sum(last 10 e) + kd (e - e_prev)   | yes      |
| `pid-positive` | PIDController.positive()    | same, positive regime                               | yes      |
| `edt`          | EntropyDynamicTemperature   | T0 N^(theta / H)                                    | no       |
| `maxprob`      | MaxProbRule                 | a + b max(p)                                        | no       |
| `entropy`      | EntropyRule                 | a + b H(p)                                          | no       |
| `median`       | MedianRule                  | a + b median(p)                                     | no       |
| `combined`     | CombinedRule                | a + b max(p) + c H(p)                               | no       |
| `dynatemp`     | DynaTemp                    | llama.cpp: min_T + (max_T - min_T) (H / ln n)^exp   | no       |
| `surprise`     | SurpriseController          | T_t = clamp(T_(t-1) - eta (s_t - tau), lo, hi)       | yes      |
| `hotcold`      | HotColdSchedule             | hot for the first n tokens, then cold               | no       |
| `table`        | CategoryTable               | one T per task category (the observation's one-hot) | no       |

All computations are batched torch on the observation's device; no Python loop over rows.
"""

from __future__ import annotations

import math

import torch

from policies.actions import ActionMapping, anomaly_reset, rate_limit
from policies.base import BaselinePolicy, _fmt, check_real
from policies.features import FeatureSpec
from samplers.suggest import did_you_mean

__all__ = [
    "CategoryTable",
    "CombinedRule",
    "DynaTemp",
    "EntropyDynamicTemperature",
    "EntropyRule",
    "FixedTemperature",
    "HotColdSchedule",
    "MaxProbRule",
    "MedianRule",
    "PIDController",
    "SurpriseController",
]

_LN2 = math.log(2.0)


def _full(obs: torch.Tensor, value: float) -> torch.Tensor:
    return torch.full((obs.shape[0],), float(value), dtype=torch.float32, device=obs.device)  # (B,)


# ====================================================================== fixed
class FixedTemperature(BaselinePolicy):
    """The same temperature for every token: ``T = t``.

    Any real ``t``: ``t > 0`` ordinary sampling, ``t = 0`` greedy (``greedy`` preset), ``t < 0`` the
    inverted distribution (see :mod:`samplers.core`), ``+-inf`` uniform over the kept tokens.

    Arguments: ``t`` (default 1.0, plain sampling), inside the action mapping's ``[t_min, t_max]`` (a ``t``
    outside is refused: the mapping would clamp it). Spec strings: ``fixed:0.7``, ``fixed:t=-0.5``, ``greedy``.
    """

    name = "fixed"
    display_name = "Fixed"
    label_params = {"t": "T"}
    positional = "t"

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, *, t: float = 1.0):
        t = check_real("FixedTemperature", "t", t, finite=False)
        super().__init__(feature_spec, action_mapping, t=t)
        lo, hi = self.action_mapping.t_min, self.action_mapping.t_max
        if not lo <= t <= hi:  # the mapping would clamp it: the label would name a temperature never used
            raise ValueError(f"FixedTemperature t={t:g} is outside its action mapping's range [{lo:g}, {hi:g}] (it "
                             f"would run at {min(max(t, lo), hi):g}); choose a T in the range, or widen it "
                             "(env.action.t_min / env.action.t_max)")
        self.t = t

    @classmethod
    def greedy(cls, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None) -> "FixedTemperature":
        """``T = 0`` (argmax) for every token; short name ``greedy``."""
        policy = cls(feature_spec, action_mapping, t=0.0)
        policy.name = "greedy"
        return policy

    @property
    def label(self) -> str:
        return "Greedy(T=0)" if self.t == 0 else super().label

    def _temperatures(self, obs, episode_start=None):  # noqa: ARG002 (the protocol; stateless)
        return _full(obs, self.t)  # (B,)


# ====================================================================== PID
class PIDController(BaselinePolicy):
    r"""PID controller that steers the ``quality`` feature to a target (the seed's negative-T controller).

    Signal: ``quality`` (feature 13) = running mean of the base-model probability of the drawn
    tokens times (1 - repetition), in [0, 1], observable at inference time. Error
    ``e_t = target - quality_t``.

    One step, per row, in this exact order:

    1. **Episode start** (``episode_start`` True, first call, or a new batch size): the row's error
       history is emptied, it has no previous output, and ``e_prev := e_t`` so the derivative
       term of the first step is 0 (not ``kd * e_t``).
    2. **Raw PID**: ``u = base + kp e_t + ki I_t + kd (e_t - e_prev)``, with
       ``I_t = sum of the last `window` (10) errors, e_t included`` (a sliding-window integral,
       which bounds wind-up).
    3. **Rate limit**: ``u = clamp(u, T_(t-1) - max_delta, T_(t-1) + max_delta)`` against the row's
       previous output of this controller; skipped on the row's first step (and when
       ``max_delta`` is None).
    4. **Bounds**: ``T_t = clamp(u, t_lo, t_hi)`` (the first step is clamped too).
    5. **Anomaly reset**: where ``anomaly_t > anomaly_threshold`` the output is pulled into the
       safe range, ``T_t = clamp(T_t, safe_lo, safe_hi)``, ignoring the rate limit; the error
       history is emptied and ``e_prev`` forgotten, so the next step starts like step 1 (integral
       of only its own error, derivative 0) except that it *is* rate-limited against this output.
       While the anomaly feature stays above the threshold the output stays in the safe range.

    ``T_(t-1)`` and ``e_prev`` are this controller's own previous output and error (not the
    ``prev_temperature`` feature), so choose bounds inside the env's ``[t_min, t_max]``. Rows are
    independent.

    Defaults (the seed's negative-temperature controller): ``base=-0.5, kp=0.1, ki=0.01,
    kd=0.05, target=0.7, t_lo=-2.0, t_hi=-0.1, max_delta=0.2, safe_lo=-0.3, safe_hi=-0.1,
    anomaly_threshold=0.5, window=10``. With positive gains, quality below target (``e > 0``)
    raises T towards ``t_hi = -0.1``, i.e. a sharper inversion within the kept set.

    Note on ``anomaly``: it is a bias-corrected EMA (decay ``ema_decay`` = 0.8) of a 0/1
    indicator, so after the first few tokens a single anomalous draw moves it to ~0.2; a threshold
    of 0.5 fires after about four anomalous draws in a row (or on the very first token).

    :meth:`positive` (short name ``pid-positive``) is the same controller in the ordinary regime:
    ``base=0.7, kp=-0.5, ki=-0.02, kd=-0.1, target=0.7, t_lo=0.1, t_hi=1.5, max_delta=0.2,
    safe_lo=0.1, safe_hi=0.3``. Its gains are negative because for ``T > 0`` a *lower* T raises the
    probability of the drawn tokens: quality below target (``e > 0``) sharpens, quality above it
    (e = -0.3 at quality 1) warms up by ~0.15 + integral, and an anomaly drops T to at most 0.3.
    """

    name = "pid"
    display_name = "PID"
    reads = ("quality", "anomaly")
    label_params = {"target": "target", "t_lo": "lo", "t_hi": "hi"}
    optional_params = frozenset({"max_delta"})
    stateful = True

    POSITIVE_PRESET = dict(base=0.7, kp=-0.5, ki=-0.02, kd=-0.1, target=0.7, t_lo=0.1, t_hi=1.5,
                           max_delta=0.2, safe_lo=0.1, safe_hi=0.3)
    """Parameters of :meth:`positive` (``pid-positive``)."""

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, *,
                 base: float = -0.5, kp: float = 0.1, ki: float = 0.01, kd: float = 0.05, target: float = 0.7,
                 t_lo: float = -2.0, t_hi: float = -0.1, max_delta: float | None = 0.2,
                 safe_lo: float = -0.3, safe_hi: float = -0.1, anomaly_threshold: float = 0.5, window: int = 10):
        owner = "PIDController"
        base, kp, ki, kd, target, t_lo, t_hi, safe_lo, safe_hi, anomaly_threshold = (
            check_real(owner, n, v) for n, v in [
                ("base", base), ("kp", kp), ("ki", ki), ("kd", kd), ("target", target), ("t_lo", t_lo),
                ("t_hi", t_hi), ("safe_lo", safe_lo), ("safe_hi", safe_hi), ("anomaly_threshold", anomaly_threshold)])
        max_delta = check_real(owner, "max_delta", max_delta, optional=True, finite=False)
        if max_delta is not None and math.isinf(max_delta) and max_delta > 0:
            max_delta = None  # inf = no rate limit (the spec-string spelling of None)
        if not t_lo < t_hi:
            raise ValueError(
                f"PIDController bounds t_lo={t_lo} >= t_hi={t_hi}: the temperature range [t_lo, t_hi] is empty; "
                "set t_lo below t_hi"
            )
        if not (t_lo <= safe_lo <= safe_hi <= t_hi):
            raise ValueError(
                f"PIDController safe range [safe_lo={safe_lo}, safe_hi={safe_hi}] must be non-empty and inside the "
                f"bounds [t_lo={t_lo}, t_hi={t_hi}]; when you move the bounds, set safe_lo / safe_hi too"
            )
        if max_delta is not None and not max_delta > 0:
            raise ValueError(f"PIDController max_delta={max_delta} must be > 0, or None / inf to switch the rate "
                             "limit off")
        if isinstance(window, bool) or not isinstance(window, (int, float)) or window != int(window) or window < 1:
            raise ValueError(f"PIDController window={window!r} must be an integer >= 1 (errors summed by the "
                             "integral term)")
        window = int(window)
        super().__init__(feature_spec, action_mapping, base=base, kp=kp, ki=ki, kd=kd, target=target, t_lo=t_lo,
                         t_hi=t_hi, max_delta=max_delta, safe_lo=safe_lo, safe_hi=safe_hi,
                         anomaly_threshold=anomaly_threshold, window=window)
        self.base, self.kp, self.ki, self.kd, self.target = base, kp, ki, kd, target
        self.t_lo, self.t_hi, self.max_delta = t_lo, t_hi, max_delta
        self.safe_lo, self.safe_hi, self.anomaly_threshold, self.window = safe_lo, safe_hi, anomaly_threshold, window

    @classmethod
    def positive(cls, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None,
                 **overrides) -> "PIDController":
        """The positive-temperature preset (short name ``pid-positive``); ``overrides`` replace preset values."""
        policy = cls(feature_spec, action_mapping, **{**cls.POSITIVE_PRESET, **overrides})
        policy.name = "pid-positive"
        return policy

    def _initial_state(self, batch_size, device):
        z = torch.zeros(batch_size, dtype=torch.float32, device=device)
        no = torch.zeros(batch_size, dtype=torch.bool, device=device)
        return {
            "errors": torch.zeros(batch_size, self.window, dtype=torch.float32, device=device),  # (B, W), 0 = empty
            "e_prev": z.clone(),  # (B,)
            "has_e_prev": no.clone(),  # (B,) False: e_prev := e on the next step
            "t_prev": z.clone(),  # (B,)
            "has_t_prev": no.clone(),  # (B,) False: no rate limit on the next step
        }

    def _temperatures(self, obs, episode_start=None):
        s, _ = self._begin_step(obs.shape[0], episode_start, obs.device)
        e = self.target - self.column(obs, "quality")  # (B,)
        e_prev = torch.where(s["has_e_prev"], s["e_prev"], e)  # (B,)
        errors = torch.cat([s["errors"][:, 1:], e.unsqueeze(1)], dim=1)  # (B, W)
        u = self.base + self.kp * e + self.ki * errors.sum(1) + self.kd * (e - e_prev)  # (B,)
        u = rate_limit(u, s["t_prev"], self.max_delta, s["has_t_prev"])
        t = u.clamp(self.t_lo, self.t_hi)
        anomalous = self.column(obs, "anomaly") > self.anomaly_threshold  # (B,)
        t = anomaly_reset(t, anomalous, self.safe_lo, self.safe_hi)
        self._state = {
            "errors": torch.where(anomalous.unsqueeze(1), torch.zeros_like(errors), errors),
            "e_prev": e,
            "has_e_prev": ~anomalous,
            "t_prev": t,
            "has_t_prev": torch.ones_like(anomalous),
        }
        return t  # (B,)


# ====================================================================== EDT
class EntropyDynamicTemperature(BaselinePolicy):
    r"""Entropy-based Dynamic Temperature (EDT), Zhang et al. 2024, arXiv:2403.14541.

    ``T = T0 * N^(theta / H)``, ``H`` = ``entropy`` feature (nats) of the base (T = 1) distribution,
    floored at ``h_floor``: ``H = max(H, h_floor)``. With ``0 < N < 1`` the temperature rises with
    the entropy, from ``T -> 0`` (greedy) when the model is certain to ``T -> T0`` as ``H`` grows;
    at the floor ``N^(theta / 1e-6)`` underflows to exactly 0 (greedy), never a division by zero.

    Defaults ``T0 = 1.0`` (``T`` never exceeds plain sampling), ``theta = 1.5``, ``N = 0.8`` (the
    paper's fixed base); ``theta`` sets where the rise happens: ``T = T0 / 2`` at
    ``H = theta ln N / ln(1/2) = 0.48 nats`` for theta = 1.5, i.e. the temperature is
    halved only for confident (H < 0.5 nat) steps, and ``T = N T0 = 0.8 T0`` at ``H = theta = 1.5``
    nats.

    Arguments: ``t0 > 0``, ``theta > 0``, ``N`` in (0, 1), ``h_floor > 0`` (1e-6).
    """

    name = "edt"
    display_name = "EDT"
    reads = ("entropy",)
    label_params = {"t0": "T0", "theta": "θ"}

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, *,
                 t0: float = 1.0, theta: float = 1.5, N: float = 0.8, h_floor: float = 1e-6):
        owner = "EntropyDynamicTemperature"
        t0, theta, N, h_floor = (check_real(owner, n, v) for n, v in
                                 [("t0", t0), ("theta", theta), ("N", N), ("h_floor", h_floor)])
        if not 0.0 < N < 1.0:
            raise ValueError(f"{owner} N={N} must be in (0, 1) so that T rises with the entropy "
                             "(the paper uses N=0.8)")
        if not t0 > 0:
            raise ValueError(f"{owner} t0={t0} must be > 0 (the temperature reached at high entropy)")
        if not theta > 0:
            raise ValueError(f"{owner} theta={theta} must be > 0 (e.g. theta=1.5)")
        if not h_floor > 0:
            raise ValueError(f"{owner} h_floor={h_floor} must be > 0 (e.g. 1e-6)")
        super().__init__(feature_spec, action_mapping, t0=t0, theta=theta, N=N, h_floor=h_floor)
        self.t0, self.theta, self.N, self.h_floor = t0, theta, N, h_floor

    @property
    def label(self) -> str:
        base = super().label
        return base if self.N == 0.8 else base[:-1] + f", N={self.N:g})"

    def _temperatures(self, obs, episode_start=None):  # noqa: ARG002 (the protocol; stateless)
        h = self.column(obs, "entropy").clamp_min(self.h_floor)  # (B,)
        return self.t0 * torch.exp((self.theta / h) * math.log(self.N))  # (B,), exp(-huge) = 0


# ====================================================================== confidence rules
class _LinearRule(BaselinePolicy):
    """Shared body of the seed's confidence rules: ``T = a + sum_k coef_k * feature_k`` (no clamp)."""

    terms: tuple[tuple[str, str], ...] = ()  # (parameter, feature)

    def _setup(self, feature_spec, action_mapping, **params):
        params = {k: check_real(type(self).__name__, k, v) for k, v in params.items()}
        super().__init__(feature_spec, action_mapping, **params)
        for k, v in params.items():
            setattr(self, k, v)

    def _temperatures(self, obs, episode_start=None):  # noqa: ARG002 (the protocol; stateless)
        t = _full(obs, self.a)  # (B,)
        for param, feature in self.terms:
            t = t + getattr(self, param) * self.column(obs, feature)
        return t


class MaxProbRule(_LinearRule):
    """Seed confidence rule ``T = a + b * max(p)`` (``max_prob`` feature); defaults a = 0.5, b = -0.4.

    T in [a + b, a + b/V]: 0.1 when the model is certain, up to ~0.5 when it is flat.
    """

    name = "maxprob"
    display_name = "MaxProb"
    reads = ("max_prob",)
    label_params = {"a": "a", "b": "b"}
    terms = (("b", "max_prob"),)

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, *,
                 a: float = 0.5, b: float = -0.4):
        self._setup(feature_spec, action_mapping, a=a, b=b)


class EntropyRule(_LinearRule):
    """Seed confidence rule ``T = a + b * H(p)`` (``entropy`` feature, nats); defaults a = 0.1, b = 0.8.

    T in [a, a + b ln V] (before the env's clip): 0.1 when certain, 1.21 for 4 equally likely tokens.
    """

    name = "entropy"
    display_name = "EntropyRule"
    reads = ("entropy",)
    label_params = {"a": "a", "b": "b"}
    terms = (("b", "entropy"),)

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, *,
                 a: float = 0.1, b: float = 0.8):
        self._setup(feature_spec, action_mapping, a=a, b=b)


class MedianRule(_LinearRule):
    """Seed confidence rule ``T = a + b * median(p)``; defaults a = 0.5, b = -0.4.

    ``median(p)`` is the ``median_top_prob`` feature: the median of the 64 most likely
    probabilities (all of them when fewer; the mean of the two middle values for an even count,
    so 0.025 for p = [0.01, 0.02, 0.03, 0.94]). T in [a + b, a).
    """

    name = "median"
    display_name = "MedianRule"
    reads = ("median_top_prob",)
    label_params = {"a": "a", "b": "b"}
    terms = (("b", "median_top_prob"),)

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, *,
                 a: float = 0.5, b: float = -0.4):
        self._setup(feature_spec, action_mapping, a=a, b=b)


class CombinedRule(_LinearRule):
    """Seed confidence rule ``T = a + b * max(p) + c * H(p)``; defaults a = 0.3, b = -0.3, c = 0.4.

    The defaults blend the max-prob and entropy rules at half their slopes: 0.0 at a one-hot
    (a + b), 0.78 for 4 equally likely tokens (0.3 - 0.075 + 0.4 ln 4), 0.13 for
    p = [0.01, 0.02, 0.03, 0.94].
    """

    name = "combined"
    display_name = "CombinedRule"
    reads = ("max_prob", "entropy")
    label_params = {"a": "a", "b": "b", "c": "c"}
    terms = (("b", "max_prob"), ("c", "entropy"))

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, *,
                 a: float = 0.3, b: float = -0.3, c: float = 0.4):
        self._setup(feature_spec, action_mapping, a=a, b=b, c=c)


# ====================================================================== DynaTemp
class DynaTemp(BaselinePolicy):
    r"""Dynamic temperature as llama.cpp implements it (``llama_sampler_init_temp_ext``, PR #4972, from koboldcpp).

    ``min_T = max(0, t - delta)``, ``max_T = t + delta``,
    ``T = min_T + (max_T - min_T) * (H / ln n)^exponent``, where ``H / ln n`` is the entropy
    normalised by its maximum over the ``n`` candidate tokens: our ``entropy_norm`` feature
    (over the finite logits of the base distribution; 0 when one token is left).

    Differences from llama.cpp: llama.cpp computes the entropy over the candidates left by the
    samplers before it in the chain (after top-k/top-p), we over every finite logit; with one
    candidate llama.cpp leaves the logits alone, we return ``min_T`` (same draw: one token).
    ``delta = 0`` gives the plain temperature ``t``, as in llama.cpp.

    Defaults ``t = 0.8, delta = 0.5, exponent = 1.0`` (T in [0.3, 1.3]). Arguments: ``t >= 0``,
    ``delta >= 0``, ``exponent >= 0``.
    """

    name = "dynatemp"
    display_name = "DynaTemp"
    reads = ("entropy_norm",)
    label_params = {"t": "T", "delta": "δ", "exponent": "exp"}

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, *,
                 t: float = 0.8, delta: float = 0.5, exponent: float = 1.0):
        owner = "DynaTemp"
        t, delta, exponent = (check_real(owner, n, v) for n, v in [("t", t), ("delta", delta), ("exponent", exponent)])
        if t < 0:
            raise ValueError(f"{owner} t={t} must be >= 0 (dynamic temperature is a positive-T method)")
        if delta < 0:
            raise ValueError(f"{owner} delta={delta} must be >= 0 (T ranges over [max(0, t - delta), t + delta])")
        if exponent < 0:
            raise ValueError(f"{owner} exponent={exponent} must be >= 0 (1.0 = linear in normalised entropy)")
        super().__init__(feature_spec, action_mapping, t=t, delta=delta, exponent=exponent)
        self.t, self.delta, self.exponent = t, delta, exponent
        self.min_t, self.max_t = max(0.0, t - delta), t + delta

    def _temperatures(self, obs, episode_start=None):  # noqa: ARG002 (the protocol; stateless)
        h = self.column(obs, "entropy_norm").clamp(0.0, 1.0)  # (B,)
        return self.min_t + (self.max_t - self.min_t) * h.pow(self.exponent)  # (B,)


# ====================================================================== surprise
class SurpriseController(BaselinePolicy):
    r"""Mirostat-like integral controller on the temperature: keeps the drawn tokens' surprise near ``tau``.

    Mirostat (Basu et al. 2021, arXiv:2007.14966) keeps the surprise ``s = -log2 p(token)`` near a
    target ``tau`` by updating ``mu <- mu - eta (s - tau)``; this controller applies the same update
    to the temperature:

    ``T_t = clamp(T_(t-1) - eta * (s_t - tau), t_lo, t_hi)``, ``s_t = last_surprise / ln 2`` (bits)

    where ``last_surprise`` is ``-ln p_base`` of the previous drawn token under the base (T = 1)
    distribution. A surprise above ``tau`` lowers T (sharpens), below ``tau`` raises it.

    * First step of an episode (``position`` == 0: no token drawn yet): ``T = t_init`` and no
      update. A row that starts afresh (``episode_start``, new batch size, :meth:`reset`) has
      ``T_(t-1) = t_init``.
    * The state is the *clamped* ``T_t`` (no wind-up beyond the bounds). It is this controller's own
      output, not the ``prev_temperature`` feature: choose bounds inside the env's ``[t_min, t_max]``.

    Defaults ``tau = 5.0`` bits (Mirostat's default), ``eta = 0.1``, ``t_init = 1.0``,
    ``t_lo = 0.05``, ``t_hi = 2.0``. Arguments: ``eta > 0``, ``t_lo < t_hi``, ``t_init`` in
    ``[t_lo, t_hi]``.
    """

    name = "surprise"
    display_name = "Surprise"
    reads = ("last_surprise", "position")
    label_params = {"tau": "τ", "eta": "η"}
    stateful = True

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, *,
                 tau: float = 5.0, eta: float = 0.1, t_init: float = 1.0, t_lo: float = 0.05, t_hi: float = 2.0):
        owner = "SurpriseController"
        tau, eta, t_init, t_lo, t_hi = (check_real(owner, n, v) for n, v in
                                        [("tau", tau), ("eta", eta), ("t_init", t_init), ("t_lo", t_lo),
                                         ("t_hi", t_hi)])
        if not eta > 0:
            raise ValueError(f"{owner} eta={eta} must be > 0 (the step size, e.g. 0.1)")
        if not t_lo < t_hi:
            raise ValueError(f"{owner} bounds t_lo={t_lo} >= t_hi={t_hi}: the temperature range [t_lo, t_hi] is "
                             "empty; set t_lo below t_hi")
        if not t_lo <= t_init <= t_hi:
            raise ValueError(f"{owner} t_init={t_init} must lie in the bounds [t_lo={t_lo}, t_hi={t_hi}]")
        super().__init__(feature_spec, action_mapping, tau=tau, eta=eta, t_init=t_init, t_lo=t_lo, t_hi=t_hi)
        self.tau, self.eta, self.t_init, self.t_lo, self.t_hi = tau, eta, t_init, t_lo, t_hi

    def _initial_state(self, batch_size, device):
        return {"t": torch.full((batch_size,), self.t_init, dtype=torch.float32, device=device)}  # (B,)

    def _temperatures(self, obs, episode_start=None):
        s, _ = self._begin_step(obs.shape[0], episode_start, obs.device)
        surprise_bits = self.column(obs, "last_surprise") / _LN2  # (B,)
        updated = (s["t"] - self.eta * (surprise_bits - self.tau)).clamp(self.t_lo, self.t_hi)
        first = self.column(obs, "position") <= 0  # (B,) no drawn token yet
        t = torch.where(first, torch.full_like(updated, self.t_init), updated)
        self._state = {"t": t}
        return t  # (B,)


# ====================================================================== schedules and lookups
class HotColdSchedule(BaselinePolicy):
    """Hot start, cold finish: ``T = hot`` for the first ``n`` tokens of a completion, then ``T = cold``.

    The simplest per-token schedule. The first tokens decide where a completion goes, so heat spent
    there buys diversity across samples at a small cost in likelihood, and the rest of the completion
    is drawn cold. Reads ``position`` (tokens generated / horizon).

    Arguments: ``hot`` (default 1.5), ``n`` (default 1 token), ``cold`` (default 0.5). Spec strings:
    ``hotcold``, ``hotcold:hot=2.0,n=2,cold=0.6``.
    """

    name = "hotcold"
    display_name = "HotCold"
    reads = ("position",)
    label_params = {"hot": "T_hot", "n": "n", "cold": "T_cold"}

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, *,
                 hot: float = 1.5, n: int = 1, cold: float = 0.5):
        hot = check_real("HotColdSchedule", "hot", hot)
        cold = check_real("HotColdSchedule", "cold", cold)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"HotColdSchedule n={n!r} must be an integer >= 0 (tokens drawn at T_hot)")
        super().__init__(feature_spec, action_mapping, hot=hot, n=n, cold=cold)
        self.hot, self.n, self.cold = hot, n, cold

    def _temperatures(self, obs, episode_start=None):  # noqa: ARG002 (the protocol; stateless)
        token = self.tokens_done(obs)  # (B,) index of the next token
        return torch.where(token < self.n, _full(obs, self.hot), _full(obs, self.cold))


class CategoryTable(BaselinePolicy):
    """One fixed temperature per task category: the static lookup table a deployment that knows the task
    label would use (the sceptic's first answer to a learned, category-conditioned policy).

    Reads the category one-hot of the observation (``env.include_category``); ``other`` covers any
    category outside the table. Arguments: one temperature per category of
    :data:`envs.prompts.CATEGORIES`-style names in the feature spec, plus ``other`` (default 0.7 each).
    Spec strings: ``table:code=0.3,creative_writing=1.1``. ``kelvin.evaluation`` tunes one table per
    diversity setting on the validation split.
    """

    name = "table"
    display_name = "Table"

    def __init__(self, feature_spec: FeatureSpec, action_mapping: ActionMapping | None = None, **temperatures: float):
        if not feature_spec.categories:
            raise ValueError("CategoryTable needs the category one-hot in the observation (env.include_category: true)")
        names = feature_spec.category_slots
        unknown = sorted(set(temperatures) - set(names))
        if unknown:
            raise ValueError(f"CategoryTable: unknown category {unknown[0]!r}; {did_you_mean(unknown[0], names, always_list=True)}")
        table = {c: check_real("CategoryTable", c, temperatures.get(c, 0.7)) for c in names}
        super().__init__(feature_spec, action_mapping, **table)
        self.reads = tuple(f"category_{c}" for c in names)
        self._col = {n: feature_spec.index(n) for n in self.reads}
        self._table = torch.tensor([table[c] for c in names], dtype=torch.float32)  # (C + 1,)

    @classmethod
    def param_defaults(cls, feature_spec: FeatureSpec | None = None) -> dict[str, float]:
        """One temperature per category of ``feature_spec`` plus ``other`` (none without a spec)."""
        names = feature_spec.category_slots if feature_spec is not None else ()
        return {c: 0.7 for c in names}

    @property
    def label(self) -> str:
        return "Table(" + ", ".join(f"{c[:5]}={_fmt(t)}" for c, t in self._params.items()) + ")"

    def _temperatures(self, obs, episode_start=None):  # noqa: ARG002 (the protocol; stateless)
        start = self._col[self.reads[0]]
        onehot = obs[:, start:start + len(self.reads)]  # (B, C + 1)
        return onehot @ self._table.to(obs.device)  # (B,)
