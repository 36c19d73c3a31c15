"""Kelvin run configuration: YAML blocks loaded into typed dataclasses.

A config has five blocks, each mirroring the constructor it feeds (rl-zoo style):

``model``  -> :class:`envs.lm.ModelConfig`
``env``    -> :class:`envs.generation.EnvConfig`
``reward`` -> :class:`envs.rewards.RewardConfig`
``ppo``    -> keyword arguments of ``stable_baselines3.PPO`` (checked against its signature)
``train``  -> :class:`TrainConfig`

Files are read with a ``yaml.SafeLoader`` (that also reads ``1e-4`` as a float); unknown blocks or keys fail with the closest valid key
suggested; ``--set block.key=value`` overrides parse their value as YAML (``1e-4``, ``null``,
``[0.5, 1.0]``).
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from envs.generation import EnvConfig
from envs.lm import ModelConfig
from envs.rewards import RewardConfig

__all__ = ["TrainConfig", "KelvinConfig", "load_config", "apply_overrides", "ConfigError"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 wants ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml_load(text: str):
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


@dataclass
class TrainConfig:
    """The ``train:`` block."""

    total_timesteps: int = 60_000
    """Environment steps (tokens over all rows) to train for."""
    seed: int = 0
    """Seed of PPO, the env's prompt order and token draws."""
    normalize_obs: bool = True
    """Running observation normalisation (VecNormalize); its statistics are saved with the model."""
    normalize_reward: bool = True
    """Scale rewards by a running estimate of the return's std (training only)."""
    checkpoint_every: int = 10_000
    """Save a checkpoint every this many environment steps (0 = only at the end)."""
    validate_every: int = 4
    """Validate every this many PPO updates (0 = only at the end)."""
    validation_prompts: int = 16
    """Validation prompts (each sampled group_size times) per validation run."""
    validation_temperatures: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0])
    """Fixed temperatures the learned policy is compared with; the best one is reported."""
    validation_split: str = "validation"
    """Prompt split used for validation."""
    samples_to_log: int = 3
    """Completions (with temperature traces) written to TensorBoard per validation."""
    progress_bar: bool = True
    """Show a progress bar while training."""
    policy_device: str = "cpu"
    """Device of the PPO networks (a small MLP: the CPU is usually fastest)."""

    def __post_init__(self):
        if self.total_timesteps < 1:
            raise ConfigError(f"train.total_timesteps={self.total_timesteps} must be >= 1")
        if self.validation_prompts < 1:
            raise ConfigError(f"train.validation_prompts={self.validation_prompts} must be >= 1")
        if not self.validation_temperatures:
            raise ConfigError("train.validation_temperatures must list at least one temperature")


PPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 3e-4,
    "n_steps": 64,
    "batch_size": 256,
    "n_epochs": 10,
    "gamma": 0.99,
    "gae_lambda": 0.95,
    "clip_range": 0.2,
    "ent_coef": 0.0,
    "policy_kwargs": {"net_arch": [64, 64]},
}
# Arguments of PPO that Kelvin sets itself.
_PPO_RESERVED = {"policy", "env", "tensorboard_log", "seed", "device", "verbose", "_init_setup_model"}


@dataclass
class KelvinConfig:
    """A whole run: every block resolved to its dataclass (``ppo`` stays a dict of PPO kwargs)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: dict = field(default_factory=lambda: dict(PPO_DEFAULTS))
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "env": asdict(self.env), "reward": asdict(self.reward),
                "ppo": dict(self.ppo), "train": asdict(self.train)}

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


_BLOCKS = {"model": ModelConfig, "env": EnvConfig, "reward": RewardConfig, "train": TrainConfig}


def _suggest(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" Did you mean {close[0]!r}?" if close else f" Valid keys: {', '.join(sorted(valid))}."


def _ppo_keys() -> set[str]:
    from stable_baselines3 import PPO

    return set(inspect.signature(PPO.__init__).parameters) - {"self"} - _PPO_RESERVED


def _build(raw: dict, source: str) -> KelvinConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of blocks (model, env, reward, ppo, train)")
    for block in raw:
        if block not in {*_BLOCKS, "ppo"}:
            raise ConfigError(f"{source}: unknown block {block!r}.{_suggest(block, [*_BLOCKS, 'ppo'])}")
    kwargs = {}
    for block, cls in _BLOCKS.items():
        values = raw.get(block) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: block {block!r} must be a mapping of keys to values")
        fields = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in fields:
                raise ConfigError(f"{source}: unknown key {block}.{key}.{_suggest(key, fields)}")
        try:
            kwargs[block] = cls(**values)
        except ConfigError:
            raise
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{source}: invalid {block} block: {exc}") from exc
    ppo = dict(PPO_DEFAULTS)
    ppo_raw = raw.get("ppo") or {}
    if not isinstance(ppo_raw, dict):
        raise ConfigError(f"{source}: block 'ppo' must be a mapping of PPO keyword arguments")
    valid = _ppo_keys()
    for key in ppo_raw:
        if key in _PPO_RESERVED:
            raise ConfigError(f"{source}: ppo.{key} is set by Kelvin (use train.seed / train.policy_device)")
        if key not in valid:
            raise ConfigError(f"{source}: ppo.{key} is not an argument of stable_baselines3.PPO.{_suggest(key, valid)}")
    ppo.update(ppo_raw)
    n_rollout = ppo["n_steps"] * kwargs["env"].batch_size
    if ppo["batch_size"] > n_rollout:
        raise ConfigError(
            f"{source}: ppo.batch_size={ppo['batch_size']} exceeds the rollout size ppo.n_steps * env.batch_size = "
            f"{n_rollout}; lower ppo.batch_size or raise ppo.n_steps"
        )
    return KelvinConfig(ppo=ppo, **kwargs)


def apply_overrides(raw: dict, overrides: list[str] | None) -> dict:
    """Apply ``block.key=value`` strings (value parsed as YAML) to a raw config mapping (copied)."""
    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (raw or {}).items()}
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: expected block.key=value, e.g. --set ppo.learning_rate=1e-4")
        path, value = item.split("=", 1)
        block, key = path.split(".", 1)
        parsed = _yaml_load(value) if value != "" else None
        target = raw.setdefault(block, {})
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item!r}: block {block!r} is not a mapping")
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = parsed
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> KelvinConfig:
    """Read a YAML config (None = all defaults), apply overrides, validate every block."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass --config with a YAML file such as configs/default.yaml")
        try:
            raw = _yaml_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML ({exc}); fix the syntax at the position shown") from exc
        source = str(p)
    raw = apply_overrides(raw, overrides)
    return _build(raw, source)
