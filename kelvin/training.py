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

**Stopping and resuming lose no learning.** After every PPO update the callback takes a
:class:`~kelvin.rundir.Snapshot` of the model and its normaliser (SB3 runs ``train()`` between
``on_rollout_end`` and the next ``on_rollout_start``, and after the last rollout before
``on_training_end``: those two hooks see each completed update), and a checkpoint, when due, is that
snapshot written to disk: it holds the update of the rollout it is named after. SIGINT (Ctrl-C) and
SIGTERM (schedulers, preemption) are handled alike (:class:`TrainingStop`): the rollout stops after
the current env step, a validation in progress stops after its current step, a PPO update in progress
finishes (a fraction of a second), and the last snapshot is saved: the steps of an unfinished rollout,
which no update has learned from, are the only thing dropped, and ``--resume`` collects them again.
The exit code is 128 + the signal number (130, 143). A second signal stops at once (the last snapshot
is still saved).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
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
from envs.lm import load_causal_lm
from envs.residual import ResidualActionVecEnv
from envs.rewards import EPISODE_COMPONENTS, STEP_COMPONENTS
from kelvin.config import KelvinConfig, load_config, model_setting_changes
from kelvin.export import export_run, learned_policy
from kelvin.rundir import (RunDir, RunDirError, SaveError, Snapshot, load_ppo, load_vecnormalize, write_failure,
                           write_text_atomic)
from kelvin.tuning import EpisodeCache, tune_base
from kelvin.validation import Validation, margin_text, summarize_episodes
from policies.tuned_base import TunedBase, TunedBasePolicy

__all__ = ["train", "build_parser", "CheckpointError", "TrainingStop", "summarize_episodes"]

TB_NAME = "PPO"


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be loaded; the message says which file and what to do."""


class _ValidationStopped(Exception):
    """A stop was requested while validating: the validation is abandoned."""


class TrainingStop:
    """SIGINT (Ctrl-C) and SIGTERM handled alike while a run trains: the first one asks for a stop
    (``requested``; the callback ends the rollout after the current env step, validation after its
    current step), a second one raises KeyboardInterrupt at once, except while the run saves
    (:meth:`saving`). A KeyboardInterrupt raised at an arbitrary point can land inside a ``__del__`` or a
    library's cleanup, where Python only prints it and goes on: the flag cannot be lost that way.
    Outside the main thread (no signal handlers there) it does nothing.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._saving = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        """``SIGINT`` or ``SIGTERM`` once a stop was requested."""
        return None if self.signum is None else signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 128 + its number (130, 143)."""
        return 128 + int(self.signum or 0)

    def check(self) -> None:
        """Raise :class:`_ValidationStopped` when a stop was requested (called after each validation step)."""
        if self.requested:
            raise _ValidationStopped

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 (a signal handler's signature)
        key = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self.requested:
            if self._saving:
                print(f"\n{key}: saving the model, one moment", file=sys.stderr, flush=True)
                return
            raise KeyboardInterrupt(signal.Signals(signum).name)  # run_cli exits 128 + that signal's number
        self.signum = signum
        print(f"\n{key}: stopping after this step and saving the model ({key} again to stop at once)",
              file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def saving(self):
        """A block (``with stop.saving():``) that a second signal does not cut short."""
        self._saving = True
        try:
            yield
        finally:
            self._saving = False

    def __enter__(self) -> "TrainingStop":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


class KelvinCallback(BaseCallback):
    """Monitoring, validation and checkpoints (one callback, so rollouts are read once).

    ``snapshot`` is the state the last completed PPO update left (:class:`~kelvin.rundir.Snapshot`):
    what the run saves however it ends.
    """

    def __init__(self, config: KelvinConfig, run: RunDir, train_env: VecEnv,
                 vec_normalize: VecNormalize | None, validation: Validation, base: TunedBase | None,
                 stop: TrainingStop, snapshot: Snapshot):
        super().__init__(verbose=0)
        self.stop = stop
        self.snapshot = snapshot
        self._updating = False  # True between a rollout's end and the end of its PPO update
        self.config = config
        self.run = run
        self.train_env = train_env
        self.vec_normalize = vec_normalize
        self.validation = validation
        self.base = base
        self.n_rollouts = 0
        self._last_checkpoint = 0
        self._reset_accumulators()
        self._timings = dict(train_env.timings)
        self._t_rollout = time.perf_counter()
        self._t_rollout_end: float | None = None
        self.perf = {"rollout_s": 0.0, "validation_s": 0.0, "ppo_s": 0.0}  # wall time by phase
        self.last_validation: dict | None = None
        self.history: list[dict] = _validation_history(run)

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
        if self._updating:
            self._update_done()
        self._t_rollout = time.perf_counter()

    def _on_training_end(self) -> None:
        if self._updating:  # learn() ran the last rollout's update, then ended
            self._update_done()

    def _update_done(self) -> None:
        """A PPO update has completed: take the snapshot, and write it as a checkpoint when one is due."""
        self._updating = False
        self.snapshot = Snapshot.take(self.model, self.vec_normalize)
        every = self.config.train.checkpoint_every
        if every and self.snapshot.step - self._last_checkpoint >= every:
            self.snapshot.write(*self.run.checkpoint_files(self.snapshot.step))
            self._last_checkpoint = self.snapshot.step

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
        return not self.stop.requested  # False ends model.learn after this step (see TrainingStop)

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
        last = self.model.num_timesteps >= self.model._total_timesteps  # the validation after training covers it
        if every and self.n_rollouts % every == 0 and not last and not self.stop.requested:
            self.validate(pending=True)
        self._updating = True  # SB3 runs this rollout's PPO update next
        self._t_rollout_end = time.perf_counter()

    # ------------------------------------------------------------------ validation
    def _policy(self):
        """The current actor as the samplers run it (a copy: training goes on), with the run's base."""
        v = self.validation
        return learned_policy(self.model, self.vec_normalize, v.feature_spec, v.action_mapping, base=self.base)

    def validate(self, pending: bool = False) -> dict | None:
        """Learned policy vs every fixed temperature and vs the base on the validation prompts (same prompts, λ
        draws and seeds); None when a stop request ended it. ``pending``: the rollout just collected has not been
        learned from yet (a periodic validation at a rollout's end)."""
        t0 = time.perf_counter()
        try:
            return self._validate(pending)
        except _ValidationStopped:
            print("validation stopped", file=sys.stderr, flush=True)
            return None
        finally:
            self.perf["validation_s"] += time.perf_counter() - t0

    def _validate(self, pending: bool) -> dict:
        tc = self.config.train
        episodes = self.validation.episodes(self._policy())
        v = self.validation.compare(episodes, self.model.num_timesteps)
        rec = self.logger.record
        rec("validation/learned_reward", v["learned"]["reward"])
        rec("validation/best_fixed_reward", v["best_fixed_reward"])
        rec("validation/best_fixed_temperature", v["best_fixed_temperature"])
        margins = {"best_fixed": v["margin_vs_best_fixed"], "base": v["margin_vs_base"]}
        for name, m in margins.items():
            if m is not None:
                rec(f"validation/margin_vs_{name}", m["mean"])
                rec(f"validation/margin_vs_{name}_low", m["low"])
                rec(f"validation/margin_vs_{name}_high", m["high"])
        if v["base"] is not None:
            rec("validation/base_reward", v["base"]["reward"])
        rec("validation/learned_temperature_mean", v["learned"]["temperature_mean"])
        rec("validation/learned_temperature_std", v["learned"]["temperature_std"])
        rec("validation/learned_accuracy", v["learned"]["accuracy"])
        for t, summary in v["fixed"].items():
            rec(f"validation/fixed_{t}_reward", summary["reward"])
        writer = self._writer()
        if writer is not None and tc.samples_to_log:
            lines = []
            for e in episodes[: tc.samples_to_log]:
                trace = ", ".join(f"{x:.2f}" for x in e["temperatures"][:64])
                lines.append(f"**{e['prompt_id']}** ({e['category']}), return {e['episode']['r']:.2f}\n\n"
                             f"    {e['completion']!r}\n\ntemperatures: [{trace}]")
            writer.add_text("validation/samples", "\n\n---\n\n".join(lines), self.model.num_timesteps)
        self.history.append({"step": v["step"], "updates": _updates(self.config, v["step"]) - int(pending),
                             "learned_reward": v["learned"]["reward"], "margin_vs_best_fixed": v["margin_vs_best_fixed"],
                             "margin_vs_base": v["margin_vs_base"]})
        v["history"] = self.history  # the margins against the update number, this run's resumes included
        self.last_validation = v
        write_text_atomic(self.run.validation_file, json.dumps(v, indent=2))
        return v


def _updates(config: KelvinConfig, step: int) -> int:
    """PPO updates behind ``step`` env steps: one per rollout (SB3's ``_n_updates`` counts epochs, fewer with
    ``target_kl``). At a periodic validation, the rollout just collected is not yet learned from."""
    return int(step) // (config.ppo.n_steps * config.env.batch_size * config.env.workers)


def _validation_history(run: RunDir) -> list[dict]:
    """The validation history of an earlier part of the run (``--resume``), or none."""
    try:
        return list(json.loads(run.validation_file.read_text()).get("history", []))
    except (OSError, ValueError, AttributeError):
        return []


def _tuned_base(config: KelvinConfig, run: RunDir, lm, cache: EpisodeCache, stop: TrainingStop,
                trained: bool) -> tuple[TunedBase | None, dict | None]:
    """The base of the run's residual policy and its tuning record (None when the base was read from the run).

    A run that already has a model keeps the base it was trained on (``base.json``; a run without one was
    trained without a base); otherwise ``policy.base`` is tuned now (:func:`kelvin.tuning.tune_base`)."""
    if trained or run.base_file.is_file():
        base = run.load_base()
        if base is not None:
            base.check_serves(config.env.feature_spec(), config.env.diversity_bounds)
        return base, None
    if config.policy.base == "none":
        return None, None
    base, tuning = tune_base(config, lm, cache, stop.check)
    base.check_serves(config.env.feature_spec(), config.env.diversity_bounds)
    print(f"tuned base ({base.kind}) on {tuning['prompts']} train prompts x {len(tuning['temperatures'])} temperatures: "
          + ("cached" if tuning["cached"] else f"{tuning['wall_s']:.0f} s"), file=sys.stderr)
    return base, tuning


def _resume(config: KelvinConfig, env: VecEnv, point) -> tuple[PPO, VecNormalize | None]:
    """The model and normaliser of ``point`` (:meth:`RunDir.resume_point`), attached to ``env`` to go on training."""
    try:
        vec = load_vecnormalize(point.norm_file, env, step=point.step) if point.norm_file is not None else None
        model = load_ppo(point.model_file, env=vec or env, device=config.train.policy_device)
    except RunDirError as exc:
        raise CheckpointError(f"cannot continue from {point.model_file}: {exc}") from None
    if vec is not None:
        vec.training = True
    return model, vec


def _export(run: RunDir, env) -> Path | None:
    """Write ``run_dir/export/`` for the samplers; a failure warns and leaves the saved model alone."""
    try:
        return export_run(run.path, run.export_dir, lm=env.lm, token_prior=env.core.featurizer.token_prior)
    except (Exception, KeyboardInterrupt) as exc:  # the model is saved already: never lose a run to an export problem
        stale = run.export_dir / "spec.json"
        if stale.is_file():  # an export of an earlier save must not pass for this model
            stale.unlink()
        warnings.warn(f"could not export the policy to {run.export_dir} ({type(exc).__name__}: {exc}); the model "
                      f"is saved in {run.model_file}: export it later with "
                      f"`python -m kelvin.export {run.path} OUT_DIR`", RuntimeWarning, stacklevel=2)
        return None


def _start(config: KelvinConfig, run: RunDir, resume: bool, overwrite: bool, held: contextlib.ExitStack):
    """Take the run's lock (into ``held``) and claim (new run) or check (resume) the run directory before anything
    heavy loads; the resume point."""
    tc = config.train
    if not resume:
        run.check_writable()
        held.enter_context(run.lock())
        run.claim(overwrite)
        return None
    run.require()
    run.check_writable()
    held.enter_context(run.lock())
    changes = model_setting_changes(run.load_config(), config)  # checked before config.yaml is touched
    if changes:
        raise RunDirError(f"--resume {run.path}: the saved model is bound to settings this config changes "
                          f"({'; '.join(changes)}); drop those --set overrides (nothing was changed), or train a new "
                          "run with them")
    run.remove_stale_temps()
    point = run.resume_point(normalized=tc.normalize_obs or tc.normalize_reward, device=tc.policy_device)
    if point is not None:
        saved = tuple(load_ppo(point.model_file, device=tc.policy_device).observation_space.shape)
        if saved != (config.env.feature_spec().dim,):
            raise RunDirError(f"--resume {run.path}: {point.model_file.name} takes observations of shape {saved}, "
                              f"this config gives {config.env.feature_spec().dim} features; its config.yaml does not "
                              "describe the model: restore the config.yaml it was trained with")
    return point


@contextlib.contextmanager
def _event_writer_errors_in_main_thread():
    """TensorBoard writes its event files on a thread of its own; an error there (a full or read-only disk) is
    raised again in the training thread at its next write, where the run stops and says what it kept. The thread's
    own traceback would only bury that line: it is not printed."""
    previous = threading.excepthook

    def hook(args):
        if type(args.thread).__name__ != "_AsyncWriterThread":
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


def _newest_loadable(run: RunDir, config: KelvinConfig) -> str:
    """Where ``--resume`` would continue from, in words (for the messages of a run that could not save)."""
    tc = config.train
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            point = run.resume_point(normalized=tc.normalize_obs or tc.normalize_reward, device=tc.policy_device)
    except RunDirError:
        point = None
    if point is None:
        return f"no model of {run.path} loads: --resume {run.path} would start again from step 0"
    return (f"the newest model that loads is {point.model_file} (step {point.step}): continue from it with --resume "
            f"{run.path}")


def train(config: KelvinConfig, run_dir: str | Path, resume: bool = False, command: str | None = None,
          overwrite: bool = False) -> dict:
    """Train (or resume) a PPO temperature policy; returns a summary with the last validation.

    A new run needs an empty (or new) ``run_dir``; ``overwrite`` replaces an earlier run there. ``resume``
    continues from the newest model of the run that loads (a finished run returns at once with
    ``summary["resumed_finished"]``; raise ``train.total_timesteps`` to go on). ``summary["completed"]``: every
    ``train.total_timesteps`` step is trained; ``summary["saved"]``: this call wrote ``model.zip``. The run's lock
    (:meth:`RunDir.lock`) is held throughout: a second writer is refused. Raises :class:`RunDirError` (a
    directory that cannot be used, or a save that failed: the message says what is kept) and
    :class:`CheckpointError` (nothing to continue from).
    """
    config.check_training()
    run = RunDir(run_dir)
    tc = config.train
    t0 = time.perf_counter()
    with TrainingStop() as stop, contextlib.ExitStack() as held:  # held: the run's lock, released at the end
        held.enter_context(_event_writer_errors_in_main_thread())
        point = _start(config, run, resume, overwrite, held)
        if point is not None and point.step >= tc.total_timesteps:
            return {"run_dir": str(run.path), "timesteps": point.step, "resumed_finished": True, "completed": True,
                    "saved": False, "interrupted": False, "signal": None, "wall_s": 0.0, "validation": None,
                    "export": None}
        torch.manual_seed(tc.seed)
        lm = load_causal_lm(config.model)
        # env.workers > 1: rollouts on Ray workers with a model copy each; validation stays in this process
        env = make_vec_env(replace(config.env, seed=tc.seed), lm=lm, reward=config.reward, model=config.model)
        cache = EpisodeCache(run.cache_dir, EpisodeCache.default_dir(config.model))
        try:
            base, tuning = _tuned_base(config, run, lm, cache, stop, trained=point is not None)
            spec, mapping = config.env.feature_spec(), config.env.action
            validator = Validation(config, lm, None if base is None else TunedBasePolicy(base, spec, mapping), cache,
                                    stop.check)
            baselines = validator.prepare()
        except _ValidationStopped:  # a signal during the set-up: nothing was trained, nothing is saved
            env.close()
            raise KeyboardInterrupt(stop.name) from None
        what = f"{len(tc.validation_temperatures)} fixed T" + (" + the base" if base is not None else "")
        print(f"validation baselines ({what}, {len(validator.prompts)} prompts): "
              + ("cached" if baselines["cached"] else f"computed in {baselines['wall_s']:.0f} s"), file=sys.stderr)
        # written once the model, the prompts and the base are ready: a run that fails to start leaves its directory empty
        run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run.config_file, config.to_yaml())
        history = run.command_file.read_text() if run.command_file.is_file() else ""
        write_text_atomic(run.command_file, history + (command or " ".join(shlex.quote(a) for a in sys.argv)) + "\n")
        if base is not None and tuning is not None:
            write_text_atomic(run.base_file, json.dumps({**base.to_dict(), "tuning": tuning}, indent=2))
        cache.keep_in(run.cache_dir)
        # PPO's action is the residual on the base (inside VecNormalize: the base reads raw observations)
        train_env = env if base is None else ResidualActionVecEnv(env, base.module(spec, mapping))
        if point is not None:
            model, vec = _resume(config, train_env, point)
        else:
            if resume:
                print(f"{run.path} has no saved model yet: training from step 0 with its config.yaml", file=sys.stderr)
            vec = None
            if tc.normalize_obs or tc.normalize_reward:
                vec = VecNormalize(train_env, norm_obs=tc.normalize_obs, norm_reward=tc.normalize_reward,
                                   gamma=config.ppo.gamma)
            model = PPO("MlpPolicy", vec or train_env, seed=tc.seed, tensorboard_log=str(run.tensorboard_dir),
                        device=tc.policy_device, verbose=0, **config.ppo.kwargs())
            if base is not None:  # the deterministic policy starts as the base: PPO learns only the correction
                with torch.no_grad():
                    model.policy.action_net.weight.zero_()
                    model.policy.action_net.bias.zero_()
        model.tensorboard_log = str(run.tensorboard_dir)
        start = Snapshot.take(model, vec)
        callback = KelvinCallback(config, run, env, vec, validator, base, stop, start)
        try:
            remaining = tc.total_timesteps - model.num_timesteps
            learned, failure, crash = False, None, None
            try:
                if remaining > 0 and not stop.requested:
                    learned = True
                    model.learn(total_timesteps=remaining, callback=callback, tb_log_name=TB_NAME,
                                reset_num_timesteps=point is None, progress_bar=tc.progress_bar)
            except KeyboardInterrupt:  # a second signal: the last snapshot is saved below
                pass
            except SaveError as exc:  # a checkpoint could not be written (full disk...): save what we can, then report
                failure = exc
            except Exception as exc:  # a crash mid-run (a Ray worker died...): save the last update, then re-raise
                crash = exc
            saved = callback.snapshot
            export_dir = None
            written = False  # this session wrote model.zip
            if saved is not start:  # an update completed in this process
                with stop.saving():
                    try:
                        saved.write(run.model_file, run.normalizer_file)
                        written = True
                    except SaveError as exc:
                        failure = failure or exc
                if failure is None and crash is None:
                    export_dir = _export(run, validator.env)  # in-process: it holds the model the export is checked on
            validation = None
            if crash is not None:
                env.close()
                validator.close()
                if written:
                    outcome = f"saved the model of step {saved.step}; continue with --resume {run.path}"
                else:
                    lost = "no PPO update completed in this session" if saved is start else \
                        f"{run.model_file.name} of step {saved.step} could not be written"
                    outcome = f"{lost}; {_newest_loadable(run, config)}"
                if isinstance(crash, OSError):  # the run directory failed under the run (read-only, full): one line
                    where = os.fsdecode(crash.filename) if crash.filename else str(run.path)
                    reason, fix = write_failure(where, crash)
                    raise SaveError(f"cannot write {where}: {reason}; training stopped at step {model.num_timesteps}: "
                                    f"{outcome} once the cause is fixed ({fix})") from None
                print(f"{type(crash).__name__} at step {model.num_timesteps}: {outcome}", file=sys.stderr)
                raise crash
            if learned and not stop.requested and failure is None:
                validation = callback.validate()
                if validation is not None:
                    callback.logger.dump(saved.step)
            env.close()
            validator.close()
            if failure is not None:
                raise SaveError(f"{failure}. Training stopped at step {saved.step}; {_newest_loadable(run, config)} "
                                "once the cause is fixed")
            interrupted = stop.requested
            wall = time.perf_counter() - t0
            timings = env.timings  # TemperatureVecEnv and RayVecEnv: one interface
            perf = {"tokens": timings["tokens"], "wall_s": wall,
                    "tokens_per_s": timings["tokens"] / wall if wall > 0 else 0.0,
                    "model_share": timings["model_s"] / wall, "env_share": timings["env_s"] / wall,
                    "ppo_share": callback.perf["ppo_s"] / wall, "validation_share": callback.perf["validation_s"] / wall,
                    "baselines_s": baselines["wall_s"], "baselines_cached": baselines["cached"],
                    "base_tuning_s": None if tuning is None else tuning["wall_s"],
                    "waiting_share": timings["waiting_rows"] / max(timings["tokens"] + timings["waiting_rows"], 1)}
            summary = {"run_dir": str(run.path), "timesteps": saved.step, "resumed_finished": False,
                       "completed": saved.step >= tc.total_timesteps, "saved": written,
                       "updates": _updates(config, saved.step),
                       "interrupted": interrupted, "signal": stop.name,
                       "discarded_steps": int(model.num_timesteps - saved.step), "wall_s": wall, "perf": perf,
                       "validation": validation, "export": None if export_dir is None else str(export_dir),
                       "exit_code": stop.exit_code if interrupted else 0}
            with stop.saving():
                write_text_atomic(run.summary_file, json.dumps(summary, indent=2, default=float))
        finally:
            validator.close()  # idempotent
    return summary


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``train.py`` (also read by ``tests/test_docs.py`` to check the documented commands)."""
    parser = argparse.ArgumentParser(description="Train a temperature policy with PPO (Kelvin).")
    parser.add_argument("--config", default="configs/default.yaml", help="YAML config (default: %(default)s)")
    parser.add_argument("--run-dir", default=None, help="output directory of a new run; it must be new or empty "
                                                        "(default: runs/<config name>)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR from its newest model that loads (its config.yaml is used)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in --run-dir (its files are deleted first)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                        help="override a config value, e.g. --set ppo.learning_rate=1e-4 (repeatable)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line of ``train.py``."""
    from kelvin.cli import run_cli

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume and (args.overwrite or args.run_dir):
        parser.error("--resume RUN_DIR continues that run: it takes no --run-dir or --overwrite")
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])

    def body() -> int:
        if args.resume:
            run = RunDir(args.resume)
            config = run.require().load_config(args.overrides)
            summary = train(config, run.path, resume=True, command=command)
        else:
            config = load_config(args.config, args.overrides)
            run_dir = Path(args.run_dir or Path("runs") / Path(args.config).stem)
            summary = train(config, run_dir, resume=False, command=command, overwrite=args.overwrite)
        return _report(summary, config)

    return run_cli(body, debug=args.debug)


def _report(summary: dict, config: KelvinConfig) -> int:
    """Print the outcome of ``train`` and return the exit code."""
    run_dir, steps = summary["run_dir"], summary["timesteps"]
    if summary.get("resumed_finished", summary.get("finished")):  # "finished": summaries of earlier releases
        print(f"{run_dir} is finished: {steps} steps of train.total_timesteps={config.train.total_timesteps}; "
              f"to train on, raise it: --resume {run_dir} --set train.total_timesteps=N")
        return 0
    if summary["interrupted"] and not summary.get("saved", True):
        print(f"interrupted (nothing saved): {summary['signal']} before the first PPO update of this session "
              f"completed; continue with --resume {run_dir}")
        return summary["exit_code"]
    if summary["interrupted"]:
        updates = f"{summary['updates']} PPO update" + ("s" if summary["updates"] != 1 else "")
        print(f"interrupted (model saved): {summary['signal']} at step {steps + summary['discarded_steps']}; saved "
              f"the model of step {steps} ({updates}), the {summary['discarded_steps']} steps of the unfinished "
              f"rollout are collected again by --resume {run_dir}")
        return summary["exit_code"]
    v = summary.get("validation")
    print(f"done: {steps} steps in {summary['wall_s']:.0f} s -> {run_dir}")
    if v:
        base = f" | vs its base {margin_text(v['margin_vs_base'])}" if v.get("margin_vs_base") else ""
        print(f"validation ({v['prompts']} prompts x {config.env.group_size}, paired 95% CI): learned "
              f"{v['learned']['reward']:.3f} | vs best fixed T={v['best_fixed_temperature']:g} "
              f"{margin_text(v['margin_vs_best_fixed'])}{base}")
    return 0
