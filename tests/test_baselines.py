"""Pins the baseline temperature policies: exact formulas, controller sequences, predict(), registry.

Observations are built with the real featurizer from logits = log p (distribution features),
then history columns (quality, anomaly, last_surprise, position) are set by hand. No LM.
"""

import json
import math

import numpy as np
import pytest
import torch

from policies import (
    BASELINE_NAMES,
    ActionMapping,
    EntropyDynamicTemperature,
    FeatureSpec,
    Featurizer,
    FixedTemperature,
    PIDController,
    SurpriseController,
    TemperaturePolicy,
    all_baselines,
    make_policy,
    policy_from_config,
)

SPEC = FeatureSpec(categories=("code", "creative_writing"))  # the category one-hot is there for the table
MAPPING = ActionMapping(t_min=-2.0, t_max=2.0)  # linear, [-2, 2]
LN2 = math.log(2.0)

PEAKED = [0.01, 0.02, 0.03, 0.94]
FLATTISH = [0.22, 0.23, 0.24, 0.31]
UNIFORM = [0.25, 0.25, 0.25, 0.25]


def make_obs(probs, **columns):
    """Observations (B, F) for probability rows (B, V), with history columns overwritten by name.

    ``columns`` values are scalars or (B,) sequences.
    """
    p = torch.as_tensor(probs, dtype=torch.float32)
    if p.ndim == 1:
        p = p.unsqueeze(0)
    obs = Featurizer(SPEC, p.shape[0]).observe(p.log())  # (B, F), a fresh history
    for name, value in columns.items():
        obs[:, SPEC.index(name)] = torch.as_tensor(value, dtype=torch.float32)
    return obs


def history_obs(batch=1, **columns):
    """Observations over the uniform 4-token distribution with the given history columns."""
    return make_obs([UNIFORM] * batch, **columns)


def temps(policy, obs, episode_start=None):
    if episode_start is not None:
        episode_start = torch.as_tensor(episode_start, dtype=torch.bool).reshape(-1)
    return policy.temperatures(obs, episode_start)


# --------------------------------------------------------------------------- stateless formulas


def test_featurizer_inputs_are_the_textbook_values():
    obs = make_obs([PEAKED, FLATTISH, UNIFORM])
    torch.testing.assert_close(obs[:, SPEC.index("entropy")], torch.tensor([0.287652, 1.376709, math.log(4)]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(obs[:, SPEC.index("median_top_prob")], torch.tensor([0.025, 0.235, 0.25]),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("name, expected", [
    ("maxprob", [0.124, 0.376, 0.4]),  # 0.5 - 0.4 * [0.94, 0.31, 0.25]
    ("entropy", [0.330121, 1.201367, 1.209035]),  # 0.1 + 0.8 * [0.287652, 1.376709, ln 4]
    ("median", [0.49, 0.406, 0.4]),  # 0.5 - 0.4 * [0.025, 0.235, 0.25]
    # 0.3 - 0.3 * max p + 0.4 * H: 0.3 - 0.282 + 0.115061, 0.3 - 0.093 + 0.550684, 0.3 - 0.075 + 0.554518
    ("combined", [0.133061, 0.757684, 0.779518]),
])
def test_confidence_rules(name, expected):
    policy = make_policy(name, SPEC, MAPPING)
    out = temps(policy, make_obs([PEAKED, FLATTISH, UNIFORM]))
    torch.testing.assert_close(out, torch.tensor(expected), atol=1e-5, rtol=0)


def test_edt_values():
    # T = T0 * N^(theta / H) = exp(theta / H * ln 0.8), ln 0.8 = -0.2231436:
    #   PEAKED   H = 0.287652: 1.5 / 0.287652 = 5.214638 -> exp(-1.163614) = 0.312356
    #   FLATTISH H = 1.376709: 1.5 / 1.376709 = 1.089556 -> exp(-0.243128) = 0.784172
    #   UNIFORM  H = ln 4    : 1.5 / 1.386294 = 1.082021 -> exp(-0.241446) = 0.785491
    obs = make_obs([PEAKED, FLATTISH, UNIFORM])
    torch.testing.assert_close(temps(make_policy("edt", SPEC, MAPPING), obs), torch.tensor([0.312356, 0.784172, 0.785491]),
                               atol=1e-5, rtol=0)
    # theta = 1.0, T0 = 0.8, uniform: 0.8 * 0.8^(1 / 1.386294) = 0.8 * exp(-0.160964) = 0.8 * 0.851324 = 0.681059
    out = temps(make_policy("edt:theta=1.0,t0=0.8", SPEC, MAPPING), make_obs([UNIFORM]))
    torch.testing.assert_close(out, torch.tensor([0.681059]), atol=1e-5, rtol=0)


def test_edt_zero_entropy_is_greedy_without_nan():
    # One finite token: H = 0 -> floored to 1e-6 -> 0.8^(1.5e6) underflows to exactly 0 (greedy).
    logits = torch.tensor([[0.0, -math.inf, -math.inf], [50.0, 0.0, 0.0]])
    obs = Featurizer(SPEC, 2).observe(logits)
    out = temps(make_policy("edt", SPEC, MAPPING), obs)
    assert torch.isfinite(out).all()
    assert out[0].item() == 0.0 and 0.0 <= out[1].item() < 1e-6


def test_dynatemp_values():
    # llama.cpp: min_T = max(0, 0.8 - 0.5) = 0.3, max_T = 1.3, T = 0.3 + 1.0 * (H / ln 4)^exponent
    #   PEAKED   H / ln 4 = 0.287652 / 1.386294 = 0.207496 -> 0.507496 (exponent 2: 0.3 + 0.043055 = 0.343055)
    #   FLATTISH H / ln 4 = 1.376709 / 1.386294 = 0.993086 -> 1.293086 (exponent 2: 0.3 + 0.986220 = 1.286220)
    #   UNIFORM  1                                          -> 1.3      (exponent 2: 1.3)
    obs = make_obs([PEAKED, FLATTISH, UNIFORM])
    torch.testing.assert_close(temps(make_policy("dynatemp", SPEC, MAPPING), obs), torch.tensor([0.507496, 1.293086, 1.3]),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(temps(make_policy("dynatemp:exponent=2", SPEC, MAPPING), obs),
                               torch.tensor([0.343055, 1.286220, 1.3]), atol=1e-5, rtol=0)
    # t = 0.3, delta = 0.5: min_T = max(0, -0.2) = 0, max_T = 0.8 -> 0.8 * 0.207496 = 0.165997
    torch.testing.assert_close(temps(make_policy("dynatemp:t=0.3,delta=0.5", SPEC, MAPPING), make_obs([PEAKED])),
                               torch.tensor([0.165997]), atol=1e-5, rtol=0)


def test_fixed_any_real_value():
    obs = make_obs([PEAKED, UNIFORM])
    assert temps(make_policy("fixed:0.7", SPEC, MAPPING), obs).tolist() == pytest.approx([0.7, 0.7])
    assert temps(make_policy("fixed:-0.5", SPEC, MAPPING), obs).tolist() == [-0.5, -0.5]
    assert temps(make_policy("fixed:t=-1.25", SPEC, MAPPING), obs).tolist() == [-1.25, -1.25]
    assert temps(make_policy("greedy", SPEC, MAPPING), obs).tolist() == [0.0, 0.0]
    assert temps(make_policy("fixed", SPEC, MAPPING), obs).tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- PID


def run_pid(policy, quality, anomaly=None, starts=None):
    """One row: feed quality[t] / anomaly[t] / episode_start[t] step by step; the temperatures (T,)."""
    n = len(quality)
    anomaly = anomaly or [0.0] * n
    starts = starts or [t == 0 for t in range(n)]
    out = [temps(policy, history_obs(quality=q, anomaly=a), [s]).item()
           for q, a, s in zip(quality, anomaly, starts)]
    return out


def test_pid_defaults_sequence():
    # base -0.5, kp 0.1, ki 0.01, kd 0.05, target 0.7:
    #   t0 q=1.0: e=-0.3, I=-0.3, D=0 (e_prev := e)   -> -0.5 - 0.03 - 0.003            = -0.533
    #   t1 q=0.5: e= 0.2, I=-0.1, D=0.05 * 0.5=0.025  -> -0.5 + 0.02 - 0.001 + 0.025    = -0.456
    #   t2 q=0.5: e= 0.2, I= 0.1, D=0                 -> -0.5 + 0.02 + 0.001            = -0.479
    out = run_pid(make_policy("pid", SPEC, MAPPING), [1.0, 0.5, 0.5])
    assert out == pytest.approx([-0.533, -0.456, -0.479], abs=1e-6)


PID_GAINS = dict(base=-0.5, kp=1.0, ki=0.1, kd=0.5)  # large gains so limits bind; other params default
PID_QUALITY = [1.0, 1.0, 0.0, 0.0, 0.5, 0.0, 1.0, 0.9]
PID_ANOMALY = [0.0, 0.0, 0.0, 0.8, 0.3, 0.0, 0.0, 0.0]
PID_STARTS = [True, False, False, False, False, False, False, True]
# target 0.7, bounds [-2, -0.1], max_delta 0.2, safe range [-0.3, -0.1], anomaly threshold 0.5.
# u = -0.5 + e + 0.1 I + 0.5 (e - e_prev); then rate limit vs T_prev, clamp to bounds, anomaly reset.
PID_EXPECTED = [
    -0.83,  # t0 start, e=-0.3, I=-0.3, D=0: -0.5-0.3-0.03 = -0.83 (first step: no rate limit)
    -0.86,  # t1 e=-0.3, I=-0.6, D=0: -0.86, inside [-1.03, -0.63]
    -0.66,  # t2 e=0.7, I=0.1, D=0.5: -0.5+0.7+0.01+0.5 = 0.71 -> rate limit -0.86+0.2 = -0.66
    -0.3,  # t3 e=0.7, I=0.8, D=0: 0.28 -> rate -0.46 -> anomaly 0.8: clamp(-0.46, -0.3, -0.1) = -0.3
    #        (a jump of 0.36 from -0.66: the reset ignores the rate limit; history and e_prev cleared)
    -0.28,  # t4 e=0.2, I=0.2 (history restarted), D=0 (e_prev := e, not 0.7): -0.5+0.2+0.02 = -0.28
    -0.1,  # t5 e=0.7, I=0.9, D=0.25: 0.54 -> rate [-0.48, -0.08] -> -0.08 -> bounds clamp -> -0.1
    -0.3,  # t6 e=-0.3, I=0.6, D=-0.5: -0.5-0.3+0.06-0.5 = -1.24 -> rate limit -0.1-0.2 = -0.3
    -0.72,  # t7 episode start, e=-0.2, I=-0.2, D=0: -0.72 (no rate limit against -0.3)
]


def test_pid_scripted_sequence():
    policy = PIDController(SPEC, MAPPING, **PID_GAINS)
    out = run_pid(policy, PID_QUALITY, PID_ANOMALY, PID_STARTS)
    assert out == pytest.approx(PID_EXPECTED, abs=1e-6)


def test_pid_first_step_clamped_to_bounds():
    # base -1.9, q=1: e=-0.3 -> -1.9 - 0.3 - 0.03 = -2.23 -> clamp to t_lo = -2 (not rate limited).
    policy = PIDController(SPEC, MAPPING, **{**PID_GAINS, "base": -1.9})
    assert run_pid(policy, [1.0]) == pytest.approx([-2.0])


def test_pid_integral_window_slides():
    # kp = kd = 0, ki = 1, window 2, no rate limit: T = -1.5 + e_(t-1) + e_t
    # e = 0.7 - q = [0.2, 0.4, 0.6] -> [-1.3, -0.9, -0.5]
    policy = make_policy("pid:kp=0,kd=0,ki=1,base=-1.5,window=2,max_delta=none", SPEC, MAPPING)
    assert policy.params["max_delta"] is None and policy.params["window"] == 2
    assert run_pid(policy, [0.5, 0.3, 0.1]) == pytest.approx([-1.3, -0.9, -0.5], abs=1e-6)


def test_pid_rows_are_independent():
    qa, aa, sa = PID_QUALITY, PID_ANOMALY, PID_STARTS
    qb = [0.2, 0.9, 0.95, 0.1, 0.4, 0.7, 0.6, 0.5]
    ab = [0.0, 0.0, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0]
    sb = [True, False, False, True, False, False, False, False]
    alone_a = run_pid(PIDController(SPEC, MAPPING, **PID_GAINS), qa, aa, sa)
    alone_b = run_pid(PIDController(SPEC, MAPPING, **PID_GAINS), qb, ab, sb)
    both = PIDController(SPEC, MAPPING, **PID_GAINS)
    out = torch.stack([
        temps(both, history_obs(2, quality=[qa[t], qb[t]], anomaly=[aa[t], ab[t]]), [sa[t], sb[t]])
        for t in range(len(qa))
    ])  # (T, 2)
    assert out[:, 0].tolist() == pytest.approx(PID_EXPECTED, abs=1e-6)
    assert out[:, 0].tolist() == pytest.approx(alone_a, abs=1e-6)
    assert out[:, 1].tolist() == pytest.approx(alone_b, abs=1e-6)


def test_pid_state_resets_on_batch_size_change_and_reset():
    policy = PIDController(SPEC, MAPPING, **PID_GAINS)
    run_pid(policy, PID_QUALITY[:3], starts=[True, False, False])
    # New batch size: every row starts afresh (no rate limit, e_prev := e) even without episode_start.
    assert temps(policy, history_obs(2, quality=0.9)).tolist() == pytest.approx([-0.72, -0.72], abs=1e-6)
    policy.reset()
    assert temps(policy, history_obs(2, quality=0.9)).tolist() == pytest.approx([-0.72, -0.72], abs=1e-6)


def test_pid_positive_preset():
    policy = make_policy("pid-positive", SPEC, MAPPING)
    assert isinstance(policy, PIDController) and policy.name == "pid-positive"
    assert policy.params == PIDController.positive(SPEC, MAPPING).params
    # base 0.7, kp -0.5, ki -0.02, kd -0.1, target 0.7:
    #   t0 q=1.0: e=-0.3, I=-0.3: 0.7 + 0.15 + 0.006                  = 0.856
    #   t1 q=0.2: e= 0.5, I= 0.2, D=-0.1*0.8: 0.7 - 0.25 - 0.004 - 0.08 = 0.366 -> rate limit 0.856-0.2 = 0.656
    #   t2 q=0.2, anomaly 0.9: e=0.5, I=0.7: 0.7-0.25-0.014 = 0.436 -> safe range [0.1, 0.3] -> 0.3
    out = run_pid(policy, [1.0, 0.2, 0.2], [0.0, 0.0, 0.9])
    assert out == pytest.approx([0.856, 0.656, 0.3], abs=1e-6)


# --------------------------------------------------------------------------- surprise controller


def test_surprise_controller_sequence():
    # tau 5 bits, eta 0.1, T_init 1, bounds [0.05, 2]: T_t = clamp(T_(t-1) - 0.1 (s_t - 5))
    bits = [0.0, 7.0, 3.0, 0.0, 0.0, 0.0, 20.0, 20.0, 0.0, 4.0]
    position = [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    starts = [True, False, False, False, False, False, False, False, True, False]
    expected = [
        1.0,  # position 0: T_init, no update
        0.8,  # 1.0 - 0.1 * 2
        1.0,  # 0.8 + 0.2
        1.5,  # 1.0 + 0.5
        2.0,  # 1.5 + 0.5
        2.0,  # 2.5 -> clamp 2.0 (the state is the clamped value)
        0.5,  # 2.0 - 1.5
        0.05,  # 0.5 - 1.5 = -1.0 -> clamp 0.05
        1.0,  # episode start, position 0: T_init
        1.1,  # 1.0 + 0.1
    ]
    policy = make_policy("surprise", SPEC, MAPPING)
    out = [temps(policy, history_obs(last_surprise=b * LN2, position=pos / SPEC.horizon), [s]).item()
           for b, pos, s in zip(bits, position, starts)]
    assert out == pytest.approx(expected, abs=1e-5)


def test_surprise_rows_independent_and_restart_from_t_init():
    policy = SurpriseController(SPEC, MAPPING)
    t0 = temps(policy, history_obs(2, position=0.0), [True, True])
    t1 = temps(policy, history_obs(2, last_surprise=[7 * LN2, 3 * LN2], position=1 / 64))
    # Row 1 restarts at position 1 (a policy plugged in mid-episode): T_prev = T_init.
    t2 = temps(policy, history_obs(2, last_surprise=[7 * LN2, 7 * LN2], position=2 / 64), [False, True])
    assert t0.tolist() == [1.0, 1.0]
    assert t1.tolist() == pytest.approx([0.8, 1.2])
    assert t2.tolist() == pytest.approx([0.6, 0.8])


# --------------------------------------------------------------------------- predict()


def random_obs(batch=64, vocab=50, seed=0):
    """Varied distributions (sharp to flat, some masked tokens) and random history columns."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1.3, batch).view(-1, 1)  # (B, 1): flat ... very peaked
    logits = torch.randn(batch, vocab, generator=g) * scale
    logits[::5, vocab // 2:] = -math.inf
    obs = Featurizer(SPEC, batch).observe(logits)
    obs[:, SPEC.index("quality")] = torch.rand(batch, generator=g)
    obs[:, SPEC.index("anomaly")] = torch.rand(batch, generator=g)
    obs[:, SPEC.index("last_surprise")] = torch.rand(batch, generator=g) * 15
    obs[:, SPEC.index("position")] = torch.randint(0, 3, (batch,), generator=g).float() / SPEC.horizon
    return obs


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_predict_shapes_and_inverse_mapping(name):
    reference = make_policy(name, SPEC, MAPPING)  # answers temperatures()
    policy = make_policy(name, SPEC, MAPPING)  # answers predict(), same history
    for step in range(3):
        obs_np = random_obs(seed=step).numpy()
        before = obs_np.copy()
        starts = np.full(obs_np.shape[0], step == 0)
        expected = temps(reference, torch.from_numpy(before), starts)  # (B,)
        actions, state = policy.predict(obs_np, state=None, episode_start=starts)
        assert state is None
        assert actions.shape == (obs_np.shape[0], 1) and actions.dtype == np.float32
        assert np.all(actions >= -1) and np.all(actions <= 1)
        inside = (expected >= MAPPING.t_min) & (expected <= MAPPING.t_max)
        assert inside.any()
        recovered = MAPPING.to_temperature(torch.from_numpy(actions[:, 0]))  # (B,)
        torch.testing.assert_close(recovered[inside], expected[inside], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(obs_np, before)  # input untouched


def test_predict_single_observation_and_torch_input():
    policy = make_policy("edt", SPEC, MAPPING)
    obs = make_obs([PEAKED])
    action, _ = policy.predict(obs[0].numpy())
    assert action.shape == (1,) and action.dtype == np.float32
    assert action[0] == pytest.approx(0.312356 / 2, abs=1e-5)  # linear [-2, 2]: a = T / 2
    action_t, _ = policy.predict(obs)  # a torch (B, F) works too
    assert action_t.shape == (1, 1) and action_t[0, 0] == pytest.approx(action[0])


def test_predict_with_inverse_mapping():
    mapping = ActionMapping(kind="inverse")
    policy = make_policy("fixed:0.7", SPEC, mapping)
    actions, _ = policy.predict(make_obs([PEAKED, UNIFORM]).numpy())
    assert mapping.to_temperature(torch.from_numpy(actions[:, 0])).tolist() == pytest.approx([0.7, 0.7], abs=1e-5)


def test_greedy_survives_the_linear_mapping_round_trip():
    # T = 0 -> action -> T used to come back as -6e-8 for [-1, 2.4] in float32: argmin, the least likely token.
    for mapping in (ActionMapping(t_min=-1.0, t_max=2.4), ActionMapping(), ActionMapping(t_min=-0.3, t_max=1.7)):
        actions, _ = make_policy("greedy", SPEC, mapping).predict(make_obs([PEAKED]).numpy())
        assert mapping.to_temperature(torch.from_numpy(actions[:, 0])).tolist() == [0.0]
        assert mapping.to_temperature(torch.tensor([-1.0, 1.0])).tolist() == pytest.approx([mapping.t_min, mapping.t_max])


def test_predict_rejects_wrong_width():
    policy = make_policy("edt", SPEC, MAPPING)
    with pytest.raises(ValueError, match=f"\\(B, {SPEC.dim}\\)"):
        policy.predict(np.zeros((2, SPEC.dim + 1), dtype=np.float32))
    with pytest.raises(ValueError, match="episode_start"):
        make_policy("pid", SPEC, MAPPING).predict(np.zeros((2, SPEC.dim), dtype=np.float32), episode_start=[True])


# --------------------------------------------------------------------------- ranges


def test_every_baseline_sign_and_range():
    vocab = 50
    ln_v = math.log(vocab)
    ranges = {
        "fixed": (1.0, 1.0), "greedy": (0.0, 0.0), "pid": (-2.0, -0.1), "pid-positive": (0.1, 1.5),
        "edt": (0.0, 1.0), "maxprob": (0.1, 0.5), "entropy": (0.1, 0.1 + 0.8 * ln_v), "median": (0.1, 0.5),
        "combined": (0.0, 0.3 + 0.4 * ln_v), "dynatemp": (0.3, 1.3), "surprise": (0.05, 2.0),
        "hotcold": (0.5, 1.5), "table": (0.7, 0.7),
    }
    assert set(ranges) == set(BASELINE_NAMES)
    for policy in all_baselines(SPEC, MAPPING):
        lo, hi = ranges[policy.name]
        seen = []
        for step in range(12):
            obs = random_obs(vocab=vocab, seed=step)
            starts = torch.rand(obs.shape[0], generator=torch.Generator().manual_seed(100 + step)) < 0.1
            t = temps(policy, obs, starts)
            assert t.shape == (obs.shape[0],) and t.dtype == torch.float32 and torch.isfinite(t).all(), policy.name
            seen.append(t)
        t = torch.cat(seen)
        assert t.min() >= lo - 1e-6 and t.max() <= hi + 1e-6, (policy.name, t.min().item(), t.max().item())
        if lo < hi:
            assert t.max() - t.min() > 1e-3, f"{policy.name} did not react to its inputs"


# --------------------------------------------------------------------------- registry and config


@pytest.mark.parametrize("name", BASELINE_NAMES)
def test_config_round_trip_through_json(name):
    policy = make_policy(name, SPEC, MAPPING)
    assert isinstance(policy, TemperaturePolicy) and policy.name == name and policy.label
    config = json.loads(json.dumps(policy.to_config()))
    assert config["name"] == name
    rebuilt = policy_from_config(config, SPEC, MAPPING)
    assert type(rebuilt) is type(policy) and rebuilt.params == policy.params and rebuilt.name == name
    obs = random_obs()
    torch.testing.assert_close(temps(rebuilt, obs), temps(policy, obs), atol=0, rtol=0)


def test_labels():
    assert make_policy("edt", SPEC, MAPPING).label == "EDT(T0=1.0, θ=1.5)"
    assert make_policy("greedy", SPEC, MAPPING).label == "Greedy(T=0)"
    assert make_policy("fixed:-0.5", SPEC, MAPPING).label == "Fixed(T=-0.5)"
    assert make_policy("edt:n=0.7", SPEC, MAPPING).label == "EDT(T0=1.0, θ=1.5, N=0.7)"


def test_spec_parameters_are_parsed():
    edt = make_policy("edt:theta=1.0,t0=0.8", SPEC, MAPPING)
    assert isinstance(edt, EntropyDynamicTemperature)
    assert edt.params == {"t0": 0.8, "theta": 1.0, "N": 0.8, "h_floor": 1e-6}
    assert make_policy(" EDT : N=0.5 ", SPEC, MAPPING).params["N"] == 0.5  # case-insensitive names and keys
    assert make_policy("fixed:-0.5", SPEC, MAPPING).params == {"t": -0.5}
    assert make_policy("pid:kp=0.2", SPEC, MAPPING).params["kp"] == 0.2
    assert make_policy("pid-positive:t_hi=1.2", SPEC, MAPPING).params["t_hi"] == 1.2
    assert isinstance(FixedTemperature.greedy(SPEC, MAPPING), FixedTemperature)


def test_unknown_name_suggests_closest():
    with pytest.raises(ValueError, match="did you mean 'edt'"):
        make_policy("edtt", SPEC, MAPPING)
    with pytest.raises(ValueError, match="did you mean 'dynatemp'"):
        make_policy("dynatmp", SPEC, MAPPING)
    with pytest.raises(ValueError, match="unknown policy"):
        policy_from_config({"name": "nope", "params": {}}, SPEC, MAPPING)


@pytest.mark.parametrize("n", [-1, 0, 1, 1.5])
def test_edt_rejects_bad_n(n):
    with pytest.raises(ValueError, match=r"\bN=") as err:
        make_policy(f"edt:N={n}", SPEC, MAPPING)
    assert "(0, 1)" in str(err.value)
    with pytest.raises(ValueError, match=r"\bN="):
        EntropyDynamicTemperature(SPEC, MAPPING, N=n)


@pytest.mark.parametrize("spec, param", [
    ("edt:t0=0", "t0"), ("edt:theta=-1", "theta"), ("dynatemp:delta=-0.1", "delta"),
    ("surprise:t_lo=2,t_hi=1", "t_lo"), ("surprise:eta=0", "eta"), ("pid:max_delta=0", "max_delta"),
    ("pid:window=2.5", "window"), ("pid:safe_lo=-3", "safe_lo"),
])
def test_bad_values_name_the_parameter(spec, param):
    with pytest.raises(ValueError, match=param):
        make_policy(spec, SPEC, MAPPING)


def test_pid_rejects_empty_bounds():
    with pytest.raises(ValueError, match=r"bounds t_lo=-0.1 >= t_hi=-2.0"):
        make_policy("pid:t_lo=-0.1,t_hi=-2", SPEC, MAPPING)
    with pytest.raises(ValueError, match="bounds"):
        PIDController(SPEC, MAPPING, t_lo=-1.0, t_hi=-1.0)


def test_unknown_and_malformed_parameters():
    with pytest.raises(ValueError, match=r"unknown parameter 'thetaa'.*did you mean 'theta'.*t0, theta, N, h_floor"):
        make_policy("edt:thetaa=1", SPEC, MAPPING)
    with pytest.raises(ValueError, match=r"unknown parameter 'x' for policy 'pid'.*kp"):
        policy_from_config({"name": "pid", "params": {"x": 1}}, SPEC, MAPPING)
    with pytest.raises(ValueError, match="not a number"):
        make_policy("edt:theta=abc", SPEC, MAPPING)
    with pytest.raises(ValueError, match="not key=value"):
        make_policy("edt:1.0", SPEC, MAPPING)
    with pytest.raises(ValueError, match="twice"):
        make_policy("edt:theta=1,theta=2", SPEC, MAPPING)
    with pytest.raises(ValueError, match="cannot be None"):
        make_policy("edt:theta=none", SPEC, MAPPING)
    with pytest.raises(ValueError, match="real number"):
        make_policy("fixed:nan", SPEC, MAPPING)


# --------------------------------------------------------------------------- schedules and lookups
def test_hot_cold_schedule_by_position():
    spec = FeatureSpec(horizon=8)
    policy = make_policy("hotcold:hot=2.0,n=2,cold=0.4", spec, MAPPING)
    positions = torch.tensor([0, 1, 2, 5]) / 8  # tokens generated so far / horizon
    obs = Featurizer(spec, 4).observe(torch.zeros(4, 5))
    obs[:, spec.index("position")] = positions
    assert policy.temperatures(obs).tolist() == pytest.approx([2.0, 2.0, 0.4, 0.4])
    assert policy.label == "HotCold(T_hot=2.0, n=2, T_cold=0.4)"
    with pytest.raises(ValueError, match="integer"):
        make_policy("hotcold:n=1.5", spec, MAPPING)


def test_category_table_reads_the_one_hot():
    spec = FeatureSpec(horizon=8, categories=("code", "creative_writing"))
    policy = make_policy("table:code=0.2,creative_writing=1.3,other=0.6", spec, MAPPING)
    f = Featurizer(spec, 3)
    f.reset(None, category=[0, 1, 2])  # code, creative_writing, other
    obs = f.observe(torch.zeros(3, 5))
    assert policy.temperatures(obs).tolist() == pytest.approx([0.2, 1.3, 0.6])
    assert policy.params == {"code": 0.2, "creative_writing": 1.3, "other": 0.6}
    with pytest.raises(ValueError, match="did you mean 'code'"):
        make_policy("table:cdoe=0.2", spec, MAPPING)
    with pytest.raises(ValueError, match="include_category"):
        make_policy("table", FeatureSpec(horizon=8), MAPPING)
