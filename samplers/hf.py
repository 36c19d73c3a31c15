"""A Kelvin temperature policy inside transformers' ``generate``: :class:`PolicyLogitsProcessor`.

Usage::

    from samplers.hf import NEUTRAL_GENERATE_KWARGS, PolicyLogitsProcessor

    proc = PolicyLogitsProcessor.from_pretrained("runs/default/export")
    out = proc.generate(model, **inputs, **NEUTRAL_GENERATE_KWARGS,   # do_sample=True, temperature=1.0, top_k=0, ...
                        max_new_tokens=64)   # = model.generate(..., logits_processor=[proc]) after the checks
    proc.temperature_trace()   # (B, steps) temperatures the policy chose

How transformers (v5, ``generation/utils.py::_sample``) calls it: at every step
``next_token_logits = outputs.logits[:, -1].to(copy=True, dtype=float32)`` goes through the
processor list as ``scores`` (B, V), with ``input_ids`` (B, prompt + generated so far); then
``softmax(scores)`` and ``torch.multinomial``. ``-inf`` entries get probability 0 and are never drawn,
so the truncation and one-hot (greedy / argmin) rows this processor returns are sampled exactly.
``generate`` builds its own processors from the generation config (``_get_logits_processor``): the
penalties, biases and bans run *before* custom processors, the warpers (temperature, top-k, top-p,
min-p, typical, epsilon, eta, top-h) are appended *after* them, and ``generate`` falls back to the
model's ``generation_config`` for every setting the call does not override. Many Hub models ship
``temperature=0.6`` / ``top_k=50`` / ``top_p=0.9`` there, which would re-warp the policy's
distribution. So :meth:`PolicyLogitsProcessor.generate` **refuses** such a call before it starts: it
resolves the call's settings as ``generate`` does (the call's arguments over the model's
``generation_config``, through transformers' public ``GenerationConfig.update``) and raises a
``ValueError`` naming every warper those settings build, with its value and the ``generate`` argument
that switches it off (:data:`NEUTRAL_GENERATE_KWARGS`: ``temperature=1.0, top_k=0, top_p=1.0`` and the
others at their neutral values). Other processors that follow it get a ``RuntimeWarning`` (they may
change the distribution). Calling ``model.generate(logits_processor=[proc])`` directly skips these checks
(a processor is not told the call's settings); :func:`check_generation_config` runs them on any
``GenerationConfig``. Processors *before* it (``repetition_penalty``, ``no_repeat_ngram_size``, bad words)
change the logits the policy observes, unlike training; leave them off unless that is wanted.
``do_sample=True`` is required (greedy decoding ignores the temperature's magnitude; a policy's
``T = 0`` rows are already one-hot); :meth:`~PolicyLogitsProcessor.generate` refuses a call without it.

Per step the processor runs :class:`samplers.runtime.PolicyRuntime`: the same featurizer, policy,
action mapping (rate limit included), truncation and signed temperature as training, so a policy
chooses the same temperatures in ``generate`` as in the environment on the same tokens.

A new ``generate`` call is detected (featurizer and policy state start afresh, the recorded
temperatures are cleared) on the first call, when the batch size changes, when ``input_ids`` is not
one token longer than at the previous call, or when its previous tokens are not the ones seen then.
Call :meth:`PolicyLogitsProcessor.reset` to force it. Rows that already finished keep being
processed (``generate`` feeds them padding); their temperatures after EOS are meaningless.
"""

from __future__ import annotations

import copy
import warnings

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from policies.actions import ActionMapping
from policies.features import FeatureSpec
from samplers.runtime import RuntimeAdapter

__all__ = ["NEUTRAL_GENERATE_KWARGS", "PolicyLogitsProcessor", "check_generation_config", "generation_config_of"]

NEUTRAL_GENERATE_KWARGS = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                           "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}
"""``generate`` arguments that leave transformers' own warpers out (or neutral) whatever the model's
``generation_config`` says, so the policy's distribution is sampled as it is: ``proc.generate(model, **inputs,
**NEUTRAL_GENERATE_KWARGS)``."""

# GenerationConfig fields whose warper generate() appends after custom processors (with do_sample), in its order:
# field -> (warper, is neutral (no warper, or one that changes nothing), the argument to pass).
_WARPERS = {
    "temperature": ("TemperatureLogitsWarper", lambda v: float(v) == 1.0, "temperature=1.0"),
    "top_h": ("TopHLogitsWarper", lambda _v: False, "top_h=None"),
    "top_k": ("TopKLogitsWarper", lambda v: int(v) == 0, "top_k=0"),
    "top_p": ("TopPLogitsWarper", lambda v: float(v) >= 1.0, "top_p=1.0"),
    "min_p": ("MinPLogitsWarper", lambda v: float(v) == 0.0, "min_p=0.0"),
    "typical_p": ("TypicalLogitsWarper", lambda v: float(v) >= 1.0, "typical_p=1.0"),
    "epsilon_cutoff": ("EpsilonLogitsWarper", lambda v: not 0.0 < float(v) < 1.0, "epsilon_cutoff=0.0"),
    "eta_cutoff": ("EtaLogitsWarper", lambda v: not 0.0 < float(v) < 1.0, "eta_cutoff=0.0"),
}
_HARMLESS = {"LogitNormalization"}  # log_softmax: the same distribution


def generation_config_of(model, **generate_kwargs) -> GenerationConfig:
    """The settings ``model.generate(**generate_kwargs)`` samples with: the call's ``generation_config`` (else the
    model's), updated with the call's arguments through transformers' public ``GenerationConfig.update``."""
    base = generate_kwargs.pop("generation_config", None) or getattr(model, "generation_config", None)
    if not isinstance(base, GenerationConfig):
        raise TypeError(f"model={type(model).__name__} has no generation_config; pass a transformers model (for a "
                        "Kelvin CausalLM: its .model)")
    config = copy.deepcopy(base)
    config.update(**generate_kwargs)  # keyword arguments that are not generation settings are left out
    return config


def check_generation_config(config: GenerationConfig) -> None:
    """Refuse settings under which ``generate`` rescales the policy's distribution after the processor: a
    ``ValueError`` naming each warper transformers builds from ``config`` (its documented fields), its value and
    the argument that switches it off (:data:`NEUTRAL_GENERATE_KWARGS`), or asking for ``do_sample=True``."""
    if not config.do_sample:
        raise ValueError("generate() would decode greedily (do_sample is not True), ignoring the policy's "
                         "temperatures; pass do_sample=True (samplers.hf.NEUTRAL_GENERATE_KWARGS holds every "
                         "neutral setting)")
    rescaling = []
    for field, (warper, neutral, fix) in _WARPERS.items():
        value = getattr(config, field, None)
        if value is not None and not neutral(value):
            rescaling.append((f"{warper}({field}={value!r})", fix))
    if rescaling:
        raise ValueError(
            f"generate() would apply {', '.join(r for r, _ in rescaling)} after PolicyLogitsProcessor and rescale the "
            "policy's distribution (these come from the call's arguments or the model's generation_config). Pass "
            f"{', '.join(f for _, f in rescaling)} to generate() (samplers.hf.NEUTRAL_GENERATE_KWARGS holds every "
            "neutral setting); the policy sets the temperature and truncation itself")


class PolicyLogitsProcessor(RuntimeAdapter, LogitsProcessor):
    """transformers ``LogitsProcessor`` that applies a temperature policy's per-token signed temperature.

    Arguments: ``policy`` (a baseline, :func:`policies.load_policy` output, or any other
    :class:`~policies.base.TemperaturePolicy`), ``feature_spec`` / ``action_mapping`` (default: the policy's),
    ``truncation`` (``{top_k, top_p, min_p, top_n_sigma}``, computed on the base distribution before
    the temperature, as in training), ``token_prior`` ((V,) anomaly priors the featurizer used in
    training; :meth:`from_pretrained` loads them), ``category`` (the prompt category of every row,
    or one per row, for policies conditioned on it; default "other"), ``diversity`` (the λ dial, inside the trained range),
    ``guard`` (guard rails, **on by default**: bounds, a rate limit, a reset into a safe range when
    the anomaly detector fires, a fallback on non-finite input; ``False`` switches them off, a dict
    sets them, see :mod:`policies.guard`; :meth:`from_pretrained` takes the export's settings).

    Attributes: ``temperatures`` (list of (B,) tensors, one per step of the last ``generate``),
    :meth:`temperature_trace` ((B, steps)), ``guard`` and ``guard_counters`` (interventions).
    """

    def __init__(self, policy, feature_spec: FeatureSpec | None = None, action_mapping: ActionMapping | None = None,
                 truncation: dict | None = None, **kwargs):
        super().__init__(policy, feature_spec, action_mapping, truncation, **kwargs)
        self._last_len: int | None = None
        self._last_tokens: torch.Tensor | None = None  # (B,) last column of the previous input_ids

    # ------------------------------------------------------------------ conveniences
    @property
    def category(self):
        return self.runtime.category

    @category.setter
    def category(self, value) -> None:
        """Category (one name, or one per row) of the rows of the *next* ``generate`` call."""
        self.runtime.category = value

    @property
    def temperatures(self) -> list[torch.Tensor]:
        return self.runtime.temperatures

    def temperature_trace(self) -> torch.Tensor:
        """(B, steps) temperatures chosen in the last ``generate`` call."""
        return self.runtime.temperature_trace()

    def reset(self) -> None:
        """Make the next call start a new generation (all rows fresh)."""
        self._last_len = None
        self._last_tokens = None

    # ------------------------------------------------------------------ the processor
    def generate(self, model, **generate_kwargs):
        """``model.generate(**generate_kwargs)`` with this processor, after checking the settings it samples with
        (:func:`generation_config_of`, :func:`check_generation_config`): the call is refused when transformers
        would warp the policy's distribution again. The processor runs last among the call's own
        ``logits_processor`` (added there when missing); a processor after it gets a ``RuntimeWarning``."""
        check_generation_config(generation_config_of(model, **generate_kwargs))
        processors = LogitsProcessorList(generate_kwargs.pop("logits_processor", None) or [])
        if not any(p is self for p in processors):
            processors.append(self)
        after = [type(p).__name__ for p in processors[next(i for i, p in enumerate(processors) if p is self) + 1:]]
        after = [name for name in after if name not in _HARMLESS]
        if after:
            warnings.warn(f"{', '.join(after)} run(s) after PolicyLogitsProcessor and may change the policy's "
                          "distribution; put PolicyLogitsProcessor last", RuntimeWarning, stacklevel=2)
        return model.generate(**generate_kwargs, logits_processor=processors)

    def _is_continuation(self, input_ids: torch.Tensor) -> bool:
        if self._last_len is None or self._last_tokens is None:
            return False
        batch, length = input_ids.shape
        if batch != self._last_tokens.shape[0] or length != self._last_len + 1:
            return False
        return bool(torch.equal(input_ids[:, -2], self._last_tokens))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
            raise ValueError(f"scores must be a (batch, vocab) tensor; got {getattr(scores, 'shape', type(scores))}")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.shape[0] != scores.shape[0]:
            raise ValueError(f"input_ids must be a (batch, length) tensor with the {scores.shape[0]} rows of scores; "
                             f"got {getattr(input_ids, 'shape', type(input_ids))}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids is empty; generation needs at least one prompt token per row")
        if self._is_continuation(input_ids):
            tokens = input_ids[:, -1]  # (B,) drawn at the previous step
        else:
            self.runtime.start(scores.shape[0], scores.device)
            tokens = None
        out = self.runtime.step(scores, tokens)  # (B, V) new tensor
        self._last_len = input_ids.shape[1]
        self._last_tokens = input_ids[:, -1].clone()
        return out
