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
