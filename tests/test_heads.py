"""Diversity heads (``policy.diversity_heads``): one residual output per λ of the base's grid, interpolated in λ.

The interpolation weights by hand, the λ column left raw by the normaliser, SB3's deterministic action equal to the
exported actor's (torch module and TorchScript) on raw observations, a row at λ = 0 training only its own head,
the policy surviving save/load, and one output where the observation has no λ. Stub LM only: fast."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from envs.generation import TemperatureVecEnv
from envs.prompts import CATEGORIES
from envs.residual import ResidualActionVecEnv
from kelvin.config_loading import load_config
from kelvin.export import export_learned, learned_policy
from kelvin.heads import DiversityHeadsPolicy, PartialVecNormalize, head_grid
from kelvin.rundir import normalization_stats
from policies.artifact import load_policy
from policies.features import FeatureSettings
from policies.tuned_base import TunedBase, TunedBasePolicy, interpolation_weights
from stub_lm import NO_EMBEDDER, STUB_PROMPTS, StubLM, bins_model, obs_col, stub_config

GRID = (0.0, 1.0, 2.0)
BASE = TunedBase(kind="table", lambdas=GRID, temperatures={**{c: (0.2, 0.6, 1.0) for c in CATEGORIES},
                                                           "other": (0.4, 0.4, 0.4)})


def test_interpolation_weights_by_hand():
    w = interpolation_weights(torch.tensor(GRID), torch.tensor([0.0, 0.25, 1.0, 1.5, 2.0, 3.0, -1.0]))
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.75, 0.25, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5],
                             [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # constant outside the grid
    assert torch.equal(w, expected)
    assert torch.equal(interpolation_weights(torch.tensor([0.5]), torch.tensor([0.0, 2.0])), torch.ones(2, 1))


def _heads_model(env, seed=0):
    """A PPO model with diversity heads on ``env`` (under the residual wrapper and the partial normaliser)."""
    col = obs_col(env, "diversity")
    vec = PartialVecNormalize(ResidualActionVecEnv(env, BASE.module(env.feature_spec, env.action_mapping)),
                              raw_columns=[col], norm_reward=False, gamma=1.0)
    model = PPO(DiversityHeadsPolicy, vec, n_steps=4, batch_size=8, seed=seed, device="cpu", use_sde=True,
                policy_kwargs={"heads": list(GRID), "diversity_col": col})
    return model, vec, col


def _env():
    config = stub_config(batch_size=4, group_size=2, max_new_tokens=4, features=FeatureSettings(include_diversity=True))
    return TemperatureVecEnv(config, lm=StubLM(), reward=NO_EMBEDDER, prompts=STUB_PROMPTS)


def test_sb3_action_equals_the_exported_actor_on_raw_observations(tmp_path):
    env = _env()
    model, vec, col = _heads_model(env)
    spec, mapping = env.feature_spec, env.action_mapping
    model.learn(16)  # the normaliser's statistics move off 0 / 1
    with torch.no_grad():
        model.policy.action_net.weight.zero_()
        model.policy.action_net.bias.copy_(torch.tensor([-0.2, 0.1, 0.3]))  # the three heads' residuals
    raw = vec.get_original_obs().copy()
    raw[:, col] = [0.0, 0.5, 1.5, 2.0]  # λ at, between and beyond grid points
    norm = vec.normalize_obs(raw)
    assert np.array_equal(norm[:, col], raw[:, col])  # the heads read λ itself
    other = obs_col(env, "position")
    assert norm[0, other] != raw[0, other]  # every other column is normalised
    residual = torch.tensor([-0.2, -0.05, 0.2, 0.3])  # -0.2; (-0.2 + 0.1) / 2; (0.1 + 0.3) / 2; 0.3
    sb3, _ = model.predict(norm, deterministic=True)
    torch.testing.assert_close(torch.as_tensor(sb3[:, 0]), residual, atol=1e-6, rtol=0)
    base = TunedBasePolicy(BASE, spec, mapping).actions(torch.as_tensor(raw))
    expected = (base + residual).clamp(-1, 1)
    actor = learned_policy(model, vec, spec, mapping, base=BASE)
    torch.testing.assert_close(actor.actions(torch.as_tensor(raw)), expected, atol=1e-6, rtol=0)
    out = export_learned(model.policy, tmp_path / "export", spec, mapping, model={"name": "stub", "vocab_size": 8},
                         obs_normalization=normalization_stats(vec), diversity_range=(0.0, 2.0), base=BASE)
    exported = load_policy(out)  # TorchScript: what every sampler runs
    assert torch.equal(exported.actions(torch.as_tensor(raw)), actor.actions(torch.as_tensor(raw)))
    env.close()


def test_a_row_at_lambda_zero_trains_only_its_own_head():
    env = _env()
    model, vec, col = _heads_model(env)
    obs = torch.as_tensor(vec.reset())
    obs[:, col] = 0.0
    _, log_prob, _ = model.policy.evaluate_actions(obs, torch.full((4, 1), 0.1))
    log_prob.sum().backward()
    grad_w, grad_b = model.policy.action_net.weight.grad, model.policy.action_net.bias.grad
    assert grad_b[0] != 0 and torch.count_nonzero(grad_w[0]) > 0
    assert torch.count_nonzero(grad_w[1:]) == 0 and torch.count_nonzero(grad_b[1:]) == 0
    env.close()


def test_heads_survive_save_and_load(tmp_path):
    env = _env()
    model, vec, col = _heads_model(env)
    model.learn(16)
    model.save(tmp_path / "model.zip")
    vec.save(str(tmp_path / "vec.pkl"))
    loaded = PPO.load(tmp_path / "model.zip", device="cpu")
    assert isinstance(loaded.policy, DiversityHeadsPolicy) and loaded.policy.heads == list(GRID)
    obs = vec.normalize_obs(vec.get_original_obs())
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    again = PartialVecNormalize.load(str(tmp_path / "vec.pkl"), vec.venv)
    assert again.raw_columns == [col]
    stats = normalization_stats(again)
    assert stats["mean"][col] == 0.0 and np.float32(stats["var"][col]) + np.float32(stats["epsilon"]) == 1.0
    env.close()


def test_the_grid_is_the_bases_and_without_lambda_there_is_one_output(tmp_path):
    config = load_config("configs/default.yaml")  # heads on by default
    assert head_grid(config) == (0.0, 0.5, 1.0, 1.5, 2.0)
    assert head_grid(load_config("configs/default.yaml", overrides=["policy.diversity_heads=false"])) is None
    no_lambda = load_config("configs/default.yaml", overrides=["policy.base=none", "env.features.include_diversity=false"])
    assert no_lambda.policy.diversity_heads and head_grid(no_lambda) is None
    assert head_grid(load_config("configs/default.yaml", overrides=["env.diversity_range=[1.0,1.0]"])) is None


def test_an_actor_on_position_and_lambda_ignores_every_other_column_and_exports_so(tmp_path):
    env = _env()
    col, position = obs_col(env, "diversity"), obs_col(env, "position")
    vec = PartialVecNormalize(ResidualActionVecEnv(env, BASE.module(env.feature_spec, env.action_mapping)),
                              raw_columns=[col], norm_reward=False, gamma=1.0)
    model = PPO(DiversityHeadsPolicy, vec, n_steps=4, batch_size=8, seed=0, device="cpu", use_sde=True,
                policy_kwargs={"heads": list(GRID), "diversity_col": col, "actor_columns": [position, col]})
    model.learn(16)
    with torch.no_grad():  # a residual that depends on its inputs (a zeroed last layer would hide the mask)
        model.policy.action_net.weight.normal_(0.0, 0.5)
    raw = vec.get_original_obs().copy()
    raw[:, col] = [0.0, 0.5, 1.5, 2.0]
    other = raw.copy()
    keep = [position, col]
    other[:, [c for c in range(raw.shape[1]) if c not in keep]] += 3.0  # every other feature moves
    act = lambda obs: model.predict(vec.normalize_obs(obs), deterministic=True)[0][:, 0]  # noqa: E731
    assert np.array_equal(act(raw), act(other))
    moved = raw.copy()
    moved[:, position] += 0.25
    assert not np.array_equal(act(raw), act(moved))  # position does reach it
    # the critic still reads everything
    values = lambda obs: model.policy.predict_values(torch.as_tensor(vec.normalize_obs(obs)))  # noqa: E731
    assert not torch.equal(values(raw), values(other))
    actor = learned_policy(model, vec, env.feature_spec, env.action_mapping, base=BASE)
    base = TunedBasePolicy(BASE, env.feature_spec, env.action_mapping).actions(torch.as_tensor(raw))
    expected = (base + torch.as_tensor(act(raw)).clamp(-1, 1)).clamp(-1, 1)
    torch.testing.assert_close(actor.actions(torch.as_tensor(raw)), expected, atol=1e-6, rtol=0)
    out = export_learned(model.policy, tmp_path / "export", env.feature_spec, env.action_mapping,
                         model={"name": "stub", "vocab_size": 8}, obs_normalization=normalization_stats(vec),
                         diversity_range=(0.0, 2.0), base=BASE)
    exported = load_policy(out)
    assert torch.equal(exported.actions(torch.as_tensor(other)), actor.actions(torch.as_tensor(other)))
    model.save(tmp_path / "model.zip")
    loaded = PPO.load(tmp_path / "model.zip", device="cpu")
    assert loaded.policy.actor_columns == sorted(keep)
    assert np.array_equal(loaded.predict(vec.normalize_obs(other), deterministic=True)[0][:, 0], act(raw))
    env.close()


def test_actor_features_are_named_and_need_heads():
    config = load_config("configs/default.yaml", overrides=["policy.actor_features=[position,diversity]"])
    spec = config.env.feature_spec()
    assert config.actor_columns() == [spec.index("position"), spec.index("diversity")]
    assert load_config("configs/default.yaml").actor_columns() is None
    with pytest.raises(ValueError, match=r"policy.actor_features: no feature named 'postion'.*position"):
        load_config("configs/default.yaml", overrides=["policy.actor_features=[postion]"])
    with pytest.raises(ValueError, match=r"policy.actor_features .* one output .*drop policy.actor_features"):
        load_config("configs/default.yaml", overrides=["policy.actor_features=[position]",
                                                       "policy.diversity_heads=false"])


def test_position_bins_reach_the_actor_unnormalised(tmp_path):
    """A run with position bins (kelvin.training._new_model): the bins' one-hot columns pass the normaliser raw,
    like λ, so a rare bin reads 1, not ~(1 - p) / sqrt(p (1 - p)), and the export's statistics leave them alone."""
    config, env, model, vec = bins_model(tmp_path)
    names = config.env.feature_spec().names
    bins = [names.index("position_bin_0"), names.index("position_bin_1")]
    assert vec.raw_columns == [names.index("diversity"), *bins]
    model.learn(16)  # the statistics now hold the bins' real shares (tokens 1-2 of 6: mean ~1/3)
    assert 0.0 < vec.obs_rms.mean[bins[0]] < 1.0
    obs = vec.get_original_obs()
    assert sorted(np.unique(obs[:, bins]).tolist()) == [0.0, 1.0]  # both bins occur in this batch
    assert np.array_equal(vec.normalize_obs(obs)[:, bins], obs[:, bins])
    stats = normalization_stats(vec)
    assert all(stats["mean"][c] == 0.0 and np.float32(stats["var"][c]) + np.float32(stats["epsilon"]) == 1.0
               for c in bins)
    env.close()


def test_with_position_bins_each_bin_explores_with_its_own_noise(tmp_path):
    """gSDE on the bins' one-hot: a row's noise is its exploration matrix's entry for its bin, with that bin's std,
    so the start's and the finish's noise are independent draws (through the shared latent they were not)."""
    config, env, model, vec = bins_model(tmp_path, "ppo.policy_kwargs.log_std_init=-2.0")
    policy = model.policy
    names = config.env.feature_spec().names
    bins = [names.index("position_bin_0"), names.index("position_bin_1")]
    assert policy.noise_columns == bins and tuple(policy.log_std.shape) == (2, 1)
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([[-2.0], [-1.0]]))
    policy.reset_noise(4)
    obs = torch.as_tensor(vec.reset()[:1].repeat(4, 0))  # one state, its bin set by hand below
    obs[:, bins] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # rows 0, 2 start; 1, 3 finish
    with torch.no_grad():
        dist = policy.get_distribution(obs)
        std = dist.distribution.stddev.flatten()
        mean = dist.distribution.mean.flatten()
        noise = policy.action_dist.get_noise(obs[:, bins]).flatten()
        actions = dist.get_actions(deterministic=False).flatten()
    torch.testing.assert_close(std, torch.exp(torch.tensor([-2.0, -1.0, -2.0, -1.0])), atol=1e-5, rtol=0)
    m = policy.action_dist.exploration_matrices[:, :, 0]  # (4 rows, 2 bins)
    torch.testing.assert_close(noise, torch.stack([m[0, 0], m[1, 1], m[2, 0], m[3, 1]]))
    torch.testing.assert_close(actions, mean + noise)
    loaded = PPO.load(_saved(model, tmp_path), device="cpu")  # the setting survives save / load
    assert loaded.policy.noise_columns == bins and tuple(loaded.policy.log_std.shape) == (2, 1)
    env.close()


def _saved(model, tmp_path):
    model.save(tmp_path / "bins.zip")
    return tmp_path / "bins.zip"


TABLE = ("ppo.policy_kwargs.net_arch={pi: [], vf: [8]}", "policy.actor_features=[position_bin_0,position_bin_1]")


@pytest.mark.parametrize("bias", [True, False])
def test_without_a_bias_the_bare_actor_is_a_table_and_one_cell_moves_alone(tmp_path, bias):
    """``policy.actor_bias: false`` with no hidden actor layers and the bins alone: the residual at (bin b, head h) is
    the weight W[h, b], and a gradient step on one cell leaves every other cell where it was. With the bias, the
    same step moves the other bin too (the coupling the table removes)."""
    config, env, model, vec = bins_model(tmp_path, *TABLE, f"policy.actor_bias={str(bias).lower()}")
    policy, names = model.policy, config.env.feature_spec().names
    bins, grid = [names.index("position_bin_0"), names.index("position_bin_1")], policy.heads
    assert (policy.action_net.bias is not None) == bias and not policy.action_net.weight.any()  # starts at the base
    obs = torch.as_tensor(vec.reset()[:1].repeat(2 * len(grid), 0))
    for i, (lam, b) in enumerate((lam, b) for lam in grid for b in range(2)):
        obs[i, bins] = torch.tensor([1.0 - b, float(b)])
        obs[i, policy.diversity_col] = lam
    with torch.no_grad():
        policy.action_net.weight.normal_()
    mean = lambda: policy.get_distribution(obs).distribution.mean.flatten().detach()  # noqa: E731
    before = mean()
    if not bias:
        torch.testing.assert_close(before, policy.action_net.weight[:, bins].flatten())  # row-major: head, bin
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    optimizer.zero_grad()
    policy.get_distribution(obs[:1]).distribution.mean.sum().backward()  # raise the start at λ = grid[0] only
    optimizer.step()
    moved = (mean() - before).abs() > 1e-6
    assert moved[0] and moved[1:].any() == bias
    env.close()


def test_a_table_without_a_bias_zeroes_pulls_exports_and_reloads(tmp_path):
    config, env, model, vec = bins_model(tmp_path, *TABLE, "policy.actor_bias=false")
    from kelvin.callbacks import ResidualPull

    with torch.no_grad():
        model.policy.action_net.weight.fill_(0.5)
    pull = ResidualPull(0.2)
    pull.init_callback(model)
    pull.after_update()  # no bias to scale: the weights alone
    torch.testing.assert_close(model.policy.action_net.weight, torch.full_like(model.policy.action_net.weight, 0.4))
    vec.reset()
    raw = vec.get_original_obs().copy()
    raw[:, config.env.feature_spec().index("position_bin_1")] = [0.0, 1.0, 0.0, 1.0]  # two rows in each bin
    raw[:, config.env.feature_spec().index("position_bin_0")] = [1.0, 0.0, 1.0, 0.0]
    spec, mapping = env.feature_spec, env.action_mapping
    sb3, _ = model.predict(vec.normalize_obs(raw), deterministic=True)
    actor = learned_policy(model, vec, spec, mapping, base=BASE)
    expected = (TunedBasePolicy(BASE, spec, mapping).actions(torch.as_tensor(raw)) + torch.as_tensor(sb3[:, 0]))
    torch.testing.assert_close(actor.actions(torch.as_tensor(raw)), expected.clamp(-1, 1), atol=1e-6, rtol=0)
    out = export_learned(model.policy, tmp_path / "export", spec, mapping, model={"name": "stub", "vocab_size": 8},
                         obs_normalization=normalization_stats(vec), diversity_range=(0.0, 2.0), base=BASE)
    assert torch.equal(load_policy(out).actions(torch.as_tensor(raw)), actor.actions(torch.as_tensor(raw)))
    loaded = PPO.load(_saved(model, tmp_path), device="cpu")
    assert loaded.policy.action_net.bias is None and not loaded.policy.action_bias
    torch.testing.assert_close(loaded.policy.action_net.weight, model.policy.action_net.weight)
    with pytest.raises(Exception, match="policy.actor_bias"):
        load_config(None, ["policy.actor_bias=false", "policy.diversity_heads=false"])
    env.close()


def test_actor_lr_scale_steps_the_output_layer_at_its_multiple_of_the_rate(tmp_path):
    """The training's own Adam, first step (each weight moves by the group's rate, whatever its gradient): the
    output layer moves 10 x 0.01, every other parameter (critic, hidden layers, noise) 0.01; the rate SB3 sets is
    back after the step, and the scale survives save / load."""
    config, env, model, vec = bins_model(tmp_path, "policy.actor_lr_scale=10.0", "ppo.learning_rate=0.01")
    policy = model.policy
    for p in policy.parameters():
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    policy.optimizer.step()
    for name, p in policy.named_parameters():
        expected = 0.1 if name.startswith("action_net.") else 0.01
        torch.testing.assert_close((before[name] - p.detach()).abs(), torch.full_like(p, expected), rtol=1e-4, atol=0)
    assert [g["lr"] for g in policy.optimizer.param_groups] == [0.01, 0.01]
    loaded = PPO.load(_saved(model, tmp_path), device="cpu")
    assert loaded.policy.action_lr_scale == 10.0 and len(loaded.policy.optimizer.param_groups) == 2
    with pytest.raises(Exception, match="policy.actor_lr_scale"):
        load_config(None, ["policy.actor_lr_scale=10.0", "policy.diversity_heads=false"])
    env.close()
