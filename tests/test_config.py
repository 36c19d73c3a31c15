"""Run configs: one source of defaults, and every value checked by type and range when the config loads.

Each bad input of issue #15's probe gets one line that names the field, the value and the fix, from
:func:`kelvin.config_loading.load_config`, before anything heavy loads; the command line prints that line and
exits 2 without a traceback or a half-made run directory.
"""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from conftest import ROOT, SMOKE, run_train

from envs.config import EnvConfig
from kelvin.callbacks import updates
from kelvin.config import ConfigError, KelvinConfig, PPOConfig
from kelvin.config_loading import load_config

DEFAULT = ROOT / "configs" / "default.yaml"


def _error(tmp_path, yaml_text: str | None = None, overrides: list[str] | None = None) -> str:
    path = None
    if yaml_text is not None:
        path = tmp_path / "c.yaml"
        path.write_text(yaml_text)
    with pytest.raises(ConfigError) as err:
        load_config(path, overrides)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message and "pydantic" not in message, message
    return message


# one case per item of issue #15's list: (YAML or None, --set overrides, the exact line's field-and-fix part)
CASES = {
    "nan clip": (None, ["reward.logprob_clip=.nan"],
                 "reward.logprob_clip=nan: must be a finite number > 0 (e.g. reward.logprob_clip: 10.0)"),
    "bool as int": ("env:\n  max_new_tokens: true\n", None,
                    "env.max_new_tokens=True: must be an integer >= 1 (e.g. env.max_new_tokens: 16)"),
    "negative checkpoint": ("train:\n  checkpoint_every: -5\n", None,
                            "train.checkpoint_every=-5: must be an integer >= 0 (e.g. train.checkpoint_every: 4096)"),
    "gamma above 1": ("ppo:\n  gamma: 1.5\n", None, "ppo.gamma=1.5: must be a number in [0, 1] (e.g. ppo.gamma: 1.0)"),
    "string batch": ('env:\n  batch_size: "four"\n', None,
                     "env.batch_size='four': must be an integer >= 1 (e.g. env.batch_size: 32)"),
    "set word": (None, ["ppo.n_steps=eight"], "ppo.n_steps='eight': must be an integer >= 1 (e.g. ppo.n_steps: 32)"),
    "set empty": (None, ["env.batch_size="],
                  "--set 'env.batch_size=': no value after '='; give one, e.g. --set env.batch_size=32"),
    "net_arch word": ("ppo:\n  policy_kwargs:\n    net_arch: foo\n", None,
                      "ppo.policy_kwargs.net_arch='foo': must be a list of integers >= 1 or a mapping with keys pi, vf "
                      "(e.g. ppo.policy_kwargs.net_arch: [64, 64])"),
    "seed word": ("train:\n  seed: abc\n", None, "train.seed='abc': must be an integer in [0, 4294967295] (e.g. train.seed: 0)"),
    "negative lr": ("ppo:\n  learning_rate: -1\n", None,
                    "ppo.learning_rate=-1: must be a finite number > 0 (e.g. ppo.learning_rate: 0.0003)"),
    "infinite t_max": ("env:\n  action:\n    t_max: .inf\n", None,
                       "env.action.t_max=inf: must be a finite number (e.g. env.action.t_max: 2.4)"),
    "top_p above 1": ("env:\n  truncation:\n    top_p: 1.5\n", None,
                      "env.truncation: top_p must be a number in (0, 1] (1.0 = off); got 1.5"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_issue_15_inputs_get_one_line_naming_field_value_and_fix(case, tmp_path):
    yaml_text, overrides, expected = CASES[case]
    assert expected in _error(tmp_path, yaml_text, overrides)


@pytest.mark.parametrize("text, expected", [
    ("", "is empty: a config is a mapping of blocks (model, env, reward, ppo, train, evaluation, policy); write {} for the "
         "embedded defaults"),
    ("# only a comment\n", "is empty"),
    ("- env\n- ppo\n", "is a list, not a mapping of blocks"),
    ("just words\n", "is a str, not a mapping of blocks"),
])
def test_empty_or_non_mapping_yaml_is_an_error(text, expected, tmp_path):
    assert expected in _error(tmp_path, text)


def test_unknown_and_moved_keys_name_the_right_one(tmp_path):
    assert _error(tmp_path, "env:\n  t_max: .inf\n").endswith(
        "env.t_max is now env.action.t_max: write `env.action.t_max: .inf` in the YAML (or --set env.action.t_max=...)")
    assert "env.top_k is now env.truncation.top_k" in _error(tmp_path, None, ["env.top_k=5"])
    assert "env.action_mapping is now env.action.kind" in _error(tmp_path, "env:\n  action_mapping: inverse\n")
    assert "unknown key env.action.t_mn; did you mean 't_min'?" in _error(tmp_path, None, ["env.action.t_mn=1"])
    assert "unknown block rewards; did you mean 'reward'?" in _error(tmp_path, "rewards:\n  logprob: 1\n")
    assert "ppo.seed is set by Kelvin; use train.seed" in _error(tmp_path, None, ["ppo.seed=3"])
    assert "env.features.horizon is set by Kelvin from env.max_new_tokens" in _error(tmp_path, None,
                                                                                    ["env.features.horizon=8"])


def test_cross_field_rules_are_checked_at_load(tmp_path):
    assert "env: group_size=3 must divide batch_size=32" in _error(tmp_path, None, ["env.group_size=3"])
    assert "env.action: t_min=3.0 must be below t_max=2.4" in _error(tmp_path, None, ["env.action.t_min=3"])
    assert ("ppo.batch_size=4096 exceeds the rollout size ppo.n_steps * env.workers * env.batch_size = 1024"
            in _error(tmp_path, None, ["ppo.batch_size=4096"]))
    four = load_config(None, ["ppo.batch_size=4096", "env.workers=4"])  # 4 workers x 16 rows x 64 steps: it fits
    assert four.rollout_size == 4096
    assert updates(four, 4096 * 3 - 1) == 2 and updates(four, 4096 * 3) == 3
    assert "env: ray_address='auto' is used only with workers > 1" in _error(tmp_path, None, ["env.ray_address=auto"])
    assert "env.workers=0: must be an integer >= 1" in _error(tmp_path, None, ["env.workers=0"])
    assert "env.features: feature spec version 2 is not this Kelvin's featurizer" in _error(
        tmp_path, None, ["env.features.version=2"])


def test_strict_types_take_no_silent_conversions(tmp_path):
    assert "env.truncation: top_k must be an int >= 0 (0 = off); got True" in _error(
        tmp_path, None, ["env.truncation.top_k=true"])
    assert "env.batch_size='16': must be an integer" in _error(tmp_path, 'env:\n  batch_size: "16"\n')
    assert "model.dtype='float8': must be one of 'float32', 'float16', 'bfloat16'" in _error(
        tmp_path, None, ["model.dtype=float8"])
    config = load_config(None, ["env.action.t_min=-2", "ppo.policy_kwargs.net_arch={pi: [32], vf: [16]}"])
    assert config.env.action.t_min == -2.0 and isinstance(config.env.action.t_min, float)  # an int is a fine float
    assert config.ppo.kwargs()["policy_kwargs"]["net_arch"] == {"pi": [32], "vf": [16]}


def test_the_command_line_prints_one_line_before_loading_anything(tmp_path):
    """A truncation error used to surface after the model loaded, leaving an untrained model.zip behind."""
    run_dir = tmp_path / "run"
    proc = run_train(["--config", str(SMOKE), "--run-dir", str(run_dir), "--set", "env.truncation.top_p=1.5"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {SMOKE}: env.truncation: top_p must be a number in (0, 1] (1.0 = off); got 1.5"]
    assert not run_dir.exists()


# --------------------------------------------------------------------------- one source of defaults
def test_default_yaml_is_the_dataclass_defaults():
    config = load_config(DEFAULT)
    assert config == load_config(None) == KelvinConfig()
    assert config.env == EnvConfig()
    a = dataclasses.asdict(config)
    assert (a["env"]["batch_size"], a["env"]["group_size"], a["env"]["max_new_tokens"]) == (32, 4, 16)
    assert a["env"]["truncation"] == {"top_k": 0, "top_p": 1.0, "min_p": 0.02, "top_n_sigma": None}
    assert tuple(a["env"]["diversity_range"]) == (0.0, 2.0) and a["env"]["features"]["include_diversity"]
    assert a["env"]["action"] == {"kind": "linear", "t_min": 0.0, "t_max": 2.4, "min_abs_temperature": 0.05,
                                  "max_delta": None}
    assert (a["train"]["total_timesteps"], a["train"]["checkpoint_every"], a["train"]["validate_every"],
            a["train"]["validation_prompts"]) == (20480, 4096, 20, 32)
    assert a["policy"] == {"base": "table", "base_temperatures": [0.0, 0.3, 0.6, 0.9, 1.2], "base_prompts": 32,
                           "base_prior_prompts": 8.0, "base_diversity_points": 5, "diversity_heads": True,
                           "residual_pull": 0.15, "residual_init": None, "actor_features": None, "actor_bias": True,
                           "actor_lr_scale": 1.0}
    assert (a["ppo"]["n_steps"], a["ppo"]["batch_size"], a["ppo"]["gamma"]) == (32, 256, 1.0)
    assert (a["ppo"]["use_sde"], a["ppo"]["sde_sample_freq"]) == (True, -1)
    assert a["ppo"]["policy_kwargs"] == {"net_arch": [64, 64], "log_std_init": -4.0, "ortho_init": True}
    assert a["reward"]["entropy"] == 0.0 and a["reward"]["group_baseline"]  # #12: nothing a constant T optimises


def test_every_shipped_config_loads_and_the_position_recipe_is_the_published_command():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(path).check_training()
    # configs/position.yaml is the results' recipe of --set flags (docs/results.md, runs/lsd3-s*), value for value
    flags = ["train.total_timesteps=131072", "train.validate_every=25", "policy.residual_pull=[1.0,0.0,0.0,0.0,0.0]",
             "env.features.position_bins=[4]", "policy.actor_features=[position_bin_0,position_bin_1,diversity]",
             "train.twin_groups=true", "env.diversity_values=[0.0,1.0,2.0]", "ppo.gae_lambda=1.0",
             "ppo.policy_kwargs.log_std_init=-3.0", "ppo.sde_sample_freq=16"]
    assert load_config(ROOT / "configs" / "position.yaml") == load_config(DEFAULT, flags)


def test_the_default_env_has_no_greedy_cliff():
    """The default mapping is linear on [0, 2.4]: greedy is its lower edge (a residual exploring around a T = 0 base
    is clipped to greedy, never flipped to the argmin side), and PPO's action 0 without a base is T = 1.2."""
    mapping = EnvConfig().action
    assert mapping.to_temperature(torch.tensor([0.0])).item() == pytest.approx(1.2, abs=1e-6)
    assert mapping.to_temperature(torch.tensor([-1.0, -1.3, 1.0])).tolist() == pytest.approx([0.0, 0.0, 2.4])


def test_resolved_config_round_trips(tmp_path):
    config = load_config(SMOKE, ["env.action.max_delta=0.25", "env.truncation.min_p=0.05"])
    config.dump(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_a_partial_sub_block_keeps_the_defaults_it_does_not_name(tmp_path):
    """env.features and env.truncation have defaults of their own (include_diversity true, min-p 0.02): a sub-block
    that names one setting lays it over them, in a file as with --set (built alone, the others were lost)."""
    (tmp_path / "c.yaml").write_text("env:\n  features:\n    position_bins: [4]\n")
    for config in (load_config(tmp_path / "c.yaml"), load_config(None, ["env.features.position_bins=[4]"])):
        assert config.env.features == dataclasses.replace(EnvConfig().features, position_bins=(4,))
    assert load_config(None, ["env.truncation.top_k=20"]).env.truncation.to_dict() == {
        "top_k": 20, "top_p": 1.0, "min_p": 0.02, "top_n_sigma": None}
    with pytest.raises(ConfigError, match=r"^defaults: env.features: position_bins=\[4, 2\] must be increasing"):
        load_config(None, ["env.features.position_bins=[4, 2]"])
    with pytest.raises(ConfigError, match="'position_bin_0' is a position bin, and this env has none; set env.features"):
        load_config(None, ["policy.actor_features=[position_bin_0,diversity]"])
    with pytest.warns(FutureWarning, match="include_diversity_weight is now"):  # an old name still wins
        old = load_config(None, ["env.features.include_diversity_weight=false", "policy.base=none"])
    assert not old.env.features.include_diversity


def test_every_block_is_frozen():
    """A block is a value: change one with dataclasses.replace, never in place (a run's saved config stays what
    it ran with)."""
    config = load_config(None)
    for block in dataclasses.fields(KelvinConfig):
        value = getattr(config, block.name)
        name = dataclasses.fields(value)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(value, name, getattr(value, name))
    assert dataclasses.replace(config.env, batch_size=8).batch_size == 8 and config.env.batch_size == 32


def test_ppo_block_is_exactly_ppo_keyword_arguments():
    from stable_baselines3 import PPO

    ppo_params = set(inspect.signature(PPO.__init__).parameters)
    assert {f.name for f in dataclasses.fields(PPOConfig)} <= ppo_params
    policy_params = set(inspect.signature(PPO.policy_aliases["MlpPolicy"].__init__).parameters)
    assert set(PPOConfig().kwargs()["policy_kwargs"]) <= policy_params
