"""scripts/residual_path.py: the states it reads the actor at, the checkpoints it picks, and its reading of a real
smoke run (the last checkpoint and the final model are one policy)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kelvin.config_loading import load_config
from kelvin.rundir import RunDir
from policies.actions import ActionMapping
from policies.features import FeatureSettings, FeatureSpec
from policies.tuned_base import TunedBase, TunedBasePolicy
from stub_lm import bins_model

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "residual_path.py"
_spec = importlib.util.spec_from_file_location("residual_path", _PATH)
residual_path = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(residual_path)


def test_states_set_position_lambda_and_category_and_nothing_else():
    spec = FeatureSpec.of(FeatureSettings(include_diversity=True), 16, ("math", "code"))
    obs = residual_path.states(spec, [1.0, 2.0], [0, 8], "code")
    assert obs.shape == (4, spec.dim)
    torch.testing.assert_close(obs[:, spec.index("position")], torch.tensor([0.0, 0.5, 0.0, 0.5]))
    torch.testing.assert_close(obs[:, spec.index("diversity")], torch.tensor([1.0, 1.0, 2.0, 2.0]))
    assert obs[:, spec.index("category_code")].tolist() == [1.0] * 4
    assert obs.sum().item() == pytest.approx(1.0 + 6.0 + 4.0)  # positions 2 x 0.5, λ 1 + 1 + 2 + 2, 4 one-hots
    other = residual_path.states(spec, [0.0], [0], "poetry")  # not a category of the spec: the "other" slot
    assert other[0, spec.index("category_other")].item() == 1.0


def test_states_set_the_position_bin_of_each_position():
    spec = FeatureSpec.of(FeatureSettings(include_diversity=True, position_bins=(4, 8)), 16, ())
    obs = residual_path.states(spec, [1.0], [0, 3, 4, 8, 15], "math")
    bins = obs[:, spec.index("position_bin_0"):spec.index("position_bin_2") + 1]
    assert bins.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]]  # tokens 1-4, 5-8, 9 on


def test_mapped_temperatures_leave_out_the_rate_limit():
    spec = FeatureSpec.of(FeatureSettings(include_diversity=True), 8, ())
    mapping = ActionMapping(kind="linear", t_min=0.0, t_max=2.4, max_delta=0.1)
    base = TunedBasePolicy(TunedBase(kind="fixed", lambdas=(0.0, 2.0), temperatures={"all": (0.6, 1.2)}), spec, mapping)
    obs = residual_path.states(spec, [0.0, 1.0, 2.0], [4], "math")  # prev_temperature 0: the limit would clamp
    torch.testing.assert_close(residual_path.mapped_temperatures(base, obs), torch.tensor([0.6, 0.9, 1.2]))


def test_default_lambdas_are_the_positive_values_the_run_draws():
    assert residual_path.default_lambdas(load_config(None, ["env.diversity_values=[2.0,0.0,1.0,1.0]"])) == [1.0, 2.0]
    assert residual_path.default_lambdas(load_config(None, ["env.diversity_values=[0.0]"])) == [0.5, 1.0, 1.5, 2.0]
    assert residual_path.default_lambdas(load_config(None)) == [0.5, 1.0, 1.5, 2.0]  # drawn from diversity_range


def test_checkpoints_every_nth_update_then_the_final_model(tmp_path):
    config = load_config(None, ["env.batch_size=8", "env.group_size=4", "ppo.n_steps=8", "ppo.batch_size=64"])  # 64 an update
    (tmp_path / "checkpoints").mkdir()
    for step in (64, 128, 192, 256, 320):
        (tmp_path / "checkpoints" / f"step_{step}.zip").write_bytes(b"")
    (tmp_path / "checkpoints" / "step_64_vecnormalize.pkl").write_bytes(b"")
    run = RunDir(str(tmp_path))
    assert [u for u, _ in residual_path.checkpoints(run, config, every=2)] == [2, 4]  # still training
    (tmp_path / "model.zip").write_bytes(b"")
    chosen = residual_path.checkpoints(run, config, every=2)
    assert [u for u, _ in chosen] == [2, 4, None]
    assert chosen[0][1].name == "step_128.zip" and chosen[-1][1] == tmp_path


def test_exploration_per_bin_and_through_the_shared_latent(tmp_path):
    """--noise: with position bins the noise is one draw per bin (std exp(log_std[bin]), the bins uncorrelated, two
    states in one bin the same draw); with the actor's latent (bins off) the correlation is the latents' cosine
    under diag(std²), by hand."""
    config, env, model, vec = bins_model(tmp_path, "ppo.policy_kwargs.log_std_init=-2.0")
    policy = model.policy
    with torch.no_grad():
        policy.log_std.copy_(torch.tensor([[-2.0], [-1.0]]))
    vec.reset()
    obs = residual_path.states(config.env.feature_spec(), [0.0, 1.0], [0, 1, 4], "math")  # bins 0, 0, 1 at each λ
    std, corr = residual_path.exploration_of(policy, vec, obs)
    e1, e2 = torch.exp(torch.tensor(-2.0)), torch.exp(torch.tensor(-1.0))
    torch.testing.assert_close(std, torch.stack([e1, e1, e2] * 2))
    torch.testing.assert_close(corr[:3, :3], torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    env.close()
    config, env, model, vec = bins_model(tmp_path, "policy.diversity_heads=false")  # no heads: SB3's MlpPolicy
    policy = model.policy
    assert vec.raw_columns == [config.env.feature_spec().index(f"position_bin_{i}") for i in (0, 1)]
    vec.reset()
    std, corr = residual_path.exploration_of(policy, vec, obs[[0, 2]])
    with torch.no_grad():
        x = torch.as_tensor(vec.normalize_obs(obs[[0, 2]].numpy()))
        latent = policy.mlp_extractor.forward_actor(policy.extract_features(x))
        w = torch.exp(policy.log_std[:, 0]) ** 2
    a, b = latent[0], latent[1]
    torch.testing.assert_close(std, torch.stack([(a * a * w).sum().sqrt(), (b * b * w).sum().sqrt()]))
    torch.testing.assert_close(corr[0, 1], (a * b * w).sum() / (std[0] * std[1]))
    env.close()


@pytest.mark.slow
def test_on_the_smoke_run_the_last_checkpoint_reads_as_the_final_model(smoke_run, capsys):
    assert residual_path.main([str(smoke_run.run_dir), "--every", "1", "--lambdas", "0,2", "--positions", "0,4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("note: this actor reads more than position, λ and the category")  # the smoke actor reads them all
    rows = [line.split() for line in lines[lines.index(next(x for x in lines if x.split()[0] == "update")) + 1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "final"]  # 96 steps of 32-sample rollouts, a checkpoint each
    assert rows[2][1:] == rows[3][1:] and len(rows[3]) == 5


@pytest.mark.parametrize("bias, cosine", [(False, 0.0), (True, 0.5)])
def test_coupling_of_a_bare_actor_by_hand(tmp_path, bias, cosine):
    """--coupling on a bare output layer reading the bins alone: a state's gradient is its head's row of
    [onehot(bin), 1 (the bias)], so the start and the finish at one λ have cosine 1/2 with a bias and 0 without
    (a table); states at different λ heads share no parameter: 0."""
    config, env, model, vec = bins_model(tmp_path, "ppo.policy_kwargs.net_arch={pi: [], vf: [8]}",
                                         "policy.actor_features=[position_bin_0,position_bin_1]",
                                         f"policy.actor_bias={str(bias).lower()}")
    vec.reset()
    obs = residual_path.states(config.env.feature_spec(), [1.0, 2.0], [0, 4], "math")  # bins 0, 1 at each λ
    cos = residual_path.coupling_of(model.policy, vec, obs)
    expected = torch.tensor([[1.0, cosine, 0.0, 0.0], [cosine, 1.0, 0.0, 0.0],
                             [0.0, 0.0, 1.0, cosine], [0.0, 0.0, cosine, 1.0]])
    torch.testing.assert_close(cos, expected, atol=1e-6, rtol=0)
    env.close()
