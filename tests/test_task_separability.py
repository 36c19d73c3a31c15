"""scripts/task_separability.py: its AUC against hand-counted pairs and its logistic fit (fast, no model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "task_separability.py"
_spec = importlib.util.spec_from_file_location("task_separability", _PATH)
task_separability = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(task_separability)


def test_auc_counts_the_pairs_a_positive_wins_and_halves_ties():
    # positives 0.35 and 0.8, negatives 0.1 and 0.4: 0.35 beats 0.1, loses to 0.4; 0.8 beats both -> 3 of 4
    assert task_separability.auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    # one tie and one win out of 2 pairs: (0.5 + 1) / 2
    assert task_separability.auc(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 0])) == 0.75
    # a feature that runs the other way reads below one half
    assert task_separability.auc(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1])) == 0.0


def test_auc_names_a_missing_class():
    with pytest.raises(ValueError, match="0 positive and 3 negative"):
        task_separability.auc(np.array([0.1, 0.2, 0.3]), np.array([0, 0, 0]))


def test_the_logistic_fit_finds_the_informative_column_and_scores_new_rows():
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.4
    x = np.c_[rng.normal(size=400), np.where(y, 1.0, -1.0) + 0.3 * rng.normal(size=400)]  # column 1 tells y
    score = task_separability.fit_logistic(x, y)
    fresh = np.array([[5.0, 1.0], [-5.0, -1.0]])  # column 0 is noise: it must not decide
    assert score(fresh)[0] > 0 > score(fresh)[1]
    assert task_separability.auc(score(x), y) > 0.99
