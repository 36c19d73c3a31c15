#!/usr/bin/env python
"""Evaluate temperature policies on the same prompts and seeds and write a report.

``python evaluate.py --config configs/default.yaml --policies learned:runs/NAME,pid,edt,fixed:0.7 --split test
--out reports/NAME``. Thin entry point over :func:`kelvin.evaluation.run.evaluate`; ``--policies all`` =
the learned policy of ``--run`` plus every baseline; ``--help`` lists every option.
"""

import sys

from kelvin.cli import run_main  # light: kelvin.evaluation (torch...) is imported inside, where a Ctrl-C is one line

if __name__ == "__main__":
    sys.exit(run_main("kelvin.evaluation"))
