"""Command line of ``evaluate.py``: argument parsing over :func:`kelvin.evaluation.run.evaluate`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kelvin.config import load_config
from kelvin.evaluation.policies import SWEEP_GRIDS, parse_policy_specs, parse_sweep_grid
from kelvin.evaluation.run import evaluate
from kelvin.rundir import model_files
from policies.registry import BASELINE_NAMES

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Evaluate temperature policies (learned and baselines) on the same prompts and seeds (Kelvin).",
        epilog="Example: evaluate.py --config configs/default.yaml --policies learned:runs/NAME,pid,edt,fixed:0.7 "
               "--split test --out reports/NAME")
    p.add_argument("--config", default=None,
                   help="YAML config (default: the run's config.yaml when --run or learned:RUN is given, else "
                        "configs/default.yaml)")
    p.add_argument("--policies", default="all",
                   help="comma-separated: learned[:RUN_DIR], baseline specs (pid, edt, fixed:0.7, "
                        "edt:theta=1.0,t0=0.8 ...), guarded:SPEC (that policy behind the exported samplers' "
                        "default guard rails, in their order, e.g. guarded:learned:runs/NAME) or all (= learned if "
                        f"--run, plus every baseline). Baselines: {', '.join(BASELINE_NAMES)} (default: %(default)s)")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="run directory of the learned policy")
    p.add_argument("--split", default="test", help="prompt split: train, validation, test or all (default: test)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="a .jsonl or .txt prompt file (default: "
                   "the packaged set)")
    p.add_argument("--samples", type=int, default=4, metavar="K",
                   help="samples per prompt (the env's group_size), >= 2 (default: %(default)s)")
    p.add_argument("--max-prompts", type=int, default=None, metavar="N",
                   help="use N prompts, round-robin over categories (default: all of the split)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt order and token draws (default: 0)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="sweep each baseline family over its main parameter for the fronts (default: on)")
    p.add_argument("--sweep-grid", action="append", default=[], metavar="FAMILY[:PARAM]=V1,V2",
                   help="replace a family's sweep grid, e.g. fixed=0.5,1.0 or edt:theta=1,3; FAMILY= drops it "
                        "(defaults: " + "; ".join(f"{f} {p} {v}" for f, (p, v) in SWEEP_GRIDS.items()) + ")")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (default: %(default)s)")
    p.add_argument("--out", default=None, help="output directory (default: reports/<run or config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                   help="override a config value, e.g. --set env.max_new_tokens=16 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line of ``evaluate.py``; exit code 2 with a one-line error for bad input."""
    args = parser().parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    try:
        specs = parse_policy_specs(args.policies)
        learned_target = args.run or next((s.partition(":")[2] for s in specs if s.startswith("learned:")), None)
        config_path = args.config
        if config_path is None:
            config_path = model_files(learned_target)[0].config_file if learned_target else "configs/default.yaml"
        config = load_config(config_path, args.overrides)
        split = None if args.split in ("all", "none", "") else args.split
        name = Path(learned_target).name if learned_target else Path(config_path).stem
        out = Path(args.out or Path("reports") / name)
        data = evaluate(config, out, specs, run=args.run, split=split, prompts_file=args.prompts,
                        samples=args.samples, max_prompts=args.max_prompts, seed=args.seed, sweep=args.sweep,
                        sweep_grids=parse_sweep_grid(args.sweep_grid), n_resamples=args.bootstrap,
                        progress=not args.no_progress, command=command)
    except (ValueError, FileNotFoundError) as exc:  # EvaluationError, ConfigError, RunDirError: one line each
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ref = data["reference"]
    print(f"wrote {out}/report.md, metrics.json, metrics.csv, PNGs and tb/ ({data['setup']['wall_s']:.0f} s)")
    for name, diffs in data["paired_differences"]["baselines"].items():
        r = diffs["reward"]
        print(f"reward {ref} - {name}: {r['mean']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] -> {r['verdict']}")
    return 0
