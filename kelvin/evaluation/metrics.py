"""The metric table and the per-prompt values every interval is computed from.

Every metric is first reduced to **one value per prompt**: the mean over the prompt's ``K``
samples, or a set statistic over them (Self-BLEU, distinct-n across samples, semantic distance).
:func:`group_by_prompt` pairs a run's episodes by prompt slot; :func:`prompt_metrics` computes the
(P,) value of every metric of :data:`METRICS` that has an interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.rewards import EPISODE_COMPONENTS, STEP_COMPONENTS
from envs.text_metrics import (
    distinct_n,
    distinct_n_corpus,
    mean_pairwise_distance_batched,
    repeated_ngram_rate,
    self_bleu,
)

__all__ = ["HEADLINE", "METRICS", "METRIC_BY_NAME", "NEAR_GREEDY", "Metric", "group_by_prompt", "mean_over_streams",
           "prompt_metrics"]

NEAR_GREEDY = 0.05
"""|T| below this counts as near-greedy."""


@dataclass(frozen=True)
class Metric:
    """One reported metric: how it is named, grouped, read and which direction is good."""

    name: str
    group: str  # reward | quality | diversity | temperature | speed
    unit: str
    direction: int  # +1 higher is better, -1 lower is better, 0 neither (descriptive)
    doc: str
    ci: bool = True  # False: one value per run, no interval over prompts


_COMPONENT_DOCS = {
    "logprob": "sum over tokens of clip(ln p_base, -clip, 0) / clip",
    "repetition": "-(number of tokens closing a repeated n-gram)",
    "anomaly": "-(number of anomalous tokens)",
    "entropy": "sum over tokens of min(H(tempered), cap) / cap",
    "coherence": "cosine(prompt, completion), MiniLM",
    "text_anomaly": "-(text anomaly score of the completion)",
    "correct": "1 when an accepted answer appears (answerable prompts), else 0",
    "group_semantic": "mean cosine distance to the other samples of the group",
    "group_ngram": "share of the completion's bigrams no other sample of the group has",
}

METRICS: list[Metric] = [
    Metric("reward", "reward", "return", +1, "composite reward: the episode return the policy was trained on"),
    *[Metric(f"reward/{c}", "reward", "per episode", +1, f"reward component as the env pays it ({_COMPONENT_DOCS[c]})")
      for c in STEP_COMPONENTS + EPISODE_COMPONENTS],
    Metric("logprob", "quality", "nats/token", +1,
           "exact mean base-model log-probability (T = 1, no clip) of the drawn tokens, EOS included"),
    Metric("perplexity", "quality", "", -1,
           "exp(-logprob): base-model perplexity of the completions; interval = exp(-interval of logprob)"),
    Metric("accuracy", "quality", "fraction", +1,
           "share of the K samples that give an accepted answer (answerable prompts only: envs/answers.py)"),
    Metric("pass_at_k", "quality", "fraction", +1,
           "pass@K: 1 when any of the K samples gives an accepted answer, else 0 (answerable prompts only; "
           "pass@1 is accuracy)"),
    Metric("coherence", "quality", "cosine", +1, "cosine(prompt, completion) with all-MiniLM-L6-v2"),
    Metric("repetition_rate", "quality", "fraction", -1,
           "share of the completion's token n-grams (n = reward.repetition_n) already seen earlier in it"),
    Metric("anomaly_rate", "quality", "fraction", -1,
           "share of tokens the featurizer flags anomalous (token prior or base probability < e^-9.21)"),
    Metric("text_anomaly", "quality", "score", -1, "text anomaly score of the completion (anomaly/rules.py), 0 = clean"),
    Metric("length", "quality", "tokens", 0, "tokens drawn per completion (EOS included)"),
    Metric("eos_rate", "quality", "fraction", 0, "share of completions that ended with EOS before max_new_tokens"),
    Metric("distinct1", "diversity", "fraction", +1, "distinct-1 of each completion's tokens"),
    Metric("distinct2", "diversity", "fraction", +1, "distinct-2 of each completion's tokens"),
    Metric("distinct1_across", "diversity", "fraction", +1, "distinct-1 over the K samples of a prompt together"),
    Metric("distinct2_across", "diversity", "fraction", +1, "distinct-2 over the K samples of a prompt together"),
    Metric("self_bleu", "diversity", "BLEU", -1, "Self-BLEU (4-gram, token ids) across the K samples; 1 = identical"),
    Metric("semantic_distance", "diversity", "1 - cos", +1,
           "mean pairwise cosine distance of the K samples' MiniLM embeddings"),
    Metric("temperature_mean", "temperature", "T", 0, "mean temperature over the tokens of the K samples"),
    Metric("temperature_std", "temperature", "T", 0, "spread: std of the temperature over those tokens"),
    Metric("negative_fraction", "temperature", "fraction", 0, "share of tokens drawn at T < 0"),
    Metric("near_greedy_fraction", "temperature", "fraction", 0, "share of tokens drawn at |T| < 0.05"),
    Metric("tokens_per_s", "speed", "tokens/s", +1,
           "generated tokens per second of wall time (model, featurizer, policy, reward); one timing per run",
           ci=False),
]
METRIC_BY_NAME = {m.name: m for m in METRICS}

HEADLINE = ["reward", "accuracy", "pass_at_k", "logprob", "perplexity", "coherence", "distinct2_across", "self_bleu", "semantic_distance",
            "repetition_rate", "anomaly_rate", "temperature_mean", "tokens_per_s"]
"""Metrics in the report's first table and in the paired-difference table."""


def group_by_prompt(episodes: list[dict], n_prompts: int, group_size: int, n_groups: int) -> list[list[dict]]:
    """Episodes of the prompt slots ``0 .. n_prompts - 1`` as (P, K) lists (slot = group + k * n_groups)."""
    groups: list[list[dict | None]] = [[None] * group_size for _ in range(n_prompts)]
    for e in episodes:
        g, j = divmod(e["row"], group_size)
        slot = g + e["k"] * n_groups
        if slot < n_prompts:
            groups[slot][j] = e
    for slot, eps in enumerate(groups):
        if any(e is None for e in eps):
            raise RuntimeError(f"prompt slot {slot} has {sum(e is not None for e in eps)} of {group_size} samples")
        if len({e["prompt_id"] for e in eps}) != 1:
            raise RuntimeError(f"the samples of prompt slot {slot} do not share a prompt")
    return groups  # type: ignore[return-value]


def _sample_metrics(eps: list[dict], repetition_n: int) -> dict[str, float]:
    """The metrics of one prompt's K samples that need no embedder."""
    ids = [list(e["token_ids"]) for e in eps]
    lengths = np.array([e["episode"]["l"] for e in eps], dtype=np.float64)
    comps = {c: np.array([e["reward_components"][c] for e in eps]) for c in STEP_COMPONENTS + EPISODE_COMPONENTS}
    temps = np.concatenate([np.asarray(e["temperatures"], dtype=np.float64) for e in eps])
    return {
        "reward": np.mean([e["episode"]["r"] for e in eps]),
        **{f"reward/{c}": v.mean() for c, v in comps.items()},
        "logprob": np.mean([np.mean(e["logprobs"]) for e in eps]),
        "accuracy": comps["correct"].mean() if eps[0]["answerable"] else np.nan,
        "pass_at_k": float(comps["correct"].max() > 0.5) if eps[0]["answerable"] else np.nan,
        "coherence": comps["coherence"].mean(),
        "repetition_rate": np.mean([repeated_ngram_rate(t, repetition_n) for t in ids]),
        "anomaly_rate": np.mean(-comps["anomaly"] / np.maximum(lengths, 1)),
        "text_anomaly": np.mean(-comps["text_anomaly"]),
        "length": lengths.mean(),
        "eos_rate": np.mean([not e["TimeLimit.truncated"] for e in eps]),
        "distinct1": np.mean([distinct_n(t, 1) for t in ids]),
        "distinct2": np.mean([distinct_n(t, 2) for t in ids]),
        "distinct1_across": distinct_n_corpus(ids, 1),
        "distinct2_across": distinct_n_corpus(ids, 2),
        "self_bleu": self_bleu(ids, max_n=4),
        "temperature_mean": temps.mean(),
        "temperature_std": temps.std(),
        "negative_fraction": (temps < 0).mean(),
        "near_greedy_fraction": (np.abs(temps) < NEAR_GREEDY).mean(),
    }


def prompt_metrics(groups: list[list[dict]], embedder, repetition_n: int) -> dict[str, np.ndarray]:
    """Every metric of :data:`METRICS` (except the run-level ones) as one value per prompt: (P,) each."""
    n = len(groups)
    per = {m.name: np.zeros(n) for m in METRICS if m.ci}
    if n:
        texts = [e["completion"] for eps in groups for e in eps]
        emb = embedder.encode(texts).reshape(n, len(groups[0]), -1)  # (P, K, D)
        per["semantic_distance"] = mean_pairwise_distance_batched(emb).cpu().numpy().astype(np.float64)
    for i, eps in enumerate(groups):
        for name, value in _sample_metrics(eps, repetition_n).items():
            per[name][i] = value
    return _with_perplexity(per)


def _with_perplexity(per: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``per`` with each prompt's perplexity, exp(-logprob) (for reference; its interval is derived from logprob)."""
    per["perplexity"] = np.exp(-per["logprob"])
    return per


def mean_over_streams(per_stream: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Each metric's per-prompt mean over independent streams (:func:`prompt_metrics` of each stream's groups of
    K); perplexity is recomputed from the mean log-prob, as within a stream."""
    return _with_perplexity({name: np.mean([p[name] for p in per_stream], axis=0) for name in per_stream[0]})
