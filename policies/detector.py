r"""The anomaly detector: one cheap, batched per-token check, the same in the env and in engines.

:class:`AnomalyDetector` looks at the token each row just drew, its base-model (T = 1)
log-probability and the row's recent tokens, and returns one score per row in [0, 1] together
with named reasons (all (B,) float32, on the detector's device):

| reason | fires on | value |
| --- | --- | --- |
| `token_prior` | the drawn token's anomaly prior: the vocabulary flags of :func:`policies.anomaly.token_flags` raised by the discovered anomalous tokens (:mod:`policies.discovery`) | ``prior[token]`` in [0, 1] |
| `discovered_token` | the drawn token is one the negative-temperature probe / embedding view discovered ("emeteries", "MetaInfo") | its discovery weight in [0, 1] |
| `char_run` | a run of one repeated character, inside the token or continued across consecutive tokens ("!!" "!!" "!!") | max(token flag, ramp(run, 3, 12)); separators and digits ramp(run, 40, 160) |
| `symbol_soup` | non-printable characters, byte fragments, unusual symbols: in the token, or dense over the window of recent tokens | max(token flag, ramp(weight / chars, 0.08, 0.25) * min(1, weight / 3)) |
| `script_mixing` | letters of several scripts inside the token, or many scripts / switches across the window | max(token flag, ramp(#scripts, 2, 4), ramp(#switches, 6, 16)) |
| `surprise` | the base model gave the drawn token less than exp(-``surprise_threshold``) (1e-4) | 0 or 1 |
| `prob_collapse` | the running mean of the drawn tokens' base probability has collapsed | ramp(-log10(mean), 2.5, 4): mean 3e-3 = 0, 1e-4 = 1 |

``score = max(reasons)``. The per-token **indicator** ``max(token_prior, surprise)`` is what the
featurizer's ``anomaly`` feature averages (:mod:`policies.features`, feature 14): the featurizer
calls this detector, so the feature, the reward's anomaly component and an engine's guard all
read the same numbers. The window reasons use the ``recent`` tokens the caller passes (the
featurizer passes its ``repeat_window`` = 16 last tokens), the same thresholds as the text rules
of :mod:`policies.anomaly`, with the window counted in tokens instead of characters.

Reasons that need vocabulary facts (`char_run`, `symbol_soup`, `script_mixing` and
`discovered_token`) are 0 when the detector was built from a bare ``token_prior`` vector (as the
featurizer's default is); :meth:`AnomalyDetector.from_tokenizer` / :meth:`AnomalyDetector.for_model`
build the full detector. At episode end, :meth:`AnomalyDetector.text_reasons` runs the text-level
rules (:func:`policies.anomaly.text_anomaly_reasons`) on the decoded completions.

Cost per step: a handful of gathers on (B,) and (B, W) tensors, no Python loop over rows, no
sync; small beside the featurizer's (B, V) softmax.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import torch

from policies.anomaly import (
    CHAR_RUN_HI,
    CHAR_RUN_LO,
    SCRIPT_COUNT_HI,
    SCRIPT_COUNT_LO,
    SCRIPT_SWITCH_HI,
    SCRIPT_SWITCH_LO,
    SEPARATOR_RUN_HI,
    SEPARATOR_RUN_LO,
    SOUP_FRACTION_HI,
    SOUP_FRACTION_LO,
    SOUP_MIN_WEIGHT,
    TokenTable,
    text_anomaly_reasons_batch,
    text_anomaly_scores,
    token_table,
)

__all__ = ["STEP_REASONS", "AnomalyDetector", "Detection", "ScanResult"]

STEP_REASONS = ("token_prior", "discovered_token", "char_run", "symbol_soup", "script_mixing", "surprise",
                "prob_collapse")
"""Names of the per-step reasons, in the order :class:`Detection` holds them."""

DEFAULT_SURPRISE_THRESHOLD = 9.21  # ln 1e4, the FeatureSpec default
COLLAPSE_LO, COLLAPSE_HI = 2.5, 4.0  # -log10 of the running mean of p_base(drawn)


class Detection(NamedTuple):
    """What :meth:`AnomalyDetector.step` found, per row (all (B,) float32)."""

    score: torch.Tensor
    """max over the reasons, in [0, 1]."""
    indicator: torch.Tensor
    """max(token_prior, surprise): the per-token indicator the ``anomaly`` feature averages."""
    reasons: dict[str, torch.Tensor]
    """reason name (:data:`STEP_REASONS`) -> (B,) value in [0, 1]."""


class ScanResult(NamedTuple):
    """:meth:`AnomalyDetector.scan` over whole sequences (all (B, L) float32; 0 past a row's length)."""

    score: torch.Tensor
    indicator: torch.Tensor
    running: torch.Tensor
    """bias-corrected EMA of ``indicator`` after each token: the ``anomaly`` feature's trajectory."""
    reasons: dict[str, torch.Tensor]


def _ramp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((x - lo) / (hi - lo)).clamp(0.0, 1.0)


def _as_vector(name: str, value, vocab_size: int | None) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32).detach().cpu()
    if t.ndim != 1:
        raise ValueError(f"AnomalyDetector {name} must be a 1-D (V,) tensor; got shape {tuple(t.shape)}")
    if vocab_size is not None and t.shape[0] != vocab_size:
        raise ValueError(
            f"AnomalyDetector {name} has {t.shape[0]} entries but the vocabulary has {vocab_size}; "
            "pad or cut it to the model's logits width"
        )
    if bool(((t < 0) | (t > 1) | torch.isnan(t)).any()):
        raise ValueError(f"AnomalyDetector {name} must lie in [0, 1] (anomaly probabilities)")
    return t


class AnomalyDetector:
    """Batched per-token anomaly detector (see the module table).

    Args:
        token_prior: (V,) per-token prior in [0, 1] (the `token_prior` reason, and the token part of
            the indicator). None: ``max(table.prior, discovered)`` when those are given, else zeros.
        table: the vocabulary's :class:`~policies.anomaly.TokenTable` (enables `char_run`,
            `symbol_soup`, `script_mixing`).
        discovered: (V,) discovery weights in [0, 1] (enables `discovered_token`).
        surprise_threshold: a drawn token with ``-ln p_base`` above this is `surprise` (ln 1e4).
        collapse: ``(lo, hi)`` of the `prob_collapse` ramp in -log10(running mean of p_base).
        device: where the vocabulary tensors live (inputs are moved there).
    """

    def __init__(self, token_prior: torch.Tensor | None = None, *, table: TokenTable | None = None,
                 discovered: torch.Tensor | None = None, surprise_threshold: float = DEFAULT_SURPRISE_THRESHOLD,
                 collapse: tuple[float, float] = (COLLAPSE_LO, COLLAPSE_HI), device: torch.device | str = "cpu"):
        if isinstance(surprise_threshold, bool) or not isinstance(surprise_threshold, (int, float)) or not (
                math.isfinite(surprise_threshold) and surprise_threshold > 0):
            raise ValueError(f"AnomalyDetector surprise_threshold={surprise_threshold!r} must be a finite number > 0 "
                             "(nats; 9.21 = ln 1e4)")
        lo, hi = (float(c) for c in collapse)
        if not 0 <= lo < hi:
            raise ValueError(f"AnomalyDetector collapse={collapse!r} must be (lo, hi) with 0 <= lo < hi "
                             "(-log10 of the running mean of the drawn tokens' base probability)")
        vocab = table.vocab_size if table is not None else None
        self.discovered = None if discovered is None else _as_vector("discovered", discovered, vocab)
        vocab = vocab if vocab is not None else (None if self.discovered is None else self.discovered.shape[0])
        if token_prior is not None:
            self.token_prior = _as_vector("token_prior", token_prior, vocab)
        elif table is not None or self.discovered is not None:
            parts = [t for t in (None if table is None else table.prior, self.discovered) if t is not None]
            self.token_prior = torch.stack(parts).amax(0) if len(parts) > 1 else parts[0].clone()
        else:
            self.token_prior = None
        self.table = table
        self.surprise_threshold = float(surprise_threshold)
        self.collapse = (lo, hi)
        self.device = torch.device("cpu")
        self._n_scripts = 1
        self.to(device)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int | None = None, discovered=None,
                       **kwargs) -> "AnomalyDetector":
        """The full detector of a tokenizer's vocabulary.

        ``vocab_size``: the logits width (the table is padded / cut to it; default ``len(tokenizer)``).
        ``discovered``: None, a (V,) weight vector, or ``(token_id, weight)`` pairs / the entries of
        :func:`policies.discovery.discover_anomalous_tokens` (weight = their score).
        """
        table = token_table(tokenizer)
        if vocab_size is not None:
            table = table.resized(int(vocab_size))
        weights = None
        if discovered is not None:
            weights = _discovery_vector(discovered, table.vocab_size)
        return cls(table=table, discovered=weights, **kwargs)

    @classmethod
    def for_model(cls, lm, discovered: bool = True, discovery: dict | None = None, **kwargs) -> "AnomalyDetector":
        """The full detector of a loaded :class:`envs.lm.CausalLM`, with its discovered tokens.

        ``discovered=True`` uses :func:`policies.discovery.discovered_token_weights` (from the disk
        cache; computed once when missing); ``discovery`` passes its keyword arguments.
        """
        weights = None
        if discovered:
            from policies.discovery import discovered_token_weights

            weights = discovered_token_weights(lm, **(discovery or {}))
        return cls.from_tokenizer(lm.tokenizer, vocab_size=lm.vocab_size, discovered=weights, **kwargs)

    def to(self, device: torch.device | str) -> "AnomalyDetector":
        """Move the vocabulary tensors to ``device`` (in place); returns self."""
        self.device = torch.device(device)
        if self.token_prior is not None:
            self.token_prior = self.token_prior.to(self.device)
        if self.discovered is not None:
            self.discovered = self.discovered.to(self.device)
        if self.table is not None:
            self.table = TokenTable(**{k: getattr(self.table, k).to(self.device)
                                       for k in TokenTable.__dataclass_fields__})
            self._n_scripts = int(self.table.script.max().clamp_min(0)) + 1
        return self

    @property
    def vocab_size(self) -> int | None:
        """V, or None for a detector without vocabulary tensors."""
        return None if self.token_prior is None else int(self.token_prior.shape[0])

    # ------------------------------------------------------------------ per step
    def indicator(self, tokens: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """Only the per-token indicator (B,): ``max(token_prior[token], 1[-logp > surprise_threshold])``."""
        tokens = tokens.to(self.device).long().view(-1)
        surprise = -logp.to(self.device).float().view(-1)  # (B,)
        anomalous = (surprise > self.surprise_threshold).float()
        if self.token_prior is not None:
            anomalous = torch.maximum(anomalous, self.token_prior[tokens])
        return anomalous  # (B,)

    def step(self, tokens: torch.Tensor, logp: torch.Tensor, recent: torch.Tensor | None = None,
             mean_drawn_prob: torch.Tensor | None = None) -> Detection:
        """Score the tokens the rows just drew.

        Args:
            tokens: (B,) drawn token ids.
            logp: (B,) base-model (T = 1) log-probability of each drawn token.
            recent: (B, W) tokens each row drew before this one, oldest first, -1 = empty (the
                featurizer's ``state.recent``); None = no history.
            mean_drawn_prob: (B,) running mean of p_base(drawn token), this token included (the
                featurizer's ``mean_drawn_prob`` after the update); None = ``exp(logp)``.
        """
        tokens = tokens.to(self.device).long().view(-1)  # (B,)
        logp = logp.to(self.device).float().view(-1)  # (B,)
        if tokens.shape != logp.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and logp {tuple(logp.shape)} must both be (B,)")
        zeros = torch.zeros_like(logp)
        surprise = (-logp > self.surprise_threshold).float()  # (B,)
        prior = zeros if self.token_prior is None else self.token_prior[tokens]
        mean = logp.exp() if mean_drawn_prob is None else mean_drawn_prob.to(self.device).float().view(-1)
        collapse = _ramp(-torch.log10(mean.clamp_min(1e-30)), *self.collapse)  # (B,)
        reasons = {
            "token_prior": prior,
            "discovered_token": zeros if self.discovered is None else self.discovered[tokens],
            "char_run": zeros, "symbol_soup": zeros, "script_mixing": zeros,
            "surprise": surprise,
            "prob_collapse": collapse,
        }
        if self.table is not None:
            reasons.update(self._window_reasons(tokens, recent))
        score = torch.stack([reasons[r] for r in STEP_REASONS]).amax(0)  # (B,)
        return Detection(score=score, indicator=torch.maximum(prior, surprise), reasons=reasons)

    def _window_reasons(self, tokens: torch.Tensor, recent: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """`char_run`, `symbol_soup`, `script_mixing` of the token and of the recent window."""
        tab = self.table
        own = tab.reasons[tokens]  # (B, 3)
        if recent is None or recent.numel() == 0:
            seq = tokens.view(-1, 1)  # (B, 1)
        else:
            seq = torch.cat([recent.to(self.device).long(), tokens.view(-1, 1)], dim=1)  # (B, W + 1)
        valid = seq >= 0
        ids = seq.clamp_min(0)
        n = seq.shape[1]

        # Character run ending at the current token, followed backwards through whole-run tokens.
        rev = ids.flip(1)  # (B, W + 1), column 0 = current token
        rev_valid = valid.flip(1)
        char = torch.where(rev_valid, tab.run_char[rev], -1)  # (B, W + 1)
        length = torch.where(rev_valid, tab.run_length[rev], 0)
        whole = rev_valid & tab.run_whole[rev]
        c = char[:, :1]  # (B, 1) the current token's trailing character
        match = (char == c) & (c >= 0)  # (B, W + 1)
        through = match & whole  # a run passes through this token to the one before
        alive = torch.cumprod(through.long(), dim=1)  # (B, W + 1): tokens 0..j all pass through
        reach = torch.cat([torch.ones_like(alive[:, :1]), alive[:, :-1]], dim=1)  # (B, W + 1) token j is reached
        run = (reach * match * length).sum(1).float()  # (B,)
        sep = tab.run_separator[tokens]
        run_score = torch.where(sep, _ramp(run, SEPARATOR_RUN_LO, SEPARATOR_RUN_HI), _ramp(run, CHAR_RUN_LO, CHAR_RUN_HI))

        # Symbol density over the window (whitespace excluded, like the text rule).
        weight = torch.where(valid, tab.soup_weight[ids], 0.0).sum(1)  # (B,)
        chars = torch.where(valid, tab.visible[ids], 0.0).sum(1).clamp_min(1.0)
        soup = _ramp(weight / chars, SOUP_FRACTION_LO, SOUP_FRACTION_HI) * (weight / SOUP_MIN_WEIGHT).clamp(max=1.0)

        # Scripts of the lettered tokens in the window: how many, and how often they switch.
        script = torch.where(valid, tab.script[ids], -1)  # (B, W + 1)
        lettered = script >= 0
        present = torch.zeros(seq.shape[0], self._n_scripts, dtype=torch.bool, device=self.device)
        present.scatter_(1, script.clamp_min(0), lettered)  # (B, G)
        n_scripts = present.sum(1).float()
        cols = torch.arange(n, device=self.device).expand_as(script)
        last = torch.where(lettered, cols, -1).cummax(dim=1).values  # (B, W + 1) last lettered index so far
        prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)  # before this column
        prev_script = script.gather(1, prev.clamp_min(0))
        switches = (lettered & (prev >= 0) & (script != prev_script)).sum(1).float()
        mixing = torch.maximum(_ramp(n_scripts, SCRIPT_COUNT_LO, SCRIPT_COUNT_HI),
                               _ramp(switches, SCRIPT_SWITCH_LO, SCRIPT_SWITCH_HI))
        return {
            "char_run": torch.maximum(own[:, 0], run_score),
            "symbol_soup": torch.maximum(own[:, 1], soup),
            "script_mixing": torch.maximum(own[:, 2], mixing),
        }

    # ------------------------------------------------------------------ whole sequences
    def scan(self, tokens: torch.Tensor, logp: torch.Tensor, lengths: torch.Tensor | Sequence[int] | None = None,
             window: int = 16, ema_decay: float = 0.8) -> ScanResult:
        """Run :meth:`step` over generated sequences (B, L), as the featurizer would token by token.

        ``logp`` (B, L) are the base log-probabilities of the tokens; ``lengths`` (B,) the real
        lengths (default L). ``window`` / ``ema_decay`` match the featurizer's ``repeat_window`` /
        ``ema_decay``. Offline use (evaluation, tests); the env gets the same numbers per step.
        """
        tokens = torch.as_tensor(tokens, device=self.device).long()
        logp = torch.as_tensor(logp, device=self.device).float()
        if tokens.ndim != 2 or tokens.shape != logp.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and logp {tuple(logp.shape)} must both be (B, L)")
        b, n = tokens.shape
        lengths = torch.full((b,), n, device=self.device) if lengths is None else torch.as_tensor(
            lengths, device=self.device).long().view(-1)
        recent = torch.full((b, window), -1, dtype=torch.long, device=self.device)
        ema_prob = torch.zeros(b, device=self.device)
        ema_ind = torch.zeros(b, device=self.device)
        weight = 0.0
        out = {k: torch.zeros(b, n, device=self.device) for k in ("score", "indicator", "running", *STEP_REASONS)}
        for j in range(n):
            live = (j < lengths).float()  # (B,)
            weight = ema_decay * weight + (1 - ema_decay)
            ema_prob = ema_decay * ema_prob + (1 - ema_decay) * logp[:, j].exp()
            det = self.step(tokens[:, j], logp[:, j], recent, ema_prob / weight)
            ema_ind = ema_decay * ema_ind + (1 - ema_decay) * det.indicator
            out["score"][:, j] = det.score * live
            out["indicator"][:, j] = det.indicator * live
            out["running"][:, j] = ema_ind / weight * live
            for r in STEP_REASONS:
                out[r][:, j] = det.reasons[r] * live
            recent = torch.cat([recent[:, 1:], tokens[:, j:j + 1]], dim=1)
        return ScanResult(out["score"], out["indicator"], out["running"], {r: out[r] for r in STEP_REASONS})

    # ------------------------------------------------------------------ episode end
    @staticmethod
    def text_reasons(texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The text-level reasons of :func:`policies.anomaly.text_anomaly_reasons` per text: name -> (N,)."""
        return text_anomaly_reasons_batch(texts)

    @staticmethod
    def text_scores(texts: Sequence[str]) -> np.ndarray:
        """The text-level anomaly score (max of the reasons) per text: (N,) float32."""
        return text_anomaly_scores(texts)


def _discovery_vector(discovered, vocab_size: int) -> torch.Tensor:
    """(V,) weights from a (V,) vector, ``(id, weight)`` pairs, or discovery entries (weight = score)."""
    if isinstance(discovered, torch.Tensor) and discovered.ndim == 1 and discovered.dtype.is_floating_point:
        out = discovered.float().cpu()
        if out.shape[0] < vocab_size:
            out = torch.nn.functional.pad(out, (0, vocab_size - out.shape[0]))
        return out[:vocab_size]
    out = torch.zeros(vocab_size)
    for item in _pairs(discovered):
        token_id, weight = int(item[0]), float(item[1])
        if 0 <= token_id < vocab_size:
            out[token_id] = max(float(out[token_id]), weight)
    return out


def _pairs(discovered) -> Iterable[tuple[int, float]]:
    for item in discovered:
        if hasattr(item, "token_id") and hasattr(item, "score"):
            yield item.token_id, item.score
        elif isinstance(item, (tuple, list)) and len(item) >= 2 and not isinstance(item[1], str):
            yield item[0], item[1]
        elif isinstance(item, (tuple, list)) and len(item) >= 3:  # (id, piece, score, ...)
            yield item[0], item[2]
        else:
            raise ValueError(f"discovered entries must be (token_id, weight) pairs or discovery entries; got {item!r}")
