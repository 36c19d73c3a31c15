r"""The anomaly detector: one cheap, batched per-token check, the same in the env and in engines.

Per token, :meth:`AnomalyDetector.indicator` looks at the token each row just drew and its
base-model (T = 1) log-probability and returns one value per row in [0, 1]:

``indicator = max(token_prior[token], 1[-ln p_base(token) > surprise_threshold])``

* ``token_prior`` (V,) is the vocabulary's anomaly prior (:func:`anomaly.prior.build_token_prior`:
  the string rules of :func:`anomaly.rules.token_flags`, raised by the tokens the negative-temperature
  probe of :mod:`anomaly.discovery` found, such as "emeteries" and "MetaInfo"); zeros when not given.
* the surprise test flags draws the base model gave less than exp(-``surprise_threshold``)
  (default e^-9.21 = 1e-4): the collapse of the base probability that negative temperatures cause.

The featurizer's ``anomaly`` feature (:mod:`policies.features`, feature 14) is the running mean of
this indicator, so the feature, the reward's per-token ``anomaly`` component and the samplers' guard
rails (:mod:`policies.guard`) all read the same numbers. At the end of an episode,
:meth:`AnomalyDetector.text_scores` runs the text-level rules (:func:`anomaly.rules.text_anomaly_reasons`)
on the decoded completions: the reward's ``text_anomaly`` component and the evaluation's metric.

Cost per step: one gather on a (V,) vector and a comparison on (B,), no Python loop over rows, no sync.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from anomaly.rules import text_anomaly_reasons_batch, text_anomaly_scores

__all__ = ["DEFAULT_SURPRISE_THRESHOLD", "AnomalyDetector"]

DEFAULT_SURPRISE_THRESHOLD = 9.21
"""ln 1e4: a draw the base model gave less than 1e-4 is anomalous (the FeatureSpec default)."""


class AnomalyDetector:
    """Batched per-token anomaly indicator (see the module doc), plus the text-level rules.

    Args:
        token_prior: (V,) per-token prior in [0, 1] (None: zeros, only the surprise test).
        surprise_threshold: a drawn token with ``-ln p_base`` above this is anomalous (ln 1e4).
        device: where the prior lives (inputs are moved there).
    """

    def __init__(self, token_prior: torch.Tensor | None = None, *,
                 surprise_threshold: float = DEFAULT_SURPRISE_THRESHOLD, device: torch.device | str = "cpu"):
        if isinstance(surprise_threshold, bool) or not isinstance(surprise_threshold, (int, float)) or not (
                math.isfinite(surprise_threshold) and surprise_threshold > 0):
            raise ValueError(f"AnomalyDetector surprise_threshold={surprise_threshold!r} must be a finite number > 0 "
                             "(nats; 9.21 = ln 1e4)")
        prior = None
        if token_prior is not None:
            prior = torch.as_tensor(token_prior, dtype=torch.float32).detach()
            if prior.ndim != 1:
                raise ValueError(f"AnomalyDetector token_prior must be a 1-D (V,) tensor; got shape {tuple(prior.shape)}")
            if bool(((prior < 0) | (prior > 1) | torch.isnan(prior)).any()):
                raise ValueError("AnomalyDetector token_prior must lie in [0, 1] (anomaly probabilities)")
        self.token_prior = prior
        self.surprise_threshold = float(surprise_threshold)
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device: torch.device | str) -> "AnomalyDetector":
        """Move the prior to ``device`` (in place); returns self."""
        self.device = torch.device(device)
        if self.token_prior is not None:
            self.token_prior = self.token_prior.to(self.device)
        return self

    @property
    def vocab_size(self) -> int | None:
        """V, or None for a detector without a prior."""
        return None if self.token_prior is None else int(self.token_prior.shape[0])

    # ------------------------------------------------------------------ per step
    def indicator(self, tokens: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
        """(B,) float32: ``max(token_prior[token], 1[-logp > surprise_threshold])`` for the tokens (B,) the rows
        drew and their base-model log-probabilities (B,)."""
        tokens = tokens.to(self.device).long().view(-1)  # (B,)
        logp = logp.to(self.device).float().view(-1)  # (B,)
        if tokens.shape != logp.shape:
            raise ValueError(f"tokens {tuple(tokens.shape)} and logp {tuple(logp.shape)} must both be (B,)")
        anomalous = (-logp > self.surprise_threshold).float()  # (B,)
        if self.token_prior is not None:
            anomalous = torch.maximum(anomalous, self.token_prior[tokens])
        return anomalous  # (B,)

    # ------------------------------------------------------------------ episode end
    @staticmethod
    def text_reasons(texts: Sequence[str]) -> dict[str, np.ndarray]:
        """The text-level reasons of :func:`anomaly.rules.text_anomaly_reasons` per text: name -> (N,)."""
        return text_anomaly_reasons_batch(texts)

    @staticmethod
    def text_scores(texts: Sequence[str]) -> np.ndarray:
        """The text-level anomaly score (max of the reasons) per text: (N,) float32."""
        return text_anomaly_scores(texts)
