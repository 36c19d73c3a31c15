"""The featurizer's distribution features against their textbook definitions."""

import math

import pytest
import torch

from policies.features import FeatureSpec, Featurizer, distribution_features


def _reference(logits: torch.Tensor, k: int = 64) -> torch.Tensor:
    """Features 0-6 straight from the definitions, in float64, over the finite logits of each row."""
    rows = []
    for z in logits.double():
        z = z[torch.isfinite(z)]
        logp = torch.log_softmax(z, -1)
        p = logp.exp()
        h = -(p * logp).sum()
        var = (p * logp * logp).sum() - h * h
        n = z.numel()
        top = p.sort(descending=True).values[: min(k, n)]
        m = top.numel()
        median = 0.5 * (top[(m - 1) // 2] + top[m // 2])
        rows.append(torch.stack([h, h / math.log(n) if n > 1 else h * 0, var, top[0],
                                 top[0] - top[1] if n > 1 else top[0], z.std(unbiased=False), median]))
    return torch.stack(rows).float()


def test_fast_moments_match_the_definitions_on_model_like_logits():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(5, 49152, generator=g) * 2.5 - 8.0  # wide vocabulary, a few peaked rows
    z[1, 17] = 12.0  # nearly one-hot
    z[2] += 60.0  # a large common offset: the features must not depend on it
    z[3, :] = 0.0  # uniform
    feats, shift = distribution_features(z)
    torch.testing.assert_close(feats, _reference(z), atol=2e-5, rtol=2e-4)
    # the shift is the log-normaliser: logits - shift are the exact base log-probabilities
    exact = torch.log_softmax(z.double(), -1)
    torch.testing.assert_close((z - shift[:, None]).double(), exact, atol=2e-6, rtol=0)
    assert feats[3, 0].item() == pytest.approx(math.log(49152), abs=1e-4)  # uniform: H = ln V, no spread
    assert feats[3, 2].item() == pytest.approx(0.0, abs=1e-5) and feats[3, 5].item() == 0.0


def test_masked_rows_use_only_their_finite_logits():
    z = torch.tensor([[2.0, 1.0, 0.0, -math.inf, -math.inf],
                      [2.0, 1.0, 0.0, -1.0, -2.0],
                      [3.0, -math.inf, -math.inf, -math.inf, -math.inf]])
    feats, shift = distribution_features(z, median_k=4)
    torch.testing.assert_close(feats, _reference(z, k=4), atol=1e-6, rtol=1e-5)
    # one finite token: entropy 0, max prob 1, margin 1 (only one finite), std 0, median = that token's p
    torch.testing.assert_close(feats[2], torch.tensor([0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0]))
    assert shift[2].item() == 3.0


def test_update_reads_the_drawn_tokens_base_log_probability():
    spec = FeatureSpec(horizon=8)
    f = Featurizer(spec, 2)
    z = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]))
    f.observe(z)
    stats = f.update(torch.tensor([1, 2]), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(stats.logp, torch.log(torch.tensor([0.25, 0.7])), atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="observe"):
        f.update(torch.tensor([0, 0]), torch.tensor([1.0, 1.0]))


def test_a_step_on_some_rows_leaves_the_others_untouched():
    """An engine steps some of its slots: enter_rows narrows the featurizer, leave_rows writes them back,
    history and pending observation included; the other rows are exactly as they were."""
    spec = FeatureSpec(horizon=8)
    f = Featurizer(spec, 3)
    f.observe(torch.log(torch.tensor([[0.5, 0.5, 1e-9], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])))
    f.update(torch.tensor([0, 1, 2]), torch.tensor([0.3, 1.7, 0.9]))
    f.observe(torch.log(torch.tensor([[0.6, 0.2, 0.2], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]])))
    before = {name: getattr(f.state, name).clone() for name in f.state.__dataclass_fields__}
    full = f.enter_rows(torch.tensor([2, 0]))  # rows 2 and 0 drew tokens 2 and 0
    stats = f.update(torch.tensor([2, 0]), torch.tensor([1.1, 0.5]))
    torch.testing.assert_close(stats.logp, torch.log(torch.tensor([0.8, 0.6])), atol=1e-6, rtol=0)
    f.observe(torch.log(torch.tensor([[0.3, 0.3, 0.4], [0.5, 0.25, 0.25]])))
    f.leave_rows(torch.tensor([2, 0]), full)
    assert f.state.position.tolist() == [2, 1, 2] and f.state.prev_temperature.tolist() == pytest.approx([0.5, 1.7, 1.1])
    for name, old in before.items():  # row 1 untouched
        assert torch.equal(getattr(f.state, name)[1], old[1]), name
    stats = f.update(torch.tensor([1, 0, 2]), torch.tensor([1.0, 1.0, 1.0]))  # each row reads its own pending logits
    torch.testing.assert_close(stats.logp, torch.log(torch.tensor([0.25, 0.2, 0.4])), atol=1e-6, rtol=0)


def test_distribution_features_in_row_slices_equal_all_rows_at_once(monkeypatch):
    """On a CPU the rows go through in cache-sized slices: the features and shifts are exactly those of
    one pass over all rows (masked rows included)."""
    import policies.features as features

    g = torch.Generator().manual_seed(0)
    z = torch.randn(11, 5000, generator=g) * 3
    z[4, :4000] = float("-inf")
    monkeypatch.setattr(features, "_SLICE_ELEMENTS", 10**9)  # one slice
    whole = features.distribution_features(z)
    monkeypatch.setattr(features, "_SLICE_ELEMENTS", 3 * 5000)  # slices of 3 rows: 3, 3, 3, 2
    sliced = features.distribution_features(z)
    assert torch.equal(whole[0], sliced[0]) and torch.equal(whole[1], sliced[1])


def test_position_bins_are_a_one_hot_of_the_tokens_generated_so_far():
    spec = FeatureSpec(horizon=16, categories=("code",), include_diversity=True, position_bins=(2, 3))
    assert spec.names[-6:] == ("category_code", "category_other", "position_bin_0", "position_bin_1",
                               "position_bin_2", "diversity")
    assert FeatureSpec.from_dict(spec.to_dict()) == spec and spec.to_dict()["position_bins"] == [2, 3]
    f = Featurizer(spec, 2)
    f.reset(None, diversity=[0.5, 1.5])
    cols = slice(spec.index("position_bin_0"), spec.index("position_bin_2") + 1)
    seen = []
    for _ in range(5):
        obs = f.observe(torch.randn(2, 10))
        assert torch.equal(obs[0, cols], obs[1, cols]) and obs[:, -1].tolist() == [0.5, 1.5]
        seen.append(obs[0, cols].tolist())
        f.update(torch.tensor([1, 2]), torch.tensor([1.0, 1.0]))
    # tokens 1-2 in bin 0, token 3 in bin 1, tokens 4 on in bin 2
    assert seen == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]
    assert "position_bin_0" not in FeatureSpec(horizon=16).names  # off by default: the layout is unchanged


@pytest.mark.parametrize("bins", [(0,), (4, 4), (8, 4)])
def test_position_bins_must_increase_from_one(bins):
    with pytest.raises(ValueError, match=r"position_bins=.* must be increasing token counts >= 1"):
        FeatureSpec(horizon=16, position_bins=bins)
