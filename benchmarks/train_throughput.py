"""The whole training loop against bare batched decoding, at the same batch, measured side by side.

Two variants, interleaved in one process (train, bare, train, bare, ...), on the same model and batch:

* **train**: ``kelvin.training.train`` on a config (default ``configs/default.yaml``, the README's default run,
  unchanged: all its PPO updates and its validation schedule), with everything a real run does: the env
  (rewards, MiniLM at group ends, waiting rows, the first prefill of every prompt), PPO's updates,
  validation against fixed temperatures, checkpoints, TensorBoard, the export at the end. Its rate is the
  completion tokens the training env drew divided by the whole wall time of ``train()``. The prompt
  cache is emptied before it, as in a fresh ``train.py`` process.
* **bare**: ``lm.prefill`` of B prompts then ``lm.decode`` with argmax for ``max_new_tokens`` steps,
  repeated to the same number of tokens: the model alone, the physical limit of the loop (the B
  prompts are prefilled once and copied from the prompt cache after that).

``ratio_train_over_bare`` (goal >= 0.80) is what the loop keeps of the model's speed; the rest goes
to waiting rows (synchronised groups), the env's own work, PPO, validation and the batched prefill of the
run's prompts before its first rollout, printed as shares and seconds.
The run's ``perf/tokens_per_s`` of its first and last training rollout (TensorBoard; each rollout's own wall
time, without the set-up and the validations) are printed too, with their ratio (goal: within 10%). The
headline runs at torch's own thread count (the README's commands); ``--threads N`` adds the same at N
threads as a side line.

    .venv/bin/python benchmarks/train_throughput.py                             # the default run as is, 1 repeat (~12 min)
    .venv/bin/python benchmarks/train_throughput.py --quick                     # 4 updates, validation every 2 (~4 min)
    .venv/bin/python benchmarks/train_throughput.py --quick --threads 1         # and again at 1 thread, a side line
    .venv/bin/python benchmarks/train_throughput.py --set env.batch_size=64 --updates 3
    .venv/bin/python benchmarks/train_throughput.py --smoke                     # seconds: the test suite runs it
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)
import torch
from _common import (REPO_ROOT, benchmark_parser, benchmark_prompt_ids, fill_preset, format_table, median, start, sync, torch_threads,
                     write_json)

DEFAULTS = {"updates": None, "validate_every": None, "repeats": 1}  # None: the config's own
QUICK = {"updates": 4, "validate_every": 2, "repeats": 1}
SMOKE = {"updates": 1, "validate_every": 1, "repeats": 1}


def parse_args(argv=None):
    p = benchmark_parser(__doc__, DEFAULTS["repeats"])
    p.add_argument("--config", default=str(REPO_ROOT / "configs" / "default.yaml"), help="training config (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                   help="config overrides, as train.py --set")
    p.add_argument("--updates", type=int, default=None,
                   help=f"PPO updates per training run (default: the config's; --quick {QUICK['updates']})")
    p.add_argument("--validate-every", type=int, default=None,
                   help=f"validation every this many updates (default: the config's; --quick {QUICK['validate_every']})")
    args = p.parse_args(argv)
    fill_preset(args, DEFAULTS, QUICK, SMOKE)
    if (args.updates is not None and args.updates < 1) or args.repeats < 1:
        p.error("--updates and --repeats must be >= 1")
    return args


def _config(args):
    from kelvin.config_loading import load_config

    overrides = list(args.overrides) + [f"model.name={args.model}", f"model.device={args.device}",
                                        f"model.dtype={args.dtype}", f"train.seed={args.seed}",
                                        "train.progress_bar=false"]
    if args.smoke:
        overrides += ["env.batch_size=4", "env.group_size=2", "env.max_new_tokens=3", "ppo.n_steps=4",
                      "ppo.batch_size=16", "ppo.n_epochs=1", "train.validation_prompts=2",
                      "train.validation_temperatures=[0.7]", "policy.base_prompts=2", "policy.base_temperatures=[0.0,1.0]",
                      "policy.base_diversity_points=2"]
    cfg = load_config(args.config, overrides)
    rollout = cfg.rollout_size
    updates = args.updates or -(-cfg.train.total_timesteps // rollout)
    cut = [f"train.total_timesteps={rollout * updates}"]
    if args.validate_every is not None:
        cut.append(f"train.validate_every={args.validate_every}")
    if args.updates is not None:
        cut.append(f"train.checkpoint_every={rollout * updates}")
    return load_config(args.config, overrides + cut)


def _rollout_rates(run_dir: Path) -> list[float]:
    """``perf/tokens_per_s`` of every rollout of the run, in order (from its TensorBoard events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rates = {}
    for events in sorted(run_dir.glob("**/events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        if "perf/tokens_per_s" in acc.Tags().get("scalars", []):
            rates.update({e.step: e.value for e in acc.Scalars("perf/tokens_per_s")})
    return [rates[k] for k in sorted(rates)]


def run_train(config, lm) -> dict:
    from kelvin.training import train

    lm.prompt_cache.clear()  # as in a fresh train.py process: every prompt's first prefill is part of the run
    with tempfile.TemporaryDirectory(prefix="kelvin-train-bench-") as tmp:
        t0 = time.perf_counter()
        summary = train(config, Path(tmp) / "run")
        wall = time.perf_counter() - t0
        perf = json.loads((Path(tmp) / "run" / "summary.json").read_text()).get("perf", {})
        rates = _rollout_rates(Path(tmp) / "run")
    v = summary.get("validation") or {}
    validation = {"learned": v.get("learned", {}).get("reward"), "best_fixed": v.get("best_fixed_reward"),
                  "best_fixed_temperature": v.get("best_fixed_temperature"),
                  "margin": (v.get("margin_vs_best_fixed") or {}).get("mean")}
    return {"wall_s": wall, "tokens": perf.get("tokens", summary["timesteps"]), "perf": perf, "rollout_rates": rates,
            "validation": validation}


def run_bare(lm, prompt_ids, steps_per_episode: int, tokens: int) -> dict:
    done = 0
    sync(lm.device)
    t0 = time.perf_counter()
    while done < tokens:
        logits, state = lm.prefill(prompt_ids)
        for _ in range(steps_per_episode):
            logits = lm.decode(state, logits.argmax(-1))
        done += len(prompt_ids) * steps_per_episode
    sync(lm.device)
    return {"wall_s": time.perf_counter() - t0, "tokens": done}


def measure(args, lm, config, prompt_ids) -> dict:
    """``args.repeats`` interleaved train / bare pairs at torch's current thread count: the ratio, the shares, the
    first and last training rollout's rate, and the raw runs."""
    B, L = config.env.batch_size, config.env.max_new_tokens
    runs = {"train": [], "bare": []}
    for rep in range(args.repeats):
        t = run_train(config, lm)
        b = run_bare(lm, prompt_ids, L, max(int(t["tokens"]), B * L))
        runs["train"].append(t)
        runs["bare"].append(b)
        print(f"  repeat {rep + 1}/{args.repeats}: train {t['tokens']} tokens in {t['wall_s']:.1f} s "
              f"({t['tokens'] / t['wall_s']:.1f} tok/s)  bare {b['tokens']} tokens in {b['wall_s']:.1f} s "
              f"({b['tokens'] / b['wall_s']:.1f} tok/s)", flush=True)
        v = t["validation"]
        if v["learned"] is not None:
            print(f"    its validation: learned {v['learned']:.4f} vs best fixed T={v['best_fixed_temperature']:g} "
                  f"{v['best_fixed']:.4f} (margin {v['margin']:+.4f})", flush=True)
    ratio = median((t["tokens"] / t["wall_s"]) / (b["tokens"] / b["wall_s"]) for t, b in zip(runs["train"], runs["bare"]))
    shares = {k: median(t["perf"].get(k, float("nan")) for t in runs["train"])
              for k in ("model_share", "env_share", "ppo_share", "validation_share", "waiting_share")}
    rates = [t["rollout_rates"] for t in runs["train"]]  # perf/tokens_per_s: each training rollout's own wall time
    drift = median(r[-1] / r[0] for r in rates) if all(len(r) > 1 for r in rates) else float("nan")
    # single rollouts swing +-20% inside a run on a shared CPU; the medians of its first and last quarter do not
    quarters = [(median(r[:max(1, len(r) // 4)]), median(r[-max(1, len(r) // 4):])) for r in rates if len(r) > 1]
    drift_q = median(b / a for a, b in quarters) if quarters else float("nan")
    return {"ratio": ratio, "shares": shares, "drift": drift, "first_last": [(r[0], r[-1]) for r in rates if r],
            "drift_quarters": drift_q, "quarters": quarters, "runs": runs}


def main(argv=None) -> dict:
    args = parse_args(argv)
    lm, info = start(args, set_threads=False)  # the headline at torch's own thread count, as the README runs
    config = _config(args)
    B, L = config.env.batch_size, config.env.max_new_tokens
    prompt_ids = benchmark_prompt_ids(lm, B, args.seed)
    updates = config.train.total_timesteps // config.rollout_size
    print(f"# train: B={B}, group {config.env.group_size}, max_new_tokens {L}, {updates} PPO updates of "
          f"{config.ppo.n_steps} steps, validation every {config.train.validate_every} and after the last; "
          f"{args.repeats} repeats, {torch.get_num_threads()} torch threads", flush=True)
    m = measure(args, lm, config, prompt_ids)
    runs = m["runs"]
    rows = [["train (kelvin.training.train)", median(t["tokens"] / t["wall_s"] for t in runs["train"]), f"{m['ratio']:.3f}"],
            ["bare decode (prefill + argmax decode)", median(b["tokens"] / b["wall_s"] for b in runs["bare"]), "1.00"]]
    print(format_table(["variant", "tok/s", "train/bare"], rows))
    print("where the training wall time goes (median shares): " +
          ", ".join(f"{k.replace('_share', '')} {100 * v:.1f}%" for k, v in m["shares"].items()))
    setup = median((t["perf"].get("baselines_s") or 0.0) + (t["perf"].get("base_tuning_s") or 0.0) for t in runs["train"])
    warm = median(t["perf"].get("prompt_warm_s") or 0.0 for t in runs["train"])
    print(f"before training, in the run's wall time: base tuning + fixed-T and base validation {setup:.1f} s "
          f"(cached after the first run: kelvin/tuning.py); the run's prompts prefilled in batches {warm:.1f} s")
    print("perf/tokens_per_s of the first and last training rollout (the set-up and the validations are not in "
          "them): " + "; ".join(f"{a:.1f} -> {b:.1f}" for a, b in m["first_last"])
          + f" (last/first {m['drift']:.3f}, goal within 10%); medians of the first and last quarter of the "
          "rollouts: " + "; ".join(f"{a:.1f} -> {b:.1f}" for a, b in m["quarters"]) + f" ({m['drift_quarters']:.3f})")
    side = None
    if args.threads is not None:
        print(f"# side line: the same at --threads {args.threads}", flush=True)
        with torch_threads(args.threads):
            side = measure(args, lm, config, prompt_ids)
        print(f"at {args.threads} torch threads: train/bare {side['ratio']:.3f}, last/first rollout rate "
              f"{side['drift']:.3f}")
    extra = "" if side is None else f"; at --threads {args.threads}: train/bare {side['ratio']:.3f}"
    print(f"SUMMARY train_throughput: B={B}: train/bare {m['ratio']:.3f} (goal >= 0.80), last/first rollout rate "
          f"{m['drift']:.3f} (goal 0.90-1.10; quarter medians {m['drift_quarters']:.3f}){extra}")
    payload = {"benchmark": "train_throughput", "args": vars(args), "environment": info,
               "ratio_train_over_bare": m["ratio"], "ratio_last_over_first_rollout": m["drift"],
               "ratio_last_over_first_quarter": m["drift_quarters"], "shares": m["shares"], "raw": runs,
               "threads_side_line": None if side is None else {
                   "threads": args.threads, "ratio_train_over_bare": side["ratio"],
                   "ratio_last_over_first_rollout": side["drift"], "shares": side["shares"], "raw": side["runs"]}}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
