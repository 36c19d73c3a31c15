"""Plot training's validation margins against the PPO update for one or more runs (docs/results/).

    .venv/bin/python scripts/plot_validation.py runs/results-s0 runs/results-s1 --out docs/results/validation.png
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kelvin.evaluation.plots import plot_validation_history  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run directories (each with validation.json)")
    parser.add_argument("--out", required=True, help="PNG to write")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    histories = {}
    for run in args.runs:
        path = Path(run) / "validation.json"
        if not path.is_file():
            parser.error(f"{path} is missing: is {run} a finished Kelvin run?")
        histories[Path(run).name] = json.loads(path.read_text()).get("history", [])
    print(plot_validation_history(Path(args.out), histories))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
