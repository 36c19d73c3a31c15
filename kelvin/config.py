"""Kelvin run configuration: YAML blocks loaded into typed, range-checked dataclasses.

A config has seven blocks, each mirroring the constructor it feeds (rl-zoo style):

| block    | dataclass                                   | feeds                                            |
|----------|---------------------------------------------|--------------------------------------------------|
| `model`  | :class:`envs.lm.ModelConfig`                | :func:`envs.lm.load_causal_lm`                   |
| `env`    | :class:`envs.config.EnvConfig`, nesting `action` (:class:`policies.actions.ActionMapping`), `truncation` (:class:`samplers.core.Truncation`) and `features` (:class:`policies.features.FeatureSettings`) | :class:`envs.generation.TemperatureVecEnv` |
| `reward` | :class:`envs.rewards.RewardConfig`          | :class:`envs.rewards.RewardFunction`             |
| `ppo`    | :class:`PPOConfig`: exactly keyword arguments of ``stable_baselines3.PPO`` | ``PPO(**config.ppo.kwargs())`` |
| `train`  | :class:`TrainConfig`                        | :func:`kelvin.training.train`                    |
| `evaluation` | :class:`EvaluationConfig`               | :func:`kelvin.evaluation.run.evaluate`           |
| `policy` | :class:`PolicyConfig`                       | the tuned base of the residual policy (:func:`kelvin.tuning.tune_base`) |

**One source of defaults.** The dataclass field defaults *are* the embedded default run; a YAML file
lists only what differs from them (``configs/default.yaml`` is ``{}``), and a run's ``config.yaml``
holds every value resolved. ``load_config(None)`` and ``gymnasium.make("kelvin/Temperature-v0")``
start exactly where ``configs/default.yaml`` starts.

**Why pydantic (v2 dataclasses).** The settings classes stay plain dataclasses to their users
(``replace``, ``asdict``, attribute docstrings as help), while each field declares its type and range
in its own annotation (``StrictInt = Field(16, ge=1)``), next to its default, in the layer that owns
it: a hand-written checker would need a home that ``policies/``, ``envs/`` and ``kelvin/`` can all
import, which the layering has not got. pydantic also builds the nested blocks from mappings, rejects
unknown keys, and checks objects built in Python exactly as ones read from YAML. Strict types keep a
YAML slip from becoming a silently different number (``true`` is not the integer 1, ``"4"`` not 4);
numbers where NaN and infinity are meaningless say so (``allow_inf_nan=False``). :mod:`kelvin.config_loading`
turns pydantic's errors into one-line messages. The sampler core's :class:`~samplers.core.Truncation`
checks its four fields itself, so the deployment core needs torch alone.

**Loading** (the YAML reader, ``--set`` overrides, moved keys and the one-line errors) is
:mod:`kelvin.config_loading`: :func:`~kelvin.config_loading.load_config`.
"""

from __future__ import annotations

from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, model_validator
from pydantic.dataclasses import dataclass as settings_dataclass

from envs.config import MAX_SEED, EnvConfig
from envs.lm import ModelConfig, check_device
from envs.rewards import RewardConfig
from samplers.suggest import did_you_mean, renamed

__all__ = ["ConfigError", "EvaluationConfig", "KelvinConfig", "MODEL_SETTINGS", "PPOConfig", "PolicyKwargs",
           "TrainConfig", "model_setting_changes"]

PositiveInt = Annotated[StrictInt, Field(ge=1)]
FiniteFloat = Annotated[StrictFloat, Field(allow_inf_nan=False)]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key, the value and the fix."""


# ---------------------------------------------------------------------- the ppo and train blocks
@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class NetArch:
    """Separate actor and critic layer sizes: ``net_arch: {pi: [64, 64], vf: [64, 64]}``."""

    pi: list[PositiveInt] = Field(default_factory=lambda: [64, 64])
    """Hidden layer sizes of the actor (the exported policy)."""
    vf: list[PositiveInt] = Field(default_factory=lambda: [64, 64])
    """Hidden layer sizes of the critic."""


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PolicyKwargs:
    """``ppo.policy_kwargs``: the keyword arguments of SB3's ``MlpPolicy`` that a YAML file can express."""

    net_arch: Union[list[PositiveInt], NetArch] = Field(default_factory=lambda: [64, 64])
    """Hidden layer sizes, shared by actor and critic (a list) or per network (``{pi: [...], vf: [...]}``)."""
    log_std_init: FiniteFloat = -4.0
    """Initial log std of the exploration noise. With gSDE (``ppo.use_sde``) the action noise is the actor's last
    hidden layer (64 tanh units) times weights of std exp(-4) = 0.018: roughly 0.07 in action units, 0.09 in T on
    [0, 2.4]. Why not -3: the deterministic policy is judged, the stochastic one trained; with -3 (about 0.2 in T
    in rollouts) PPO drifted from the tuned base to settings that pay only under noise (validation margin vs the
    base -0.12 after 20 updates, -0.26 after 30 larger ones; +0.03 with -4, one seed each). Without gSDE it is
    the action's std directly (use about -1.0 there)."""
    ortho_init: StrictBool = True
    """Orthogonal initialisation of the networks."""


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PPOConfig:
    """The ``ppo:`` block: exactly keyword arguments of ``stable_baselines3.PPO`` (a test checks the names
    against its signature). ``seed``, ``device``, ``env``, ``policy`` and logging are set by Kelvin."""

    learning_rate: StrictFloat = Field(3e-4, gt=0, allow_inf_nan=False)
    """Adam learning rate. 3e-4 with 4 epochs and target_kl 0.02, with the small exploration noise of
    ``policy_kwargs.log_std_init`` -4: the policy starts at a tuned base (policy.base), so an update should move it
    only as far as a rollout of 16 groups can justify (1e-4 barely moved it: approx_kl ~0.001 an update)."""
    n_steps: StrictInt = Field(32, ge=1)
    """Env steps per row between updates (x env.workers x env.batch_size rows = the rollout: 1024 samples, 64
    groups, by default)."""
    batch_size: StrictInt = Field(256, ge=2)
    """Minibatch size of the PPO update (at most ppo.n_steps x env.workers x env.batch_size)."""
    n_epochs: StrictInt = Field(4, ge=1)
    """Passes over each rollout."""
    gamma: StrictFloat = Field(1.0, ge=0.0, le=1.0)
    """Discount factor. 1: the completion rewards arrive at the group's end, a few tokens after the decisions
    that earned them; discounting would only shrink them."""
    gae_lambda: StrictFloat = Field(0.95, ge=0.0, le=1.0)
    """GAE bias-variance trade-off."""
    clip_range: StrictFloat = Field(0.2, gt=0, allow_inf_nan=False)
    """PPO's policy ratio clip."""
    clip_range_vf: Optional[StrictFloat] = Field(None, gt=0, allow_inf_nan=False, examples=[0.2])
    """Value function clip (None = off)."""
    normalize_advantage: StrictBool = True
    """Normalise the advantages per minibatch."""
    ent_coef: StrictFloat = Field(0.0, ge=0, allow_inf_nan=False)
    """Entropy bonus weight."""
    vf_coef: StrictFloat = Field(0.5, ge=0, allow_inf_nan=False)
    """Value loss weight."""
    max_grad_norm: StrictFloat = Field(0.5, gt=0, allow_inf_nan=False)
    """Gradient clipping norm."""
    target_kl: Optional[StrictFloat] = Field(0.02, gt=0, allow_inf_nan=False, examples=[0.02])
    """Stop an update's epochs early above this KL (None = never)."""
    use_sde: StrictBool = True
    """Generalised state-dependent exploration: the noise is a linear function of the actor's last hidden layer,
    its weights redrawn every ``sde_sample_freq`` steps, so one exploration draw perturbs a whole stretch of an
    episode consistently (a different *schedule*), not each token independently. Sequence-level rewards (paid at
    the group's end) credit such perturbations far better than per-token noise (measured on this reward: the
    policy moved 3x further per update, approx KL 0.015 vs 0.005, and per-token noise left it at its start after
    60k steps). The exported actor is the same mean network either way."""
    sde_sample_freq: StrictInt = Field(-1, ge=-1)
    """Steps between redraws of the gSDE noise weights (-1: once per rollout)."""
    stats_window_size: StrictInt = Field(100, ge=1)
    """Episodes averaged in the rollout/ep_* statistics."""
    policy_kwargs: PolicyKwargs = Field(default_factory=PolicyKwargs)
    """Network shape and initialisation (:class:`PolicyKwargs`)."""

    def kwargs(self) -> dict:
        """``PPO(**kwargs)``: every field, ``policy_kwargs`` as a plain mapping."""
        return asdict(self)


PPO_RESERVED = {"policy": "Kelvin always trains an MlpPolicy", "env": "Kelvin builds the env from the env block",
                "seed": "use train.seed", "device": "use train.policy_device", "verbose": "Kelvin sets it",
                "tensorboard_log": "Kelvin logs into the run directory", "_init_setup_model": "Kelvin sets it"}
"""Arguments of ``PPO`` that Kelvin sets itself, and where the setting lives instead."""


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class TrainConfig:
    """The ``train:`` block."""

    total_timesteps: StrictInt = Field(20_480, ge=1)
    """Environment steps (tokens over all rows) to train for: 20 PPO updates by default (~15 min on a 2-core CPU)."""
    seed: StrictInt = Field(0, ge=0, le=MAX_SEED)
    """Seed of PPO, the env's prompt order and token draws."""
    normalize_obs: StrictBool = True
    """Running observation normalisation (VecNormalize); its statistics are saved with the model."""
    normalize_reward: StrictBool = True
    """Scale rewards by a running estimate of the return's std (training only)."""
    checkpoint_every: StrictInt = Field(4096, ge=0)
    """Save a checkpoint every this many environment steps (0 = only at the end)."""
    validate_every: StrictInt = Field(20, ge=0)
    """Validate every this many PPO updates and once after the last one (0 = only after the last; a slot that
    falls on the last update is left to that final validation). 20: the default 20-update run validates once, at
    the end (a validation is 384 episodes, 30% of a 1280-episode run's episodes: a mid-run one cost 15% of its
    wall time), and a longer run still draws a curve; ``configs/results.yaml`` validates every 10."""
    validation_prompts: StrictInt = Field(32, ge=1)
    """Validation prompts, taken round-robin over the split's categories (``validation_mix``), each sampled
    group_size times; the same prompts, λ draws and random stream for every policy."""
    validation_mix: Literal["split", "equal"] = "split"
    """How many validation prompts each category gives: ``split``, its share of the split (32: 12 factual
    questions and 1 math problem, 13 answerable), so that a margin estimates the whole split's, whose mix the test
    split shares (36-38% factual questions); ``equal``, as many as it has (32: 4 factual, 4 math, 8 answerable; the
    default before, and the published runs'). Why: a policy without the category heats every prompt at λ = 1, which
    gains on open prompts and loses on factual ones, so an equal mix read gains the test split did not
    (docs/results.md, "the split's mix")."""
    validation_streams: StrictInt = Field(1, ge=1)
    """Independent random streams: every policy runs ``validation_streams`` times on the validation prompts (the
    n-th on seed + n; each stream cached on its own) and a prompt's value is the mean over its streams' groups.
    At 4 samples a prompt the samples' own randomness is most of a margin's spread, and every check of a run, and
    every run of one seed, reuses the one stream: a stream that favours a change reads as a win check after check
    (docs/results.md: +0.48 [+0.02, +0.95] at λ = 2 on one stream, −0.02 [−0.18, +0.15] on 8). N times the cost."""
    validation_temperatures: list[FiniteFloat] = Field(default_factory=lambda: [0.0, 0.3, 0.5, 0.7, 1.0, 1.2],
                                                       min_length=1)
    """Fixed temperatures the learned policy is compared with; the best one is reported. Their episodes are
    cached (kelvin/tuning.py): a second run with the same settings does not recompute them."""
    validation_diversity: Optional[list[FiniteFloat]] = Field(None, min_length=1, examples=[[0.0, 1.0, 2.0]])
    """The diversity dial values λ every validation prompt is scored at (each prompt's group runs once per value);
    None: 3 values evenly over the env's λ range (0, 1, 2 by default), each the nearest of ``env.diversity_values``
    when the env draws from a list (``[0, 1]``: 0 and 1). A fixed grid, not random draws: a margin is then the same
    quantity on every run, and the report gives it per λ too."""
    keep_best: StrictBool = False
    """Ship the best validated policy, not the last: after every validation whose margin (over the λ grid) against
    the run's base (without a base: against the best fixed T) beats every earlier one of the run, that policy is
    written to ``best/`` (``best.json`` says which update and why); the run's start counts as the base itself,
    margin 0, so a run that never beats its base on validation ships the base. The export, ``evaluate.py`` and the
    samplers then use ``best/model.zip``; ``model.zip`` stays the last update, which ``--resume`` continues. The
    pick is made on the validation prompts, so its validation margin is optimistic: judge it on the test split.
    Off: the last update (20 updates validate once, at the end: nothing to pick). SB3's ``EvalCallback`` keeps a
    ``best_model.zip`` the same way; docs/results.md shows late updates undoing a λ = 1 gain."""
    validation_bootstrap: StrictInt = Field(2000, ge=10)
    """Bootstrap resamples over validation prompts for the margins' paired 95% intervals."""
    validation_split: Literal["train", "validation", "test"] = "validation"
    """Prompt split used for validation."""
    samples_to_log: StrictInt = Field(3, ge=0)
    """Completions (with temperature traces) written to TensorBoard per validation."""
    progress_bar: StrictBool = True
    """Show a progress bar while training."""
    policy_device: StrictStr = "cpu"
    """Device of the PPO networks (a small MLP: the CPU is usually fastest)."""
    log_std_final: Optional[FiniteFloat] = Field(None, examples=[-3.0])
    """An exploration schedule: the policy's log std (gSDE's noise scale, ``ppo.policy_kwargs.log_std_init`` at the
    start) moves linearly to this value over the first ``log_std_anneal`` of ``total_timesteps``, then holds; it is
    set after every PPO update and no longer learned (:class:`kelvin.callbacks.LogStdSchedule`). None: PPO learns
    it from its initial value. Why: PPO climbs the noisy policy's reward, the deterministic one is judged; wide
    noise finds the λ = 2 gain but prefers a hotter λ = 1 finish than the deterministic policy does, narrow noise
    keeps the two together but moves slowly; wide first, narrow to finish. Measured (-1.5 to -3 by mid-run, three
    seeds): worse than a constant -3, the narrow phase does not undo the wide one's drift (docs/results.md)."""
    log_std_anneal: FiniteFloat = Field(1.0, gt=0.0, le=1.0, examples=[0.5])
    """The fraction of ``total_timesteps`` over which ``log_std_final`` is reached. A run resumed with a larger
    ``total_timesteps`` follows the schedule of its new total from the steps already done (its log std moves back
    toward the start where the new end of the anneal lies beyond them)."""
    twin_groups: StrictBool = False
    """Antithetic twins: the training env's groups come in pairs with the same prompt, λ and random numbers
    (envs/generation_core.py), the policy's gSDE noise is mirrored across a pair (kelvin/heads.py), and a row's
    training signal is its return minus its twin's (in place of ``reward.group_baseline``). The two differ only
    in the sign of the exploration, so the text's own randomness, which swamps a small change of T, largely
    cancels in the difference (docs/training.md). Needs the diversity heads, ``ppo.use_sde``, one env worker and
    ``env.batch_size`` a multiple of 2 x ``env.group_size``. Off: each row explores on its own noise."""

    def __post_init__(self):
        check_device(self.policy_device, "policy_device")


NonNegFloat = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
PullFraction = Annotated[StrictFloat, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class PolicyConfig:
    """The ``policy:`` block: what the learned temperature is a correction of (DESIGN.md, "Residual on a tuned base").

    With a base, the policy acts as ``T = map(base(category, λ) + residual(obs))``: before PPO, training tunes
    the base on the train split with the training reward, and the actor's last layer starts at zero, so at
    update 0 the policy is the base (policies/tuned_base.py, kelvin/tuning.py)."""

    base: Literal["table", "fixed", "none"] = "table"
    """``table``: one temperature per category and λ (needs env.include_category); ``fixed``: one per λ, for a
    policy that does not see the category; ``none``: PPO from scratch around action 0."""
    base_temperatures: list[FiniteFloat] = Field(default_factory=lambda: [0.0, 0.3, 0.6, 0.9, 1.2], min_length=1)
    """The temperature grid the base is chosen from (each runs once on the tuning prompts; cached)."""
    base_prompts: StrictInt = Field(32, ge=1)
    """Train-split prompts the base is tuned on, round-robin over categories (K = env.group_size samples each)."""
    base_prior_prompts: FiniteFloat = Field(8.0, ge=0.0, examples=[0.0])
    """With ``base: table``, how many prompts' worth of every category's episodes each category's choice is pooled
    with (:func:`kelvin.tuning.tune_tables`): a category tuned on a few prompts keeps the overall best T unless
    its own prompts outweigh this. 0: each category on its own prompts only. Why 8: docs/results-earlier.md,
    section "The pooled base"."""
    base_diversity_points: StrictInt = Field(5, ge=1)
    """Values of the diversity dial λ, evenly over env.diversity_range, the base is tuned at; linear in between
    (formerly ``base_lambdas``, which still loads)."""
    diversity_heads: StrictBool = True
    """One residual output per λ of that grid, interpolated in λ as the base is (:mod:`kelvin.heads`), in place of
    one output for every λ: a row's λ picks which outputs it trains. Where the observation has no λ
    (env.features.include_diversity false) or the range is one λ, the actor has one output."""
    residual_pull: Union[PullFraction, list[PullFraction], list[list[PullFraction]]] = Field(
        0.15, examples=[0.05, [0.15, 0.03, 0.03, 0.03, 0.03], [[1, 1], [0, 0], [0, 1], [0, 0], [0, 0]]])
    """The fraction of the residual removed after every PPO update (the actor's last layer scaled by 1 - this): a
    pull toward the base, so a correction the reward keeps asking for stays and one that noise drew fades
    (:class:`kelvin.callbacks.ResidualPull`; why 0.15: docs/results-earlier.md). 0: off. With policy.base: none
    there is no base to pull toward, and no pull. A list gives one fraction per diversity head (the λ grid of
    ``base_diversity_points``, lowest λ first), so the heads can be held at different distances from the base. 1
    holds a head at its base: its row is zeroed after every update, so at its own λ the learned policy is the
    base (the λ = 0 head of docs/results-earlier.md, "The λ = 0 head held at its base"). A list of lists gives one
    fraction per (head, ``actor_features`` entry, in the order listed): a cell's own pull, for a table residual only
    (``actor_bias`` false, ``ppo.policy_kwargs.net_arch`` with ``pi: []``), where one weight is one (head, feature)
    cell; ``[[1, 1], [0, 0], [0, 1], [0, 0], [0, 0]]`` over the two position bins holds the λ = 0 head and the λ = 1
    finish at the base and leaves the λ = 1 start free (docs/results.md, round 21)."""

    residual_init: Optional[list[list[FiniteFloat]]] = Field(None, examples=[[[0, 0], [0, 0], [0, -0.1], [0, 0], [0, 0]]])
    """Where a table residual starts, in action units (the mapping's space, as the residual acts): one row per
    diversity head and one value per ``actor_features`` entry, as a per-cell ``residual_pull``. None: at zero, so
    at update 0 the policy is its base. A start off the base is a hand-made prior, and what PPO adds is then the
    learned policy minus that start, not minus the base (``scripts/headroom_probe.py --pool --reference``). Why:
    at λ = 1 the slopes at the base are small (a cooler finish alone +0.045, a hot start alone +0.02) and PPO's
    walk on this CPU's batch is larger, so a start at the finish's share tests whether PPO then builds on it
    (docs/results.md, rounds 21-22: it does not yet). A residual pulled toward the base (``residual_pull``) is pulled from here too."""

    actor_features: Optional[list[StrictStr]] = Field(None, min_length=1, examples=[["position", "diversity"]])
    """The observation features the actor (the residual) reads, by name (:data:`policies.features.BASE_FEATURES`,
    ``category_<name>``, ``diversity``); the others are zeroed before its first layer. None: all of them. The
    critic always reads all. Needs diversity heads. Why: a residual that can only depend on position and λ has a
    handful of directions to learn where the whole observation has dozens (docs/results.md, section "a
    residual on position and λ alone stays on its base": it stopped the losses, and gained nothing)."""
    actor_bias: StrictBool = True
    """Whether the actor's output layer (the diversity heads) has a bias. False, with ``ppo.policy_kwargs.net_arch:
    {pi: [], vf: [64, 64]}`` and ``actor_features`` the position bins alone, makes the residual a table: one weight
    per (bin, λ head), none shared, so the gradient of one bin or λ moves no other cell (through shared hidden
    layers and biases it moves them all: docs/results.md). Needs diversity heads."""
    actor_lr_scale: FiniteFloat = Field(1.0, gt=0.0, examples=[10.0])
    """The actor's output layer learns at this multiple of ``ppo.learning_rate`` (the rest of the actor, its noise
    and the critic at the rate itself). An Adam step moves one weight by about the rate, so a table (``actor_bias``)
    moves its cells far slower than an MLP, whose output sums many weights' steps; at 10 a table moved as far as the
    MLP did in 128 updates (docs/results.md, "a table residual"), without raising the critic's rate. Needs
    diversity heads."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        return renamed(values, {"base_lambdas": "base_diversity_points"}, "policy")


@settings_dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class EvaluationConfig:
    """The ``evaluation:`` block: what ``evaluate.py`` sweeps, so its cost scales with the config
    (``configs/smoke.yaml`` evaluates in under two minutes). Each baseline family is swept over the
    grid below (an empty list leaves the family out); ``kelvin/evaluation/families.py`` documents them."""

    samples: StrictInt = Field(4, ge=2)
    """Samples per prompt K (diversity is measured across them)."""
    streams: StrictInt = Field(1, ge=1)
    """Independent random streams per policy: each prompt gets ``streams`` groups of K samples, every per-prompt
    metric is their mean (pass@K and the set metrics per group of K), so intervals narrow where the samples'
    own randomness, not the prompts, is the noise. ``streams`` times the cost."""
    max_prompts: Optional[StrictInt] = Field(None, ge=1, examples=[24])
    """Use this many prompts of the split (round-robin over categories); None = all."""
    batch_size: StrictInt = Field(64, ge=2)
    """Rows decoded together (a multiple of samples; raise it on a GPU)."""
    diversity: Optional[list[NonNegFloat]] = Field(None, min_length=1, examples=[[0.0, 0.5, 1.0]])
    """Diversity dial values λ a λ-conditioned learned policy is evaluated at (its front); None =
    ``diversity_points`` values evenly spread over the range it was trained on (formerly ``lambdas``)."""
    diversity_points: StrictInt = Field(5, ge=1)
    """How many λ values when ``diversity`` is None (formerly ``n_lambdas``)."""
    fixed: list[FiniteFloat] = Field(default_factory=lambda: [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5])
    """Fixed T, no truncation. T = 0 (greedy) and T = 1.0 always run: 1.0 is the fronts' reference point and the
    rival of the diversity goal."""
    minp: list[FiniteFloat] = Field(default_factory=lambda: [0.5, 1.0, 1.5, 2.0, 3.0])
    """T inside min-p 0.1 (the community's favourite for creative text)."""
    topp: list[FiniteFloat] = Field(default_factory=lambda: [0.3, 0.6, 0.9, 1.2, 1.5])
    """T inside top-p 0.9."""
    edt: list[FiniteFloat] = Field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0, 8.0])
    """EDT's theta (T = T0 N^(theta / H), T0 = 1)."""
    dynatemp: list[FiniteFloat] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """DynaTemp's delta around T = 0.8 (llama.cpp's dynamic temperature)."""
    surprise: list[FiniteFloat] = Field(default_factory=lambda: [3.0, 4.0, 5.0, 6.0, 7.0])
    """The surprise controller's target tau (bits)."""
    pid: list[FiniteFloat] = Field(default_factory=lambda: [0.3, 0.5, 0.7, 0.8, 0.9])
    """PID (positive preset) target quality."""
    negative_minp: list[FiniteFloat] = Field(default_factory=lambda: [-0.3, -0.6, -1.0, -2.0, -4.0])
    """T < 0 inside min-p 0.1: "the least likely of the plausible"."""
    hotcold: list[list[FiniteFloat]] = Field(
        default_factory=lambda: [[1.5, 1, 0.3], [1.5, 1, 0.6], [2.5, 1, 0.3], [2.5, 1, 0.6], [1.5, 3, 0.3],
                                 [1.5, 3, 0.6], [2.5, 3, 0.3], [2.5, 3, 0.6]], examples=[[[1.5, 1, 0.5]]])
    """Hot start, cold finish: ``[T_hot, n, T_cold]`` triples (T_hot for the first n tokens, then T_cold)."""
    table_temperatures: list[FiniteFloat] = Field(default_factory=lambda: [0.0, 0.3, 0.6, 0.9, 1.2, 1.5])
    """The per-category table family: for each λ, one temperature per category from these, the best on the
    validation split under the reward at that λ. Empty = no table family."""
    table_prompts: StrictInt = Field(8, ge=1)
    """Validation prompts per category the tables are tuned on."""
    bootstrap: StrictInt = Field(2000, ge=10)
    """Bootstrap resamples over prompts for every interval."""

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, values):
        return renamed(values, {"lambdas": "diversity", "n_lambdas": "diversity_points"}, "evaluation")

    def __post_init__(self):
        if self.batch_size % self.samples:
            raise ValueError(f"evaluation.batch_size={self.batch_size} must be a multiple of evaluation.samples="
                             f"{self.samples} (the K samples of a prompt are one group)")
        for triple in self.hotcold:
            if len(triple) != 3 or triple[1] < 0 or not float(triple[1]).is_integer():
                raise ValueError(f"evaluation.hotcold entry {triple} must be [T_hot, n, T_cold] with n an integer "
                                 ">= 0, e.g. [1.5, 1, 0.5]")


@settings_dataclass(config=ConfigDict(extra="forbid"))
class KelvinConfig:
    """A whole run: every block resolved to its dataclass."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    env: EnvConfig = Field(default_factory=EnvConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)

    def __post_init__(self):
        if self.policy.base == "table" and not self.env.include_category:
            raise ValueError("policy.base='table' tunes one temperature per category, but env.include_category is "
                             "false: use policy.base: fixed (one per λ) or none")
        lo, hi = self.env.diversity_bounds
        if self.policy.base != "none" and hi > lo and not self.env.features.include_diversity:
            raise ValueError(f"policy.base={self.policy.base!r} is tuned per λ and reads λ from the observation, but "
                             "env.features.include_diversity is false: set it true, or policy.base: none")
        self.actor_columns()  # names it and says the fix before a run starts
        from kelvin.heads import head_grid

        grid = head_grid(self)
        heads_only = [k for k, default in (("actor_bias", True), ("actor_lr_scale", 1.0))
                      if getattr(self.policy, k) != default]
        if heads_only and grid is None:
            raise ValueError(f"policy.{heads_only[0]} sets the diversity heads' output layer, but this run has one "
                             "output (policy.diversity_heads false, env.features.include_diversity false or one λ): "
                             f"enable the heads or drop policy.{heads_only[0]}")
        pull = self.policy.residual_pull
        self.table_cells("residual_init")  # name what is wrong before a run starts
        if isinstance(pull, list) and pull and isinstance(pull[0], list):
            self.table_cells("residual_pull")
        elif isinstance(pull, list):
            if grid is None or len(pull) != len(grid):
                raise ValueError(f"policy.residual_pull has {len(pull)} values, one per diversity head, but the actor "
                                 f"has {_heads_text(grid)}: give one number, or one per head")

    def table_cells(self, field: str) -> list[list[float]] | None:
        """``policy.<field>`` (``residual_pull`` or ``residual_init``) given per (head, actor feature) cell, as an
        (heads, observation columns) array (0 in the columns the actor does not read); None when the field is unset,
        one number or one per head. Raises ValueError naming what is wrong: the residual is not a table, or the
        shape does not match."""
        value, pc = getattr(self.policy, field), self.policy
        if not (isinstance(value, list) and value and isinstance(value[0], list)):
            return None
        arch = self.ppo.policy_kwargs.net_arch
        if pc.actor_bias or not (isinstance(arch, NetArch) and not arch.pi) or pc.actor_features is None:
            raise ValueError(f"policy.{field} per (head, feature) cell needs a table residual, one weight per cell: "
                             "policy.actor_bias false, ppo.policy_kwargs.net_arch {pi: [], vf: [...]} and "
                             f"policy.actor_features; or drop policy.{field}"
                             + (", or give one number, or one per head" if field == "residual_pull" else ""))
        from kelvin.heads import head_grid

        grid, names = head_grid(self), pc.actor_features
        if grid is None or len(value) != len(grid) or any(not isinstance(r, list) or len(r) != len(names)
                                                          for r in value):
            raise ValueError(f"policy.{field} per cell needs one row per diversity head ({_heads_text(grid)}) of one value "
                             f"per policy.actor_features entry ({len(names)}: {list(names)}); got "
                             f"{[len(r) if isinstance(r, list) else r for r in value]} values per row")
        self.actor_columns()  # names an unknown feature
        spec = self.env.feature_spec()
        cells = [[0.0] * spec.dim for _ in value]
        for row, values in zip(cells, value):
            for name, v in zip(names, values):
                row[spec.index(name)] = float(v)
        return cells

    def actor_columns(self) -> list[int] | None:
        """The observation columns of ``policy.actor_features`` (None: all). Raises ValueError naming an unknown
        feature, or a restriction without diversity heads (the only actor that can mask its inputs)."""
        names = self.policy.actor_features
        if names is None:
            return None
        from kelvin.heads import head_grid

        if head_grid(self) is None:
            raise ValueError("policy.actor_features restricts the diversity heads' actor, but this run has one output "
                             "(policy.diversity_heads false, env.features.include_diversity false or one λ): "
                             "enable the heads or drop policy.actor_features")
        spec = self.env.feature_spec()
        unknown = [n for n in names if n not in spec.names]
        if unknown and unknown[0].startswith("position_bin_") and not spec.position_bins:
            raise ValueError(f"policy.actor_features: {unknown[0]!r} is a position bin, and this env has none; set "
                             "env.features.position_bins (e.g. [4]: position_bin_0 and position_bin_1)")
        if unknown:
            raise ValueError(f"policy.actor_features: no feature named {unknown[0]!r}; "
                             f"{did_you_mean(unknown[0], spec.names, always_list=True)}")
        return sorted({spec.index(n) for n in names})

    @property
    def rollout_size(self) -> int:
        """Env steps per PPO update: ``ppo.n_steps * env.workers * env.batch_size``."""
        return self.ppo.n_steps * self.env.workers * self.env.batch_size

    def check_training(self) -> None:
        """The rules only training needs (a :class:`ConfigError`): the PPO minibatch fits in one rollout, and the
        validation's and the base's fixed temperatures lie in the action mapping's range. Not a build-time check:
        evaluation rebuilds the env block with its own batch and never runs PPO."""
        rollout = self.rollout_size
        if self.ppo.batch_size > rollout:
            raise ConfigError(f"ppo.batch_size={self.ppo.batch_size} exceeds the rollout size ppo.n_steps * "
                              f"env.workers * env.batch_size = {rollout}; lower ppo.batch_size or raise ppo.n_steps")
        if self.train.twin_groups:
            self._check_twins()
        lo, hi = self.env.action.t_min, self.env.action.t_max
        grids = {"train.validation_temperatures": self.train.validation_temperatures}
        if self.policy.base != "none":
            grids["policy.base_temperatures"] = self.policy.base_temperatures
        dlo, dhi = self.env.diversity_bounds
        outside = [v for v in self.train.validation_diversity or () if not dlo <= v <= dhi]
        if outside:
            raise ConfigError(f"train.validation_diversity={self.train.validation_diversity}: "
                              f"{', '.join(f'{v:g}' for v in outside)} outside the env's λ range [{dlo:g}, {dhi:g}] "
                              "(env.diversity_range / env.diversity_values); drop them or widen the range")
        for name, grid in grids.items():
            outside = [t for t in grid if not lo <= t <= hi]
            if outside:
                raise ConfigError(f"{name}={grid}: {', '.join(f'{t:g}' for t in outside)} outside env.action's range "
                                  f"[{lo:g}, {hi:g}]; drop them or widen env.action.t_min / env.action.t_max")

    def _check_twins(self) -> None:
        from kelvin.heads import head_grid

        needs = []
        if head_grid(self) is None:
            needs.append("the diversity heads (policy.diversity_heads true, env.features.include_diversity true)")
        if not self.ppo.use_sde:
            needs.append("gSDE exploration (ppo.use_sde true): its noise is what the twins mirror")
        if self.env.workers != 1:
            needs.append(f"one env worker (env.workers=1, not {self.env.workers})")
        if self.env.batch_size % (2 * self.env.group_size):
            needs.append(f"env.batch_size a multiple of 2 x env.group_size = {2 * self.env.group_size} "
                         f"(it is {self.env.batch_size})")
        if needs:
            raise ConfigError("train.twin_groups needs " + "; ".join(needs) + ", or set train.twin_groups false")

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        """The resolved config as YAML (every default filled in), as a run's ``config.yaml`` holds it."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


MODEL_SETTINGS = ("model.name", "env.max_new_tokens", "env.include_category", "env.features", "env.action",
                  "train.normalize_obs", "ppo.policy_kwargs", "policy.base", "policy.diversity_heads",
                  "policy.actor_features", "train.twin_groups")
"""Settings a trained model is bound to: the LM whose logits its features describe, the observation layout
(``env.features``, the horizon ``env.max_new_tokens``, the category one-hot), what its actions mean
(``env.action``), whether it sees normalised observations, its network's shape and inputs
(``policy.actor_features``), the kind of base its actions are a residual on (``policy.base``; the run keeps
its tuned ``base.json``), and whether its exploration is mirrored across twin groups (``train.twin_groups``)."""


def _leaves(value, prefix: str) -> dict[str, Any]:
    if is_dataclass(value):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{prefix}.{key}").items()}
    return {prefix: value}


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def model_setting_changes(saved: KelvinConfig, new: KelvinConfig) -> list[str]:
    """The :data:`MODEL_SETTINGS` that differ between a run's ``saved`` config and ``new`` one, as
    ``"env.include_category: true -> false"`` (empty when a model trained under ``saved`` fits ``new``)."""
    changes = []
    for path in MODEL_SETTINGS:
        block, key = path.split(".")
        old, now = _leaves(getattr(getattr(saved, block), key), path), _leaves(getattr(getattr(new, block), key), path)
        changes += [f"{k}: {_yaml_value(old.get(k))} -> {_yaml_value(now.get(k))}" for k in dict.fromkeys([*old, *now])
                    if old.get(k) != now.get(k)]
    return changes


def _heads_text(grid) -> str:
    """The actor's outputs in an error message: the diversity heads' λ grid (``kelvin.heads.head_grid``) or one."""
    return "one output (no diversity heads)" if grid is None else f"{len(grid)} heads, λ = {list(grid)}"
