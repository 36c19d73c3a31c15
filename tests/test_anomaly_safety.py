"""Negative-temperature safety: anomalous-token discovery, the anomaly detector, the guard rails.

Model tests use the real SmolLM2-135M-Instruct (``lm`` fixture) with a small probe (16 prompts x
12 tokens) in a temporary cache directory; the detector and guard tests on crafted inputs need no
model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from anomaly.detector import AnomalyDetector
from anomaly.prior import build_token_prior
from policies import ActionMapping, FeatureSpec, Featurizer, TemperaturePolicy, make_policy
from policies.guard import GUARD_COUNTERS, GuardedPolicy, GuardSettings, apply_guard, resolve_guard

PROBE = dict(n_tokens=12, seed=0)  # small probe: 16 prompts x 12 tokens


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads make the model ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def probe_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("anomalous_tokens")


@pytest.fixture(scope="module")
def discovered(lm, probe_cache):
    from anomaly.discovery import discover_anomalous_tokens

    return discover_anomalous_tokens(lm, top=50, cache_dir=probe_cache, **PROBE)


@pytest.fixture(scope="module")
def ordinary(lm):
    """The 16 probe prompts continued at T = 0.7 (24 tokens): tokens and base log-probs (16, 24)."""
    from anomaly.discovery import DEFAULT_PROBE_PROMPTS

    return _generate(lm, list(DEFAULT_PROBE_PROMPTS), 0.7, 24, seed=0)


@pytest.fixture(scope="module")
def inverted(lm):
    """8 probe prompts continued at T = -0.001 (16 tokens): tokens and base log-probs (8, 16)."""
    from anomaly.discovery import DEFAULT_PROBE_PROMPTS

    return _generate(lm, list(DEFAULT_PROBE_PROMPTS[:8]), -0.001, 16, seed=1)


@torch.inference_mode()
def _generate(lm, prompts, temperature: float, n_tokens: int, seed: int = 0):
    """Plain (chat=False) continuations: tokens (B, n) and their base log-probs (B, n)."""
    from samplers.core import sample

    logits, state = lm.prefill(lm.encode(prompts, chat=False))
    gen = torch.Generator(device=lm.device).manual_seed(seed)
    tokens, logps = [], []
    for step in range(n_tokens):
        tok = sample(logits, temperature, generator=gen)  # (B,)
        tokens.append(tok)
        logps.append(torch.log_softmax(logits.float(), -1).gather(1, tok.view(-1, 1)).squeeze(1))
        if step + 1 < n_tokens:
            logits = lm.decode(state, tok)
    return torch.stack(tokens, 1), torch.stack(logps, 1)


# =========================================================================== discovery
@pytest.mark.slow
def test_discovery_surfaces_the_known_smollm2_tokens(lm, discovered):
    from anomaly.discovery import DEFAULT_PROBE_PROMPTS, centroid_ranks, probe_counts

    pieces = [t.piece.strip() for t in discovered[:10]]
    assert "emeteries" in pieces and "MetaInfo" in pieces, pieces
    scores = [t.score for t in discovered]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert len(discovered) == 50
    # every entry is the documented formula of the probe and the embedding view, recomputed here
    _, counts, rows = probe_counts(lm, DEFAULT_PROBE_PROMPTS, -0.001, PROBE["n_tokens"], PROBE["seed"])
    _, ranks = centroid_ranks(lm.model.get_input_embeddings().weight)
    for t in discovered[:10]:
        i = t.token_id
        assert (t.probe_count, t.centroid_rank) == (int(counts[i]), int(ranks[i]))
        assert t.probe_count >= 1  # the probe found every top-10 token
        expected = 0.7 * int(rows[i]) / len(DEFAULT_PROBE_PROMPTS) + 0.3 * max(0.0, 1 - int(ranks[i]) / 1024)
        assert t.score == pytest.approx(expected, abs=2e-6)  # stored rounded to 6 digits, computed in float32
        assert t.piece == lm.tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)


@pytest.mark.slow
def test_discovery_is_stable_and_cached(lm, discovered, probe_cache, monkeypatch):
    import anomaly.discovery as discovery

    path = discovery.discovery_cache_path(lm, cache_dir=probe_cache, **PROBE)
    assert path.is_file() and path.parent == probe_cache
    data = json.loads(path.read_text())
    assert data["settings"]["vocab_size"] == lm.vocab_size and data["settings"]["n_tokens"] == 12
    # A second run hits the cache: the probe must not run again.
    def no_probe(*args, **kwargs):
        raise AssertionError("the second run should read the cache")

    monkeypatch.setattr(discovery, "probe_counts", no_probe)
    assert discovery.discover_anomalous_tokens(lm, top=50, cache_dir=probe_cache, **PROBE) == discovered
    assert discovery.discover_anomalous_tokens(lm, top=10, cache_dir=probe_cache, **PROBE) == discovered[:10]
    monkeypatch.undo()
    # Recomputed without the cache, with the same seed: the same list.
    again = discovery.discover_anomalous_tokens(lm, top=50, cache=False, **PROBE)
    assert again == discovered


@pytest.mark.slow
def test_top_discovered_tokens_are_never_emitted_at_positive_temperature(discovered, ordinary, inverted):
    top10 = torch.tensor([t.token_id for t in discovered[:10]])
    tokens, _ = ordinary  # the same 16 prompts at T = 0.7
    emitted = int(torch.isin(tokens, top10).sum())
    assert emitted == 0, f"{emitted} of the {tokens.numel()} tokens drawn at T = 0.7 are top-10 anomalous tokens"
    inverted_tokens, _ = inverted  # ...while they make up much of what T = -0.001 draws
    assert int(torch.isin(inverted_tokens, top10).sum()) > inverted_tokens.numel() // 5


@pytest.mark.slow
def test_discovery_rejects_bad_settings(lm):
    from anomaly.discovery import discover_anomalous_tokens

    with pytest.raises(ValueError, match="negative"):
        discover_anomalous_tokens(lm, temperature=0.7, cache=False)
    with pytest.raises(ValueError, match="n_tokens"):
        discover_anomalous_tokens(lm, n_tokens=0, cache=False)


@pytest.mark.slow
def test_generation_core_raises_discovered_token_priors(lm, discovered, monkeypatch):
    import anomaly.prior
    from envs.config import EnvConfig
    from envs.generation_core import GenerationCore
    from envs.rewards import RewardConfig

    weights = torch.zeros(lm.vocab_size)
    weights[discovered[0].token_id] = 1.0
    monkeypatch.setattr(anomaly.prior, "discovered_token_weights", lambda lm: weights)
    no_embedder = RewardConfig(coherence=0.0, group_semantic=0.0)
    on = GenerationCore(EnvConfig(batch_size=1, group_size=1), lm, no_embedder)
    off = GenerationCore(EnvConfig(batch_size=1, group_size=1, discovered_anomalies=False), lm, no_embedder)
    i = discovered[0].token_id
    assert float(on.featurizer.token_prior[i]) == 1.0 and float(off.featurizer.token_prior[i]) == 0.0
    changed = torch.nonzero(on.featurizer.token_prior != off.featurizer.token_prior).flatten().tolist()
    assert changed == [i]


# =========================================================================== detector on the real model
def _anomaly_feature(detector, tokens, logp, ema_decay=0.8):
    """Per-token indicator (B, L) and the ``anomaly`` feature after each token (B, L): its bias-corrected EMA."""
    indicator = torch.stack([detector.indicator(tokens[:, j], logp[:, j]) for j in range(tokens.shape[1])], 1)
    running, ema, weight = [], torch.zeros(tokens.shape[0]), 0.0
    for j in range(tokens.shape[1]):
        ema = ema_decay * ema + (1 - ema_decay) * indicator[:, j]
        weight = ema_decay * weight + (1 - ema_decay)
        running.append(ema / weight)
    return indicator, torch.stack(running, 1)


@pytest.mark.slow
def test_detector_flags_negative_temperature_text_and_passes_ordinary_text(lm, discovered, ordinary, inverted):
    detector = AnomalyDetector(build_token_prior(lm, discovered))
    results = {}
    for name, (tokens, logp) in (("inverted", inverted), ("ordinary", ordinary)):
        texts = [lm.decode_text(row) for row in tokens]
        results[name] = (*_anomaly_feature(detector, tokens, logp), detector.text_scores(texts))
    neg, neg_running, neg_text = results["inverted"]
    pos, pos_running, pos_text = results["ordinary"]
    print(f"T=-0.001: running min {float(neg_running.min()):.3f}, indicator mean {float(neg.mean()):.3f}, "
          f"text {neg_text.round(2).tolist()}; T=0.7: running max {float(pos_running.max()):.3f}, indicator mean "
          f"{float(pos.mean()):.3f}, text max {float(pos_text.max()):.3f}")
    # T = -0.001: every row is anomalous at once and stays so (running = the anomaly feature's trajectory).
    assert float(neg_running.min()) > 0.9
    assert float(neg.mean()) > 0.95
    # The text rules agree on average; on 16 tokens some rows are too short for `glued_words` to reach
    # its floor of 12 words, which is why the per-token detector is the one the policy and guard read.
    assert float(neg_text.mean()) > 0.5
    # Ordinary T = 0.7: the anomaly feature never gets near the guard's threshold.
    assert float(pos_running.max()) < 0.5
    assert float(pos.mean()) < 0.1
    assert float(pos_text.max()) < 0.5


# =========================================================================== detector, crafted
class _StubTokenizer:
    name_or_path = "stub-detector-vocabulary"

    def __init__(self, pieces, special):
        self.pieces, self.all_special_ids = pieces, special

    def __len__(self):
        return len(self.pieces)

    def batch_decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=False):
        return ["".join(self.pieces[i] for i in row) for row in ids]


PIECES = ["<s>", " the", " cat", " sat", " on", " mat", "!!", "!", "@$", "^~", " мир", " hello", " 世界", " مرحبا",
          "\x00", "aб", " emeteries", "----"]
ID = {p: i for i, p in enumerate(PIECES)}


@pytest.fixture(scope="module")
def stub_detector():
    from types import SimpleNamespace

    discovered = torch.zeros(len(PIECES))
    discovered[ID[" emeteries"]] = 0.8
    stub_lm = SimpleNamespace(tokenizer=_StubTokenizer(PIECES, [0]), vocab_size=len(PIECES) + 2)  # 2 padded rows
    return AnomalyDetector(build_token_prior(stub_lm, discovered))


def _indicator(detector, piece, logp=-1.0):
    d = detector.indicator(torch.tensor([ID[piece]] * 2), torch.full((2,), logp))  # two identical rows: batched
    assert torch.equal(d[0], d[1])
    return float(d[0])


def test_token_prior_joins_flags_and_discoveries(stub_detector):
    prior = stub_detector.token_prior
    assert prior.shape == (len(PIECES) + 2,) and prior[-2:].tolist() == [0.0, 0.0]  # padded logits rows
    assert prior[ID["<s>"]] == 0.0 and prior[ID["\x00"]] == 1.0 and prior[ID["aб"]] == 1.0  # special; rules
    assert prior[ID[" emeteries"]] == pytest.approx(0.8)  # a plain word: only discovery raises it


def test_detector_clean_tokens_and_indicator(stub_detector):
    assert [_indicator(stub_detector, p) for p in (" the", " cat", " sat", " on", " mat")] == [0.0] * 5
    assert _indicator(stub_detector, " emeteries") == pytest.approx(0.8)  # token_prior = max(flags, discovered)
    assert _indicator(stub_detector, " cat", logp=-12.0) == 1.0  # surprise: p_base < 1e-4
    assert _indicator(stub_detector, " cat", logp=-9.0) == 0.0
    assert _indicator(stub_detector, "\x00") == 1.0


def test_detector_text_level_check():
    scores = AnomalyDetector.text_scores(["The cat sat on the mat.", "!!!!!!!!!!!!!!"])
    assert scores[0] < 0.3 and scores[1] == pytest.approx(1.0)
    assert AnomalyDetector.text_reasons(["@#$%^&*~|\\`@#$^~"])["symbol_soup"][0] == pytest.approx(1.0)


def test_detector_validates_inputs():
    with pytest.raises(ValueError, match="surprise_threshold"):
        AnomalyDetector(surprise_threshold=0.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        AnomalyDetector(torch.tensor([0.0, 2.0]))


def test_featurizer_anomaly_feature_is_the_detectors_indicator():
    """The featurizer delegates to the detector; the feature keeps its documented formula."""
    spec = FeatureSpec(horizon=8)
    prior = torch.tensor([0.0, 0.0, 0.6, 1.0])
    f = Featurizer(spec, 3, token_prior=prior)
    assert isinstance(f.detector, AnomalyDetector) and torch.equal(f.token_prior, prior)
    logits = torch.tensor([[4.0, 1.0, 0.0, -12.0]] * 3)
    col = spec.index("anomaly")
    expected_ema, weight = torch.zeros(3), 0.0
    for tokens in ([0, 2, 3], [1, 3, 0], [0, 0, 2]):
        f.observe(logits)
        tokens = torch.tensor(tokens)
        stats = f.update(tokens, torch.ones(3))
        surprise = -torch.log_softmax(logits, -1).gather(1, tokens.view(-1, 1)).squeeze(1)
        indicator = torch.maximum(prior[tokens], (surprise > spec.anomaly_surprise).float())
        assert torch.equal(stats.anomalous, indicator)
        expected_ema = 0.8 * expected_ema + 0.2 * indicator
        weight = 0.8 * weight + 0.2
        obs = f.observe(logits)
        assert torch.allclose(obs[:, col], expected_ema / weight)
    with pytest.raises(ValueError, match="anomaly_surprise"):
        Featurizer(spec, 1, detector=AnomalyDetector(prior, surprise_threshold=5.0))
    with pytest.raises(ValueError, match="not both"):
        Featurizer(spec, 1, token_prior=prior, detector=AnomalyDetector(prior, surprise_threshold=spec.anomaly_surprise))


# =========================================================================== guard rails
SPEC = FeatureSpec(horizon=8)
ANOMALY = SPEC.index("anomaly")


WIDE = ActionMapping(t_min=-8.0, t_max=8.0)  # wide enough that the scripted temperatures reach the guard as they are


class _Scripted(TemperaturePolicy):
    """A policy that returns scripted temperatures (one list per call) as actions of ``WIDE``, or raises.

    A non-finite temperature becomes the same non-finite action (a broken network's output), so the
    guard sees which rows failed."""

    name = "scripted"

    def __init__(self, script, mapping=WIDE):
        super().__init__(SPEC, mapping)
        self.script = list(script)

    def actions(self, obs, episode_start=None):
        value = self.script.pop(0)
        if isinstance(value, Exception):
            raise value
        t = torch.tensor(value, dtype=torch.float32)
        ok = torch.isfinite(t)
        return torch.where(ok, self.action_mapping.to_action(torch.where(ok, t, 0.0)), t)

    def to_config(self):
        return {"name": self.name}


def _obs(b, anomaly=0.0):
    obs = torch.zeros(b, SPEC.dim)
    obs[:, ANOMALY] = torch.as_tensor(anomaly)
    return obs


def test_guard_nan_policy_falls_back():
    guard = GuardedPolicy(_Scripted([[math.nan, 0.5, math.inf]]), fallback_temperature=0.7)
    t = guard.temperatures(_obs(3))
    assert t.tolist() == pytest.approx([0.7, 0.5, 0.7])
    assert guard.counters == {"clamp": 0, "rate_limit": 0, "anomaly_reset": 0, "fallback": 2}


def test_guard_raising_policy_and_bad_observations_fall_back():
    guard = GuardedPolicy(_Scripted([RuntimeError("boom"), [0.4, 0.4]]), fallback_temperature=0.6)
    with pytest.warns(RuntimeWarning, match="boom"):
        assert guard.temperatures(_obs(2)).tolist() == pytest.approx([0.6, 0.6])
    assert isinstance(guard.last_error, RuntimeError)
    obs = _obs(2)
    obs[1, 0] = math.nan  # a non-finite observation: that row falls back, the other goes on
    assert guard.temperatures(obs).tolist() == pytest.approx([0.4, 0.6])
    assert guard.counters["fallback"] == 3 and guard.decisions == 4


def test_guard_rate_limits_a_jump_from_minus_two_to_two():
    guard = GuardedPolicy(_Scripted([[-2.0], [2.0], [2.0], [2.0], [-2.0]]), max_delta=1.5, anomaly_threshold=None)
    out = [float(guard.temperatures(_obs(1))[0]) for _ in range(4)]
    assert out == pytest.approx([-2.0, -0.5, 1.0, 2.0])
    assert guard.counters == {"clamp": 0, "rate_limit": 2, "anomaly_reset": 0, "fallback": 0}
    # A new episode is not rate limited against the previous one.
    assert float(guard.temperatures(_obs(1), episode_start=torch.tensor([True]))[0]) == -2.0
    assert guard.counters["rate_limit"] == 2


def test_guard_clamps_out_of_bounds():
    guard = GuardedPolicy(_Scripted([[-5.0, 3.0, 0.5]]), t_min=-1.0, t_max=1.5, safe_range=(0.1, 0.7))
    assert guard.temperatures(_obs(3)).tolist() == pytest.approx([-1.0, 1.5, 0.5])
    assert guard.counters == {"clamp": 2, "rate_limit": 0, "anomaly_reset": 0, "fallback": 0}


def test_guard_anomaly_resets_into_safe_range_ignoring_rate_limit_and_holds():
    guard = GuardedPolicy(_Scripted([[-1.5, -1.5, 0.3]] * 5), max_delta=0.2, safe_range=(0.1, 0.7),
                          anomaly_threshold=0.5, hold=2)
    guard.temperatures(_obs(3))
    t = guard.temperatures(_obs(3, anomaly=[0.9, 0.1, 0.9]))  # rows 0 and 2 hit the detector
    assert t.tolist() == pytest.approx([0.1, -1.5, 0.3])  # row 2 already safe: no intervention
    assert guard.counters == {"clamp": 0, "rate_limit": 0, "anomaly_reset": 1, "fallback": 0}
    for _ in range(2):  # the anomaly is gone, but the hold keeps row 0 in the safe range for 2 more tokens
        t = guard.temperatures(_obs(3))
        assert t.tolist() == pytest.approx([0.1, -1.5, 0.3])
    # each held step: the rate limit moved -1.5 to -0.1 first (counted), then the hold moved it to 0.1 (counted)
    assert guard.counters == {"clamp": 0, "rate_limit": 2, "anomaly_reset": 3, "fallback": 0}
    t = guard.temperatures(_obs(3))  # the hold is over: rate limited from the safe value
    assert t.tolist() == pytest.approx([-0.1, -1.5, 0.3])
    assert guard.counters == {"clamp": 0, "rate_limit": 3, "anomaly_reset": 3, "fallback": 0}


def test_guard_counts_exactly_over_a_batch_run():
    script = [[3.0, -3.0, math.nan, 0.5]] * 3
    guard = GuardedPolicy(_Scripted(script), t_min=-2.0, t_max=2.0, max_delta=None, anomaly_threshold=0.5,
                          safe_range=(0.1, 0.7))
    for anomaly in (0.0, 0.0, 1.0):
        guard.temperatures(_obs(4, anomaly=anomaly))
    # clamp: rows 0, 1 on 3 steps = 6; fallback: row 2 on 3 steps = 3;
    # anomaly reset on the last step: rows 0 (2.0), 1 (-2.0), 2 (fallback 0.7 is inside) -> 2
    assert guard.counters == {"clamp": 6, "rate_limit": 0, "anomaly_reset": 2, "fallback": 3}
    assert guard.decisions == 12 and tuple(guard.counters) == GUARD_COUNTERS
    guard.reset_counters()
    assert guard.counters == dict.fromkeys(GUARD_COUNTERS, 0)


def test_guard_applies_the_mapping_rate_limit_first_and_has_the_last_word():
    """The samplers' order: the policy's temperature as the env applies it (its mapping's rate limit), then the
    guard; the guard's own mapping has no rate limit, so a reset is never held back again."""
    from dataclasses import replace

    mapping = ActionMapping(t_min=-2.0, t_max=2.0, max_delta=0.2)
    guard = GuardedPolicy(_Scripted([[-1.5]] * 2, mapping=mapping), max_delta=None, safe_range=(0.1, 0.7))
    assert guard.action_mapping == replace(mapping, max_delta=None)
    prev, pos = SPEC.index("prev_temperature"), SPEC.index("position")
    obs = _obs(1)
    obs[:, prev], obs[:, pos] = 0.7, 0.5  # mid-episode, the previous token was drawn at T = 0.7
    assert guard.temperatures(obs).tolist() == pytest.approx([0.5])  # asked -1.5, the mapping allows 0.7 - 0.2
    obs = _obs(1, anomaly=0.9)
    obs[:, prev], obs[:, pos] = -1.5, 0.5
    a = guard.actions(obs)  # the detector fired: reset into the safe range
    applied = guard.action_mapping.to_temperature(a, previous=obs[:, prev], first_step=obs[:, pos] == 0)
    held_back = mapping.to_temperature(a, previous=obs[:, prev], first_step=obs[:, pos] == 0)
    assert applied.tolist() == pytest.approx([0.1], abs=1e-6) and held_back.tolist() == pytest.approx([-1.3])
    assert guard.counters == {"clamp": 0, "rate_limit": 0, "anomaly_reset": 1, "fallback": 0}


def test_guard_disabled_passes_through():
    guard = GuardedPolicy(_Scripted([[5.0, -5.0]]), enabled=False)
    assert guard.temperatures(_obs(2, anomaly=1.0)).tolist() == [5.0, -5.0]
    assert guard.counters == dict.fromkeys(GUARD_COUNTERS, 0)


def test_guard_wraps_baselines_predict_and_serialises():
    pid = make_policy("pid", SPEC)
    guard = GuardedPolicy(pid, max_delta=0.3, safe_range=(-0.3, -0.1))
    actions, state = guard.predict(np.zeros((2, SPEC.dim), np.float32), episode_start=np.array([True, True]))
    assert actions.shape == (2, 1) and state is None and np.all(np.abs(actions) <= 1)
    config = guard.to_config()
    assert config["name"] == "guarded" and config["policy"] == pid.to_config()
    assert json.loads(json.dumps(config)) == config
    rebuilt = GuardedPolicy.from_config(config, SPEC)
    assert rebuilt.to_config() == config
    assert rebuilt.label.startswith("Guarded(PID")


def test_guard_wraps_an_action_policy_row_by_row():
    """A policy that acts directly (a LearnedPolicy, an exported one): NaN actions fall back per row."""

    class ActionOnly(TemperaturePolicy):
        def actions(self, obs, episode_start=None):
            return torch.tensor([0.0, math.nan])

    guard = GuardedPolicy(ActionOnly(SPEC, ActionMapping(t_min=-2.0, t_max=2.0)), fallback_temperature=0.5)
    assert guard.temperatures(_obs(2)).tolist() == pytest.approx([0.0, 0.5])
    assert guard.counters["fallback"] == 1


def test_guard_validates_arguments():
    pid = make_policy("pid", SPEC)
    with pytest.raises(ValueError, match="safe_range"):
        GuardedPolicy(pid, safe_range=(0.7, 0.1))
    with pytest.raises(ValueError, match="fallback_temperature"):
        GuardedPolicy(pid, fallback_temperature=5.0)
    with pytest.raises(ValueError, match="max_delta"):
        GuardedPolicy(pid, max_delta=-1.0)
    with pytest.raises(TypeError, match="feature_spec"):
        GuardedPolicy(object())


def test_resolve_guard_reads_every_kind_of_guard_argument():
    """One resolver for bool / None / dict / GuardSettings, on a base (an export's block) or on none."""
    mapping = ActionMapping(t_min=-2.0, t_max=-0.1)
    on = resolve_guard(True, mapping)
    assert on == GuardSettings(t_min=-2.0, t_max=-0.1, safe_range=(-0.1, -0.1), fallback_temperature=-0.1)
    assert on.enabled and on.max_delta == 0.5 and on.hold == 8 and on.anomaly_threshold == 0.5
    assert resolve_guard(None, mapping).enabled is False and resolve_guard(False, mapping).enabled is False
    tuned = resolve_guard({"max_delta": 1, "hold": 4.0, "anomaly_threshold": None}, mapping)
    assert (tuned.enabled, tuned.max_delta, tuned.hold, tuned.anomaly_threshold) == (True, 1.0, 4, None)
    assert resolve_guard({"max_delta": math.inf, "hold": None}, mapping).max_delta is None
    assert resolve_guard({"enabled": False}, mapping).enabled is False
    assert resolve_guard(GuardSettings(max_delta=0.2), mapping) == replace(on, max_delta=0.2)
    # on a base: None keeps it, False switches it off, True on, a dict updates it
    base = replace(tuned, enabled=False)
    assert resolve_guard(None, mapping, base=base) == base
    assert resolve_guard(True, mapping, base=base) == tuned
    assert resolve_guard({"hold": 2}, mapping, base=base) == replace(tuned, hold=2)
    assert resolve_guard(False, mapping, base=tuned) == base
    assert on.to_dict()["safe_range"] == [-0.1, -0.1] and json.loads(json.dumps(on.to_dict())) == on.to_dict()
    with pytest.raises(dataclasses.FrozenInstanceError):
        on.hold = 3  # type: ignore[misc]


@pytest.mark.parametrize("guard, error, message", [
    ({"max_delt": 0.3}, ValueError, r"guard: unknown setting 'max_delt'; did you mean 'max_delta'\? \(valid: t_min"),
    ({"hold": -1}, ValueError, "guard hold=-1 must be a whole number of tokens >= 0"),
    ({"hold": 2.5}, ValueError, "guard hold=2.5 must be a whole number"),
    ({"t_min": "low"}, ValueError, "guard t_min='low' must be a finite number"),
    ({"enabled": 1}, ValueError, "guard enabled=1 must be true or false"),
    ({"max_delta": math.nan}, ValueError, "guard max_delta=nan must be a number > 0, or None"),
    ({"safe_range": [0.1]}, ValueError, r"guard safe_range=\[0.1\] must be a pair \(lo, hi\)"),
    ({"anomaly_threshold": True}, ValueError, "guard anomaly_threshold=True must be a finite number, or None"),
    ({"t_min": 1.0, "t_max": 0.5}, ValueError, "guard bounds t_min=1.0 >= t_max=0.5"),
    ({"fallback_temperature": 9.0}, ValueError, r"guard fallback_temperature=9.0 must lie in the bounds \[t_min=-1"),
    ("on", TypeError, "guard='on' must be True"),
    (1, TypeError, "guard=1 must be True"),
])
def test_resolve_guard_names_the_bad_setting_in_one_line(guard, error, message):
    with pytest.raises(error, match=message) as info:
        resolve_guard(guard, ActionMapping())
    assert "\n" not in str(info.value)


def test_apply_guard_builds_the_resolved_settings():
    pid = make_policy("pid", SPEC)
    guarded = apply_guard(pid, GuardSettings(max_delta=0.3, hold=2))
    assert isinstance(guarded, GuardedPolicy) and guarded.settings == resolve_guard({"max_delta": 0.3, "hold": 2},
                                                                                   pid.action_mapping)
    assert (guarded.max_delta, guarded.hold, guarded.safe_range) == (0.3, 2, (0.1, 0.7))
    assert apply_guard(pid, {"enabled": False}) is pid and apply_guard(pid, None) is pid
    assert apply_guard(guarded, False) is pid and apply_guard(guarded, True) is guarded
    with pytest.raises(ValueError, match="already a GuardedPolicy"):
        apply_guard(guarded, GuardSettings())


# =========================================================================== the guard in a real generate call
@pytest.mark.slow
def test_default_guard_breaks_the_negative_temperature_stream_in_generate(lm, discovered):
    """transformers ``generate`` with a T = -0.001 policy: without the guard every token is the model's
    least likely one ("emeteries" ...); with the sampler's default guard the detector fires after the
    first draw, the guard resets into its safe range, and most tokens are ordinary again."""
    from transformers import LogitsProcessorList

    from policies.baselines import FixedTemperature
    from samplers.hf import PolicyLogitsProcessor

    detector = AnomalyDetector(build_token_prior(lm, discovered))
    spec, mapping = FeatureSpec(), ActionMapping(t_min=-1.0, t_max=2.4)
    enc = lm.encode(["Temperature is a concept", "The history of the printing press"], chat=False)
    width = max(map(len, enc))
    input_ids = torch.tensor([[lm.pad_token_id] * (width - len(x)) + x for x in enc])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in enc])
    runs = {}
    for guard in (False, True):
        proc = PolicyLogitsProcessor(FixedTemperature(spec, mapping, t=-0.001), token_prior=detector.token_prior,
                                     guard=guard)
        torch.manual_seed(0)
        with torch.inference_mode():
            out = lm.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                    top_k=0, top_p=1.0, max_new_tokens=16, min_new_tokens=16,
                                    pad_token_id=lm.pad_token_id, logits_processor=LogitsProcessorList([proc]),
                                    return_dict_in_generate=True, output_logits=True)
        new = out.sequences[:, width:]  # (2, 16)
        logp = torch.stack([torch.log_softmax(z.float(), -1).gather(1, new[:, i:i + 1]).squeeze(1)
                            for i, z in enumerate(out.logits)], 1)  # (2, 16) base log-probs of the draws
        indicator, _ = _anomaly_feature(detector, new, logp)
        runs[guard] = (proc, float((indicator > 0.5).float().mean()), [lm.decode_text(r) for r in new])
    raw_proc, raw_rate, raw_text = runs[False]
    safe_proc, safe_rate, safe_text = runs[True]
    print(f"anomalous share without guard {raw_rate:.2f} {raw_text}; with guard {safe_rate:.2f} {safe_text}; "
          f"counters {safe_proc.guard_counters}")
    torch.testing.assert_close(raw_proc.temperature_trace(), torch.full((2, 16), -0.001))
    trace = safe_proc.temperature_trace()
    assert trace[:, 0].tolist() == pytest.approx([-0.001, -0.001], abs=1e-6)  # nothing drawn yet: the policy's own T
    torch.testing.assert_close(trace[:, 1], torch.full((2,), 0.1))  # one argmin draw, the detector fires, reset to 0.1
    assert safe_proc.guard_counters["anomaly_reset"] >= 2 and raw_proc.guard_counters["decisions"] == 0
    # after a hold the EMA needs ~3 anomalous draws to pass 0.5 again, then 8 held tokens: about 3 / 11
    assert raw_rate > 0.9 and safe_rate < 0.4
