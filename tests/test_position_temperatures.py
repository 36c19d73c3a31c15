"""scripts/position_temperatures.py and the mean temperature at each position it reads (shared with the evaluation's
trajectory plot), over episodes of any length (fast)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from kelvin.evaluation.plots import mean_temperature_by_position

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "position_temperatures.py"
_spec = importlib.util.spec_from_file_location("position_temperatures", _PATH)
position_temperatures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(position_temperatures)


def test_position_means_counts_each_episode_where_it_ran():
    episodes = [{"temperatures": [0.2, 0.4, 0.6]}, {"temperatures": [1.0, 0.8]}, {"temperatures": [0.0, 0.0, 0.3, 9.0]}]
    positions, means = mean_temperature_by_position(episodes, 3)  # the 4th token of the last is past the horizon
    np.testing.assert_allclose(means, [0.4, 0.4, 0.45])
    np.testing.assert_array_equal(positions, [0, 1, 2])


def test_the_parser_reads_a_run_and_its_options():
    args = position_temperatures.build_parser().parse_args(["runs/x", "--split", "test", "--prompts", "86"])
    assert (args.run, args.split, args.prompts, args.model, args.positions) == ("runs/x", "test", 86, None, 4)
