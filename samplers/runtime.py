"""The deployment line shared by every engine adapter: logits -> featurizer -> policy -> temperature.

:class:`PolicyRuntime` runs, for a batch of rows, exactly what :class:`envs.generation.GenerationCore`
runs in training, minus the reward and the draw (the engine draws)::

    step(scores (B, V), tokens (B,) drawn since the last step or None)
        featurizer.update(tokens, T_prev)          # the history, as GenerationCore.step after its draw
        obs = featurizer.observe(scores)           # (B, F) raw features, policies/features.py
        T   = policy.temperatures(obs, episode_start)   # (B,) the one policy protocol (policies/base.py):
              # actions -> the mapping with its rate limit, as in training; behind the guard rails by default
        return apply_temperature(truncate(scores, truncation), T)                    # (B, V), a new tensor

The engine then samples from ``softmax`` of the returned logits with its own temperature at 1.0
and its own truncation off. Rows whose temperature is 0 (or ``|T| < 1e-6``) come back one-hot
(every other token ``-inf``), so any sampler draws the argmax / argmin exactly.

Adapters: :mod:`samplers.hf` (transformers ``LogitsProcessor``), :mod:`samplers.llama_cpp`
(llama-cpp-python, numpy), :mod:`samplers.vllm` (vLLM's batch-level logits processors: one row per
request slot, stepped a subset at a time with ``step(..., rows=slots)`` and :meth:`PolicyRuntime.reset_rows`).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Sequence

import torch

from policies.actions import ActionMapping
from policies.base import TemperaturePolicy
from policies.features import FeatureSpec, Featurizer
from policies.guard import GUARD_COUNTERS, GuardedPolicy, GuardSettings, apply_guard, resolve_guard
from samplers.core import Truncation, apply_temperature, check_logits, require_real, truncate

__all__ = ["PolicyRuntime", "RuntimeAdapter", "check_engine_model", "engine_model_identity"]


MODEL_CHECK_ENV = "KELVIN_MODEL_CHECK"


def _model_key(name) -> str:
    """A model's name without its folder, file type, quantisation or Kelvin cache suffix, lower case:
    'HuggingFaceTB/SmolLM2-135M-Instruct', '/x/SmolLM2-135M-Instruct.Q4_1.gguf' and 'smollm2-135m-instruct'
    all give 'smollm2-135m-instruct'."""
    key = Path(str(name).rstrip("/")).name.lower()
    key = re.sub(r"-[0-9a-f]{16}$", "", key)  # ~/.cache/kelvin/gguf/NAME-<hash>: a dequantised GGUF
    key = re.sub(r"\.gguf$", "", key)
    return re.sub(r"[.-](i?q\d[a-z0-9_]*|f16|f32|bf16)$", "", key)


def engine_model_identity(model) -> tuple[str | None, int | None]:
    """``(name, vocabulary size)`` of the model an engine runs: a Kelvin ``CausalLM``, a transformers
    model, a ``llama_cpp.Llama``, or a name (vocabulary unknown)."""
    if isinstance(model, (str, Path)):
        return str(model), None
    if hasattr(model, "tokenizer") and hasattr(model, "vocab_size") and hasattr(model, "name"):  # envs.lm.CausalLM
        return str(model.name), int(model.vocab_size)
    if hasattr(model, "model_path") and callable(getattr(model, "n_vocab", None)):  # llama_cpp.Llama
        return str(model.model_path), int(model.n_vocab())
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "vocab_size", None) is not None:  # transformers PreTrainedModel
        name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        return (str(name) if name else None), int(config.vocab_size)
    raise TypeError(f"model={type(model).__name__} is not a model Kelvin can identify; pass a Kelvin CausalLM, a "
                    "transformers model, a llama_cpp.Llama, or the model's name")


def check_engine_model(exported: dict, engine_name: str | None, engine_vocab: int | None) -> None:
    """Refuse a policy exported for another model than the engine runs (``exported``: spec.json ``model``).

    Different vocabulary sizes are always an error (token ids mean other tokens). Different names (compared
    by :func:`_model_key`) are an error too, unless ``KELVIN_MODEL_CHECK=vocab`` says they are the same model
    under two names. Unknown values (None) are not compared.
    """
    name, vocab = exported.get("name"), exported.get("vocab_size")
    vocab_differs = vocab is not None and engine_vocab is not None and int(vocab) != int(engine_vocab)
    name_differs = (name is not None and engine_name is not None and _model_key(name) != _model_key(engine_name)
                    and os.environ.get(MODEL_CHECK_ENV, "").lower() != "vocab")
    if vocab_differs or name_differs:
        hint = ("" if vocab_differs else f" If both are the same model under two names, set {MODEL_CHECK_ENV}=vocab "
                                         "to compare vocabularies only.")
        raise ValueError(
            f"this policy was exported for model {name!r} (vocabulary {vocab}) but the engine runs {engine_name!r} "
            f"(vocabulary {engine_vocab}): its features and temperatures only make sense on the model it was "
            f"trained with. Run {name!r}, or train and export a policy on {engine_name!r}.{hint}")


def check_diversity(value, spec: FeatureSpec | None, trained_range: tuple[float, float] | None, owner: str = "diversity") -> float:
    """The diversity dial λ as a float, or a ``ValueError`` naming ``owner`` and the fix: the policy must read λ
    (``features.include_diversity``; ``spec`` None: not checked), λ must be finite and >= 0, and inside
    ``trained_range`` when that is known (a network is not to be trusted on inputs it never saw)."""
    if spec is not None and not spec.include_diversity:
        raise ValueError(f"{owner}={value!r} was given, but this policy has no diversity dial (trained with "
                         "features.include_diversity=false); drop it")
    try:
        diversity = math.nan if isinstance(value, bool) else float(value)  # True is not λ = 1
    except (TypeError, ValueError):
        diversity = math.nan
    if not math.isfinite(diversity) or diversity < 0:
        raise ValueError(f"{owner}={value!r} must be a finite number >= 0 (the weight of diversity in the reward the "
                         "policy was trained on)")
    if trained_range is not None:
        lo, hi = trained_range
        if not lo - 1e-9 <= diversity <= hi + 1e-9:
            raise ValueError(f"{owner}={diversity:g} is outside the range the policy was trained on [{lo:g}, {hi:g}]; "
                             f"choose a value in it (or train with env.diversity_range covering {diversity:g})")
    return diversity


class PolicyRuntime:
    """Featurizer + policy + truncation for a batch of rows (see the module doc).

    Arguments: ``policy`` (a :class:`~policies.base.TemperaturePolicy`: a baseline,
    :func:`policies.load_policy` output, a :class:`~policies.learned.LearnedPolicy`), ``feature_spec`` /
    ``action_mapping`` (default: the policy's; given, they must be the policy's), ``truncation``
    (a :class:`~samplers.core.Truncation` or ``{top_k, top_p, min_p, top_n_sigma}``; default off),
    ``token_prior`` ((V,) per-token anomaly priors the featurizer used in training), ``category`` /
    ``diversity`` (the conditioning inputs, when the feature spec has them: the task category and the
    diversity dial λ; applied to every row a :meth:`start` begins). ``diversity_range``: the λ range the
    policy was trained on (``spec.json`` ``diversity.range``; from :meth:`pretrained_arguments`): a λ
    outside it is refused, since the network never saw it. ``guard``: guard rails around the policy (:mod:`policies.guard`), **on by
    default**: ``True`` (default settings), a dict of settings (``{"max_delta": 0.3, "safe_range": (0.2,
    0.6)}``) or ``False`` (the policy's temperatures as they are). :attr:`guard` is the
    :class:`~policies.guard.GuardedPolicy` (None when off), :attr:`guard_counters` its intervention
    counts since construction (they add up over generate calls; ``runtime.guard.reset_counters()``).

    ``temperatures`` holds the (B,) temperatures of every step since the last :meth:`start`.
    """

    def __init__(self, policy: TemperaturePolicy, feature_spec: FeatureSpec | None = None,
                 action_mapping: ActionMapping | None = None, truncation: Truncation | dict | None = None,
                 token_prior: torch.Tensor | None = None, category=None, diversity=None, record: bool = True,
                 guard: bool | dict | GuardSettings | None = True, exported_model: dict | None = None,
                 diversity_range: tuple[float, float] | None = None):
        if not isinstance(policy, TemperaturePolicy):
            raise TypeError(f"policy must answer predict(obs, state, episode_start, deterministic) and actions(obs) as "
                            f"a Kelvin TemperaturePolicy does (a baseline, a LearnedPolicy, policies.load_policy(path)); "
                            f"got {type(policy).__name__}")
        if feature_spec is not None and feature_spec.names != policy.feature_spec.names:
            raise ValueError(f"the policy reads features {list(policy.feature_spec.names)} but feature_spec describes "
                             f"{list(feature_spec.names)}; pass the spec the policy was trained with")
        if action_mapping is not None and action_mapping != policy.action_mapping:
            raise ValueError(f"the policy's actions mean temperatures through {policy.action_mapping}, not "
                             f"{action_mapping}; pass the mapping the policy was trained with (or none)")
        self.truncation = truncation if isinstance(truncation, Truncation) else Truncation.from_dict(truncation)
        if token_prior is not None:
            token_prior = torch.as_tensor(token_prior, dtype=torch.float32).reshape(-1)
        policy = apply_guard(policy, guard)
        self.guard: GuardedPolicy | None = policy if isinstance(policy, GuardedPolicy) else None
        self.policy = policy
        self.feature_spec = policy.feature_spec
        self.action_mapping = policy.action_mapping if self.guard is None else self.guard.policy.action_mapping
        self.token_prior = token_prior
        self.category = category
        self.diversity_range = None if diversity_range is None else (float(diversity_range[0]), float(diversity_range[1]))
        self.diversity = None if diversity is None else self.check_diversity(diversity)
        self.record = record
        self.exported_model = dict(exported_model or {})
        """spec.json ``model`` of the export this runtime runs (``{name, vocab_size}``; empty when built by hand)."""
        if category is not None:  # validate the names now, not at the first generate step
            self.feature_spec.category_rows(category, 1 if isinstance(category, (str, int)) else len(category))
        self.featurizer: Featurizer | None = None
        self.temperatures: list[torch.Tensor] = []
        self._last_t: torch.Tensor | None = None  # (B,) temperatures of the previous step
        self._episode_start: torch.Tensor | None = None  # (B,) bool: rows whose next step is their first

    @property
    def guard_counters(self) -> dict[str, int]:
        """The guard's interventions ``{clamp, rate_limit, anomaly_reset, fallback}`` plus ``decisions``
        (row-steps seen); all 0 when the guard is off."""
        if self.guard is None:
            return {**dict.fromkeys(GUARD_COUNTERS, 0), "decisions": 0}
        return {**self.guard.counters, "decisions": self.guard.decisions}

    @classmethod
    def pretrained_arguments(cls, path, kwargs: dict, model=None) -> tuple[tuple, dict]:
        """``(args, kwargs)`` for an adapter's constructor from an export directory (``from_pretrained``).

        The artifact gives policy, feature spec, action mapping, truncation and token prior; its
        ``guard`` block gives the guard settings. The caller's ``guard`` decides: None (default)
        = the export's setting, False = off, True = on with the export's settings, a dict = the
        export's settings updated with these. ``model`` (the engine's model, see
        :func:`engine_model_identity`) is checked against the model the policy was exported for.
        """
        from policies.artifact import load_artifact

        art = load_artifact(path)
        if model is not None:
            check_engine_model(art.model, *engine_model_identity(model))
        kwargs = dict(kwargs)
        kwargs.setdefault("token_prior", art.token_prior)
        kwargs["guard"] = resolve_guard(kwargs.get("guard"), art.action_mapping, base=art.guard)
        kwargs.setdefault("exported_model", art.model)
        kwargs.setdefault("diversity_range", art.diversity_range)
        return (art.policy, art.feature_spec, art.action_mapping, art.truncation), kwargs

    # ------------------------------------------------------------------ rows
    @property
    def batch_size(self) -> int:
        return 0 if self.featurizer is None else self.featurizer.batch_size

    def _prior_on(self, device: torch.device) -> torch.Tensor | None:
        if self.token_prior is not None and self.token_prior.device != device:
            self.token_prior = self.token_prior.to(device)
        return self.token_prior

    def check_diversity(self, value, owner: str = "diversity") -> float:
        """``value`` as the λ this policy reads, or a ``ValueError`` naming ``owner``: the policy must have a
        diversity dial, λ must be a finite number >= 0 and inside the trained range (when known)."""
        return check_diversity(value, self.feature_spec, self.diversity_range, owner)

    def start(self, batch_size: int, device: torch.device | str = "cpu", category=None, diversity=None) -> None:
        """Fresh episodes on every row (a new generate call): featurizer, policy state, recorded temperatures.

        ``category`` / ``diversity`` override the constructor's for these rows.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        device = torch.device(device)
        self.featurizer = Featurizer(self.feature_spec, batch_size, device, token_prior=self._prior_on(device))
        cats = self.feature_spec.category_rows(self.category if category is None else category, batch_size)
        dw = self.diversity if diversity is None else self.check_diversity(diversity)
        if cats is not None or dw is not None:
            self.featurizer.reset(None, category=cats, diversity=dw)
        self.policy.reset(batch_size)
        self._last_t = torch.full((batch_size,), self.feature_spec.initial_temperature, device=device)
        self._episode_start = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.temperatures = []

    def reset_rows(self, rows: Sequence[int] | torch.Tensor, category=None, diversity=None) -> None:
        """Start fresh episodes on ``rows`` only (a request entering an engine slot); the others keep theirs.

        ``category`` (one name / index for all these rows) and ``diversity`` (one λ) set their
        conditioning inputs; None keeps the constructor's. The policy's per-row state resets at the rows'
        next step (``episode_start``).
        """
        f = self.featurizer
        if f is None:
            raise RuntimeError("PolicyRuntime.reset_rows called before start(batch_size, device)")
        idx = torch.as_tensor(rows, dtype=torch.long, device=f.device).reshape(-1)
        if idx.numel() == 0:
            return
        if bool(((idx < 0) | (idx >= f.batch_size)).any()):
            raise ValueError(f"rows {idx.tolist()} outside the {f.batch_size} rows started")
        cat = self.category if category is None else category
        cats = None if cat is None else self.feature_spec.category_rows(cat, 1) * idx.numel()
        dw = self.diversity if diversity is None else self.check_diversity(diversity)
        f.reset(idx, category=cats, diversity=dw)
        self._last_t[idx] = self.feature_spec.initial_temperature
        self._episode_start[idx] = True

    def _policies(self) -> list:
        """The stateful policies whose per-row state follows the rows (the guard and the policy inside it)."""
        return [p for p in (self.policy, getattr(self.guard, "policy", None)) if isinstance(p, TemperaturePolicy)]

    def _enter_rows(self, rows: torch.Tensor) -> dict:
        """Swap the state of ``rows`` (R,) in for a step on those rows alone; returns the full state."""
        full = {"featurizer": self.featurizer.enter_rows(rows), "last_t": self._last_t,
                "start": self._episode_start, "policy": [p.row_state for p in self._policies()]}
        self._last_t, self._episode_start = self._last_t[rows], self._episode_start[rows]
        for p, st in zip(self._policies(), full["policy"]):
            p.row_state = None if not st else {k: v.to(rows.device)[rows] for k, v in st.items()}
        return full

    def _leave_rows(self, rows: torch.Tensor, full: dict) -> None:
        """Write the state of ``rows`` after their step back into the full state (the inverse of _enter_rows)."""
        self.featurizer.leave_rows(rows, full["featurizer"])
        full["last_t"][rows] = self._last_t
        full["start"][rows] = self._episode_start
        self._last_t, self._episode_start = full["last_t"], full["start"]
        for p, st in zip(self._policies(), full["policy"]):
            sub = p.row_state
            if sub and st:
                for k, v in st.items():
                    v = v.to(rows.device)
                    v[rows] = sub[k]
                    st[k] = v
            p.row_state = st if st else sub

    # ------------------------------------------------------------------ per step
    def step(self, scores: torch.Tensor, tokens: torch.Tensor | None = None,
             drew: torch.Tensor | None = None, rows: torch.Tensor | Sequence[int] | None = None) -> torch.Tensor:
        """Tempered logits (B, V) for next-token ``scores`` (B, V); ``scores`` is left unchanged.

        ``tokens`` (B,) are the tokens drawn since the previous step (None on a first step);
        ``drew`` (B,) bool limits the update to the rows that drew one (None = every row).
        ``rows`` (R,) steps only those rows of the started batch (engine slots), ``scores`` being (R, V)
        in that order; the other rows keep their state untouched (None = every row, in order).
        """
        if rows is None:
            return self._step(scores, tokens, drew)
        if self.featurizer is None:
            raise RuntimeError("PolicyRuntime.step called before start(batch_size, device)")
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.featurizer.device).reshape(-1)  # (R,)
        if idx.shape[0] != getattr(scores, "shape", (None,))[0]:
            raise ValueError(f"rows has {idx.shape[0]} entries for {getattr(scores, 'shape', ['?'])[0]} rows of scores")
        if bool(((idx < 0) | (idx >= self.featurizer.batch_size)).any()) or idx.unique().numel() != idx.numel():
            raise ValueError(f"rows {idx.tolist()[:16]} must be distinct rows in [0, {self.featurizer.batch_size})")
        full = self._enter_rows(idx)
        try:
            return self._step(scores, tokens, drew)
        finally:
            self._leave_rows(idx, full)

    @property
    def last_temperature(self) -> torch.Tensor | None:
        """(B,) the temperature each row used at its latest step (the initial temperature before any)."""
        return self._last_t

    def _step(self, scores: torch.Tensor, tokens: torch.Tensor | None, drew: torch.Tensor | None) -> torch.Tensor:
        f = self.featurizer
        if f is None:
            raise RuntimeError("PolicyRuntime.step called before start(batch_size, device)")
        if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
            raise ValueError(f"scores must be a (B, V) tensor; got {getattr(scores, 'shape', type(scores).__name__)}")
        require_real(scores, "scores", "pass the engine's real-valued logits")
        if scores.shape[0] != f.batch_size:
            raise ValueError(f"scores have {scores.shape[0]} rows but {f.batch_size} rows are tracked; call start()")
        vocab = self.exported_model.get("vocab_size")
        vocab = int(vocab) if vocab is not None else (None if f.token_prior is None else f.token_prior.shape[0])
        if vocab is not None and vocab != scores.shape[1]:
            name = self.exported_model.get("name")
            raise ValueError(
                f"the logits have {scores.shape[1]} columns (the engine model's vocabulary) but the policy was "
                f"exported for another model{f' ({name!r})' if name else ''} with a vocabulary of {vocab}: use the "
                "model it was trained with (spec.json 'model'), or train and export a policy on this one")
        check_logits(scores)  # before the featurizer reads them
        if tokens is not None:
            tokens = torch.as_tensor(tokens, device=f.device).long().reshape(-1)  # (B,)
            if drew is None or bool(drew.any()):
                f.update(tokens, self._last_t, rows=drew)
        obs = f.observe(scores.detach().clone())  # (B, F); a copy: engines may reuse or edit their logits buffer
        temperature = self.policy.temperatures(obs, self._episode_start).to(f.device)  # (B,)
        self._last_t = temperature
        self._episode_start = torch.zeros_like(self._episode_start)
        if self.record:
            self.temperatures.append(temperature)
        kept = truncate(scores, **self.truncation.to_dict()) if self.truncation.active else scores  # (B, V)
        return apply_temperature(kept, temperature.to(scores.device))  # (B, V), new tensor

    def temperature_trace(self) -> torch.Tensor:
        """(B, steps) temperatures chosen since the last :meth:`start` (steps = 0 before the first)."""
        if not self.temperatures:
            return torch.zeros((self.batch_size, 0))
        return torch.stack(self.temperatures, dim=1)


class RuntimeAdapter:
    """The part every single-call engine adapter shares: a :class:`PolicyRuntime` built from a policy
    (the constructor) or from an export directory (:meth:`from_pretrained`), and its guard.

    Subclasses add the engine's calling convention (``__call__``) and how it marks a new generation.
    """

    def __init__(self, policy: TemperaturePolicy, feature_spec: FeatureSpec | None = None,
                 action_mapping: ActionMapping | None = None, truncation: Truncation | dict | None = None, *,
                 token_prior: torch.Tensor | None = None, category=None,
                 diversity=None, guard: bool | dict | None = True, exported_model: dict | None = None,
                 diversity_range: tuple[float, float] | None = None):
        self.runtime = PolicyRuntime(policy, feature_spec, action_mapping, truncation, token_prior=token_prior,
                                     category=category, diversity=diversity, guard=guard,
                                     exported_model=exported_model, diversity_range=diversity_range)

    @classmethod
    def from_pretrained(cls, path, model=None, **kwargs):
        """From an export directory (``python -m kelvin.export``); keyword arguments as the constructor's,
        ``guard`` as :meth:`PolicyRuntime.pretrained_arguments` resolves it. ``model``: the engine's model
        (a transformers model, a ``llama_cpp.Llama``, a Kelvin ``CausalLM`` or a name); an export trained on
        another model is then refused with both names."""
        args, kwargs = PolicyRuntime.pretrained_arguments(path, kwargs, model=model)
        return cls(*args, **kwargs)

    @property
    def policy(self):
        """The policy as the runtime runs it (a :class:`~policies.guard.GuardedPolicy` unless ``guard=False``)."""
        return self.runtime.policy

    @property
    def truncation(self) -> Truncation:
        return self.runtime.truncation

    @property
    def guard(self):
        """The :class:`policies.guard.GuardedPolicy` around the policy (None when ``guard=False``)."""
        return self.runtime.guard

    @property
    def guard_counters(self) -> dict[str, int]:
        """Guard interventions ``{clamp, rate_limit, anomaly_reset, fallback, decisions}`` since construction."""
        return self.runtime.guard_counters
