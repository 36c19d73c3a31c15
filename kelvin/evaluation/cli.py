"""Command line of ``evaluate.py``: argument parsing over :func:`kelvin.evaluation.run.evaluate`."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from kelvin.config_loading import load_config
from kelvin.evaluation.fronts import VERDICT_FRONTS
from kelvin.evaluation.policies import parse_policy_specs
from kelvin.evaluation.run import evaluate
from kelvin.rundir import model_files
from policies.registry import BASELINE_NAMES

__all__ = ["build_parser", "main"]


def _seed(text: str) -> int:
    from envs.config import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text!r} is not a seed: give an integer in [0, {MAX_SEED}]")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``evaluate.py``."""
    p = argparse.ArgumentParser(
        description="Evaluate temperature policies (learned and baselines) on the same prompts and seeds (Kelvin).",
        epilog="Example: evaluate.py --config configs/default.yaml --policies learned:runs/NAME,pid,edt,fixed:0.7 "
               "--split test --out reports/NAME")
    p.add_argument("--config", default=None,
                   help="YAML config (default: the run's config.yaml when --run or learned:RUN is given, else "
                        "configs/default.yaml)")
    p.add_argument("--policies", default=None,
                   help="comma-separated compared policies: learned[:RUN_DIR] (a λ-conditioned one at each λ of its "
                        "front), baseline specs (pid, edt, fixed:0.7, edt:theta=1.0,t0=0.8 ...), guarded:SPEC (that "
                        "policy behind the exported samplers' default guard rails, in their order) or all (= learned "
                        f"if --run, plus every baseline). Baselines: {', '.join(BASELINE_NAMES)} (default: learned "
                        "with --run, else all)")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="run directory of the learned policy")
    p.add_argument("--split", default="test", help="prompt split: train, validation, test or all (default: test)")
    p.add_argument("--prompts", default=None, metavar="FILE", help="a .jsonl or .txt prompt file (default: "
                   "the packaged set)")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the prompt order and token draws, in [0, 2^32 - 1] "
                                                      "(default: 0)")
    p.add_argument("--families", action=argparse.BooleanOptionalAction, default=True,
                   help="sweep the baseline families (grids: the config's evaluation block) and compare the learned "
                        "fronts with their hulls (default: on)")
    p.add_argument("--resume", action="store_true",
                   help="reuse the runs an earlier, interrupted evaluation into the same --out finished")
    p.add_argument("--out", default=None, help="output directory (default: reports/<run or config name>)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                   help="override a config value, e.g. --set evaluation.samples=4 --set evaluation.minp=[] "
                        "(sizes and grids live in the evaluation block; repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command line of ``evaluate.py``: exit code 2 with a one-line error for bad input, 130 after Ctrl-C (the report
    of what finished is written; before the first run, nothing is), ``--debug`` for a traceback."""
    from kelvin.cli import run_cli

    args = build_parser().parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    def body() -> int:
        specs = parse_policy_specs(args.policies or ("learned" if args.run else "all"))
        learned_target = args.run or next((s.partition(":")[2] for s in specs if s.startswith("learned:")), None)
        config_path = args.config
        if config_path is None:
            config_path = model_files(learned_target)[0].config_file if learned_target else "configs/default.yaml"
        config = load_config(config_path, args.overrides, training=False)  # evaluation checks what it uses
        split = None if args.split in ("all", "none", "") else args.split
        name = Path(learned_target).name if learned_target else Path(config_path).stem
        out = Path(args.out or Path("reports") / name)
        data = evaluate(config, out, specs, run=args.run, split=split, prompts_file=args.prompts, seed=args.seed,
                        families=args.families, resume=args.resume, progress=not args.no_progress, command=command)
        print(f"wrote {out}/report.md, metrics.json, metrics.csv, PNGs and tb/ ({data['setup']['wall_s']:.0f} s)")
        for goal in data["goals"].values():
            counts = [f"{sum(v == 'outside' for v in goal[f'{name}_front'].values())} of {len(goal[f'{name}_front'])} "
                      f"families on the {name} front" for name in VERDICT_FRONTS if f"{name}_front" in goal]
            print(f"{goal['label']}: outside the hull of " + ", ".join(counts or ["no family (no front)"]))
        return 130 if data["interrupted"] else 0

    return run_cli(body, debug=args.debug)
