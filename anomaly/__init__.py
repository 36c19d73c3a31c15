"""Anomalous tokens and text: the rules, the one detector, discovery over any loaded LM, the token prior.

* :mod:`anomaly.rules`: string rules for text (char runs, symbol soup, script mixing, loops, glued words)
  and for vocabulary pieces (:func:`~anomaly.rules.token_flags`).
* :mod:`anomaly.discovery`: the negative-temperature probe and embedding view that find a model's
  under-trained tokens ("emeteries", "MetaInfo"), cached on disk.
* :mod:`anomaly.prior`: :func:`~anomaly.prior.build_token_prior`, the (V,) prior the env and every export use.
* :mod:`anomaly.detector`: :class:`~anomaly.detector.AnomalyDetector`, the per-token indicator the featurizer's
  ``anomaly`` feature averages, and the text score the reward pays.

Needs torch, numpy and :mod:`samplers.core` only; the command line that loads a model is :mod:`kelvin.discovery`.
"""

from anomaly.detector import AnomalyDetector
from anomaly.prior import build_token_prior

__all__ = ["AnomalyDetector", "build_token_prior"]
