"""Batched KV-cache decoding (envs/lm.py) against one-sequence-at-a-time ``model.generate``.

For every batch size B, interleaved in one process (batched, sequential, batched, ...):

* **batched**: ``lm.prefill`` of B chat prompts of varied lengths (left padded), then T steps of
  draw-a-token + ``lm.decode`` (so T*B tokens go through the KV-cache decode). Prefill and decode
  are timed separately: "decode tok/s" = B*T / decode time, "batched tok/s" = B*T / (prefill +
  decode time).
* **sequential generate**: transformers' own ``model.generate`` on one prompt at a time
  (``do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=T, min_new_tokens=T``),
  the same prompts, so every sequence gets exactly T new tokens. Its rate does not depend on B
  (one sequence at a time), so for B above ``--seq-max`` only ``--seq-max`` of the B prompts (spread
  over the batch) run per repeat and the rate is per token; ``--seq-max 0`` runs all B.

The ratio batched/generate is computed per repeat from the two variants measured next to each
other, and its median is reported (paired ratios cancel most of the drift of a shared CPU).
Nothing is asserted: the script only measures and prints.

    .venv/bin/python benchmarks/decode_throughput.py                 # ~5-8 min on a 2-core CPU
    .venv/bin/python benchmarks/decode_throughput.py --quick         # ~1.3 min
    .venv/bin/python benchmarks/decode_throughput.py --batch-sizes 1,16,64 --tokens 64 --json out.json
"""

from __future__ import annotations

import time

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
from _common import (benchmark_parser, benchmark_prompt_ids, fill_preset, format_table, median, start, sync, write_json)

DEFAULTS = {"batch_sizes": "1,8,32,64", "tokens": 32, "repeats": 3, "seq_max": 2}
QUICK = {"batch_sizes": "1,8,16", "tokens": 16, "repeats": 2, "seq_max": 2}
SMOKE = {"batch_sizes": "2", "tokens": 3, "repeats": 1, "seq_max": 1}


def parse_args(argv=None):
    p = benchmark_parser(__doc__, DEFAULTS["repeats"])
    p.add_argument("--batch-sizes", default=None, help=f"comma-separated (default {DEFAULTS['batch_sizes']}; "
                                                       f"--quick {QUICK['batch_sizes']})")
    p.add_argument("--tokens", type=int, default=None, help=f"new tokens per sequence T (default {DEFAULTS['tokens']})")
    p.add_argument("--seq-max", type=int, default=None,
                   help=f"at most this many sequential generate() calls per batch size and repeat (default "
                        f"{DEFAULTS['seq_max']}; 0 = all B)")
    p.add_argument("--draw", choices=("sample", "greedy"), default="sample",
                   help="token choice of the batched loop: samplers.core.sample at T=1 (like generate's "
                        "do_sample) or argmax (default: %(default)s)")
    args = p.parse_args(argv)
    fill_preset(args, DEFAULTS, QUICK, SMOKE)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes needs positive integers")
    if args.tokens < 1 or args.repeats < 1 or args.seq_max < 0:
        p.error("--tokens and --repeats must be >= 1, --seq-max >= 0")
    return args


# --------------------------------------------------------------------------- variants

def run_batched(lm, ids, tokens: int, draw: str, generator) -> tuple[float, float]:
    """Prefill + ``tokens`` x (draw, decode); returns (prefill seconds, decode seconds)."""
    from samplers.core import sample

    dev = lm.device
    sync(dev)
    t0 = time.perf_counter()
    logits, state = lm.prefill(ids)
    sync(dev)
    t1 = time.perf_counter()
    for _ in range(tokens):
        tok = logits.argmax(-1) if draw == "greedy" else sample(logits, 1.0, generator=generator)
        logits = lm.decode(state, tok)
    sync(dev)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def run_sequential_generate(lm, ids, tokens: int) -> tuple[float, int]:
    """``model.generate`` on each prompt alone; returns (seconds, sequences whose length was not T)."""
    dev = lm.device
    wrong = 0
    sync(dev)
    t0 = time.perf_counter()
    for row in ids:
        input_ids = torch.tensor([row], dtype=torch.long, device=dev)
        out = lm.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=True,
                                temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=tokens,
                                min_new_tokens=tokens, pad_token_id=lm.pad_token_id)
        wrong += int(out.shape[1] - input_ids.shape[1] != tokens)
    sync(dev)
    return time.perf_counter() - t0, wrong


def spread(ids: list, k: int) -> list:
    """``k`` of ``ids`` evenly spread over the list (keeps the length mix of the batch)."""
    if k <= 0 or k >= len(ids):
        return list(ids)
    step = len(ids) / k
    return [ids[int(i * step)] for i in range(k)]


# --------------------------------------------------------------------------- main

def main(argv=None) -> dict:
    args = parse_args(argv)
    lm, info = start(args)
    max_b = max(args.batch_sizes)
    all_ids = benchmark_prompt_ids(lm, max_b, args.seed)
    lm.check_fits(all_ids, args.tokens + 1)
    lengths = [len(x) for x in all_ids]
    print(f"# prompts: {max_b} chat prompts of {min(lengths)}-{max(lengths)} tokens (mean {sum(lengths) / len(lengths):.0f}); "
          f"T = {args.tokens} new tokens per sequence; batch sizes {args.batch_sizes}; {args.repeats} repeats; "
          f"batched draw = {args.draw}", flush=True)

    generator = torch.Generator(device=lm.device)
    results = {b: {"prefill_s": [], "decode_s": [], "seq_s": [], "seq_n": 0, "seq_wrong_length": 0}
               for b in args.batch_sizes}
    t_start = time.perf_counter()
    with torch.inference_mode():
        # Warm-up: every batch size once (short), and generate once.
        for b in args.batch_sizes:
            run_batched(lm, all_ids[:min(b, 8)], 2, args.draw, generator.manual_seed(args.seed))
        run_sequential_generate(lm, all_ids[:1], 2)
        print(f"# warm-up done in {time.perf_counter() - t_start:.1f} s", flush=True)

        for rep in range(args.repeats):
            for b in args.batch_sizes:
                ids = all_ids[:b]
                seq_ids = spread(ids, args.seq_max)
                results[b]["seq_n"] = len(seq_ids)

                def batched():
                    pre, dec = run_batched(lm, ids, args.tokens, args.draw, generator.manual_seed(args.seed + rep))
                    results[b]["prefill_s"].append(pre)
                    results[b]["decode_s"].append(dec)

                def sequential():
                    torch.manual_seed(args.seed + rep)
                    secs, wrong = run_sequential_generate(lm, seq_ids, args.tokens)
                    results[b]["seq_s"].append(secs)
                    results[b]["seq_wrong_length"] += wrong

                order = (batched, sequential) if rep % 2 == 0 else (sequential, batched)  # alternate who goes first
                for fn in order:
                    fn()
                r = results[b]
                print(f"  repeat {rep + 1}/{args.repeats}  B={b:<3d} prefill {r['prefill_s'][-1]:.2f} s  "
                      f"decode {r['decode_s'][-1]:.2f} s  generate x{len(seq_ids)} {r['seq_s'][-1]:.2f} s", flush=True)

    # ------------------------------------------------------------------ report
    T = args.tokens
    rows, summary = [], {}
    for b in args.batch_sizes:
        r = results[b]
        n_seq = r["seq_n"]
        e2e = [p + d for p, d in zip(r["prefill_s"], r["decode_s"])]
        decode_tps = b * T / median(r["decode_s"])
        batched_tps = b * T / median(e2e)
        seq_tps = n_seq * T / median(r["seq_s"])
        # paired ratios: each repeat's batched rate over the generate rate measured next to it
        ratio_e2e = median((b * T / e) / (n_seq * T / s) for e, s in zip(e2e, r["seq_s"]))
        ratio_dec = median((b * T / d) / (n_seq * T / s) for d, s in zip(r["decode_s"], r["seq_s"]))
        summary[b] = {"prefill_s": median(r["prefill_s"]), "decode_s": median(r["decode_s"]),
                      "decode_tokens_per_s": decode_tps, "batched_tokens_per_s": batched_tps,
                      "generate_tokens_per_s": seq_tps, "generate_sequences_timed": n_seq,
                      "generate_wrong_length": r["seq_wrong_length"],
                      "ratio_batched_over_generate": ratio_e2e, "ratio_decode_only_over_generate": ratio_dec,
                      "raw": r}
        rows.append([b, summary[b]["prefill_s"], summary[b]["decode_s"], decode_tps, batched_tps,
                     f"{n_seq}/{b}", seq_tps, f"{ratio_e2e:.2f}x", f"{ratio_dec:.2f}x"])
    print()
    print(f"Batched decode vs sequential model.generate, T={T} new tokens per sequence, "
          f"medians of {args.repeats} interleaved repeats ({lm.device}, {torch.get_num_threads()} threads)")
    print(format_table(["B", "prefill s", "decode s", "decode tok/s", "batched tok/s", "gen seqs",
                        "generate tok/s", "ratio", "ratio decode-only"], rows))
    print("  batched tok/s = B*T / (prefill + decode time); decode tok/s = B*T / decode time;")
    print("  generate tok/s = tokens/s of model.generate on one sequence at a time ('gen seqs' = sequences timed of B);")
    print("  ratio = median over repeats of batched tok/s / generate tok/s measured next to it (prefill included);")
    print("  ratio decode-only = the same with the batched decode time alone (prefill excluded, generate unchanged).")
    wrong = sum(s["generate_wrong_length"] for s in summary.values())
    if wrong:
        print(f"  NOTE: {wrong} generate() calls did not return exactly T new tokens; their rates are approximate.")
    print(f"# total {time.perf_counter() - t_start:.0f} s")
    parts = ", ".join(f"B={b} {summary[b]['ratio_batched_over_generate']:.2f}x" for b in args.batch_sizes)
    best = max(args.batch_sizes, key=lambda b: summary[b]["batched_tokens_per_s"])
    print(f"SUMMARY decode_throughput: batched/sequential-generate tokens/s (prefill included): {parts}; "
          f"best B={best}: {summary[best]['batched_tokens_per_s']:.1f} vs {summary[best]['generate_tokens_per_s']:.1f} tok/s")
    payload = {"benchmark": "decode_throughput", "args": {k: v for k, v in vars(args).items()},
               "environment": info, "results": {str(b): s for b, s in summary.items()},
               "total_s": time.perf_counter() - t_start}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
