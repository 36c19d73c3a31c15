"""Text metrics shared by rewards and evaluation: lexical diversity, repetition, Self-BLEU,
semantic spread, and bootstrap confidence intervals.

Every function is pure and deterministic (the bootstrap takes an explicit seed) and never
modifies its inputs.

Sequences. ``distinct_n``, ``distinct_n_corpus`` and ``repeated_ngram_rate`` take one
sequence of tokens: a list (or 1-D tensor/array) of token ids or of word strings. A plain
``str`` is split on whitespace. n-grams never cross the boundary between two sequences.

| function | value | range | empty / degenerate input |
| --- | --- | --- | --- |
| `distinct_n(seq, n)` | #distinct n-grams / #n-grams | (0, 1] | no n-gram (len < n): 0.0 |
| `distinct_n_corpus(seqs, n)` | #distinct n-grams over all seqs / #n-grams over all seqs | (0, 1] | no n-gram at all: 0.0 |
| `repeated_ngram_rate(seq, n=3)` | share of n-grams already seen earlier in the seq | [0, 1) | no n-gram: 0.0 |
| `self_bleu(texts, max_n=4)` | mean BLEU of each sample against the others | [0, 1] | fewer than 2 samples: 0.0 |
| `mean_pairwise_distance(emb)` | mean (1 - cosine) over pairs i < j | [0, 2] | K < 2: 0.0 |
| `bootstrap_ci(values)` | (mean, low, high), percentile bootstrap of the mean | | empty: ValueError |
| `paired_bootstrap_ci(a, b)` | the same for the mean of a - b | | lengths differ: ValueError |
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Hashable, Iterable, Sequence

import numpy as np
import torch

__all__ = [
    "bootstrap_ci",
    "distinct_n",
    "distinct_n_corpus",
    "distance_to_others",
    "mean_pairwise_distance",
    "mean_pairwise_distance_batched",
    "ngrams",
    "novel_ngram_fraction",
    "paired_bootstrap_ci",
    "repeated_ngram_rate",
    "self_bleu",
    "sentence_bleu",
]


# --------------------------------------------------------------------------- n-grams


def _as_tokens(seq) -> list[Hashable]:
    """A token sequence as a list: str -> whitespace words; tensor/array -> Python ints."""
    if isinstance(seq, str):
        return seq.split()
    if isinstance(seq, (torch.Tensor, np.ndarray)):
        if seq.ndim != 1:
            raise ValueError(f"expected a 1-D token sequence, got shape {tuple(seq.shape)}.")
        return seq.tolist()
    return list(seq)


def _check_n(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}.")


def ngrams(seq, n: int) -> list[tuple]:
    """All contiguous n-grams of one sequence, in order (``len(seq) - n + 1`` of them, or none)."""
    _check_n(n)
    toks = _as_tokens(seq)
    return [tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)]


def distinct_n(tokens_or_texts, n: int) -> float:
    """Distinct-n of one sequence: number of distinct n-grams / total number of n-grams.

    ``tokens_or_texts`` is one sequence: token ids, word strings, or a str (whitespace words).

    1.0 when no n-gram repeats; 1/total for a single n-gram repeated throughout.
    A sequence with no n-gram (shorter than ``n``) gives 0.0 by definition (nothing diverse
    was produced), so an empty generation is never rewarded as maximally diverse.
    """
    grams = ngrams(tokens_or_texts, n)
    if not grams:
        return 0.0
    return len(set(grams)) / len(grams)


def distinct_n_corpus(seqs: Iterable, n: int) -> float:
    """Corpus distinct-n: distinct n-grams over the union of ``seqs`` / all their n-grams.

    n-grams are taken inside each sequence (never across two). Repeating a sequence lowers
    the score, which is what makes it a diversity measure across samples. 0.0 when no
    sequence has an n-gram.
    """
    _check_n(n)
    seen: set[tuple] = set()
    total = 0
    for seq in seqs:
        grams = ngrams(seq, n)
        total += len(grams)
        seen.update(grams)
    if total == 0:
        return 0.0
    return len(seen) / total


def novel_ngram_fraction(seq, others: Iterable, n: int = 2) -> float:
    """Share of the distinct n-grams of ``seq`` that none of the ``others`` contains.

    The n-gram diversity of one sample against the other samples of its prompt: 1.0 when it
    shares no n-gram with them, 0.0 when every one of its n-grams occurs in another sample (or
    when it has no n-gram at all).
    """
    own = set(ngrams(seq, n))
    if not own:
        return 0.0
    seen: set[tuple] = set()
    for other in others:
        seen.update(ngrams(other, n))
    return len(own - seen) / len(own)


def repeated_ngram_rate(tokens, n: int = 3) -> float:
    """Share of the n-grams of one sequence that already occurred earlier in it.

    Each n-gram occurrence after the first of its kind counts once, so the rate equals
    ``1 - distinct_n(tokens, n)`` (and 0.0 when there is no n-gram). 0 means no repetition;
    a loop of period p over L tokens gives ``1 - p / (L - n + 1)``, which tends to 1.
    """
    grams = ngrams(tokens, n)
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


# --------------------------------------------------------------------------- BLEU


def _ngram_counts(toks: Sequence[Hashable], max_n: int) -> list[Counter]:
    """Counters of the 1..max_n-grams of one token list; index k holds the (k+1)-grams."""
    return [Counter(tuple(toks[i : i + n]) for i in range(len(toks) - n + 1)) for n in range(1, max_n + 1)]


def _bleu_from_counts(
    hyp_counts: list[Counter],
    hyp_len: int,
    ref_max_counts: list[dict],
    ref_lens: Sequence[int],
) -> float:
    """BLEU of one hypothesis from its n-gram counts and the references' max counts."""
    if hyp_len == 0 or not ref_lens:
        return 0.0
    log_p = 0.0
    for k, counts in enumerate(hyp_counts):
        total = sum(counts.values())  # hyp_len - k, or 0
        matched = sum(min(c, ref_max_counts[k].get(g, 0)) for g, c in counts.items())
        if k == 0:
            if matched == 0:
                return 0.0  # no unigram in common: BLEU is 0 (no smoothing on unigrams)
            p = matched / total
        else:
            p = (matched + 1) / (total + 1)  # Lin & Och (2004) add-one smoothing for n > 1
        log_p += math.log(p)
    max_n = len(hyp_counts)
    # Closest reference length; ties go to the shorter reference (as NLTK and sacrebleu).
    r = min(ref_lens, key=lambda ref_len: (abs(ref_len - hyp_len), ref_len))
    bp = 1.0 if hyp_len > r else math.exp(1.0 - r / hyp_len)
    return bp * math.exp(log_p / max_n)


def sentence_bleu(hypothesis, references: Sequence, max_n: int = 4) -> float:
    """Sentence BLEU of ``hypothesis`` (a token list, or a str split on whitespace) against
    ``references`` (token lists or strs), with uniform weights over n = 1..max_n.

    Definition (Papineni et al. 2002, sentence level):

    * p_n = sum over the hypothesis n-grams of min(count in hyp, max count in any reference)
      / number of hypothesis n-grams (clipped precision);
    * smoothing: Lin & Och (2004) "add-one for n > 1": p_n = (m_n + 1) / (l_n + 1) for
      n >= 2 (so an order longer than the hypothesis gives (0 + 1) / (0 + 1) = 1); p_1 is
      not smoothed, so a hypothesis sharing no word with the references scores 0;
    * BLEU = BP * exp(mean_n log p_n), with brevity penalty BP = 1 if c > r else exp(1 - r/c),
      c the hypothesis length and r the reference length closest to c (ties: the shorter).

    An empty hypothesis, or no reference, scores 0.0.
    """
    _check_n(max_n)
    hyp = _as_tokens(hypothesis)
    refs = [_as_tokens(r) for r in references]
    ref_max: list[dict] = [dict() for _ in range(max_n)]
    for ref in refs:
        for k, counts in enumerate(_ngram_counts(ref, max_n)):
            table = ref_max[k]
            for g, c in counts.items():
                if c > table.get(g, 0):
                    table[g] = c
    return _bleu_from_counts(_ngram_counts(hyp, max_n), len(hyp), ref_max, [len(r) for r in refs])


def _max_over_others(entry: tuple[int, int, int], i: int) -> int:
    """Max count of an n-gram over the samples other than ``i``, from (best, argbest, second)."""
    best, arg, second = entry
    return second if arg == i else best


def self_bleu(texts: Sequence, max_n: int = 4) -> float:
    """Self-BLEU of a set of samples: mean over i of BLEU(texts[i], references = the others).

    ``texts`` are token lists (or strs, split on whitespace); BLEU is :func:`sentence_bleu`.
    High Self-BLEU means the samples resemble each other (low diversity); identical samples
    give 1.0. Fewer than 2 samples: 0.0 (there is nothing to compare with).

    Cost is O(K * L) for K samples of length L: for each n-gram the two largest counts
    over the samples are kept, so "max count over the others" needs no loop over pairs.
    """
    _check_n(max_n)
    samples = [_as_tokens(t) for t in texts]
    k_samples = len(samples)
    if k_samples < 2:
        return 0.0
    counts = [_ngram_counts(s, max_n) for s in samples]
    lens = [len(s) for s in samples]
    # Per n-gram: (largest count, index of the sample holding it, second-largest count).
    top: list[dict] = [dict() for _ in range(max_n)]
    for i, per_n in enumerate(counts):
        for k, ctr in enumerate(per_n):
            table = top[k]
            for g, c in ctr.items():
                best, arg, second = table.get(g, (0, -1, 0))
                if c > best:
                    table[g] = (c, i, best)
                elif c > second:
                    table[g] = (best, arg, c)
    scores = []
    for i in range(k_samples):
        # Max count among the other samples: the second-largest if sample i holds the largest.
        ref_max = [{g: _max_over_others(top[k][g], i) for g in counts[i][k]} for k in range(max_n)]
        ref_lens = lens[:i] + lens[i + 1 :]
        scores.append(_bleu_from_counts(counts[i], lens[i], ref_max, ref_lens))
    return float(sum(scores) / k_samples)


# --------------------------------------------------------------------------- embeddings


def mean_pairwise_distance_batched(embeddings: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Mean cosine distance (1 - cosine) over pairs i < j, per group: ``(B, K, D) -> (B,)``.

    Rows are normalised here (a zero row is at distance 1 from everything). Groups with
    K < 2 give 0.
    """
    emb = torch.as_tensor(embeddings)
    if emb.ndim != 3:
        raise ValueError(f"expected embeddings of shape (B, K, D), got {tuple(emb.shape)}.")
    b, k, _ = emb.shape
    if k < 2:
        return torch.zeros(b, dtype=torch.float32, device=emb.device)
    unit = torch.nn.functional.normalize(emb.float(), p=2, dim=-1, eps=eps)  # (B, K, D)
    sim = unit @ unit.transpose(1, 2)  # (B, K, K)
    iu = torch.triu_indices(k, k, offset=1, device=emb.device)  # (2, P)
    return (1.0 - sim[:, iu[0], iu[1]]).mean(dim=1)  # (B,)


def distance_to_others(embeddings: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Each sample's mean cosine distance (1 - cosine) to the other samples: ``(K, D) -> (K,)``.

    Its mean over the K samples is :func:`mean_pairwise_distance`. K < 2 gives zeros.
    """
    emb = torch.as_tensor(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"expected embeddings of shape (K, D), got {tuple(emb.shape)}.")
    k = emb.shape[0]
    if k < 2:
        return torch.zeros(k, dtype=torch.float32, device=emb.device)
    unit = torch.nn.functional.normalize(emb.float(), p=2, dim=-1, eps=eps)  # (K, D)
    dist = 1.0 - unit @ unit.T  # (K, K), zero diagonal up to rounding
    return (dist.sum(dim=1) - dist.diagonal()) / (k - 1)  # (K,)


def mean_pairwise_distance(embeddings: torch.Tensor) -> float:
    """Mean cosine distance (1 - cosine) over the pairs i < j of ``embeddings`` (K, D).

    0 for identical directions, 1 for orthogonal ones, up to 2 for opposite ones; K < 2
    gives 0.0. Accepts a tensor or an array; rows need not be normalised.
    """
    emb = torch.as_tensor(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"expected embeddings of shape (K, D), got {tuple(emb.shape)}.")
    return float(mean_pairwise_distance_batched(emb.unsqueeze(0))[0])


# --------------------------------------------------------------------------- bootstrap

_MAX_BOOTSTRAP_ELEMENTS = 4_000_000  # resample indices drawn per chunk (bounds memory)


def _as_finite_1d(values, name: str) -> np.ndarray:
    arr = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    arr = arr.reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: a confidence interval needs at least one value.")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; drop or impute them before bootstrapping.")
    return arr


def bootstrap_ci(
    values,
    n_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap confidence interval of the mean: ``(mean, low, high)``.

    ``mean`` is the sample mean; ``low``/``high`` are the ``alpha/2`` and ``1 - alpha/2``
    quantiles of the means of ``n_resamples`` resamples drawn with replacement, using
    ``numpy.random.default_rng(seed)`` (same inputs and seed, same interval). Vectorised:
    resample indices are drawn as a matrix, in chunks that bound memory. A constant sample
    returns ``(c, c, c)`` exactly.
    """
    x = _as_finite_1d(values, "values")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}.")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1) (0.05 gives a 95% interval), got {alpha!r}.")
    if np.all(x == x[0]):
        c = float(x[0])
        return c, c, c
    n = x.size
    rng = np.random.default_rng(seed)
    rows_per_chunk = max(1, _MAX_BOOTSTRAP_ELEMENTS // n)
    means = np.empty(int(n_resamples), dtype=np.float64)
    for start in range(0, int(n_resamples), rows_per_chunk):
        stop = min(int(n_resamples), start + rows_per_chunk)
        idx = rng.integers(0, n, size=(stop - start, n))  # (R, n)
        means[start:stop] = x[idx].mean(axis=1)
    low, high = np.quantile(means, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(x.mean()), float(low), float(high)


def paired_bootstrap_ci(
    a,
    b,
    n_resamples: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Bootstrap CI of the mean paired difference ``a - b``: ``(mean_diff, low, high)``.

    ``a[i]`` and ``b[i]`` must measure the same unit (same prompt, same seed), so pairs are
    resampled together; an interval excluding 0 means a difference at level ``alpha``.
    """
    x = _as_finite_1d(a, "a")
    y = _as_finite_1d(b, "b")
    if x.shape != y.shape:
        raise ValueError(
            f"paired_bootstrap_ci needs paired samples of equal length, got {x.size} and {y.size}."
        )
    return bootstrap_ci(x - y, n_resamples=n_resamples, alpha=alpha, seed=seed)
