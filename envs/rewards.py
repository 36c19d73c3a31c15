"""Reward: named quality and diversity components, weighted by the config.

The reward of a step is ``sum_c weight_c * component_c``. Every component is reported in the
step ``info`` (per-token components every step, completion components at the episode's end)
and summed per episode for TensorBoard. Scales, so the weights mean something:

Per token (paid every step; an episode of L tokens sums L of them):

| name         | kind      | value                                                                         | range    |
|--------------|-----------|-------------------------------------------------------------------------------|----------|
| `logprob`    | quality   | clip(ln p_base(token), -logprob_clip, 0) / logprob_clip: base model at T = 1  | [-1, 0]  |
| `repetition` | quality   | -1 when the drawn token closes an n-gram (n = repetition_n) already in the completion | {-1, 0} |
| `anomaly`    | quality   | -(per-token anomaly indicator of the featurizer: token prior or surprise collapse) | [-1, 0] |
| `entropy`    | diversity | min(H(tempered distribution), entropy_cap) / entropy_cap, H in nats           | [0, 1]   |

Per completion (paid once, on the episode's last step):

| name           | kind      | value                                                                         | range    |
|----------------|-----------|-------------------------------------------------------------------------------|----------|
| `coherence`    | quality   | cosine(embedding(prompt), embedding(completion)), all-MiniLM-L6-v2           | [-1, 1]  |
| `text_anomaly` | quality   | -max of the text anomaly reasons (char runs, symbol soup, script mixing, loops) | [-1, 0] |
| `distinct`     | diversity | distinct-2 of the completion's tokens                                         | [0, 1]   |
| `novelty`      | diversity | 1 - max cosine to the last `novelty_memory` completions of the same prompt (0 when none yet) | [0, 2] |

The entropy credit is capped because a near-uniform distribution over 49k tokens (T -> +-inf,
or a negative T on a peaked distribution) has ~10 nats of entropy and is garbage: above
``entropy_cap`` nats (3 nats ~ 20 equally likely tokens) more spread earns nothing.
Completion components are weighted once per episode, so a weight of 8 on `coherence` is worth
as much as a per-token component of weight 8 / L held for the whole episode.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from pydantic import ConfigDict, Field, StrictFloat, StrictInt
from pydantic.dataclasses import dataclass as settings_dataclass

from envs.text_metrics import distinct_n
from anomaly.detector import AnomalyDetector

__all__ = ["RewardConfig", "RewardModel", "STEP_COMPONENTS", "EPISODE_COMPONENTS"]

STEP_COMPONENTS = ("logprob", "repetition", "anomaly", "entropy")
EPISODE_COMPONENTS = ("coherence", "text_anomaly", "distinct", "novelty")


@settings_dataclass(config=ConfigDict(extra="forbid"))
class RewardConfig:
    """The ``reward:`` block: one weight per component (0 switches it off) and their parameters.

    A pydantic dataclass: every weight and parameter is checked (finite numbers, positive scales) when
    it is built, so a NaN clip can no longer train a model full of NaN parameters.
    """

    logprob: StrictFloat = Field(1.0, allow_inf_nan=False)
    """Weight of the per-token base log-probability (quality)."""
    repetition: StrictFloat = Field(0.5, allow_inf_nan=False)
    """Weight of the per-token repeated n-gram penalty (quality)."""
    anomaly: StrictFloat = Field(1.0, allow_inf_nan=False)
    """Weight of the per-token anomaly penalty (quality)."""
    entropy: StrictFloat = Field(0.5, allow_inf_nan=False)
    """Weight of the per-token tempered entropy (diversity)."""
    coherence: StrictFloat = Field(4.0, allow_inf_nan=False)
    """Weight of the completion's coherence to the prompt (quality)."""
    text_anomaly: StrictFloat = Field(4.0, allow_inf_nan=False)
    """Weight of the completion's text anomaly penalty (quality)."""
    distinct: StrictFloat = Field(2.0, allow_inf_nan=False)
    """Weight of the completion's distinct-2 (diversity)."""
    novelty: StrictFloat = Field(2.0, allow_inf_nan=False)
    """Weight of the completion's semantic novelty against earlier samples of its prompt (diversity)."""
    logprob_clip: StrictFloat = Field(10.0, gt=0, allow_inf_nan=False)
    """ln p below -logprob_clip counts as -logprob_clip (one anomalous token cannot dominate)."""
    entropy_cap: StrictFloat = Field(3.0, gt=0, allow_inf_nan=False)
    """Tempered entropy above this many nats earns no more credit."""
    repetition_n: StrictInt = Field(3, ge=1)
    """n of the repeated n-gram penalty."""
    novelty_memory: StrictInt = Field(8, ge=1)
    """How many earlier completions of the same prompt novelty compares against."""

    @property
    def needs_embedder(self) -> bool:
        return self.coherence != 0 or self.novelty != 0

    def weights(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in STEP_COMPONENTS + EPISODE_COMPONENTS}


class RewardModel:
    """Computes the components of :mod:`envs.rewards` for a batch; holds the novelty memory."""

    def __init__(self, config: RewardConfig, embedder=None):
        self.config = config
        self._embedder = embedder
        self._prompt_embeddings: dict[str, torch.Tensor] = {}
        self._memory: dict[str, deque] = {}

    @property
    def embedder(self):
        if self._embedder is None:
            from envs.embedder import get_default_embedder

            self._embedder = get_default_embedder("cpu")
        return self._embedder

    def reset_memory(self) -> None:
        self._memory.clear()

    # ------------------------------------------------------------------ per token
    def step_components(self, token_logp: torch.Tensor, tempered_logits: torch.Tensor,
                        repeated: torch.Tensor, anomalous: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-token components, each (B,): see the module table."""
        c = self.config
        out = {
            "logprob": token_logp.clamp(-c.logprob_clip, 0.0) / c.logprob_clip,
            "repetition": -repeated.float(),
            "anomaly": -anomalous.float(),
        }
        if c.entropy != 0:
            logq = torch.log_softmax(tempered_logits, dim=-1)  # (B, V)
            q = logq.exp()
            h = -torch.where(q > 0, q * logq, torch.zeros_like(q)).sum(-1)  # (B,)
            out["entropy"] = h.clamp(0.0, c.entropy_cap) / c.entropy_cap
        else:
            out["entropy"] = torch.zeros_like(token_logp)
        return out

    def combine(self, components: dict[str, torch.Tensor | np.ndarray]) -> np.ndarray:
        """Weighted sum of whichever components are given (numpy, float32)."""
        total = None
        for name, value in components.items():
            v = np.asarray(value.detach().cpu() if torch.is_tensor(value) else value, dtype=np.float32)
            term = getattr(self.config, name) * v
            total = term if total is None else total + term
        return total

    # ------------------------------------------------------------------ per completion
    def episode_components(self, prompt_keys: list[str], prompt_texts: list[str], completions: list[str],
                           completion_tokens: list[list[int]]) -> dict[str, np.ndarray]:
        """Completion components, each (R,), for R finished episodes (updates the novelty memory)."""
        c = self.config
        r = len(completions)
        out = {
            "text_anomaly": -AnomalyDetector.text_scores(completions).astype(np.float32),  # the one detector's text rules
            "distinct": np.asarray([distinct_n(t, 2) for t in completion_tokens], dtype=np.float32),
            "coherence": np.zeros(r, dtype=np.float32),
            "novelty": np.zeros(r, dtype=np.float32),
        }
        if not c.needs_embedder or r == 0:
            return out
        emb = self.embedder.encode(completions)  # (R, D), unit norm
        missing = [k for k in dict.fromkeys(prompt_keys) if k not in self._prompt_embeddings]
        if missing:
            texts = {k: t for k, t in zip(prompt_keys, prompt_texts)}
            for k, e in zip(missing, self.embedder.encode([texts[k] for k in missing])):
                self._prompt_embeddings[k] = e
        prompts = torch.stack([self._prompt_embeddings[k] for k in prompt_keys])  # (R, D)
        out["coherence"] = (emb * prompts).sum(-1).clamp(-1, 1).numpy().astype(np.float32)
        for i, key in enumerate(prompt_keys):  # in order, so a later row sees an earlier one of this step
            memory = self._memory.setdefault(key, deque(maxlen=c.novelty_memory))
            if memory:
                sims = torch.stack(list(memory)) @ emb[i]  # (M,)
                out["novelty"][i] = float(1.0 - sims.max().clamp(-1, 1))
            memory.append(emb[i])
        return out
