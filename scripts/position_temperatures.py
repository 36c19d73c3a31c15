"""Where a learned policy departs from its tuned base: mean temperature by token position at each validation λ.

Runs the run's learned policy and its base (the residual at zero) on its validation prompts, the same prompts and
random stream as training's validation, and prints per λ the mean T of each of the first positions, the mean over
the rest, accuracy on the answerable prompts, and learned − base reward with its paired 95% interval:

    .venv/bin/python scripts/position_temperatures.py runs/pool150-s0
    .venv/bin/python scripts/position_temperatures.py runs/pool150-s0 --model runs/pool150-s0/checkpoints/step_81920.zip
    .venv/bin/python scripts/position_temperatures.py runs/pool150-s0 --split test --prompts 86

(docs/results.md quotes it; about 1 minute on 2 CPU threads for the default 32 prompts x 4 x 3 λ.)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.lm import load_causal_lm  # noqa: E402
from kelvin.evaluation.plots import mean_temperature_by_position  # noqa: E402
from kelvin.evaluation.policies import load_base_policy, load_learned_policy  # noqa: E402
from kelvin.rundir import RunDir  # noqa: E402
from kelvin.validation import Validation, group_means, paired_margin, summarize_episodes  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a finished run directory (with base.json: a residual policy)")
    p.add_argument("--model", default=None, help="a checkpoint of the run to read instead of its final model")
    p.add_argument("--split", default=None, help="prompt split (default: the run's train.validation_split)")
    p.add_argument("--prompts", type=int, default=None, help="prompts (default: the run's train.validation_prompts)")
    p.add_argument("--positions", type=int, default=4, help="positions printed one by one before the rest's mean")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config = RunDir(args.run).load_config()
    tc = config.train
    config = replace(config, train=replace(tc, validation_split=args.split or tc.validation_split,
                                           validation_prompts=args.prompts or tc.validation_prompts))
    warnings: list[str] = []
    learned, _, _ = load_learned_policy(args.model or args.run, config, warnings)
    base, _ = load_base_policy(args.run, config, warnings)
    validation = Validation(config, load_causal_lm(config.model), None, None)
    runs = {"learned": validation.episodes(learned), "base": validation.episodes(base)}
    per = len(runs["base"]) // len(validation.lambdas)
    horizon, k = config.env.max_new_tokens, args.positions
    print(f"{args.run}: mean T at positions 1..{k}, then the mean of the rest; accuracy; learned − base reward")
    for i, lam in enumerate(validation.lambdas):
        part = {name: eps[i * per:(i + 1) * per] for name, eps in runs.items()}
        cells = [f"λ={lam:g}"]
        for name, eps in part.items():
            m = mean_temperature_by_position(eps, horizon)[1]
            acc = summarize_episodes(eps).get("accuracy", float("nan"))
            cells.append(f"{name} T " + " ".join(f"{x:.2f}" for x in m[:k]) + f" .. {np.nanmean(m[k:]):.2f}"
                         f" acc {acc:.3f}")
        rewards = {name: group_means(eps, config.env.group_size, [e["episode"]["r"] for e in eps])
                   for name, eps in part.items()}
        d = paired_margin(rewards["learned"], rewards["base"], 2000, 0)
        cells.append(f"learned − base {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
        print(" | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
