"""The callbacks of a training run (:func:`kelvin.training.train`), one job each, run as one SB3 ``CallbackList``
in this order: :class:`RolloutStats` (TensorBoard's rollout, reward, episode and perf tags),
:class:`PeriodicValidation` (``validation/*``, ``validation.json``; with ``train.keep_best`` it hands each validated
policy to :class:`KeepBest`), :class:`ResidualPull` (a pull toward the base
after each update, ``policy.residual_pull``) and :class:`SnapshotCheckpoint` (the
snapshot of every completed PPO update, checkpoints, and the stop on a signal). :class:`TrainingStop` turns
SIGINT and SIGTERM into that stop.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from typing import Callable, Sequence

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HParam, TensorBoardOutputFormat
from stable_baselines3.common.vec_env import VecEnv, VecNormalize

from envs.rewards import EPISODE_COMPONENTS, STEP_COMPONENTS
from kelvin.atomic import write_text_atomic
from kelvin.config import KelvinConfig
from kelvin.export import learned_policy
from kelvin.rundir import RunDir, Snapshot
from kelvin.validation import Validation
from kelvin.validation import scalars as validation_scalars
from policies.tuned_base import TunedBase

__all__ = ["AfterEachUpdate", "KeepBest", "PeriodicValidation", "ResidualPull", "RolloutStats", "SnapshotCheckpoint",
           "TrainingStop", "ValidationStopped", "updates"]


class ValidationStopped(Exception):
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
        """Raise :class:`ValidationStopped` when a stop was requested (called after each validation step)."""
        if self.requested:
            raise ValidationStopped

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


class RolloutStats(BaseCallback):
    """TensorBoard: the hyperparameters once, then per rollout the temperatures, the reward components (per
    step and per episode) and the speed; ``perf["rollout_s"]`` sums the rollouts' wall time."""

    def __init__(self, config: KelvinConfig, train_env: VecEnv):
        super().__init__(verbose=0)
        self.config = config
        self.train_env = train_env
        self._reset_accumulators()
        self._timings = dict(train_env.timings)
        self._t_rollout = time.perf_counter()
        self.perf = {"rollout_s": 0.0}

    def _reset_accumulators(self):
        self._temps: list[np.ndarray] = []
        self._step_sums = {k: 0.0 for k in STEP_COMPONENTS}
        self._n_steps = 0
        self._episodes: list[dict] = []

    def _on_training_start(self) -> None:
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
        self._t_rollout = time.perf_counter()

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
        return True

    def _on_rollout_end(self) -> None:
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

class PeriodicValidation(BaseCallback):
    """The learned policy against every fixed temperature and the base on the validation prompts, every
    ``train.validate_every`` rollouts (not after the last: the run validates once more when it ends) and on
    :meth:`validate`; ``history`` holds every validation of the run, its earlier parts (``--resume``) included."""

    def __init__(self, config: KelvinConfig, run: RunDir, vec_normalize: VecNormalize | None, validation: Validation,
                 base: TunedBase | None, stop: TrainingStop, keep: KeepBest | None = None):
        super().__init__(verbose=0)
        self.config, self.run, self.stop, self.keep = config, run, stop, keep
        self.vec_normalize, self.validation, self.base = vec_normalize, validation, base  # what _policy() needs
        self.n_rollouts = 0
        self.perf = {"validation_s": 0.0}
        self.last_validation: dict | None = None
        self.history: list[dict] = _validation_history(run)

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.n_rollouts += 1
        every = self.config.train.validate_every
        last = self.model.num_timesteps >= self.model._total_timesteps  # the validation after training covers it
        if every and self.n_rollouts % every == 0 and not last and not self.stop.requested:
            self.validate(pending=True)

    def _writer(self):
        for fmt in self.logger.output_formats:
            if isinstance(fmt, TensorBoardOutputFormat):
                return fmt.writer
        return None

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
        except ValidationStopped:
            print("validation stopped", file=sys.stderr, flush=True)
            return None
        finally:
            self.perf["validation_s"] += time.perf_counter() - t0

    def _validate(self, pending: bool) -> dict:
        tc = self.config.train
        episodes = self.validation.episodes(self._policy())
        v = self.validation.compare(episodes, self.model.num_timesteps)
        for name, value in validation_scalars(v).items():
            self.logger.record(name, value)
        writer = self._writer()
        if writer is not None and tc.samples_to_log:
            lines = []
            for e in episodes[: tc.samples_to_log]:
                trace = ", ".join(f"{x:.2f}" for x in e["temperatures"][:64])
                lines.append(f"**{e['prompt_id']}** ({e['category']}), return {e['episode']['r']:.2f}\n\n"
                             f"    {e['completion']!r}\n\ntemperatures: [{trace}]")
            writer.add_text("validation/samples", "\n\n---\n\n".join(lines), self.model.num_timesteps)
        self.history.append({"step": v["step"], "updates": updates(self.config, v["step"]) - int(pending),
                             "learned_reward": v["learned"]["reward"], "margin_vs_best_fixed": v["margin_vs_best_fixed"],
                             "margin_vs_base": v["margin_vs_base"],
                             "by_diversity": {k: {m: at.get(m) for m in ("margin_vs_best_fixed", "margin_vs_base")}
                                              for k, at in v["by_diversity"].items()}})
        if self.keep is not None:  # the policy validated is the live model: snapshot it as it stands
            self.keep.offer(v, self.history[-1]["updates"], lambda: Snapshot.take(self.model, self.vec_normalize))
            v["kept"] = self.keep.record
            self.logger.record("validation/kept_updates", v["kept"]["updates"])
        v["history"] = self.history  # the margins against the update number, this run's resumes included
        self.last_validation = v
        write_text_atomic(self.run.validation_file, json.dumps(v, indent=2))
        return v


class KeepBest:
    """``train.keep_best``: keeps the best validated policy of a run in ``run/best/`` (the model, its normaliser
    and ``best.json``: which update, the criterion and its value). The criterion is the validation margin over the
    λ grid against the run's base, or against the best fixed T when the run has none; a later policy replaces the
    kept one only when it scores strictly higher. ``start``: the snapshot of a new run on a base, whose
    deterministic policy **is** the base (margin 0 by construction), so a run that never beats its base keeps it;
    it is written only when the first validation does not beat it (a run stopped before then keeps nothing).
    A resumed run goes on from the ``best.json`` it left."""

    def __init__(self, run: RunDir, start: Snapshot | None = None):
        self.run = run
        try:
            self.record: dict | None = json.loads(run.best_record_file.read_text())
        except (OSError, ValueError):
            self.record = None
        self._start = start if self.record is None else None

    @staticmethod
    def criterion(validation: dict) -> tuple[str, float]:
        """``(name, value)`` a validation record is ranked by."""
        m = validation.get("margin_vs_base")
        name = "margin_vs_base" if m is not None else "margin_vs_best_fixed"
        return name, float(validation[name]["mean"])

    def offer(self, validation: dict, n_updates: int, take: Callable[[], Snapshot]) -> bool:
        """Keep the validated policy (``take()`` snapshots it) if it beats the kept one; True when it did."""
        name, value = self.criterion(validation)
        start = self._start
        self._start = None
        best = self.record["value"] if self.record is not None else 0.0 if start is not None else -np.inf
        if value > best:
            self._keep(take(), {"updates": int(n_updates), "step": int(validation["step"]), "criterion": name,
                                "value": value, "margin": validation[name], "what": "the validated policy"})
            return True
        if self.record is None:  # the first validation did not beat the base the run started from
            self._keep(start, {"updates": 0, "step": 0, "criterion": name, "value": 0.0,
                               "margin": None, "what": "the base (the residual at zero, as the run started)"})
        return False

    def _keep(self, snapshot: Snapshot, record: dict) -> None:
        self.run.best_dir.mkdir(parents=True, exist_ok=True)
        snapshot.write(self.run.best_model_file, self.run.best_normalizer_file)
        write_text_atomic(self.run.best_record_file, json.dumps(record, indent=2))
        self.record = record


class AfterEachUpdate(BaseCallback):
    """Calls :meth:`after_update` once per completed PPO update. SB3 runs a rollout's update between
    ``on_rollout_end`` and the next ``on_rollout_start`` (after the last rollout, before ``on_training_end``); a
    rollout cut short by a stop (``on_step`` returned False) has no update, and no call."""

    def __init__(self):
        super().__init__(verbose=0)
        self._updating = False  # True between a rollout's end and the end of its PPO update

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self._updating = True

    def _on_rollout_start(self) -> None:
        self._update_ended()

    def _on_training_end(self) -> None:
        self._update_ended()

    def _update_ended(self) -> None:
        if self._updating:
            self._updating = False
            self.after_update()

    def after_update(self) -> None:
        raise NotImplementedError


class ResidualPull(AfterEachUpdate):
    """After every PPO update, scales the actor's last layer (``action_net``: the residual on the base) by
    ``1 - policy.residual_pull``: a decay toward the base, in update steps. A correction the advantages keep
    pushing settles where the pull balances the push; one that noise drew (the λ = 0 drift of
    docs/results-earlier.md) fades. It runs before :class:`SnapshotCheckpoint` takes the update's snapshot, so a
    run resumed from that snapshot continues exactly as one that was never stopped; a rollout cut short by a stop
    has no update and no pull. The optimizer's moments are left alone."""

    def __init__(self, fraction: float | Sequence[float] | Sequence[Sequence[float]]):
        super().__init__()
        # (H,) one fraction per diversity head (row h of the layer is head h), (1,) for every row alike, or (H, D)
        # one per weight: a table residual's (head, observation column) cells (KelvinConfig.table_cells)
        keep = 1.0 - torch.tensor(fraction, dtype=torch.float64)
        self.keep = keep if keep.dim() == 2 else keep.reshape(-1)

    @classmethod
    def of(cls, config: KelvinConfig) -> list["ResidualPull"]:
        """The run's pull as a list of callbacks: none when it is 0 (every head's, every cell's) or there is no
        base (``policy.base: none``)."""
        pc = config.policy
        fraction = config.table_cells("residual_pull") or pc.residual_pull
        pulls = torch.tensor(fraction, dtype=torch.float64).reshape(-1).tolist()
        return [cls(fraction)] if any(p > 0 for p in pulls) and pc.base != "none" else []

    def after_update(self) -> None:
        net = self.model.policy.action_net
        keep = self.keep.to(dtype=net.weight.dtype, device=net.weight.device)
        with torch.no_grad():
            if keep.dim() == 2:  # per cell: a table residual, no bias (checked by the config)
                net.weight.mul_(keep)
                return
            net.weight.mul_(keep.view(-1, 1))
            if net.bias is not None:  # policy.actor_bias false: none
                net.bias.mul_(keep)


class LogStdSchedule(AfterEachUpdate):
    """``train.log_std_final``: the policy's log std (every entry: one per gSDE noise column) set from the env steps
    done, linear from ``start`` at step 0 to ``final`` at ``over`` steps, then held; frozen, so PPO's updates do
    not move it. Set at the start of training (a resumed run continues on the schedule) and after every update,
    before the update's snapshot and before the next rollout draws its noise. A rollout cut short by a stop has
    no update and no change."""

    def __init__(self, start: float, final: float, over: int):
        super().__init__()
        self.start, self.final, self.over = float(start), float(final), max(int(over), 1)

    @classmethod
    def of(cls, config: KelvinConfig) -> list["LogStdSchedule"]:
        """The run's schedule as a list of callbacks: none without ``train.log_std_final``."""
        t = config.train
        if t.log_std_final is None:
            return []
        start = config.ppo.policy_kwargs.log_std_init
        return [cls(start, t.log_std_final, round(t.log_std_anneal * t.total_timesteps))]

    def value(self, step: int) -> float:
        """The log std after ``step`` env steps."""
        return self.start + (self.final - self.start) * min(step / self.over, 1.0)

    def _set(self) -> None:
        with torch.no_grad():
            self.model.policy.log_std.fill_(self.value(self.model.num_timesteps))
        # SB3 drew the next rollout's noise weights before on_rollout_start: redraw them. Needed only with
        # ppo.sde_sample_freq <= 0 after an update (else the rollout's first step redraws them, and the first
        # rollout draws after training start), but kept always: the published schedule runs (docs/results.md)
        # replay draw for draw only with these draws in the random stream.
        if self.model.use_sde:
            self.model.policy.reset_noise(self.model.get_env().num_envs)

    def _on_training_start(self) -> None:
        self.model.policy.log_std.requires_grad_(False)
        self._set()

    def after_update(self) -> None:
        self._set()


class SnapshotCheckpoint(AfterEachUpdate):
    """Takes a :class:`~kelvin.rundir.Snapshot` after every completed PPO update and writes it as a checkpoint
    every ``train.checkpoint_every`` steps; ends ``learn()`` after the current env step once a stop is requested.

    ``snapshot`` is the state the last completed update left: what the run saves however it ends.
    ``perf["ppo_s"]`` sums the updates' wall time.
    """

    def __init__(self, config: KelvinConfig, run: RunDir, vec_normalize: VecNormalize | None, stop: TrainingStop,
                 snapshot: Snapshot):
        super().__init__()
        self.config, self.run, self.stop = config, run, stop
        self.vec_normalize = vec_normalize
        self.snapshot = snapshot
        self._last_checkpoint = 0
        self._t_rollout_end: float | None = None
        self.perf = {"ppo_s": 0.0}

    def _on_training_start(self) -> None:
        self._last_checkpoint = self.model.num_timesteps  # a resumed run counts from where it stopped

    def _on_step(self) -> bool:
        return not self.stop.requested  # False ends model.learn after this step (see TrainingStop)

    def _on_rollout_end(self) -> None:
        super()._on_rollout_end()
        self._t_rollout_end = time.perf_counter()

    def _on_rollout_start(self) -> None:
        if self._t_rollout_end is not None:  # SB3 ran the PPO update since the last rollout ended
            self.perf["ppo_s"] += time.perf_counter() - self._t_rollout_end
        super()._on_rollout_start()

    def after_update(self) -> None:
        """A PPO update has completed: take the snapshot, and write it as a checkpoint when one is due."""
        self.snapshot = Snapshot.take(self.model, self.vec_normalize)
        every = self.config.train.checkpoint_every
        if every and self.snapshot.step - self._last_checkpoint >= every:
            self.snapshot.write(*self.run.checkpoint_files(self.snapshot.step))
            self._last_checkpoint = self.snapshot.step


def updates(config: KelvinConfig, step: int) -> int:
    """PPO updates behind ``step`` env steps: one per rollout (SB3's ``_n_updates`` counts epochs, fewer with
    ``target_kl``). At a periodic validation, the rollout just collected is not yet learned from."""
    return int(step) // config.rollout_size


def _validation_history(run: RunDir) -> list[dict]:
    """The validation history of an earlier part of the run (``--resume``), or none."""
    try:
        return list(json.loads(run.validation_file.read_text()).get("history", []))
    except (OSError, ValueError, AttributeError):
        return []
