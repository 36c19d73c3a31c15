"""Run directories: the one home of their file names, checkpoints, and model + normaliser loading.

``train(config, run_dir)`` writes into a run directory:

| file                          | what                                                              |
|-------------------------------|-------------------------------------------------------------------|
| ``config.yaml``               | the resolved config (every default filled in)                     |
| ``command.txt``               | the command line(s) that produced the run (resumes append)        |
| ``model.zip``                 | the final (or interrupted) PPO model                              |
| ``vecnormalize.pkl``          | observation (and reward) normalisation statistics of the model    |
| ``checkpoints/step_N.zip``    | periodic checkpoints, each with ``step_N_vecnormalize.pkl``       |
| ``tb/PPO_1/events.*``         | TensorBoard event files (resumes keep writing into ``PPO_1``)      |
| ``validation.json``           | the last validation: learned policy vs every fixed temperature    |
| ``summary.json``              | steps, wall time, interruption, the last validation, the export   |
| ``export/``                   | the policy exported for samplers (:mod:`kelvin.export`)            |
| ``train.lock``                | the training process writing the run (pid, host, since), while it runs |

Training, export and evaluation all read runs through :class:`RunDir`, :func:`load_ppo` and
:func:`load_vecnormalize`: a missing file is a ``FileNotFoundError`` and a damaged one a
:class:`~kelvin.atomic.RunDirError`, each naming the file and what to do.

**Writes cannot half-happen.** Every file of a run (and of an export) is written by
:func:`kelvin.atomic.write_atomic`: a temporary file in the same directory, flushed and fsynced, checked, then
``os.replace``d over the target, so a crash, a SIGKILL or a full disk leaves the old file or the new
one, never a torn one. A model is saved as a :class:`Snapshot` (the bytes of ``PPO.save`` and
``VecNormalize.save`` taken at one moment, after a PPO update), written as one transaction: both files
complete and checked to load back before either replaces anything, so a failed save keeps the previous
pair. The normaliser records the step of its model (``kelvin_step``), so a
``model.zip`` and a ``vecnormalize.pkl`` from two different saves are never paired.

**Ownership.** :meth:`RunDir.lock` lets one process write a run at a time (readers take no lock);
:meth:`RunDir.claim` gives a new run an empty directory (refusing a non-empty one unless told to overwrite it); :meth:`RunDir.resume_point` finds the newest model of a run that loads,
skipping damaged ones with a warning that names them and says why.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import socket
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from kelvin.atomic import (_TEMP_PREFIX, RunDirError, SaveError, _commit, _create_exclusive, _save_message, _stage,
                           unusable_output_dir)

__all__ = ["RunDir", "RunDirLocked", "ResumePoint", "Snapshot", "content_hash", "load_ppo", "load_vecnormalize",
           "model_files", "normalization_stats", "saved_step"]

_STEP_RE = re.compile(r"step_(\d+)\.zip")


class RunDirLocked(RunDirError):
    """Another live process trains in this run directory (its lock file names it)."""


@dataclass(frozen=True)
class RunDir:
    """The paths of one training run directory (nothing is read until asked)."""

    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path).expanduser())

    config_file = property(lambda self: self.path / "config.yaml")
    command_file = property(lambda self: self.path / "command.txt")
    model_file = property(lambda self: self.path / "model.zip")
    normalizer_file = property(lambda self: self.path / "vecnormalize.pkl")
    checkpoint_dir = property(lambda self: self.path / "checkpoints")
    tensorboard_dir = property(lambda self: self.path / "tb")
    validation_file = property(lambda self: self.path / "validation.json")
    summary_file = property(lambda self: self.path / "summary.json")
    export_dir = property(lambda self: self.path / "export")
    base_file = property(lambda self: self.path / "base.json")  # the tuned base of a residual policy
    cache_dir = property(lambda self: self.path / "cache")  # the deterministic validation runs (kelvin.tuning)
    lock_file = property(lambda self: self.path / "train.lock")
    best_dir = property(lambda self: self.path / "best")  # train.keep_best: the validated policy the run ships
    best_model_file = property(lambda self: self.best_dir / "model.zip")
    best_normalizer_file = property(lambda self: self.best_dir / "vecnormalize.pkl")
    best_record_file = property(lambda self: self.best_dir / "best.json")

    def policy_files(self) -> tuple[Path, Path]:
        """The model the run ships, with its normaliser file: ``best/model.zip`` when the run kept its best
        validated policy (``train.keep_best``), else ``model.zip`` (the last update, which ``--resume`` continues)."""
        if self.best_model_file.is_file():
            return self.best_model_file, self.best_normalizer_file
        return self.model_file, self.normalizer_file

    def require(self) -> "RunDir":
        """Self, or a FileNotFoundError when the directory or its ``config.yaml`` is missing."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"no such run directory {self.path}; give the --run-dir of a train.py run")
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.config_file} is missing: is {self.path} a Kelvin run directory?")
        return self

    def load_config(self, overrides: list[str] | None = None):
        """The run's resolved :class:`~kelvin.config.KelvinConfig` (its ``config.yaml``). A run written before the
        ``policy`` block existed was trained without a tuned base: it reads as ``policy.base: none``; one written
        before ``train.validation_mix`` existed validated on equal shares of the categories: ``equal`` (a
        ``--resume`` or a re-pick then validates on the prompts its history did)."""
        from kelvin.config_loading import load_config

        text = self.require().config_file.read_text()
        legacy = [] if re.search(r"^policy:", text, flags=re.MULTILINE) else ["policy.base=none"]
        if re.search(r"^train:", text, flags=re.MULTILINE) and not re.search(r"^\s+validation_mix:", text,
                                                                             flags=re.MULTILINE):
            legacy.append("train.validation_mix=equal")
        return load_config(self.config_file, legacy + list(overrides or []))

    def load_base(self):
        """The tuned base the run's policy is a residual on (:class:`policies.tuned_base.TunedBase`), or None when
        the run has none (``policy.base: none``, or a run from before residual policies)."""
        from policies.tuned_base import BaseError, TunedBase

        if not self.base_file.is_file():
            return None
        try:
            data = json.loads(self.base_file.read_text())
        except (OSError, ValueError) as exc:
            raise RunDirError(f"cannot read {self.base_file} ({exc}); the run's tuned base is damaged: start a new "
                              "run") from None
        try:
            return TunedBase.from_dict(data, source=str(self.base_file))
        except BaseError as exc:
            raise RunDirError(str(exc)) from None

    def checkpoint_files(self, step: int) -> tuple[Path, Path]:
        """``checkpoints/step_N.zip`` and its ``step_N_vecnormalize.pkl``."""
        return self.checkpoint_dir / f"step_{step}.zip", self.checkpoint_dir / f"step_{step}_vecnormalize.pkl"

    def checkpoints(self) -> list[int]:
        """Steps of the checkpoints present, ascending."""
        steps = [int(m.group(1)) for p in self.checkpoint_dir.glob("step_*.zip") if (m := _STEP_RE.fullmatch(p.name))]
        return sorted(steps)

    # ------------------------------------------------------------------ ownership
    OWN_ENTRIES = ("config.yaml", "command.txt", "model.zip", "vecnormalize.pkl", "checkpoints", "tb",
                   "validation.json", "summary.json", "export", "base.json", "cache", "best", "train.lock")
    """What a run directory holds (what ``--overwrite`` removes): every path property above."""

    def check_writable(self) -> None:
        """A :class:`RunDirError` when the run directory (or, for a new one, its nearest existing parent) is
        not a writable directory."""
        problem = unusable_output_dir(self.path)
        if problem is None:
            return
        kind, folder, reason = problem
        if kind == "file" and folder == self.path:
            raise RunDirError(f"run directory {self.path} is a file, not a directory; give another --run-dir")
        if kind == "file":
            raise RunDirError(f"cannot create run directory {self.path}: {folder} is a file; give another "
                              "--run-dir")
        what = "run directory" if folder == self.path else f"parent directory {folder} of"
        raise RunDirError(f"cannot write to the {what} {self.path} ({reason}); make it writable "
                          "or give another --run-dir")

    def claim(self, overwrite: bool = False) -> "RunDir":
        """Make ``path`` the empty directory of a new run.

        A non-empty directory is refused with a hint (``--resume`` continues it, ``--overwrite``
        replaces it); ``overwrite`` removes the files of an earlier run, and still refuses a
        directory holding anything else (it is not a run directory: nothing of the user's is deleted).
        """
        self.check_writable()
        entries = sorted(p.name for p in self.path.iterdir() if p != self.lock_file) if self.path.is_dir() else []
        if entries and not overwrite:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise RunDirError(f"run directory {self.path} is not empty ({shown}); continue that run with "
                              f"--resume {self.path}, replace it with --overwrite, or give another --run-dir")
        foreign = [e for e in entries if e not in self.OWN_ENTRIES and not e.startswith(_TEMP_PREFIX)]
        if foreign:
            raise RunDirError(f"--overwrite: {self.path} holds files that are not a Kelvin run's ("
                              f"{', '.join(foreign[:5])}); nothing was deleted: give another --run-dir")
        for name in entries:
            target = self.path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run's exclusive writer lock (``train.lock``: pid, host and start time of the holder) for the
        ``with`` block; the directory is created when missing. Another live holder (or a lock that cannot be read) is
        a :class:`RunDirLocked` naming it; the lock of a process that is gone (a dead pid on this host: a crash, a
        SIGKILL) is stale and taken over. Readers (evaluation, export) never take it."""
        self.path.mkdir(parents=True, exist_ok=True)
        mine = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            for _ in range(2):  # a stale lock is removed once, then taken
                try:
                    _create_exclusive(self.lock_file, json.dumps(mine).encode())
                    break
                except FileExistsError:
                    holder = self.lock_holder()
                    gone = holder is not None and _is_dead(holder)
                    if not gone:
                        who = _describe_holder(holder) if holder else "a process (the lock cannot be read)"
                        raise RunDirLocked(
                            f"run directory {self.path} is in use: {who} holds {self.lock_file.name}; wait for it to "
                            f"end (or stop it), or, if that process is gone, delete {self.lock_file}") from None
                    warnings.warn(f"{self.lock_file}: taking over the stale lock of {_describe_holder(holder)}",
                                  RuntimeWarning, stacklevel=3)
                    self.lock_file.unlink(missing_ok=True)
            else:
                raise RunDirLocked(f"run directory {self.path}: another process took {self.lock_file.name} at the "
                                   "same moment; try again")
        except OSError as exc:
            raise SaveError(_save_message(self.lock_file, exc)) from None
        try:
            yield
        finally:
            if self.lock_holder() == mine:
                with contextlib.suppress(OSError):  # a file system gone read-only: the lock goes stale with us
                    self.lock_file.unlink(missing_ok=True)

    def lock_holder(self) -> dict | None:
        """``{"pid", "host", "since"}`` of the process holding the run's lock; None when none (or unreadable)."""
        try:
            holder = json.loads(self.lock_file.read_text())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) and {"pid", "host", "since"} <= set(holder) else None

    def remove_stale_temps(self) -> list[Path]:
        """Delete temporary files a killed save left behind (never a complete file); returns them."""
        stale = [p for d in (self.path, self.checkpoint_dir, self.export_dir, self.best_dir) if d.is_dir()
                 for p in d.glob(_TEMP_PREFIX + "*")]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale

    # ------------------------------------------------------------------ resuming
    def saved_models(self) -> list[tuple[int, Path, Path]]:
        """``(step, model file, normaliser file)`` of ``model.zip`` and every checkpoint, newest first (steps
        read from the files; ``model.zip`` first among equals; unreadable ones last, step -1)."""
        found = []
        if self.model_file.is_file():
            found.append((saved_step(self.model_file), 1, self.model_file, self.normalizer_file))
        for step in self.checkpoints():
            model, norm = self.checkpoint_files(step)
            found.append((saved_step(model), 0, model, norm))
        found.sort(key=lambda item: (-1 if item[0] is None else item[0], item[1]), reverse=True)
        return [(-1 if s is None else s, m, n) for s, _, m, n in found]

    def resume_point(self, normalized: bool, device: str = "cpu") -> ResumePoint | None:
        """The newest model of the run that loads, with its normaliser (required when ``normalized``); None
        when the run has saved no model yet. Each damaged or unpaired model on the way is skipped with a
        warning naming it and the reason, and so is a model whose step cannot be read (damaged: it would be
        tried last); a :class:`RunDirError` lists them all when none loads."""
        skipped = []
        saved = self.saved_models()
        for step, model_file, norm_file in sorted(saved, key=lambda item: item[0] >= 0):  # unreadable ones first
            try:
                if step < 0:  # no readable step: damaged; load it for the reason
                    load_ppo(model_file, device=device)
                    continue  # loads without a readable step: cannot happen with an SB3 save, never resumed from
                model = load_ppo(model_file, device=device)
                step = int(model.num_timesteps)
                if norm_file.is_file():
                    load_vecnormalize(norm_file, step=step)
                elif normalized:
                    raise FileNotFoundError(f"{norm_file.name} is missing")
                else:
                    norm_file = None
            except (RunDirError, FileNotFoundError) as exc:
                reason = str(exc).split("; ")[0]
                skipped.append(f"{model_file}: {reason}")
                warnings.warn(f"skipping {model_file}: {reason}", RuntimeWarning, stacklevel=2)
                continue
            return ResumePoint(step, model_file, norm_file)
        if skipped:
            raise RunDirError(f"no model of {self.path} loads ({'; '.join(skipped)}); start a new run "
                              "(--overwrite) or restore a copy")
        return None

    def model_for(self, checkpoint: str | Path | None = None) -> tuple[Path, Path]:
        """The run's model (None: :meth:`policy_files`) or a checkpoint (``step_N``, ``step_N.zip``, or a path) and
        its normaliser file."""
        if checkpoint is None:
            return self.policy_files()
        model = Path(checkpoint)
        if not model.is_absolute() and not model.exists():
            model = self.checkpoint_dir / model
        if model.suffix != ".zip":
            model = model.with_name(model.name + ".zip")
        if not model.is_file():
            hint = " (the run has checkpoints: pass one of " + ", ".join(f"step_{s}" for s in self.checkpoints()) + \
                ")" if self.checkpoints() else ""
            raise FileNotFoundError(f"{model} is missing: nothing to load{hint}")
        return model, model.with_name(model.stem + "_vecnormalize.pkl")


def _is_dead(holder: dict) -> bool:
    """True when a lock's holder is certainly gone: a pid that no longer runs on this host (another host: unknown)."""
    if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it runs, as another user
        return False
    return False


def _describe_holder(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('since')})"


def model_files(target: str | Path) -> tuple[RunDir, Path, Path | None]:
    """``(run, model zip, normaliser or None)`` for a run directory (the model it ships: :meth:`RunDir.policy_files`)
    or a model / checkpoint zip."""
    path = Path(target).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{target}: no such run directory or model file; give the --run-dir of a train.py "
                                "run (holding model.zip and config.yaml) or a checkpoint .zip")
    if path.is_dir():
        run = RunDir(path)
        model, norm = run.policy_files()  # a run killed before its final save may still have kept a best policy
        if not model.is_file():
            raise FileNotFoundError(f"{run.model_file} is missing; is {path} a finished Kelvin run directory? "
                                    "(checkpoints/step_N.zip can be given directly)")
    else:
        if path.suffix != ".zip":
            raise RunDirError(f"{target}: expected a run directory or a .zip model file")
        run = RunDir(path.parent.parent if path.parent.name in ("checkpoints", "best") else path.parent)
        m = _STEP_RE.fullmatch(path.name)
        model = path
        norm = path.with_name(f"step_{m.group(1)}_vecnormalize.pkl") if m else path.with_name("vecnormalize.pkl")
    return run, model, norm if norm.is_file() else None


_PPO_MEMBERS = ("data", "policy.pth")
"""Members every ``PPO.save`` zip holds (a zip cut short can still open on a nested archive's directory)."""


def load_ppo(model_file: str | Path, env=None, device: str = "cpu"):
    """A stable-baselines3 PPO model from a ``.zip`` (with ``env`` to continue training), checked first.

    A missing file is a ``FileNotFoundError``; a damaged one (truncated, corrupt member, not a PPO save)
    a :class:`RunDirError` naming it.
    """
    from stable_baselines3 import PPO

    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"{model_file} is missing: nothing to load")
    try:
        with zipfile.ZipFile(model_file) as zf:
            missing = [m for m in _PPO_MEMBERS if m not in zf.namelist()]
            if missing:
                raise zipfile.BadZipFile(f"no {missing[0]!r} member: truncated, or not a stable-baselines3 save")
            bad = zf.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"corrupt member {bad}")
        model = PPO.load(model_file, env=env, device=device)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, RuntimeError, AssertionError, TypeError,
            AttributeError, pickle.UnpicklingError) as exc:
        raise RunDirError(f"cannot load {model_file} ({type(exc).__name__}: {exc}); the model file is damaged: "
                          "use an earlier checkpoint, or train again") from None
    return model


def load_vecnormalize(norm_file: str | Path, venv=None, step: int | None = None):
    """The VecNormalize statistics pickled in ``norm_file`` (attached to ``venv`` when given, to go on training).

    ``step``: the ``num_timesteps`` of the model it is paired with; statistics saved by Kelvin record
    theirs, and a mismatch (a save interrupted between the two files) is a :class:`RunDirError`.
    """
    from stable_baselines3.common.vec_env import VecNormalize

    norm_file = Path(norm_file)
    if not norm_file.is_file():
        raise FileNotFoundError(f"{norm_file} is missing: the observation statistics of the model are not there")
    try:
        with open(norm_file, "rb") as fh:
            vec = pickle.load(fh)  # what VecNormalize.load does, before it wraps an env
    except (OSError, EOFError, ValueError, KeyError, AttributeError, ImportError, IndexError, TypeError,
            pickle.UnpicklingError) as exc:
        raise RunDirError(f"cannot read {norm_file} ({type(exc).__name__}: {exc}); the observation statistics "
                          "are part of the policy: use an earlier checkpoint, or train again") from None
    if not isinstance(vec, VecNormalize):
        raise RunDirError(f"{norm_file} holds a {type(vec).__name__}, not VecNormalize statistics; the observation "
                          "statistics are part of the policy: use an earlier checkpoint, or train again")
    saved = vec.__dict__.get("kelvin_step")  # not getattr: VecEnvWrapper.__getattr__ recurses without a venv
    if step is not None and saved is not None and saved != step:
        raise RunDirError(f"{norm_file} holds the statistics of step {saved}, its model is at step {step}: a save "
                          "was interrupted between the two files")
    if venv is not None:
        vec.set_venv(venv)
    return vec


def content_hash(*files: str | Path | None) -> str:
    """SHA-256 (hex) of the bytes of ``files`` in order (None: an absent file, hashed as such): what identifies a
    saved model and its statistics, whatever their names (a cache keyed on it never mixes two models)."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(b"\0absent\0" if file is None else Path(file).read_bytes())
        digest.update(b"\0next\0")
    return digest.hexdigest()


def saved_step(model_file: str | Path) -> int | None:
    """``num_timesteps`` recorded in a ``PPO.save`` zip, read without loading the model (None: unreadable)."""
    try:
        with zipfile.ZipFile(model_file) as zf:
            return int(json.loads(zf.read("data"))["num_timesteps"])
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, TypeError, EOFError):
        return None


# ---------------------------------------------------------------------- snapshots (model + normaliser)
@dataclass(frozen=True)
class Snapshot:
    """A PPO model and its VecNormalize serialised in memory at one moment of training.

    ``model`` holds the bytes ``PPO.save`` writes (parameters, optimizer state, ``num_timesteps``,
    ``_n_updates``: SB3 counts one per epoch of each update), ``normalizer`` those of ``VecNormalize.save`` (None without normalisation).
    Training takes one after every PPO update, so whatever interrupts it, the state it saves is one a
    completed update left, and a rollout in progress is never half in it.
    """

    step: int
    n_updates: int
    model: bytes
    normalizer: bytes | None

    @classmethod
    def take(cls, model, vec_normalize=None) -> "Snapshot":
        buffer = io.BytesIO()
        model.save(buffer)
        norm = None
        if vec_normalize is not None:
            vec_normalize.kelvin_step = int(model.num_timesteps)  # pairs the statistics with their model
            norm = pickle.dumps(vec_normalize)  # what VecNormalize.save writes
        return cls(int(model.num_timesteps), int(model._n_updates), buffer.getvalue(), norm)

    def write(self, model_file: str | Path, norm_file: str | Path) -> None:
        """Write the model and its normaliser as one transaction: both go to temporary files, each checked to load
        back (the normaliser paired with this step), and only once both are complete are they renamed over the
        previous pair (:func:`_commit`). A failed save (full disk, read-only file system) leaves the previous pair
        as it was, loadable, and raises a :class:`SaveError`."""
        model_file, norm_file = Path(model_file), Path(norm_file)
        staged = []
        try:
            if self.normalizer is not None:
                staged.append((_stage(norm_file, self.normalizer,
                                      check=lambda p: load_vecnormalize(p, step=self.step)), norm_file))
            staged.append((_stage(model_file, self.model, check=load_ppo), model_file))
        except BaseException:
            for tmp, _ in staged:
                tmp.unlink(missing_ok=True)
            raise
        _commit(staged)
        if self.normalizer is None:
            norm_file.unlink(missing_ok=True)  # a stale normaliser must not pass for this model's


@dataclass(frozen=True)
class ResumePoint:
    """A model of a run that loads, with its normaliser file (None when the run did not normalise)."""

    step: int
    model_file: Path
    norm_file: Path | None


def normalization_stats(vec_normalize) -> dict | None:
    """``{"mean", "var", "clip", "epsilon"}`` of a VecNormalize that normalised observations, else None."""
    if vec_normalize is None or not getattr(vec_normalize, "norm_obs", False):
        return None
    mean, var = np.array(vec_normalize.obs_rms.mean, dtype=np.float64), np.array(vec_normalize.obs_rms.var, dtype=np.float64)
    raw = vars(vec_normalize).get("raw_columns", [])  # kelvin.heads.PartialVecNormalize: these pass unchanged
    mean[raw], var[raw] = 0.0, 1.0 - vec_normalize.epsilon
    return {"mean": mean, "var": var, "clip": vec_normalize.clip_obs, "epsilon": vec_normalize.epsilon}
