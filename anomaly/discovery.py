r"""Discovery of a model's anomalous tokens: the ones negative temperatures dig up.

Some vocabulary pieces look like ordinary words ("emeteries", "MetaInfo") but were (almost)
never seen in training: their embeddings stay where initialisation and weight decay left them,
the model never predicts them, and a negative temperature, which turns the least likely token
into the most likely one, emits them again and again. String rules
(:func:`anomaly.rules.token_flags`) cannot see them; two views of the model can:

**(a) Negative-temperature probe.** 16 neutral plain-text prompts (no chat template: the bare
model) are continued for ``n_tokens`` tokens each, in one batch, at a temperature slightly below
zero (default -0.001: essentially the least likely token of every context) over the full
vocabulary, with a seeded ``torch.Generator``. ``probe_count`` is how often a token was drawn, ``probe_rows`` after how many of the prompts. A
token that recurs across many independent contexts is not an accident of one context: it is a
vocabulary-level anomaly.

**(b) Embedding view.** Cosine distance of every input embedding
(``lm.model.get_input_embeddings().weight``) to the centroid (mean) of all of them. Under-trained
tokens receive almost no gradient, so they sit in a tight clump near the mean direction; tokens
*closest* to the centroid rank first (``centroid_rank`` 0 = closest).

**Score** (in [0, 1], :data:`SCORE_FORMULA`):

``score = W_PROBE * probe_rows / n_prompts + W_EMBED * max(0, 1 - centroid_rank / EMBED_RANKS)``

with ``W_PROBE = 0.7``, ``W_EMBED = 0.3``, ``EMBED_RANKS = 1024``: the normalised probe frequency
(share of the prompts after which the token was drawn) dominates (a token drawn after every
prompt scores at least 0.7), the rank-based embedding score
adds up to 0.3 for the 1024 tokens closest to the centroid (2 % of a 49k vocabulary), which lists
under-trained tokens the probe missed ("MetaInfoClass", "PlaneProtection") and breaks ties between
probe tokens. An embedding-only token therefore scores at most 0.3; :func:`discovered_token_weights`
keeps tokens above 0.35 for the env's token prior, so a token enters the prior only with probe
evidence (the embedding view alone also lists rare word prefixes such as " cryst"). Special and
added control tokens (``<|im_end|>``, ``<file_sep>``) and ids beyond the tokenizer (padded embedding
rows) are left out. Ties are broken by ``probe_count``, then by token id.

**Cache.** Results are stored as JSON in ``$KELVIN_CACHE/anomalous_tokens/<model-key>.json``
(default ``~/.cache/kelvin``), keyed by the model name, vocabulary size, embedding shape and
checksum, the probe settings and prompts, and :data:`DISCOVERY_VERSION`; the top
:data:`STORED_TOKENS` are stored, so any ``top`` up to that reads the same file.

The command line that loads a model and writes the JSON and a histogram of the scores is
:mod:`kelvin.discovery` (``python -m kelvin.discovery``); this module only needs a loaded LM
(anything with the :class:`envs.lm.CausalLM` interface: ``encode``, ``prefill``, ``decode``,
``decode_text``, ``tokenizer``, ``model``, ``vocab_size``, ``name``, ``device``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

__all__ = [
    "DEFAULT_PROBE_PROMPTS",
    "DISCOVERY_VERSION",
    "SCORE_FORMULA",
    "AnomalousToken",
    "discover_anomalous_tokens",
    "discovered_token_weights",
    "discovery_cache_path",
    "probe_counts",
    "write_discovery_json",
]

DISCOVERY_VERSION = 2
"""Bump when the probe or the score formula changes (old cache files are then ignored)."""

W_PROBE = 0.7
W_EMBED = 0.3
EMBED_RANKS = 1024
SCORE_FORMULA = (f"score = {W_PROBE} * probe_rows / n_prompts + {W_EMBED} * max(0, 1 - centroid_rank / "
                 f"{EMBED_RANKS})")
PRIOR_MIN_SCORE = 0.35
"""Tokens scoring at least this enter the env's token prior (above the embedding view's maximum, 0.3)."""
STORED_TOKENS = 512
"""How many top tokens the cache file keeps."""

DEFAULT_PROBE_PROMPTS: tuple[str, ...] = (
    "Temperature is a concept",
    "The weather today",
    "In the beginning",
    "Here is a short story about",
    "The history of the city",
    "My favourite recipe is",
    "Scientists have discovered",
    "The meeting will take place",
    "Once upon a time",
    "The best way to learn",
    "According to the report",
    "The main idea of this article",
    "In mathematics, a function",
    "The train left the station",
    "Dear friend,",
    "Water boils at",
)
"""Neutral plain-text openings for the probe (no chat template)."""


class AnomalousToken(NamedTuple):
    """One discovered token (a plain tuple: ``token_id, piece, score, probe_count, centroid_rank``)."""

    token_id: int
    piece: str
    score: float
    probe_count: int
    centroid_rank: int


# ---------------------------------------------------------------------- cache
def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("KELVIN_CACHE", Path.home() / ".cache" / "kelvin")).expanduser() / "anomalous_tokens"


def _model_slug(lm) -> str:
    name = str(getattr(lm, "name", "model"))
    base = Path(name).name or name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-")[:60] or "model"


def _settings(lm, prompts: Sequence[str], temperature: float, n_tokens: int, seed: int) -> dict:
    weight = lm.model.get_input_embeddings().weight
    return {
        "version": DISCOVERY_VERSION,
        "model": str(getattr(lm, "name", "model")),
        "vocab_size": int(lm.vocab_size),
        "embedding_shape": list(weight.shape),
        # A cheap fingerprint of the weights: two models sharing a name and vocabulary still differ here.
        "embedding_checksum": round(float(weight.detach().float().abs().mean()), 6),
        "temperature": float(temperature),
        "n_tokens": int(n_tokens),
        "seed": int(seed),
        "prompts_sha1": hashlib.sha1("\n".join(prompts).encode()).hexdigest()[:12],
        "n_prompts": len(prompts),
        "score_formula": SCORE_FORMULA,
    }


def discovery_cache_path(lm, prompts: Sequence[str] | None = None, temperature: float = -0.001, n_tokens: int = 48,
                         seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`discover_anomalous_tokens` caches its result for these settings."""
    prompts = list(DEFAULT_PROBE_PROMPTS if prompts is None else prompts)
    settings = _settings(lm, prompts, temperature, n_tokens, seed)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return _cache_root(cache_dir) / f"{_model_slug(lm)}-v{settings['vocab_size']}-{digest}.json"


def _read_cache(path: Path, settings: dict) -> list[AnomalousToken] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if data.get("settings") != settings:
        return None
    try:
        return [AnomalousToken(int(t["token_id"]), str(t["piece"]), float(t["score"]), int(t["probe_count"]),
                               int(t["centroid_rank"])) for t in data["tokens"]]
    except (KeyError, TypeError, ValueError):
        return None


def _write_cache(path: Path, settings: dict, tokens: list[AnomalousToken], extra: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"settings": settings, **extra, "tokens": [t._asdict() for t in tokens]}
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, ensure_ascii=False, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is shared like the GGUF cache
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the new one
    except OSError:
        pass  # a read-only cache only costs time


# ---------------------------------------------------------------------- the two views
@torch.inference_mode()
def probe_counts(lm, prompts: Sequence[str], temperature: float, n_tokens: int, seed: int,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``n_tokens`` per prompt at ``temperature`` (full vocabulary, one batch).

    Returns ``(tokens (P, n_tokens), counts (V,), rows (V,))``: the drawn ids, how often each id was
    drawn, and in how many prompts' continuations it occurs (int64, on the CPU).
    """
    from samplers.core import sample

    ids = lm.encode(list(prompts), chat=False)
    logits, state = lm.prefill(ids)  # (P, V)
    generator = torch.Generator(device=lm.device).manual_seed(int(seed))
    drawn = []
    for step in range(n_tokens):
        tokens = sample(logits, float(temperature), generator=generator)  # (P,)
        drawn.append(tokens)
        if step + 1 < n_tokens:
            logits = lm.decode(state, tokens)  # (P, V)
    tokens = torch.stack(drawn, dim=1).cpu()  # (P, n_tokens)
    vocab = logits.shape[-1]
    counts = torch.bincount(tokens.flatten(), minlength=vocab)  # (V,)
    seen = torch.zeros(tokens.shape[0], vocab, dtype=torch.bool)
    seen.scatter_(1, tokens, True)
    return tokens, counts, seen.sum(0)


@torch.no_grad()
def centroid_ranks(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine distance of each row of ``embeddings`` (V, d) to their mean, and its rank (0 = closest)."""
    e = embeddings.detach().float()
    centroid = e.mean(0, keepdim=True)  # (1, d)
    cos = torch.nn.functional.cosine_similarity(e, centroid, dim=1)  # (V,)
    distance = 1.0 - cos
    order = torch.argsort(distance, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    return distance.cpu(), rank.cpu()


def _score(rows: torch.Tensor, ranks: torch.Tensor, n_prompts: int) -> torch.Tensor:
    probe = rows.float() / max(n_prompts, 1)
    embed = (1.0 - ranks.float() / EMBED_RANKS).clamp_min(0.0)
    return W_PROBE * probe + W_EMBED * embed  # (V,)


# ---------------------------------------------------------------------- public API
def discover_anomalous_tokens(lm, prompts: Sequence[str] | None = None, temperature: float = -0.001,
                              n_tokens: int = 48, seed: int = 0, top: int = 50, *, cache: bool = True,
                              cache_dir: str | os.PathLike | None = None) -> list[AnomalousToken]:
    """The ``top`` most anomalous tokens of ``lm``, best first (see the module doc for the score).

    Args:
        lm: a loaded :class:`envs.lm.CausalLM`.
        prompts: probe prompts (plain text); default :data:`DEFAULT_PROBE_PROMPTS` (16).
        temperature: the probe's temperature, < 0 (default -0.001: the least likely token).
        n_tokens: tokens drawn per prompt.
        seed: seed of the probe's ``torch.Generator``.
        top: how many tokens to return.
        cache: read / write the JSON cache (False: always compute, write nothing).
        cache_dir: directory of the cache files (default ``$KELVIN_CACHE/anomalous_tokens``).

    Returns a list of :class:`AnomalousToken` ``(token_id, piece, score, probe_count, centroid_rank)``.
    """
    prompts = list(DEFAULT_PROBE_PROMPTS if prompts is None else prompts)
    if not prompts:
        raise ValueError("discover_anomalous_tokens needs at least one probe prompt")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature < 0):
        raise ValueError(f"temperature={temperature!r} must be a finite negative number (e.g. -0.001): the probe "
                         "inverts the distribution to dig up the tokens the model never predicts")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} must be an integer >= 1 (tokens drawn per prompt)")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top={top!r} must be an integer >= 1")
    settings = _settings(lm, prompts, temperature, n_tokens, seed)
    path = discovery_cache_path(lm, prompts, temperature, n_tokens, seed, cache_dir)
    if cache:
        stored = _read_cache(path, settings)
        if stored is not None and (top <= len(stored) or len(stored) < STORED_TOKENS):
            return stored[:top]
    ranked, extra = _discover(lm, prompts, temperature, n_tokens, seed, max(top, STORED_TOKENS))
    if cache:
        _write_cache(path, settings, ranked, extra)
    return ranked[:top]


def _discover(lm, prompts, temperature, n_tokens, seed, keep: int) -> tuple[list[AnomalousToken], dict]:
    tokens, counts, rows = probe_counts(lm, prompts, temperature, n_tokens, seed)
    weight = lm.model.get_input_embeddings().weight  # (V_e, d)
    _, ranks = centroid_ranks(weight)
    tokenizer = lm.tokenizer
    n_real = min(len(tokenizer), weight.shape[0], counts.shape[0])  # padded rows decode to nothing
    counts, rows, ranks = counts[:n_real].clone(), rows[:n_real].clone(), ranks[:n_real]
    special = torch.as_tensor(sorted(i for i in _control_token_ids(tokenizer) if 0 <= i < n_real), dtype=torch.long)
    counts[special] = rows[special] = 0  # control tokens are not vocabulary pieces: left out of the ranking
    score = _score(rows, ranks, len(prompts))  # (V,)
    score[special] = -1.0
    # best first: score, then probe count, then lower id (stable sorts, last key first)
    order = torch.arange(n_real)
    order = order[torch.argsort(-counts[order], stable=True)]
    order = order[torch.argsort(-score[order], stable=True)][:keep].tolist()
    order = [i for i in order if float(score[i]) > 0.0]
    pieces = tokenizer.batch_decode([[i] for i in order], skip_special_tokens=False,
                                    clean_up_tokenization_spaces=False)
    ranked = [AnomalousToken(int(i), p, round(float(score[i]), 6), int(counts[i]), int(ranks[i]))
              for i, p in zip(order, pieces)]
    extra = {
        "n_probe_tokens": int(tokens.numel()),
        "distinct_probe_tokens": int((counts > 0).sum()),
        "probe_text": [lm.decode_text(row, skip_special_tokens=False) for row in tokens[:4].tolist()],
    }
    return ranked, extra


def _control_token_ids(tokenizer) -> set[int]:
    """Special tokens, including added control tokens that ``all_special_ids`` misses (SmolLM2's ``<file_sep>``)."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return ids


def discovered_token_weights(lm, top: int = 50, min_score: float = PRIOR_MIN_SCORE, **kwargs) -> torch.Tensor:
    """(V,) float32 weights in [0, 1] of the discovered tokens, for the token prior.

    The ``top`` discovered tokens with ``score >= min_score`` get weight ``score / max score``
    (the most anomalous token 1.0); every other token 0. The default ``min_score = 0.35`` is above
    what the embedding view alone can give (0.3): only tokens the probe drew enter the prior. ``kwargs`` go to
    :func:`discover_anomalous_tokens` (probe settings, ``cache``, ``cache_dir``). Uses the disk
    cache, so this costs a file read once the model has been probed.
    """
    found = discover_anomalous_tokens(lm, top=top, **kwargs)
    weights = torch.zeros(int(lm.vocab_size))
    kept = [t for t in found if t.score >= min_score]
    if kept:
        best = max(t.score for t in kept)
        for t in kept:
            weights[t.token_id] = min(1.0, t.score / best)
    return weights


def write_discovery_json(lm, tokens: list[AnomalousToken], path: Path, temperature: float = -0.001,
                         n_tokens: int = 48, seed: int = 0) -> None:
    """Write ``tokens`` as :func:`discover_anomalous_tokens` caches them (settings of the default probe prompts)."""
    _write_cache(Path(path), _settings(lm, list(DEFAULT_PROBE_PROMPTS), temperature, n_tokens, seed), tokens, {})
