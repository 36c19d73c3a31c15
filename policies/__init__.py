"""Policies: the featurizer, the action mapping, the policy interface, the baselines, exported artifacts."""

from policies.actions import ActionMapping
from policies.artifact import ArtifactError, ExportedPolicy, PolicyArtifact, load_artifact, load_policy
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
from policies.features import FEATURE_SPEC_VERSION, FeatureSpec, Featurizer
from policies.guard import GuardedPolicy
from policies.registry import BASELINE_NAMES, all_baselines, make_policy, policy_from_config

__all__ = [
    "ActionMapping",
    "ArtifactError",
    "BASELINE_NAMES",
    "CombinedRule",
    "DynaTemp",
    "EntropyDynamicTemperature",
    "EntropyRule",
    "ExportedPolicy",
    "FEATURE_SPEC_VERSION",
    "FeatureSpec",
    "Featurizer",
    "FixedTemperature",
    "GuardedPolicy",
    "MaxProbRule",
    "MedianRule",
    "PIDController",
    "PolicyArtifact",
    "SurpriseController",
    "TemperaturePolicy",
    "all_baselines",
    "load_artifact",
    "load_policy",
    "make_policy",
    "policy_from_config",
]
