"""Reward: quality of each completion plus λ times the diversity across the samples of its prompt.

The env draws ``group_size`` samples of every prompt together (a **group**), all under the same
diversity dial ``λ`` (drawn per group in training, the user's setting at inference). The reward of
a step is

    r = sum_q  w_q * quality_q  +  λ * sum_d  w_d * diversity_d

over the named components below, each reported unweighted in the step ``info`` and in TensorBoard.

Why this shape. With per-token log-probability as quality and per-token tempered entropy as
diversity, a constant temperature is optimal: for one next-token distribution p, the q maximising
E_q[ln p] + λ·H(q) solves ln p − λ(ln q + 1) + μ = 0, i.e. q ∝ p^(1/λ), plain temperature λ. Such a
reward leaves a learned schedule nothing to learn. Here diversity is measured **across the samples
of one prompt** (they must differ in meaning and wording, which a few early tokens decide), and
quality on the **completion as a whole** (coherent, no degeneration, and correct where the prompt
has an answer, which a few decisive tokens decide). Heat spent at the first tokens buys far more
diversity than heat spent later; heat on an answer token costs correctness. A constant cannot be
optimal for that, a schedule that reads the state can.

Per token (paid every step; an episode of L tokens sums L of them):

| name         | kind      | value                                                                          | range   |
|--------------|-----------|--------------------------------------------------------------------------------|---------|
| `logprob`    | quality   | clip(ln p_base(token), -logprob_clip, 0) / logprob_clip: base model at T = 1   | [-1, 0] |
| `repetition` | quality   | -1 when the drawn token closes an n-gram (n = repetition_n) already in the completion | {-1, 0} |
| `anomaly`    | quality   | -(per-token anomaly indicator of the featurizer: token prior or surprise collapse) | [-1, 0] |
| `entropy`    | diversity | min(H(tempered distribution), entropy_cap) / entropy_cap (off by default: see above) | [0, 1] |

Per completion (paid once, on the last step of its group):

| name             | kind      | value                                                                        | range   |
|------------------|-----------|------------------------------------------------------------------------------|---------|
| `coherence`      | quality   | cosine(embedding(prompt), embedding(completion)), all-MiniLM-L6-v2          | [-1, 1] |
| `text_anomaly`   | quality   | -max of the text anomaly reasons (char runs, symbol soup, script mixing, loops) | [-1, 0] |
| `correct`        | quality   | answerable prompts: 1 when an accepted answer appears (:mod:`envs.answers`), else 0; open prompts: 0 | {0, 1} |
| `group_semantic` | diversity | mean cosine distance (1 - cos, MiniLM) to the other samples of the group    | [0, 2]  |
| `group_ngram`    | diversity | share of the completion's distinct bigrams that no other sample of the group has | [0, 1] |

The mean of ``group_semantic`` over a group is the evaluation's ``semantic_distance`` across the K
samples. Completion components are weighted once per episode, so a weight of 4 on ``coherence`` is
worth as much as a per-token component of weight 4 / L held for the whole episode.
"""

from __future__ import annotations

import math
import warnings
from typing import Literal, Sequence, Union

import numpy as np
import torch
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from pydantic.dataclasses import dataclass as settings_dataclass

from anomaly.detector import AnomalyDetector
from envs.answers import is_correct
from envs.text_metrics import distance_to_others, novel_ngram_fraction

__all__ = ["RewardConfig", "RewardFunction", "STEP_COMPONENTS", "EPISODE_COMPONENTS", "DIVERSITY_COMPONENTS",
           "COMPONENTS", "GROUP_DIVERSITY_COMPONENTS", "CREDIT_TERMS", "closes_repeated_ngram",
           "leave_one_out_baseline", "group_ngram_terms"]

STEP_COMPONENTS = ("logprob", "repetition", "anomaly", "entropy")
EPISODE_COMPONENTS = ("coherence", "text_anomaly", "correct", "group_semantic", "group_ngram")
COMPONENTS = STEP_COMPONENTS + EPISODE_COMPONENTS
DIVERSITY_COMPONENTS = ("entropy", "group_semantic", "group_ngram")
"""Components scaled by the group's diversity dial λ (the rest are quality, unscaled)."""
GROUP_DIVERSITY_COMPONENTS = ("group_semantic", "group_ngram")
"""Diversity components measured across a group's samples (``reward.group_diversity_credit`` scales them in training)."""
CREDIT_TERMS = ("group_ngram_effect",)
"""Per-completion terms of the training signal only (no reward weight; summed per episode like the components):
``group_ngram_effect`` is what a completion's tokens did to the other samples' ``group_ngram``
(the second array of :func:`group_ngram_terms`), read by ``reward.group_diversity_credit: exact``."""


def twin_of(rows: np.ndarray, group_size: int) -> np.ndarray:
    """The twin of each row (``train.twin_groups``): rows lie in groups of ``group_size``, groups in pairs
    (2t, 2t + 1), and a row's twin is the row at its place in the pair's other group."""
    rows = np.asarray(rows, dtype=np.int64)
    return rows + np.where((rows // group_size) % 2 == 0, group_size, -group_size)


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
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
    entropy: StrictFloat = Field(0.0, allow_inf_nan=False)
    """Weight of the per-token tempered entropy (diversity, times λ). Off by default: with the per-token
    log-prob it makes a constant temperature optimal (module doc)."""
    coherence: StrictFloat = Field(2.0, allow_inf_nan=False)
    """Weight of the completion's coherence to the prompt (quality)."""
    text_anomaly: StrictFloat = Field(4.0, allow_inf_nan=False)
    """Weight of the completion's text anomaly penalty (quality)."""
    correct: StrictFloat = Field(6.0, allow_inf_nan=False)
    """Weight of a correct answer on answerable prompts (quality)."""
    group_semantic: StrictFloat = Field(6.0, allow_inf_nan=False)
    """Weight of the completion's semantic distance to the other samples of its group (diversity, times λ)."""
    group_ngram: StrictFloat = Field(2.0, allow_inf_nan=False)
    """Weight of the completion's share of bigrams no other sample of its group has (diversity, times λ)."""
    logprob_clip: StrictFloat = Field(10.0, gt=0, allow_inf_nan=False)
    """ln p below -logprob_clip counts as -logprob_clip (one anomalous token cannot dominate)."""
    entropy_cap: StrictFloat = Field(3.0, gt=0, allow_inf_nan=False)
    """Tempered entropy above this many nats earns no more credit."""
    repetition_n: StrictInt = Field(3, ge=1)
    """n of the repeated n-gram penalty."""
    group_baseline: StrictBool = True
    """Training signal: at the end of a group, each sample also receives minus the mean quality return
    (every quality component, weighted and summed over the episode) of the other samples of its group.
    The group is its own baseline: a prompt's difficulty (an easy fact, a hard sum) leaves the advantage,
    the expected policy gradient does not change (the other samples' quality does not depend on this
    sample's actions), and its variance drops. Diversity is not baselined (each sample's diversity
    depends on the others' tokens). Validation and evaluation report absolute returns (off there)."""
    group_diversity_credit: Union[Literal["exact"], StrictFloat] = "exact"
    """Training signal (with ``group_baseline`` or twins): at the end of a group, each sample's group diversity
    return (``group_semantic``, ``group_ngram``, times λ) counts this many times. A sample's diversity is its
    distance to the others, but its tokens also move the others' distance to it, which their rewards carry, not
    its own: for a symmetric pairwise measure (``group_semantic``) the sample's whole effect on its group's total
    diversity is exactly twice its own term. 1 (the plain return) under-credits diversity, which pulls PPO
    cooler than the optimum of the absolute return; 2 (the default until Dec 6) credits ``group_semantic`` with
    all of it, but ``group_ngram`` is not symmetric: a completion's tokens change the others' share of unshared
    bigrams by less than its own (0.38 of it, measured on one run's base at λ = 1), so 2 over-credits it and pulls
    PPO hotter than that optimum. ``exact`` (the default): its own terms plus what its tokens did to the others'
    (``group_semantic`` its own term again, ``group_ngram`` the effect of :func:`group_ngram_terms`): the gradient of the
    group's total (scripts/diversity_credit.py measures both on real rollouts)."""

    def __post_init__(self):
        credit = self.group_diversity_credit
        if credit != "exact" and not (math.isfinite(credit) and credit >= 0):
            raise ValueError(f"reward.group_diversity_credit={credit!r}: give a number >= 0 (2 credits a sample's "
                             "group diversity twice) or 'exact'")

    @property
    def needs_embedder(self) -> bool:
        return self.coherence != 0 or self.group_semantic != 0

    def weights(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in COMPONENTS}


def closes_repeated_ngram(tokens: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) bool: the token at ``pos`` (B,) of each row of ``tokens`` (B, W) closes an n-gram seen earlier in the row."""
    batch, width = tokens.shape
    if width < n + 1:
        return torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    grams = tokens.unfold(1, n, 1)  # (B, W - n + 1, n): gram j covers tokens j..j+n-1
    start = (pos - n + 1).clamp_min(0)  # (B,)
    current = grams.gather(1, start.view(-1, 1, 1).expand(-1, 1, n))  # (B, 1, n)
    same = (grams == current).all(-1)  # (B, W - n + 1)
    earlier = torch.arange(grams.shape[1], device=tokens.device).view(1, -1) < start.view(-1, 1)
    return (same & earlier).any(-1) & (pos >= n - 1)


def leave_one_out_baseline(groups: Sequence[Sequence[int]], quality: np.ndarray) -> np.ndarray:
    """Minus the mean ``quality`` (R,) of the other members of each sample's group (0 alone): (R,)."""
    out = np.zeros(len(quality), dtype=np.float64)
    for members in groups:
        idx = np.asarray(members, dtype=np.int64)
        if idx.size > 1:
            q = quality[idx]
            out[idx] = -(q.sum() - q) / (idx.size - 1)
    return out


def group_ngram_terms(group: Sequence[Sequence[int]], n: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Each sample's ``group_ngram`` (its share of n-grams no other sample has) and what its tokens did to the
    other samples' ``group_ngram``, (K,) float32 each. The effect of sample i is ``sum over j != i of
    novel(j | the others) - novel(j | the others but i)``: never positive (a sample can only share bigrams another
    would otherwise have alone), and the subtracted term does not depend on sample i, so as i's training credit
    it adds no bias. The first array is the effect's ``novel(j | the others)``, so both come from one pass. E.g.
    a = (1 2 3) and b = (2 3 4) share (2 3), which c = (5 6) lacks: each costs the other one of its 2 bigrams,
    so the effects are -1/2, -1/2 and 0."""
    k = len(group)
    with_all = [novel_ngram_fraction(group[j], [group[m] for m in range(k) if m != j], n) for j in range(k)]
    effect = np.zeros(k, dtype=np.float32)
    for i in range(k):
        for j in range(k):
            if j != i:
                without_i = [group[m] for m in range(k) if m not in (i, j)]
                effect[i] += with_all[j] - novel_ngram_fraction(group[j], without_i, n)
    return np.asarray(with_all, dtype=np.float32), effect


class RewardFunction:
    """Computes the components of :mod:`envs.rewards` for a batch and combines them with λ.

    A fixed scoring function of the generated tokens and texts (nothing in it is learned)."""

    def __init__(self, config: RewardConfig, embedder=None):
        self.config = config
        self._embedder = embedder
        self._prompt_embeddings: dict[str, torch.Tensor] = {}
        w = config.weights()
        self._quality = {k: v for k, v in w.items() if k not in DIVERSITY_COMPONENTS and v != 0}
        self._diversity = {k: v for k, v in w.items() if k in DIVERSITY_COMPONENTS and v != 0}

    @property
    def embedder(self):
        if self._embedder is None:
            from envs.embedder import get_default_embedder

            self._embedder = get_default_embedder("cpu")
        return self._embedder

    # ------------------------------------------------------------------ per token
    def step_components(self, token_logp: torch.Tensor, repeated: torch.Tensor, anomalous: torch.Tensor,
                        tempered_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-token components, each (B,): see the module table. ``tempered_logits`` (B, V), the logits the
        draw used, are needed only when the ``entropy`` component is on."""
        c = self.config
        out = {
            "logprob": token_logp.clamp(-c.logprob_clip, 0.0) / c.logprob_clip,
            "repetition": -repeated.float(),
            "anomaly": -anomalous.float(),
        }
        if c.entropy != 0:
            if tempered_logits is None:
                raise ValueError("reward.entropy is on: step_components needs the tempered logits")
            logq = torch.log_softmax(tempered_logits, dim=-1)  # (B, V)
            h = -torch.where(logq > -math.inf, logq.exp() * logq, torch.zeros_like(logq)).sum(-1)  # (B,)
            out["entropy"] = h.clamp(0.0, c.entropy_cap) / c.entropy_cap
        else:
            out["entropy"] = torch.zeros_like(token_logp)
        return out

    def combine(self, components: dict[str, np.ndarray], diversity: np.ndarray) -> np.ndarray:
        """``sum_q w_q c_q + λ sum_d w_d c_d`` over the given components; ``diversity`` is λ per row (B,)."""
        quality = None
        spread = None
        for name, value in components.items():
            v = np.asarray(value, dtype=np.float32)
            if name in self._quality:
                term = self._quality[name] * v
                quality = term if quality is None else quality + term
            elif name in self._diversity:
                term = self._diversity[name] * v
                spread = term if spread is None else spread + term
        b = np.asarray(diversity, dtype=np.float32).shape
        total = np.zeros(b, dtype=np.float32) if quality is None else quality
        if spread is not None:
            total = total + np.asarray(diversity, dtype=np.float32) * spread
        return total.astype(np.float32)

    def quality_return(self, episode_sums: dict[str, np.ndarray]) -> np.ndarray:
        """``sum_q w_q c_q`` of episode totals (each component summed over the episode): (R,)."""
        total = None
        for name, weight in self._quality.items():
            term = weight * np.asarray(episode_sums[name], dtype=np.float64)
            total = term if total is None else total + term
        return np.zeros(len(next(iter(episode_sums.values())))) if total is None else total

    def group_baseline(self, groups: Sequence[Sequence[int]], episode_sums: dict[str, np.ndarray],
                       diversity: np.ndarray | None = None) -> np.ndarray:
        """The ``group_baseline`` term of R finished episodes (their component totals, (R,) each): minus the mean
        quality return of the other members of each one's group (``groups`` partitions ``range(R)``), plus
        ``group_diversity_credit - 1`` times each one's group diversity return at its λ (``diversity``, (R,)): (R,)."""
        out = leave_one_out_baseline(groups, self.quality_return(episode_sums))
        return out if diversity is None else out + self._extra_diversity_credit(episode_sums, diversity)

    def _extra_diversity_credit(self, episode_sums: dict[str, np.ndarray], diversity: np.ndarray) -> np.ndarray:
        """``group_diversity_credit - 1`` times each episode's group diversity return at its λ, or with ``exact``
        what its tokens did to the others' group diversity at its λ: (R,)."""
        weight = self._diversity.get
        if self.config.group_diversity_credit == "exact":
            others = (weight("group_semantic", 0.0) * np.asarray(episode_sums["group_semantic"], dtype=np.float64)
                      + weight("group_ngram", 0.0) * np.asarray(episode_sums["group_ngram_effect"], dtype=np.float64))
            return np.asarray(diversity, dtype=np.float64) * others
        spread = sum(weight(k, 0.0) * np.asarray(episode_sums[k], dtype=np.float64) for k in GROUP_DIVERSITY_COMPONENTS)
        return (self.config.group_diversity_credit - 1.0) * np.asarray(diversity, dtype=np.float64) * spread

    def twin_baseline(self, twin: np.ndarray, episode_sums: dict[str, np.ndarray], diversity: np.ndarray) -> np.ndarray:
        """The end-of-episode term of twin groups (``train.twin_groups``) for R finished episodes: each one's extra
        diversity credit (as :meth:`group_baseline`) minus its twin's whole training return (its return plus that
        credit); ``twin`` (R,) is each one's twin among them. A row's training return is then its own minus its
        twin's, so a pair's two sum to 0: the antithetic difference, in place of the group's leave-one-out
        (the twin's return depends on this row's policy only through the mirrored noise, the point of the pair)."""
        lam = np.asarray(diversity, dtype=np.float64)
        spread = sum(self._diversity.get(k, 0.0) * np.asarray(episode_sums[k], dtype=np.float64)
                     for k in DIVERSITY_COMPONENTS)
        extra = self._extra_diversity_credit(episode_sums, lam)
        training = self.quality_return(episode_sums) + lam * spread + extra
        return extra - training[np.asarray(twin, dtype=np.int64)]

    # ------------------------------------------------------------------ per completion
    def episode_components(self, groups: Sequence[Sequence[int]], prompt_keys: Sequence[str],
                           prompt_texts: Sequence[str], answers: Sequence[Sequence[str] | None],
                           completions: Sequence[str], completion_tokens: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """Completion components, each (R,), for R finished completions.

        ``groups`` partitions ``range(R)`` into the samples of one prompt drawn together (the diversity
        components compare each sample with the others of its group); the other arguments hold one
        entry per completion: prompt id and text, accepted answers (None for an open prompt),
        completion text and token ids.
        """
        c = self.config
        r = len(completions)
        out = {
            "text_anomaly": -AnomalyDetector.text_scores(completions).astype(np.float32),  # the one detector's text rules
            "correct": np.asarray([float(a is not None and is_correct(t, a)) for t, a in zip(completions, answers)],
                                  dtype=np.float32),
            "coherence": np.zeros(r, dtype=np.float32),
            "group_semantic": np.zeros(r, dtype=np.float32),
            "group_ngram": np.zeros(r, dtype=np.float32),
            "group_ngram_effect": np.zeros(r, dtype=np.float32),
        }
        for members in groups:
            members = list(members)
            tokens = [completion_tokens[i] for i in members]
            out["group_ngram"][members], out["group_ngram_effect"][members] = group_ngram_terms(tokens)
        if not c.needs_embedder or r == 0:
            return out
        emb = self.embedder.encode(list(completions))  # (R, D), unit norm
        missing = [k for k in dict.fromkeys(prompt_keys) if k not in self._prompt_embeddings]
        if missing:
            texts = {k: t for k, t in zip(prompt_keys, prompt_texts)}
            for k, e in zip(missing, self.embedder.encode([texts[k] for k in missing])):
                self._prompt_embeddings[k] = e
        prompts = torch.stack([self._prompt_embeddings[k] for k in prompt_keys])  # (R, D)
        out["coherence"] = (emb * prompts).sum(-1).clamp(-1, 1).numpy().astype(np.float32)
        for members in groups:
            idx = list(members)
            out["group_semantic"][idx] = distance_to_others(emb[idx]).numpy()
        return out


def __getattr__(name: str):
    """``RewardModel``: the old name of :class:`RewardFunction` (it is a fixed function, not a learned model)."""
    if name == "RewardModel":
        warnings.warn("envs.rewards.RewardModel is now envs.rewards.RewardFunction: import RewardFunction",
                      DeprecationWarning, stacklevel=2)
        return RewardFunction
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
