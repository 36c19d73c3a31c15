"""Temperature environments over real token-by-token generation.

:class:`TemperatureVecEnv` is a natively batched stable-baselines3 ``VecEnv``: one process, one
model, B rows decoded together over one KV cache. :class:`TemperatureEnv` is the single-episode
``gymnasium.Env`` over the same machinery (registered as ``kelvin/Temperature-v0``). Both share
:class:`GenerationCore`, which owns the model state, the featurizer, the sampler call and the
reward.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, Optional, Sequence

import gymnasium as gym
import numpy as np
import torch
from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as settings_dataclass
from stable_baselines3.common.vec_env import VecEnv

from anomaly.prior import build_token_prior
from envs.lm import CausalLM, ModelConfig, load_causal_lm
from envs.prompts import CATEGORIES, DEFAULT_CATEGORY, Prompt, load_prompts
from envs.rewards import EPISODE_COMPONENTS, STEP_COMPONENTS, RewardConfig, RewardModel
from policies.actions import ActionMapping
from policies.features import FeatureSettings, FeatureSpec, Featurizer
from samplers.core import Truncation, sample
from samplers.suggest import did_you_mean

__all__ = ["EnvConfig", "GenerationCore", "TemperatureVecEnv", "TemperatureEnv"]


Lambda = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
"""A diversity dial value: a finite number >= 0."""


def _truncation(value):
    """``env.truncation`` from a mapping: the sampler core's :class:`~samplers.core.Truncation` checks its own fields."""
    return Truncation.from_dict(value) if isinstance(value, dict) else value


MAX_SEED = 2**32 - 1
"""The largest seed of a run or an evaluation (``train.seed``, ``evaluate.py --seed``): numpy's legacy seeding
(SB3's ``set_random_seed``) takes 32 bits. The env's own seed (``seed + 1`` for validation...) may go beyond it,
up to what torch's generators take (63 bits)."""


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
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
    batch_size: StrictInt = Field(32, ge=1)
    """Rows decoded together by one model copy (the VecEnv's num_envs is ``workers`` x this); raise it on a GPU.
    32 on a 2-core CPU: bare decode runs ~1.6x faster per token than at 16 (benchmarks/decode_throughput.py),
    and 8 groups of 4 per step."""
    group_size: StrictInt = Field(4, ge=1)
    """Rows that share a prompt (diversity across samples of one prompt); divides batch_size."""
    max_new_tokens: StrictInt = Field(16, ge=1)
    """Episode length limit (truncation); EOS ends an episode earlier (termination). 16: answers are short and
    open prompts spend their diversity in the first tokens; a longer horizon costs tokens, not signal."""
    action: ActionMapping = Field(default_factory=lambda: ActionMapping(t_min=0.0))
    """Action -> temperature: ``{kind, t_min, t_max, min_abs_temperature, max_delta}`` (policies/actions.py). The
    default is linear on [0, 2.4]: greedy is the edge of the range, not a cliff in its middle. A residual policy
    explores around its base, and most bases are T = 0 at low λ: with t_min = -1 half of that exploration drew
    inverted tokens (6-22% of a rollout's tokens at T < 0) and PPO drifted below its base (validation margin vs the
    base -0.58 after 20 updates), against +0.17 [-0.17, +0.51] on [0, 2.4] (seed 0, docs/results.md). Negative
    temperatures stay one setting away: ``t_min: -1.0``."""
    truncation: Annotated[Truncation, BeforeValidator(_truncation)] = Field(
        default_factory=lambda: Truncation(min_p=0.02))
    """Truncation before the temperature: ``{top_k, top_p, min_p, top_n_sigma}`` (samplers/core.py). Default
    min-p 0.02: it cuts only the garbage tail that T > 1.5 opens (min-p 0.1 caps diversity, measured), and makes
    negative temperatures mean "least likely of the plausible". Evaluation repeats fixed T under it."""
    include_category: StrictBool = True
    """Append the prompt category one-hot to the observation."""
    features: FeatureSettings = Field(default_factory=lambda: FeatureSettings(include_diversity_weight=True))
    """Feature settings ``{initial_temperature, ema_decay, repeat_window, anomaly_surprise, median_k,
    include_diversity_weight, version}`` (policies/features.py). The env's default observes the diversity
    dial λ (``include_diversity_weight: true``): one policy serves every setting of it."""
    token_prior: StrictBool = True
    """Use the vocabulary's anomaly priors (anomaly/rules.py) in the featurizer's anomaly signal."""
    discovered_anomalies: StrictBool = True
    """Raise the priors of the model's discovered anomalous tokens (anomaly/discovery.py; cached on disk,
    probed once per model when missing). Only with ``token_prior``."""
    diversity_range: tuple[Lambda, Lambda] = (0.0, 2.0)
    """The diversity dial λ of each group is drawn uniformly from ``[low, high]`` (the reward's diversity
    weight, and an observation feature with ``features.include_diversity_weight``)."""
    diversity_values: Optional[list[Lambda]] = Field(None, min_length=1, examples=[[0.0, 0.5, 1.0]])
    """Draw λ from these values instead of ``diversity_range`` (one value = a fixed λ)."""
    seed: StrictInt = Field(0, ge=0, le=2**63 - 1)
    """Seed of the prompt order, the λ draws and the token draws."""
    overlap: StrictBool = True
    """Run the work the model does not wait for on a second thread while the model decodes: scoring the groups
    that end at a step (MiniLM embeddings, text checks) and prefilling, into the prompt cache, the prompt each
    group starts next. Same tokens and rewards either way; it hides that work where a core is idle (one torch
    thread per process on a 2-core CPU, or the CPU beside a GPU)."""
    workers: StrictInt = Field(1, ge=1)
    """Model copies generating in parallel: 1 = one in-process env; N > 1 = N Ray actors of ``batch_size`` rows
    each behind one VecEnv (envs/distributed.py; needs the ``ray`` extra)."""
    ray_address: Optional[StrictStr] = Field(None, examples=["auto"])
    """With ``workers`` > 1: the Ray cluster to join (``auto``, ``HOST:6379``, ``ray://HOST:10001``); None = start
    a local Ray instance for the run (or use the one this process already started)."""

    def __post_init__(self):
        if self.batch_size % self.group_size:
            raise ValueError(f"group_size={self.group_size} must divide batch_size={self.batch_size} "
                             "(rows are split into groups that share a prompt)")
        if self.ray_address is not None and self.workers == 1:
            raise ValueError(f"ray_address={self.ray_address!r} is used only with workers > 1 (Ray workers); set "
                             "env.workers=N to run N model copies on that cluster, or drop env.ray_address")
        low, high = self.diversity_range
        if low > high:
            raise ValueError(f"diversity_range={list(self.diversity_range)} must be [low, high] with low <= high, "
                             "e.g. [0.0, 1.0]")

    @property
    def diversity_bounds(self) -> tuple[float, float]:
        """The lowest and highest λ the env draws (the range a policy trained on it knows)."""
        if self.diversity_values:
            return min(self.diversity_values), max(self.diversity_values)
        return tuple(self.diversity_range)

    def feature_spec(self) -> FeatureSpec:
        """The observation spec: ``features`` plus horizon (max_new_tokens) and categories (include_category)."""
        return FeatureSpec.of(self.features, self.max_new_tokens, CATEGORIES if self.include_category else ())


@dataclass
class StepResult:
    """What :meth:`GenerationCore.step` returns (tensors on the core's device unless noted)."""

    obs: torch.Tensor  # (B, F) observation after the step (held at the terminal one while a row waits)
    reward: np.ndarray  # (B,) float32
    done: np.ndarray  # (B,) bool: the row's group finished at this step (every row of it ends its episode)
    terminated: np.ndarray  # (B,) bool: the row's completion ended with EOS (at this step or earlier)
    truncated: np.ndarray  # (B,) bool: the row's completion reached max_new_tokens without EOS
    tokens: torch.Tensor  # (B,) drawn tokens (EOS for rows that wait)
    temperature: torch.Tensor  # (B,) temperatures used (those of waiting rows are not applied)
    active: np.ndarray  # (B,) bool: the row drew a token of its completion at this step
    components: dict[str, np.ndarray]  # per-token components (B,); completion components (B,), 0 where not done


def init_helper_thread(threads: int, nice: int = 0) -> None:
    """Initialise a helper thread (env.overlap's side threads, training's validation baselines): the process's
    torch thread count, and ``nice`` steps below the caller's scheduling priority (Linux; elsewhere none)."""
    torch.set_num_threads(threads)
    if nice:
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)


class GenerationCore:
    """B rows of generation sharing one model and KV cache, in groups of ``group_size`` rows.

    The rows of a group are K samples of one prompt under one diversity dial λ, drawn together: they
    start together, and a row whose completion ends (EOS, or ``max_new_tokens``) **waits** (its actions
    are ignored, it draws nothing, its observation stays its terminal one, its reward is 0) until every
    row of its group has ended. Then the completion components are computed for the whole group (the
    diversity components compare each sample with the others) and every row of the group ends its
    episode at that step. Waiting is why groups are synchronised rather than compared with a memory of
    earlier samples: every sample is judged against the K - 1 others drawn with the same policy, the
    same λ and the same prompt, so the diversity credit means the same for the first row to finish and
    the last. It costs the decode steps of waiting rows (reported as ``timings["waiting_rows"]``).

    Group ``g``'s k-th episode uses prompt ``order[(g + k * n_groups) % N]`` (``order`` a seeded
    permutation) and draws its λ from ``env.diversity_values`` or ``env.diversity_range`` (a seeded
    stream of its own). No autoreset: the envs call :meth:`reset_groups`.

    ``shard=(i, n)`` makes these rows shard ``i`` of ``n`` equal shards of one env of ``n * B`` rows
    (envs/distributed.py): the prompt schedule is that env's (its groups are ``i * n_groups ...``), and
    the λ and token streams are the shard's own, derived from the seed (shard 0 keeps the seed's own).
    """

    def __init__(self, config: EnvConfig, lm: CausalLM, reward: RewardConfig | RewardModel | None = None,
                 prompts: Sequence[Prompt] | None = None, shard: tuple[int, int] = (0, 1)):
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
        self.G = config.group_size
        self.n_groups = self.B // self.G
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard={shard}: expected (index, count) with 0 <= index < count")
        self.shard = (int(index), int(count))
        token_prior = build_token_prior(lm, config.discovered_anomalies) if config.token_prior else None  # (V,)
        self.featurizer = Featurizer(self.spec, self.B, self.device, token_prior=token_prior)
        self.seed(config.seed)
        self.state = None
        self.logits: torch.Tensor | None = None
        self.timings = {"model_s": 0.0, "env_s": 0.0, "tokens": 0, "waiting_rows": 0}
        self._side: dict[str, ThreadPoolExecutor] = {}  # env.overlap: scoring and prefetching while the model decodes
        self._prefetching: list[Future] = []

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_side"], state["_prefetching"] = {}, []  # a thread is not copied: a copy starts its own
        return state

    # ------------------------------------------------------------------ seeding / schedule
    def seed(self, seed: int | None) -> None:
        seed = self.config.seed if seed is None else int(seed)
        self._seed = seed
        self._order = np.random.default_rng(seed).permutation(len(self.prompts))
        index = self.shard[0]
        self._diversity_rng = np.random.default_rng([seed, 1] if index == 0 else [seed, 1, index])
        token_seed = seed if index == 0 else int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])
        self.generator = torch.Generator(device=self.device).manual_seed(token_seed)
        self.group_episodes = np.zeros(self.n_groups, dtype=np.int64)  # per group: how many episodes started

    def _next_prompt_indices(self, groups: np.ndarray) -> np.ndarray:
        index, count = self.shard
        k = self.group_episodes[groups]
        slot = index * self.n_groups + groups  # the group's place in the schedule of all shards
        return self._order[(slot + k * count * self.n_groups) % len(self.prompts)]

    def _draw_diversity(self, n: int) -> np.ndarray:
        c = self.config
        if c.diversity_values:
            return self._diversity_rng.choice(np.asarray(c.diversity_values, dtype=np.float64), size=n)
        lo, hi = c.diversity_range
        return self._diversity_rng.uniform(lo, hi, size=n) if hi > lo else np.full(n, float(lo))

    # ------------------------------------------------------------------ episodes
    def add_prompt(self, prompt: Prompt) -> int:
        """Append a prompt (checked against the context window); returns its index."""
        ids = self.lm.encode([prompt.text])
        self.lm.check_fits(ids, self.config.max_new_tokens)
        self.prompts.append(prompt)
        self._prompt_ids.append(ids[0])
        return len(self.prompts) - 1

    def group_rows(self, groups: np.ndarray) -> np.ndarray:
        """The rows of ``groups``, group by group: (len(groups) * G,)."""
        return (np.asarray(groups, dtype=np.int64)[:, None] * self.G + np.arange(self.G)).reshape(-1)

    def reset_groups(self, groups: np.ndarray | None = None, prompt_indices: Sequence[int] | None = None,
                     diversity: Sequence[float] | float | None = None) -> torch.Tensor:
        """Start new episodes on ``groups`` (None = all, a fresh batch); returns the (B, F) observation.

        ``prompt_indices`` (one index into ``self.prompts`` per group) and ``diversity`` (λ, one per
        group or one for all) override the schedule.
        """
        t0 = time.perf_counter()
        fresh = groups is None or self.state is None
        groups = np.arange(self.n_groups) if fresh else np.asarray(groups, dtype=np.int64).reshape(-1)
        if prompt_indices is None:
            prompt_idx = self._next_prompt_indices(groups)
        else:
            prompt_idx = np.asarray(prompt_indices, dtype=np.int64).reshape(-1)
            if prompt_idx.shape[0] != groups.shape[0]:
                raise ValueError(f"reset_groups got {groups.shape[0]} groups but {prompt_idx.shape[0]} prompt indices")
        self.group_episodes[groups] += 1
        self._await_prefetch()  # a prompt must not be prefilled here while the side thread prefills it
        if diversity is None:
            lam = self._draw_diversity(groups.shape[0])
        else:
            lam = np.broadcast_to(np.asarray(diversity, dtype=np.float64), groups.shape).copy()
        rows = self.group_rows(groups)  # (R,)
        row_prompt = np.repeat(prompt_idx, self.G)  # (R,)
        ids = [self._prompt_ids[i] for i in row_prompt]
        t_model = time.perf_counter()
        if fresh:
            self.logits, self.state = self.lm.prefill(ids)  # (B, V)
            B, W = self.B, self.config.max_new_tokens
            self.row_prompt = np.zeros(B, dtype=np.int64)
            self.diversity = np.zeros(B, dtype=np.float64)
            self.tokens = torch.full((B, W), -1, dtype=torch.long, device=self.device)
            self.length = torch.zeros(B, dtype=torch.long, device=self.device)
            self.temps = torch.zeros((B, W), device=self.device)
            self.logps = torch.zeros((B, W), device=self.device)  # exact ln p_base of every drawn token
            self.ended = np.zeros(B, dtype=bool)  # the row's completion has ended; it waits for its group
            self.ended_by_eos = np.zeros(B, dtype=bool)
            self.held_obs = torch.zeros((B, self.spec.dim), device=self.device)
            self.ep_return = np.zeros(B, dtype=np.float64)
            self.ep_components = {k: np.zeros(B) for k in STEP_COMPONENTS + EPISODE_COMPONENTS}
            self.ep_waited = np.zeros(B, dtype=np.int64)
            self.ep_start = np.full(B, time.perf_counter())
        else:
            rows_t = torch.as_tensor(rows, device=self.device)
            new_logits = self.lm.replace_rows(self.state, rows_t, ids)
            self.logits = self.logits.clone()
            self.logits[rows_t] = new_logits
        dt_model = time.perf_counter() - t_model
        self.timings["model_s"] += dt_model
        if prompt_indices is None:
            self._prefetch(self._next_prompt_indices(groups))  # these groups' next prompts, while they run
        self.row_prompt[rows] = row_prompt
        self.diversity[rows] = np.repeat(lam, self.G)
        rows_t = torch.as_tensor(rows, device=self.device)
        self.tokens[rows_t] = -1
        self.length[rows_t] = 0
        self.temps[rows_t] = 0.0
        self.logps[rows_t] = 0.0
        self.ended[rows] = False
        self.ended_by_eos[rows] = False
        self.ep_return[rows] = 0.0
        for v in self.ep_components.values():
            v[rows] = 0.0
        self.ep_waited[rows] = 0
        self.ep_start[rows] = time.perf_counter()
        cats = [self.spec.category_slot(self.prompts[i].category) for i in row_prompt]
        self.featurizer.reset(rows_t, category=cats, diversity_weight=self.diversity[rows])
        obs = self.featurizer.observe(self.logits)
        self.timings["env_s"] += time.perf_counter() - t0 - dt_model
        return obs

    def step(self, actions: np.ndarray | torch.Tensor) -> StepResult:
        """One token for every row whose completion goes on; groups whose rows have all ended are done."""
        t0 = time.perf_counter()
        a = torch.as_tensor(np.asarray(actions, dtype=np.float32).reshape(-1), device=self.device)
        if a.shape[0] != self.B:
            raise ValueError(f"expected {self.B} actions (one per row), got {a.shape[0]}")
        active = ~self.ended  # (B,) numpy
        active_t = torch.as_tensor(active, device=self.device)
        f = self.featurizer.state
        temperature = self.mapping.to_temperature(a, previous=f.prev_temperature, first_step=f.position == 0)
        need_tempered = self.reward.config.entropy != 0
        drawn = sample(self.logits, temperature, generator=self.generator, return_tempered=need_tempered,
                       **self.config.truncation.to_dict())
        tokens, tempered = drawn if need_tempered else (drawn, None)  # (B,), (B, V) or None
        eos_token = self.lm.eos_token_ids[0]
        tokens = torch.where(active_t, tokens, eos_token)  # waiting rows feed EOS; nothing of theirs is kept
        stats = self.featurizer.update(tokens, temperature)
        live = torch.as_tensor(np.flatnonzero(active), device=self.device)  # (A,) rows drawing a token
        pos = self.length.clamp(max=self.config.max_new_tokens - 1)  # (B,) where this token is written
        at = pos[live]
        self.tokens[live, at] = tokens[live]
        self.temps[live, at] = temperature[live]
        self.logps[live, at] = stats.logp[live].float()
        self.length = self.length + active_t.long()
        repeated = self._closes_repeated_ngram(pos) & active_t
        comps = self.reward.step_components(stats.logp, repeated, stats.anomalous, tempered)
        eos = self.lm.is_eos(tokens) & active_t
        full = self.length >= self.config.max_new_tokens
        eos_np, full_np = eos.cpu().numpy(), full.cpu().numpy()
        newly_ended = active & (eos_np | full_np)
        self.ended_by_eos |= newly_ended & eos_np
        self.ended |= newly_ended
        done = np.repeat(self.ended.reshape(self.n_groups, self.G).all(axis=1), self.G)  # (B,)
        done_rows = np.flatnonzero(done)
        # The completions of the groups that end here are final: score them while the model decodes.
        finished = self._score_groups(done_rows) if done_rows.size else None
        t_model = time.perf_counter()
        self.logits = self.lm.decode(self.state, tokens)  # (B, V)
        dt_model = time.perf_counter() - t_model
        obs = self.featurizer.observe(self.logits)
        waiting = torch.as_tensor(~active, device=self.device)
        obs = torch.where(waiting.view(-1, 1), self.held_obs, obs)  # a waiting row keeps its terminal observation
        if newly_ended.any():
            ended_rows = torch.as_tensor(np.flatnonzero(newly_ended), device=self.device)
            self.held_obs[ended_rows] = obs[ended_rows]
        components = {k: np.where(active, v.detach().cpu().numpy(), 0.0).astype(np.float32) for k, v in comps.items()}
        for k in EPISODE_COMPONENTS:
            components[k] = np.zeros(self.B, dtype=np.float32)
        if finished is not None:
            for k, v in finished.result().items():
                components[k][done_rows] = v
        reward = self.reward.combine(components, self.diversity)
        for k, v in components.items():
            self.ep_components[k] += v
        if done_rows.size and self.reward.config.group_baseline:
            totals = {k: v[done_rows] for k, v in self.ep_components.items()}  # whole episodes, this step included
            reward = reward.copy()
            reward[done_rows] += self.reward.leave_one_out_baseline(
                self._groups_of(len(done_rows)), self.reward.quality_return(totals)).astype(np.float32)
        self.ep_return += reward
        self.ep_waited += ~active
        self.timings["model_s"] += dt_model
        self.timings["env_s"] += time.perf_counter() - t0 - dt_model
        self.timings["tokens"] += int(active.sum())
        self.timings["waiting_rows"] += int((~active).sum())
        return StepResult(obs=obs, reward=reward, done=done, terminated=self.ended_by_eos.copy(),
                          truncated=self.ended & ~self.ended_by_eos, tokens=tokens, temperature=temperature,
                          active=active, components=components)

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

    def _score_groups(self, rows: np.ndarray) -> Future:
        """:meth:`_episode_components` of ``rows`` (whole groups), on the side thread with ``env.overlap``.

        The side thread runs while the caller decodes the next token of every row: the MiniLM embeddings and
        text checks of the finished groups then cost no wall time on a machine with a core to spare (the
        model and the embedder never touch the same tensors; the rows' tokens are final). Without it the work
        runs here and the returned future is already done.
        """
        if not self.config.overlap:
            done: Future = Future()
            done.set_result(self._episode_components(rows))
            return done
        return self._side_thread("score").submit(self._episode_components, rows)

    def _side_thread(self, job: str) -> ThreadPoolExecutor:
        """The side thread of ``job``: ``score`` (needed at the end of this step) or ``prefetch`` (needed at the
        group's next start, many steps later, so it runs at a lower priority and never delays a score)."""
        if job not in self._side:
            self._side[job] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kelvin-side-{job}",
                                                 initializer=init_helper_thread,
                                                 initargs=(torch.get_num_threads(), 0 if job == "score" else 5))
        return self._side[job]

    def _prefetch(self, prompt_indices: np.ndarray) -> None:
        """Prefill ``prompt_indices`` into the prompt cache on the side thread (with ``env.overlap`` and a cache)."""
        cache = getattr(self.lm, "prompt_cache", None)  # an LM without one (a test stub) has nothing to prefetch
        if not self.config.overlap or cache is None or cache.max_bytes <= 0:
            return
        ids = [self._prompt_ids[i] for i in dict.fromkeys(prompt_indices.tolist())]
        self._prefetching.append(self._side_thread("prefetch").submit(self.lm.prefetch, ids))

    def _await_prefetch(self) -> None:
        pending, self._prefetching = self._prefetching, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Release the model state and stop the side thread (idempotent)."""
        self.state = None
        self._prefetching = []
        for pool in self._side.values():
            pool.shutdown(wait=True)
        self._side = {}

    def _groups_of(self, n: int) -> list[list[int]]:
        """Positions ``0..n-1`` of ``n`` rows taken whole groups at a time, split into their groups."""
        return [list(range(i, i + self.G)) for i in range(0, n, self.G)]

    def _episode_components(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Completion components of ``rows`` (whole groups, in group order)."""
        ids = [self.completion_ids(int(r)) for r in rows]
        texts = [self.lm.decode_text(t) for t in ids]
        prompts = [self.prompts[self.row_prompt[r]] for r in rows]
        return self.reward.episode_components(self._groups_of(len(rows)), [p.id for p in prompts], [p.text for p in prompts],
                                              [p.answers for p in prompts], texts, ids)

    def episode_info(self, row: int) -> dict[str, Any]:
        """SB3-style ``episode`` stats plus Kelvin's breakdown for a row whose episode just ended."""
        n = int(self.length[row])
        temps = self.temps[row, :n].cpu().numpy().copy()  # a copy: on CPU .numpy() shares memory the reset zeroes
        logps = self.logps[row, :n].cpu().numpy().copy()
        prompt = self.prompts[self.row_prompt[row]]
        return {
            "episode": {"r": float(self.ep_return[row]), "l": n, "t": round(time.perf_counter() - self.ep_start[row], 6)},
            "reward_components": {k: float(v[row]) for k, v in self.ep_components.items()},
            "diversity": float(self.diversity[row]),
            "group": int(row // self.G),
            "waited": int(self.ep_waited[row]),
            "temperature_mean": float(temps.mean()) if n else 0.0,
            "temperature_std": float(temps.std()) if n else 0.0,
            "negative_fraction": float((temps < 0).mean()) if n else 0.0,
            "near_greedy_fraction": float((np.abs(temps) < 0.05).mean()) if n else 0.0,
            "temperatures": temps,
            "logprobs": logps,  # exact (unclipped) ln p_base(token) at T = 1 of every drawn token, EOS included
            "token_ids": self.completion_ids(row),
            "prompt_id": prompt.id,
            "category": prompt.category,
            "answerable": prompt.answerable,
            "correct": bool(self.ep_components["correct"][row] > 0.5) if prompt.answerable else None,
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
    anomaly, the category one-hot when ``include_category``, λ with ``include_diversity_weight``).
    Not normalised: the learned
    policy's normaliser (VecNormalize) belongs to the policy.

    ## Rewards
    ``quality + λ * diversity`` (``envs/rewards.py`` has the table and scales). Per token: base
    log-probability, repetition, anomaly (and tempered entropy, off by default). At the end of the
    group: coherence to the prompt, text anomaly, correctness on answerable prompts, and the diversity
    of each sample against the other samples of its group (semantic distance, novel bigrams). Every
    component is in the step ``info`` (``reward_components``).

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
                 prompts: Sequence[Prompt] | None = None, shard: tuple[int, int] = (0, 1)):
        config = config or EnvConfig()
        lm = lm or load_causal_lm(model_config or ModelConfig())
        self.core = GenerationCore(config, lm, reward, prompts, shard=shard)
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
        p = self.core.prompts[self.core.row_prompt[0]]
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

