"""Export a trained run (or a baseline) into a directory that samplers load with torch alone.

Command line::

    python -m kelvin.export runs/default runs/default/export          # a training run
    python -m kelvin.export edt:theta=1.0 exports/edt --config configs/default.yaml
    python -m kelvin.export fixed:-0.5 exports/neg --config configs/default.yaml --set env.truncation.top_k=20

A run directory is exported from its ``model.zip`` (or ``--checkpoint``), ``vecnormalize.pkl`` and
``config.yaml`` (read through :mod:`kelvin.rundir`); a baseline spec string (``pid``,
``edt:theta=1.0``, see :mod:`policies.registry`) is exported with the feature spec, action mapping and
truncation of ``--config``. The format of the directory is documented in :mod:`policies.artifact`;
load it with :func:`policies.load_policy` or :meth:`samplers.hf.PolicyLogitsProcessor.from_pretrained`.

:func:`actor_module` turns a stable-baselines3 PPO policy into the torch module the export writes
(:class:`policies.learned.ActorModule`), and :func:`learned_policy` wraps it as a
:class:`~policies.learned.LearnedPolicy`: training's validation and evaluation run that same code.

What an export needs from the base model (its vocabulary size, and the per-token anomaly prior the
featurizer used in training when ``env.token_prior`` is on, :func:`anomaly.prior.build_token_prior`)
comes from a loaded :class:`envs.lm.CausalLM`: :func:`kelvin.training.train` passes its own; the
command line loads the configured model on the CPU.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import io
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kelvin.atomic import unusable_output_dir, write_atomic, write_text_atomic
from kelvin.rundir import RunDir, load_ppo, load_vecnormalize, normalization_stats
from policies.actions import ActionMapping
from policies.artifact import (
    ARTIFACT_FORMAT_VERSION,
    POLICY_FILE,
    SPEC_FILE,
    TOKEN_PRIOR_FILE,
    ArtifactError,
    quiet_jit,
)
from policies.base import BaselinePolicy
from policies.features import FeatureSpec
from policies.learned import ActorModule, LearnedPolicy
from policies.tuned_base import BaseModule, TunedBase
from samplers.core import Truncation

__all__ = ["actor_module", "learned_policy", "export_learned", "export_baseline", "export_run",
           "export_baseline_spec", "build_parser", "main"]


def _plain_copy(module: torch.nn.Module, where: str) -> torch.nn.Module:
    """A plain torch copy of a Linear or an activation layer (no SB3 classes inside the export).

    The Linear is built without its random initialisation (``skip_init``): training validates through
    this copy, and drawing from the global torch generator there would change PPO's later samples.
    """
    if isinstance(module, torch.nn.Linear):
        out = torch.nn.utils.skip_init(torch.nn.Linear, module.in_features, module.out_features,
                                       bias=module.bias is not None)
        with torch.no_grad():
            out.weight.copy_(module.weight.detach().float().cpu())
            if module.bias is not None:
                out.bias.copy_(module.bias.detach().float().cpu())
        return out
    if type(module).__module__ == "torch.nn.modules.activation" or isinstance(module, torch.nn.Identity):
        return copy.deepcopy(module).cpu()
    raise ArtifactError(f"cannot export layer {type(module).__name__} in {where}: only Linear layers and torch "
                        "activations (the MlpPolicy of stable-baselines3) are supported")


def actor_module(sb3_policy, normalization: dict | None = None, base: BaseModule | None = None) -> ActorModule:
    """The deterministic actor of an SB3 ``ActorCriticPolicy`` (PPO ``MlpPolicy``) as a plain torch module.

    ``normalization`` is ``{"mean", "var", "clip", "epsilon"}`` (:func:`kelvin.rundir.normalization_stats`
    of the VecNormalize the policy was trained with) or None for raw observations. ``base``: the tuned base
    the actor's output is a residual on (:mod:`policies.tuned_base`), or None. The layers are copied: the
    module does not change when training goes on.
    """
    from stable_baselines3.common.distributions import DiagGaussianDistribution, StateDependentNoiseDistribution
    from stable_baselines3.common.torch_layers import FlattenExtractor

    name = type(sb3_policy).__name__
    # Both Gaussian heads (plain and gSDE) act deterministically with the mean action_net(latent): that is exported.
    if not isinstance(getattr(sb3_policy, "action_dist", None), (DiagGaussianDistribution, StateDependentNoiseDistribution)):
        raise ArtifactError(f"{name} uses {type(getattr(sb3_policy, 'action_dist', None)).__name__}; only PPO's "
                            "Gaussian MlpPolicy (with or without gSDE) can be exported")
    if getattr(sb3_policy, "squash_output", False):
        raise ArtifactError(f"{name} squashes its output (tanh); only an unsquashed Gaussian MlpPolicy can be "
                            "exported")
    extractor = getattr(sb3_policy, "pi_features_extractor", None) or getattr(sb3_policy, "features_extractor", None)
    if not isinstance(extractor, FlattenExtractor):
        raise ArtifactError(f"{name} uses the features extractor {type(extractor).__name__}; only the default "
                            "FlattenExtractor (flat Box observations) can be exported")
    layers = [_plain_copy(m, "mlp_extractor.policy_net") for m in sb3_policy.mlp_extractor.policy_net]
    layers.append(_plain_copy(sb3_policy.action_net, "action_net"))
    if not isinstance(layers[0], torch.nn.Linear):
        raise ArtifactError(f"{name}: the actor must start with a Linear layer (net_arch with at least one layer, "
                            "or a bare action_net)")
    mask = getattr(sb3_policy, "actor_mask", None)  # kelvin.heads: the columns the actor reads (policy.actor_features)
    if mask is not None:  # x * mask then W is (W * mask) then x: the same products
        with torch.no_grad():
            layers[0].weight.mul_(mask.to(layers[0].weight))
    net = torch.nn.Sequential(*layers).eval()
    grid = getattr(sb3_policy, "heads", None)  # kelvin.heads.DiversityHeadsPolicy: one output per λ of the grid
    heads = dict(base=base, heads=None if grid is None else torch.tensor(grid, dtype=torch.float32),
                 diversity_col=getattr(sb3_policy, "diversity_col", -1))
    if normalization is None:
        return ActorModule(net, None, None, **heads).eval()
    return ActorModule(net, torch.as_tensor(np.asarray(normalization["mean"], dtype=np.float32)),
                       torch.as_tensor(np.asarray(normalization["var"], dtype=np.float32)),
                       float(normalization.get("clip", 10.0)), float(normalization.get("epsilon", 1e-8)),
                       **heads).eval()


def learned_policy(model, vec_normalize, feature_spec: FeatureSpec, action_mapping: ActionMapping,
                   label: str = "learned (PPO)", base: TunedBase | None = None) -> LearnedPolicy:
    """The :class:`~policies.learned.LearnedPolicy` of a PPO model and the VecNormalize it was trained with
    (None: raw observations), on its tuned ``base`` (None: none): the network, normalisation and base the
    export writes."""
    module = None if base is None else base.module(feature_spec, action_mapping)
    return LearnedPolicy(actor_module(model.policy, normalization_stats(vec_normalize), module), feature_spec,
                         action_mapping, label=label)


def _kelvin_version() -> str:
    try:
        from importlib.metadata import version

        return version("kelvin")
    except Exception:
        return "unknown"


def _finite_list(values, name: str) -> list[float]:
    out = [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
    if not all(math.isfinite(v) for v in out):
        raise ArtifactError(f"{name} holds non-finite values; the normalisation statistics are broken")
    return out


def _check_out_dir(out_dir: str | Path) -> Path:
    """``out_dir`` as a Path; a NotADirectoryError when it, or a folder above it, is a file."""
    out_dir = Path(out_dir)
    problem = unusable_output_dir(out_dir)
    if problem is not None and problem[0] == "file":  # an unwritable folder fails at the write, naming the file
        raise NotADirectoryError(f"export directory {out_dir}: {problem[1]} is a file, not a directory; give "
                                 "another output directory")
    return out_dir


def _write(out_dir: Path, spec: dict, module: torch.nn.Module | None, token_prior: torch.Tensor | None) -> Path:
    """Write the files, each atomically (:func:`kelvin.atomic.write_atomic`); ``spec.json`` is removed first
    and written last, so an interrupted export has none and fails to load clearly."""
    out_dir = _check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = out_dir / SPEC_FILE
    if stale.exists():
        stale.unlink()
    files = {"policy": None, "token_prior": None}
    if module is not None:
        buffer = io.BytesIO()
        with quiet_jit():
            torch.jit.save(torch.jit.script(module), buffer)
        write_atomic(out_dir / POLICY_FILE, buffer.getvalue())
        files["policy"] = POLICY_FILE
    elif (out_dir / POLICY_FILE).exists():
        (out_dir / POLICY_FILE).unlink()
    if token_prior is not None:
        buffer = io.BytesIO()
        torch.save(token_prior.detach().to("cpu", torch.float32).contiguous(), buffer)
        write_atomic(out_dir / TOKEN_PRIOR_FILE, buffer.getvalue())
        files["token_prior"] = TOKEN_PRIOR_FILE
    elif (out_dir / TOKEN_PRIOR_FILE).exists():
        (out_dir / TOKEN_PRIOR_FILE).unlink()
    write_text_atomic(out_dir / SPEC_FILE, json.dumps({**spec, "files": files}, indent=2) + "\n")
    return out_dir


def _guard_block(guard: bool | dict, action_mapping: ActionMapping) -> dict:
    """The resolved ``guard`` block of spec.json (True = defaults, False = off, dict = settings)."""
    from policies.guard import resolve_guard

    return resolve_guard(guard, action_mapping, owner="export guard").to_dict()


def _base_spec(kind: str, feature_spec: FeatureSpec, action_mapping: ActionMapping,
               truncation: Truncation | dict | None, model: dict | None, label: str, source: dict | None,
               guard: bool | dict = True, diversity_range: tuple[float, float] | None = None) -> dict:
    model = dict(model or {})
    if model.get("vocab_size") is not None:
        model["vocab_size"] = int(model["vocab_size"])
    if not isinstance(truncation, Truncation):
        truncation = Truncation.from_dict(truncation)
    return {
        "format_version": ARTIFACT_FORMAT_VERSION,
        "kind": kind,
        "label": label,
        "feature_spec": feature_spec.to_dict(),
        "obs_normalization": None,
        "action_mapping": action_mapping.to_dict(),
        "truncation": truncation.to_dict(),
        "model": {"name": model.get("name"), "vocab_size": model.get("vocab_size"),
                  **{k: v for k, v in model.items() if k not in ("name", "vocab_size")}},
        "baseline": None,
        "guard": _guard_block(guard, action_mapping),
        "diversity": _diversity_block(kind, feature_spec, diversity_range),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kelvin_version": _kelvin_version(),
        "source": source or {},
    }


def _diversity_block(kind: str, feature_spec: FeatureSpec, diversity_range: tuple[float, float] | None) -> dict | None:
    """``spec.json`` ``diversity``: the λ range a policy reading the diversity dial was trained on (samplers refuse
    a λ outside it); None for a policy without the dial, or a baseline given no range (baselines ignore λ)."""
    if not feature_spec.include_diversity or (kind == "baseline" and diversity_range is None):
        return None
    if diversity_range is None:
        raise ValueError("this policy reads the diversity dial (features.include_diversity): give "
                         "diversity_range=(low, high), the λ range it was trained on (env.diversity_bounds)")
    lo, hi = float(diversity_range[0]), float(diversity_range[1])
    return {"range": [lo, hi]}


def _check_prior(token_prior: torch.Tensor | None, model: dict | None) -> torch.Tensor | None:
    if token_prior is None:
        return None
    prior = torch.as_tensor(token_prior, dtype=torch.float32).reshape(-1)
    vocab = (model or {}).get("vocab_size")
    if vocab is not None and prior.shape[0] != int(vocab):
        raise ValueError(f"token_prior has {prior.shape[0]} entries but model vocab_size is {vocab}")
    return prior


def export_learned(sb3_policy, out_dir: str | Path, feature_spec: FeatureSpec, action_mapping: ActionMapping,
                   truncation: Truncation | dict | None = None, model: dict | None = None,
                   obs_normalization: dict | None = None, token_prior: torch.Tensor | None = None,
                   label: str = "learned (PPO)", source: dict | None = None, guard: bool | dict = True,
                   diversity_range: tuple[float, float] | None = None, base: TunedBase | None = None) -> Path:
    """Export an SB3 PPO policy: ``policy.pt`` (normalise -> actor -> clip, :func:`actor_module`) and ``spec.json``.

    ``obs_normalization`` is ``{"mean", "var", "clip", "epsilon"}`` (VecNormalize's ``obs_rms`` and
    settings) or None when the policy saw raw observations. ``guard`` (True = the defaults, False =
    off, a dict of settings) is the guard rails the samplers put around the policy by default.
    ``diversity_range``: the λ range it was trained on (required when the feature spec reads the dial).
    ``base``: the tuned base the policy is a residual on; it is part of ``policy.pt`` (every sampler applies it)
    and recorded in ``spec.json`` (``base``).
    """
    obs_space = getattr(sb3_policy, "observation_space", None)
    if obs_space is not None and tuple(obs_space.shape) != (feature_spec.dim,):
        raise ArtifactError(f"the policy observes shape {tuple(obs_space.shape)} but the feature spec has "
                            f"{feature_spec.dim} features ({', '.join(feature_spec.names)}); export it with the "
                            "config it was trained with")
    norm = None
    if obs_normalization is not None:
        norm = {"mean": _finite_list(obs_normalization["mean"], "obs_normalization.mean"),
                "var": _finite_list(obs_normalization["var"], "obs_normalization.var"),
                "clip": float(obs_normalization.get("clip", 10.0)),
                "epsilon": float(obs_normalization.get("epsilon", 1e-8))}
        if len(norm["mean"]) != feature_spec.dim or len(norm["var"]) != feature_spec.dim:
            raise ArtifactError(f"normalisation statistics have {len(norm['mean'])} entries; the feature spec has "
                                f"{feature_spec.dim}")
    if base is not None:
        base.check_serves(feature_spec, diversity_range or (0.0, 0.0), owner="export base")
    module = actor_module(sb3_policy, norm, None if base is None else base.module(feature_spec, action_mapping))
    spec = _base_spec("learned", feature_spec, action_mapping, truncation, model, label, source, guard, diversity_range)
    spec["obs_normalization"] = norm
    spec["base"] = None if base is None else base.to_dict()
    spec["network"] = {"layers": [repr(m) for m in module.net]}
    return _write(Path(out_dir), spec, module, _check_prior(token_prior, model))


def export_baseline(policy: BaselinePolicy, out_dir: str | Path, truncation: Truncation | dict | None = None,
                    model: dict | None = None, token_prior: torch.Tensor | None = None,
                    source: dict | None = None, guard: bool | dict = True,
                    diversity_range: tuple[float, float] | None = None) -> Path:
    """Export a baseline: its ``to_config()`` (parameters only) with its feature spec and action mapping."""
    if not isinstance(policy, BaselinePolicy):
        raise TypeError(f"export_baseline needs a baseline TemperaturePolicy (policies.make_policy('pid', ...)); "
                        f"got {type(policy).__name__}")
    spec = _base_spec("baseline", policy.feature_spec, policy.action_mapping, truncation, model, policy.label, source,
                      guard, diversity_range)
    spec["baseline"] = json.loads(json.dumps(policy.to_config()))  # JSON-safe check (inf -> Infinity)
    return _write(Path(out_dir), spec, None, _check_prior(token_prior, model))


# ---------------------------------------------------------------------- from configs and runs
def _model_info(config, lm) -> dict:
    return {"name": config.model.name, "vocab_size": int(lm.vocab_size), "label": getattr(lm, "name", None)}


def _token_prior(config, lm) -> torch.Tensor | None:
    """The (V,) token prior the training env's featurizer uses for ``config`` (the same function builds both)."""
    if not config.env.token_prior:
        return None
    from anomaly.prior import build_token_prior

    return build_token_prior(lm, config.env.discovered_anomalies)


def _load_lm(config, lm):
    if lm is not None:
        return lm
    from envs.lm import load_causal_lm

    return load_causal_lm(replace(config.model, device="cpu"))


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, lm=None,
               checkpoint: str | Path | None = None, token_prior: torch.Tensor | None | str = "auto",
               guard: bool | dict = True) -> Path:
    """Export the policy of a training run (``run_dir/model.zip`` or ``checkpoint``); returns the export dir.

    ``out_dir`` defaults to ``run_dir/export``. ``lm`` is the run's loaded :class:`envs.lm.CausalLM`
    (vocabulary size and token prior); without it the configured model is loaded on the CPU.
    ``token_prior`` is the (V,) prior the training featurizer used (``train`` passes its env's).
    ``"auto"`` reuses the one ``train`` saved in ``run_dir/export/token_prior.pt``, or, when there is
    none, rebuilds it from the run's config with the current code (which can differ from the
    training's if the vocabulary flags or the discovered anomalous tokens changed since);
    ``spec.json`` records which (``source.token_prior``).
    """
    run = RunDir(run_dir)
    config = run.load_config()
    model_path, norm_path = run.model_for(checkpoint)
    model = load_ppo(model_path)
    norm = None
    if norm_path.is_file():
        norm = normalization_stats(load_vecnormalize(norm_path, step=model.num_timesteps))  # its pair, as --resume
    elif config.train.normalize_obs:
        raise FileNotFoundError(f"{norm_path} is missing, but the run normalised its observations "
                                "(train.normalize_obs): the policy cannot be exported without those statistics")
    lm = _load_lm(config, lm)
    prior_source = "given by the caller"
    if isinstance(token_prior, str):
        if token_prior != "auto":
            raise ValueError(f"token_prior={token_prior!r}: give a (V,) tensor, None, or 'auto'")
        token_prior, prior_source = _run_token_prior(run, config, lm)
    source = {"run_dir": str(run.path.resolve()), "model_file": str(model_path.resolve()),
              "timesteps": int(getattr(model, "num_timesteps", 0)), "token_prior": prior_source}
    return export_learned(model.policy, out_dir if out_dir is not None else run.export_dir,
                          config.env.feature_spec(), config.env.action, config.env.truncation,
                          _model_info(config, lm), norm, token_prior, label="learned (PPO)", source=source, guard=guard,
                          diversity_range=config.env.diversity_bounds, base=run.load_base())


def _run_token_prior(run: RunDir, config, lm) -> tuple[torch.Tensor | None, str]:
    """The training-time token prior of a run if ``train`` saved one, else rebuilt; and where it came from."""
    if not config.env.token_prior:
        return None, "off (env.token_prior: false)"
    saved = run.export_dir / TOKEN_PRIOR_FILE
    if saved.is_file():
        try:
            prior = torch.load(str(saved), map_location="cpu", weights_only=True)
        except Exception:
            prior = None
        if isinstance(prior, torch.Tensor) and prior.shape == (int(lm.vocab_size),):
            return prior.to(torch.float32), f"training env ({saved})"
    return _token_prior(config, lm), "rebuilt from config.yaml with the current code"


def export_baseline_spec(spec: str, out_dir: str | Path, config_path: str | Path = "configs/default.yaml",
                         overrides: list[str] | None = None, lm=None, guard: bool | dict = True) -> Path:
    """Export a baseline spec string (``pid``, ``edt:theta=1.0``) with the env settings of a config file."""
    from kelvin.config_loading import load_config
    from policies.registry import make_policy

    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"config {config_path} is missing; pass --config with the YAML the policy is for")
    config = load_config(config_path, overrides or [])
    policy = make_policy(spec, config.env.feature_spec(), config.env.action)
    lm = _load_lm(config, lm)
    return export_baseline(policy, out_dir, config.env.truncation, _model_info(config, lm), _token_prior(config, lm),
                           source={"config": str(config_path.resolve()), "spec": spec}, guard=guard,
                           diversity_range=config.env.diversity_bounds if config.env.features.include_diversity
                           else None)


# ---------------------------------------------------------------------- CLI
def parse_guard_settings(items: list[str]) -> dict:
    """``["max_delta=0.3", "safe_range=0.2,0.6", "anomaly_threshold=none"]`` -> guard settings."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise ValueError(f"--guard {item!r}: expected KEY=VALUE, e.g. --guard max_delta=0.3")
        try:
            if value.lower() in ("none", "null", "off"):
                out[key] = None
            elif key == "safe_range":
                out[key] = [float(v) for v in value.split(",")]
            elif key == "enabled":
                out[key] = {"true": True, "false": False}[value.lower()]
            elif key == "hold":
                out[key] = int(float(value)) if float(value).is_integer() else float(value)  # tokens
            else:
                out[key] = float(value)
        except (ValueError, KeyError):
            raise ValueError(f"--guard {item!r}: {value!r} is not a valid value for {key} (a number; safe_range "
                             "takes two: lo,hi; 'none' switches a rule off)") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m kelvin.export``."""
    parser = argparse.ArgumentParser(
        prog="python -m kelvin.export",
        description="Export a trained run, or a baseline spec, into a directory samplers load without SB3.")
    parser.add_argument("source", help="a run directory (holds model.zip, config.yaml) or a baseline spec "
                                       "such as 'pid' or 'edt:theta=1.0'")
    parser.add_argument("out_dir", help="export directory to write (spec.json, policy.pt, token_prior.pt)")
    parser.add_argument("--config", default=None,
                        help="baselines: the YAML whose env block gives features, action mapping and truncation "
                             "(default: configs/default.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                        help="baselines: override a config value, e.g. --set env.truncation.top_k=20 (repeatable)")
    parser.add_argument("--checkpoint", default=None, help="runs: export checkpoints/step_N.zip instead of model.zip")
    parser.add_argument("--guard", dest="guard", action="append", default=[], metavar="KEY=VALUE",
                        help="guard rail setting written to spec.json, e.g. --guard max_delta=0.3 --guard "
                             "safe_range=0.2,0.6 (repeatable; keys: t_min, t_max, max_delta, safe_range, "
                             "fallback_temperature, anomaly_threshold, hold; 'none' switches one rule off)")
    parser.add_argument("--no-guard", action="store_true",
                        help="export with the guard rails off (samplers then apply the policy's temperatures as "
                             "they are, unless the caller passes guard=True)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = Path(args.source)

    def body() -> int:
        _check_out_dir(args.out_dir)  # before anything loads
        guard = False if args.no_guard else parse_guard_settings(args.guard) or True
        if source.is_dir():
            if args.config or args.overrides:
                raise ValueError("--config/--set apply to baselines; a run is exported with its own config.yaml")
            out = export_run(source, args.out_dir, checkpoint=args.checkpoint, guard=guard)
        else:
            if os.sep in args.source or args.source.endswith((".zip", ".yaml")):
                if source.exists():
                    raise NotADirectoryError(f"{args.source} is a file, not a run directory (one holding model.zip "
                                             "and config.yaml): give the run's directory")
                raise FileNotFoundError(f"no run directory at {args.source}")
            if args.checkpoint:
                raise ValueError("--checkpoint applies to run directories, not to baseline specs")
            out = export_baseline_spec(args.source, args.out_dir, args.config or "configs/default.yaml",
                                       args.overrides, guard=guard)
        spec: dict[str, Any] = json.loads((out / SPEC_FILE).read_text())
        what = spec["baseline"]["name"] if spec["kind"] == "baseline" else "learned policy"
        print(f"exported {what} ({spec['label']}) -> {out}")
        return 0

    from kelvin.cli import run_cli

    return run_cli(body, debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
