"""A Kelvin temperature policy as a vLLM logits processor, for both of vLLM's custom-processor interfaces.

Followed (vLLM's source on GitHub, read, not run: vLLM has no CPU wheel here; vLLM main of late 2026, the
v0.23 line, where Model Runner V2 became the default for Llama / Mistral / Qwen3 architectures. The V2
interface changed several times; this follows its latest form, newer than commit 16aa6ff8a5df, whose
``interface.py`` still had ``__init__(vllm_config, device, is_pin_memory)`` and ``apply(logits,
expanded_idx_mapping, idx_mapping_np)``; the legacy file as of commit 05da17cdc63b):

* **Model Runner V2** (what vLLM uses by default for Llama-architecture models such as SmolLM2;
  ``VLLM_USE_V2_MODEL_RUNNER=1`` forces it): ``vllm/v1/worker/gpu/sample/logits_processor/interface.py``,
  the version with ``LogitsProcRequestState`` and ``LogitsContext``: ``__init__(vllm_config, req_states)``,
  ``validate_params(sampling_params)`` (a classmethod run at request admission), ``add_request(req_idx,
  sampling_params) -> bool`` (the slot may hold a previous occupant's state), ``apply_staged_writes()``
  (once per step, after the model runner flushed ``req_states``), ``apply(logits, ctx)`` with rows mapped
  to slots through ``ctx.expanded_idx_mapping``. Slots are recycled through a free list and never move.
  The sampler (``vllm/v1/worker/gpu/sample/sampler.py``) runs it after logit bias, penalties, bad words and
  the grammar bitmask, and before temperature, min-p and top-k / top-p. The token history is read from
  ``req_states`` on the device: ``all_token_ids[slot, :total_len]``.
  :class:`KelvinLogitsProcessor`.
* **the legacy V1 interface** (``VLLM_USE_V2_MODEL_RUNNER=0``, and vLLM < 0.23):
  ``vllm/v1/sample/logits_processor/interface.py``: ``__init__(vllm_config, device, is_pin_memory)``,
  ``update_state(BatchUpdate | None)`` with ``removed`` rows, ``added`` ``(row, params, prompt_ids,
  output_ids)`` (``output_ids`` is the request's live list of generated tokens) and ``moved`` ``(a, b,
  SWAP | UNIDIRECTIONAL)``, processed in that order; ``apply(logits)``; ``is_argmax_invariant()``.
  :class:`KelvinLegacyLogitsProcessor`.

One state machine, :class:`RequestSlots`, serves both: every request owns a slot (a row of one
:class:`~samplers.runtime.PolicyRuntime` started with ``capacity`` rows) from ``add`` to ``remove``; each
step the logits rows name their slots, the runtime steps those rows alone (featurizer, policy state,
guard, previous temperature) and the other slots stay untouched. V2 hands its slot indices over as they
are; the legacy adapter keeps a row -> slot table that follows vLLM's removes, adds and moves. So the ``n``
samples of one prompt (``SamplingParams(n=4)``: vLLM runs them as separate requests) each have their own
state (vLLM issue #28233), and a reused slot starts clean.

Per-step history: a slot whose request drew a token since its previous step updates its features with
that token and the temperature it was drawn with (V2: ``total_len`` grew; legacy: the live output list
grew). A preempted request that comes back is a new ``add``: its features start afresh (its position
counts from the resume, like a new completion with its partial output as prompt). In V2, a row still in
a chunked prefill (``seq_len < prefill_len``, its sample is discarded) is left untouched and its state does
not advance; the legacy interface cannot tell such rows apart.

Logits vLLM masked to ``-inf`` before the processor (grammar, bad words, ``allowed_token_ids``) stay
``-inf`` after a negative temperature (:func:`samplers.core.apply_temperature`): a negative T inverts the
ranking among the allowed tokens only.

Requests must leave vLLM's own warping neutral (it runs after the processor): ``SamplingParams(temperature=1.0,
top_p=1.0, top_k=0 (or -1), min_p=0.0)`` and no repetition / frequency / presence penalty;
``validate_params`` refuses anything else with the setting to change. Per-request options travel in
``SamplingParams.extra_args`` (``vllm_xargs`` in an OpenAI-server request):

=====================  ===========================================================================
``kelvin``             ``false`` / ``0`` / ``"off"``: leave this request alone (any sampling params go)
``kelvin_category``    the prompt category, for policies conditioned on it (default ``"other"``)
``kelvin_diversity``   the diversity dial lambda, for policies conditioned on it (the runtime's
                       ``diversity`` of that request; refused outside the trained range)
=====================  ===========================================================================

Memory: the processor keeps the previous step's log-probabilities of every slot, ``max_num_seqs x vocab x
4`` bytes on the device (50 MB for SmolLM2 at 256 sequences). Not supported: speculative decoding (rows
that are draft tokens; refused at start), pooling models (vLLM refuses custom processors there).

Usage (``pip install vllm`` on a CUDA machine; the export must come from a policy trained on the model
vLLM serves)::

    KELVIN_POLICY=runs/default/export vllm serve HuggingFaceTB/SmolLM2-135M-Instruct \\
        --logits-processors samplers.vllm:KelvinLogitsProcessor
    # VLLM_USE_V2_MODEL_RUNNER=0 (legacy runner): --logits-processors samplers.vllm:KelvinLegacyLogitsProcessor

docs/engines.md gives the offline (``LLM``) and OpenAI-client recipes. ``make_logits_processor(path)`` returns
a class bound to an export directory instead of ``$KELVIN_POLICY``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np
import torch

from policies.features import FeatureSpec
from samplers.suggest import did_you_mean
from policies.artifact import diversity_range_of
from samplers.runtime import PolicyRuntime, check_diversity, check_engine_model

try:  # Model Runner V2's interface (vLLM >= 0.23); the module imports without vLLM
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2Base
except Exception:  # ImportError, or a vLLM build that fails to import
    _V2Base = object
try:  # the legacy V1 interface
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Base
except Exception:
    _V1Base = object

VLLM_AVAILABLE = _V2Base is not object or _V1Base is not object

__all__ = ["KelvinLegacyLogitsProcessor", "KelvinLogitsProcessor", "RequestOptions", "RequestSlots", "VLLM_AVAILABLE",
           "make_logits_processor", "request_options"]

POLICY_ENV = "KELVIN_POLICY"
ENABLE_ARG = "kelvin"
CATEGORY_ARG = "kelvin_category"
DIVERSITY_ARG = "kelvin_diversity"
_ARGS = (ENABLE_ARG, CATEGORY_ARG, DIVERSITY_ARG)
_TRUE, _FALSE = {"1", "true", "on", "yes"}, {"0", "false", "off", "no"}

# vLLM's own sampling that would re-warp the policy's distribution: (name, neutral value, is neutral).
_NEUTRAL = (("temperature", 1.0, lambda v: v == 1.0), ("top_p", 1.0, lambda v: v == 1.0),
            ("top_k", 0, lambda v: v in (0, -1, None)), ("min_p", 0.0, lambda v: not v),
            ("repetition_penalty", 1.0, lambda v: v in (1.0, None)),
            ("frequency_penalty", 0.0, lambda v: not v), ("presence_penalty", 0.0, lambda v: not v))


# =========================================================================== per-request options
@dataclass(frozen=True)
class RequestOptions:
    """What one request asks of the processor, from ``SamplingParams.extra_args``."""

    enabled: bool = True
    category: str | int | None = None  # None: the policy's "other" slot
    diversity: float | None = None  # None: the runtime's default


def _extra_args(params) -> dict:
    return dict(getattr(params, "extra_args", None) or {})


def request_options(params, spec: FeatureSpec | None = None,
                    diversity_range: tuple[float, float] | None = None) -> RequestOptions:
    """Parse and check the ``kelvin*`` keys of ``params.extra_args`` (see the module doc); ``spec`` checks the
    category and the diversity dial against the policy, ``diversity_range`` (the export's trained λ range) the
    dial's value. Raises ``ValueError`` naming the key and the fix."""
    extra = _extra_args(params)
    for key in extra:
        if key.startswith("kelvin") and key not in _ARGS:
            raise ValueError(f"extra_args[{key!r}] is not a Kelvin option; {did_you_mean(key, _ARGS, always_list=True)}")
    flag = extra.get(ENABLE_ARG, True)
    if isinstance(flag, bool):
        enabled = flag
    elif isinstance(flag, (int, float)) and flag in (0, 1):
        enabled = bool(flag)
    elif isinstance(flag, str) and flag.strip().lower() in _TRUE | _FALSE:
        enabled = flag.strip().lower() in _TRUE
    else:
        raise ValueError(f"extra_args[{ENABLE_ARG!r}]={flag!r} must be true/false (or 1/0, \"on\"/\"off\")")
    if not enabled:
        return RequestOptions(enabled=False)
    category = extra.get(CATEGORY_ARG)
    if category is not None and spec is not None:
        if not spec.categories:
            raise ValueError(f"extra_args[{CATEGORY_ARG!r}]={category!r}: this policy has no category features "
                             f"(trained with env.include_category=false); drop {CATEGORY_ARG}")
        try:
            spec.category_rows(category, 1)
        except ValueError as exc:
            raise ValueError(f"extra_args[{CATEGORY_ARG!r}]: {exc}") from None
    diversity = extra.get(DIVERSITY_ARG)
    if diversity is not None:
        diversity = check_diversity(diversity, spec, diversity_range, f"extra_args[{DIVERSITY_ARG!r}]")
    return RequestOptions(True, category, diversity)


def check_sampling_params(params) -> None:
    """Refuse a request whose own sampling would re-warp the policy's distribution (unless it opted out)."""
    for name, neutral, ok in _NEUTRAL:
        value = getattr(params, name, neutral)
        if not ok(value):
            raise ValueError(f"SamplingParams.{name}={value!r}: vLLM would apply it after the Kelvin policy and "
                             f"rescale its distribution; use {name}={neutral!r} (the policy sets the temperature and "
                             f"truncation itself), or extra_args={{'{ENABLE_ARG}': False}} to sample this request "
                             "without the policy")


# =========================================================================== the one state machine
class RequestSlots:
    """Per-request state in fixed slots: the state machine behind both vLLM adapters (pure torch).

    ``add(slot, params)`` gives the request in ``slot`` fresh state (whatever the slot held before) and
    returns whether the policy applies to it; ``remove(slot)`` frees it; ``apply(logits (R, V), slots (R,),
    tokens, drew, sampling)`` runs the policy on the rows whose request is enabled and ``sampling``, with
    ``tokens[i]`` the token the request drew since its previous step where ``drew[i]``, and returns new
    logits (the other rows unchanged).
    """

    def __init__(self, runtime: PolicyRuntime, capacity: int, device: torch.device | str = "cpu"):
        if capacity < 1:
            raise ValueError(f"capacity={capacity} must be >= 1 (vLLM's max_num_seqs)")
        self.runtime = runtime
        self.capacity = int(capacity)
        self.device = torch.device(device)
        runtime.record = False
        runtime.start(self.capacity, self.device)
        self.enabled = np.zeros(self.capacity, dtype=bool)  # (C,) host: the policy applies to the slot's request

    def _check_slot(self, slot: int) -> int:
        if not 0 <= int(slot) < self.capacity:
            raise ValueError(f"slot {slot} is outside the {self.capacity} request slots (max_num_seqs)")
        return int(slot)

    def add(self, slot: int, params) -> bool:
        """A request enters ``slot``: fresh features, policy state and previous temperature."""
        slot = self._check_slot(slot)
        options = request_options(params, self.runtime.feature_spec, self.runtime.diversity_range)
        self.enabled[slot] = options.enabled
        if options.enabled:
            self.runtime.reset_rows([slot], category=options.category, diversity=options.diversity)
        return options.enabled

    def remove(self, slot: int) -> None:
        self.enabled[self._check_slot(slot)] = False

    def apply(self, logits: torch.Tensor, slots: np.ndarray | Sequence[int], tokens: torch.Tensor | None = None,
              drew: torch.Tensor | None = None, sampling: np.ndarray | None = None) -> torch.Tensor:
        """New logits (R, V) for ``logits`` (R, V), row ``i`` belonging to ``slots[i]`` (host ints)."""
        slots = np.asarray(slots, dtype=np.int64).reshape(-1)  # (R,)
        if logits.ndim != 2 or logits.shape[0] != slots.shape[0]:
            raise ValueError(f"logits {tuple(logits.shape)} must be (rows, vocab) with one row per slot "
                             f"({slots.shape[0]} slots)")
        if slots.size and (slots.min() < 0 or slots.max() >= self.capacity):
            raise ValueError(f"slots {slots.tolist()[:16]} outside the {self.capacity} request slots")
        active = self.enabled[slots] if sampling is None else self.enabled[slots] & np.asarray(sampling, dtype=bool)
        if not active.any():
            return logits
        rows = torch.as_tensor(slots, device=self.device)  # (R,)
        if active.all():
            return self.runtime.step(logits, tokens, drew, rows=rows)  # (R, V), a new tensor
        pick = torch.as_tensor(np.flatnonzero(active), device=logits.device)  # (A,) rows to step
        out = logits.clone()
        out[pick] = self.runtime.step(
            logits[pick], None if tokens is None else tokens[pick.to(tokens.device)],
            None if drew is None else drew[pick.to(drew.device)], rows=rows[pick.to(rows.device)]).to(out.dtype)
        return out


# =========================================================================== shared by both adapters
_SPEC_CACHE: dict[str, dict] = {}


class _KelvinProcessorBase:
    """What the two adapters share: the export they run, request validation, the runtime."""

    artifact_path: ClassVar[str | None] = None
    """Export directory; None reads the ``KELVIN_POLICY`` environment variable."""

    @classmethod
    def _path(cls) -> str:
        path = cls.artifact_path or os.environ.get(POLICY_ENV)
        if not path:
            raise ValueError(f"no Kelvin policy: set the {POLICY_ENV} environment variable to an export directory "
                             "(python -m kelvin.export RUN_DIR OUT_DIR), or use make_logits_processor(path)")
        return str(path)

    @classmethod
    def _spec(cls) -> dict:
        """The export's spec.json (read once per path; validate_params runs for every request)."""
        path = cls._path()
        if path not in _SPEC_CACHE:
            spec_file = Path(path) / "spec.json"
            if not spec_file.is_file():
                raise FileNotFoundError(f"{spec_file} is missing: {POLICY_ENV}={path!r} is not a Kelvin export "
                                        "directory (python -m kelvin.export RUN_DIR OUT_DIR writes one)")
            _SPEC_CACHE[path] = json.loads(spec_file.read_text())
        return _SPEC_CACHE[path]

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Refuse (``ValueError``) a request whose sampling would re-warp the policy, or bad ``kelvin*`` options."""
        raw = cls._spec()
        spec = FeatureSpec.from_dict(raw["feature_spec"])
        if request_options(sampling_params, spec, diversity_range_of(raw)).enabled:
            check_sampling_params(sampling_params)

    def is_argmax_invariant(self) -> bool:
        """False: negative and zero temperatures change the argmax, so vLLM must apply this on every path."""
        return False

    @property
    def guard_counters(self) -> dict[str, int]:
        """Guard interventions ``{clamp, rate_limit, anomaly_reset, fallback, decisions}`` since the engine started."""
        return self.slots.runtime.guard_counters

    def _start(self, vllm_config, capacity: int, device) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("the Kelvin logits processor does not support speculative decoding (its rows would be "
                             "draft tokens); start vLLM without --speculative-config")
        model_config = getattr(vllm_config, "model_config", None)
        if model_config is not None:  # an export trained on another model is refused here
            vocab = getattr(model_config, "get_vocab_size", None)
            check_engine_model(self._spec().get("model") or {}, getattr(model_config, "model", None),
                               vocab() if callable(vocab) else None)
        args, kwargs = PolicyRuntime.pretrained_arguments(self._path(), {"record": False})
        runtime = PolicyRuntime(*args, **kwargs)  # guard rails as the export's spec.json says (on by default)
        self.slots = RequestSlots(runtime, capacity, device)


def _capacity(vllm_config, default: int = 256) -> int:
    scheduler = getattr(vllm_config, "scheduler_config", None)
    return int(getattr(scheduler, "max_num_seqs", None) or default)


# =========================================================================== Model Runner V2
class KelvinLogitsProcessor(_KelvinProcessorBase, _V2Base):
    """vLLM Model Runner V2 logits processor running a Kelvin export (``$KELVIN_POLICY`` or :attr:`artifact_path`).

    State lives in the request slots vLLM names (``req_idx``); the history comes from ``req_states``
    (``all_token_ids``, ``total_len``, ``prefill_len``), read on the device without a copy to the host.
    """

    def __init__(self, vllm_config, req_states):
        self.req_states = req_states
        self._start(vllm_config, int(req_states.max_num_reqs), req_states.device)
        device = self.slots.device
        self._seen = torch.full((self.slots.capacity,), -1, dtype=torch.long, device=device)  # (C,) total_len seen
        self._pending: list[tuple[int, Any]] = []

    def add_request(self, req_idx: int, sampling_params) -> bool:
        """A request enters slot ``req_idx``; its state is reset at :meth:`apply_staged_writes`."""
        options = request_options(sampling_params, self.slots.runtime.feature_spec, self.slots.runtime.diversity_range)
        self._pending.append((int(req_idx), sampling_params))
        return options.enabled

    def apply_staged_writes(self) -> None:
        """Reset the slots of the requests added since the last step (their previous occupants' state goes)."""
        if not self._pending:
            return
        for slot, params in self._pending:
            self.slots.add(slot, params)
        self._seen[torch.as_tensor([s for s, _ in self._pending], device=self._seen.device)] = -1
        self._pending = []

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        self.apply_staged_writes()  # a no-op when vLLM already called it this step
        slots_np = np.asarray(ctx.idx_mapping_np, dtype=np.int64)  # (R,) host: row -> slot
        if not self.slots.enabled[slots_np].any():  # no Kelvin request in this batch (or a dummy warm-up run)
            return logits
        if logits.shape[0] != slots_np.shape[0]:
            raise RuntimeError(f"{logits.shape[0]} logits rows for {slots_np.shape[0]} requests: speculative "
                               "decoding rows are not supported by the Kelvin logits processor")
        rs = self.req_states
        slots = ctx.expanded_idx_mapping.to(torch.long)  # (R,) device
        upper = getattr(ctx, "seq_lens_upper_bound_np", None)  # (R,) host, exact without speculative decoding
        if upper is not None:
            sampling = np.asarray(upper) >= np.asarray(rs.prefill_len.np)[slots_np]  # a row in chunked prefill: False
        else:
            sampling = (ctx.pos.to(torch.long) + 1 >= rs.prefill_len.gpu[slots].to(torch.long)).cpu().numpy()
        total = rs.total_len.gpu[slots].to(torch.long)  # (R,) committed tokens of each request
        seen = self._seen[slots]  # (R,) -1: first step since add_request
        drew = (seen >= 0) & (total > seen)  # (R,) drew a token since its previous step
        tokens = rs.all_token_ids.gpu[slots, (total - 1).clamp_min(0)].to(torch.long)  # (R,) the latest token
        out = self.slots.apply(logits, slots_np, tokens, drew, sampling)
        step = torch.as_tensor(sampling & self.slots.enabled[slots_np], device=slots.device)  # (R,) rows stepped
        self._seen[slots] = torch.where(step, total, seen)
        return out


# =========================================================================== legacy V1 interface
class KelvinLegacyLogitsProcessor(_KelvinProcessorBase, _V1Base):
    """vLLM logits processor for the legacy V1 interface (``VLLM_USE_V2_MODEL_RUNNER=0``, vLLM < 0.23).

    Keeps a row -> slot table that follows every ``BatchUpdate`` (removed, added, moved, in that order)
    and reads each request's history from the live output-token list vLLM hands over when it is added.
    """

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool = False):  # noqa: ARG002 (vLLM's signature)
        self._start(vllm_config, _capacity(vllm_config), device)
        self.rows: list[int | None] = []  # row -> slot (None: empty row)
        self.free = list(range(self.slots.capacity - 1, -1, -1))  # free slots, popped from the end
        self.outputs: dict[int, list[int]] = {}  # slot -> the request's live output token list
        self.counts: dict[int, int] = {}  # slot -> len(outputs[slot]) at its previous step

    def _release(self, row: int) -> None:
        slot = self.rows[row] if row < len(self.rows) else None
        if slot is not None:
            self.slots.remove(slot)
            self.outputs.pop(slot, None)
            self.counts.pop(slot, None)
            self.free.append(slot)
            self.rows[row] = None

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        size = int(batch_update.batch_size)
        indices = [*batch_update.removed, *(a[0] for a in batch_update.added),
                   *(m[0] for m in batch_update.moved), *(m[1] for m in batch_update.moved)]
        width = max([size, len(self.rows), *(i + 1 for i in indices)])
        self.rows.extend([None] * (width - len(self.rows)))
        for row in batch_update.removed:
            self._release(row)
        for row, params, _prompt, output_ids in batch_update.added:
            self._release(row)  # an added request may replace the one in its row
            if not self.free:
                raise RuntimeError(f"more than {self.slots.capacity} requests at once (max_num_seqs)")
            slot = self.free.pop()
            self.slots.add(slot, params)
            self.outputs[slot] = output_ids
            self.counts[slot] = len(output_ids)
            self.rows[row] = slot
        for a, b, direction in batch_update.moved:
            name = getattr(direction, "name", direction)
            if name == "SWAP":
                self.rows[a], self.rows[b] = self.rows[b], self.rows[a]
            elif name == "UNIDIRECTIONAL":
                if self.rows[b] is not None and self.rows[b] != self.rows[a]:
                    self._release(b)  # a moved request may replace the one in its target row
                self.rows[b], self.rows[a] = self.rows[a], None
            else:
                raise ValueError(f"unknown move direction {direction!r}; expected SWAP or UNIDIRECTIONAL")
        for row in range(size, len(self.rows)):  # rows past the batch are empty once vLLM condensed it
            self._release(row)
        del self.rows[size:]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != len(self.rows):
            raise RuntimeError(f"logits have {logits.shape[0]} rows but the persistent batch tracks {len(self.rows)} "
                               "requests; update_state was not called with every batch change")
        present = [slot is not None for slot in self.rows]
        if not any(present):
            return logits
        slots, drew, tokens = [], [], []
        for slot in self.rows:
            out = self.outputs.get(slot) if slot is not None else None
            n = 0 if out is None else len(out)
            grew = out is not None and n > self.counts[slot]
            slots.append(0 if slot is None else slot)
            drew.append(grew)
            tokens.append(out[-1] if grew else 0)
            if slot is not None:
                self.counts[slot] = n
        device = logits.device
        return self.slots.apply(logits, slots, torch.tensor(tokens, dtype=torch.long, device=device),
                                torch.tensor(drew, dtype=torch.bool, device=device), np.asarray(present))


def make_logits_processor(path: str | Path, interface: str = "v2") -> type:
    """A processor class bound to the export at ``path`` (no environment variable), for in-process engines
    that accept class objects: ``interface="v2"`` (Model Runner V2, the default) or ``"v1"`` (legacy)."""
    bases = {"v2": KelvinLogitsProcessor, "v1": KelvinLegacyLogitsProcessor}
    if interface not in bases:
        raise ValueError(f"interface={interface!r} must be 'v2' (Model Runner V2) or 'v1' (legacy V1 interface)")
    resolved = str(Path(path).expanduser().resolve())
    if not (Path(resolved) / "spec.json").is_file():
        raise FileNotFoundError(f"{resolved}/spec.json is missing: not a Kelvin export directory")
    return type(f"Bound{bases[interface].__name__}", (bases[interface],), {"artifact_path": resolved})
