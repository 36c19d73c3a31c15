"""A learned temperature policy: the PPO actor as a plain torch module, behind the one policy protocol.

:class:`ActorModule` is what an export writes as TorchScript (``policy.pt``): raw observations
(B, F) -> VecNormalize's normalisation -> the actor MLP (the Gaussian's mean, i.e. the deterministic
action) -> ``clamp(-1, 1)`` as SB3's ``predict`` clips. :class:`LearnedPolicy` wraps such a module,
so the observation statistics are applied in exactly one place (torch), and training's validation,
evaluation and every sampler run the same code. Building the module from a stable-baselines3 model
is :func:`kelvin.export.actor_module` (this package does not import SB3).
"""

from __future__ import annotations

import torch

from policies.actions import ActionMapping
from policies.base import TemperaturePolicy
from policies.features import FeatureSpec
from policies.tuned_base import BaseModule, interpolation_weights

__all__ = ["ActorModule", "LearnedPolicy"]


class ActorModule(torch.nn.Module):
    """Raw observations (B, F) -> actions (B, 1) in [-1, 1]: normalise, actor MLP, clip, plus the base, clip.

    ``clip((obs - mean) / sqrt(var + epsilon), -clip, clip)`` with VecNormalize's statistics (skipped
    when ``mean`` is None), then ``net`` (SB3's ``mlp_extractor.policy_net`` + ``action_net``: the
    Gaussian mean, i.e. the deterministic action), then ``clamp(-1, 1)``. With a ``base``
    (:class:`~policies.tuned_base.BaseModule`, reading the raw observation) the result is the residual:
    ``clamp(base(obs) + residual, -1, 1)``.

    ``heads`` (the λ grid, L points; ``policy.diversity_heads``): ``net`` ends in L outputs, one residual per
    grid point, interpolated linearly at the row's λ (column ``diversity_col``, left unnormalised) as the base is
    (:func:`~policies.tuned_base.interpolation_weights`). A row at λ = 0 then reads only the λ = 0 head.
    """

    def __init__(self, net: torch.nn.Sequential, mean: torch.Tensor | None, var: torch.Tensor | None,
                 clip: float = 10.0, epsilon: float = 1e-8, base: BaseModule | None = None,
                 heads: torch.Tensor | None = None, diversity_col: int = -1):
        super().__init__()
        self.has_base = base is not None
        self.base = base if base is not None else BaseModule.zero()
        dim = int(net[0].in_features)
        self.net = net
        self.has_heads = heads is not None
        self.register_buffer("heads", torch.zeros(1) if heads is None else
                             torch.as_tensor(heads, dtype=torch.float32).reshape(-1).contiguous())
        self.diversity_col = int(diversity_col)
        if self.has_heads and self.diversity_col < 0:
            raise ValueError("an actor with diversity heads reads λ from the observation: give diversity_col")
        self.normalize = mean is not None
        self.register_buffer("mean", torch.zeros(dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("var", torch.ones(dim) if var is None else torch.as_tensor(var, dtype=torch.float32))
        self.clip = float(clip)
        self.epsilon = float(epsilon)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = obs.to(torch.float32)  # (B, F)
        if self.normalize:
            x = torch.clamp((x - self.mean) / torch.sqrt(self.var + self.epsilon), -self.clip, self.clip)
        a = self.net(x)  # (B, 1), or (B, L) with heads
        if self.has_heads:
            w = interpolation_weights(self.heads, x[:, self.diversity_col].contiguous())  # (B, L) λ, clipped as trained
            a = (a * w).sum(1, keepdim=True)  # (B, 1)
        a = torch.clamp(a, -1.0, 1.0)
        if self.has_base:
            a = torch.clamp(a + self.base(obs).view(-1, 1), -1.0, 1.0)  # (B, 1) base + residual
        return a


class LearnedPolicy(TemperaturePolicy):
    """A trained actor network (an :class:`ActorModule`, or its TorchScript) as a temperature policy.

    Stateless and deterministic. ``actions(obs)`` runs the module on ``obs``'s device (the module
    follows the observations there) and returns (B,) actions in [-1, 1].
    """

    name = "learned"

    def __init__(self, module: torch.nn.Module, feature_spec: FeatureSpec, action_mapping: ActionMapping,
                 label: str = "learned (PPO)"):
        super().__init__(feature_spec, action_mapping)
        self.module = module.eval()
        self._label = str(label)
        self._device = next((b.device for b in module.buffers()), torch.device("cpu"))

    @property
    def label(self) -> str:
        return self._label

    def __repr__(self) -> str:
        return f"{type(self).__name__}(label={self.label!r}, features={self.feature_spec.dim})"

    def actions(self, obs: torch.Tensor, episode_start: torch.Tensor | None = None) -> torch.Tensor:  # noqa: ARG002
        if obs.device != self._device:
            self.module = self.module.to(obs.device)
            self._device = obs.device
        with torch.no_grad():
            return self.module(obs).reshape(-1)  # (B,)
