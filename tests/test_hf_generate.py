"""PolicyLogitsProcessor inside transformers' generate under real settings (the embedded SmolLM2).

Many Hub models ship a generation_config with temperature / top_k / top_p set; generate() appends those
warpers *after* custom processors. ``proc.generate`` must refuse such a call (naming what to pass) and, with
the neutral arguments, be the only thing that shapes the distribution that is sampled.
"""

import re
import copy

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from policies.actions import ActionMapping
from policies.baselines import FixedTemperature
from kelvin.export import export_baseline
from policies.features import FeatureSpec
from samplers.core import apply_temperature, truncate
from samplers.hf import NEUTRAL_GENERATE_KWARGS, PolicyLogitsProcessor

pytestmark = pytest.mark.slow  # the real model in every test

SPEC = FeatureSpec(horizon=16)


@pytest.fixture
def hub_like_model(lm):
    """The session model with a generation_config as many Hub models ship it (restored afterwards)."""
    original = lm.model.generation_config
    config = copy.deepcopy(original)
    config.do_sample, config.temperature, config.top_k = True, 0.6, 50
    lm.model.generation_config = config
    yield lm
    lm.model.generation_config = original


def _prompt(lm):
    ids = lm.encode(["Write a haiku about rain."])[0]
    return torch.tensor([ids]), torch.ones((1, len(ids)), dtype=torch.long)


def test_generate_refuses_warpers_of_the_generation_config(hub_like_model):
    lm = hub_like_model
    proc = PolicyLogitsProcessor(FixedTemperature(SPEC, ActionMapping(), t=1.3), guard=False)
    ids, mask = _prompt(lm)
    with pytest.raises(ValueError, match=r"TemperatureLogitsWarper\(temperature=0.6\), TopKLogitsWarper\(top_k=50\) "
                                         r"after PolicyLogitsProcessor.*Pass temperature=1.0, top_k=0 to generate"):
        proc.generate(lm.model, input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=lm.pad_token_id)
    with pytest.raises(ValueError, match=r"TopPLogitsWarper\(top_p=0.9\).*Pass top_p=1.0"):  # the call's own setting
        proc.generate(lm.model, input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=lm.pad_token_id,
                      logits_processor=LogitsProcessorList([proc]), **{**NEUTRAL_GENERATE_KWARGS, "top_p": 0.9})
    assert proc.temperature_trace().shape[1] == 0  # refused before the model ran


def test_with_neutral_arguments_the_policy_alone_shapes_the_distribution(hub_like_model):
    lm = hub_like_model
    proc = PolicyLogitsProcessor(FixedTemperature(SPEC, ActionMapping(), t=1.3), truncation={"min_p": 0.02},
                                 guard=False)
    ids, mask = _prompt(lm)
    torch.manual_seed(0)
    with torch.inference_mode():
        out = proc.generate(lm.model, input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=lm.pad_token_id,
                            return_dict_in_generate=True, output_scores=True, output_logits=True,
                            **NEUTRAL_GENERATE_KWARGS)
    assert len(out.scores) == proc.temperature_trace().shape[1] >= 1
    for raw, sampled in zip(out.logits, out.scores):  # (1, V) model logits / what generate sampled from
        # exactly the policy's min-p set at T = 1.3: neither the config's T = 0.6 nor its top-k = 50 got in
        torch.testing.assert_close(sampled, apply_temperature(truncate(raw, min_p=0.02), 1.3), rtol=0, atol=0)


def test_a_processor_after_the_policy_gets_a_warning(lm):
    class Shift(LogitsProcessor):
        def __call__(self, input_ids, scores):
            return scores + 1.0

    proc = PolicyLogitsProcessor(FixedTemperature(SPEC, ActionMapping(), t=0.8), guard=False)
    ids, mask = _prompt(lm)
    with pytest.warns(RuntimeWarning, match="Shift run.s. after PolicyLogitsProcessor"):
        proc.generate(lm.model, input_ids=ids, attention_mask=mask, max_new_tokens=1, pad_token_id=lm.pad_token_id,
                      logits_processor=LogitsProcessorList([proc, Shift()]), **NEUTRAL_GENERATE_KWARGS)


def test_an_export_of_another_model_is_refused_with_both_names(lm, tmp_path):
    toy = export_baseline(FixedTemperature(SPEC, ActionMapping(), t=0.8), tmp_path / "toy", None,
                          {"name": "Qwen/Qwen2.5-0.5B-Instruct", "vocab_size": 151936})
    with pytest.raises(ValueError, match=r"exported for model 'Qwen/Qwen2.5-0.5B-Instruct' \(vocabulary 151936\) but "
                                         r"the engine runs 'smollm2-135m-instruct' \(vocabulary 49152\)"):
        PolicyLogitsProcessor.from_pretrained(toy, model=lm)
    with pytest.raises(ValueError, match=r"exported for model 'Qwen/Qwen2.5-0.5B-Instruct' \(vocabulary 151936\) but "
                                         + re.escape(f"the engine runs '{lm.model.config.name_or_path}' ") + r"\(vocabulary 49152\)"):
        PolicyLogitsProcessor.from_pretrained(toy, model=lm.model)  # a plain transformers model: its own path
    proc = PolicyLogitsProcessor.from_pretrained(toy)  # without model=, the first step finds the other vocabulary
    ids, mask = _prompt(lm)
    with pytest.raises(ValueError, match=r"exported for another model \('Qwen/Qwen2.5-0.5B-Instruct'\) with a "
                                         r"vocabulary of 151936"):
        lm.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=1, pad_token_id=lm.pad_token_id,
                          logits_processor=LogitsProcessorList([proc]), **NEUTRAL_GENERATE_KWARGS)
    same = export_baseline(FixedTemperature(SPEC, ActionMapping(), t=0.8), tmp_path / "same", None,
                           {"name": "smollm2-135m-instruct", "vocab_size": 49152})
    for model in (lm, lm.model, "HuggingFaceTB/SmolLM2-135M-Instruct"):  # the same model under its usual names
        PolicyLogitsProcessor.from_pretrained(same, model=model)
