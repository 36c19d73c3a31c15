"""Command line of the anomalous-token discovery: load a model, probe it, print and save the ranking.

``python -m kelvin.discovery [--model NAME] [--top 30] [--out DIR]`` runs
:func:`anomaly.discovery.discover_anomalous_tokens` on a model loaded with :mod:`envs.lm` (the
embedded SmolLM2-135M-Instruct by default) and writes the JSON (the same file the env's token prior
reads from the cache) and a histogram of the scores. The discovery itself lives in :mod:`anomaly`,
which needs no model loader; this module is the part that loads one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import torch

from anomaly.discovery import (
    DEFAULT_PROBE_PROMPTS,
    PRIOR_MIN_SCORE,
    SCORE_FORMULA,
    STORED_TOKENS,
    W_EMBED,
    W_PROBE,
    AnomalousToken,
    discover_anomalous_tokens,
    discovery_cache_path,
    probe_counts,
    write_discovery_json,
)

__all__ = ["build_parser", "main"]


def _histogram(tokens: list[AnomalousToken], path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure registry touched

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.hist([t.score for t in tokens], bins=40, range=(0.0, 1.0), color="tab:red", edgecolor="black", linewidth=0.4)
    ax.axvline(PRIOR_MIN_SCORE, color="black", linestyle="--", linewidth=1,
               label=f"token-prior threshold ({PRIOR_MIN_SCORE})")
    ax.legend(loc="upper right")
    ax.set_xlabel(f"anomaly score (dimensionless, 0-1; {W_PROBE} x probe frequency + {W_EMBED} x centroid rank)")
    ax.set_ylabel("number of tokens")
    ax.set_title(title)
    ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m kelvin.discovery``."""
    parser = argparse.ArgumentParser(prog="python -m kelvin.discovery",
                                     description="Discover a model's anomalous tokens (negative-T probe + embeddings).")
    parser.add_argument("--model", default=None, help="embedded alias, .gguf file or HF directory (default: the "
                                                      "embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--top", type=int, default=30, help="tokens to print (default: %(default)s)")
    parser.add_argument("--out", default=None, help="directory for the JSON and the histogram PNG "
                                                    "(default: the cache directory)")
    parser.add_argument("--n-tokens", type=int, default=48, help="tokens drawn per probe prompt (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=-0.001, help="probe temperature (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="probe seed (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (default: %(default)s)")
    parser.add_argument("--no-cache", action="store_true", help="recompute even when a cached result exists")
    parser.add_argument("--check-temperature", type=float, default=None, metavar="T",
                        help="also sample the probe prompts at this ordinary temperature (e.g. 0.7) and report how "
                             "many of the top-10 discovered tokens it emits (expected: 0)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from envs.lm import ModelConfig, load_causal_lm

    config = ModelConfig(device=args.device) if args.model is None else ModelConfig(name=args.model, device=args.device)
    try:
        lm = load_causal_lm(config)
        kwargs = dict(temperature=args.temperature, n_tokens=args.n_tokens, seed=args.seed)
        ranked = discover_anomalous_tokens(lm, top=STORED_TOKENS, cache=not args.no_cache, **kwargs)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    cache_path = discovery_cache_path(lm, **kwargs)
    out = Path(args.out).expanduser() if args.out else cache_path.parent
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / cache_path.name
    if json_path != cache_path or args.no_cache:
        write_discovery_json(lm, ranked, json_path, **kwargs)
    png_path = out / (cache_path.stem + ".png")
    _histogram(ranked, png_path, f"Anomalous-token scores of {lm.name} (top {len(ranked)} of {lm.vocab_size})")
    print(f"{'rank':>4}  {'id':>6}  {'score':>6}  {'probe':>5}  {'centroid':>8}  piece")
    for i, t in enumerate(ranked[: args.top]):
        print(f"{i + 1:>4}  {t.token_id:>6}  {t.score:6.3f}  {t.probe_count:>5}  {t.centroid_rank:>8}  {t.piece!r}")
    print(f"score: {SCORE_FORMULA}")
    if args.check_temperature is not None:
        top10 = torch.tensor([t.token_id for t in ranked[:10]])
        drawn, _, _ = probe_counts(lm, DEFAULT_PROBE_PROMPTS, args.check_temperature, args.n_tokens, args.seed)
        hits = int(torch.isin(drawn, top10).sum())
        print(f"check: {hits} of {drawn.numel()} tokens sampled at T = {args.check_temperature} "
              f"({len(DEFAULT_PROBE_PROMPTS)} prompts x {args.n_tokens}) are top-10 discovered tokens")
    print(f"json: {json_path}\nhistogram: {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
