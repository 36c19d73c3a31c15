"""Evaluation: a learned temperature policy against PID, EDT, fixed and other baselines.

``evaluate(config, out_dir, policies=[...])`` (:mod:`kelvin.evaluation.run`) runs every policy
through the **same** environment code, on the **same** prompts, with the **same** seed, drawing
``K`` samples per prompt, and writes into ``out_dir``:

| file                             | what                                                                    |
|----------------------------------|-------------------------------------------------------------------------|
| ``report.md``                    | setup, verdicts, tables with 95% CIs, paired differences, plots, samples |
| ``metrics.json``                 | every policy (and sweep point): metric -> ``{mean, low, high}``; paired differences; fronts and hypervolumes |
| ``metrics.csv``                  | the same numbers, one row per (policy, metric)                          |
| ``samples.jsonl``                | every completion of the compared policies with its temperature trace    |
| ``fronts.png``                   | quality-diversity fronts of the baseline families, the learned policy a star |
| ``temperature_trajectories.png`` | temperature over token position, every policy on the same prompts       |
| ``temperature_hist.png``         | distribution of the temperatures each policy used                       |
| ``tb/events.*``                  | TensorBoard: ``<metric>/<policy>`` means, paired differences, hypervolumes, the report and plots |

The parts: :mod:`~kelvin.evaluation.metrics` (the metric table, one value per prompt),
:mod:`~kelvin.evaluation.statistics` (bootstrap intervals, paired differences, verdicts),
:mod:`~kelvin.evaluation.policies` (``--policies`` specs, learned runs checked against the config,
sweeps), :mod:`~kelvin.evaluation.fronts` (Pareto fronts, hypervolumes), :mod:`~kelvin.evaluation.plots`,
:mod:`~kelvin.evaluation.report` (the written files), :mod:`~kelvin.evaluation.run` (``evaluate``) and
:mod:`~kelvin.evaluation.cli` (``evaluate.py``).
"""

from kelvin.evaluation.cli import main
from kelvin.evaluation.fronts import FRONT_AXES, front_gap, hypervolume_2d, pareto_front
from kelvin.evaluation.metrics import METRICS, group_by_prompt, prompt_metrics
from kelvin.evaluation.policies import (
    SWEEP_GRIDS,
    EvaluationError,
    parse_policy_specs,
    parse_sweep_grid,
    resolve_policies,
)
from kelvin.evaluation.run import evaluate, select_prompts

__all__ = [
    "EvaluationError",
    "FRONT_AXES",
    "METRICS",
    "SWEEP_GRIDS",
    "evaluate",
    "front_gap",
    "group_by_prompt",
    "hypervolume_2d",
    "main",
    "pareto_front",
    "parse_policy_specs",
    "parse_sweep_grid",
    "prompt_metrics",
    "resolve_policies",
    "select_prompts",
]
