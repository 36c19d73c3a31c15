"""The one featurizer: observations a temperature policy sees, computed from logits and history.

The same :class:`Featurizer` runs inside the training environment and inside every exported
sampler (transformers ``LogitsProcessor``, llama.cpp, vLLM), so a policy sees identical inputs in
training and in deployment. It only uses what an inference engine has: the next-token logits
and the tokens generated so far (plus the temperatures it chose itself).

Observation table, ``FEATURE_SPEC_VERSION = 1`` (column order is part of the spec):

| # | name             | meaning                                                                        | range        |
|---|------------------|--------------------------------------------------------------------------------|--------------|
| 0 | entropy          | H(p) of the base (T = 1) next-token distribution over the finite logits, nats | [0, ln V]    |
| 1 | entropy_norm     | H(p) / ln(n), n = number of finite logits (1 token -> 0)                       | [0, 1]       |
| 2 | varentropy       | Var_p[-ln p], nats^2                                                           | >= 0         |
| 3 | max_prob         | max_i p_i                                                                      | (0, 1]       |
| 4 | top2_margin      | p_(1) - p_(2) (0 when only one token is finite)                                | [0, 1]       |
| 5 | logit_std        | population std of the finite logits                                            | >= 0         |
| 6 | median_top_prob  | median of the ``median_k`` (64) largest probabilities (all, if fewer)          | (0, 1]       |
| 7 | position         | tokens generated so far / ``horizon``                                          | >= 0         |
| 8 | prev_temperature | temperature used for the previous token (``initial_temperature`` at start)     | any real     |
| 9 | last_surprise    | -ln p_base(previous drawn token); 0 at start                                   | >= 0         |
|10 | mean_surprise    | running mean (EMA) of last_surprise; 0 at start                                | >= 0         |
|11 | mean_drawn_prob  | running mean (EMA) of p_base(drawn token); 1 at start                          | [0, 1]       |
|12 | repetition       | running mean (EMA) of "the drawn token occurred in the last ``repeat_window``" | [0, 1]       |
|13 | quality          | mean_drawn_prob * (1 - repetition): the inference-time quality signal          | [0, 1]       |
|14 | anomaly          | running mean (EMA) of the per-token anomaly indicator (see below)              | [0, 1]       |
|15+| category_*       | one-hot of the prompt category (when ``include_category``), last slot "other"  | {0, 1}       |
| + | position_bin_*   | one-hot of the position's bin among ``position_bins`` (when given, see below)  | {0, 1}       |
| + | diversity        | the diversity dial λ, the reward's diversity weight (when ``include_diversity``) | >= 0         |

Running means are exponential moving averages with decay ``ema_decay`` and bias correction
(like Adam's), so the first token already gets its full value; before the first token they
hold the values given in the table. The per-token anomaly indicator is
``max(token_prior[token], 1[last_surprise > anomaly_surprise])``: ``token_prior`` is a (V,)
tensor of per-token anomaly priors (:func:`anomaly.prior.build_token_prior`; zeros when not given),
and the surprise test flags draws the base model gave less than exp(-anomaly_surprise) probability
(default e^-9.21 = 1e-4): the collapse of the base probability that negative temperatures cause.
The indicator is computed by the one anomaly detector, :class:`anomaly.detector.AnomalyDetector`
(built from ``token_prior``, or passed as ``detector=``).

``position_bins`` (token counts, increasing; empty by default, and then the table has no such columns) cut the
tokens generated so far into ``len(position_bins) + 1`` bins: with ``(4, 8)`` column ``position_bin_0`` is 1 for
the first 4 tokens, ``position_bin_1`` for tokens 5-8 and ``position_bin_2`` from token 9 on. ``position`` is one
number, so a small actor reading it draws smooth curves; a step in the temperature where a bin ends (a hot start
with a cooler finish, docs/results.md) is one weight of a bin column. The columns are optional and off by
default, so every spec without them keeps its layout (no version change); an older Kelvin refuses a spec with
them (an unknown setting), rather than reading it wrong.

``max_prob`` / ``entropy`` / ``median_top_prob`` are the inputs of the seed's confidence rules
(T = a + b max(p), a + b H(p), a + b median(p)); the median runs over the 64 most likely tokens
because the median over a 49k vocabulary is ~1e-9 for every context (uninformative) and costs a
full selection per row per step.

Old names still load, with a warning that says where they moved (:data:`RENAMED_SETTINGS`,
:data:`RENAMED_FEATURES`): ``include_diversity_weight`` is ``include_diversity`` and the feature
``diversity_weight`` is ``diversity`` (a rename only: the layout and its version are unchanged).
"""

from __future__ import annotations

import numbers
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple, Sequence

import torch
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator
from pydantic.dataclasses import dataclass as settings_dataclass

from anomaly.detector import AnomalyDetector
from samplers.core import top_values
from samplers.suggest import did_you_mean, renamed

__all__ = ["FEATURE_SPEC_VERSION", "BASE_FEATURES", "OTHER_CATEGORY", "FeatureSettings", "FeatureSpec", "Featurizer",
           "TokenStats", "RENAMED_FEATURES", "RENAMED_SETTINGS", "check_feature_version", "distribution_features",
           "position_bin_onehot", "upgrade_spec_dict"]

FEATURE_SPEC_VERSION = 1

DISTRIBUTION_FEATURES = ("entropy", "entropy_norm", "varentropy", "max_prob", "top2_margin", "logit_std",
                         "median_top_prob")
HISTORY_FEATURES = ("position", "prev_temperature", "last_surprise", "mean_surprise", "mean_drawn_prob",
                    "repetition", "quality", "anomaly")
BASE_FEATURES = DISTRIBUTION_FEATURES + HISTORY_FEATURES
OTHER_CATEGORY = "other"
"""The name of the category one-hot's final slot: any category outside :attr:`FeatureSpec.categories`."""
RENAMED_SETTINGS = {"include_diversity_weight": "include_diversity"}
"""Feature settings of older configs and exports and their names now (read with a warning)."""
RENAMED_FEATURES = {"diversity_weight": "diversity"}
"""Feature names of older exports (``spec.json`` ``names``) and their names now: the same column."""




def upgrade_spec_dict(d: dict) -> dict:
    """A copy of a ``feature_spec`` mapping (an export's ``spec.json``) in today's names: old settings
    (:data:`RENAMED_SETTINGS`) and feature names (:data:`RENAMED_FEATURES`) renamed, one warning for all."""
    d = dict(d)
    moved = {old: new for old, new in RENAMED_SETTINGS.items() if old in d}
    names = d.get("names")
    if isinstance(names, (list, tuple)):
        moved.update({old: new for old, new in RENAMED_FEATURES.items() if old in names})
        d["names"] = [RENAMED_FEATURES.get(n, n) if isinstance(n, str) else n for n in names]
    for old, new in RENAMED_SETTINGS.items():
        if old in d and new not in d:
            d[new] = d.pop(old)
    if moved:
        warnings.warn("feature spec: " + "; ".join(f"{old} is now {new}" for old, new in moved.items())
                      + " (an older export: it loads as is; export it again to write the new names)", FutureWarning,
                      stacklevel=3)
    return d


def check_feature_version(version) -> None:
    """The one feature-spec version check: a ValueError unless ``version`` is this featurizer's."""
    if version != FEATURE_SPEC_VERSION:
        raise ValueError(
            f"feature spec version {version!r} is not this Kelvin's featurizer (version {FEATURE_SPEC_VERSION}): "
            "a policy's observations would mean something else. Retrain the policy, or use the Kelvin release it "
            "was trained with")


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class FeatureSettings:
    """The tunable part of the observation: the ``env.features`` block of a config.

    The rest of a :class:`FeatureSpec` comes from the env: ``horizon`` from ``env.max_new_tokens``,
    ``categories`` from ``env.include_category``.
    """

    initial_temperature: StrictFloat = Field(1.0, allow_inf_nan=False)
    """``prev_temperature`` before the first token."""
    ema_decay: StrictFloat = Field(0.8, ge=0.0, lt=1.0)
    """Decay of the running means (0.8 ~ a window of 5 tokens)."""
    repeat_window: StrictInt = Field(16, ge=1)
    """How many previous tokens count for ``repetition``."""
    anomaly_surprise: StrictFloat = Field(9.21, gt=0.0, allow_inf_nan=False)
    """A drawn token with -ln p_base above this counts as anomalous (9.21 = ln 1e4)."""
    median_k: StrictInt = Field(64, ge=1)
    """``median_top_prob`` runs over this many most likely tokens."""
    include_diversity: StrictBool = False
    """Append the diversity dial λ, the reward's diversity weight (for policies conditioned on it)."""
    position_bins: tuple[StrictInt, ...] = Field((), examples=[[4]])
    """Token counts where a position bin ends (increasing, >= 1): appends the one-hot ``position_bin_*`` of
    ``len + 1`` bins (see the module doc). Empty: no bin columns."""
    version: StrictInt = FEATURE_SPEC_VERSION
    """The observation table's version (:data:`FEATURE_SPEC_VERSION`); another one is refused."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        """Old setting names (:data:`RENAMED_SETTINGS`) load as their new ones, with a warning."""
        return renamed(values, RENAMED_SETTINGS, "env.features")

    def __post_init__(self):
        check_feature_version(self.version)
        bins = list(self.position_bins)
        if any(b < 1 for b in bins) or any(a >= b for a, b in zip(bins, bins[1:])):
            raise ValueError(f"position_bins={bins} must be increasing token counts >= 1, e.g. [4] "
                             "(the first 4 tokens, then the rest)")

    @property
    def include_diversity_weight(self) -> bool:
        """Deprecated: the old name of :attr:`include_diversity`."""
        return self.include_diversity


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class FeatureSpec(FeatureSettings):
    """Everything that defines the observation vector; exported with every policy."""

    horizon: StrictInt = Field(64, ge=1)
    """Scale of ``position`` (the episode's max_new_tokens in training)."""
    categories: tuple[StrictStr, ...] = ()
    """Category names of the one-hot (a final "other" slot is added); empty = no category features."""

    @classmethod
    def of(cls, settings: FeatureSettings, horizon: int, categories: Sequence[str] = ()) -> "FeatureSpec":
        """The spec of an env: its ``env.features`` settings, ``horizon`` (max_new_tokens) and category names."""
        return cls(horizon=horizon, categories=tuple(categories), **asdict(settings))

    # ------------------------------------------------------------------ the category one-hot
    @property
    def category_slots(self) -> tuple[str, ...]:
        """The names of the category one-hot's slots, in order: :attr:`categories` then :data:`OTHER_CATEGORY`
        (empty without category features). Feature ``category_<slot>`` is slot ``<slot>``."""
        return (*self.categories, OTHER_CATEGORY) if self.categories else ()

    def category_slot(self, name: str) -> int:
        """The one-hot slot of category ``name``: its index in :attr:`categories`, else the final "other" slot
        (any other name: a prompt file's own category, ``envs.prompts.DEFAULT_CATEGORY``)."""
        return self.categories.index(name) if name in self.categories else len(self.categories)

    def category_rows(self, category, batch_size: int) -> list[int] | None:
        """One-hot slots (B,) for a sampler's ``category`` argument: None, a name / index for every row, or one
        per row.

        Unlike :meth:`category_slot` a name must be one of :attr:`category_slots` (a typo would silently become
        "other"); None inside a list is "other". Returns None when ``category`` is None (rows keep the "other"
        slot a fresh featurizer row starts with). Raises ValueError with the fix.
        """
        if category is None:
            return None
        if not self.categories:
            raise ValueError("category was given, but this policy has no category features (it was trained with "
                             "env.include_category=false); drop the category argument")
        items = [category] * batch_size if isinstance(category, (str, int)) else list(category)
        if len(items) != batch_size:
            raise ValueError(f"category has {len(items)} entries for a batch of {batch_size} rows; give one per row "
                             "or a single name for all")
        other = len(self.categories)
        out = []
        for c in items:
            if c is None:
                out.append(other)
            elif isinstance(c, str):
                if c not in self.category_slots:
                    raise ValueError(f"unknown category {c!r}; "
                                     f"{did_you_mean(c, self.category_slots, always_list=True)}")
                out.append(self.category_slot(c))
            elif isinstance(c, numbers.Integral) and not isinstance(c, bool) and 0 <= int(c) <= other:
                out.append(int(c))
            else:
                raise ValueError(f"category {c!r} must be a name ({', '.join(self.category_slots)}) or an index "
                                 f"in [0, {other}]")
        return out

    @property
    def names(self) -> tuple[str, ...]:
        names = list(BASE_FEATURES)
        names += [f"category_{c}" for c in self.category_slots]
        names += [f"position_bin_{i}" for i in range(len(self.position_bins) + 1)] if self.position_bins else []
        if self.include_diversity:
            names.append("diversity")
        return tuple(names)

    @property
    def dim(self) -> int:
        return len(self.names)

    def index(self, name: str) -> int:
        if name in RENAMED_FEATURES:
            warnings.warn(f"feature {name!r} is now {RENAMED_FEATURES[name]!r}: write index({RENAMED_FEATURES[name]!r})",
                          FutureWarning, stacklevel=2)
            name = RENAMED_FEATURES[name]
        if name not in self.names:
            raise KeyError(f"no feature named {name!r}; {did_you_mean(name, self.names)}")
        return self.names.index(name)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["categories"] = list(self.categories)
        d["position_bins"] = list(self.position_bins)
        d["names"] = list(self.names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureSpec":
        d = upgrade_spec_dict(d)
        d.pop("names", None)
        return cls(**d)


def position_bin_onehot(position: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """The ``position_bin_*`` columns (B, K + 1): the one-hot of each row's bin, given the tokens done ``position``
    (B,) and the ``position_bins`` ``edges`` (K,) as a long tensor; bin i holds edges[i-1] <= position < edges[i]."""
    return torch.nn.functional.one_hot(torch.bucketize(position, edges, right=True), len(edges) + 1).float()


def distribution_features(logits: torch.Tensor, median_k: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Features 0-6 of the table for logits (B, V), and each row's log-normaliser (B,).

    ``ln p_i = logits_i - shift`` for the returned ``shift`` (row max + log-sum-exp), so the caller gets
    the base log-probability of any token without a (B, V) log-softmax. -inf logits (masked tokens)
    are allowed; NaN / +inf are not (checked by the sampler core and the samplers' runtime).

    With ``y = z - max z`` and ``e = exp(y)`` every moment is a dot product over the row:
    ``H = ln S0 - S1 / S0`` and ``Var[-ln p] = S2 / S0 - (S1 / S0)^2`` with ``S0 = sum e``,
    ``S1 = sum y e``, ``S2 = sum y^2 e``; the logit std comes from ``sum y`` and ``sum y^2``. That is a
    handful of passes over (B, V) (this runs once per generated token). Rows with masked tokens
    (``y = -inf``, where ``y * e`` is NaN) are recomputed over their finite logits only.

    On a CPU the rows go through in slices of about ``_SLICE_ELEMENTS`` logits, so that every pass over a
    slice reads what the previous one left in the cache instead of main memory (every feature is a
    function of its own row: the slices change nothing but the speed).
    """
    z = logits.float()  # (B, V)
    k = min(median_k, z.shape[-1])
    rows = max(1, _SLICE_ELEMENTS // max(z.shape[-1], 1))
    if z.device.type != "cpu" or z.shape[0] <= rows:
        return _features_of_sums(*_row_sums(z, k))
    scratch = torch.empty((2, rows, z.shape[-1]), dtype=z.dtype)  # y and e of a slice, reused by every slice
    parts = [_row_sums(part, k, scratch[:, :part.shape[0]]) for part in z.split(rows)]
    return _features_of_sums(torch.cat([sums for sums, _ in parts]), torch.cat([top for _, top in parts]))


# Logits per slice of rows in distribution_features on a CPU: 2 MiB of float32, which a core's cache holds.
_SLICE_ELEMENTS = 2**19


def _row_sums(z: torch.Tensor, k: int, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The passes over float32 logits ``z`` (B, V) that :func:`distribution_features` needs: ``sums`` (B, 7),
    the columns ``max z, S0, S1, S2, sum y, sum y^2, n`` (n: the finite logits), and the ``k`` largest logits
    (B, k), descending. ``scratch`` (2, B, V) is overwritten (None: allocated here): every (B, V) pass writes
    into it in place, so no pass allocates (on a CPU a fresh (B, V) buffer costs about as much as the pass that
    fills it). The (B,)-sized arithmetic is left to :func:`_features_of_sums`, once for all the slices."""
    if scratch is None:
        scratch = torch.empty((2,) + tuple(z.shape), dtype=z.dtype, device=z.device)
    zmax = z.amax(dim=-1, keepdim=True)  # (B, 1)
    y = torch.sub(z, zmax, out=scratch[0])  # (B, V), <= 0
    e = torch.exp(y, out=scratch[1])  # (B, V)
    s0 = e.sum(dim=-1)  # (B,) >= 1
    sy = y.sum(dim=-1)
    n = torch.full_like(s0, float(z.shape[-1]))
    ye = e.mul_(y)  # y * e in place (e is not needed again but on masked rows, recomputed there)
    s1 = ye.sum(dim=-1)  # (B,) NaN on rows with -inf (0 * -inf)
    s2 = ye.mul_(y).sum(dim=-1)  # y^2 e
    syy = torch.mul(y, y, out=scratch[1]).sum(dim=-1)
    masked = ~torch.isfinite(s1)  # (B,) rows holding -inf (or a broken row, which the caller rejects)
    if bool(masked.any()):
        ym = y[masked]  # (M, V)
        finite = torch.isfinite(ym)
        yf = torch.where(finite, ym, torch.zeros_like(ym))
        em = ym.exp()  # 0 on the masked tokens
        s1[masked] = torch.linalg.vecdot(yf, em)
        s2[masked] = torch.linalg.vecdot(yf * em, yf)
        sy[masked] = yf.sum(dim=-1)
        syy[masked] = torch.linalg.vecdot(yf, yf)
        n[masked] = finite.sum(dim=-1).float()
    return torch.stack([zmax.squeeze(1), s0, s1, s2, sy, syy, n], dim=-1), top_values(z, k)


def _features_of_sums(sums: torch.Tensor, top_z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features 0-6 (B, 7) and the log-normaliser (B,) from :func:`_row_sums`' ``sums`` (B, 7) and top logits
    (B, k)."""
    zmax, s0, s1, s2, sy, syy, n = sums.unbind(dim=-1)
    k = top_z.shape[-1]
    log_s0 = s0.log()
    mean_y = s1 / s0  # E_p[y]
    entropy = (log_s0 - mean_y).clamp_min(0.0)  # (B,)
    varentropy = (s2 / s0 - mean_y * mean_y).clamp_min(0.0)
    entropy_norm = torch.where(n > 1, entropy / torch.log(n.clamp_min(2.0)), torch.zeros_like(entropy)).clamp(0.0, 1.0)
    top = (top_z - zmax.unsqueeze(1)).exp() / s0.unsqueeze(1)  # (B, k) largest probabilities, descending
    max_prob = 1.0 / s0  # the argmax has e = 1
    top2_margin = max_prob - top[:, 1] if k > 1 else max_prob
    # median over the k most likely (fewer when fewer tokens are finite): mean of the middle two
    kk = n.long().clamp(max=k)  # (B,)
    lo_idx = ((kk - 1) // 2).view(-1, 1)
    hi_idx = (kk // 2).view(-1, 1)
    median = 0.5 * (top.gather(1, lo_idx) + top.gather(1, hi_idx)).squeeze(1)  # (B,)
    mean = sy / n
    logit_std = (syy / n - mean * mean).clamp_min(0.0).sqrt()
    feats = torch.stack([entropy, entropy_norm, varentropy, max_prob, top2_margin, logit_std, median], dim=-1)
    return feats, zmax + log_s0  # (B, 7), (B,)


class TokenStats(NamedTuple):
    """What :meth:`Featurizer.update` learned about the drawn tokens."""

    logp: torch.Tensor  # (B,) base-model (T = 1) log-probability of each drawn token
    anomalous: torch.Tensor  # (B,) per-token anomaly indicator in [0, 1] (see the module doc)


def _renamed_keyword(given: dict, old: str, new: str, value, owner: str):
    """The value of keyword ``new`` of ``owner`` when its old name ``old`` came in ``given`` (``**kwargs``), with a
    warning; a TypeError for any other keyword, or for both names at once."""
    unknown = [k for k in given if k != old]
    if unknown:
        raise TypeError(f"{owner}() got an unexpected keyword argument {unknown[0]!r}")
    if old not in given:
        return value
    if value is not None:
        raise TypeError(f"{owner}() got both {old}= and {new}=; {old} is the old name of {new}: keep {new}")
    warnings.warn(f"{owner}({old}=...) is now {owner}({new}=...): write {new}=", FutureWarning, stacklevel=3)
    return given[old]


@dataclass
class _RowState:
    """Per-row history, all tensors with a leading batch axis on the featurizer's device."""

    position: torch.Tensor  # (B,) long
    prev_temperature: torch.Tensor  # (B,)
    last_surprise: torch.Tensor  # (B,)
    ema_surprise: torch.Tensor  # (B,) biased EMA sums
    ema_prob: torch.Tensor  # (B,)
    ema_repeat: torch.Tensor  # (B,)
    ema_anomaly: torch.Tensor  # (B,)
    ema_weight: torch.Tensor  # (B,) 1 - decay^n, for bias correction
    recent: torch.Tensor  # (B, W) long, -1 = empty
    category: torch.Tensor  # (B,) long, index into categories (+ other)
    diversity: torch.Tensor  # (B,) the diversity dial λ


class Featurizer:
    """Batched, stateful featurizer: ``observe(logits) -> obs``, then ``update(tokens, T)``.

    Usage per step: ``obs = f.observe(logits)``; the policy picks temperatures; a token is drawn;
    ``f.update(tokens, temperatures)``. ``reset(rows)`` starts rows afresh (new episode / request).
    """

    def __init__(self, spec: FeatureSpec, batch_size: int, device: torch.device | str = "cpu",
                 token_prior: torch.Tensor | None = None, detector: AnomalyDetector | None = None):
        self.spec = spec
        self.device = torch.device(device)
        if detector is None:
            detector = AnomalyDetector(token_prior, surprise_threshold=spec.anomaly_surprise, device=self.device)
        else:
            if token_prior is not None:
                raise ValueError("give the Featurizer either token_prior or detector, not both "
                                 "(the detector carries its own token prior)")
            if detector.surprise_threshold != spec.anomaly_surprise:
                raise ValueError(
                    f"detector.surprise_threshold={detector.surprise_threshold} differs from the feature spec's "
                    f"anomaly_surprise={spec.anomaly_surprise}; build the detector with "
                    "surprise_threshold=spec.anomaly_surprise so the anomaly feature keeps its meaning"
                )
            detector.to(self.device)
        self.detector = detector
        self._bin_edges = (torch.tensor(spec.position_bins, dtype=torch.long, device=self.device)
                           if spec.position_bins else None)  # (K,) where the position bins end
        self._observed: tuple[torch.Tensor, torch.Tensor] | None = None  # (logits (B, V), shift (B,)) of observe()
        self.state = self._fresh(batch_size)

    @property
    def token_prior(self) -> torch.Tensor | None:
        """(V,) per-token anomaly prior of the detector (None = zeros)."""
        return self.detector.token_prior

    # ------------------------------------------------------------------ state
    def _fresh(self, batch_size: int) -> _RowState:
        z = torch.zeros(batch_size, device=self.device)
        return _RowState(
            position=torch.zeros(batch_size, dtype=torch.long, device=self.device),
            prev_temperature=torch.full_like(z, self.spec.initial_temperature),
            last_surprise=z.clone(), ema_surprise=z.clone(), ema_prob=z.clone(), ema_repeat=z.clone(),
            ema_anomaly=z.clone(), ema_weight=z.clone(),
            recent=torch.full((batch_size, self.spec.repeat_window), -1, dtype=torch.long, device=self.device),
            category=torch.full((batch_size,), self.spec.category_slot(OTHER_CATEGORY), dtype=torch.long,
                                device=self.device),
            diversity=z.clone(),
        )

    @property
    def batch_size(self) -> int:
        return self.state.position.shape[0]

    def reset(self, rows: torch.Tensor | Sequence[int] | None = None, category: torch.Tensor | Sequence[int] | None = None,
              diversity: torch.Tensor | Sequence[float] | float | None = None, **renamed) -> None:
        """Start ``rows`` (indices or a (B,) bool mask; None = all) as fresh episodes.

        ``category`` gives their category indices (into ``spec.categories``; ``len`` = other) and
        ``diversity`` their diversity dial λ, when the spec uses them (``diversity_weight=``, its old name,
        still works, with a warning).
        """
        diversity = _renamed_keyword(renamed, "diversity_weight", "diversity", diversity, "Featurizer.reset")
        s = self.state
        if rows is None:
            idx = torch.arange(self.batch_size, device=self.device)
        else:
            idx = torch.as_tensor(rows, device=self.device)
            idx = torch.nonzero(idx).flatten() if idx.dtype == torch.bool else idx.long().flatten()
        if idx.numel() == 0:
            return
        fresh = self._fresh(idx.numel())
        for name in fresh.__dataclass_fields__:
            getattr(s, name)[idx] = getattr(fresh, name)
        if category is not None:
            s.category[idx] = torch.as_tensor(category, dtype=torch.long, device=self.device).flatten()
        if diversity is not None:
            s.diversity[idx] = torch.as_tensor(diversity, dtype=torch.float32, device=self.device).flatten()

    def enter_rows(self, rows: torch.Tensor) -> tuple:
        """Narrow the featurizer to ``rows`` (R,) for a step on those rows alone (an engine that steps some
        of its request slots); returns what :meth:`leave_rows` needs to write them back."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device).view(-1)
        full = (self.state, self._observed)
        self.state = type(self.state)(**{name: getattr(self.state, name)[rows] for name in self.state.__dataclass_fields__})
        if self._observed is not None:
            logits, shift = self._observed
            self._observed = (logits[rows.to(logits.device)], shift[rows])
        return full

    def leave_rows(self, rows: torch.Tensor, full: tuple) -> None:
        """Write the narrowed rows back (the inverse of :meth:`enter_rows`): their history and their pending
        observation (the logits their next update reads) go back into the full batch."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.device).view(-1)
        state, observed = full
        for name in state.__dataclass_fields__:
            getattr(state, name)[rows] = getattr(self.state, name)
        if self._observed is not None:
            logits, shift = self._observed  # (R, V), (R,)
            if observed is None or observed[0].shape[1] != logits.shape[1]:
                observed = (torch.zeros((state.position.shape[0], logits.shape[1]), dtype=logits.dtype,
                                        device=logits.device), torch.zeros_like(state.prev_temperature))
            observed[0][rows.to(logits.device)] = logits
            observed[1][rows] = shift
        self.state, self._observed = state, observed

    # ------------------------------------------------------------------ per step
    def observe(self, logits: torch.Tensor) -> torch.Tensor:
        """Observation (B, F) float32 for next-token logits (B, V) and the current history."""
        if logits.shape[0] != self.batch_size:
            raise ValueError(f"logits have {logits.shape[0]} rows but the featurizer tracks {self.batch_size}")
        dist, shift = distribution_features(logits, self.spec.median_k)  # (B, 7), (B,)
        self._observed = (logits, shift)
        s = self.state
        w = s.ema_weight.clamp_min(1e-12)
        started = s.ema_weight > 0
        mean_surprise = torch.where(started, s.ema_surprise / w, torch.zeros_like(w))
        mean_prob = torch.where(started, s.ema_prob / w, torch.ones_like(w))
        repetition = torch.where(started, s.ema_repeat / w, torch.zeros_like(w))
        anomaly = torch.where(started, s.ema_anomaly / w, torch.zeros_like(w))
        quality = (mean_prob * (1.0 - repetition)).clamp(0.0, 1.0)
        history = torch.stack([
            s.position.float() / self.spec.horizon, s.prev_temperature, s.last_surprise, mean_surprise,
            mean_prob, repetition, quality, anomaly,
        ], dim=-1)  # (B, 8)
        parts = [dist, history]
        if self.spec.categories:
            parts.append(torch.nn.functional.one_hot(s.category, len(self.spec.category_slots)).float())
        if self._bin_edges is not None:
            parts.append(position_bin_onehot(s.position, self._bin_edges))
        if self.spec.include_diversity:
            parts.append(s.diversity.view(-1, 1))
        return torch.cat(parts, dim=-1)  # (B, F)

    def update(self, tokens: torch.Tensor, temperatures: torch.Tensor,
               rows: torch.Tensor | None = None) -> "TokenStats":
        """Record the drawn tokens (B,) and the temperatures used (B,).

        Returns the base-model log-probability of each drawn token and its anomaly indicator
        (both (B,)), which the reward reuses instead of computing them again. ``rows`` (B,) bool
        limits the update to the rows that drew a token (an engine whose requests advance unevenly);
        the other rows keep their history.
        """
        if self._observed is None:
            raise RuntimeError("Featurizer.update called before observe(); call observe(logits) first")
        if rows is not None:
            rows = rows.to(self.device).bool().reshape(-1)  # (B,)
            before = {name: getattr(self.state, name) for name in self.state.__dataclass_fields__}
            stats = self.update(torch.where(rows, tokens.to(self.device).long().view(-1), 0), temperatures)
            for name, old in before.items():  # update() builds new tensors: keep the old ones off the rows
                new = getattr(self.state, name)
                setattr(self.state, name, torch.where(rows.view((-1,) + (1,) * (new.ndim - 1)), new, old))
            return stats
        s = self.state
        tokens = tokens.to(self.device).long().view(-1)  # (B,)
        logits, shift = self._observed
        token_logp = logits.gather(1, tokens.view(-1, 1).to(logits.device)).squeeze(1).float().to(self.device) - shift
        token_logp = token_logp.clamp(max=0.0)  # (B,) ln p_base(token); rounding can put the argmax a hair above 0
        surprise = -token_logp
        repeated = (s.recent == tokens.view(-1, 1)).any(dim=1).float()  # (B,)
        d = self.spec.ema_decay
        s.ema_prob = d * s.ema_prob + (1 - d) * token_logp.exp()
        s.ema_weight = d * s.ema_weight + (1 - d)
        # The one anomaly detector (anomaly/detector.py): its indicator is what the feature averages.
        anomalous = self.detector.indicator(tokens, token_logp)  # (B,) max(token_prior[token], 1[surprise > ...])
        s.ema_surprise = d * s.ema_surprise + (1 - d) * surprise
        s.ema_repeat = d * s.ema_repeat + (1 - d) * repeated
        s.ema_anomaly = d * s.ema_anomaly + (1 - d) * anomalous
        s.last_surprise = surprise
        s.recent = torch.cat([s.recent[:, 1:], tokens.view(-1, 1)], dim=1)
        s.prev_temperature = torch.as_tensor(temperatures, dtype=torch.float32, device=self.device).view(-1).clone()
        s.position = s.position + 1
        self._observed = None
        return TokenStats(logp=token_logp, anomalous=anomalous)
