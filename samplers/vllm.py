"""A Kelvin temperature policy as a vLLM (v1 engine) batch-level logits processor.

vLLM's v1 logits processors (``vllm.v1.sample.logits_processor.LogitsProcessor``) are built once
per engine with ``(vllm_config, device, is_pin_memory)`` and called every engine step as:

1. ``update_state(batch_update)``: ``batch_update`` is None when the persistent batch kept its
   requests, else a ``BatchUpdate`` with ``batch_size`` and, to be processed in this order,
   ``removed`` (row indices), ``added`` (``(index, SamplingParams, prompt_ids, output_ids)``, where
   ``output_ids`` is the request's live list of generated tokens) and ``moved``
   (``(a, b, MoveDirectionality.UNIDIRECTIONAL | SWAP)``);
2. ``apply(logits)`` on the (batch_size, V) float32 logits, **before** vLLM's penalties, temperature
   and top-k / top-p / min-p when ``is_argmax_invariant()`` is False (as here: a policy's negative or
   zero temperature changes the argmax).

:class:`KelvinLogitsProcessor` keeps one featurizer row (and one policy-state row, for stateful
baselines) per request and moves them with their requests when rows move (:class:`PersistentBatch`,
pure Python + torch, testable without vLLM). At ``apply`` every request whose output list grew by a
token since the last step updates its history with that token and the temperature it was drawn
with; then the runtime (:class:`samplers.runtime.PolicyRuntime`) observes the logits, asks the policy,
maps the action (rate limit included) and returns truncated, tempered logits.

Requests must leave vLLM's own warping neutral so the sampler draws from the policy's
distribution: ``SamplingParams(temperature=1.0, top_p=1.0, top_k=0 (or -1 on older vLLM),
min_p=0.0)`` and no repetition / frequency / presence penalties. :meth:`KelvinLogitsProcessor.validate_params`
rejects other values. Per-request options travel in ``SamplingParams.extra_args``:
``{"kelvin_category": "code"}`` (for policies conditioned on the prompt category; default "other")
and ``{"kelvin": False}`` (leave that request's logits untouched; then any sampling params go).

Usage (``pip install vllm``; the export must come from a policy trained on the same model)::

    import os
    os.environ["KELVIN_POLICY"] = "runs/default/export"      # read in the engine process
    from vllm import LLM, SamplingParams

    llm = LLM(model="HuggingFaceTB/SmolLM2-135M-Instruct",
              logits_processors=["samplers.vllm:KelvinLogitsProcessor"])
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=64,
                            extra_args={"kelvin_category": "creative_writing"})
    outputs = llm.generate(prompts, params)

``make_logits_processor(path)`` returns a subclass bound to ``path`` instead of the environment
variable (for in-process engines that accept class objects). Not supported by vLLM itself for custom
logits processors: speculative decoding, pooling models. A preempted request that is re-added starts
its features afresh (its position counts from the resume).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from samplers.core import did_you_mean
from samplers.runtime import PolicyRuntime

try:  # vLLM is optional: the module imports without it (PersistentBatch, plan_batch_update are pure)
    from vllm.v1.sample.logits_processor import LogitsProcessor as _VLLMLogitsProcessor

    VLLM_AVAILABLE = True
    _VLLM_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # ImportError, or a vLLM build that fails to import
    _VLLMLogitsProcessor = object
    VLLM_AVAILABLE = False
    _VLLM_IMPORT_ERROR = exc

__all__ = ["KelvinLogitsProcessor", "PersistentBatch", "VLLM_AVAILABLE", "make_logits_processor", "plan_batch_update"]

POLICY_ENV = "KELVIN_POLICY"
CATEGORY_ARG = "kelvin_category"
ENABLE_ARG = "kelvin"
_INSTALL_HINT = ("vLLM is not installed (or failed to import: {error}); `pip install vllm` (v1 engine, >= 0.10.2) "
                 "to run a Kelvin policy in vLLM. The transformers processor samplers.hf.PolicyLogitsProcessor "
                 "needs no extra package.")


def plan_batch_update(prev_size: int, batch_size: int, removed: Sequence[int], added: Sequence[int],
                      moved: Sequence[tuple[int, int, Any]]) -> tuple[list[int], dict[int, int]]:
    """Where every row of the new batch comes from, following vLLM's order: removed, added, moved.

    ``added`` lists the row index of each added request; ``moved`` holds ``(a, b, direction)`` with
    direction ``SWAP`` (a <-> b) or ``UNIDIRECTIONAL`` (a -> b, a left empty); enum members or their
    names both work. Returns ``(source, added_rows)``: ``source[i]`` is the previous row that new row
    ``i`` continues, or -1 for a new or empty row; ``added_rows[i] = k`` says row ``i`` holds
    ``added[k]``.
    """
    indices = [*removed, *added, *(m[0] for m in moved), *(m[1] for m in moved)]
    width = max([prev_size, batch_size, *(i + 1 for i in indices)])
    slots: list[tuple[str, int] | None] = [("old", i) for i in range(prev_size)] + [None] * (width - prev_size)
    for i in removed:
        slots[i] = None
    for k, i in enumerate(added):
        slots[i] = ("new", k)
    for a, b, direction in moved:
        name = getattr(direction, "name", direction)
        if name == "SWAP":
            slots[a], slots[b] = slots[b], slots[a]
        elif name == "UNIDIRECTIONAL":
            slots[b], slots[a] = slots[a], None
        else:
            raise ValueError(f"unknown move direction {direction!r}; expected SWAP or UNIDIRECTIONAL")
    source, added_rows = [], {}
    for i in range(batch_size):
        slot = slots[i]
        if slot is not None and slot[0] == "old":
            source.append(slot[1])
        else:
            source.append(-1)
            if slot is not None:
                added_rows[i] = slot[1]
    return source, added_rows


def _extra_args(params) -> dict:
    return dict(getattr(params, "extra_args", None) or {})


class PersistentBatch:
    """Per-request rows of a :class:`PolicyRuntime` inside an engine's persistent batch.

    ``update(batch_update)`` follows vLLM's ``BatchUpdate`` (any object with ``batch_size``,
    ``removed``, ``added``, ``moved``); ``apply(logits)`` updates the histories of the requests
    that drew a token since the last call, then returns the runtime's tempered logits (rows of
    requests with ``extra_args={"kelvin": False}`` come back unchanged).
    """

    def __init__(self, runtime: PolicyRuntime, device: torch.device | str = "cpu"):
        self.runtime = runtime
        self.device = torch.device(device)
        self.outputs: list[list[int] | None] = []  # live output-token lists, one per row
        self.counts: list[int] = []  # len(outputs[i]) at the last apply
        self.active: list[bool] = []  # False: the request opted out (extra_args kelvin=False)

    @property
    def size(self) -> int:
        return len(self.outputs)

    def update(self, batch_update) -> None:
        if batch_update is None:
            return
        added = list(batch_update.added)
        source, added_rows = plan_batch_update(self.size, int(batch_update.batch_size), list(batch_update.removed),
                                               [a[0] for a in added], list(batch_update.moved))
        outputs, counts, active, categories = [], [], [], {}
        for i, s in enumerate(source):
            if s >= 0:
                outputs.append(self.outputs[s])
                counts.append(self.counts[s])
                active.append(self.active[s])
            elif i in added_rows:
                _, params, _, out_ids = added[added_rows[i]]
                extra = _extra_args(params)
                outputs.append(out_ids)
                counts.append(len(out_ids))
                active.append(extra.get(ENABLE_ARG, True) is not False)
                categories[i] = extra.get(CATEGORY_ARG)
            else:
                outputs.append(None)
                counts.append(0)
                active.append(False)
        if self.runtime.featurizer is None:
            self.runtime.start(max(self.size, 1), self.device)
        self.runtime.reorder(source, categories)
        self.outputs, self.counts, self.active = outputs, counts, active

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        batch = logits.shape[0]
        if batch == 0 or not any(self.active):
            return logits
        if batch != self.size:
            raise RuntimeError(f"logits have {batch} rows but the persistent batch tracks {self.size} requests; "
                               "update_state was not called with every batch change")
        drew, tokens = [], []
        for i, out in enumerate(self.outputs):
            n = 0 if out is None else len(out)
            grew = n > self.counts[i]
            drew.append(grew)
            tokens.append(out[-1] if grew else 0)
            self.counts[i] = n
        device = logits.device
        drew_t = torch.tensor(drew, dtype=torch.bool, device=device)
        tokens_t = torch.tensor(tokens, dtype=torch.long, device=device) if any(drew) else None
        out = self.runtime.step(logits, tokens_t, drew_t)  # (B, V)
        if not all(self.active):
            active = torch.tensor(self.active, dtype=torch.bool, device=device).view(-1, 1)
            out = torch.where(active, out, logits.to(out.dtype))
        return out


class KelvinLogitsProcessor(_VLLMLogitsProcessor):
    """vLLM v1 logits processor running a Kelvin export (``$KELVIN_POLICY`` or :attr:`artifact_path`)."""

    artifact_path: ClassVar[str | None] = None
    """Export directory; None reads the ``KELVIN_POLICY`` environment variable."""
    _categories_cache: ClassVar[dict[str, tuple[str, ...]]] = {}

    @classmethod
    def _path(cls) -> str:
        path = cls.artifact_path or os.environ.get(POLICY_ENV)
        if not path:
            raise ValueError(f"no Kelvin policy: set the {POLICY_ENV} environment variable to an export directory "
                             "(python -m kelvin.export RUN_DIR OUT_DIR), or use make_logits_processor(path)")
        return str(path)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Reject requests whose own sampling would re-warp the policy's distribution, or bad categories."""
        extra = _extra_args(sampling_params)
        if extra.get(ENABLE_ARG, True) is False:
            return
        checks = [("temperature", 1.0, lambda v: v == 1.0), ("top_p", 1.0, lambda v: v == 1.0),
                  ("top_k", 0, lambda v: v in (0, -1, None)), ("min_p", 0.0, lambda v: not v),
                  ("repetition_penalty", 1.0, lambda v: v in (1.0, None)),
                  ("frequency_penalty", 0.0, lambda v: not v), ("presence_penalty", 0.0, lambda v: not v)]
        for name, neutral, ok in checks:
            value = getattr(sampling_params, name, neutral)
            if not ok(value):
                raise ValueError(f"SamplingParams.{name}={value!r}: the Kelvin policy sets the temperature and "
                                 f"truncation itself; use {name}={neutral!r}, or extra_args={{'{ENABLE_ARG}': False}} "
                                 "to sample this request without the policy")
        category = extra.get(CATEGORY_ARG)
        if category is not None:
            path = cls._path()
            if path not in cls._categories_cache:
                spec = json.loads((Path(path) / "spec.json").read_text())
                cls._categories_cache[path] = tuple(spec["feature_spec"].get("categories") or ())
            known = cls._categories_cache[path]
            if category != "other" and category not in known:
                hint = did_you_mean(category, known, always_list=True) if known else "the policy has no category features"
                raise ValueError(f"extra_args['{CATEGORY_ARG}']={category!r} is unknown; {hint}")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        if not VLLM_AVAILABLE:
            raise ImportError(_INSTALL_HINT.format(error=_VLLM_IMPORT_ERROR))
        args, kwargs = PolicyRuntime.pretrained_arguments(self._path(), {"record": False})
        runtime = PolicyRuntime(*args, **kwargs)  # guard rails as the export's spec.json says (on by default)
        self.batch = PersistentBatch(runtime, device)

    @property
    def guard_counters(self) -> dict[str, int]:
        """Guard interventions ``{clamp, rate_limit, anomaly_reset, fallback, decisions}`` since the engine started."""
        return self.batch.runtime.guard_counters

    def is_argmax_invariant(self) -> bool:
        """False: negative and zero temperatures change the argmax, so vLLM applies this before its own steps."""
        return False

    def update_state(self, batch_update) -> None:
        self.batch.update(batch_update)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.batch.apply(logits)


def make_logits_processor(path: str | Path) -> type:
    """A :class:`KelvinLogitsProcessor` subclass bound to the export at ``path`` (no environment variable)."""
    if not VLLM_AVAILABLE:
        raise ImportError(_INSTALL_HINT.format(error=_VLLM_IMPORT_ERROR))
    resolved = str(Path(path).expanduser().resolve())
    if not (Path(resolved) / "spec.json").is_file():
        raise FileNotFoundError(f"{resolved}/spec.json is missing: not a Kelvin export directory")
    return type("BoundKelvinLogitsProcessor", (KelvinLogitsProcessor,), {"artifact_path": resolved})
