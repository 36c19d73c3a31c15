"""The ``env:`` block of a Kelvin config (:class:`EnvConfig`): the rows, groups, prompts, action mapping,
truncation and features of the temperature environments (:mod:`envs.generation`)."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import BeforeValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic.dataclasses import dataclass as settings_dataclass

from envs.prompts import CATEGORIES
from policies.actions import ActionMapping
from policies.features import FeatureSettings, FeatureSpec
from samplers.core import Truncation

__all__ = ["EnvConfig", "MAX_SEED"]


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
    base -0.58 after 20 updates), against +0.17 [-0.17, +0.51] on [0, 2.4] (seed 0, README, Results). Negative
    temperatures stay one setting away: ``t_min: -1.0``."""
    truncation: Annotated[Truncation, BeforeValidator(_truncation)] = Field(
        default_factory=lambda: Truncation(min_p=0.02))
    """Truncation before the temperature: ``{top_k, top_p, min_p, top_n_sigma}`` (samplers/core.py). Default
    min-p 0.02: it cuts only the garbage tail that T > 1.5 opens (min-p 0.1 caps diversity, measured), and makes
    negative temperatures mean "least likely of the plausible". Evaluation repeats fixed T under it."""
    include_category: StrictBool = True
    """Append the prompt category one-hot to the observation."""
    features: FeatureSettings = Field(default_factory=lambda: FeatureSettings(include_diversity=True))
    """Feature settings ``{initial_temperature, ema_decay, repeat_window, anomaly_surprise, median_k,
    include_diversity, position_bins, version}`` (policies/features.py). The env's default observes the diversity
    dial λ (``include_diversity: true``): one policy serves every setting of it."""
    token_prior: StrictBool = True
    """Use the vocabulary's anomaly priors (anomaly/rules.py) in the featurizer's anomaly signal."""
    discovered_anomalies: StrictBool = True
    """Raise the priors of the model's discovered anomalous tokens (anomaly/discovery.py; cached on disk,
    probed once per model when missing). Only with ``token_prior``."""
    diversity_range: tuple[Lambda, Lambda] = (0.0, 2.0)
    """The diversity dial λ of each group is drawn uniformly from ``[low, high]`` (the reward's diversity
    weight, and an observation feature with ``features.include_diversity``)."""
    diversity_values: Optional[list[Lambda]] = Field(None, min_length=1, examples=[[0.0, 0.5, 1.0]])
    """Draw λ from these values instead of ``diversity_range`` (one value = a fixed λ)."""
    seed: StrictInt = Field(0, ge=0, le=2**63 - 1)
    """Seed of the prompt order, the λ draws and the token draws."""
    overlap: StrictBool = False
    """Run the work the model does not wait for on a second thread while the model decodes: scoring the groups
    that end at a step (MiniLM embeddings, text checks) and prefilling, into the prompt cache, the prompt each
    group starts next. Same tokens and rewards either way. Off by default: at torch's own thread count on a
    2-core CPU the model already uses both cores; side by side the env with it ran 4% slower and 14% faster at
    B = 16, 17% and 7% slower at B = 64 (docs/speed.md). Turn it on where a core is idle: one torch thread per
    process, or the CPU beside a GPU."""
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
