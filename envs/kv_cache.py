"""KV caches of :class:`envs.lm.CausalLM`: the window of a running batch and the prompt cache.

:class:`KVWindow` holds the keys and values of B decoding rows, preallocated and written in place
(:class:`DecodeState` is a batch's window plus its positions); :class:`PromptCache` keeps prefilled
prompts (:class:`PromptEntry`) by token ids, so each prompt is prefilled once.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from envs.side_threads import CopyableLock

__all__ = ["DecodeState", "KVWindow", "PromptCache", "PromptEntry"]


# ---------------------------------------------------------------------------------------------------------------
# KV cache of a running batch


class _WindowLayer(DynamicLayer):
    """One layer of a :class:`KVWindow` as transformers sees it: ``keys`` / ``values`` are views of the
    committed window ``[lo, hi)``; ``update`` writes the new tokens' keys and values after ``hi`` in place
    (no concatenation: a ``DynamicLayer`` copies the whole cache at every step) and returns the views
    ``[lo, hi + q)``. The owner commits the new columns once every layer has run (:meth:`KVWindow.commit`)."""

    def __init__(self, owner: "KVWindow", index: int):
        super().__init__()
        # a weak reference: window -> cache -> layer -> window would be a cycle, and the window's buffers
        # (hundreds of MB) would wait for the cyclic garbage collector, which counts objects, not bytes
        self.owner = weakref.proxy(owner)
        self.index = index
        self.is_initialized = True
        self.device, self.dtype = owner.kv.device, owner.kv.dtype
        self.sync()

    def sync(self) -> None:
        o = self.owner
        self.keys = o.kv[self.index, 0, :, :, o.lo:o.hi]  # (B, H, S, D) view
        self.values = o.kv[self.index, 1, :, :, o.lo:o.hi]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        o = self.owner
        q = key_states.shape[-2]
        kv = o.kv[self.index]  # (2, B, H, C, D)
        kv[0, :, :, o.hi:o.hi + q] = key_states
        kv[1, :, :, o.hi:o.hi + q] = value_states
        return kv[0, :, :, o.lo:o.hi + q], kv[1, :, :, o.lo:o.hi + q]


class KVWindow:
    """Preallocated keys and values of B rows: ``kv`` (layers, 2, B, H, C, D) and ``mask`` (B, C).

    The live columns are ``[lo, hi)``; every row is right-aligned at ``hi`` (column ``hi - 1`` holds every
    row's latest token) and ``mask`` marks its real tokens. Decoding writes column ``hi`` in place, so a
    step costs no copy of the cache. A restarted row gets its prompt written into ``[hi - L, hi)``; the
    window then starts at the first column that is live in some row (:meth:`crop`), so its width is the
    longest live row. When ``hi`` reaches the capacity the live columns move to the front (or the buffer
    grows), an amortised copy.

    :attr:`cache` is a transformers ``Cache`` over these buffers (one :class:`_WindowLayer` per layer).
    Sliding-window attention layers are treated as full attention: exact while sequences stay shorter
    than the window.
    """

    def __init__(self, n_layers: int, batch: int, heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype, device: torch.device):
        self.kv = torch.zeros((n_layers, 2, batch, heads, capacity, head_dim), dtype=dtype, device=device)
        self.mask = torch.zeros((batch, capacity), dtype=torch.long, device=device)
        self.lo = self.hi = 0
        self.cache = self._new_cache()

    def _new_cache(self) -> Cache:
        return Cache(layers=[_WindowLayer(self, i) for i in range(self.kv.shape[0])])

    def __getstate__(self) -> dict:  # a copy or a pickle gets a cache over its own buffers (a weak proxy pickles not)
        return {k: v for k, v in self.__dict__.items() if k != "cache"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.cache = self._new_cache()

    @property
    def capacity(self) -> int:
        return self.kv.shape[4]

    @property
    def width(self) -> int:
        return self.hi - self.lo

    def _sync(self) -> None:
        for layer in self.cache.layers:
            layer.sync()

    def _move(self, start: int, capacity: int | None = None) -> None:
        """Put the live columns at ``[start, start + width)`` (of a new buffer when ``capacity`` is given)."""
        w = self.width
        if capacity is not None:
            kv = torch.zeros(self.kv.shape[:4] + (capacity,) + self.kv.shape[5:], dtype=self.kv.dtype,
                             device=self.kv.device)
            mask = torch.zeros((self.mask.shape[0], capacity), dtype=self.mask.dtype, device=self.mask.device)
        else:
            kv, mask = self.kv, self.mask
        live_kv = self.kv[..., self.lo:self.hi, :].clone()  # (layers, 2, B, H, w, D); may overlap the target
        live_mask = self.mask[:, self.lo:self.hi].clone()
        if capacity is None:
            self.mask.zero_()
        kv[..., start:start + w, :] = live_kv
        mask[:, start:start + w] = live_mask
        self.kv, self.mask = kv, mask
        self.lo, self.hi = start, start + w
        self._sync()

    def reserve(self, columns: int, before: int = 0) -> None:
        """Make room for ``columns`` new columns after ``hi`` and keep at least ``before`` columns before it."""
        if self.hi + columns <= self.capacity and self.hi >= before:
            return
        start = max(before - self.width, 0)
        need = start + self.width + columns
        if need > self.capacity:
            self._move(start, capacity=max(need + 64, self.capacity + self.capacity // 2))
        else:
            self._move(start)

    def commit(self, columns: int) -> None:
        """The last forward pass wrote ``columns`` new columns after ``hi``: make them part of the window."""
        self.hi += columns
        self._sync()

    def crop(self) -> None:
        """Start the window at the first column that is live in some row."""
        live = self.mask[:, self.lo:self.hi].any(dim=0)  # (S,)
        first = int(live.to(torch.int8).argmax()) if bool(live.any()) else self.width
        if first:
            self.lo += first
            self._sync()

    def write_rows(self, rows: torch.Tensor, pieces: Sequence[Sequence[torch.Tensor]]) -> None:
        """Row ``rows[i]`` becomes the concatenation of ``pieces[i]`` ((layers, 2, H, L_j, D) each), right-aligned at ``hi``."""
        lengths = [sum(int(p.shape[3]) for p in row) for row in pieces]
        self.reserve(0, before=max(lengths))
        self.lo = min(self.lo, self.hi - max(lengths))
        self.mask[rows] = 0
        for row, parts, length in zip(rows.tolist(), pieces, lengths):
            col = self.hi - length
            for part in parts:
                n = int(part.shape[3])
                self.kv[:, :, row, :, col:col + n] = part.to(self.kv.dtype)
                col += n
            self.mask[row, self.hi - length:self.hi] = 1
        self._sync()
        self.crop()


@dataclass
class DecodeState:
    """Running state of a batch: its :class:`KVWindow` and the RoPE position of each row's next token."""

    window: KVWindow
    next_position: torch.Tensor  # (B,) long: each row's count of real tokens so far

    @property
    def attention_mask(self) -> torch.Tensor:
        """(B, S) real (1) / padding (0) columns of the live window."""
        return self.window.mask[:, self.window.lo:self.window.hi]

    @property
    def cache(self):
        return self.window.cache

    @property
    def batch_size(self) -> int:
        return self.next_position.shape[0]

    @property
    def length(self) -> int:
        return self.window.width


# ---------------------------------------------------------------------------------------------------------------
# Prompt KV cache


@dataclass
class PromptEntry:
    """A prefilled prompt: its keys and values after the shared ``prefix`` (if any) and its next-token logits."""

    kv: torch.Tensor  # (layers, 2, H, L, D): the tokens after the prefix
    logits: torch.Tensor  # (V,) float32
    prefix: "PromptEntry | None" = None
    made_with: tuple | None = None  # (the set's fingerprint, this prompt) when CausalLM.prefill_together made it

    @property
    def length(self) -> int:
        """Tokens of the whole prompt, prefix included."""
        return int(self.kv.shape[3]) + (self.prefix.length if self.prefix is not None else 0)

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.logits.numel() * self.logits.element_size()

    def pieces(self) -> list[torch.Tensor]:
        return (self.prefix.pieces() if self.prefix is not None else []) + [self.kv]


class PromptCache:
    """Prefilled prompts by token ids, least recently used first out, bounded in bytes.

    A prompt's keys and values never change, so an episode that restarts on a prompt seen before copies
    its cache rows instead of running the model. ``max_bytes = 0`` keeps nothing (every prefill runs the
    model; identical prompts within one call still run once). The shared chat-template prefix is held
    apart and not counted.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[tuple[int, ...], PromptEntry] = OrderedDict()
        self._lock = CopyableLock()  # CausalLM.prefill_together fills it from a second thread (env.overlap)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[int, ...]) -> PromptEntry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: tuple[int, ...], entry: PromptEntry, replace: bool = False) -> None:
        """Keep ``entry`` under ``key`` (``replace``: in place of one already there; else that one stays)."""
        with self._lock:
            if entry.nbytes > self.max_bytes or (key in self._entries and not replace):
                return
            old = self._entries.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._entries[key] = entry
            self.nbytes += entry.nbytes
            self._evict()

    def _evict(self) -> None:
        while self._entries and self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes

    def resize(self, max_bytes: int) -> None:
        """Set the bound, evicting the least recently used entries above it."""
        with self._lock:
            self.max_bytes = int(max_bytes)
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0
