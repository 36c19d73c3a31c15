"""PPO training of a temperature policy on the batched environment, with TensorBoard monitoring.

``train(config, run_dir)`` writes a run directory (its files: :mod:`kelvin.rundir`), including the
policy exported for samplers (``export/``, :mod:`kelvin.export`).

TensorBoard tags: ``rollout/*`` (SB3's episode stats plus temperature mean/std/histogram, negative
and near-greedy fractions, anomaly rate), ``reward/*`` (per-token components, mean per step),
``episode/*`` (every component summed per episode), ``perf/*`` (tokens/s, share of time in the
model vs the env), ``train/*`` (PPO's losses), ``validation/*`` (learned vs best fixed
temperature on validation prompts, same prompts and seeds), ``hparams``, and text samples.

Validation runs the learned policy as the samplers do: :func:`kelvin.export.learned_policy` (the
exported actor module, VecNormalize's statistics applied in torch), through
:func:`kelvin.rollout.collect_episodes`.
"""

from __future__ import annotations

import json
import math
import shlex
import signal
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HParam, TensorBoardOutputFormat
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from envs.distributed import make_vec_env
from envs.generation import TemperatureVecEnv
from envs.lm import load_causal_lm
from envs.rewards import EPISODE_COMPONENTS, STEP_COMPONENTS
from kelvin.config import KelvinConfig, load_config
from kelvin.export import export_run, learned_policy
from kelvin.rollout import collect_episodes
from kelvin.rundir import RunDir, RunDirError, load_ppo, load_vecnormalize
from policies.registry import make_policy

__all__ = ["train", "CheckpointError", "summarize_episodes"]

TB_NAME = "PPO"


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be loaded; the message says which file and what to do."""


def summarize_episodes(episodes: list[dict]) -> dict[str, float]:
    """Mean return, length and temperature statistics of a list of end-of-episode infos."""
    if not episodes:
        return {}
    temps = np.concatenate([e["temperatures"] for e in episodes]) if episodes else np.zeros(0)
    out = {
        "reward": float(np.mean([e["episode"]["r"] for e in episodes])),
        "length": float(np.mean([e["episode"]["l"] for e in episodes])),
        "temperature_mean": float(temps.mean()) if temps.size else 0.0,
        "temperature_std": float(temps.std()) if temps.size else 0.0,
        "negative_fraction": float((temps < 0).mean()) if temps.size else 0.0,
    }
    for k in STEP_COMPONENTS + EPISODE_COMPONENTS:
        out[k] = float(np.mean([e["reward_components"][k] for e in episodes]))
    answered = [e["correct"] for e in episodes if e.get("answerable")]
    out["accuracy"] = float(np.mean(answered)) if answered else float("nan")
    out["answerable_episodes"] = len(answered)
    return out


class KelvinCallback(BaseCallback):
    """Monitoring, validation and checkpoints (one callback, so rollouts are read once)."""

    def __init__(self, config: KelvinConfig, run: RunDir, train_env: VecEnv,
                 vec_normalize: VecNormalize | None, val_env: TemperatureVecEnv):
        super().__init__(verbose=0)
        self.stop_requested = False
        self.config = config
        self.run = run
        self.train_env = train_env
        self.vec_normalize = vec_normalize
        self.val_env = val_env
        self.n_rollouts = 0
        self._fixed_cache: dict[float, dict] | None = None
        self._last_checkpoint = 0
        self._reset_accumulators()
        self._timings = dict(train_env.timings)
        self._t_rollout = time.perf_counter()
        self._t_rollout_end: float | None = None
        self.perf = {"rollout_s": 0.0, "validation_s": 0.0, "ppo_s": 0.0}  # wall time by phase
        self.last_validation: dict | None = None

    # ------------------------------------------------------------------ helpers
    def _reset_accumulators(self):
        self._temps: list[np.ndarray] = []
        self._step_sums = {k: 0.0 for k in STEP_COMPONENTS}
        self._n_steps = 0
        self._episodes: list[dict] = []

    def _writer(self):
        for fmt in self.logger.output_formats:
            if isinstance(fmt, TensorBoardOutputFormat):
                return fmt.writer
        return None

    def _on_training_start(self) -> None:
        self._last_checkpoint = self.model.num_timesteps  # a resumed run counts from where it stopped
        if self.model.num_timesteps == 0:
            env = self.config.env
            hparams = {"env/batch_size": env.batch_size, "env/workers": env.workers,
                       "env/max_new_tokens": env.max_new_tokens,
                       "env/action/kind": env.action.kind, "env/action/t_min": env.action.t_min,
                       "env/action/t_max": env.action.t_max, "train/total_timesteps": self.config.train.total_timesteps}
            for k, v in self.config.ppo.kwargs().items():
                hparams[f"ppo/{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
            for k, v in self.config.reward.weights().items():
                hparams[f"reward/{k}"] = v
            self.logger.record("hparams", HParam(hparams, {"validation/learned_reward": 0.0, "rollout/ep_rew_mean": 0.0}),
                               exclude=("stdout", "log", "json", "csv"))
        self._t_rollout = time.perf_counter()
        self._timings = dict(self.train_env.timings)

    def _on_rollout_start(self) -> None:
        now = time.perf_counter()
        if self._t_rollout_end is not None:  # SB3 ran the PPO update since the last rollout ended
            self.perf["ppo_s"] += now - self._t_rollout_end
        self._t_rollout = now

    def _on_step(self) -> bool:
        all_infos = self.locals["infos"]
        self._episodes.extend(info for info in all_infos if "episode" in info)  # waiting rows end episodes too
        infos = [info for info in all_infos if info["active"]]  # rows that drew a token at this step
        temps = np.fromiter((info["temperature"] for info in infos), dtype=np.float32, count=len(infos))
        self._temps.append(temps)
        for info in infos:
            comps = info["reward_components"]
            for k in STEP_COMPONENTS:
                self._step_sums[k] += comps[k]
        self._n_steps += len(infos)
        every = self.config.train.checkpoint_every
        if every and self.model.num_timesteps - self._last_checkpoint >= every:
            self._save_checkpoint()
        return not self.stop_requested  # False ends model.learn after this step (Ctrl-C, see GracefulStop)

    def _save_checkpoint(self) -> None:
        self.run.checkpoint_dir.mkdir(exist_ok=True)
        step = self.model.num_timesteps
        model_file, norm_file = self.run.checkpoint_files(step)
        self.model.save(model_file)
        if self.vec_normalize is not None:
            self.vec_normalize.save(str(norm_file))
        self._last_checkpoint = step

    def _on_rollout_end(self) -> None:
        self.n_rollouts += 1
        rec = self.logger.record
        temps = np.concatenate(self._temps) if self._temps else np.zeros(1, dtype=np.float32)
        rec("rollout/temperature_mean", float(temps.mean()))
        rec("rollout/temperature_std", float(temps.std()))
        rec("rollout/temperature_hist", torch.as_tensor(temps), exclude=("stdout", "log", "json", "csv"))
        rec("rollout/negative_fraction", float((temps < 0).mean()))
        rec("rollout/near_greedy_fraction", float((np.abs(temps) < 0.05).mean()))
        n = max(self._n_steps, 1)
        for k, v in self._step_sums.items():
            rec(f"reward/{k}", v / n)
        rec("rollout/anomaly_rate", -self._step_sums["anomaly"] / n)
        if self._episodes:
            for k in STEP_COMPONENTS + EPISODE_COMPONENTS:
                rec(f"episode/{k}", float(np.mean([e["reward_components"][k] for e in self._episodes])))
            rec("episode/truncated_fraction", float(np.mean([e["TimeLimit.truncated"] for e in self._episodes])))
            answered = [e["correct"] for e in self._episodes if e["answerable"]]
            if answered:
                rec("episode/accuracy", float(np.mean(answered)))
        t = self.train_env.timings
        model_s = t["model_s"] - self._timings["model_s"]
        env_s = t["env_s"] - self._timings["env_s"]
        tokens = t["tokens"] - self._timings["tokens"]
        waiting = t["waiting_rows"] - self._timings["waiting_rows"]
        wall = time.perf_counter() - self._t_rollout
        self.perf["rollout_s"] += wall
        rec("perf/tokens_per_s", tokens / wall if wall > 0 else 0.0)
        rec("perf/waiting_share", waiting / max(tokens + waiting, 1))  # row-steps spent waiting for a group
        rec("perf/model_share", model_s / wall if wall > 0 else 0.0)
        rec("perf/env_share", env_s / wall if wall > 0 else 0.0)
        rec("perf/model_vs_env", model_s / env_s if env_s > 0 else 0.0)
        self._timings = dict(t)
        self._reset_accumulators()
        every = self.config.train.validate_every
        if every and self.n_rollouts % every == 0:
            self.validate()
        self._t_rollout_end = time.perf_counter()

    # ------------------------------------------------------------------ validation
    def _policy(self):
        """The current actor as the samplers run it (a copy: training goes on)."""
        return learned_policy(self.model, self.vec_normalize, self.val_env.feature_spec, self.val_env.action_mapping)

    def _run(self, policy) -> dict:
        tc = self.config.train
        n_groups = self.val_env.num_envs // self.config.env.group_size
        per_row = max(1, math.ceil(tc.validation_prompts / n_groups))
        result = collect_episodes(self.val_env, policy, episodes_per_row=per_row, seed=tc.seed + 10_007)
        result["summary"] = summarize_episodes(result["episodes"])
        return result

    def validate(self) -> dict:
        """Learned policy vs every fixed temperature on the validation prompts (same prompts, same seeds)."""
        t0 = time.perf_counter()
        try:
            return self._validate()
        finally:
            self.perf["validation_s"] += time.perf_counter() - t0

    def _validate(self) -> dict:
        tc = self.config.train
        spec, mapping = self.val_env.feature_spec, self.val_env.action_mapping
        if self._fixed_cache is None:  # fixed baselines do not change during training: run them once
            self._fixed_cache = {}
            for t in tc.validation_temperatures:
                self._fixed_cache[float(t)] = self._run(make_policy(f"fixed:{t}", spec, mapping))
        learned = self._run(self._policy())
        fixed = {t: r["summary"]["reward"] for t, r in self._fixed_cache.items()}
        best_t = max(fixed, key=fixed.get)
        rec = self.logger.record
        lr = learned["summary"]
        rec("validation/learned_reward", lr["reward"])
        rec("validation/best_fixed_reward", fixed[best_t])
        rec("validation/best_fixed_temperature", best_t)
        rec("validation/margin_vs_best_fixed", lr["reward"] - fixed[best_t])
        rec("validation/learned_temperature_mean", lr["temperature_mean"])
        rec("validation/learned_temperature_std", lr["temperature_std"])
        for t, v in fixed.items():
            rec(f"validation/fixed_{t:g}_reward", v)
        writer = self._writer()
        if writer is not None and tc.samples_to_log:
            lines = []
            for e in learned["episodes"][: tc.samples_to_log]:
                trace = ", ".join(f"{x:.2f}" for x in e["temperatures"][:64])
                lines.append(f"**{e['prompt_id']}** ({e['category']}), return {e['episode']['r']:.2f}\n\n"
                             f"    {e['completion']!r}\n\ntemperatures: [{trace}]")
            writer.add_text("validation/samples", "\n\n---\n\n".join(lines), self.model.num_timesteps)
        self.last_validation = {
            "step": int(self.model.num_timesteps),
            "learned": lr,
            "fixed": {f"{t:g}": r["summary"] for t, r in self._fixed_cache.items()},
            "best_fixed_temperature": best_t,
            "best_fixed_reward": fixed[best_t],
            "margin_vs_best_fixed": lr["reward"] - fixed[best_t],
            "episodes_per_policy": len(learned["episodes"]),
        }
        self.run.validation_file.write_text(json.dumps(self.last_validation, indent=2))
        return self.last_validation


def _load_checkpoint(run: RunDir, env, config: KelvinConfig):
    """The run's newest model and normaliser, attached to ``env`` to go on training."""
    model_path, norm_path = run.latest()
    try:
        vec = load_vecnormalize(norm_path, env) if norm_path is not None else None
        model = load_ppo(model_path, env=vec or env, device=config.train.policy_device)
    except RunDirError as exc:
        raise CheckpointError(f"cannot load checkpoint {model_path}: {exc}. Delete it to resume from the previous "
                              "checkpoint, or start a new run without --resume") from None
    return model, vec


def _export(run: RunDir, env: TemperatureVecEnv) -> Path | None:
    """Write ``run_dir/export/`` for the samplers; a failure warns and leaves the saved model alone."""
    try:
        return export_run(run.path, run.export_dir, lm=env.lm, token_prior=env.core.featurizer.token_prior)
    except Exception as exc:  # the model is saved already: never lose a run to an export problem
        stale = run.export_dir / "spec.json"
        if stale.is_file():  # an export of an earlier save must not pass for this model
            stale.unlink()
        warnings.warn(f"could not export the policy to {run.export_dir} ({type(exc).__name__}: {exc}); the model "
                      f"is saved in {run.model_file}: export it later with "
                      f"`python -m kelvin.export {run.path} OUT_DIR`", RuntimeWarning, stacklevel=2)
        return None


class GracefulStop:
    """Ctrl-C during ``model.learn``: the first one asks the callback to stop after the current env step
    (SB3 then leaves ``learn`` cleanly and the model is saved); a second one raises KeyboardInterrupt
    at once (also saved). A KeyboardInterrupt raised at an arbitrary point can land inside a
    ``__del__`` or a library's cleanup, where Python only prints it and goes on training: the flag
    cannot be lost that way. Outside the main thread (no signal handlers there) it does nothing.
    """

    def __init__(self, callback: "KelvinCallback"):
        self.callback = callback
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.callback.stop_requested:
            raise KeyboardInterrupt
        self.callback.stop_requested = True
        print("\nCtrl-C: stopping after this step and saving the model (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def train(config: KelvinConfig, run_dir: str | Path, resume: bool = False, command: str | None = None) -> dict:
    """Train (or resume) a PPO temperature policy; returns a summary with the last validation."""
    run = RunDir(run_dir)
    run.path.mkdir(parents=True, exist_ok=True)
    config.dump(run.config_file)
    with open(run.command_file, "a") as fh:
        fh.write((command or " ".join(shlex.quote(a) for a in sys.argv)) + "\n")
    tc = config.train
    torch.manual_seed(tc.seed)
    lm = load_causal_lm(config.model)
    # env.workers > 1: rollouts on Ray workers with a model copy each; validation stays in this process
    env = make_vec_env(replace(config.env, seed=tc.seed), lm=lm, reward=config.reward, model=config.model)
    val_env = TemperatureVecEnv(replace(config.env, split=tc.validation_split, seed=tc.seed + 1), lm=lm,
                                reward=replace(config.reward, group_baseline=False))  # absolute returns
    if resume:
        model, vec = _load_checkpoint(run, env, config)
        if vec is not None:
            vec.training = True
    else:
        vec = None
        if tc.normalize_obs or tc.normalize_reward:
            vec = VecNormalize(env, norm_obs=tc.normalize_obs, norm_reward=tc.normalize_reward, gamma=config.ppo.gamma)
        model = PPO("MlpPolicy", vec or env, seed=tc.seed, tensorboard_log=str(run.tensorboard_dir),
                    device=tc.policy_device, verbose=0, **config.ppo.kwargs())
    model.tensorboard_log = str(run.tensorboard_dir)
    callback = KelvinCallback(config, run, env, vec, val_env)
    remaining = tc.total_timesteps - model.num_timesteps
    interrupted = False
    t0 = time.perf_counter()
    try:
        if remaining > 0:
            with GracefulStop(callback):
                model.learn(total_timesteps=remaining, callback=callback, tb_log_name=TB_NAME,
                            reset_num_timesteps=not resume, progress_bar=tc.progress_bar)
        interrupted = callback.stop_requested
    except KeyboardInterrupt:
        interrupted = True
    finally:
        model.save(run.model_file)
        if vec is not None:
            vec.save(str(run.normalizer_file))
    export_dir = _export(run, val_env)  # in-process: it holds the model the export is checked on
    validation = None
    if not interrupted:
        validation = callback.validate()
        callback.logger.dump(model.num_timesteps)
    env.close()
    val_env.close()
    wall = time.perf_counter() - t0
    timings = env.timings
    perf = {"tokens": timings["tokens"], "wall_s": wall, "tokens_per_s": timings["tokens"] / wall if wall > 0 else 0.0,
            "model_share": timings["model_s"] / wall, "env_share": timings["env_s"] / wall,
            "ppo_share": callback.perf["ppo_s"] / wall, "validation_share": callback.perf["validation_s"] / wall,
            "waiting_share": timings["waiting_rows"] / max(timings["tokens"] + timings["waiting_rows"], 1)}
    summary = {"run_dir": str(run.path), "timesteps": int(model.num_timesteps), "interrupted": interrupted,
               "wall_s": wall, "perf": perf, "validation": validation,
               "export": None if export_dir is None else str(export_dir)}
    run.summary_file.write_text(json.dumps(summary, indent=2, default=float))
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line of ``train.py``."""
    import argparse

    parser = argparse.ArgumentParser(description="Train a temperature policy with PPO (Kelvin).")
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--run-dir", default=None, help="output directory (default: runs/<config name>)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its last checkpoint (its config.yaml is used)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                        help="override a config value, e.g. --set ppo.learning_rate=1e-4 (repeatable)")
    args = parser.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    try:
        if args.resume:
            run = RunDir(args.resume)
            config = run.load_config(args.overrides)
            summary = train(config, run.path, resume=True, command=command)
        else:
            config = load_config(args.config, args.overrides)
            run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
            summary = train(config, run_dir, resume=False, command=command)
    except (ValueError, FileNotFoundError) as exc:  # ConfigError, CheckpointError, RunDirError: one line each
        print(f"error: {exc}", file=sys.stderr)
        return 2
    v = summary.get("validation")
    status = "interrupted (model saved)" if summary["interrupted"] else "done"
    print(f"{status}: {summary['timesteps']} steps in {summary['wall_s']:.0f} s -> {summary['run_dir']}")
    if v:
        print(f"validation reward: learned {v['learned']['reward']:.3f} vs best fixed T={v['best_fixed_temperature']:g} "
              f"{v['best_fixed_reward']:.3f} (margin {v['margin_vs_best_fixed']:+.3f})")
    return 130 if summary["interrupted"] else 0
