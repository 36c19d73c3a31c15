"""Policies: the featurizer, the action mapping, the one policy protocol, the baselines, the learned and
exported policies, the guard rails."""

from policies.actions import ActionMapping
from policies.artifact import ArtifactError, ExportedPolicy, PolicyArtifact, load_artifact, load_policy
from policies.base import BaselinePolicy, TemperaturePolicy
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
from policies.features import FEATURE_SPEC_VERSION, FeatureSettings, FeatureSpec, Featurizer
from policies.guard import GuardedPolicy
from policies.learned import LearnedPolicy
from policies.registry import BASELINE_NAMES, all_baselines, make_policy, policy_from_config

__all__ = [
    "ActionMapping",
    "ArtifactError",
    "BASELINE_NAMES",
    "BaselinePolicy",
    "CombinedRule",
    "DynaTemp",
    "EntropyDynamicTemperature",
    "EntropyRule",
    "ExportedPolicy",
    "FEATURE_SPEC_VERSION",
    "FeatureSettings",
    "FeatureSpec",
    "Featurizer",
    "FixedTemperature",
    "GuardedPolicy",
    "LearnedPolicy",
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
