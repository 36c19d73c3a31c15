"""Diversity heads: the actor's last layer has one residual output per λ of the base's grid, interpolated in λ.

Why (``policy.diversity_heads``, docs/results-earlier.md): with one output, a PPO run learned the same correction at
every λ (a hot first token, a cooler rest): it paid at λ = 1, and cost accuracy at λ = 0, where diversity earns
nothing. A single MLP output has to *learn* the product of λ and the rest of the state from noisy returns.
With heads, the product is built in: the mean action is ``sum_l w_l(λ) head_l(latent)`` with the base's own
interpolation weights (:func:`policies.tuned_base.interpolation_weights`), so a row at λ = 0 moves only the
λ = 0 head and its gradient never reaches the others' output weights (the hidden layers stay shared).

Two pieces make SB3 train it:

- :class:`DiversityHeadsPolicy`, an ``ActorCriticPolicy`` whose ``action_net`` has L outputs; its three
  entry points that build the action distribution (``forward``, ``evaluate_actions``, ``get_distribution``)
  weight them by the observation's λ column.
- :class:`PartialVecNormalize`, a ``VecNormalize`` that leaves some columns raw (the λ column), so the weights
  see λ itself. The export writes mean 0 / variance 1 for them (:func:`kelvin.rundir.normalization_stats`),
  and :class:`policies.learned.ActorModule` applies the same heads.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from stable_baselines3.common.distributions import StateDependentNoiseDistribution
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.vec_env import VecNormalize

from envs.rewards import twin_of
from policies.tuned_base import interpolation_grid, interpolation_weights

__all__ = ["DiversityHeadsPolicy", "PartialVecNormalize", "actor_mask", "head_grid"]


class PartialVecNormalize(VecNormalize):
    """``VecNormalize`` whose observation columns ``raw_columns`` pass through unscaled, only clipped to
    ``±clip_obs`` like the others (statistics are still kept for them, unused)."""

    def __init__(self, venv, raw_columns: Sequence[int] = (), **kwargs):
        super().__init__(venv, **kwargs)
        self.raw_columns = [int(c) for c in raw_columns]

    def _normalize_obs(self, obs: np.ndarray, obs_rms) -> np.ndarray:
        out = super()._normalize_obs(obs, obs_rms)
        # clipped like every column, as the exported actor clips them (mean 0 / variance 1: normalization_stats)
        out[..., self.raw_columns] = np.clip(obs[..., self.raw_columns], -self.clip_obs, self.clip_obs)
        return out

    def _unnormalize_obs(self, obs: np.ndarray, obs_rms) -> np.ndarray:
        out = super()._unnormalize_obs(obs, obs_rms)
        out[..., self.raw_columns] = obs[..., self.raw_columns]
        return out


class DiversityHeadsPolicy(ActorCriticPolicy):
    """PPO's ``MlpPolicy`` with one action output per point of ``heads`` (the λ grid), mixed at the λ read from
    observation column ``diversity_col`` (raw: see :class:`PartialVecNormalize`). One action dimension only.

    ``actor_columns`` (``policy.actor_features``): the observation columns the actor reads; the others are
    multiplied by 0 before its MLP, so the residual is a function of those columns alone (the critic reads them
    all). None: every column. The export folds the mask into the first layer's weights (exactly the same
    products), so an exported actor needs nothing new.

    ``twin_rows`` (``train.twin_groups``, the env's group size G): rows come in twin pairs of groups, 2G
    contiguous rows, and :meth:`reset_noise` gives the second group of each pair minus the first one's gSDE
    exploration matrices, so twins with the same state explore in opposite directions. The marginal noise of
    every row is SB3's, so PPO's log-probabilities are unchanged. None: every row its own draw.

    ``noise_columns`` (the position bins' one-hot columns, raw): gSDE's noise is ``onehot(bin) @ W``, one weight
    and one learned std per bin, in place of ``latent_pi @ W``. Exploration is still held over the tokens of a
    bin, but the bins' noises are independent: through the shared latent they were correlated (-0.3 to -0.8 with
    standardised bins, +0.4 to +0.8 raw), so the return of a hot start was credited to the finish too, and the
    finish's learned direction followed the correlation's sign (docs/results.md). None: SB3's latent noise.

    ``action_bias`` (``policy.actor_bias``): whether ``action_net`` has a bias. With no hidden actor layers
    (``net_arch: {pi: [], ...}``) and an actor that reads only the one-hot bins, the residual without a bias is
    one weight per (bin, head): a table, in which one cell's gradient moves no other cell.

    ``action_lr_scale`` (``policy.actor_lr_scale``): ``action_net`` learns at this multiple of the learning rate
    (the other parameters at the rate itself). An Adam step moves a table's cell by about the rate, where an MLP's
    output moves by the sum of many weights' steps, so a bare table needs a larger rate to move as far; the critic
    keeps its own."""

    def __init__(self, *args, heads: Sequence[float], diversity_col: int,
                 actor_columns: Sequence[int] | None = None, twin_rows: int | None = None,
                 noise_columns: Sequence[int] | None = None, action_bias: bool = True,
                 action_lr_scale: float = 1.0, **kwargs):
        self.action_bias, self.action_lr_scale = bool(action_bias), float(action_lr_scale)
        self.twin_rows = None if twin_rows is None else int(twin_rows)
        self.noise_columns = None if not noise_columns else [int(c) for c in noise_columns]
        self.heads = [float(x) for x in heads]
        self.diversity_col = int(diversity_col)
        self.actor_columns = None if actor_columns is None else sorted(int(c) for c in actor_columns)
        super().__init__(*args, **kwargs)
        if not self.share_features_extractor:
            raise ValueError("DiversityHeadsPolicy needs share_features_extractor=True (PPO's default)")
        if int(np.prod(self.action_space.shape)) != 1:
            raise ValueError(f"DiversityHeadsPolicy acts in one dimension, not {self.action_space.shape}")

    def _get_constructor_parameters(self) -> dict:
        return {**super()._get_constructor_parameters(), "heads": self.heads, "diversity_col": self.diversity_col,
                "actor_columns": self.actor_columns, "twin_rows": self.twin_rows, "noise_columns": self.noise_columns,
                "action_bias": self.action_bias, "action_lr_scale": self.action_lr_scale}

    def reset_noise(self, n_envs: int = 1) -> None:
        super().reset_noise(n_envs)
        g = self.twin_rows
        if not g or n_envs % (2 * g) or not isinstance(self.action_dist, StateDependentNoiseDistribution):
            return  # no twins, or a batch not laid out in twin pairs (SB3's own draw)
        with torch.no_grad():
            m = self.action_dist.exploration_matrices.detach().clone()  # (n_envs, latent, actions)
            rows = np.arange(n_envs)
            second = rows[(rows // g) % 2 == 1]  # the rows of each pair's second group
            m[second] = -m[twin_of(second, g)]
        self.action_dist.exploration_matrices = m

    def _build(self, lr_schedule) -> None:
        super()._build(lr_schedule)
        # L outputs in place of 1, initialised as SB3 initialises action_net (orthogonal, gain 0.01); a residual
        # policy zeroes it (kelvin.training), so at update 0 every head is 0 and the policy is the base
        self.action_net = torch.nn.Linear(self.mlp_extractor.latent_dim_pi, len(self.heads), bias=self.action_bias)
        if self.ortho_init:
            self.action_net.apply(lambda m: self.init_weights(m, gain=0.01))
        self.register_buffer("head_grid", torch.tensor(self.heads, dtype=torch.float32))
        if self.noise_columns and isinstance(self.action_dist, StateDependentNoiseDistribution):
            _, self.log_std = self.action_dist.proba_distribution_net(  # (bins, 1): one std per bin
                latent_dim=self.mlp_extractor.latent_dim_pi, log_std_init=self.log_std_init,
                latent_sde_dim=len(self.noise_columns))
        # not in the state dict (persistent=False): a run saved before actor_columns existed still loads
        self.register_buffer("actor_mask", actor_mask(self.observation_space.shape[0], self.actor_columns),
                             persistent=False)
        # the optimizer was built over the old action_net's parameters: rebuild it over the current ones
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)
        if self.action_lr_scale != 1.0:
            self._scale_action_lr()

    def _scale_action_lr(self) -> None:
        """action_net in its own parameter group, whose step runs at ``action_lr_scale`` times the group's lr (SB3
        sets every group's lr to the schedule's value before each update; the hooks scale it for the step only)."""
        head = {id(p) for p in self.action_net.parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in head]},
                  {"params": list(self.action_net.parameters()), "lr_scale": self.action_lr_scale}]
        self.optimizer = self.optimizer_class(groups, lr=self.optimizer.defaults["lr"], **self.optimizer_kwargs)

        def scale(optimizer, *_):
            for group in optimizer.param_groups:
                group["lr"] *= group.get("lr_scale", 1.0)

        def unscale(optimizer, *_):
            for group in optimizer.param_groups:
                group["lr"] /= group.get("lr_scale", 1.0)

        self.optimizer.register_step_pre_hook(scale)
        self.optimizer.register_step_post_hook(unscale)

    def _distribution(self, latent_pi: torch.Tensor, obs: torch.Tensor):
        weights = interpolation_weights(self.head_grid, obs[:, self.diversity_col].float())  # (B, L)
        mean = (self.action_net(latent_pi) * weights).sum(1, keepdim=True)  # (B, 1)
        if isinstance(self.action_dist, StateDependentNoiseDistribution):
            latent_sde = latent_pi if self.noise_columns is None else obs[:, self.noise_columns].float()
            return self.action_dist.proba_distribution(mean, self.log_std, latent_sde)
        return self.action_dist.proba_distribution(mean, self.log_std)

    def _actor_latent(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp_extractor.forward_actor(features * self.actor_mask)  # only the actor's columns

    def _latents(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.extract_features(obs)
        return self._actor_latent(features), self.mlp_extractor.forward_critic(features)

    def forward(self, obs: torch.Tensor, deterministic: bool = False):
        latent_pi, latent_vf = self._latents(obs)
        distribution = self._distribution(latent_pi, obs)
        actions = distribution.get_actions(deterministic=deterministic)
        return actions.reshape((-1, *self.action_space.shape)), self.value_net(latent_vf), distribution.log_prob(actions)

    def evaluate_actions(self, obs: torch.Tensor, actions: torch.Tensor):
        latent_pi, latent_vf = self._latents(obs)
        distribution = self._distribution(latent_pi, obs)
        return self.value_net(latent_vf), distribution.log_prob(actions), distribution.entropy()

    def get_distribution(self, obs: torch.Tensor):
        return self._distribution(self._actor_latent(self.extract_features(obs)), obs)


def actor_mask(dim: int, columns: Sequence[int] | None) -> torch.Tensor:
    """(dim,) float: 1 at ``columns`` (every column when None), 0 elsewhere."""
    if columns is None:
        return torch.ones(dim)
    return torch.zeros(dim).index_fill_(0, torch.as_tensor(list(columns), dtype=torch.long), 1.0)


def head_grid(config) -> tuple[float, ...] | None:
    """The λ grid of a run's diversity heads (the base's grid: ``policy.base_diversity_points`` values over
    ``env.diversity_range``), or None when the run has one output (``policy.diversity_heads`` off, no λ in the
    observation, or one λ)."""
    if not (config.policy.diversity_heads and config.env.features.include_diversity):
        return None
    grid = interpolation_grid(config.env.diversity_bounds, config.policy.base_diversity_points)
    return grid if len(grid) > 1 else None
