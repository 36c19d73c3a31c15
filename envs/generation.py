"""Temperature environments over real token-by-token generation.

:class:`TemperatureVecEnv` is a natively batched stable-baselines3 ``VecEnv``: one process, one
model, B rows decoded together over one KV cache. :class:`TemperatureEnv` is the single-episode
``gymnasium.Env`` over the same machinery (registered as ``kelvin/Temperature-v0``). Both share
:class:`~envs.generation_core.GenerationCore`, which owns the model state, the featurizer, the sampler call
and the reward.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv

from envs.config import EnvConfig
from envs.generation_core import GenerationCore
from envs.lm import CausalLM, ModelConfig, load_causal_lm
from envs.prompts import DEFAULT_CATEGORY, Prompt
from envs.rewards import RewardConfig
from policies.actions import ActionMapping
from policies.features import FeatureSpec
from samplers.suggest import did_you_mean

__all__ = ["TemperatureVecEnv", "TemperatureEnv"]


class TemperatureVecEnv(VecEnv):
    """Batched temperature environment for stable-baselines3 (one model, B rows, one KV cache).

    ## Description
    Each row generates a completion for a prompt token by token with a real causal LM. At every
    step the agent picks the sampling temperature of the row's next token (negative values
    included: a negative temperature inverts the ranking of the kept tokens).

    ## Action Space
    ``Box(-1, 1, (1,), float32)`` per row, mapped to a temperature in ``[t_min, t_max]`` by
    ``env.action`` (kind ``linear`` or ``inverse``), with an optional rate limit
    ``max_delta``. Out-of-range actions are clipped; NaN actions raise ``ValueError``.

    ## Observation Space
    ``Box(-inf, inf, (F,), float32)``: the raw features of ``policies/features.py`` (entropy,
    normalised entropy, varentropy, max prob, top-2 margin, logit std, median of the top
    probabilities, position, previous temperature, surprise, running quality, repetition,
    anomaly, the category one-hot when ``include_category``, λ with ``include_diversity``).
    Not normalised: the learned
    policy's normaliser (VecNormalize) belongs to the policy.

    ## Rewards
    ``quality + λ * diversity`` (``envs/rewards.py`` has the table and scales). Per token: base
    log-probability, repetition, anomaly (and tempered entropy, off by default). At the end of the
    group: coherence to the prompt, text anomaly, correctness on answerable prompts, and the diversity
    of each sample against the other samples of its group (semantic distance, novel bigrams). Every
    component is in the step ``info`` (``reward_components``), with the training signal's credit terms
    (``CREDIT_TERMS``: what a sample's tokens did to the others' diversity; no weight in the reward).

    ## Starting State
    The rows come in groups of ``group_size``: K samples of one prompt from the configured split
    (seeded order) under one diversity dial λ (drawn per group from ``diversity_range`` or
    ``diversity_values``), prefilled together; the first observation describes the first token's
    distribution.

    ## Episode End
    A row's completion ends on EOS or at ``max_new_tokens``; the row then waits (actions ignored,
    observation held at its terminal one, reward 0, ``info["active"] = False``) until every row of its
    group has ended. At that step all rows of the group are done: ``info["TimeLimit.truncated"]`` is
    True for a row that reached ``max_new_tokens`` without EOS; its ``info`` carries
    ``terminal_observation``, ``episode`` (``r``, ``l`` = tokens drawn, ``t``), the reward breakdown,
    λ (``diversity``), the temperature trace (``temperatures``), the exact base log-probability of
    every drawn token (``logprobs``), the completion (``completion``, ``token_ids``), ``answerable`` /
    ``correct``; and the group restarts at once (autoreset): the returned observation is the first of
    its next episode.

    ## Arguments
    ``config`` (:class:`EnvConfig`; ``workers`` is the factory's business, see
    :func:`envs.distributed.make_vec_env`), ``lm`` (a loaded :class:`CausalLM`; default: load
    ``model_config``), ``reward`` (:class:`RewardConfig`), ``prompts`` (override the prompt file),
    ``shard`` (``(index, count)``: these rows are one shard of a larger env, see :class:`GenerationCore`).
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, lm: CausalLM | None = None,
                 reward: RewardConfig | None = None, model_config: ModelConfig | None = None,
                 prompts: Sequence[Prompt] | None = None, shard: tuple[int, int] = (0, 1), twins: bool = False):
        config = config or EnvConfig()
        lm = lm or load_causal_lm(model_config or ModelConfig())
        self.core = GenerationCore(config, lm, reward, prompts, shard=shard, twins=twins)
        self.config = config
        self.render_mode = None
        self._actions: np.ndarray | None = None
        obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(self.core.spec.dim,), dtype=np.float32)
        act_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        super().__init__(config.batch_size, obs_space, act_space)

    @property
    def lm(self) -> CausalLM:
        return self.core.lm

    @property
    def feature_spec(self) -> FeatureSpec:
        return self.core.spec

    @property
    def action_mapping(self) -> ActionMapping:
        return self.core.mapping

    @property
    def timings(self) -> dict[str, float]:
        """Cumulative ``model_s`` and ``env_s`` (seconds in the LM and in the env's own work), ``tokens`` (completion
        tokens drawn) and ``waiting_rows`` (row-steps spent waiting for a group); the Ray env has the same."""
        return self.core.timings

    def warm_prompts(self, episodes: int) -> dict[str, float]:
        """Prefill the prompts of every group's next ``episodes`` episodes, batched (:meth:`GenerationCore.warm_prompts`)."""
        return self.core.warm_prompts(episodes)

    def reset(self) -> np.ndarray:
        seed = self._seeds[0] if getattr(self, "_seeds", None) and self._seeds[0] is not None else None
        if seed is not None:
            self.core.seed(seed)
        if hasattr(self, "_reset_seeds"):
            self._reset_seeds()
        return self.core.reset_groups(None).cpu().numpy()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async(); call env.step(actions)")
        if self.core.state is None:
            raise RuntimeError("call env.reset() before env.step()")
        result = self.core.step(self._actions)
        self._actions = None
        obs = result.obs.cpu().numpy()
        temps = result.temperature.tolist()
        infos: list[dict] = [
            {"temperature": temps[i], "active": bool(result.active[i]),
             "reward_components": {k: float(v[i]) for k, v in result.components.items()}}
            for i in range(self.num_envs)
        ]
        if result.done.any():
            rows = np.flatnonzero(result.done)
            for r in rows:
                info = self.core.episode_info(int(r))
                info["terminal_observation"] = obs[r].copy()
                info["TimeLimit.truncated"] = bool(result.truncated[r])
                infos[r].update(info)
            groups = np.unique(rows // self.core.G)
            obs = self.core.reset_groups(groups).cpu().numpy()
        return obs, result.reward, result.done.copy(), infos

    def close(self) -> None:
        self.core.close()

    # ------------------------------------------------------------------ VecEnv plumbing
    def _indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:  # noqa: ARG002 (SB3's VecEnv signature)
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        return [getattr(self, method_name)(*method_args, **method_kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:  # noqa: ARG002 (SB3's VecEnv signature)
        return [False for _ in self._indices(indices)]

    def get_images(self):
        return [None for _ in range(self.num_envs)]


RESET_OPTIONS = ("prompt", "category", "diversity")
"""What ``TemperatureEnv.reset(options=...)`` reads: a prompt to generate for (and its category), the λ dial."""


class TemperatureEnv(gym.Env):
    """Single-episode Gymnasium view of :class:`TemperatureVecEnv` (one row, same machinery).

    Spaces, rewards and episode end are those of :class:`TemperatureVecEnv` (see there):
    ``terminated`` on EOS, ``truncated`` at ``max_new_tokens``. ``reset(seed=...)`` reseeds the
    prompt order and the token draws; ``reset(options={"prompt": "..."})`` generates for a given
    prompt instead of the next one of the split. Arguments: an :class:`EnvConfig` (its batch and
    group size are forced to 1) or its fields as keyword arguments, plus ``model_config`` /
    ``reward`` / ``lm``.
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, lm: CausalLM | None = None,
                 reward: RewardConfig | None = None, model_config: ModelConfig | None = None,
                 prompts: Sequence[Prompt] | None = None, **env_kwargs):
        base = asdict(config) if config is not None else {}
        base.update(env_kwargs)
        base.update(batch_size=1, group_size=1)
        self.config = EnvConfig(**base)
        lm = lm or load_causal_lm(model_config or ModelConfig())
        self.core = GenerationCore(self.config, lm, reward, prompts)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(self.core.spec.dim,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self._done = True

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None:
            self.core.seed(seed)
        prompt_indices = None
        unknown = [key for key in options or {} if key not in RESET_OPTIONS]
        if unknown:
            raise ValueError(f"reset(options=...): unknown option {unknown[0]!r}; "
                             f"{did_you_mean(unknown[0], RESET_OPTIONS, always_list=True)}")
        if options and "prompt" in options:
            if not isinstance(options["prompt"], str) or not options["prompt"].strip():
                raise ValueError(f"reset(options={{'prompt': {options['prompt']!r}}}): the prompt is empty; give the "
                                 "text to generate for, or leave 'prompt' out to take the next prompt of the split")
            prompt = Prompt(text=str(options["prompt"]), category=str(options.get("category", DEFAULT_CATEGORY)),
                            id=f"user-{len(self.core.prompts)}", split=None)
            prompt_indices = [self.core.add_prompt(prompt)]
        obs = self.core.reset_groups(None if self.core.state is None else np.array([0]), prompt_indices,
                                     diversity=(options or {}).get("diversity"))
        self._done = False
        p = self.core.prompts[self.core.episode.prompt[0]]
        return obs[0].cpu().numpy(), {"prompt_id": p.id, "prompt": p.text, "category": p.category}

    def close(self) -> None:
        self.core.close()

    def step(self, action):
        if self._done:
            raise RuntimeError("the episode has ended; call reset() before step()")
        action = np.asarray(action, dtype=np.float32)
        if action.size != 1:
            raise ValueError(f"step(action): expected one action (shape (1,) or a scalar), got shape {action.shape}")
        result = self.core.step(action.reshape(1))
        terminated, truncated = bool(result.terminated[0]), bool(result.truncated[0])  # a group of one: done now
        info = {"temperature": float(result.temperature[0]),
                "reward_components": {k: float(v[0]) for k, v in result.components.items()}}
        if terminated or truncated:
            self._done = True
            info.update(self.core.episode_info(0))
        return result.obs[0].cpu().numpy(), float(result.reward[0]), terminated, truncated, info

