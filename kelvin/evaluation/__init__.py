"""Evaluation: a learned temperature policy against PID, EDT, fixed and other baselines.

``evaluate(config, out_dir, policies=[...])`` (:mod:`kelvin.evaluation.run`) runs every policy and
every point of the baseline families (:mod:`kelvin.evaluation.families`)
through the **same** environment code, on the **same** prompts, with the **same** seed, drawing
``K`` samples per prompt, and writes into ``out_dir``:

| file                             | what                                                                    |
|----------------------------------|-------------------------------------------------------------------------|
| ``report.md``                    | setup, verdicts, tables with 95% CIs, paired differences, plots, samples |
| ``metrics.json``                 | every policy and family point: metric -> ``{mean, low, high}``; paired differences; fronts, hulls, hypervolume differences with intervals; goals; per-category tables |
| ``metrics.csv``                  | the same numbers, one row per (policy, metric)                          |
| ``samples.jsonl``                | every completion of the compared policies with its temperature trace    |
| ``fronts.png``                   | quality-diversity fronts: each family's points and convex hull, each learned run's front over λ |
| ``temperature_trajectories.png`` | temperature over token position, every policy on the same prompts       |
| ``temperature_hist.png``         | distribution of the temperatures each policy used                       |
| ``tb/events.*``                  | TensorBoard: ``<metric>/<policy>`` means, paired differences, hypervolumes, the report and plots |

The parts: :mod:`~kelvin.evaluation.metrics` (the metric table, one value per prompt),
:mod:`~kelvin.evaluation.statistics` (bootstrap intervals, paired differences, verdicts),
:mod:`~kelvin.evaluation.policies` (``--policies`` specs, learned runs checked against the config,
λ fronts), :mod:`~kelvin.evaluation.families` (the baseline families and the per-category tables),
:mod:`~kelvin.evaluation.fronts` (convex hulls, hypervolumes, paired bootstrap of their difference),
:mod:`~kelvin.evaluation.goals` (what an evaluation concludes), :mod:`~kelvin.evaluation.plots`,
:mod:`~kelvin.evaluation.report` (the written files), :mod:`~kelvin.evaluation.run` (``evaluate``) and
:mod:`~kelvin.evaluation.cli` (``evaluate.py``).
"""

from kelvin.evaluation.cli import main
from kelvin.evaluation.fronts import FRONTS, hull_front, hull_gap, hull_hypervolume, hypervolume_2d, pareto_front
from kelvin.evaluation.metrics import METRICS, group_by_prompt, mean_over_streams, prompt_metrics
from kelvin.evaluation.policies import EvaluationError, parse_policy_specs, resolve_policies
from kelvin.evaluation.run import evaluate, select_prompts

__all__ = [
    "EvaluationError",
    "FRONTS",
    "METRICS",
    "evaluate",
    "group_by_prompt",
    "hull_front",
    "hull_gap",
    "hull_hypervolume",
    "hypervolume_2d",
    "main",
    "mean_over_streams",
    "pareto_front",
    "parse_policy_specs",
    "prompt_metrics",
    "resolve_policies",
    "select_prompts",
]
