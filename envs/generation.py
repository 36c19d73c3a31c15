"""Temperature environments over real token-by-token generation.

:class:`TemperatureVecEnv` is a natively batched stable-baselines3 ``VecEnv``: one process, one
model, B rows decoded together over one KV cache. :class:`TemperatureEnv` is the single-episode
``gymnasium.Env`` over the same machinery (registered as ``kelvin/Temperature-v0``). Both share
:class:`GenerationCore`, which owns the model state, the featurizer, the sampler call and the
reward.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch
from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as settings_dataclass
from stable_baselines3.common.vec_env import VecEnv

from anomaly.prior import build_token_prior
from envs.lm import CausalLM, ModelConfig, load_causal_lm
from envs.prompts import CATEGORIES, Prompt, category_index, load_prompts
from envs.rewards import EPISODE_COMPONENTS, STEP_COMPONENTS, RewardConfig, RewardModel
from policies.actions import ActionMapping
from policies.features import FeatureSettings, FeatureSpec, Featurizer
from samplers.core import Truncation, sample

__all__ = ["EnvConfig", "GenerationCore", "TemperatureVecEnv", "TemperatureEnv"]


def _truncation(value):
    """``env.truncation`` from a mapping: the sampler core's :class:`~samplers.core.Truncation` checks its own fields."""
    return Truncation.from_dict(value) if isinstance(value, dict) else value


@settings_dataclass(config=ConfigDict(extra="forbid"))
class EnvConfig:
    """The ``env:`` block of a Kelvin config (its defaults are the embedded default run's).

    Nests the action mapping (``env.action``: :class:`~policies.actions.ActionMapping`), the truncation
    (``env.truncation``: :class:`~samplers.core.Truncation`) and the feature settings (``env.features``:
    :class:`~policies.features.FeatureSettings`). A pydantic dataclass: every field is checked against its
    type and range when it is built, from a config file or in Python.
    """

    prompts: Optional[StrictStr] = Field(None, examples=["my_prompts.jsonl"])
    """A JSONL or TXT prompt file; None = Kelvin's packaged prompt set."""
    split: Optional[Literal["train", "validation", "test"]] = "train"
    """Which split of the prompt file (train / validation / test; None = all)."""
    categories: Optional[list[StrictStr]] = Field(None, min_length=1, examples=[["code", "explanation"]])
    """Only these prompt categories (None = all)."""
    batch_size: StrictInt = Field(16, ge=1)
    """Rows decoded together (the VecEnv's num_envs); raise it on a GPU."""
    group_size: StrictInt = Field(4, ge=1)
    """Rows that share a prompt (diversity across samples of one prompt); divides batch_size."""
    max_new_tokens: StrictInt = Field(24, ge=1)
    """Episode length limit (truncation); EOS ends an episode earlier (termination)."""
    action: ActionMapping = Field(default_factory=ActionMapping)
    """Action -> temperature: ``{kind, t_min, t_max, min_abs_temperature, max_delta}`` (policies/actions.py)."""
    truncation: Annotated[Truncation, BeforeValidator(_truncation)] = Field(default_factory=Truncation)
    """Truncation before the temperature: ``{top_k, top_p, min_p, top_n_sigma}`` (samplers/core.py); all off."""
    include_category: StrictBool = True
    """Append the prompt category one-hot to the observation."""
    features: FeatureSettings = Field(default_factory=FeatureSettings)
    """Feature settings ``{initial_temperature, ema_decay, repeat_window, anomaly_surprise, median_k,
    include_diversity_weight, version}`` (policies/features.py)."""
    token_prior: StrictBool = True
    """Use the vocabulary's anomaly priors (anomaly/rules.py) in the featurizer's anomaly signal."""
    discovered_anomalies: StrictBool = True
    """Raise the priors of the model's discovered anomalous tokens (anomaly/discovery.py; cached on disk,
    probed once per model when missing). Only with ``token_prior``."""
    seed: StrictInt = Field(0, ge=0)
    """Seed of the prompt order and of the token draws."""

    def __post_init__(self):
        if self.batch_size % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide batch_size={self.batch_size} "
                             "(rows are split into groups that share a prompt)")

    def feature_spec(self) -> FeatureSpec:
        """The observation spec: ``features`` plus horizon (max_new_tokens) and categories (include_category)."""
        return FeatureSpec.of(self.features, self.max_new_tokens, CATEGORIES if self.include_category else ())


@dataclass
class StepResult:
    """What :meth:`GenerationCore.step` returns (tensors on the core's device unless noted)."""

    obs: torch.Tensor  # (B, F) observation after the step (the terminal one for finished rows)
    reward: np.ndarray  # (B,) float32
    terminated: np.ndarray  # (B,) bool, EOS
    truncated: np.ndarray  # (B,) bool, max_new_tokens without EOS
    tokens: torch.Tensor  # (B,) drawn tokens
    temperature: torch.Tensor  # (B,) temperatures used
    components: dict[str, np.ndarray]  # per-token components (B,), episode components (B,) (0 where not done)


class GenerationCore:
    """B rows of generation sharing one model and KV cache; no autoreset (the envs decide).

    Row ``r`` belongs to group ``r // group_size``; the k-th episode of every row in group ``g``
    uses prompt ``order[(g + k * n_groups) % N]`` (``order`` a seeded permutation), so the rows of
    a group sample the same prompts, possibly at different times.
    """

    def __init__(self, config: EnvConfig, lm: CausalLM, reward: RewardConfig | RewardModel | None = None,
                 prompts: Sequence[Prompt] | None = None):
        self.config = config
        self.lm = lm
        self.device = lm.device
        self.mapping = config.action
        self.spec = config.feature_spec()
        self.reward = reward if isinstance(reward, RewardModel) else RewardModel(reward or RewardConfig())
        self.prompts = list(prompts) if prompts is not None else load_prompts(
            config.prompts, split=config.split, categories=config.categories)
        self._prompt_ids = lm.encode([p.text for p in self.prompts])
        lm.check_fits(self._prompt_ids, config.max_new_tokens)
        self.B = config.batch_size
        self.n_groups = self.B // config.group_size
        token_prior = build_token_prior(lm, config.discovered_anomalies) if config.token_prior else None  # (V,)
        self.featurizer = Featurizer(self.spec, self.B, self.device, token_prior=token_prior)
        self.seed(config.seed)
        self.state = None
        self.logits: torch.Tensor | None = None
        self.timings = {"model_s": 0.0, "env_s": 0.0, "tokens": 0}

    # ------------------------------------------------------------------ seeding / prompts
    def seed(self, seed: int | None) -> None:
        seed = self.config.seed if seed is None else int(seed)
        self._seed = seed
        self._order = np.random.default_rng(seed).permutation(len(self.prompts))
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.episode_index = np.zeros(self.B, dtype=np.int64)  # per row: how many episodes started
        self.reward.reset_memory()

    def _next_prompt_indices(self, rows: np.ndarray) -> np.ndarray:
        groups = rows // self.config.group_size
        k = self.episode_index[rows]
        self.episode_index[rows] += 1
        return self._order[(groups + k * self.n_groups) % len(self.prompts)]

    # ------------------------------------------------------------------ episodes
    def add_prompt(self, prompt: Prompt) -> int:
        """Append a prompt (checked against the context window); returns its index."""
        ids = self.lm.encode([prompt.text])
        self.lm.check_fits(ids, self.config.max_new_tokens)
        self.prompts.append(prompt)
        self._prompt_ids.append(ids[0])
        return len(self.prompts) - 1

    def reset_rows(self, rows: np.ndarray | None = None, prompt_indices: Sequence[int] | None = None) -> torch.Tensor:
        """Start new episodes on ``rows`` (None = all, a fresh batch); returns the (B, F) observation.

        ``prompt_indices`` overrides the scheduled prompts (one index into ``self.prompts`` per row).
        """
        t0 = time.perf_counter()
        all_rows = rows is None or self.state is None
        rows = np.arange(self.B) if all_rows else np.asarray(rows, dtype=np.int64)
        if prompt_indices is None:
            prompt_idx = self._next_prompt_indices(rows)
        else:
            prompt_idx = np.asarray(prompt_indices, dtype=np.int64).reshape(-1)
            if prompt_idx.shape[0] != rows.shape[0]:
                raise ValueError(f"reset_rows got {rows.shape[0]} rows but {prompt_idx.shape[0]} prompt indices")
        ids = [self._prompt_ids[i] for i in prompt_idx]
        t_model = time.perf_counter()
        if all_rows:
            self.logits, self.state = self.lm.prefill(ids)  # (B, V)
            self.row_prompt = np.zeros(self.B, dtype=np.int64)
            self.tokens = torch.full((self.B, self.config.max_new_tokens), -1, dtype=torch.long, device=self.device)
            self.length = torch.zeros(self.B, dtype=torch.long, device=self.device)
            self.temps = torch.zeros((self.B, self.config.max_new_tokens), device=self.device)
            self.logps = torch.zeros((self.B, self.config.max_new_tokens), device=self.device)  # exact ln p_base
            self.ep_return = np.zeros(self.B, dtype=np.float64)
            self.ep_components = {k: np.zeros(self.B) for k in STEP_COMPONENTS + EPISODE_COMPONENTS}
            self.ep_start = np.full(self.B, time.perf_counter())
        else:
            new_logits = self.lm.replace_rows(self.state, torch.as_tensor(rows, device=self.device), ids)
            self.logits = self.logits.clone()
            self.logits[torch.as_tensor(rows, device=self.device)] = new_logits
        dt_model = time.perf_counter() - t_model
        self.timings["model_s"] += dt_model
        self.row_prompt[rows] = prompt_idx
        rows_t = torch.as_tensor(rows, device=self.device)
        self.tokens[rows_t] = -1
        self.length[rows_t] = 0
        self.temps[rows_t] = 0.0
        self.logps[rows_t] = 0.0
        self.ep_return[rows] = 0.0
        for v in self.ep_components.values():
            v[rows] = 0.0
        self.ep_start[rows] = time.perf_counter()
        cats = [category_index(self.prompts[i].category) for i in prompt_idx]
        self.featurizer.reset(rows_t, category=cats)
        obs = self.featurizer.observe(self.logits)
        self.timings["env_s"] += time.perf_counter() - t0 - dt_model
        return obs

    def step(self, actions: np.ndarray | torch.Tensor) -> StepResult:
        """One token for every row. Rows past their end must be reset before the next step."""
        t0 = time.perf_counter()
        a = torch.as_tensor(np.asarray(actions, dtype=np.float32).reshape(-1), device=self.device)
        if a.shape[0] != self.B:
            raise ValueError(f"expected {self.B} actions (one per row), got {a.shape[0]}")
        f = self.featurizer.state
        temperature = self.mapping.to_temperature(a, previous=f.prev_temperature, first_step=f.position == 0)
        tokens, tempered = sample(self.logits, temperature, generator=self.generator, return_tempered=True,
                                  **self.config.truncation.to_dict())  # (B,), (B, V)
        stats = self.featurizer.update(tokens, temperature)
        pos = self.length.clone()  # (B,) index this token is written at
        self.tokens.scatter_(1, pos.view(-1, 1), tokens.view(-1, 1))
        self.temps.scatter_(1, pos.view(-1, 1), temperature.view(-1, 1))
        self.logps.scatter_(1, pos.view(-1, 1), stats.logp.view(-1, 1).float())
        self.length = pos + 1
        repeated = self._closes_repeated_ngram(pos)
        comps = self.reward.step_components(stats.logp, tempered, repeated, stats.anomalous)
        eos = self.lm.is_eos(tokens)
        terminated = eos.cpu().numpy()
        truncated = (self.length >= self.config.max_new_tokens).cpu().numpy() & ~terminated
        t_model = time.perf_counter()
        self.logits = self.lm.decode(self.state, tokens)  # (B, V)
        dt_model = time.perf_counter() - t_model
        obs = self.featurizer.observe(self.logits)
        components = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in comps.items()}
        done = terminated | truncated
        for k in EPISODE_COMPONENTS:
            components[k] = np.zeros(self.B, dtype=np.float32)
        if done.any():
            rows = np.flatnonzero(done)
            ep = self._episode_components(rows)
            for k, v in ep.items():
                components[k][rows] = v
        reward = self.reward.combine(components)
        self.ep_return += reward
        for k, v in components.items():
            self.ep_components[k] += v
        self.timings["model_s"] += dt_model
        self.timings["env_s"] += time.perf_counter() - t0 - dt_model
        self.timings["tokens"] += self.B
        return StepResult(obs=obs, reward=reward.astype(np.float32), terminated=terminated, truncated=truncated,
                          tokens=tokens, temperature=temperature, components=components)

    def _closes_repeated_ngram(self, pos: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the token just written at ``pos`` closes an n-gram seen earlier in its row."""
        n = self.reward.config.repetition_n
        width = self.config.max_new_tokens
        if width < n + 1:
            return torch.zeros(self.B, dtype=torch.bool, device=self.device)
        grams = self.tokens.unfold(1, n, 1)  # (B, W - n + 1, n): gram j covers tokens j..j+n-1
        start = (pos - n + 1).clamp_min(0)  # (B,)
        current = grams.gather(1, start.view(-1, 1, 1).expand(-1, 1, n))  # (B, 1, n)
        same = (grams == current).all(-1)  # (B, W - n + 1)
        earlier = torch.arange(grams.shape[1], device=self.device).view(1, -1) < start.view(-1, 1)
        return (same & earlier).any(-1) & (pos >= n - 1)

    def completion_ids(self, row: int) -> list[int]:
        """Token ids generated in ``row``'s current episode, EOS excluded."""
        eos = set(self.lm.eos_token_ids.tolist())
        return [t for t in self.tokens[row, : int(self.length[row])].tolist() if t not in eos]

    def completion_text(self, row: int) -> str:
        return self.lm.decode_text(self.completion_ids(row))

    def _episode_components(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        ids = [self.completion_ids(int(r)) for r in rows]
        texts = [self.lm.decode_text(t) for t in ids]
        prompts = [self.prompts[self.row_prompt[r]] for r in rows]
        return self.reward.episode_components([p.id for p in prompts], [p.text for p in prompts], texts, ids)

    def episode_info(self, row: int) -> dict[str, Any]:
        """SB3-style ``episode`` stats plus Kelvin's breakdown for a row that just finished."""
        n = int(self.length[row])
        temps = self.temps[row, :n].cpu().numpy().copy()  # a copy: on CPU .numpy() shares memory the reset zeroes
        logps = self.logps[row, :n].cpu().numpy().copy()
        prompt = self.prompts[self.row_prompt[row]]
        return {
            "episode": {"r": float(self.ep_return[row]), "l": n, "t": round(time.perf_counter() - self.ep_start[row], 6)},
            "reward_components": {k: float(v[row]) for k, v in self.ep_components.items()},
            "temperature_mean": float(temps.mean()) if n else 0.0,
            "temperature_std": float(temps.std()) if n else 0.0,
            "negative_fraction": float((temps < 0).mean()) if n else 0.0,
            "near_greedy_fraction": float((np.abs(temps) < 0.05).mean()) if n else 0.0,
            "temperatures": temps,
            "logprobs": logps,  # exact (unclipped) ln p_base(token) at T = 1 of every drawn token, EOS included
            "token_ids": self.completion_ids(row),
            "prompt_id": prompt.id,
            "category": prompt.category,
            "completion": self.completion_text(row),
        }


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
    anomaly, and the category one-hot when ``include_category``). Not normalised: the learned
    policy's normaliser (VecNormalize) belongs to the policy.

    ## Rewards
    Per token: base log-probability, repetition, anomaly, tempered entropy. At the end of the
    episode: coherence to the prompt, text anomaly, distinct-2, novelty across the samples of the
    same prompt. See ``envs/rewards.py`` for scales; each component is in the step ``info``.

    ## Starting State
    A prompt from the configured split (seeded order; the ``group_size`` rows of a group share
    their prompts), prefilled; the first observation describes the first token's distribution.

    ## Episode End
    Termination: the drawn token is EOS. Truncation: ``max_new_tokens`` tokens without EOS
    (``info["TimeLimit.truncated"] = True``). A finished row is reset at once (per-row autoreset):
    its ``info`` carries ``terminal_observation``, ``episode`` (``r``, ``l``, ``t``), the reward
    breakdown, the temperature trace (``temperatures``), the exact base log-probability of every drawn
    token (``logprobs``), the completion (``completion``, ``token_ids``), and the returned observation is the
    first of its next episode.

    ## Arguments
    ``config`` (:class:`EnvConfig`), ``lm`` (a loaded :class:`CausalLM`; default: load
    ``model_config``), ``reward`` (:class:`RewardConfig`), ``prompts`` (override the prompt file).
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig | None = None, lm: CausalLM | None = None,
                 reward: RewardConfig | None = None, model_config: ModelConfig | None = None,
                 prompts: Sequence[Prompt] | None = None):
        config = config or EnvConfig()
        lm = lm or load_causal_lm(model_config or ModelConfig())
        self.core = GenerationCore(config, lm, reward, prompts)
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

    def reset(self) -> np.ndarray:
        seed = self._seeds[0] if getattr(self, "_seeds", None) and self._seeds[0] is not None else None
        if seed is not None:
            self.core.seed(seed)
        if hasattr(self, "_reset_seeds"):
            self._reset_seeds()
        return self.core.reset_rows(None).cpu().numpy()

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self):
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async(); call env.step(actions)")
        if self.core.state is None:
            raise RuntimeError("call env.reset() before env.step()")
        result = self.core.step(self._actions)
        self._actions = None
        done = result.terminated | result.truncated
        obs = result.obs.cpu().numpy()
        infos: list[dict] = [{"temperature": float(t), "reward_components": {}} for t in result.temperature.tolist()]
        for i in range(self.num_envs):
            infos[i]["reward_components"] = {k: float(v[i]) for k, v in result.components.items()}
        if done.any():
            rows = np.flatnonzero(done)
            for r in rows:
                info = self.core.episode_info(int(r))
                info["terminal_observation"] = obs[r].copy()
                info["TimeLimit.truncated"] = bool(result.truncated[r])
                infos[r].update(info)
            obs = self.core.reset_rows(rows).cpu().numpy()
        return obs, result.reward, done, infos

    def close(self) -> None:
        self.core.state = None

    # ------------------------------------------------------------------ VecEnv plumbing
    def _indices(self, indices) -> list[int]:
        if indices is None:
            return list(range(self.num_envs))
        if isinstance(indices, int):
            return [indices]
        return list(indices)

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        return [getattr(self, method_name)(*method_args, **method_kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def get_images(self):
        return [None for _ in range(self.num_envs)]


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
        if options and options.get("prompt"):
            prompt = Prompt(text=str(options["prompt"]), category=str(options.get("category", "general")),
                            id=f"user-{len(self.core.prompts)}", split=None)
            prompt_indices = [self.core.add_prompt(prompt)]
        obs = self.core.reset_rows(None if self.core.state is None else np.array([0]), prompt_indices)
        self._done = False
        p = self.core.prompts[self.core.row_prompt[0]]
        return obs[0].cpu().numpy(), {"prompt_id": p.id, "prompt": p.text, "category": p.category}

    def step(self, action):
        if self._done:
            raise RuntimeError("the episode has ended; call reset() before step()")
        result = self.core.step(np.asarray(action, dtype=np.float32).reshape(1))
        terminated, truncated = bool(result.terminated[0]), bool(result.truncated[0])
        info = {"temperature": float(result.temperature[0]),
                "reward_components": {k: float(v[0]) for k, v in result.components.items()}}
        if terminated or truncated:
            self._done = True
            info.update(self.core.episode_info(0))
        return result.obs[0].cpu().numpy(), float(result.reward[0]), terminated, truncated, info

