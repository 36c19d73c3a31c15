"""The exported policy inside the samplers: processors on synthetic logits, guard rails (on by default), the
llama.cpp processor, and parity with the env.

The parity tests roll out the real environment (TemperatureVecEnv, 2 rows, the smoke config) with
the learned policy of a smoke-trained run and with the ``pid`` and ``surprise`` baselines, record
the prompts, the model's logits, the drawn tokens and the temperatures, then feed the same prompt
ids, tokens and logits through ``PolicyLogitsProcessor`` built from the *exported* artifact, step by
step with growing ``input_ids``: the temperatures must agree to 1e-5.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from export_helpers import MAPPING, SPEC, V, read_spec, rewrite_spec, sb3_actions
from kelvin.export import export_baseline
from policies import FeatureSpec, load_artifact
from policies.actions import ActionMapping
from policies.artifact import ArtifactError, ExportedPolicy
from policies.baselines import FixedTemperature
from policies.features import Featurizer
from policies.registry import make_policy
from samplers.core import apply_temperature, truncate
from samplers.hf import PolicyLogitsProcessor
from samplers.llama_cpp import LlamaCppPolicyProcessor

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


# =========================================================================== processors on synthetic logits
def _logit_stream(batch: int, steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, V, generator=g) * 2 for _ in range(steps)]


def _drive(proc, prompts: torch.Tensor, logits: list[torch.Tensor], seed: int = 0) -> torch.Tensor:
    """Call ``proc`` like generate does: growing input_ids, tokens drawn from its output."""
    g = torch.Generator().manual_seed(seed)
    ids = prompts
    for z in logits:
        before = z.clone()
        out = proc(ids, z)
        assert out is not z and torch.equal(z, before)  # a new tensor; the input is untouched
        tokens = torch.multinomial(torch.softmax(out, -1), 1, generator=g)  # (B, 1)
        ids = torch.cat([ids, tokens], dim=1)
    return ids


def test_processor_matches_the_policy_step_by_step():
    policy = make_policy("pid", SPEC, MAPPING)
    proc = PolicyLogitsProcessor(policy, truncation={"top_k": 10}, category=["code", "other", "creative"],
                                 guard=False)  # the policy line itself; the guard is tested on its own
    logits = _logit_stream(3, 6)
    ids = _drive(proc, torch.randint(0, V, (3, 4)), logits)
    trace = proc.temperature_trace()
    assert trace.shape == (3, 6) and len(proc.temperatures) == 6 and proc.temperatures[0].shape == (3,)
    # reference: the env's own line (featurizer -> predict -> to_temperature with rate limit)
    ref_policy = make_policy("pid", SPEC, MAPPING)
    f = Featurizer(SPEC, 3)
    f.reset(None, category=[0, 2, 1])
    starts = np.ones(3, bool)
    for step, z in enumerate(logits):
        obs = f.observe(z)
        actions, _ = ref_policy.predict(obs, episode_start=starts)
        t = MAPPING.to_temperature(torch.as_tensor(actions).reshape(-1), previous=f.state.prev_temperature,
                                   first_step=f.state.position == 0)
        torch.testing.assert_close(trace[:, step], t, atol=1e-6, rtol=0)
        f.update(ids[:, 4 + step], t)
        starts = np.zeros(3, bool)


def test_processor_output_is_truncated_and_tempered():
    proc = PolicyLogitsProcessor(FixedTemperature(SPEC, MAPPING, t=-0.5), truncation={"top_k": 3}, guard=False)
    z = torch.randn(2, V)
    out = proc(torch.zeros(2, 5, dtype=torch.long), z)
    torch.testing.assert_close(out, apply_temperature(truncate(z, top_k=3), -0.5))
    assert (torch.isfinite(out).sum(-1) == 3).all()
    # negative T inside top-3: the least likely of the three becomes the most likely
    kept = z.topk(3).indices
    assert torch.equal(out.argmax(-1), kept[:, 2])


def test_new_generation_is_detected():
    policy = make_policy("surprise", SPEC, MAPPING)
    proc = PolicyLogitsProcessor(policy)
    ids = torch.randint(0, V, (2, 5))
    z = _logit_stream(2, 4)
    proc(ids, z[0])
    ids2 = torch.cat([ids, torch.tensor([[1], [2]])], 1)
    proc(ids2, z[1])
    assert len(proc.temperatures) == 2 and proc.runtime.featurizer.state.position.tolist() == [1, 1]
    proc(torch.randint(0, V, (2, 9)), z[2])  # a longer jump: a new generate call
    assert len(proc.temperatures) == 1 and proc.runtime.featurizer.state.position.tolist() == [0, 0]
    proc(torch.randint(0, V, (3, 10)), torch.randn(3, V))  # batch size changed
    assert proc.temperature_trace().shape == (3, 1)
    same_len = torch.randint(0, V, (3, 11))
    same_len[:, -2] = (same_len[:, -2] + 1) % V  # one longer, but not the tokens seen before
    proc(same_len, torch.randn(3, V))
    assert proc.temperature_trace().shape == (3, 1)
    proc.reset()
    proc(torch.cat([same_len, same_len[:, -1:]], 1), torch.randn(3, V))
    assert proc.temperature_trace().shape == (3, 1)


def test_stateful_baseline_keeps_per_row_state():
    """Rows of one batch evolve exactly as the same rows run alone."""
    logits = _logit_stream(3, 5, seed=4)
    prompts = torch.randint(0, V, (3, 3))
    batched = PolicyLogitsProcessor(make_policy("pid", SPEC, MAPPING))  # guarded (default): per-row guard state too
    ids = _drive(batched, prompts, logits)
    for row in range(3):
        alone = PolicyLogitsProcessor(make_policy("pid", SPEC, MAPPING))
        for step, z in enumerate(logits):
            alone(ids[row:row + 1, : 3 + step], z[row:row + 1])
        torch.testing.assert_close(alone.temperature_trace()[0], batched.temperature_trace()[row], atol=1e-6, rtol=0)


def test_processor_bad_inputs():
    proc = PolicyLogitsProcessor(make_policy("edt", SPEC, MAPPING))
    with pytest.raises(ValueError, match=r"scores must be a \(batch, vocab\)"):
        proc(torch.zeros(1, 3, dtype=torch.long), torch.zeros(V))
    with pytest.raises(ValueError, match="input_ids must be"):
        proc(torch.zeros(2, 3, dtype=torch.long), torch.zeros(1, V))
    with pytest.raises(ValueError, match=r"logits contain NaN or \+inf in rows \[0\] \(NaN in rows \[0\]"):
        proc(torch.zeros(1, 3, dtype=torch.long), torch.full((1, V), float("nan")))
    with pytest.raises(ValueError, match="unknown category 'cod'; did you mean 'code'"):
        PolicyLogitsProcessor(make_policy("edt", SPEC, MAPPING), category="cod")
    with pytest.raises(ValueError, match="category has 2 entries for a batch of 3 rows"):
        PolicyLogitsProcessor(make_policy("edt", SPEC, MAPPING), category=["code", "other"])(
            torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, V))
    with pytest.raises(ValueError, match="unknown truncation keys.*did you mean 'top_k'"):
        PolicyLogitsProcessor(make_policy("edt", SPEC, MAPPING), truncation={"topk": 5})
    with pytest.raises(ValueError, match="top_p"):
        PolicyLogitsProcessor(make_policy("edt", SPEC, MAPPING), truncation={"top_p": 0.0})
    with pytest.raises(TypeError, match="policy must answer predict"):
        PolicyLogitsProcessor(object(), SPEC, MAPPING)
    with pytest.raises(ValueError, match="reads features"):
        PolicyLogitsProcessor(make_policy("edt", SPEC, MAPPING), FeatureSpec(horizon=8), MAPPING)
    prior_proc = PolicyLogitsProcessor(make_policy("edt", SPEC, MAPPING), token_prior=torch.zeros(V + 1))
    with pytest.raises(ValueError, match="exported for another model"):
        prior_proc(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, V))


def test_exported_learned_policy_runs_in_the_processor(dummy_export):
    out, model, norm = dummy_export
    proc = PolicyLogitsProcessor.from_pretrained(out, category="creative")
    assert proc.truncation.top_k == 5 and isinstance(proc.guard.policy, ExportedPolicy)
    raw = PolicyLogitsProcessor.from_pretrained(out, category="creative", guard=False)
    logits = _logit_stream(2, 4)
    ids = _drive(raw, torch.randint(0, V, (2, 3)), logits)
    trace = raw.temperature_trace()  # (2, 4)
    # reference: SB3's own numpy path on the same observations, through the mapping and its rate limit
    f = Featurizer(SPEC, 2, token_prior=load_artifact(out).token_prior)
    f.reset(None, category=[SPEC.categories.index("creative")] * 2)
    for step, z in enumerate(logits):
        obs = f.observe(z)
        actions = torch.as_tensor(sb3_actions(model, obs.numpy(), norm)).reshape(-1)
        t = MAPPING.to_temperature(actions, previous=f.state.prev_temperature, first_step=f.state.position == 0)
        torch.testing.assert_close(trace[:, step], t, atol=1e-5, rtol=0)
        f.update(ids[:, 3 + step], t)


def test_an_export_with_position_bins_runs_its_step_in_every_processor(tmp_path):
    """A policy that reads the position bins (env.features.position_bins): the processors' featurizer builds the
    same one-hot as the env's, so the temperatures equal SB3's own on the reference observations, in HF's and
    in llama.cpp's processor."""
    from export_helpers import dummy_ppo
    from kelvin.export import export_learned

    spec = replace(SPEC, position_bins=(2,))
    model = dummy_ppo(spec)
    with torch.no_grad():  # untrained actions are ~0.01: make every input move the temperature
        model.policy.action_net.weight.mul_(100.0)
    out = export_learned(model.policy, tmp_path / "bins", spec, MAPPING, {"top_k": 5}, {"name": "toy", "vocab_size": V},
                         None, None)
    assert read_spec(out)["feature_spec"]["position_bins"] == [2]
    hf = PolicyLogitsProcessor.from_pretrained(out, guard=False)
    llama = LlamaCppPolicyProcessor.from_pretrained(out, guard=False)
    logits = _logit_stream(1, 4, seed=3)
    ids = _drive(hf, torch.randint(0, V, (1, 3)), logits)
    for step, z in enumerate(logits):
        llama(ids[0, :3 + step].numpy().astype(np.intc), z[0].numpy())
    f = Featurizer(spec, 1)
    for step, z in enumerate(logits):
        obs = f.observe(z)
        assert obs[0, spec.index("position_bin_0")].item() == float(step < 2)
        actions = torch.as_tensor(sb3_actions(model, obs.numpy(), None)).reshape(-1)
        t = MAPPING.to_temperature(actions, previous=f.state.prev_temperature, first_step=f.state.position == 0)
        torch.testing.assert_close(hf.temperature_trace()[:, step], t, atol=1e-5, rtol=0)
        f.update(ids[:, 3 + step], t)
    np.testing.assert_allclose(llama.temperature_trace(), hf.temperature_trace()[0].numpy(), atol=1e-6, rtol=0)


# =========================================================================== guard rails, on by default
class _Jumper(FixedTemperature):
    """Alternates T = -2, +2 every call: the policy a guard must hold to its rate limit."""

    stateful = True

    def _temperatures(self, obs, episode_start=None):
        self._calls = getattr(self, "_calls", 0) + 1
        return torch.full((obs.shape[0],), -2.0 if self._calls % 2 else 2.0)


def test_export_writes_the_guard_block_and_samplers_turn_it_on(dummy_export, tmp_path):
    out, _, _ = dummy_export
    block = read_spec(out)["guard"]
    assert block == {"t_min": -2.0, "t_max": 2.0, "max_delta": 0.5, "safe_range": [0.1, 0.7],
                     "fallback_temperature": 0.7, "anomaly_threshold": 0.5, "hold": 8, "enabled": True}
    for proc in (PolicyLogitsProcessor.from_pretrained(out), LlamaCppPolicyProcessor.from_pretrained(out)):
        assert isinstance(proc.guard.policy, ExportedPolicy) and proc.guard.max_delta == 0.5
        assert proc.guard_counters == {"clamp": 0, "rate_limit": 0, "anomaly_reset": 0, "fallback": 0, "decisions": 0}
    off = PolicyLogitsProcessor.from_pretrained(out, guard=False)
    assert off.guard is None and isinstance(off.policy, ExportedPolicy)
    tuned = PolicyLogitsProcessor.from_pretrained(out, guard={"max_delta": 0.25})
    assert tuned.guard.max_delta == 0.25 and tuned.guard.safe_range == (0.1, 0.7)
    # an export written with the guard off stays off unless the caller asks for it
    bare = export_baseline(make_policy("edt", SPEC, MAPPING), tmp_path / "bare", guard=False)
    assert read_spec(bare)["guard"]["enabled"] is False
    assert PolicyLogitsProcessor.from_pretrained(bare).guard is None
    assert PolicyLogitsProcessor.from_pretrained(bare, guard=True).guard is not None
    # settings are clipped into the policy's bounds: a policy living in [-2, -0.1] gets safe range/fallback -0.1
    neg = export_baseline(make_policy("pid", SPEC, ActionMapping(t_min=-2.0, t_max=-0.1)), tmp_path / "neg")
    assert read_spec(neg)["guard"]["safe_range"] == [-0.1, -0.1] and read_spec(neg)["guard"]["fallback_temperature"] == -0.1


def test_default_guard_holds_a_jumping_policy_in_generate_loops():
    mapping = ActionMapping(t_min=-2.0, t_max=2.0)  # no rate limit of its own: the guard's is the only one
    logits = _logit_stream(2, 6, seed=3)
    prompts = torch.randint(0, V, (2, 3))
    raw = PolicyLogitsProcessor(_Jumper(SPEC, mapping, t=0.0), guard=False)
    _drive(raw, prompts, logits)
    assert raw.temperature_trace()[0].tolist() == [-2.0, 2.0, -2.0, 2.0, -2.0, 2.0]
    guarded = PolicyLogitsProcessor(_Jumper(SPEC, mapping, t=0.0))
    _drive(guarded, prompts, logits)
    trace = guarded.temperature_trace()
    torch.testing.assert_close(trace[0], torch.tensor([-2.0, -1.5, -2.0, -1.5, -2.0, -1.5]))  # +-0.5 per token
    counters = guarded.guard_counters
    assert counters["rate_limit"] == 2 * 3 and counters["decisions"] == 12  # every upward jump, both rows
    assert counters["clamp"] == counters["fallback"] == 0


def test_default_guard_resets_into_the_safe_range_when_the_detector_fires():
    # every token is flagged anomalous by the prior: after the first draw the anomaly EMA is 1 > 0.5
    proc = PolicyLogitsProcessor(FixedTemperature(SPEC, MAPPING, t=-1.5), token_prior=torch.ones(V))
    _drive(proc, torch.randint(0, V, (2, 3)), _logit_stream(2, 5, seed=1))
    trace = proc.temperature_trace()
    assert trace[:, 0].tolist() == [-1.5, -1.5]  # nothing drawn yet, nothing detected
    assert torch.equal(trace[:, 1:], torch.full((2, 4), 0.1))  # clamp(-1.5, 0.1, 0.7), ignoring the rate limit
    assert proc.guard_counters["anomaly_reset"] == 2 * 4


def test_default_guard_falls_back_when_the_policy_fails():
    class Broken(FixedTemperature):
        def _temperatures(self, obs, episode_start=None):
            raise RuntimeError("policy server down")

    proc = PolicyLogitsProcessor(Broken(SPEC, MAPPING, t=0.3))
    z = torch.randn(2, V)
    with pytest.warns(RuntimeWarning, match="policy server down"):
        out = proc(torch.zeros(2, 3, dtype=torch.long), z)
    torch.testing.assert_close(proc.temperature_trace()[:, 0], torch.tensor([0.7, 0.7]))
    torch.testing.assert_close(out, apply_temperature(z, 0.7))
    assert proc.guard_counters["fallback"] == 2
    with pytest.raises(RuntimeError, match="policy server down"):  # without the guard the error reaches the caller
        PolicyLogitsProcessor(Broken(SPEC, MAPPING, t=0.3), guard=False)(torch.zeros(1, 3, dtype=torch.long),
                                                                           torch.randn(1, V))


def test_hf_generate_checks_the_generation_config_it_would_run_with():
    """PolicyLogitsProcessor.generate reads the call's settings through GenerationConfig (no model run here)."""
    from transformers import GenerationConfig

    from samplers.hf import NEUTRAL_GENERATE_KWARGS, check_generation_config, generation_config_of

    class HubModel:  # a model whose generation_config ships T = 0.6 and top-k 50, as many Hub models do
        generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_k=50)

        def generate(self, **kwargs):
            self.called = kwargs
            return "tokens"

    model = HubModel()
    proc = PolicyLogitsProcessor(make_policy("edt", SPEC, MAPPING), guard=False)
    with pytest.raises(ValueError, match=r"TemperatureLogitsWarper\(temperature=0.6\), TopKLogitsWarper\(top_k=50\) "
                                         r"after PolicyLogitsProcessor.*Pass temperature=1.0, top_k=0 to generate"):
        proc.generate(model, input_ids=torch.zeros(1, 3, dtype=torch.long))
    assert not hasattr(model, "called") and model.generation_config.temperature == 0.6  # the model's config untouched
    with pytest.raises(ValueError, match=r"MinPLogitsWarper\(min_p=0.1\).*Pass min_p=0.0"):
        check_generation_config(generation_config_of(model, **{**NEUTRAL_GENERATE_KWARGS, "min_p": 0.1}))
    with pytest.raises(ValueError, match="do_sample is not True"):
        check_generation_config(GenerationConfig(do_sample=False))
    assert proc.generate(model, max_new_tokens=2, **NEUTRAL_GENERATE_KWARGS) == "tokens"
    assert list(model.called["logits_processor"]) == [proc] and model.called["max_new_tokens"] == 2


def test_guard_settings_errors_name_the_setting(dummy_export, baseline_dir):
    from kelvin.export import parse_guard_settings

    out, _, _ = dummy_export
    with pytest.raises(ValueError, match="unknown setting 'max_delt'; did you mean 'max_delta'"):
        PolicyLogitsProcessor.from_pretrained(out, guard={"max_delt": 0.3})
    with pytest.raises(ValueError, match=r"safe_range=\(0.7, 0.1\) must be ordered"):
        PolicyLogitsProcessor(make_policy("edt", SPEC, MAPPING), guard={"safe_range": (0.7, 0.1)})
    with pytest.raises(TypeError, match="guard='yes' must be"):
        PolicyLogitsProcessor(make_policy("edt", SPEC, MAPPING), guard="yes")
    rewrite_spec(baseline_dir, guard={"max_delta": -1})
    with pytest.raises(ArtifactError, match="spec.json guard max_delta=-1 must be a number > 0, or None"):
        load_artifact(baseline_dir)
    rewrite_spec(baseline_dir, guard="on")
    with pytest.raises(ArtifactError, match="guard='on' must be an object"):
        load_artifact(baseline_dir)
    assert parse_guard_settings(["max_delta=0.3", "safe_range=0.2,0.6", "anomaly_threshold=none"]) == {
        "max_delta": 0.3, "safe_range": [0.2, 0.6], "anomaly_threshold": None}
    with pytest.raises(ValueError, match="--guard 'max_delta': expected KEY=VALUE"):
        parse_guard_settings(["max_delta"])
    with pytest.raises(ValueError, match="'abc' is not a valid value for max_delta"):
        parse_guard_settings(["max_delta=abc"])


@pytest.mark.slow
def test_export_cli_guard_options(lm, tmp_path, capsys):
    from kelvin.export import main

    # lm: the session's loaded model, which the CLI's load_causal_lm finds in the in-process cache
    assert main(["edt", str(tmp_path / "g"), "--config", str(SMOKE), "--guard", "max_delta=0.3",
                 "--guard", "safe_range=0.2,0.6", "--guard", "hold=4"]) == 0
    block = read_spec(tmp_path / "g")["guard"]
    assert (block["max_delta"], block["safe_range"], block["hold"], block["enabled"]) == (0.3, [0.2, 0.6], 4, True)
    assert PolicyLogitsProcessor.from_pretrained(tmp_path / "g").guard.hold == 4
    assert main(["edt", str(tmp_path / "n"), "--config", str(SMOKE), "--no-guard"]) == 0
    assert read_spec(tmp_path / "n")["guard"]["enabled"] is False
    assert main(["edt", str(tmp_path / "b"), "--config", str(SMOKE), "--guard", "hold=-1"]) == 2
    assert "hold=-1 must be a whole number of tokens" in capsys.readouterr().err


# =========================================================================== llama.cpp (numpy, one sequence)
def test_llama_cpp_processor_matches_the_hf_processor(dummy_export):
    out, _, _ = dummy_export
    hf = PolicyLogitsProcessor.from_pretrained(out)
    llama = LlamaCppPolicyProcessor.from_pretrained(out)
    logits = _logit_stream(1, 5, seed=7)
    ids = torch.randint(0, V, (1, 6))
    for z in logits:
        expected = hf(ids, z)  # (1, V)
        arr = z[0].numpy().copy()
        before = arr.copy()
        res = llama(ids[0].numpy().astype(np.intc), arr)
        assert isinstance(res, np.ndarray) and res.dtype == np.float32 and res.shape == (V,)
        np.testing.assert_array_equal(arr, before)  # input untouched
        np.testing.assert_allclose(res, expected[0].numpy(), atol=1e-6, rtol=0)
        ids = torch.cat([ids, expected.argmax(-1, keepdim=True)], dim=1)
    np.testing.assert_allclose(llama.temperature_trace(), hf.temperature_trace()[0].numpy(), atol=1e-6, rtol=0)
    llama(ids[0, :3].numpy().astype(np.intc), logits[0][0].numpy())  # a new completion starts afresh
    assert len(llama.temperatures) == 1
    with pytest.raises(ValueError, match="one sequence"):
        llama(ids[0, :3].numpy(), np.zeros((2, V), np.float32))


# =========================================================================== the real model: parity with the env
def _rollout(env, policy, steps: int):
    """Run the env, recording per step the logits it sampled from, the tokens and temperatures."""
    core = env.core
    rec = {"logits": [], "tokens": [], "temps": []}
    original = core.step

    def spy(actions):
        rec["logits"].append(core.logits.clone())  # the logits this step samples from
        result = original(actions)
        rec["tokens"].append(result.tokens.clone())
        rec["temps"].append(result.temperature.clone())
        return result

    core.step = spy
    env.seed(123)
    obs = env.reset()
    prompts = [core.prompts[i] for i in core.episode.prompt]
    policy.reset(env.num_envs)
    starts = np.ones(env.num_envs, bool)
    length = np.zeros(env.num_envs, dtype=int)  # first episode length of each row (0 = running)
    for step in range(steps):
        actions, _ = policy.predict(obs, episode_start=starts)
        obs, _, dones, _ = env.step(np.asarray(actions, np.float32).reshape(env.num_envs, 1))
        length[(length == 0) & dones] = step + 1
        starts = dones
        if (length > 0).all():
            break
    core.step = original
    return prompts, length, {k: torch.stack(v) for k, v in rec.items()}  # (S, B, ...) each


def _replay(proc, lm, prompts, length, rec) -> torch.Tensor:
    """Feed the recorded prompt ids + tokens + logits through ``proc`` step by step; its (B, S) trace."""
    ids = lm.encode([p.text for p in prompts])
    width = max(map(len, ids))
    input_ids = torch.tensor([[lm.pad_token_id] * (width - len(x)) + x for x in ids])  # (B, P) left padded
    for step in range(int(length.max())):
        proc(input_ids, rec["logits"][step])
        input_ids = torch.cat([input_ids, rec["tokens"][step].view(-1, 1)], dim=1)
    return proc.temperature_trace()


PARITY_LAMBDA = 0.7  # the diversity dial of every row: the processor is given the same λ


@pytest.fixture(scope="module")
def parity_env(smoke_run, lm):
    from envs.generation import TemperatureVecEnv
    from envs.rewards import RewardConfig
    from kelvin.config_loading import load_config

    config = load_config(smoke_run.run_dir / "config.yaml")
    env_config = replace(config.env, batch_size=2, group_size=1, diversity_values=[PARITY_LAMBDA])
    env = TemperatureVecEnv(env_config, lm=lm, reward=RewardConfig(coherence=0.0, group_semantic=0.0))
    yield config, env
    env.close()


@pytest.mark.slow
@pytest.mark.parametrize("which", ["learned", "pid", "surprise"])
def test_parity_with_the_env(which, smoke_run, parity_env, lm, tmp_path):
    smoke_run = smoke_run.run_dir
    from kelvin.export import export_baseline_spec, learned_policy
    from kelvin.rundir import RunDir, load_ppo, load_vecnormalize

    config, env = parity_env
    if which == "learned":  # the policy as training's validation runs it
        export = smoke_run / "export"
        base = RunDir(smoke_run).load_base()
        assert base is not None  # the smoke run is a residual on a tuned table: the samplers must apply it too
        policy = learned_policy(load_ppo(smoke_run / "model.zip"), load_vecnormalize(smoke_run / "vecnormalize.pkl"),
                                env.feature_spec, env.action_mapping, base=base)
    else:
        export = export_baseline_spec(which, tmp_path / which, smoke_run / "config.yaml", lm=lm)
        policy = make_policy(which, env.feature_spec, env.action_mapping)
    prompts, length, rec = _rollout(env, policy, config.env.max_new_tokens)
    assert (length > 0).all()
    # guard=False: training runs the policy without guard rails, and this checks the policy line itself
    proc = PolicyLogitsProcessor.from_pretrained(export, category=[p.category for p in prompts], guard=False,
                                                 diversity=PARITY_LAMBDA)
    assert env.feature_spec.include_diversity and proc.runtime.diversity == PARITY_LAMBDA
    assert proc.runtime.token_prior is not None
    torch.testing.assert_close(proc.runtime.token_prior, env.core.featurizer.token_prior.cpu())
    trace = _replay(proc, lm, prompts, length, rec)
    for row in range(2):
        n = int(length[row])
        torch.testing.assert_close(trace[row, :n], rec["temps"][:n, row], atol=1e-5, rtol=0)


def _left_padded(lm, texts):
    ids = lm.encode(texts)
    width = max(map(len, ids))
    input_ids = torch.tensor([[lm.pad_token_id] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    return input_ids, mask


@pytest.mark.slow
def test_generate_with_negative_temperature_inside_top_k(lm):
    from transformers import LogitsProcessorList

    spec = FeatureSpec(horizon=16)
    proc = PolicyLogitsProcessor(FixedTemperature(spec, MAPPING, t=-0.5), truncation={"top_k": 20},
                                 guard=False)  # the guard would pull T = -0.5 into its safe range
    texts = ["Write a haiku about rain.", "What is 2 + 2?", "Name three colours.",
             "Explain in one long sentence why the sky looks blue during the day."]
    input_ids, mask = _left_padded(lm, texts)
    torch.manual_seed(0)
    with torch.inference_mode():
        out = lm.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                top_p=1.0, max_new_tokens=10, pad_token_id=lm.pad_token_id,
                                logits_processor=LogitsProcessorList([proc]), return_dict_in_generate=True,
                                output_logits=True, output_scores=True)
    new = out.sequences[:, input_ids.shape[1]:]  # (4, steps)
    steps = new.shape[1]
    trace = proc.temperature_trace()
    assert trace.shape == (4, steps) and steps >= 1
    assert torch.equal(trace, torch.full((4, steps), -0.5))
    texts_out = [lm.decode_text(row) for row in new]
    assert all(isinstance(t, str) for t in texts_out) and any(t.strip() for t in texts_out)
    eos = set(lm.eos_token_ids.tolist())
    for step in range(steps):
        raw, final = out.logits[step], out.scores[step]  # (4, V) model logits / what was sampled from
        # nothing after the processor re-warped the distribution
        torch.testing.assert_close(final, apply_temperature(truncate(raw, top_k=20), -0.5))
        for row in range(4):
            if any(int(t) in eos for t in new[row, :step]):
                continue  # finished rows get padding
            assert int(new[row, step]) in raw[row].topk(20).indices.tolist()  # drawn inside the top 20


@pytest.mark.slow
def test_generate_with_the_trained_export(smoke_run, lm):
    smoke_run = smoke_run.run_dir
    from transformers import LogitsProcessorList

    from kelvin.export import learned_policy
    from kelvin.rundir import RunDir, load_ppo, load_vecnormalize

    export = smoke_run / "export"
    proc = PolicyLogitsProcessor.from_pretrained(export, category="creative_writing")  # guarded, as exported
    input_ids, mask = _left_padded(lm, ["Tell me a story.", "List two fruits.", "Hi!", "Describe a cat."])
    with torch.inference_mode():
        out = lm.model.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                top_p=1.0, max_new_tokens=6, pad_token_id=lm.pad_token_id,
                                logits_processor=LogitsProcessorList([proc]), return_dict_in_generate=True,
                                output_logits=True)
    trace = proc.temperature_trace()
    steps = out.sequences.shape[1] - input_ids.shape[1]
    assert trace.shape == (4, steps) and steps == len(out.logits)
    # the same generate call replayed through the trained model itself (SB3 zip + VecNormalize, not the
    # TorchScript export) behind the export's guard: the same temperatures, token by token
    art = load_artifact(export)
    trained = learned_policy(load_ppo(smoke_run / "model.zip"), load_vecnormalize(smoke_run / "vecnormalize.pkl"),
                             art.feature_spec, art.action_mapping, base=RunDir(smoke_run).load_base())
    reference = PolicyLogitsProcessor(trained, truncation=art.truncation, token_prior=art.token_prior,
                                      category="creative_writing", guard=art.guard)
    for step in range(steps):
        reference(out.sequences[:, : input_ids.shape[1] + step], out.logits[step])
    torch.testing.assert_close(reference.temperature_trace(), trace, atol=1e-6, rtol=0)
