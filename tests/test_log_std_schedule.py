"""``train.log_std_final``: the exploration noise's log std follows a linear schedule set after every PPO update,
frozen against PPO's own updates, and the next rollout's gSDE weights are drawn with the new value. A small PPO
on Pendulum with gSDE (the callback only touches ``policy.log_std``), and which configs schedule: fast."""

from __future__ import annotations

import math

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback, CallbackList

from kelvin.callbacks import LogStdSchedule
from kelvin.config_loading import load_config
from ppo_helpers import record_after_train

N_STEPS = 32


class _AtRolloutStart(BaseCallback):
    """After the schedule: the log std and the std of the gSDE weights the rollout's first step explored with."""

    def __init__(self):
        super().__init__()
        self.seen, self.first = [], False

    def _on_rollout_start(self) -> None:
        self.first = True

    def _on_step(self) -> bool:
        if self.first:
            policy, self.first = self.model.policy, False
            self.seen.append((policy.log_std.detach().clone(), policy.action_dist.weights_dist.scale.clone()))
        return True


@pytest.mark.parametrize("sde_sample_freq", [-1, 16])  # the schedule redraws the weights / the rollout does
def test_the_log_std_follows_the_schedule_is_frozen_and_the_noise_is_redrawn_with_it(sde_sample_freq):
    model = PPO("MlpPolicy", gym.make("Pendulum-v1"), n_steps=N_STEPS, batch_size=N_STEPS, n_epochs=2, seed=0,
                learning_rate=1e-2, use_sde=True, sde_sample_freq=sde_sample_freq, device="cpu")
    trained = record_after_train(model, lambda m: m.policy.log_std.detach().clone())
    at_start = _AtRolloutStart()
    # -1 at step 0, -3 from step 64 on: -2 after the first update (32 steps), -3 after the second and third
    model.learn(3 * N_STEPS, callback=CallbackList([LogStdSchedule(-1.0, -3.0, over=2 * N_STEPS), at_start]))
    assert [float(log_std.unique()) for log_std, _ in at_start.seen] == [-1.0, -2.0, -3.0]
    for log_std, scale in at_start.seen:  # the rollout's noise weights were drawn with the scheduled std
        assert torch.allclose(scale, torch.exp(log_std).expand_as(scale))
    # PPO's updates left it where the schedule put it before each update: not learned
    assert [float(log_std.unique()) for log_std in trained] == [-1.0, -2.0, -3.0]
    assert not model.policy.log_std.requires_grad
    assert float(model.policy.log_std.unique()) == -3.0


def test_the_schedule_values_and_which_configs_have_one():
    schedule = LogStdSchedule(-1.5, -3.0, over=1000)
    assert [schedule.value(s) for s in (0, 250, 1000, 5000)] == [-1.5, -1.875, -3.0, -3.0]
    assert LogStdSchedule.of(load_config("configs/default.yaml")) == []
    (from_config,) = LogStdSchedule.of(load_config("configs/default.yaml", overrides=[
        "train.log_std_final=-3.0", "train.log_std_anneal=0.5", "train.total_timesteps=4096",
        "ppo.policy_kwargs.log_std_init=-1.5"]))
    assert (from_config.start, from_config.final, from_config.over) == (-1.5, -3.0, 2048)
    assert math.isclose(from_config.value(1024), -2.25)
    with pytest.raises(Exception, match=r"train.log_std_anneal"):
        load_config("configs/default.yaml", overrides=["train.log_std_anneal=0"])
