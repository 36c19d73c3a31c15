"""``policy.residual_pull``: after every PPO update the actor's last layer (the residual on the base) is scaled by
1 - pull, before the update's snapshot; a rollout cut short has no update and no pull. A small PPO on Pendulum
(the callback only touches ``policy.action_net``), and which configs pull: fast."""

from __future__ import annotations

from types import SimpleNamespace

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList

from kelvin.callbacks import AfterEachUpdate, ResidualPull
from kelvin.config_loading import load_config
from ppo_helpers import record_after_train

N_STEPS = 32


def _last_layer(model) -> torch.Tensor:
    net = model.policy.action_net
    return torch.cat([net.weight.detach().flatten(), net.bias.detach()]).clone()


class _Recorder(AfterEachUpdate):
    """Placed after the pull, where SnapshotCheckpoint is: the last layer as each update's snapshot sees it.
    ``stop_at``: end learn() at this env step (a stop mid-rollout)."""

    def __init__(self, stop_at: int | None = None):
        super().__init__()
        self.seen, self.stop_at = [], stop_at

    def _on_step(self) -> bool:
        return self.stop_at is None or self.model.num_timesteps < self.stop_at

    def after_update(self) -> None:
        self.seen.append(_last_layer(self.model))


def _model_recording_updates():
    model = PPO("MlpPolicy", gym.make("Pendulum-v1"), n_steps=N_STEPS, batch_size=N_STEPS, n_epochs=2, seed=0,
                learning_rate=1e-2, device="cpu")
    return model, record_after_train(model, _last_layer)


def test_the_last_layer_is_scaled_after_every_update_before_its_snapshot():
    model, after_update = _model_recording_updates()
    recorder = _Recorder()
    model.learn(3 * N_STEPS, callback=CallbackList([ResidualPull(0.25), recorder]))
    assert len(after_update) == len(recorder.seen) == 3
    for trained, snapshot in zip(after_update, recorder.seen):
        assert not torch.equal(trained, torch.zeros_like(trained))
        assert torch.equal(snapshot, trained * 0.75)  # exactly the update's weights, scaled once
    assert torch.equal(_last_layer(model), recorder.seen[-1])
    # the rest of the policy is PPO's alone
    ref, ref_updates = _model_recording_updates()
    ref.learn(N_STEPS)
    assert torch.equal(ref_updates[0], after_update[0])


def test_a_rollout_cut_short_is_not_pulled():
    model, after_update = _model_recording_updates()
    recorder = _Recorder(stop_at=N_STEPS + 5)  # the second rollout stops mid-way: no update, so no pull
    model.learn(3 * N_STEPS, callback=CallbackList([ResidualPull(0.25), recorder]))
    assert len(after_update) == len(recorder.seen) == 1
    assert torch.equal(_last_layer(model), after_update[0] * 0.75)


def test_the_default_pulls_and_no_base_or_zero_means_no_pull():
    (pull,) = ResidualPull.of(load_config("configs/default.yaml"))
    assert pull.keep.tolist() == pytest.approx([0.85])
    assert ResidualPull.of(load_config("configs/default.yaml", overrides=["policy.base=none"])) == []
    assert ResidualPull.of(load_config("configs/default.yaml", overrides=["policy.residual_pull=0"])) == []


def test_a_pull_out_of_range_is_refused():
    with pytest.raises(Exception, match=r"policy.residual_pull=1.5: must be a finite number in \[0, 1\]"):
        load_config("configs/default.yaml", overrides=["policy.residual_pull=1.5"])
    with pytest.raises(Exception, match=r"policy.residual_pull=-0.1: must be a finite number in \[0, 1\]"):
        load_config("configs/default.yaml", overrides=["policy.residual_pull=-0.1"])


def test_a_pull_of_one_holds_its_head_at_the_base():
    config = load_config("configs/default.yaml", overrides=["policy.residual_pull=[1.0, 0.03, 0.03, 0.03, 0.03]"])
    (pull,) = ResidualPull.of(config)
    net = torch.nn.Linear(3, 5)
    with torch.no_grad():
        net.weight.fill_(2.0)
        net.bias.fill_(-4.0)
    pull.model = SimpleNamespace(policy=SimpleNamespace(action_net=net))
    pull.after_update()
    assert torch.equal(net.weight[0], torch.zeros(3)) and net.bias[0].item() == 0.0  # λ = 0: the base exactly
    assert torch.equal(net.weight[1:], torch.full((4, 3), 2.0 * 0.97))
    assert torch.equal(net.bias[1:], torch.full((4,), -4.0 * 0.97))


def test_a_pull_per_head_scales_each_heads_row_by_its_own_fraction():
    config = load_config("configs/default.yaml", overrides=["policy.residual_pull=[0.5, 0.25, 0, 0, 0.125]"])
    (pull,) = ResidualPull.of(config)
    net = torch.nn.Linear(3, 5)  # the actor's last layer with the default's 5 diversity heads, λ = 0 .. 2
    with torch.no_grad():
        net.weight.copy_(torch.arange(15.0).view(5, 3) + 1.0)
        net.bias.copy_(torch.tensor([8.0, 8.0, 8.0, 8.0, 8.0]))
    pull.model = SimpleNamespace(policy=SimpleNamespace(action_net=net))
    pull.after_update()
    assert torch.equal(net.weight, torch.tensor([[0.5, 1.0, 1.5], [3.0, 3.75, 4.5], [7.0, 8.0, 9.0],
                                                 [10.0, 11.0, 12.0], [11.375, 12.25, 13.125]]))
    assert torch.equal(net.bias, torch.tensor([4.0, 6.0, 8.0, 8.0, 7.0]))
    assert ResidualPull.of(load_config("configs/default.yaml", overrides=["policy.residual_pull=[0, 0, 0, 0, 0]"])) == []


def test_a_pull_list_must_have_one_value_per_head():
    with pytest.raises(Exception, match=r"policy.residual_pull has 2 values, one per diversity head, but the actor has "
                                        r"5 heads, λ = \[0.0, 0.5, 1.0, 1.5, 2.0\]"):
        load_config("configs/default.yaml", overrides=["policy.residual_pull=[0.15, 0.03]"])
    with pytest.raises(Exception, match=r"but the actor has one output \(no diversity heads\)"):
        load_config("configs/default.yaml", overrides=["policy.diversity_heads=false", "policy.residual_pull=[0.1]"])


TABLE = ["env.features.position_bins=[4]", "ppo.policy_kwargs.net_arch={pi: [], vf: [64, 64]}",
         "policy.actor_features=[position_bin_1,position_bin_0]", "policy.actor_bias=false"]


def test_a_pull_per_cell_scales_each_table_cell_by_its_own_fraction():
    # rows: the 5 heads (λ = 0, 0.5, 1, 1.5, 2); columns in actor_features' order: the finish bin, then the start
    config = load_config("configs/default.yaml", overrides=[
        *TABLE, "policy.residual_pull=[[1, 1], [0, 0], [1, 0], [0, 0], [0.5, 0.25]]"])
    spec = config.env.feature_spec()
    start, finish = spec.index("position_bin_0"), spec.index("position_bin_1")
    (pull,) = ResidualPull.of(config)
    net = torch.nn.Linear(spec.dim, 5, bias=False)
    with torch.no_grad():
        net.weight.fill_(2.0)
    pull.model = SimpleNamespace(policy=SimpleNamespace(action_net=net))
    pull.after_update()
    expected = torch.full((5, spec.dim), 2.0)  # columns the actor does not read: not pulled (masked anyway)
    expected[0, start] = expected[0, finish] = 0.0  # λ = 0: both bins at the base
    expected[2, finish] = 0.0  # λ = 1: the finish at the base, the start free
    expected[4, finish], expected[4, start] = 1.0, 1.5
    assert torch.equal(net.weight, expected)
    no_pull = load_config("configs/default.yaml", overrides=[*TABLE, "policy.residual_pull=[[0, 0], [0, 0], [0, 0], "
                                                                     "[0, 0], [0, 0]]"])
    assert ResidualPull.of(no_pull) == []


def test_a_pull_per_cell_needs_a_table_and_one_value_per_head_and_feature():
    with pytest.raises(ValueError, match=r"needs a table residual.*policy.actor_bias false"):
        load_config("configs/default.yaml", overrides=[
            *TABLE[:3], "policy.residual_pull=[[1, 1], [0, 0], [1, 0], [0, 0], [0, 0]]"])
    with pytest.raises(ValueError, match=r"one row per diversity head \(5 heads.*2: \['position_bin_1', "
                                         r"'position_bin_0'\]\); got \[2, 2, 2, 2\] values per row"):
        load_config("configs/default.yaml", overrides=[*TABLE, "policy.residual_pull=[[1, 1], [0, 0], [1, 0], [0, 0]]"])
    with pytest.raises(ValueError, match=r"got \[2, 2, 1, 2, 2\] values per row"):
        load_config("configs/default.yaml", overrides=[*TABLE, "policy.residual_pull=[[1, 1], [0, 0], [1], [0, 0], [0, 0]]"])


def test_a_table_residual_starts_at_its_residual_init_cells():
    from kelvin.training import zero_residual

    config = load_config("configs/default.yaml", overrides=[
        *TABLE, "policy.residual_init=[[0, 0], [0, 0], [-0.1, 0.5], [0, 0], [0.25, 0]]"])
    spec = config.env.feature_spec()
    start, finish = spec.index("position_bin_0"), spec.index("position_bin_1")
    net = torch.nn.Linear(spec.dim, 5, bias=False)
    with torch.no_grad():
        net.weight.fill_(3.0)
    zero_residual(SimpleNamespace(policy=SimpleNamespace(action_net=net)), config.table_cells("residual_init"))
    expected = torch.zeros(5, spec.dim)
    expected[2, finish], expected[2, start], expected[4, finish] = -0.1, 0.5, 0.25  # actor_features: finish, start
    assert torch.equal(net.weight, expected)
    assert load_config("configs/default.yaml", overrides=TABLE).table_cells("residual_init") is None
    with pytest.raises(ValueError, match=r"policy.residual_init per \(head, feature\) cell needs a table residual.*"
                                         r"or drop policy.residual_init$"):
        load_config("configs/default.yaml", overrides=[
            *TABLE[:3], "policy.residual_init=[[0, 0], [0, 0], [0, -0.1], [0, 0], [0, 0]]"])
