"""Pins the signed-temperature, truncation and sampling semantics of samplers/core.py."""

import math

import pytest
import torch

from samplers import apply_temperature, sample, tempered_probs, truncate

INF = math.inf
NAN = math.nan

# Probabilities [0.1, 0.2, 0.3, 0.4] as logits (log p), used by the truncation tests.
P4 = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()  # (1, 4)


def row(*values, dtype=torch.float32):
    return torch.tensor([values], dtype=dtype)  # (1, V)


def entropy(p):
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def kept(logits):
    """Indices of finite entries of a single-row tensor."""
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


# --------------------------------------------------------------------------- temperature


def test_reference_values():
    z = row(1.0, 2.0, 3.0, 4.0)
    torch.testing.assert_close(
        tempered_probs(z, 0.5), row(0.00214401, 0.01584220, 0.11705891, 0.86495488), atol=1e-7, rtol=0
    )
    torch.testing.assert_close(
        tempered_probs(z, 2.0), row(0.10153632, 0.16740510, 0.27600434, 0.45505423), atol=1e-7, rtol=0
    )


def test_temperature_one_is_identity():
    z = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 4
    out = apply_temperature(z, 1.0)
    # Same logits up to the row shift that makes the max exactly 0.
    torch.testing.assert_close(out, z - z.amax(-1, keepdim=True), atol=0, rtol=0)
    assert torch.equal(out.amax(-1), torch.zeros(3))
    torch.testing.assert_close(tempered_probs(z, 1.0), torch.softmax(z, -1), atol=1e-7, rtol=0)


def test_entropy_monotone_in_temperature():
    z = torch.randn(4, 100, generator=torch.Generator().manual_seed(1)) * 3
    temps = [0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 10.0]
    h = torch.stack([entropy(tempered_probs(z, t)) for t in temps])  # (len(temps), B)
    assert (h[1:] > h[:-1]).all(), h  # T < 1 sharpens, T > 1 smooths
    assert (h[temps.index(0.5)] < entropy(torch.softmax(z, -1))).all()
    assert (h[temps.index(2.0)] > entropy(torch.softmax(z, -1))).all()


@pytest.mark.parametrize("t", [-INF, -3.0, -1.0, -0.5, 0.5, 1.0, 3.0, INF])
def test_uniform_stays_uniform(t):
    z = torch.full((2, 7), 1.5)
    torch.testing.assert_close(tempered_probs(z, t), torch.full((2, 7), 1 / 7), atol=1e-7, rtol=0)


def test_negative_temperature_reverses_ranking():
    z = row(1.0, 2.0, 3.0, 4.0)
    reversed_z = row(4.0, 3.0, 2.0, 1.0)
    p_neg = tempered_probs(z, -1.0)
    torch.testing.assert_close(p_neg, tempered_probs(reversed_z, 1.0), atol=1e-7, rtol=0)
    torch.testing.assert_close(p_neg, tempered_probs(z, 1.0).flip(-1), atol=1e-7, rtol=0)
    torch.testing.assert_close(tempered_probs(z, -0.5), tempered_probs(z, 0.5).flip(-1), atol=1e-7, rtol=0)
    assert p_neg.argmax().item() == 0  # the least likely token became the most likely


@pytest.mark.parametrize(
    "t, expected",
    [(0.0, 3), (-0.0, 3), (1e-9, 3), (5e-7, 3), (-1e-9, 0), (-5e-7, 0)],
)
def test_limit_temperatures_are_one_hot(t, expected):
    z = row(1.0, 2.0, 3.0, 4.0)
    out = apply_temperature(z, t)
    want = torch.full((1, 4), -INF)
    want[0, expected] = 0.0
    assert torch.equal(out, want)
    assert torch.equal(tempered_probs(z, t), torch.nn.functional.one_hot(torch.tensor([expected]), 4).float())


def test_eps_sets_the_limit_boundary():
    z = row(1.0, 2.0, 3.0, 4.0)
    # 1e-3 >= eps: ordinary division, not one-hot but very sharp.
    p = tempered_probs(z, 1e-3)
    assert p[0, 3].item() == 1.0 and (p[0, :3] == 0).all()
    assert torch.isfinite(apply_temperature(z, 1e-3)[0]).all()  # not the limit path
    assert kept(apply_temperature(z, 1e-3, eps=1e-2)) == [3]  # the limit path
    # eps=0: only T == 0 is greedy.
    assert kept(apply_temperature(z, 0.0, eps=0.0)) == [3]


def test_limit_ties_take_first_index():
    z = row(1.0, 4.0, 4.0, 0.0, 0.0)
    assert kept(apply_temperature(z, 0.0)) == [1]
    assert kept(apply_temperature(z, -1e-9)) == [3]
    assert sample(z, 0.0).item() == 1
    assert sample(z, -0.0).item() == 1
    assert sample(z, -1e-9).item() == 3


@pytest.mark.parametrize("t", [INF, -INF])
def test_infinite_temperature_is_uniform_over_kept_set(t):
    z = row(-INF, 1.0, 5.0, -INF, -3.0)
    torch.testing.assert_close(tempered_probs(z, t), row(0.0, 1 / 3, 1 / 3, 0.0, 1 / 3), atol=1e-7, rtol=0)
    torch.testing.assert_close(
        tempered_probs(P4, t, top_k=2), row(0.0, 0.0, 0.5, 0.5), atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("t", [-0.5, -1.0, -10.0, -1e-9, -0.0, -INF])
def test_negative_temperature_never_selects_masked(t):
    z = row(-INF, 1.0, 2.0, -INF, 3.0, -INF)
    out = apply_temperature(z, t)
    assert not torch.isnan(out).any()
    assert (out[0, [0, 3, 5]] == -INF).all()
    p = tempered_probs(z, t)
    assert (p[0, [0, 3, 5]] == 0).all()
    torch.testing.assert_close(p.sum(), torch.tensor(1.0))
    draws = sample(z.expand(500, -1), t, generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) <= {1, 2, 4}
    if -1e-6 < t < 0:
        assert set(draws.tolist()) == {1}  # argmin over the kept tokens


def test_per_row_temperatures_equal_row_by_row():
    temps = [0.7, -1.0, 0.0, -0.0, 1e-9, -1e-9, INF, -INF, 2.0, -0.3]
    z = torch.randn(len(temps), 30, generator=torch.Generator().manual_seed(2)) * 3
    z[::3, :5] = -INF  # some masked tokens
    batched = apply_temperature(z, torch.tensor(temps))
    probs = tempered_probs(z, torch.tensor(temps), top_k=20)
    for i, t in enumerate(temps):
        single = apply_temperature(z[i : i + 1], t)
        assert torch.equal(torch.softmax(batched[i : i + 1], -1), torch.softmax(single, -1)), (i, t)
        assert torch.equal(batched[i : i + 1].isinf(), single.isinf()), (i, t)
        torch.testing.assert_close(probs[i : i + 1], tempered_probs(z[i : i + 1], t, top_k=20), atol=0, rtol=0)


def test_positive_per_row_temperatures_fast_path():
    # Only positive finite temperatures: no re-masking needed, -inf stays -inf.
    z = row(-INF, 1.0, 2.0).expand(2, -1)
    out = apply_temperature(z, torch.tensor([0.5, 3.0]))
    assert (out[:, 0] == -INF).all()
    torch.testing.assert_close(torch.softmax(out, -1)[1], tempered_probs(z[1:], 3.0)[0])


def test_zero_dim_and_integer_temperatures():
    z = row(1.0, 2.0, 3.0, 4.0)
    assert torch.equal(apply_temperature(z, torch.tensor(2.0)), apply_temperature(z, 2.0))
    assert torch.equal(apply_temperature(z, 2), apply_temperature(z, 2.0))
    assert torch.equal(apply_temperature(z, torch.tensor([2])), apply_temperature(z, 2.0))


@pytest.mark.parametrize("t", [1e-8, -1e-8, 1e-3, -1e-3])
@pytest.mark.parametrize("eps", [1e-6, 1e-12])
def test_extreme_logits_and_temperatures_stay_finite(t, eps):
    g = torch.Generator().manual_seed(3)
    z = (torch.rand(4, 1000, generator=g) * 2 - 1) * 1e4  # logits in [-1e4, 1e4]
    z[:, 0] = 1e4
    z[:, 1] = -1e4
    z[1, 500:] = -INF
    p = tempered_probs(z, t, eps=eps)
    assert torch.isfinite(p).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(4), atol=1e-6, rtol=0)
    want = 0 if t > 0 else 1
    assert (p.argmax(-1) == want).all()
    assert torch.equal(sample(z, t, eps=eps), torch.full((4,), want))
    # Per-row temperature path too.
    p_rows = tempered_probs(z, torch.full((4,), t), eps=eps)
    assert torch.isfinite(p_rows).all() and (p_rows.argmax(-1) == want).all()


def test_half_precision_logits():
    z = row(1.0, 2.0, 3.0, 4.0, dtype=torch.float16)
    out = apply_temperature(z, 0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(
        torch.softmax(out, -1), row(0.00214401, 0.01584220, 0.11705891, 0.86495488), atol=1e-6, rtol=0
    )
    assert truncate(z, top_k=2).dtype == torch.float16
    assert sample(z, 0.0).item() == 3


def test_inputs_are_never_modified():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 40, generator=g)
    z[0, :3] = -INF
    before = z.clone()
    temps = torch.tensor([0.5, -1.0, 0.0, -1e-9, INF, 2.0])
    temps_before = temps.clone()
    outs = [
        apply_temperature(z, -1.0),
        apply_temperature(z, 1.0),
        apply_temperature(z, temps),
        truncate(z),
        truncate(z, top_k=3, top_p=0.5, min_p=0.1, top_n_sigma=1.0),
        tempered_probs(z, temps, top_k=5, top_p=0.9),
    ]
    sample(z, temps, top_p=0.8, min_p=0.05, top_n_sigma=2.0)
    assert torch.equal(z, before)
    assert torch.equal(temps, temps_before)
    for out in outs:
        assert out.data_ptr() != z.data_ptr()


# --------------------------------------------------------------------------- truncation


@pytest.mark.parametrize(
    "kwargs, survivors",
    [
        ({}, [0, 1, 2, 3]),
        ({"top_k": 2}, [2, 3]),
        ({"top_k": 4}, [0, 1, 2, 3]),
        ({"top_k": 10}, [0, 1, 2, 3]),
        ({"top_p": 0.5}, [2, 3]),  # 0.4 < 0.5, then 0.4 + 0.3 = 0.7 >= 0.5: 0.3 crosses, kept
        ({"top_p": 0.4}, [3]),  # 0.4 reaches 0.4 exactly: nothing else
        ({"top_p": 0.75}, [1, 2, 3]),
        ({"top_p": 0.95}, [0, 1, 2, 3]),
        ({"min_p": 0.5}, [1, 2, 3]),  # p >= 0.5 * 0.4 = 0.2 (boundary kept)
        ({"min_p": 0.6}, [2, 3]),  # p >= 0.24
        ({"min_p": 0.25}, [0, 1, 2, 3]),  # p >= 0.1 (boundary kept)
        # top-n-sigma, by hand: logits log p = [-2.302585, -1.609438, -1.203973, -0.916291],
        # mean -1.508072, squared deviations [0.631252, 0.010275, 0.092476, 0.350205],
        # population variance 0.271052, std 0.520626. Threshold max - n * std:
        #   n = 0.5: -0.916291 - 0.260313 = -1.176604 -> keeps {0.4}
        #   n = 1.0: -0.916291 - 0.520626 = -1.436917 -> keeps {0.3, 0.4}
        #   n = 2.0: -0.916291 - 1.041253 = -1.957544 -> keeps {0.2, 0.3, 0.4}
        ({"top_n_sigma": 0.5}, [3]),
        ({"top_n_sigma": 1.0}, [2, 3]),
        ({"top_n_sigma": 2.0}, [1, 2, 3]),
        ({"top_n_sigma": 3.0}, [0, 1, 2, 3]),  # -2.478170 < -2.302585
    ],
)
def test_truncation_hand_computed(kwargs, survivors):
    out = truncate(P4, **kwargs)
    assert kept(out) == survivors
    # Survivors keep their logits unchanged.
    assert torch.equal(out[0, survivors], P4[0, survivors])


def test_top_n_sigma_ignores_masked_tokens():
    # Masked tokens are not part of the std: same kept set as P4 at n = 1.
    z = torch.cat([P4, row(-INF, -INF)], dim=-1)
    assert kept(truncate(z, top_n_sigma=1.0)) == [2, 3]
    assert kept(truncate(z, top_n_sigma=2.0)) == [1, 2, 3]


def test_top_p_respects_pre_masked_tokens():
    z = row(-INF, 0.0, 0.0, 0.0, 0.0)  # 4 kept tokens at 0.25 each
    # Ties at the last kept value are kept (all tied with the threshold).
    assert kept(truncate(z, top_p=0.3)) == [1, 2, 3, 4]
    z = row(-INF, 2.0, 1.0, 0.0, -INF)
    p = torch.softmax(z, -1)[0]  # [0, 0.665, 0.245, 0.090, 0]
    assert kept(truncate(z, top_p=float(p[1]) + 0.01)) == [1, 2]


def test_top_k_keeps_ties_with_kth_value():
    assert kept(truncate(row(1.0, 3.0, 2.0, 3.0, 2.0), top_k=2)) == [1, 3]
    assert kept(truncate(row(1.0, 3.0, 2.0, 3.0, 2.0), top_k=3)) == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"top_k": 1},
        {"top_p": 1e-9},
        {"min_p": 1.0},
        {"top_n_sigma": 1e-9},
        {"top_k": 1, "top_p": 1e-9, "min_p": 1.0, "top_n_sigma": 1e-9},
    ],
)
def test_argmax_always_survives(kwargs):
    z = torch.randn(5, 64, generator=torch.Generator().manual_seed(5))
    out = truncate(z, **kwargs)
    assert torch.equal(out.isfinite(), torch.nn.functional.one_hot(z.argmax(-1), 64).bool())
    assert kept(truncate(P4, **kwargs)) == [3]


def test_truncation_composes_as_intersection_on_base_distribution():
    # top_k=2 keeps {0.3, 0.4}; top_p=0.5 on the base distribution keeps {0.4, 0.3}.
    # The intersection is {0.3, 0.4}. (Applying top-p after renormalising the top-k set,
    # 0.4 / 0.7 = 0.571 >= 0.5, would keep {0.4} only: that is NOT the rule here.)
    assert kept(truncate(P4, top_k=2, top_p=0.5)) == [2, 3]
    assert kept(truncate(P4, top_k=3, min_p=0.6)) == [2, 3]  # {0.2,0.3,0.4} & {0.3,0.4}
    assert kept(truncate(P4, top_p=0.75, min_p=0.5, top_n_sigma=1.0)) == [2, 3]
    assert kept(truncate(P4, top_k=3, top_p=0.75, min_p=0.25)) == [1, 2, 3]


def test_truncation_then_temperature_order():
    # Truncation on the base distribution, temperature within the kept set.
    p = tempered_probs(P4, -1.0, top_k=2)  # kept logits log 0.3, log 0.4, inverted
    torch.testing.assert_close(p, row(0.0, 0.0, 0.4 / 0.7, 0.3 / 0.7), atol=1e-6, rtol=0)
    # A temperature never changes the kept set: T = 10 with top_p=0.4 still keeps {0.4}.
    assert kept(torch.log(tempered_probs(P4, 10.0, top_p=0.4))) == [3]
    # Limit of negative T with truncation: the least likely of the plausible set.
    assert sample(P4, -1e-9, top_k=2).item() == 2
    assert sample(P4, -0.0, top_k=2).item() == 3  # -0.0 is greedy


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": NAN}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.1}, "min_p"),
        ({"top_n_sigma": 0.0}, "top_n_sigma"),
        ({"top_n_sigma": -1.0}, "top_n_sigma"),
        ({"top_n_sigma": INF}, "top_n_sigma"),
    ],
)
def test_bad_truncation_arguments(kwargs, name):
    value = repr(next(iter(kwargs.values())))
    for call in (
        lambda: truncate(P4, **kwargs),
        lambda: sample(P4, 1.0, **kwargs),
        lambda: tempered_probs(P4, 1.0, **kwargs),
    ):
        with pytest.raises(ValueError, match=rf"^{name} must be .*got {value}$"):
            call()


# --------------------------------------------------------------------------- sample()


def test_sample_reproducible_with_generator():
    z = torch.randn(64, 1000, generator=torch.Generator().manual_seed(6))
    temps = torch.linspace(-2, 2, 64)
    a = sample(z, temps, generator=torch.Generator().manual_seed(123), top_p=0.95)
    b = sample(z, temps, generator=torch.Generator().manual_seed(123), top_p=0.95)
    c = sample(z, temps, generator=torch.Generator().manual_seed(124), top_p=0.95)
    assert a.dtype == torch.long and a.shape == (64,)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(
    "t, kwargs",
    [
        (0.7, {}),
        (1.0, {"top_p": 0.9}),
        (-1.0, {}),
        (-1.0, {"top_k": 3}),  # least likely of the plausible set
        (-0.5, {"min_p": 0.1}),
        (INF, {"top_k": 4}),
    ],
)
def test_sample_frequencies_match_tempered_probs(t, kwargs):
    n = 20000
    z = row(0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    probs = tempered_probs(z, t, **kwargs)[0]  # (V,)
    draws = sample(z.expand(n, -1), t, generator=torch.Generator().manual_seed(7), **kwargs)
    freq = torch.bincount(draws, minlength=6).float() / n
    # 5 standard errors of a frequency at n draws.
    tol = 5 * (probs * (1 - probs) / n).sqrt() + 1e-9
    assert ((freq - probs).abs() <= tol).all(), (freq, probs)
    assert (freq[probs == 0] == 0).all()  # truncated tokens never drawn
    if kwargs == {"top_k": 3}:
        assert kept(torch.log(probs[None])) == [3, 4, 5]
        assert freq.argmax().item() == 3  # the least likely kept token is now the likeliest


def test_sample_frequencies_with_per_row_temperatures():
    n = 10000
    z = row(0.0, 1.0, 2.0, 3.0).expand(2 * n, -1)
    temps = torch.tensor([0.5, -2.0]).repeat_interleave(n)  # (2n,)
    draws = sample(z, temps, generator=torch.Generator().manual_seed(8))
    for half, t in enumerate([0.5, -2.0]):
        probs = tempered_probs(z[:1], t)[0]
        freq = torch.bincount(draws[half * n : (half + 1) * n], minlength=4).float() / n
        tol = 5 * (probs * (1 - probs) / n).sqrt() + 1e-9
        assert ((freq - probs).abs() <= tol).all(), (t, freq, probs)


def test_greedy_rows_deterministic_in_mixed_batch():
    z = torch.randn(8, 200, generator=torch.Generator().manual_seed(9))
    temps = torch.tensor([0.0, 1.0, -1e-9, 2.0, 1e-9, -1.0, -0.0, 0.5])
    exact = {0: z[0].argmax(), 2: z[2].argmin(), 4: z[4].argmax(), 6: z[6].argmax()}
    draws = [sample(z, temps, generator=torch.Generator().manual_seed(s)) for s in range(5)]
    for d in draws:
        for i, token in exact.items():
            assert d[i] == token, (i, d[i], token)
    # The sampled rows do vary across seeds (200 tokens, high entropy).
    assert len({tuple(d[[1, 3, 5, 7]].tolist()) for d in draws}) > 1


def test_sample_all_greedy_scalar_temperature():
    z = torch.randn(16, 100, generator=torch.Generator().manual_seed(10))
    assert torch.equal(sample(z, 0.0), z.argmax(-1))
    assert torch.equal(sample(z, -1e-9), z.argmin(-1))
    assert torch.equal(sample(z, -1e-9, top_k=10), z.topk(10, -1).indices[:, -1])


def test_sample_empty_batch():
    out = sample(torch.zeros(0, 5), 1.0)
    assert out.shape == (0,) and out.dtype == torch.long


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sample_on_cuda():
    z = torch.randn(64, 5000, generator=torch.Generator().manual_seed(11)).cuda()
    temps = torch.linspace(-2, 2, 64, device="cuda")
    temps[0] = 0.0
    a = sample(z, temps, generator=torch.Generator("cuda").manual_seed(1), top_k=50, top_p=0.9)
    b = sample(z, temps, generator=torch.Generator("cuda").manual_seed(1), top_k=50, top_p=0.9)
    assert a.device.type == "cuda" and torch.equal(a, b)
    assert a[0] == z[0].argmax()
    on_gpu = tempered_probs(z, temps, top_k=50).cpu()
    torch.testing.assert_close(on_gpu, tempered_probs(z.cpu(), temps.cpu(), top_k=50), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- errors


FUNCTIONS = {
    "apply_temperature": lambda z, t: apply_temperature(z, t),
    "tempered_probs": lambda z, t: tempered_probs(z, t, top_k=2),
    "sample": lambda z, t: sample(z, t, top_p=0.9),
}


@pytest.mark.parametrize("fn", FUNCTIONS.values(), ids=FUNCTIONS.keys())
def test_nan_temperature_raises(fn):
    z = torch.zeros(4, 5)
    with pytest.raises(ValueError, match=r"temperature is NaN \(for all rows\).*real numbers"):
        fn(z, NAN)
    with pytest.raises(ValueError, match=r"temperature is NaN in rows \[1, 3\].*real numbers"):
        fn(z, torch.tensor([1.0, NAN, INF, NAN]))


ALL_FUNCTIONS = {**FUNCTIONS, "truncate": lambda z, t: truncate(z, top_k=2)}


@pytest.mark.parametrize("fn", ALL_FUNCTIONS.values(), ids=ALL_FUNCTIONS.keys())
def test_non_finite_logits_raise(fn):
    z = torch.randn(4, 1000, generator=torch.Generator().manual_seed(12))
    nan_z = z.clone()
    nan_z[2, 517] = NAN  # NaN away from the row max, in a long row
    msg = r"logits contain NaN or \+inf in rows \[2\] \(NaN in rows \[2\], \+inf in rows \[\]\).*model outputs"
    with pytest.raises(ValueError, match=msg):
        fn(nan_z, 1.0)
    inf_z = z.clone()
    inf_z[0, 3] = INF
    inf_z[3, 999] = INF
    msg = r"logits contain NaN or \+inf in rows \[0, 3\] \(NaN in rows \[\], \+inf in rows \[0, 3\]\)"
    with pytest.raises(ValueError, match=msg):
        fn(inf_z, 1.0)
    empty_z = z.clone()
    empty_z[1] = -INF
    with pytest.raises(ValueError, match=r"logits rows \[1\] are entirely -inf"):
        fn(empty_z, -1.0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match=r"logits must have shape \(B, V\)"):
        apply_temperature(torch.zeros(5), 1.0)
    with pytest.raises(ValueError, match=r"logits must have shape \(B, V\)"):
        truncate(torch.zeros(2, 0))
    with pytest.raises(ValueError, match=r"temperature must be a float or a tensor of shape \(B,\) = \(3,\)"):
        apply_temperature(torch.zeros(3, 5), torch.ones(2))
    with pytest.raises(ValueError, match=r"eps must be a finite number >= 0"):
        apply_temperature(torch.zeros(3, 5), 1.0, eps=-1.0)
    with pytest.raises(ValueError, match=r"temperature must be a real number"):
        apply_temperature(torch.zeros(3, 5), "hot")


def test_unknown_truncation_argument_suggests_name():
    with pytest.raises(TypeError, match=r"unknown truncation argument 'topk'; did you mean 'top_k'\?"):
        tempered_probs(P4, 1.0, topk=2)


def test_sample_return_tempered_matches_apply_temperature_after_truncate():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]]))
    t = torch.tensor([-0.5, 2.0])
    g = torch.Generator().manual_seed(3)
    tokens, y = sample(logits, t, generator=g, top_k=3, return_tempered=True)
    expected = apply_temperature(truncate(logits, top_k=3), t)
    torch.testing.assert_close(y, expected)
    assert tokens.shape == (2,)
    assert torch.isfinite(y.gather(1, tokens.view(-1, 1))).all()  # drawn tokens are in the kept set


# --------------------------------------------------------------------------- packed draw (large vocabularies)


def _lm_like_logits(batch: int, vocab: int, seed: int) -> torch.Tensor:
    """A peaked head over a long flat tail, as an LM's next-token logits: min-p keeps a few dozen tokens."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, vocab, generator=g)
    head = torch.randint(0, vocab, (batch, 40), generator=g)
    z.scatter_(1, head, 9.0 + 3.0 * torch.rand(batch, 40, generator=g))
    return z


@pytest.mark.parametrize("kwargs", [dict(min_p=0.02), dict(min_p=0.1, top_k=8), dict(top_k=50),
                                    dict(top_p=0.9), dict(top_n_sigma=2.0)])
def test_packed_draw_is_the_full_width_draw(kwargs, monkeypatch):
    """sample() draws from the kept tokens packed into a few blocks; the tokens and the tempered logits are
    exactly (bit for bit) those of the full-width path, for positive, negative, greedy and infinite T."""
    import samplers.core as core

    z = _lm_like_logits(12, 16384, 0)
    z[3, :8192] = -math.inf  # a row with masked tokens
    z[11, 100] = z[11].max()  # a tie with the argmax (row 11: T = 1e-8, the greedy limit)
    t = torch.tensor([0.7, 1.3, -0.8, 0.0, 2.5, -1e-9, math.inf, -math.inf, 0.3, -2.0, 1.0, 1e-8])
    packed = []
    calls = {"pack": 0}
    real_pack = core._pack

    def counting(*args):
        out = real_pack(*args)
        calls["pack"] += out is not None
        return out

    monkeypatch.setattr(core, "_pack", counting)
    for seed in range(3):
        packed.append(sample(z, t, generator=torch.Generator().manual_seed(seed), return_tempered=True, **kwargs))
    assert calls["pack"] == 3  # the packed path really ran
    monkeypatch.setattr(core, "_pack", lambda *args: None)  # the full-width path
    for seed, (tokens, tempered) in enumerate(packed):
        ref_tokens, ref_tempered = sample(z, t, generator=torch.Generator().manual_seed(seed), return_tempered=True,
                                          **kwargs)
        assert torch.equal(tokens, ref_tokens)
        assert torch.equal(tempered, ref_tempered)
    assert tokens[3] == z[3].argmax() and tokens[11] == 100  # greedy rows; the tie takes the first index


def test_packed_draw_falls_back_when_the_kept_set_is_wide():
    """A flat row keeps most of the vocabulary: packing would save nothing, the full-width path runs (None)."""
    import samplers.core as core

    z = torch.zeros(2, 4096)
    z[0, 7] = 1.0
    assert core._pack(z, core._keep_threshold(z, z.amax(-1), core.Truncation(min_p=0.02))) is None
    z = _lm_like_logits(2, 4096, 1)
    values, columns, _ = core._pack(z, core._keep_threshold(z, z.amax(-1), core.Truncation(min_p=0.02)))
    kept = z >= core._keep_threshold(z, z.amax(-1), core.Truncation(min_p=0.02))[:, None]
    for row in range(2):  # exactly the kept tokens, in vocabulary order, each with its logit
        finite = values[row] > -math.inf
        assert columns[row][finite].tolist() == kept[row].nonzero().flatten().tolist()
        assert torch.equal(values[row][finite], z[row][kept[row]])


@pytest.mark.parametrize("k", [1, 5, 64])
def test_top_values_equal_torch_topk(k):
    from samplers.core import top_values

    z = _lm_like_logits(6, 8192, 2)
    z[1, :6000] = -math.inf
    z[2, :] = 0.5  # every value tied
    z[3, 10:20] = z[3].max()  # ties at the top
    assert torch.equal(top_values(z, k), torch.topk(z, k, dim=-1).values)
    small = torch.randn(3, 100)  # not a multiple of the block: plain topk
    assert torch.equal(top_values(small, k), torch.topk(small, k, dim=-1).values)


@pytest.mark.parametrize("t", [0.0, -0.0, 1e-9, -1e-9, 0.7, 1.0, 2.5, -0.5, -1.0, math.inf, -math.inf])
def test_a_number_is_its_broadcast_row_tensor(t):
    """One temperature path: a number for all rows gives exactly what the (B,) tensor of it gives."""
    z = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    z[0, :5] = -math.inf
    row = torch.full((3,), t)
    assert torch.equal(apply_temperature(z, t), apply_temperature(z, row))
    assert torch.equal(tempered_probs(z, t, min_p=0.05), tempered_probs(z, row, min_p=0.05))


def test_check_logits_is_the_one_nan_inf_check():
    from samplers.core import check_logits

    z = torch.tensor([[0.0, 2.0], [1.0, -math.inf]])
    assert check_logits(z).tolist() == [2.0, 1.0]
    with pytest.raises(ValueError, match=r"logits contain NaN or \+inf in rows \[1\] \(NaN in rows \[\], \+inf in rows \[1\]\)"):
        check_logits(torch.tensor([[0.0, 1.0], [math.inf, 0.0]]))
    with pytest.raises(ValueError, match=r"logits rows \[0\] are entirely -inf"):
        check_logits(torch.full((1, 3), -math.inf))
