"""The deployment line shared by every engine adapter: logits -> featurizer -> policy -> temperature.

:class:`PolicyRuntime` runs, for a batch of rows, exactly what :class:`envs.generation.GenerationCore`
runs in training, minus the reward and the draw (the engine draws)::

    step(scores (B, V), tokens (B,) drawn since the last step or None)
        featurizer.update(tokens, T_prev)          # the history, as GenerationCore.step after its draw
        obs = featurizer.observe(scores)           # (B, F) raw features, policies/features.py
        a   = policy actions(obs, episode_start)   # (B,) in [-1, 1]; the policy behind its guard rails (on by default)
        T   = mapping.to_temperature(a, previous=T_prev, first_step=position == 0)   # rate limit as in training
        return apply_temperature(truncate(scores, **truncation), T)                  # (B, V), a new tensor

The engine then samples from ``softmax`` of the returned logits with its own temperature at 1.0
and its own truncation off. Rows whose temperature is 0 (or ``|T| < 1e-6``) come back one-hot
(every other token ``-inf``), so any sampler draws the argmax / argmin exactly.

Adapters: :mod:`samplers.hf` (transformers ``LogitsProcessor``), :mod:`samplers.llama_cpp`
(llama-cpp-python, numpy), :mod:`samplers.vllm` (vLLM's batch-level logits processors: one row per
request slot, stepped a subset at a time with ``step(..., rows=slots)`` and :meth:`PolicyRuntime.reset_rows`).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from policies.actions import ActionMapping
from policies.base import TemperaturePolicy
from policies.features import FeatureSpec, Featurizer
from policies.guard import GUARD_COUNTERS, GuardedPolicy, apply_guard
from samplers.core import _check_truncation, apply_temperature, truncate

__all__ = ["PolicyRuntime", "RuntimeAdapter", "category_indices", "check_engine_model", "engine_model_identity",
           "merge_guard"]

_TRUNCATION_KEYS = ("top_k", "top_p", "min_p", "top_n_sigma")


def merge_guard(exported: bool | dict, requested: bool | dict | None) -> bool | dict:
    """The guard setting of a sampler built from an export: the export's ``guard`` block, then the caller's.

    ``requested`` None keeps ``exported``; False switches the guard off; True switches it on with
    the exported settings; a dict updates the exported settings (and switches the guard on unless
    it says ``enabled``).
    """
    if requested is None:
        return exported
    if requested is False:
        return False
    base = dict(exported) if isinstance(exported, dict) else {}
    if requested is True:
        return {**base, "enabled": True}
    if isinstance(requested, dict):
        return {**base, "enabled": True, **requested}
    raise TypeError(f"guard={requested!r} must be None (the export's setting), True, False or a dict of settings")


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


def category_indices(spec: FeatureSpec, category, batch_size: int) -> list[int] | None:
    """One-hot slots (B,) for ``category``: None, a name / index for every row, or one per row.

    Names index ``spec.categories``; ``"other"`` (or None inside a list) is the final slot. Returns
    None when ``category`` is None (rows keep the "other" slot a fresh featurizer row starts with).
    """
    if category is None:
        return None
    if not spec.categories:
        raise ValueError("category was given, but this policy has no category features (it was trained with "
                         "env.include_category=false); drop the category argument")
    items = [category] * batch_size if isinstance(category, (str, int)) else list(category)
    if len(items) != batch_size:
        raise ValueError(f"category has {len(items)} entries for a batch of {batch_size} rows; give one per row "
                         "or a single name for all")
    out = []
    other = len(spec.categories)
    for c in items:
        if c is None or c == "other":
            out.append(other)
        elif isinstance(c, str):
            if c not in spec.categories:
                close = difflib.get_close_matches(c, list(spec.categories), n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise ValueError(f"unknown category {c!r}; {hint}known: {', '.join(spec.categories)} (or 'other')")
            out.append(spec.categories.index(c))
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= int(c) <= other:
            out.append(int(c))
        else:
            raise ValueError(f"category {c!r} must be a name ({', '.join(spec.categories)}, other) or an index "
                             f"in [0, {other}]")
    return out


class PolicyRuntime:
    """Featurizer + policy + action mapping + truncation for a batch of rows (see the module doc).

    Arguments: ``policy`` (anything with the one policy interface: a baseline, an
    :class:`~policies.artifact.ExportedPolicy`, a :class:`~policies.learned.LearnedPolicy`),
    ``feature_spec`` / ``action_mapping`` (default: the policy's), ``truncation`` (``top_k``,
    ``top_p``, ``min_p``, ``top_n_sigma``; default off), ``token_prior`` ((V,) per-token anomaly
    priors the featurizer used in training), ``category`` / ``diversity_weight`` (the conditioning
    inputs, when the feature spec has them; applied to every row a :meth:`start` begins).
    ``guard``: guard rails around the policy (:mod:`policies.guard`), **on by default**: ``True``
    (default settings), a dict of settings (``{"max_delta": 0.3, "safe_range": (0.2, 0.6)}``) or
    ``False`` (the policy's temperatures as they are). :attr:`guard` is the
    :class:`~policies.guard.GuardedPolicy` (None when off), :attr:`guard_counters` its intervention
    counts since construction (they add up over generate calls; ``runtime.guard.reset_counters()``).

    ``temperatures`` holds the (B,) temperatures of every step since the last :meth:`start`.
    """

    def __init__(self, policy, feature_spec: FeatureSpec | None = None, action_mapping: ActionMapping | None = None,
                 truncation: dict | None = None, token_prior: torch.Tensor | None = None,
                 category=None, diversity_weight=None, record: bool = True, guard: bool | dict | None = True,
                 exported_model: dict | None = None):
        if not hasattr(policy, "predict"):
            raise TypeError(f"policy must answer predict(obs, state, episode_start, deterministic) (a Kelvin policy "
                            f"or policies.load_policy(path)); got {type(policy).__name__}")
        feature_spec = feature_spec if feature_spec is not None else getattr(policy, "feature_spec", None)
        action_mapping = action_mapping if action_mapping is not None else getattr(policy, "action_mapping", None)
        if not isinstance(feature_spec, FeatureSpec):
            raise TypeError(f"feature_spec must be a policies.features.FeatureSpec; got {type(feature_spec).__name__}")
        if not isinstance(action_mapping, ActionMapping):
            raise TypeError(f"action_mapping must be a policies.actions.ActionMapping; "
                            f"got {type(action_mapping).__name__}")
        pol_spec = getattr(policy, "feature_spec", None)
        if isinstance(pol_spec, FeatureSpec) and pol_spec.names != feature_spec.names:
            raise ValueError(f"the policy reads features {list(pol_spec.names)} but feature_spec describes "
                             f"{list(feature_spec.names)}; pass the spec the policy was trained with")
        t = dict(truncation or {})
        unknown = set(t) - set(_TRUNCATION_KEYS)
        if unknown:
            close = difflib.get_close_matches(sorted(unknown)[0], _TRUNCATION_KEYS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown truncation keys {sorted(unknown)}{hint}; valid: {', '.join(_TRUNCATION_KEYS)}")
        top_k, top_p, min_p, top_n_sigma = _check_truncation(t.get("top_k", 0), t.get("top_p", 1.0),
                                                             t.get("min_p", 0.0), t.get("top_n_sigma"))
        self.truncation = {"top_k": top_k, "top_p": top_p, "min_p": min_p, "top_n_sigma": top_n_sigma}
        self._truncating = top_k > 0 or top_p < 1.0 or min_p > 0.0 or top_n_sigma is not None
        if token_prior is not None:
            token_prior = torch.as_tensor(token_prior, dtype=torch.float32).reshape(-1)
        policy = apply_guard(policy, guard)
        self.guard: GuardedPolicy | None = policy if isinstance(policy, GuardedPolicy) else None
        self.policy = policy
        self.feature_spec = feature_spec
        self.action_mapping = action_mapping
        self.token_prior = token_prior
        self.category = category
        self.diversity_weight = diversity_weight
        self.record = record
        self.exported_model = dict(exported_model or {})
        """spec.json ``model`` of the export this runtime runs (``{name, vocab_size}``; empty when built by hand)."""
        if category is not None:  # validate the names now, not at the first generate step
            category_indices(feature_spec, category, 1 if isinstance(category, (str, int)) else len(category))
        if diversity_weight is not None and not feature_spec.include_diversity_weight:
            raise ValueError("diversity_weight was given, but this policy is not conditioned on it "
                             "(features.include_diversity_weight is false); drop the argument")
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
        kwargs["guard"] = merge_guard(art.guard, kwargs.get("guard"))
        kwargs.setdefault("exported_model", art.model)
        return (art.policy, art.feature_spec, art.action_mapping, art.truncation), kwargs

    # ------------------------------------------------------------------ rows
    @property
    def batch_size(self) -> int:
        return 0 if self.featurizer is None else self.featurizer.batch_size

    def _prior_on(self, device: torch.device) -> torch.Tensor | None:
        if self.token_prior is not None and self.token_prior.device != device:
            self.token_prior = self.token_prior.to(device)
        return self.token_prior

    def start(self, batch_size: int, device: torch.device | str = "cpu", category=None, diversity_weight=None) -> None:
        """Fresh episodes on every row (a new generate call): featurizer, policy state, recorded temperatures.

        ``category`` / ``diversity_weight`` override the constructor's for these rows.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        device = torch.device(device)
        self.featurizer = Featurizer(self.feature_spec, batch_size, device, token_prior=self._prior_on(device))
        cats = category_indices(self.feature_spec, self.category if category is None else category, batch_size)
        dw = self.diversity_weight if diversity_weight is None else diversity_weight
        if cats is not None or dw is not None:
            self.featurizer.reset(None, category=cats, diversity_weight=dw)
        if hasattr(self.policy, "reset"):
            self.policy.reset(batch_size)
        self._last_t = torch.full((batch_size,), self.feature_spec.initial_temperature, device=device)
        self._episode_start = torch.ones(batch_size, dtype=torch.bool, device=device)
        self.temperatures = []

    def reset_rows(self, rows: Sequence[int] | torch.Tensor, category=None, diversity_weight=None) -> None:
        """Start fresh episodes on ``rows`` only (a request entering an engine slot); the others keep theirs.

        ``category`` (one name / index for all these rows) and ``diversity_weight`` (one value) set their
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
        cats = None if cat is None else category_indices(self.feature_spec, cat, 1) * idx.numel()
        dw = self.diversity_weight if diversity_weight is None else diversity_weight
        f.reset(idx, category=cats, diversity_weight=dw)
        self._last_t[idx] = self.feature_spec.initial_temperature
        self._episode_start[idx] = True

    def _policies(self) -> list:
        """The stateful policies whose per-row ``_state`` follows the rows (the guard and the policy inside it)."""
        return [p for p in (self.policy, getattr(self.guard, "policy", None)) if isinstance(p, TemperaturePolicy)]

    def _enter_rows(self, rows: torch.Tensor) -> dict:
        """Swap the state of ``rows`` (R,) in for a step on those rows alone; returns the full state."""
        f = self.featurizer
        full = {"state": f.state, "logp": f._logp, "last_t": self._last_t, "start": self._episode_start,
                "policy": [p._state for p in self._policies()]}
        f.state = type(f.state)(**{name: getattr(f.state, name)[rows] for name in f.state.__dataclass_fields__})
        f._logp = None if full["logp"] is None else full["logp"][rows]
        self._last_t, self._episode_start = self._last_t[rows], self._episode_start[rows]
        for p, st in zip(self._policies(), full["policy"]):
            p._state = None if not st else {k: v.to(rows.device)[rows] for k, v in st.items()}
        return full

    def _leave_rows(self, rows: torch.Tensor, full: dict) -> None:
        """Write the state of ``rows`` after their step back into the full state (the inverse of _enter_rows)."""
        f = self.featurizer
        sub_state, sub_logp = f.state, f._logp
        for name in sub_state.__dataclass_fields__:
            getattr(full["state"], name)[rows] = getattr(sub_state, name)
        logp = full["logp"]
        if sub_logp is not None:  # the next update of these rows reads the log-probs observed now: (slots, V)
            if logp is None or logp.shape[1] != sub_logp.shape[1]:
                logp = torch.zeros((full["last_t"].shape[0], sub_logp.shape[1]), dtype=sub_logp.dtype,
                                   device=sub_logp.device)
            logp[rows] = sub_logp
        f.state, f._logp, f._dist = full["state"], logp, None
        full["last_t"][rows] = self._last_t
        full["start"][rows] = self._episode_start
        self._last_t, self._episode_start = full["last_t"], full["start"]
        for p, st in zip(self._policies(), full["policy"]):
            sub = p._state
            if sub and st:
                for k, v in st.items():
                    v = v.to(rows.device)
                    v[rows] = sub[k]
                    st[k] = v
            p._state = st if st else sub

    # ------------------------------------------------------------------ per step
    def _actions(self, policy, obs: torch.Tensor, episode_start: torch.Tensor) -> torch.Tensor:
        """(B,) actions in [-1, 1] of ``policy`` on ``obs``'s device, through each policy's own fast path."""
        with torch.no_grad():
            if isinstance(policy, TemperaturePolicy):  # == predict(), without the numpy round trip
                return policy.action_mapping.to_action(policy.temperatures(obs, episode_start))
            if hasattr(policy, "actions"):  # policies.artifact.ExportedPolicy
                return policy.actions(obs)
            actions, _ = policy.predict(obs.cpu().numpy(), state=None, episode_start=episode_start.cpu().numpy(),
                                        deterministic=True)
        return torch.as_tensor(np.asarray(actions, dtype=np.float32).reshape(-1), device=obs.device)

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
        zmax = scores.amax(dim=-1)  # (B,): NaN, +inf and all -inf rows show here
        if not bool(torch.isfinite(zmax).all()):  # check before the featurizer reads them
            rows = torch.nonzero(~torch.isfinite(zmax)).flatten().tolist()
            raise ValueError(
                f"logits rows {rows[:10]} contain NaN or +inf, or are entirely -inf. Check the model outputs "
                "(float16 overflow? run the model in float32 or bfloat16); mask tokens with -inf, never with NaN "
                "or +inf, and keep at least one finite logit per row")
        if tokens is not None:
            tokens = torch.as_tensor(tokens, device=f.device).long().reshape(-1)  # (B,)
            if drew is None:
                f.update(tokens, self._last_t)
            else:
                self._masked_update(tokens, drew.to(f.device).bool().reshape(-1))
        obs = f.observe(scores)  # (B, F)
        starts = self._episode_start
        s = f.state

        def policy_temperatures(o: torch.Tensor) -> torch.Tensor:  # (B,) exactly as the env applies them
            actions = self._actions(self.policy if self.guard is None else self.guard.policy, o, starts)
            return self.action_mapping.to_temperature(actions.to(f.device), previous=s.prev_temperature,
                                                      first_step=s.position == 0)

        if self.guard is None:
            temperature = policy_temperatures(obs)  # (B,)
        else:  # the guard sees the policy's temperatures after the mapping's own rate limit and has the last word
            with torch.no_grad():
                temperature = self.guard.temperatures(obs, starts, inner=policy_temperatures).to(f.device)
        self._last_t = temperature
        self._episode_start = torch.zeros_like(starts)
        if self.record:
            self.temperatures.append(temperature)
        kept = truncate(scores, **self.truncation) if self._truncating else scores  # (B, V)
        return apply_temperature(kept, temperature.to(scores.device))  # (B, V), new tensor

    def _masked_update(self, tokens: torch.Tensor, drew: torch.Tensor) -> None:
        """``featurizer.update`` on the rows where ``drew``; the other rows keep their state."""
        f = self.featurizer
        if not bool(drew.any()):
            return
        before = {name: getattr(f.state, name) for name in f.state.__dataclass_fields__}
        f.update(torch.where(drew, tokens, torch.zeros_like(tokens)), self._last_t)  # new tensors, no in-place
        for name, old in before.items():
            new = getattr(f.state, name)
            mask = drew.view((-1,) + (1,) * (new.ndim - 1))
            setattr(f.state, name, torch.where(mask, new, old))

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

    def __init__(self, policy, feature_spec: FeatureSpec | None = None, action_mapping: ActionMapping | None = None,
                 truncation: dict | None = None, *, token_prior: torch.Tensor | None = None, category=None,
                 diversity_weight=None, guard: bool | dict | None = True, exported_model: dict | None = None):
        self.runtime = PolicyRuntime(policy, feature_spec, action_mapping, truncation, token_prior=token_prior,
                                     category=category, diversity_weight=diversity_weight, guard=guard,
                                     exported_model=exported_model)

    @classmethod
    def from_pretrained(cls, path, model=None, **kwargs):
        """From an export directory (``python -m policies.export``); keyword arguments as the constructor's,
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
    def truncation(self) -> dict:
        return dict(self.runtime.truncation)

    @property
    def guard(self):
        """The :class:`policies.guard.GuardedPolicy` around the policy (None when ``guard=False``)."""
        return self.runtime.guard

    @property
    def guard_counters(self) -> dict[str, int]:
        """Guard interventions ``{clamp, rate_limit, anomaly_reset, fallback, decisions}`` since construction."""
        return self.runtime.guard_counters
