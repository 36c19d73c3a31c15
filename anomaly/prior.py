"""The per-token anomaly prior of a model: vocabulary flags raised by the model's discovered tokens.

:func:`build_token_prior` is the one place the prior is assembled. The training env
(:class:`envs.generation.GenerationCore`) builds its featurizer's detector from it, and an export
(:mod:`kelvin.export`) writes the same vector into ``token_prior.pt``, so the anomaly feature means
the same thing in training and in every sampler.
"""

from __future__ import annotations

from typing import Sequence

import torch

from anomaly.discovery import AnomalousToken, discovered_token_weights
from anomaly.rules import combine_token_flags, token_flags

__all__ = ["build_token_prior"]


def build_token_prior(lm, discovered: bool | torch.Tensor | Sequence[AnomalousToken] = True) -> torch.Tensor:
    """(V,) float32 on the CPU, ``V = lm.vocab_size`` (the logits width): the anomaly prior of every token.

    ``max(token_flags(lm.tokenizer)[i], w_i)``: the string rules of :func:`anomaly.rules.token_flags`,
    raised to the discovery weight ``w_i`` of the model's anomalous tokens. ``discovered``:

    * ``True``: :func:`anomaly.discovery.discovered_token_weights` (disk-cached; probed once per model
      when missing). An LM without weights (``lm.model`` missing, e.g. a test stub) gets the flags only.
    * ``False``: the flags only.
    * a (V,) weight vector, or the entries :func:`anomaly.discovery.discover_anomalous_tokens` returned
      (weight = their score).

    Rows past the tokenizer (padded logits) get 0; a tokenizer larger than the logits is cut.
    """
    prior = token_flags(lm.tokenizer)  # (V_tok,)
    weights = None
    if discovered is True:
        if getattr(lm, "model", None) is not None:
            weights = discovered_token_weights(lm)  # (V,)
    elif isinstance(discovered, torch.Tensor):
        weights = discovered.detach().float().cpu().reshape(-1)
    elif discovered is not False:
        weights = torch.zeros(int(lm.vocab_size))
        for t in discovered:
            weights[int(t.token_id)] = max(float(weights[int(t.token_id)]), float(t.score))
    if weights is not None:
        weights = weights[: prior.shape[0]]
        ids = torch.nonzero(weights).flatten()
        prior = combine_token_flags(prior, ids, weights[ids])
    vocab = int(lm.vocab_size)
    if prior.shape[0] < vocab:  # logits may have padded vocabulary rows
        prior = torch.nn.functional.pad(prior, (0, vocab - prior.shape[0]))
    return prior[:vocab].contiguous()  # (V,)
