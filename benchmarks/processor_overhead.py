"""Cost of running a temperature policy inside ``model.generate`` (samplers/hf.py).

Three variants, interleaved in one process (plain, policy, unguarded, ... once per repeat), on the
same batch of B chat prompts of varied lengths (left padded), each generating exactly T new tokens
(``min_new_tokens = max_new_tokens = T``, so EOS cannot shorten one variant):

* **plain**: ``generate(do_sample=True, temperature=0.7, top_k=0, top_p=1.0)``: transformers' own
  temperature warper, softmax, multinomial.
* **policy**: ``generate(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
  logits_processor=[PolicyLogitsProcessor])``: every step the featurizer (softmax statistics over
  the vocabulary, history), the policy, the action mapping and the signed temperature (plus the
  truncation of the export, if any) run on the (B, V) logits before the same softmax + multinomial,
  with the sampler's default guard rails (policies/guard.py).
* **unguarded**: the same with ``guard=False``: the guard's own cost is ``policy / unguarded``.

Reported: median seconds per generate call of each variant, the median of the paired ratios
policy / plain (each repeat's two calls ran next to each other), and the share of the policy call
spent inside the processor (timed around ``__call__``). Goal: ratio <= 1.05. Nothing is asserted.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/processor_overhead.py --threads 1
    .venv/bin/python benchmarks/processor_overhead.py --policy runs/default/export --batch 8 --tokens 32
    .venv/bin/python benchmarks/processor_overhead.py --policy pid --quick
"""

from __future__ import annotations

import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
from _common import (benchmark_parser, benchmark_prompt_ids, fill_preset, format_table, median, start, sync, write_json)

DEFAULTS = {"batch": 8, "tokens": 32, "repeats": 5}
QUICK = {"batch": 8, "tokens": 16, "repeats": 3}
SMOKE = {"batch": 2, "tokens": 3, "repeats": 1}


def parse_args(argv=None):
    p = benchmark_parser(__doc__, DEFAULTS["repeats"])
    p.add_argument("--batch", type=int, default=None, help=f"sequences per generate call (default {DEFAULTS['batch']})")
    p.add_argument("--tokens", type=int, default=None, help=f"new tokens per sequence (default {DEFAULTS['tokens']})")
    p.add_argument("--policy", default="pid",
                   help="an export directory (python -m kelvin.export) or a baseline spec such as 'pid' or "
                        "'edt:theta=1.0' (built with the default env's features, no truncation) (default: %(default)s)")
    p.add_argument("--plain-temperature", type=float, default=0.7,
                   help="temperature of the plain variant (default: %(default)s)")
    args = p.parse_args(argv)
    fill_preset(args, DEFAULTS, QUICK, SMOKE)
    if args.batch < 1 or args.tokens < 1 or args.repeats < 1:
        p.error("--batch, --tokens and --repeats must be >= 1")
    return args


class TimedProcessor:
    """Wraps a logits processor and adds up the seconds spent in its calls."""

    def __init__(self, inner, device: torch.device):
        self.inner = inner
        self.device = device
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, input_ids, scores):
        sync(self.device)
        t0 = time.perf_counter()
        out = self.inner(input_ids, scores)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def left_pad(ids: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) input ids and attention mask, prompts right-aligned (left padding)."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, width - len(x):] = torch.tensor(x)
        mask[row, width - len(x):] = 1
    return input_ids.to(device), mask.to(device)


def build_processor(spec: str, guard: bool | None = None):
    from samplers.hf import PolicyLogitsProcessor

    if Path(spec).is_dir():
        return PolicyLogitsProcessor.from_pretrained(spec, guard=guard), f"export {spec}"
    from envs.config import EnvConfig
    from policies.registry import make_policy

    env = EnvConfig()
    policy = make_policy(spec, env.feature_spec(), env.action)
    return (PolicyLogitsProcessor(policy, truncation=env.truncation, guard=True if guard is None else guard),
            f"baseline {policy.label}")


def main(argv=None) -> int:
    args = parse_args(argv)
    lm, info = start(args)
    from transformers import LogitsProcessorList

    proc, what = build_processor(args.policy)
    timed = TimedProcessor(proc, lm.device)
    timed_bare = TimedProcessor(build_processor(args.policy, guard=False)[0], lm.device)
    ids = benchmark_prompt_ids(lm, args.batch, args.seed)
    input_ids, mask = left_pad(ids, lm.pad_token_id, lm.device)  # (B, L), as the env's prefill
    common = dict(input_ids=input_ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                  max_new_tokens=args.tokens, min_new_tokens=args.tokens, pad_token_id=lm.pad_token_id)
    variants = {
        "plain": dict(temperature=args.plain_temperature),
        "policy": dict(temperature=1.0, logits_processor=LogitsProcessorList([timed])),
        "unguarded": dict(temperature=1.0, logits_processor=LogitsProcessorList([timed_bare])),
    }
    print(f"# policy: {what}; batch {args.batch}, {args.tokens} new tokens, prompts of "
          f"{min(map(len, ids))}-{max(map(len, ids))} tokens, {args.repeats} interleaved repeats", flush=True)
    with torch.inference_mode():  # warm-up: one short call of each variant
        for extra in variants.values():
            lm.model.generate(**{**common, "max_new_tokens": 2, "min_new_tokens": 2}, **extra)
    times = {k: [] for k in variants}
    proc_share = []
    for r in range(args.repeats):
        for name, extra in variants.items():
            torch.manual_seed(args.seed + r)
            timed.seconds, timed.calls = 0.0, 0
            timed_bare.seconds, timed_bare.calls = 0.0, 0
            sync(lm.device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                out = lm.model.generate(**common, **extra)
            sync(lm.device)
            dt = time.perf_counter() - t0
            times[name].append(dt)
            if name == "policy":
                proc_share.append(timed.seconds / dt)
                if timed.calls != args.tokens or out.shape[1] != input_ids.shape[1] + args.tokens:
                    raise SystemExit(f"expected {args.tokens} processor calls, got {timed.calls}")
        print(f"  repeat {r + 1}: plain {times['plain'][-1]:.3f} s, policy {times['policy'][-1]:.3f} s "
              f"(ratio {times['policy'][-1] / times['plain'][-1]:.3f}), unguarded {times['unguarded'][-1]:.3f} s",
              flush=True)
    ratios = [p / q for p, q in zip(times["policy"], times["plain"])]
    bare_ratios = [p / q for p, q in zip(times["unguarded"], times["plain"])]
    guard_ratios = [p / q for p, q in zip(times["policy"], times["unguarded"])]
    tokens = args.batch * args.tokens
    rows = [
        ["plain (temperature warper)", median(times["plain"]), tokens / median(times["plain"]), 1.0],
        ["policy (PolicyLogitsProcessor)", median(times["policy"]), tokens / median(times["policy"]), median(ratios)],
        ["unguarded (guard=False)", median(times["unguarded"]), tokens / median(times["unguarded"]),
         median(bare_ratios)],
    ]
    print(format_table(["variant", "s / generate", "tok/s", "ratio vs plain"], rows))
    print(f"# policy / plain: median {median(ratios):.3f} (min {min(ratios):.3f}, max {max(ratios):.3f}); "
          f"processor share of the policy call: {100 * median(proc_share):.1f} %; "
          f"per step {1e3 * median(times['policy']) * median(proc_share) / args.tokens:.2f} ms "
          f"(goal: ratio <= 1.05); guarded / unguarded: median {median(guard_ratios):.3f}")
    write_json(args.json, {"benchmark": "processor_overhead", "args": vars(args), "environment": info, "policy": what,
                           "times": times, "ratios": ratios, "ratio_policy_over_plain": median(ratios),
                           "ratio_guarded_over_unguarded": median(guard_ratios), "processor_share": proc_share,
                           "guard_ratios": guard_ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
