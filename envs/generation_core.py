"""The generation machinery under the temperature environments (:mod:`envs.generation`).

:class:`GenerationCore` decodes B rows over one model and KV cache in groups that share a prompt: it owns the
schedule (prompts, λ, seeds), the featurizer, the sampler call and the reward. :class:`EpisodeState` holds the
rows' current episodes; :class:`StepResult` is what a step returns.
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Any, Sequence

import numpy as np
import torch

from anomaly.prior import build_token_prior
from envs.config import EnvConfig
from envs.lm import CausalLM
from envs.prompts import Prompt, load_prompts
from envs.rewards import (CREDIT_TERMS, EPISODE_COMPONENTS, STEP_COMPONENTS, RewardConfig, RewardFunction,
                          closes_repeated_ngram, twin_of)
from envs.side_threads import SideThreads
from policies.features import Featurizer
from samplers.core import sample

__all__ = ["EpisodeState", "GenerationCore", "StepResult", "WARM_BATCH"]

WARM_BATCH = 64
"""Places of the schedule prefilled together (:meth:`GenerationCore.warm_prompts`), 16 a forward pass sorted by length
(:meth:`envs.lm.CausalLM.prefill_together`). On 2 CPU threads (SmolLM2-135M) a prompt prefilled alone costs 66 ms;
the 313 train prompts took 7.9-8.8 s in chunks of 64, 10.6-10.9 s in 32 and 13.1-14.2 s in 16 (their lengths,
34-92 tokens, mix within a chunk: more padding), 6.5-8.0 s sorted by length over the whole split (which would
make a prompt's batch depend on the whole set a run needs)."""


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


@dataclass
class EpisodeState:
    """Per-row state of the current episodes, every buffer with a leading batch axis (B)."""

    prompt: np.ndarray  # (B,) int64: index into the core's prompts
    diversity: np.ndarray  # (B,) float64: the group's diversity dial λ
    tokens: torch.Tensor  # (B, W) long: the completion so far, -1 = empty
    length: torch.Tensor  # (B,) long: tokens drawn
    temps: torch.Tensor  # (B, W): the temperature of every drawn token
    logps: torch.Tensor  # (B, W): exact ln p_base of every drawn token
    ended: np.ndarray  # (B,) bool: the row's completion has ended; it waits for its group
    ended_by_eos: np.ndarray  # (B,) bool
    held_obs: torch.Tensor  # (B, F): the terminal observation a waiting row keeps
    ep_return: np.ndarray  # (B,) float64
    components: dict[str, np.ndarray]  # every reward component (B,) summed over the episode
    waited: np.ndarray  # (B,) int64: steps spent waiting for the group
    start: np.ndarray  # (B,) perf_counter() at the episode's start

    @classmethod
    def fresh(cls, batch: int, width: int, obs_dim: int, device: torch.device) -> "EpisodeState":
        """``batch`` rows at the start of an episode (prompt 0, λ 0: the caller sets both)."""
        return cls(
            prompt=np.zeros(batch, dtype=np.int64), diversity=np.zeros(batch, dtype=np.float64),
            tokens=torch.full((batch, width), -1, dtype=torch.long, device=device),
            length=torch.zeros(batch, dtype=torch.long, device=device),
            temps=torch.zeros((batch, width), device=device), logps=torch.zeros((batch, width), device=device),
            ended=np.zeros(batch, dtype=bool), ended_by_eos=np.zeros(batch, dtype=bool),
            held_obs=torch.zeros((batch, obs_dim), device=device), ep_return=np.zeros(batch, dtype=np.float64),
            components={k: np.zeros(batch) for k in STEP_COMPONENTS + EPISODE_COMPONENTS + CREDIT_TERMS},
            waited=np.zeros(batch, dtype=np.int64), start=np.full(batch, time.perf_counter()),
        )

    def reset(self, rows: np.ndarray) -> None:
        """Start ``rows`` (indices) afresh."""
        fresh = self.fresh(len(rows), self.tokens.shape[1], self.held_obs.shape[1], self.tokens.device)
        rows_t = torch.as_tensor(rows, device=self.tokens.device)
        for field in fields(self):
            new, old = getattr(fresh, field.name), getattr(self, field.name)
            if isinstance(old, dict):
                for k, v in old.items():
                    v[rows] = new[k]
            else:
                old[rows_t if isinstance(old, torch.Tensor) else rows] = new


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
    stream of its own). No autoreset: the envs call :meth:`reset_groups`. The rows' state is
    ``episode`` (:class:`EpisodeState`).

    ``shard=(i, n)`` makes these rows shard ``i`` of ``n`` equal shards of one env of ``n * B`` rows
    (envs/distributed.py): the prompt schedule is that env's (its groups are ``i * n_groups ...``), and
    the λ and token streams are the shard's own, derived from the seed (shard 0 keeps the seed's own).

    ``twins`` (``train.twin_groups``): the groups come in pairs, ``2t`` and ``2t + 1``, that share their prompt,
    their λ and their random numbers (row ``k`` of one draws every token with row ``k`` of the other's uniform:
    common random numbers); a pair starts and ends together. With the policy's exploration noise mirrored across
    the pair (:class:`kelvin.heads.DiversityHeadsPolicy`), the two differ only in the sign of that noise, and
    each row's training signal is its return minus its twin's (:meth:`RewardFunction.twin_baseline`): the
    difference of an antithetic pair under common random numbers, where the shared text noise cancels.
    """

    def __init__(self, config: EnvConfig, lm: CausalLM, reward: RewardConfig | RewardFunction | None = None,
                 prompts: Sequence[Prompt] | None = None, shard: tuple[int, int] = (0, 1), twins: bool = False):
        self.config = config
        self.lm = lm
        self.device = lm.device
        self.mapping = config.action
        self.spec = config.feature_spec()
        self.reward = reward if isinstance(reward, RewardFunction) else RewardFunction(reward or RewardConfig())
        self.prompts = list(prompts) if prompts is not None else load_prompts(
            config.prompts, split=config.split, categories=config.categories)
        self._prompt_ids = lm.encode([p.text for p in self.prompts])
        lm.check_fits(self._prompt_ids, config.max_new_tokens)
        self.B = config.batch_size
        self.G = config.group_size
        self.n_groups = self.B // self.G
        self.twins = bool(twins)
        if self.twins and self.n_groups % 2:
            raise ValueError(f"twin groups pair the batch's groups: env.batch_size={self.B} must be a multiple of "
                             f"2 x env.group_size = {2 * self.G}")
        self._unit = 2 if self.twins else 1  # groups that start and end together (a twin pair, or one group)
        # row b draws with the uniform of row _uniform_rows[b]: a twin's rows with those of the pair's first group
        rows = np.arange(self.B)
        self._uniform_rows = (torch.as_tensor(np.minimum(rows, twin_of(rows, self.G)), device=self.device)
                              if self.twins else None)
        index, count = shard
        if not 0 <= index < count:
            raise ValueError(f"shard={shard}: expected (index, count) with 0 <= index < count")
        self.shard = (int(index), int(count))
        token_prior = build_token_prior(lm, config.discovered_anomalies) if config.token_prior else None  # (V,)
        self.featurizer = Featurizer(self.spec, self.B, self.device, token_prior=token_prior)
        self.seed(config.seed)
        self.state = None  # the LM's decode state (KV cache), from the first reset
        self.logits: torch.Tensor | None = None  # (B, V) the next token's logits
        self.episode = EpisodeState.fresh(self.B, config.max_new_tokens, self.spec.dim, self.device)
        self.timings = {"model_s": 0.0, "env_s": 0.0, "tokens": 0, "waiting_rows": 0}
        self.side = SideThreads()  # env.overlap: scoring and prefetching while the model decodes

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
        self._position = np.argsort(self._order)  # prompt index -> its place in the schedule

    def _next_prompt_indices(self, groups: np.ndarray, ahead: int = 0) -> np.ndarray:
        """The prompts of ``groups``' next episodes (``ahead`` > 0: the episodes that many after those)."""
        index, count = self.shard
        k = self.group_episodes[groups] + ahead
        places = self.n_groups // self._unit  # places of the schedule a round (a twin pair takes one)
        slot = index * places + groups // self._unit  # the group's place in the schedule of all shards
        return self._order[(slot + k * count * places) % len(self.prompts)]

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

    def warm_prompts(self, episodes: int) -> dict[str, float]:
        """Prefill into the LM's prompt cache the prompts of every group's next ``episodes`` episodes, in batched
        forward passes, as many as the cache holds: ``{prompts, wall_s}`` (prompts: those prefilled now).

        The schedule (``order``) is cut into chunks of :data:`WARM_BATCH` places, and a prompt is always prefilled
        with the rest of its chunk, here or when an episode needs it first (:meth:`_prefill_chunks`): batched and
        lone prefills differ in the last bits, so this keeps a run's numbers independent of how far ahead it warmed
        (``train.total_timesteps``) and of what the cache held before.

        Why warm at all: a prompt prefilled alone when its group restarts costs 66 ms on 2 CPU threads
        (SmolLM2-135M) against ~25-28 ms in a chunk of 64, and a training run on new prompts had its first rollouts
        1.4x slower than its last, where the schedule came back to prompts it had cached
        (benchmarks/train_throughput.py). Training warms what its steps are sure to start; a run of a fixed number
        of episodes (:func:`kelvin.rollout.collect_episodes`) warms exactly those.
        """
        t0 = time.perf_counter()
        if episodes <= 0:
            return {"prompts": 0, "wall_s": 0.0}
        self.side.wait_prefetch()  # env.overlap: nothing is prefilled twice at once
        groups = np.arange(0, self.n_groups, self._unit)  # one group of a twin pair: both have its prompts
        order = [i for ahead in range(episodes) for i in self._next_prompt_indices(groups, ahead).tolist()]
        done = self._prefill_chunks(order, stop_when_full=True)
        wall = time.perf_counter() - t0
        self.timings["model_s"] += wall
        return {"prompts": done, "wall_s": wall}

    def _prompt_cache(self):
        """The LM's prompt cache, or None when it keeps nothing (or a test stub LM has none)."""
        cache = getattr(self.lm, "prompt_cache", None)
        return cache if cache is not None and cache.max_bytes > 0 else None

    def _prefill_chunks(self, prompt_indices, stop_when_full: bool = False) -> int:
        """Prefill the schedule chunk of each of ``prompt_indices`` unless the cache holds it as that chunk makes it
        (:meth:`CausalLM.prefilled_together`), each chunk in one call (:meth:`CausalLM.prefill_together`); returns
        the prompts prefilled.
        ``stop_when_full``: stop before a chunk the cache could not hold without evicting."""
        cache = self._prompt_cache()
        if cache is None:
            return 0
        done, per_prompt, seen = 0, 0.0, set()
        for i in prompt_indices:
            if i >= len(self._order):  # a prompt added after seeding (add_prompt) has no place in the schedule
                continue
            c = int(self._position[i]) // WARM_BATCH
            if c in seen:
                continue
            seen.add(c)
            members = [tuple(self._prompt_ids[j]) for j in self._order[c * WARM_BATCH:(c + 1) * WARM_BATCH]]
            if self.lm.prefilled_together(members):
                continue  # cached as this chunk makes it (by this env, or an earlier one with the same chunk)
            if stop_when_full and per_prompt and cache.nbytes + per_prompt * len(members) > cache.max_bytes:
                break  # the cache is full: the rest are prefilled when their episodes start
            self.lm.prefill_together(members)
            sizes = [e.nbytes for e in map(cache.get, members) if e is not None]
            if stop_when_full and not sizes:
                break  # a cache too small to hold one of them: warming would only run the model twice
            done += len(members)
            per_prompt = max(per_prompt, sum(sizes) / len(members))
        return done

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
        if self.twins and not (groups.size % 2 == 0 and (groups[0::2] % 2 == 0).all()
                               and (groups[1::2] == groups[0::2] + 1).all()):
            raise ValueError(f"reset_groups({groups.tolist()}): with twin groups, restart whole pairs (2t, 2t + 1)")
        if prompt_indices is None:
            prompt_idx = self._next_prompt_indices(groups)
        else:
            prompt_idx = np.asarray(prompt_indices, dtype=np.int64).reshape(-1)
            if prompt_idx.shape[0] != groups.shape[0]:
                raise ValueError(f"reset_groups got {groups.shape[0]} groups but {prompt_idx.shape[0]} prompt indices")
        self.group_episodes[groups] += 1
        self.side.wait_prefetch()  # a prompt must not be prefilled here while the side thread prefills it
        if diversity is None:
            group_diversity = np.repeat(self._draw_diversity(groups.shape[0] // self._unit), self._unit)
        else:
            group_diversity = np.broadcast_to(np.asarray(diversity, dtype=np.float64), groups.shape).copy()
        rows = self.group_rows(groups)  # (R,)
        row_prompt = np.repeat(prompt_idx, self.G)  # (R,)
        t_model = time.perf_counter()
        self._prefill_chunks(prompt_idx.tolist())  # each prompt with the rest of its chunk, as warm_prompts does
        self._prefill(rows, [self._prompt_ids[i] for i in row_prompt], fresh)
        dt_model = time.perf_counter() - t_model
        self.timings["model_s"] += dt_model
        if prompt_indices is None:
            self._prefetch(self._next_prompt_indices(groups))  # these groups' next prompts, while they run
        ep = self.episode
        ep.reset(rows)
        ep.prompt[rows] = row_prompt
        ep.diversity[rows] = np.repeat(group_diversity, self.G)
        cats = [self.spec.category_slot(self.prompts[i].category) for i in row_prompt]
        self.featurizer.reset(torch.as_tensor(rows, device=self.device), category=cats,
                              diversity=ep.diversity[rows])
        obs = self.featurizer.observe(self.logits)
        self.timings["env_s"] += time.perf_counter() - t0 - dt_model
        return obs

    def _prefill(self, rows: np.ndarray, ids: list, fresh: bool) -> None:
        """The model state of ``rows`` restarted on the prompts ``ids`` (``fresh``: the whole batch, a new state)."""
        if fresh:
            self.logits, self.state = self.lm.prefill(ids)  # (B, V)
            return
        rows_t = torch.as_tensor(rows, device=self.device)
        new_logits = self.lm.replace_rows(self.state, rows_t, ids)
        self.logits = self.logits.clone()
        self.logits[rows_t] = new_logits

    def step(self, actions: np.ndarray | torch.Tensor) -> StepResult:
        """One token for every row whose completion goes on; groups whose rows have all ended are done."""
        t0 = time.perf_counter()
        a = torch.as_tensor(np.asarray(actions, dtype=np.float32).reshape(-1), device=self.device)
        if a.shape[0] != self.B:
            raise ValueError(f"expected {self.B} actions (one per row), got {a.shape[0]}")
        ep = self.episode
        active = ~ep.ended  # (B,) numpy
        active_t = torch.as_tensor(active, device=self.device)
        temperature, tokens, tempered = self._draw(a, active_t)
        stats = self.featurizer.update(tokens, temperature)
        pos = self._record(tokens, temperature, stats.logp, active, active_t)
        repeated = closes_repeated_ngram(ep.tokens, pos, self.reward.config.repetition_n) & active_t
        comps = self.reward.step_components(stats.logp, repeated, stats.anomalous, tempered)
        newly_ended = self._end_rows(tokens, active, active_t)
        sync = self.G * self._unit  # rows that end together: a group, or a twin pair
        done = np.repeat(ep.ended.reshape(-1, sync).all(axis=1), sync)  # (B,)
        done_rows = np.flatnonzero(done)
        # The completions of the groups that end here are final: score them while the model decodes.
        finished = self._score_groups(done_rows) if done_rows.size else None
        t_model = time.perf_counter()
        self.logits = self.lm.decode(self.state, tokens)  # (B, V)
        dt_model = time.perf_counter() - t_model
        obs = self._observe(active, newly_ended)
        components = self._components(comps, active, done_rows, finished)
        reward = self._reward(components, done_rows)
        ep.ep_return += reward
        ep.waited += ~active
        self._count(t0, dt_model, active)
        return StepResult(obs=obs, reward=reward, done=done, terminated=ep.ended_by_eos.copy(),
                          truncated=ep.ended & ~ep.ended_by_eos, tokens=tokens, temperature=temperature,
                          active=active, components=components)

    def _draw(self, actions: torch.Tensor, active: torch.Tensor):
        """Temperatures (B,) of ``actions``, the drawn tokens (B,) (EOS for waiting rows), and the tempered logits
        (B, V) when the reward's entropy needs them (else None)."""
        f = self.featurizer.state
        temperature = self.mapping.to_temperature(actions, previous=f.prev_temperature, first_step=f.position == 0)
        need_tempered = self.reward.config.entropy != 0
        drawn = sample(self.logits, temperature, generator=self.generator, return_tempered=need_tempered,
                       uniform_rows=self._uniform_rows, **self.config.truncation.to_dict())
        tokens, tempered = drawn if need_tempered else (drawn, None)  # (B,), (B, V) or None
        tokens = torch.where(active, tokens, self.lm.eos_token_ids[0])  # waiting rows feed EOS; nothing is kept
        return temperature, tokens, tempered

    def _record(self, tokens: torch.Tensor, temperature: torch.Tensor, logp: torch.Tensor, active: np.ndarray,
                active_t: torch.Tensor) -> torch.Tensor:
        """Write the active rows' token, temperature and log-prob into their episode; returns where (B,)."""
        ep = self.episode
        live = torch.as_tensor(np.flatnonzero(active), device=self.device)  # (A,) rows drawing a token
        pos = ep.length.clamp(max=self.config.max_new_tokens - 1)  # (B,) where this token is written
        at = pos[live]
        ep.tokens[live, at] = tokens[live]
        ep.temps[live, at] = temperature[live]
        ep.logps[live, at] = logp[live].float()
        ep.length = ep.length + active_t.long()
        return pos

    def _end_rows(self, tokens: torch.Tensor, active: np.ndarray, active_t: torch.Tensor) -> np.ndarray:
        """Mark the rows whose completion ends with this token (EOS, or max_new_tokens); returns them (B,) bool."""
        ep = self.episode
        eos = self.lm.is_eos(tokens) & active_t
        full = ep.length >= self.config.max_new_tokens
        eos_np, full_np = eos.cpu().numpy(), full.cpu().numpy()
        newly_ended = active & (eos_np | full_np)
        ep.ended_by_eos |= newly_ended & eos_np
        ep.ended |= newly_ended
        return newly_ended

    def _observe(self, active: np.ndarray, newly_ended: np.ndarray) -> torch.Tensor:
        """The (B, F) observation of the new logits; a waiting row keeps its terminal one."""
        held = self.episode.held_obs
        obs = self.featurizer.observe(self.logits)
        waiting = torch.as_tensor(~active, device=self.device)
        obs = torch.where(waiting.view(-1, 1), held, obs)
        if newly_ended.any():
            ended_rows = torch.as_tensor(np.flatnonzero(newly_ended), device=self.device)
            held[ended_rows] = obs[ended_rows]
        return obs

    def _components(self, step: dict[str, torch.Tensor], active: np.ndarray, done_rows: np.ndarray,
                    finished: Future | None) -> dict[str, np.ndarray]:
        """Every component of this step (B,) float32: per token on active rows, per completion on ``done_rows``."""
        components = {k: np.where(active, v.detach().cpu().numpy(), 0.0).astype(np.float32) for k, v in step.items()}
        for k in EPISODE_COMPONENTS + CREDIT_TERMS:
            components[k] = np.zeros(self.B, dtype=np.float32)
        if finished is not None:
            for k, v in finished.result().items():
                components[k][done_rows] = v
        return components

    def _reward(self, components: dict[str, np.ndarray], done_rows: np.ndarray) -> np.ndarray:
        """The (B,) reward of this step; adds ``components`` to the episodes' totals."""
        ep = self.episode
        reward = self.reward.combine(components, ep.diversity)
        for k, v in components.items():
            ep.components[k] += v
        if done_rows.size and (self.twins or self.reward.config.group_baseline):
            totals = {k: v[done_rows] for k, v in ep.components.items()}  # whole episodes, this step included
            reward = reward.copy()
            if self.twins:
                twin = twin_of(np.arange(len(done_rows)), self.G)  # done rows are whole pairs, in row order
                baseline = self.reward.twin_baseline(twin, totals, ep.diversity[done_rows])
            else:
                baseline = self.reward.group_baseline(self._groups_of(len(done_rows)), totals, ep.diversity[done_rows])
            reward[done_rows] += baseline.astype(np.float32)
        return reward

    def _count(self, t0: float, dt_model: float, active: np.ndarray) -> None:
        self.timings["model_s"] += dt_model
        self.timings["env_s"] += time.perf_counter() - t0 - dt_model
        self.timings["tokens"] += int(active.sum())
        self.timings["waiting_rows"] += int((~active).sum())

    def completion_ids(self, row: int) -> list[int]:
        """Token ids generated in ``row``'s current episode, EOS excluded."""
        eos = set(self.lm.eos_token_ids.tolist())
        return [t for t in self.episode.tokens[row, : int(self.episode.length[row])].tolist() if t not in eos]

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
        return self.side.score(self._episode_components, rows)

    def _prefetch(self, prompt_indices: np.ndarray) -> None:
        """Prefill ``prompt_indices`` into the prompt cache on the side thread (with ``env.overlap`` and a cache)."""
        if not self.config.overlap or self._prompt_cache() is None:
            return
        self.side.prefetch(self._prefill_chunks, prompt_indices.tolist())  # with the rest of their chunks

    def close(self) -> None:
        """Release the model state and stop the side threads (idempotent)."""
        self.state = None
        self.side.close()

    def _groups_of(self, n: int) -> list[list[int]]:
        """Positions ``0..n-1`` of ``n`` rows taken whole groups at a time, split into their groups."""
        return [list(range(i, i + self.G)) for i in range(0, n, self.G)]

    def _episode_components(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """Completion components of ``rows`` (whole groups, in group order)."""
        ids = [self.completion_ids(int(r)) for r in rows]
        texts = [self.lm.decode_text(t) for t in ids]
        prompts = [self.prompts[self.episode.prompt[r]] for r in rows]
        return self.reward.episode_components(self._groups_of(len(rows)), [p.id for p in prompts], [p.text for p in prompts],
                                              [p.answers for p in prompts], texts, ids)

    def episode_info(self, row: int) -> dict[str, Any]:
        """SB3-style ``episode`` stats plus Kelvin's breakdown for a row whose episode just ended."""
        ep = self.episode
        n = int(ep.length[row])
        temps = ep.temps[row, :n].cpu().numpy().copy()  # a copy: on CPU .numpy() shares memory the reset zeroes
        logps = ep.logps[row, :n].cpu().numpy().copy()
        prompt = self.prompts[ep.prompt[row]]
        return {
            "episode": {"r": float(ep.ep_return[row]), "l": n, "t": round(time.perf_counter() - ep.start[row], 6)},
            "reward_components": {k: float(v[row]) for k, v in ep.components.items()},
            "diversity": float(ep.diversity[row]),
            "group": int(row // self.G),
            "waited": int(ep.waited[row]),
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
            "correct": bool(ep.components["correct"][row] > 0.5) if prompt.answerable else None,
            "completion": self.completion_text(row),
        }
