"""Policies: the featurizer, the action mapping, the policy interface and the baselines."""

from policies.actions import ActionMapping
from policies.base import TemperaturePolicy
from policies.baselines import (
    CombinedRule,
    DynaTemp,
    EntropyDynamicTemperature,
    EntropyRule,
    FixedTemperature,
    MaxProbRule,
    MedianRule,
    PIDController,
    SurpriseController,
)
from policies.detector import AnomalyDetector
from policies.features import FEATURE_SPEC_VERSION, FeatureSpec, Featurizer
from policies.guard import GuardedPolicy
from policies.registry import BASELINE_NAMES, all_baselines, make_policy, policy_from_config

__all__ = [
    "ActionMapping",
    "AnomalyDetector",
    "BASELINE_NAMES",
    "CombinedRule",
    "DynaTemp",
    "EntropyDynamicTemperature",
    "EntropyRule",
    "FEATURE_SPEC_VERSION",
    "FeatureSpec",
    "Featurizer",
    "FixedTemperature",
    "GuardedPolicy",
    "MaxProbRule",
    "MedianRule",
    "PIDController",
    "SurpriseController",
    "TemperaturePolicy",
    "all_baselines",
    "make_policy",
    "policy_from_config",
]
