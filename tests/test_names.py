"""One name per concept (issue #24): the old names still work, each with a note that says where it moved."""

import pytest


# --------------------------------------------------------------------------- RewardModel -> RewardFunction
def test_reward_model_is_a_deprecated_alias_of_reward_function():
    import envs.rewards as rewards

    with pytest.warns(DeprecationWarning, match="RewardModel is now envs.rewards.RewardFunction"):
        old = rewards.RewardModel
    assert old is rewards.RewardFunction
    assert "RewardModel" not in rewards.__all__
    with pytest.raises(AttributeError):
        rewards.NoSuchThing


# --------------------------------------------------------------------------- include_diversity_weight -> include_diversity
MOVED_SETTING = r"env\.features\.include_diversity_weight is now env\.features\.include_diversity"


def test_an_old_yaml_key_loads_as_the_new_one_with_a_note(tmp_path):
    from kelvin.config_loading import load_config

    old = tmp_path / "old.yaml"
    old.write_text("env:\n  features:\n    include_diversity_weight: false\npolicy:\n  base: none\n")
    with pytest.warns(FutureWarning, match=MOVED_SETTING + r": write `include_diversity: false` in the YAML"):
        config = load_config(old)
    assert config.env.features.include_diversity is False
    new = tmp_path / "new.yaml"
    new.write_text("env:\n  features:\n    include_diversity: false\npolicy:\n  base: none\n")
    assert config == load_config(new)
    with pytest.warns(FutureWarning, match=MOVED_SETTING):  # an old --set
        assert config == load_config(None, ["env.features.include_diversity_weight=false", "policy.base=none"])


def test_the_old_and_the_new_key_together_are_refused(tmp_path):
    from kelvin.config import ConfigError
    from kelvin.config_loading import load_config

    both = tmp_path / "both.yaml"
    both.write_text("env:\n  features:\n    include_diversity: true\n    include_diversity_weight: false\n")
    with pytest.raises(ConfigError, match="include_diversity_weight is the old name of include_diversity: keep "
                                          "include_diversity"):
        load_config(both)


def test_the_old_setting_name_reads_the_new_one():
    from policies.features import FeatureSettings, FeatureSpec

    with pytest.warns(FutureWarning, match=MOVED_SETTING):
        old = FeatureSpec(horizon=8, include_diversity_weight=True)
    assert old == FeatureSpec(horizon=8, include_diversity=True)
    assert old.include_diversity_weight is True  # the deprecated attribute
    assert FeatureSettings().include_diversity_weight is False


# --------------------------------------------------------------------------- feature diversity_weight -> diversity
def _old_spec_json(spec) -> dict:
    """``spec.to_dict()`` as an export before the rename wrote it."""
    d = spec.to_dict()
    d["include_diversity_weight"] = d.pop("include_diversity")
    d["names"] = ["diversity_weight" if n == "diversity" else n for n in d["names"]]
    return d


def test_the_feature_is_named_diversity_in_the_same_column():
    from policies.features import BASE_FEATURES, FEATURE_SPEC_VERSION, FeatureSpec

    spec = FeatureSpec(horizon=8, categories=("code",), include_diversity=True)
    assert FEATURE_SPEC_VERSION == 1  # a rename only: the layout is unchanged
    assert spec.names[-1] == "diversity" and spec.index("diversity") == len(BASE_FEATURES) + 2 == spec.dim - 1
    with pytest.warns(FutureWarning, match="feature 'diversity_weight' is now 'diversity'"):
        assert spec.index("diversity_weight") == spec.index("diversity")


def test_an_old_spec_dict_loads_with_one_note():
    import warnings

    from policies.features import FeatureSpec

    spec = FeatureSpec(horizon=8, categories=("code",), include_diversity=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert FeatureSpec.from_dict(_old_spec_json(spec)) == spec
    assert [str(w.message) for w in caught] == [
        "feature spec: include_diversity_weight is now include_diversity; diversity_weight is now diversity (an "
        "older export: it loads as is; export it again to write the new names)"]


def test_an_old_export_loads_and_acts_the_same(tmp_path):
    import json

    import torch

    from kelvin.export import export_baseline
    from policies.artifact import load_artifact, load_policy
    from policies.baselines import EntropyDynamicTemperature
    from policies.features import FeatureSpec

    spec = FeatureSpec(horizon=8, categories=("code",), include_diversity=True)
    out = export_baseline(EntropyDynamicTemperature(spec), tmp_path / "edt", diversity_range=(0.0, 2.0))
    path = out / "spec.json"
    written = json.loads(path.read_text())
    assert written["feature_spec"]["include_diversity"] and written["feature_spec"]["names"][-1] == "diversity"
    obs = torch.rand(4, spec.dim)
    new_actions = load_policy(out).actions(obs)
    written["feature_spec"] = _old_spec_json(spec)
    path.write_text(json.dumps(written))
    with pytest.warns(FutureWarning, match="feature spec: include_diversity_weight is now include_diversity; "
                                           "diversity_weight is now diversity"):
        art = load_artifact(out)
    assert art.feature_spec == spec and art.diversity_range == (0.0, 2.0)
    with pytest.warns(FutureWarning):
        assert torch.equal(load_policy(out).actions(obs), new_actions)


# --------------------------------------------------------------------------- diversity_weight= -> diversity=
def test_featurizer_reset_takes_diversity_and_its_old_keyword():
    import torch

    from policies.features import FeatureSpec, Featurizer

    spec = FeatureSpec(horizon=8, include_diversity=True)
    f = Featurizer(spec, 3)
    f.reset([0, 2], diversity=0.5)
    with pytest.warns(FutureWarning, match=r"Featurizer.reset\(diversity_weight=...\) is now "
                                           r"Featurizer.reset\(diversity=...\)"):
        f.reset([1], diversity_weight=1.5)
    assert f.state.diversity.tolist() == [0.5, 1.5, 0.5]
    assert f.observe(torch.randn(3, 11))[:, spec.index("diversity")].tolist() == [0.5, 1.5, 0.5]
    with pytest.raises(TypeError, match="got both diversity_weight= and diversity="):
        f.reset([1], diversity=1.0, diversity_weight=1.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'diversty'"):
        f.reset([1], diversty=1.0)


def test_old_lambda_keys_of_the_policy_and_evaluation_blocks_load_as_the_new_ones(tmp_path):
    """policy.base_lambdas, evaluation.lambdas and evaluation.n_lambdas (an older config or run directory) load
    as base_diversity_points, diversity and diversity_points, each with one note naming the new key."""
    from kelvin.config_loading import load_config

    old = tmp_path / "old.yaml"
    old.write_text("policy:\n  base_lambdas: 3\nevaluation:\n  lambdas: [0.0, 1.0]\n  n_lambdas: 4\n")
    with pytest.warns(FutureWarning) as notes:
        config = load_config(old)
    assert config.policy.base_diversity_points == 3
    assert config.evaluation.diversity == [0.0, 1.0] and config.evaluation.diversity_points == 4
    assert sorted(str(n.message).split(":")[0] for n in notes) == [
        "evaluation.lambdas is now evaluation.diversity", "evaluation.n_lambdas is now evaluation.diversity_points",
        "policy.base_lambdas is now policy.base_diversity_points"]
