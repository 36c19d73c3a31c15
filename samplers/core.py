"""Signed-temperature sampling: truncation, temperature, draw.

Every function takes a batch of logits ``(B, V)`` (one row per sequence, ``V`` the
vocabulary), works in pure torch on the logits' device with no Python loop over rows, and
returns new tensors: inputs are never edited in place.

Signed temperature
------------------
``p_i`` is proportional to ``exp(z_i / T)`` for any real ``T``:

* ``T > 0``: the ordinary tempered distribution (``T < 1`` sharpens, ``T > 1`` smooths).
* ``T < 0``: the ranking among the kept (finite) tokens is inverted; ``T = -1`` gives the
  least likely token the probability the most likely one had. Tokens masked with ``-inf``
  stay masked for every ``T``, negative ones included (a masked token is never drawn).
* ``T = 0`` (either sign of zero) is greedy: a one-hot on the argmax.
* ``0 < |T| < eps`` is the limit of its sign: argmax for ``T > 0``, argmin over the kept
  tokens for ``T < 0``. No division by a tiny ``T`` happens on this path.
* ``|T| = inf``: uniform over the kept tokens.
* Ties in the greedy / limit path resolve to the **first** index (``torch.max`` and
  ``torch.min`` semantics, as greedy decoding does), so those rows are deterministic.

The tempered logits are shifted so that their row maximum is exactly 0 (we compute
``(z - shift) / T`` with ``shift`` the row max for ``T >= 0`` and the row min of the kept
tokens for ``T < 0``): no overflow and no NaN for ``|T|`` down to ``eps`` and logits of
any magnitude float32 can subtract.

Order of operations
-------------------
1. **Truncation** (top-k, top-p, min-p, top-n-sigma) is computed on the *base*
   distribution, ``softmax(logits)`` at ``T = 1``; every rule looks at the same base
   distribution and the kept set is the intersection of the rules (rules are not applied
   one after another with renormalisation). The argmax always survives.
2. **Temperature** is applied to the kept set. So a negative ``T`` with truncation means
   "the least likely token of the plausible set"; without truncation it inverts the whole
   vocabulary (the anomalous-token regime).
3. **Draw**: inverse-CDF sampling on the softmax of the tempered logits; greedy / limit
   rows return exactly their argmax / argmin.

NaN / inf policy
----------------
* ``-inf`` in the logits means "masked" and is allowed anywhere, except that a row must
  keep at least one finite token (an all ``-inf`` row raises ``ValueError``).
* ``NaN`` or ``+inf`` in the logits raises ``ValueError`` naming the rows: it almost
  always means a broken forward pass (float16 overflow, bad weights); it is never turned
  into a silent NaN draw.
* A ``NaN`` temperature raises ``ValueError`` naming the rows; ``+-inf`` is allowed.
* Half-precision logits (float16 / bfloat16) are computed and returned in float32 by
  :func:`apply_temperature` and :func:`tempered_probs`; float64 stays float64.
  :func:`truncate` keeps the input dtype.

Float boundaries
----------------
Inclusive thresholds are compared with a slack of ``1e-6`` so that boundary cases survive
float rounding: min-p keeps ``p_i >= min_p * max(p) * (1 - 1e-6)`` (compared in log space)
and top-p keeps a token when the tokens strictly before it in the sorted order sum to less
than ``top_p - 1e-6``. Tokens tied with the last kept value of top-k / top-p are all kept.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from samplers.suggest import did_you_mean

__all__ = ["Truncation", "apply_temperature", "check_logits", "require_real", "truncate", "tempered_probs", "sample",
           "top_values"]

# Slack on inclusive float thresholds (min-p in log space, top-p on cumulative probability).
_BOUNDARY_SLACK = 1e-6
# Most row indices listed in an error message.
_MAX_ROWS_SHOWN = 10
# sample() draws from the kept tokens packed into (B, K) columns (whole blocks of _BLOCK tokens) when
# K * _PACK_FRACTION <= V: the temperature, exp, CDF and search then cost K per row instead of V (min-p 0.02
# keeps tens of tokens of an LM's 50k).
_BLOCK = 64
_PACK_FRACTION = 2


# --------------------------------------------------------------------------- validation


def _rows(mask: Tensor) -> str:
    """Row indices where the (B,) bool ``mask`` holds, for error messages."""
    idx = mask.nonzero().flatten().tolist()
    shown = ", ".join(str(i) for i in idx[:_MAX_ROWS_SHOWN])
    more = f", ... ({len(idx)} rows in all)" if len(idx) > _MAX_ROWS_SHOWN else ""
    return f"[{shown}{more}]"


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half / int inputs, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def require_real(x: Tensor, what: str, fix: str) -> None:
    """A ``TypeError`` naming ``what`` when the tensor ``x`` holds booleans or complex numbers (torch would read a
    bool as 0 / 1, and refuse a complex one deep inside with its own words); ``fix`` says what to pass instead."""
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{what} must hold real numbers; got a tensor of dtype {x.dtype}: {fix}")


def _as_logits(logits: Tensor) -> Tensor:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor of shape (B, V); got {type(logits).__name__}")
    require_real(logits, "logits", "pass the model's real-valued scores, e.g. logits.float()")
    if logits.ndim != 2 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits must have shape (B, V) with V >= 1; got shape {tuple(logits.shape)} "
            "(use logits.unsqueeze(0) for a single row)"
        )
    return logits


def _temperature_rows(temperature, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, bool]:
    """``(t, shared)``: the (B,) temperatures on ``device`` (a number broadcast to every row), and whether one
    number was given for all rows (then greedy / limit rows need no draw at all)."""
    if isinstance(temperature, Tensor):
        if temperature.ndim == 0:
            temperature = temperature.item()
        elif temperature.shape != (batch,):
            raise ValueError(
                f"temperature must be a float or a tensor of shape (B,) = ({batch},); "
                f"got shape {tuple(temperature.shape)}"
            )
        else:
            require_real(temperature, "temperature", "pass float temperatures (a bool would read as T = 1 or greedy)")
            return temperature.to(device=device, dtype=dtype), False
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise ValueError(f"temperature must be a real number or a (B,) tensor; got {temperature!r}")
    temperature = float(temperature)
    if math.isnan(temperature):
        raise ValueError(
            "temperature is NaN (for all rows); temperatures must be real numbers "
            "(+-inf allowed, meaning uniform over the kept tokens)"
        )
    return torch.full((batch,), temperature, dtype=dtype, device=device), True


def _logit_rows(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(zmax, bad, empty)`` of logits (B, V): the row max (B,), rows holding NaN or +inf (B,) and rows with
    every token masked (B,), without a device sync."""
    zmax = z.amax(dim=-1)  # (B,); NaN propagates into zmax, +inf shows as +inf
    return zmax, torch.isnan(zmax) | (zmax == math.inf), zmax == -math.inf


def _refuse_logits(z: Tensor, bad: Tensor, empty: Tensor, any_bad: bool, any_empty: bool) -> None:
    """The ValueError for NaN / +inf logits or an all -inf row, naming the rows (the NaN / inf policy)."""
    if any_bad:
        nan_rows = torch.isnan(z).any(dim=-1)
        inf_rows = (z == math.inf).any(dim=-1)
        raise ValueError(
            f"logits contain NaN or +inf in rows {_rows(bad)} (NaN in rows {_rows(nan_rows)}, "
            f"+inf in rows {_rows(inf_rows)}). Check the model outputs (float16 overflow? run the "
            "model in float32 or bfloat16); mask tokens with -inf, never with NaN or +inf."
        )
    if any_empty:
        raise ValueError(
            f"logits rows {_rows(empty)} are entirely -inf (every token masked); "
            "each row must keep at least one finite logit"
        )


def check_logits(logits: Tensor) -> Tensor:
    """The row max (B,) of logits (B, V), after the one check of Kelvin's NaN / inf policy: a ``ValueError``
    naming the rows that hold NaN or +inf or are entirely -inf. For callers that read logits before tempering
    them (:class:`samplers.runtime.PolicyRuntime` feeds them to the featurizer first)."""
    z = _as_logits(logits)
    zmax, bad, empty = _logit_rows(z)
    _refuse_logits(z, bad, empty, *torch.stack([bad.any(), empty.any()]).tolist())
    return zmax


def _inspect(z: Tensor, temperature: Tensor | None, eps: float):
    """Validate logits (and the (B,) temperatures, when given) with a single device sync.

    Returns ``(zmax, flags)``: ``zmax`` is (B,) and ``flags`` a dict of python bools describing the
    temperature rows (empty without temperatures). The argmax is left to the greedy / limit path,
    the only one that needs it (``amax`` is several times cheaper than ``max`` with indices on CPU).
    """
    zmax, bad, empty = _logit_rows(z)
    checks = [bad.any(), empty.any()]
    if temperature is not None:
        t = temperature
        checks += [torch.isnan(t).any(), (t < 0).any(), _is_limit(t, eps).any(), torch.isinf(t).any()]
    flags = torch.stack(checks).tolist()  # the one sync
    _refuse_logits(z, bad, empty, flags[0], flags[1])
    info = {}
    if temperature is not None:
        if flags[2]:
            raise ValueError(
                f"temperature is NaN in rows {_rows(torch.isnan(temperature))}; temperatures must "
                "be real numbers (+-inf allowed, meaning uniform over the kept tokens)"
            )
        info = {"negative": flags[3], "limit": flags[4], "infinite": flags[5]}
    return zmax, info


def _is_limit(t: Tensor, eps: float) -> Tensor:
    """(B,) bool: rows taking the greedy / limit path (``|T| < eps``, or ``T == 0`` exactly)."""
    return (t.abs() < eps) | (t == 0)


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0; got {eps!r}")
    return float(eps)


@dataclass(frozen=True)
class Truncation:
    """Which tokens survive before the temperature, computed on the base (T = 1) distribution.

    The one validated home of the truncation settings: the env's ``env.truncation`` block, an
    export's ``spec.json`` ``truncation`` and every sampler take this object, and :func:`sample`,
    :func:`truncate` and :func:`tempered_probs` build one from their keyword arguments. Every rule
    is off by default; active rules intersect (see the module doc).

    It checks its own fields (type and range, one line naming the field, the value and the fix),
    so this module needs nothing beyond torch.
    """

    top_k: int = 0
    """Keep the ``top_k`` largest logits (ties with the k-th kept); 0 = off."""
    top_p: float = 1.0
    """Keep the smallest most-likely set whose probability reaches ``top_p``, in (0, 1]; 1.0 = off."""
    min_p: float = 0.0
    """Keep tokens with ``p >= min_p * max(p)``, in [0, 1]; 0.0 = off."""
    top_n_sigma: float | None = None
    """Keep tokens with ``logit >= max(logit) - n * std(logits)``, a finite n > 0; None = off."""

    def __post_init__(self):
        top_k, top_p, min_p, sigma = self.top_k, self.top_p, self.min_p, self.top_n_sigma
        if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off); got {top_k!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not (0 < top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1] (1.0 = off); got {top_p!r}")
        if isinstance(min_p, bool) or not isinstance(min_p, numbers.Real) or not (0 <= min_p <= 1):
            raise ValueError(f"min_p must be a number in [0, 1] (0.0 = off); got {min_p!r}")
        if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, numbers.Real)
                                  or not (0 < sigma < math.inf)):
            raise ValueError(f"top_n_sigma must be None (off) or a finite number > 0; got {sigma!r}")
        object.__setattr__(self, "top_k", int(top_k))
        object.__setattr__(self, "top_p", float(top_p))
        object.__setattr__(self, "min_p", float(min_p))
        object.__setattr__(self, "top_n_sigma", None if sigma is None else float(sigma))

    @classmethod
    def from_dict(cls, values: dict | None) -> "Truncation":
        """From ``{top_k, top_p, min_p, top_n_sigma}`` (missing keys off); unknown keys are named with a suggestion."""
        values = dict(values or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(valid))
        if unknown:
            raise ValueError(f"unknown truncation keys {unknown}; {did_you_mean(unknown[0], valid)}")
        return cls(**values)

    @property
    def active(self) -> bool:
        """True when at least one rule is on."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0 or self.top_n_sigma is not None

    def to_dict(self) -> dict:
        """``{top_k, top_p, min_p, top_n_sigma}``: the keyword arguments of :func:`truncate` (JSON-safe)."""
        return {"top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p, "top_n_sigma": self.top_n_sigma}


_NO_TRUNCATION = Truncation()


# --------------------------------------------------------------------------- kernels


def _keep_threshold(z: Tensor, zmax: Tensor, truncation: Truncation):
    """(B,) the lowest logit every active rule keeps, or None when no rule is active.

    Every rule keeps the tokens at or above a per-row threshold, so the kept set (the intersection of
    the rules) is ``z >= threshold`` with ``threshold`` the largest of the rules' thresholds. ``z``
    (B, V) in the compute dtype, ``zmax`` (B,) its row max; each threshold is at most ``zmax``, so the
    argmax always survives.
    """
    vocab = z.shape[-1]
    top_k, top_p, min_p, top_n_sigma = truncation.top_k, truncation.top_p, truncation.min_p, truncation.top_n_sigma
    threshold = None

    def both(a: Tensor | None, b: Tensor) -> Tensor:
        return b if a is None else torch.maximum(a, b)

    if 0 < top_k < vocab:
        threshold = both(threshold, top_values(z, top_k)[:, -1])  # k-th largest; ties kept
    if min_p > 0:
        # p_i >= min_p * p_max  <=>  z_i >= z_max + log(min_p)
        threshold = both(threshold, zmax + (math.log(min_p) - _BOUNDARY_SLACK))
    if top_n_sigma is not None:
        finite = z > -math.inf  # (B, V)
        count = finite.sum(dim=-1, keepdim=True)  # (B, 1), >= 1 after validation
        mean = torch.where(finite, z, 0.0).sum(dim=-1, keepdim=True) / count  # (B, 1)
        var = torch.where(finite, (z - mean).square(), 0.0).sum(dim=-1, keepdim=True) / count
        threshold = both(threshold, zmax - top_n_sigma * var.sqrt().squeeze(1))
    if top_p < 1:
        sorted_z = torch.sort(z, dim=-1, descending=True).values  # (B, V)
        probs = torch.softmax(sorted_z, dim=-1)  # (B, V) base probabilities, descending
        before = probs.cumsum(dim=-1) - probs  # (B, V) mass strictly before each token
        n_keep = (before < top_p - _BOUNDARY_SLACK).sum(dim=-1, keepdim=True).clamp_min(1)  # (B, 1)
        threshold = both(threshold, sorted_z.gather(-1, n_keep - 1).squeeze(1))  # smallest kept logit
    return threshold


def top_values(z: Tensor, k: int) -> Tensor:
    """(B, k) the k largest values of each row of ``z`` (B, V), descending: ``torch.topk(z, k).values``.

    For a large vocabulary it first keeps the k blocks of ``_BLOCK`` tokens with the largest maxima (the
    k largest values are k distinct tokens, each at or below its block's max, so no block outside those k
    can hold a value above the k-th largest block max), then takes the top k of those ``k * _BLOCK``
    values: one max over (B, V) instead of a selection over it, with exactly the same values.
    """
    batch, vocab = z.shape
    if vocab % _BLOCK or k * _BLOCK * _PACK_FRACTION > vocab:
        return torch.topk(z, k, dim=-1).values
    blocks = z.view(batch, vocab // _BLOCK, _BLOCK)
    best = torch.topk(blocks.amax(dim=-1), k, dim=-1).indices  # (B, k) blocks
    return torch.topk(blocks.gather(1, best.unsqueeze(-1).expand(-1, -1, _BLOCK)).view(batch, -1), k, dim=-1).values


def _pack(z: Tensor, threshold: Tensor):
    """The kept tokens (``z >= threshold``) of each row packed to the left, or None when that saves little.

    Returns ``(values, columns, scatter)``: ``values`` (B, K) the kept logits in vocabulary order with
    ``-inf`` elsewhere, ``columns`` (B, K) their vocabulary indices, and ``scatter(y)`` which puts a
    (B, K) tensor back at full width (``-inf`` elsewhere). The vocabulary is cut into blocks of
    ``_BLOCK`` tokens; a block whose max reaches the threshold is copied whole, so finding the kept
    tokens costs one max over (B, V) and the rest is (B, K) work. Vocabulary order makes everything
    after it bit-identical to the full-width path: the CDF adds the same terms in the same order (a
    masked token adds an exact 0), a tie's first index is the same token, the kept row max is the
    full row's max.
    """
    batch, vocab = z.shape
    if vocab % _BLOCK:
        return None
    blocks = z.view(batch, vocab // _BLOCK, _BLOCK)
    live = blocks.amax(dim=-1) >= threshold[:, None]  # (B, C) blocks holding a kept token
    counts = live.sum(dim=-1)  # (B,)
    width = int(counts.max())
    if width * _BLOCK * _PACK_FRACTION > vocab:
        return None
    hits = live.nonzero()  # (N, 2) (row, block), row-major: vocabulary order within a row
    row, block = hits[:, 0], hits[:, 1]
    slot = torch.arange(row.shape[0], device=z.device) - (counts.cumsum(0) - counts)[row]  # (N,) place in its row
    index = torch.zeros((batch, width), dtype=torch.long, device=z.device)
    index[row, slot] = block
    used = torch.zeros((batch, width), dtype=torch.bool, device=z.device)
    used[row, slot] = True
    values = blocks.gather(1, index.unsqueeze(-1).expand(-1, -1, _BLOCK))  # (B, W, BLOCK)
    keep = (values >= threshold.view(-1, 1, 1)) & used.unsqueeze(-1)
    values = values.masked_fill(~keep, -math.inf).view(batch, width * _BLOCK)
    columns = (index.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK, device=z.device)).view(batch, width * _BLOCK)

    def scatter(y: Tensor) -> Tensor:
        full = torch.full((batch, vocab // _BLOCK, _BLOCK), -math.inf, dtype=y.dtype, device=y.device)
        full[row, block] = y.view(batch, width, _BLOCK)[row, slot]
        return full.view(batch, vocab)

    return values, columns, scatter


def _temper(z: Tensor, zmax: Tensor, temperature: Tensor, eps: float, info: dict, shared: bool = False):
    """Tempered logits (B, V) with row max 0, and the greedy/limit override (or None).

    ``z`` (B, V) validated logits (``-inf`` = masked), ``zmax`` (B,) its row max, ``temperature`` (B,) validated
    (no NaN; one number broadcast when ``shared``), ``info`` the flags of :func:`_inspect`. Returns ``(y, limit)``
    where ``limit`` is None or ``(rows, index)``: ``index`` (B,) the exact token of the greedy / limit rows,
    ``rows`` a (B,) bool of those rows or None when every row is one (a ``shared`` temperature on the limit path).
    """
    neg_inf = -math.inf
    t = temperature
    shift = zmax  # (B,)
    amin = None
    kept = None
    if info["negative"]:
        kept = z > neg_inf  # (B, V)
        zmin, amin = torch.where(kept, z, math.inf).min(dim=-1)  # (B,), (B,)
        shift = torch.where(t >= 0, zmax, zmin)  # (B,)
    limit_rows = None
    if info["limit"]:
        limit_rows = _is_limit(t, eps)  # (B,)
        t = torch.where(limit_rows, 1.0, t)  # no division by ~0; rows overwritten below
    y = (z - shift[:, None]).div_(t[:, None])  # (B, V), row max 0 over kept tokens
    if info["negative"] or info["infinite"]:
        if kept is None:
            kept = z > neg_inf
        y = torch.where(kept, y, neg_inf)  # -inf / (-T) = +inf and -inf / inf = NaN: re-mask
    limit = None
    if limit_rows is not None:
        amax = z.argmax(dim=-1)  # (B,), first index on ties
        index = amax if amin is None else torch.where(temperature >= 0, amax, amin)  # (B,)
        onehot = torch.arange(z.shape[-1], device=z.device) == index[:, None]  # (B, V)
        y = torch.where(limit_rows[:, None], torch.where(onehot, 0.0, neg_inf), y)
        limit = (None if shared else limit_rows, index)
    return y, limit


def _prepare(logits: Tensor, temperature, eps: float, truncation: Truncation, pack: bool = False):
    """Shared path of the public functions: validate, truncate, temper. Returns ``(y, limit, packed)``.

    With ``pack`` the kept tokens may come packed (:func:`_pack`): ``y`` is then (B, K) and ``packed`` holds
    ``(values, columns, scatter)`` to map back; otherwise (and whenever packing saves little) ``y`` is (B, V)
    and ``packed`` is None.
    """
    logits = _as_logits(logits)
    eps = _check_eps(eps)
    z = logits.to(_compute_dtype(logits.dtype))  # (B, V); no copy for float32/64
    t, shared = _temperature_rows(temperature, z.shape[0], z.device, z.dtype)
    zmax, info = _inspect(z, t, eps)
    threshold = _keep_threshold(z, zmax, truncation)
    packed = _pack(z, threshold) if pack and threshold is not None and z.shape[0] else None
    if packed is not None:
        z = packed[0]  # (B, K): the kept tokens in vocabulary order, -inf elsewhere
    elif threshold is not None:
        z = z.masked_fill(z < threshold[:, None], -math.inf)  # (B, V); argmax kept, so zmax still holds
    return (*_temper(z, zmax, t, eps, info, shared), packed)


# --------------------------------------------------------------------------- public API


def apply_temperature(logits: Tensor, temperature, eps: float = 1e-6) -> Tensor:
    """Tempered logits: new logits whose softmax is ``p_i ∝ exp(z_i / T)`` (signed ``T``).

    Args:
        logits: (B, V) float; ``-inf`` marks masked tokens (at least one finite per row).
        temperature: a float for all rows or a (B,) tensor, any real value or ``+-inf``.
        eps: ``|T| < eps`` takes the limit path (argmax for ``T >= 0``, argmin over the
            finite tokens for ``T < 0``, first index on ties).

    Returns:
        (B, V) tensor, row max exactly 0, ``-inf`` where a token has probability 0
        (masked tokens, and all but one token on greedy / limit rows). float32 for half
        inputs. Raises ``ValueError`` on NaN temperatures, NaN / +inf logits, all -inf rows.
    """
    return _prepare(logits, temperature, eps, _NO_TRUNCATION)[0]


def truncate(
    logits: Tensor, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, top_n_sigma=None
) -> Tensor:
    """Mask with ``-inf`` the tokens outside the kept set of the base distribution (T = 1).

    Args:
        logits: (B, V) float; ``-inf`` marks already masked tokens.
        top_k: keep the ``top_k`` largest logits (ties with the k-th are kept); 0 = off.
        top_p: keep the smallest set of most likely tokens whose cumulative probability
            reaches ``top_p`` (the token that crosses it is kept); 1.0 = off.
        min_p: keep tokens with ``p >= min_p * max(p)``; 0.0 = off.
        top_n_sigma: keep tokens with ``logit >= max(logit) - n * std`` (population std of
            the row's finite logits); None = off.

    Active rules intersect; the argmax always survives. Returns a new (B, V) tensor in the
    input dtype (a copy when every rule is off).
    """
    logits = _as_logits(logits)
    truncation = Truncation(top_k, top_p, min_p, top_n_sigma)
    z = logits.to(_compute_dtype(logits.dtype))  # (B, V)
    zmax, _ = _inspect(z, None, 0.0)
    threshold = _keep_threshold(z, zmax, truncation)
    return logits.clone() if threshold is None else logits.masked_fill(z < threshold[:, None], -math.inf)


def tempered_probs(logits: Tensor, temperature, eps: float = 1e-6, **truncation) -> Tensor:
    """(B, V) probabilities of a draw: ``softmax(apply_temperature(truncate(logits)))``.

    ``truncation`` takes the keyword arguments of :func:`truncate`. Greedy / limit rows are
    exactly one-hot; every row sums to 1.
    """
    valid = [f.name for f in fields(Truncation)]
    for name in truncation:
        if name not in valid:
            raise TypeError(f"tempered_probs() got an unknown truncation argument {name!r}; "
                            f"{did_you_mean(name, valid)}")
    return torch.softmax(_prepare(logits, temperature, eps, Truncation(**truncation))[0], dim=-1)


def sample(
    logits: Tensor,
    temperature,
    generator: torch.Generator | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    top_n_sigma=None,
    eps: float = 1e-6,
    return_tempered: bool = False,
    uniform_rows: Tensor | None = None,
):
    """Draw one token per row: truncate (base distribution), temper, draw (inverse CDF).

    ``generator`` must live on the logits' device (``torch.Generator(device=logits.device)``)
    for reproducible draws. Greedy / limit rows (``|T| < eps``) return exactly their argmax
    / argmin. Returns (B,) int64 token ids, or ``(tokens, tempered_logits)`` with
    ``return_tempered=True`` (the (B, V) logits the draw used, as :func:`apply_temperature`
    after :func:`truncate` returns them), so callers need not temper twice.

    ``uniform_rows`` (B,) long: row b draws with the uniform of row ``uniform_rows[b]`` (one uniform per row is
    drawn either way, so the stream advances the same): rows that name the same one share their random number
    (common random numbers: two rows with the same logits and temperature draw the same token, and close
    temperatures mostly do). None: every row its own.
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"sample(generator={generator!r}): expected a torch.Generator (on the logits' device) or None, "
                        f"got a {type(generator).__name__}")
    y, limit, packed = _prepare(logits, temperature, eps, Truncation(top_k, top_p, min_p, top_n_sigma), pack=True)
    if y.shape[0] == 0:
        return torch.empty(0, dtype=torch.long, device=y.device)
    if limit is not None and limit[0] is None:
        tokens = limit[1].clone()  # every row greedy / limit: no draw needed
    else:
        tokens = _inverse_cdf_draw(y, generator, uniform_rows)  # (B,)
        if limit is not None:
            rows, index = limit
            tokens = torch.where(rows, index, tokens)  # exact argmax / argmin
    if packed is not None:
        _, columns, scatter = packed
        tokens = columns.gather(1, tokens.view(-1, 1)).squeeze(1)
        if return_tempered:
            y = scatter(y)
    return (tokens, y) if return_tempered else tokens


def _inverse_cdf_draw(y: Tensor, generator: torch.Generator | None, uniform_rows: Tensor | None = None) -> Tensor:
    """One draw per row from softmax(y) by inverting the CDF with one uniform per row.

    ~10x faster than ``torch.multinomial`` on CPU for a 49k vocabulary (one cumsum and a
    binary search instead of multinomial's per-row setup). ``u`` lies in (0, total], so the
    first index whose cumulative mass reaches ``u`` always has positive probability: a
    token with probability 0 (masked) is never drawn.
    """
    cdf = torch.exp(y).cumsum_(dim=-1)  # (B, V); row max of y is 0, so no overflow
    total = cdf[:, -1:]  # (B, 1)
    u = 1.0 - torch.rand(total.shape, generator=generator, device=y.device, dtype=cdf.dtype)  # (B, 1) in (0, 1]
    if uniform_rows is not None:
        u = u[uniform_rows]
    u = u * total
    return torch.searchsorted(cdf, u).clamp_max(y.shape[1] - 1).squeeze(1)  # (B,)
