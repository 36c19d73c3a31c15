#!/usr/bin/env python
"""Train a temperature policy with PPO: ``python train.py --config configs/default.yaml --run-dir runs/NAME``.

Thin entry point over :func:`kelvin.training.train`; ``--resume runs/NAME`` continues a run,
``--set block.key=value`` overrides the config. Ctrl-C saves the model and exits cleanly.
"""

import sys

from kelvin.cli import run_main  # light: kelvin.training (torch...) is imported inside, where a Ctrl-C is one line

if __name__ == "__main__":
    sys.exit(run_main("kelvin.training"))
