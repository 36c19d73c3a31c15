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

The run's callbacks (:mod:`kelvin.callbacks`) log, validate and checkpoint.

**Stopping and resuming lose no learning.** After every PPO update a callback takes a
:class:`~kelvin.rundir.Snapshot` of the model and its normaliser (SB3 runs ``train()`` between
``on_rollout_end`` and the next ``on_rollout_start``, and after the last rollout before
``on_training_end``: those two hooks see each completed update), and a checkpoint, when due, is that
snapshot written to disk: it holds the update of the rollout it is named after. SIGINT (Ctrl-C) and
SIGTERM (schedulers, preemption) are handled alike (:class:`~kelvin.callbacks.TrainingStop`): the rollout stops after
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
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from envs.distributed import make_vec_env
from envs.lm import load_causal_lm
from envs.residual import ResidualActionVecEnv
from kelvin.atomic import RunDirError, SaveError, write_failure, write_text_atomic
from kelvin.callbacks import (KeepBest, LogStdSchedule, PeriodicValidation, ResidualPull, RolloutStats,
                              SnapshotCheckpoint, TrainingStop, ValidationStopped, updates)
from kelvin.config import KelvinConfig, model_setting_changes
from kelvin.config_loading import load_config
from kelvin.export import export_run
from kelvin.heads import DiversityHeadsPolicy, PartialVecNormalize, head_grid
from kelvin.rundir import RunDir, Snapshot, load_ppo, load_vecnormalize
from kelvin.tuning import EpisodeCache, tune_base
from kelvin.validation import Validation, margin_text
from policies.tuned_base import TunedBase, TunedBasePolicy

__all__ = ["train", "build_parser", "CheckpointError"]

TB_NAME = "PPO"


class CheckpointError(ValueError):
    """A checkpoint that is missing or cannot be loaded; the message says which file and what to do."""


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
    t0 = time.perf_counter()
    with TrainingStop() as stop, contextlib.ExitStack() as held:  # held: the run's lock and the envs, to the end
        held.enter_context(_event_writer_errors_in_main_thread())
        point = _start(config, run, resume, overwrite, held)
        if point is not None and point.step >= config.train.total_timesteps:
            return {"run_dir": str(run.path), "timesteps": point.step, "resumed_finished": True, "completed": True,
                    "saved": False, "interrupted": False, "signal": None, "wall_s": 0.0, "validation": None,
                    "export": None}
        session = _build(config, run, resume, command, point, stop, held)
        learned = session.model.num_timesteps < config.train.total_timesteps and not stop.requested
        error = _learn(session) if learned else None
        return _finish(session, learned, error, t0)


@dataclass
class _Session:
    """What one call of :func:`train` built: the envs, the model and its callbacks."""

    config: KelvinConfig
    run: RunDir
    stop: TrainingStop
    point: object  # the resume point (RunDir.resume_point); None: training from step 0
    env: VecEnv  # the rollout env, under the residual and VecNormalize wrappers the model sees
    validator: Validation
    model: PPO
    start: Snapshot  # the model as this session found it
    stats: RolloutStats
    validation: PeriodicValidation
    checkpoint: SnapshotCheckpoint
    baselines: dict  # Validation.prepare()'s record
    tuning: dict | None  # the base tuning's record (None: no base, or the run's own base.json)
    warm: dict  # the rollout env's warm_prompts() record

    def close(self) -> None:
        """Close the rollout and validation envs (idempotent)."""
        self.env.close()
        self.validator.close()


def _build(config: KelvinConfig, run: RunDir, resume: bool, command: str | None, point, stop: TrainingStop,
           held: contextlib.ExitStack) -> _Session:
    """Load the LM, build the envs (closed by ``held``), tune or read the base, prepare the validation baselines,
    write the run's files, and make or resume the PPO model."""
    tc = config.train
    torch.manual_seed(tc.seed)
    lm = load_causal_lm(config.model)
    # env.workers > 1: rollouts on Ray workers with a model copy each; validation stays in this process
    env = make_vec_env(replace(config.env, seed=tc.seed), lm=lm, reward=config.reward, model=config.model,
                       twins=tc.twin_groups)
    held.callback(env.close)
    cache = EpisodeCache(run.cache_dir, EpisodeCache.default_dir(config.model))
    spec, mapping = config.env.feature_spec(), config.env.action
    try:
        base, tuning = _tuned_base(config, run, lm, cache, stop, trained=point is not None)
        validator = Validation(config, lm, None if base is None else TunedBasePolicy(base, spec, mapping), cache,
                               stop.check)
        held.callback(validator.close)
        baselines = validator.prepare()
    except ValidationStopped:  # a signal during the set-up: nothing was trained, nothing is saved
        raise KeyboardInterrupt(stop.name) from None
    what = f"{len(tc.validation_temperatures)} fixed T" + (" + the base" if base is not None else "")
    print(f"validation baselines ({what}, {len(validator.prompts)} prompts): "
          + ("cached" if baselines["cached"] else f"computed in {baselines['wall_s']:.0f} s"), file=sys.stderr)
    _write_run_files(config, run, command, base, tuning, cache)
    # the prompts of every episode the run is sure to start (a group restarts at least every max_new_tokens steps),
    # prefilled in batches: every rollout then runs on cached prompts
    steps = -(-(tc.total_timesteps - (point.step if point is not None else 0)) // config.env.batch_size)
    warm = env.warm_prompts(steps // config.env.max_new_tokens + 1)
    if warm["prompts"]:
        print(f"prompt cache: {warm['prompts']} {config.env.split} prompts prefilled in {warm['wall_s']:.1f} s",
              file=sys.stderr)
    # PPO's action is the residual on the base (inside VecNormalize: the base reads raw observations)
    train_env = env if base is None else ResidualActionVecEnv(env, base.module(spec, mapping))
    if point is not None:
        model, vec = _resume(config, train_env, point)
    else:
        if resume:
            print(f"{run.path} has no saved model yet: training from step 0 with its config.yaml", file=sys.stderr)
        model, vec = _new_model(config, run, train_env, start_at_base=base is not None)
    model.tensorboard_log = str(run.tensorboard_dir)
    start = Snapshot.take(model, vec)
    keep = KeepBest(run, start if point is None and base is not None else None) if tc.keep_best else None
    return _Session(config, run, stop, point, env, validator, model, start, stats=RolloutStats(config, env),
                    validation=PeriodicValidation(config, run, vec, validator, base, stop, keep),
                    checkpoint=SnapshotCheckpoint(config, run, vec, stop, start), baselines=baselines, tuning=tuning,
                    warm=warm)


def _write_run_files(config: KelvinConfig, run: RunDir, command: str | None, base: TunedBase | None,
                     tuning: dict | None, cache: EpisodeCache) -> None:
    """config.yaml, command.txt (a line per session), base.json and the episode cache: written once the model, the
    prompts and the base are ready, so a run that fails to start leaves its directory empty."""
    run.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run.config_file, config.to_yaml())
    history = run.command_file.read_text() if run.command_file.is_file() else ""
    write_text_atomic(run.command_file, history + (command or " ".join(shlex.quote(a) for a in sys.argv)) + "\n")
    if base is not None and tuning is not None:
        write_text_atomic(run.base_file, json.dumps({**base.to_dict(), "tuning": tuning}, indent=2))
    cache.keep_in(run.cache_dir)


def _new_model(config: KelvinConfig, run: RunDir, env: VecEnv, start_at_base: bool) -> tuple[PPO, VecNormalize | None]:
    """A PPO model (and its normaliser) at step 0; ``start_at_base``: the actor's last layer is zero, so the
    deterministic policy starts as the base and PPO learns only the correction."""
    tc = config.train
    vec, policy, kwargs = None, "MlpPolicy", config.ppo.kwargs()
    grid, names = head_grid(config), config.env.feature_spec().names
    # position-bin one-hots pass unnormalised: standardised ([4] of 16 tokens), the start read (+1.7, -1.7) and the
    # finish (-0.59, +0.59), -2.9 times it: a larger latent at the start, and gSDE noise ~2.5x the finish's
    raw = bins = [i for i, name in enumerate(names) if name.startswith("position_bin_")]
    if grid is not None:  # one output per λ of the grid; they read λ itself, left unnormalised
        policy, raw = DiversityHeadsPolicy, [names.index("diversity")] + bins
        kwargs["policy_kwargs"] = {**kwargs.get("policy_kwargs", {}), "heads": list(grid), "diversity_col": raw[0],
                                   "actor_columns": config.actor_columns(),
                                   "twin_rows": config.env.group_size if tc.twin_groups else None,
                                   "noise_columns": bins if config.ppo.use_sde else None,
                                   "action_bias": config.policy.actor_bias,
                                   "action_lr_scale": config.policy.actor_lr_scale}
    if tc.normalize_obs or tc.normalize_reward:
        normalize = dict(norm_obs=tc.normalize_obs, norm_reward=tc.normalize_reward, gamma=config.ppo.gamma)
        vec = PartialVecNormalize(env, raw_columns=raw, **normalize) if raw else VecNormalize(env, **normalize)
    model = PPO(policy, vec or env, seed=tc.seed, tensorboard_log=str(run.tensorboard_dir),
                device=tc.policy_device, verbose=0, **kwargs)
    if start_at_base:
        zero_residual(model, config.table_cells("residual_init"))
    return model, vec


def zero_residual(model: PPO, cells: list[list[float]] | None = None) -> None:
    """Set the actor's last layer (the residual on the base) to zero, so the deterministic policy is the base; or,
    with ``cells`` (``policy.residual_init``: a table residual's (heads, observation columns) weights), to those."""
    with torch.no_grad():
        net = model.policy.action_net
        if cells is None:
            net.weight.zero_()
        else:  # a table: no bias (checked by the config)
            net.weight.copy_(torch.tensor(cells, dtype=net.weight.dtype))
        if net.bias is not None:  # policy.actor_bias false: none
            net.bias.zero_()


def _learn(s: _Session) -> Exception | None:
    """PPO up to ``train.total_timesteps``. Returns None when it ran to the end or a signal stopped it (a second
    signal interrupts it at once), else the error to report once the last snapshot is saved: a
    :class:`SaveError` (a checkpoint could not be written) or a crash (a Ray worker died...)."""
    # this order: see kelvin.callbacks (the pull before the update's snapshot)
    callbacks = CallbackList([s.stats, s.validation, *ResidualPull.of(s.config), *LogStdSchedule.of(s.config),
                              s.checkpoint])
    try:
        s.model.learn(total_timesteps=s.config.train.total_timesteps - s.model.num_timesteps, callback=callbacks,
                      tb_log_name=TB_NAME, reset_num_timesteps=s.point is None, progress_bar=s.config.train.progress_bar)
    except KeyboardInterrupt:
        return None
    except Exception as exc:
        return exc
    return None


def _finish(s: _Session, learned: bool, error: Exception | None, t0: float) -> dict:
    """Save the last snapshot as model.zip, then either report ``error`` (the save done) or export, validate and
    write summary.json; returns the summary."""
    run, stop, saved = s.run, s.stop, s.checkpoint.snapshot
    written, save_error = _save(s, saved)
    if error is not None and not isinstance(error, SaveError):
        s.close()
        _raise_crash(s, error, saved, written)
    failure = error or save_error
    validation = None
    if learned and not stop.requested and failure is None:
        validation = s.validation.validate()  # before the export: with train.keep_best it may pick this model
        if validation is not None:
            s.model.logger.dump(saved.step)
    export_dir = _export(run, s.validator.env) if written and failure is None else None  # in-process: holds the LM
    s.close()
    if failure is not None:
        raise SaveError(f"{failure}. Training stopped at step {saved.step}; {_newest_loadable(run, s.config)} "
                        "once the cause is fixed")
    summary = _summary(s, saved, written, validation, export_dir, time.perf_counter() - t0)
    with stop.saving():
        write_text_atomic(run.summary_file, json.dumps(summary, indent=2, default=float))
    return summary


def _save(s: _Session, saved: Snapshot) -> tuple[bool, SaveError | None]:
    """Write ``saved`` as model.zip when an update completed in this session; (written, the error of a failed write)."""
    if saved is s.start:
        return False, None
    with s.stop.saving():
        try:
            saved.write(s.run.model_file, s.run.normalizer_file)
        except SaveError as exc:
            return False, exc
    return True, None


def _raise_crash(s: _Session, crash: Exception, saved: Snapshot, written: bool) -> None:
    """Re-raise a crash of ``learn()`` with what was kept: one line for a run directory that failed under the run."""
    run, step = s.run, s.model.num_timesteps
    if written:
        outcome = f"saved the model of step {saved.step}; continue with --resume {run.path}"
    else:
        lost = "no PPO update completed in this session" if saved is s.start else \
            f"{run.model_file.name} of step {saved.step} could not be written"
        outcome = f"{lost}; {_newest_loadable(run, s.config)}"
    if isinstance(crash, OSError):  # the run directory failed under the run (read-only, full): one line
        where = os.fsdecode(crash.filename) if crash.filename else str(run.path)
        reason, fix = write_failure(where, crash)
        raise SaveError(f"cannot write {where}: {reason}; training stopped at step {step}: "
                        f"{outcome} once the cause is fixed ({fix})") from None
    print(f"{type(crash).__name__} at step {step}: {outcome}", file=sys.stderr)
    raise crash


def _summary(s: _Session, saved: Snapshot, written: bool, validation: dict | None, export_dir: Path | None,
             wall: float) -> dict:
    """summary.json of a session that trained (or was asked to)."""
    stop, tc = s.stop, s.config.train
    timings = s.env.timings  # TemperatureVecEnv and RayVecEnv: one interface
    perf = {"tokens": timings["tokens"], "wall_s": wall,
            "tokens_per_s": timings["tokens"] / wall if wall > 0 else 0.0,
            "model_share": timings["model_s"] / wall, "env_share": timings["env_s"] / wall,
            "ppo_share": s.checkpoint.perf["ppo_s"] / wall, "validation_share": s.validation.perf["validation_s"] / wall,
            "baselines_s": s.baselines["wall_s"], "baselines_cached": s.baselines["cached"],
            "base_tuning_s": None if s.tuning is None else s.tuning["wall_s"], "prompt_warm_s": s.warm["wall_s"],
            "waiting_share": timings["waiting_rows"] / max(timings["tokens"] + timings["waiting_rows"], 1)}
    return {"run_dir": str(s.run.path), "timesteps": saved.step, "resumed_finished": False,
            "completed": saved.step >= tc.total_timesteps, "saved": written, "updates": updates(s.config, saved.step),
            "interrupted": stop.requested, "signal": stop.name,
            "discarded_steps": int(s.model.num_timesteps - saved.step), "wall_s": wall, "perf": perf,
            "validation": validation, "export": None if export_dir is None else str(export_dir),
            "kept": None if s.validation.keep is None else s.validation.keep.record,
            "exit_code": stop.exit_code if stop.requested else 0}


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
        grid = ", ".join(f"{diversity:g}" for diversity in v["diversity"])
        base = f" | vs its base {margin_text(v['margin_vs_base'])}" if v.get("margin_vs_base") else ""
        streams = f" x {v['streams']} streams" if v.get("streams", 1) > 1 else ""
        print(f"validation ({v['prompts']} prompts x {config.env.group_size}{streams} at λ = {grid}, paired 95% CI): learned "
              f"{v['learned']['reward']:.3f} | vs best fixed T={v['best_fixed_temperature']:g} "
              f"{margin_text(v['margin_vs_best_fixed'])}{base}")
        if v.get("margin_vs_base"):
            print("  vs its base at each λ: " + ", ".join(f"λ={diversity} {margin_text(at['margin_vs_base'])}"
                                                      for diversity, at in v["by_diversity"].items()))
    kept = summary.get("kept")
    if kept:
        how = "the base: no validated policy beat it" if kept["margin"] is None else \
            f"{kept['criterion']} {margin_text(kept['margin'])} on the validation prompts it was picked on"
        print(f"kept (train.keep_best): update {kept['updates']}, {how} -> {run_dir}/best/model.zip (exported; "
              "model.zip is the last update)")
    return 0
