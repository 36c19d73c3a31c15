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

Training, export and evaluation all read runs through :class:`RunDir`, :func:`load_ppo` and
:func:`load_vecnormalize`: a missing file is a ``FileNotFoundError`` and a damaged one a
:class:`RunDirError`, each naming the file and what to do.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunDir", "RunDirError", "load_ppo", "load_vecnormalize", "model_files", "normalization_stats"]

_STEP_RE = re.compile(r"step_(\d+)\.zip")


class RunDirError(ValueError):
    """A run directory or a file in it that cannot be used; the message names the file and the fix."""


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

    def require(self) -> "RunDir":
        """Self, or a FileNotFoundError when the directory or its ``config.yaml`` is missing."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"no such run directory {self.path}; give the --run-dir of a train.py run")
        if not self.config_file.is_file():
            raise FileNotFoundError(f"{self.config_file} is missing: is {self.path} a Kelvin run directory?")
        return self

    def load_config(self, overrides: list[str] | None = None):
        """The run's resolved :class:`~kelvin.config.KelvinConfig` (its ``config.yaml``)."""
        from kelvin.config import load_config

        return load_config(self.require().config_file, overrides)

    def checkpoint_files(self, step: int) -> tuple[Path, Path]:
        """``checkpoints/step_N.zip`` and its ``step_N_vecnormalize.pkl``."""
        return self.checkpoint_dir / f"step_{step}.zip", self.checkpoint_dir / f"step_{step}_vecnormalize.pkl"

    def checkpoints(self) -> list[int]:
        """Steps of the checkpoints present, ascending."""
        steps = [int(m.group(1)) for p in self.checkpoint_dir.glob("step_*.zip") if (m := _STEP_RE.fullmatch(p.name))]
        return sorted(steps)

    def latest(self) -> tuple[Path, Path | None]:
        """The newest model of the run (``model.zip`` counts as the newest, then the highest step) and its
        normaliser file (None when absent)."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"no such run directory {self.path}; give the --run-dir of an earlier run")
        if self.model_file.is_file():
            model, norm = self.model_file, self.normalizer_file
        elif self.checkpoints():
            model, norm = self.checkpoint_files(self.checkpoints()[-1])
        else:
            raise FileNotFoundError(f"{self.path} holds no model.zip and no checkpoints/step_*.zip: nothing to "
                                    "resume (start a new run without --resume)")
        return model, norm if norm.is_file() else None

    def model_for(self, checkpoint: str | Path | None = None) -> tuple[Path, Path]:
        """``model.zip`` (None) or a checkpoint (``step_N``, ``step_N.zip``, or a path) and its normaliser file."""
        if checkpoint is None:
            return self.model_file, self.normalizer_file
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


def model_files(target: str | Path) -> tuple[RunDir, Path, Path | None]:
    """``(run, model zip, normaliser or None)`` for a run directory (its ``model.zip``) or a model / checkpoint zip."""
    path = Path(target).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{target}: no such run directory or model file; give the --run-dir of a train.py "
                                "run (holding model.zip and config.yaml) or a checkpoint .zip")
    if path.is_dir():
        run = RunDir(path)
        if not run.model_file.is_file():
            raise FileNotFoundError(f"{run.model_file} is missing; is {path} a finished Kelvin run directory? "
                                    "(checkpoints/step_N.zip can be given directly)")
        model, norm = run.model_file, run.normalizer_file
    else:
        if path.suffix != ".zip":
            raise RunDirError(f"{target}: expected a run directory or a .zip model file")
        run = RunDir(path.parent.parent if path.parent.name == "checkpoints" else path.parent)
        m = _STEP_RE.fullmatch(path.name)
        model = path
        norm = path.with_name(f"step_{m.group(1)}_vecnormalize.pkl") if m else path.with_name("vecnormalize.pkl")
    return run, model, norm if norm.is_file() else None


def load_ppo(model_file: str | Path, env=None, device: str = "cpu"):
    """A stable-baselines3 PPO model from a ``.zip`` (with ``env`` to continue training), checked first."""
    from stable_baselines3 import PPO

    model_file = Path(model_file)
    try:
        with zipfile.ZipFile(model_file) as zf:
            bad = zf.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"corrupt member {bad}")
        return PPO.load(model_file, env=env, device=device)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, RuntimeError) as exc:
        raise RunDirError(f"cannot load {model_file} ({type(exc).__name__}: {exc}); the model file is damaged: "
                          "use an earlier checkpoint, or train again") from None


def load_vecnormalize(norm_file: str | Path, venv=None):
    """The VecNormalize statistics pickled in ``norm_file`` (attached to ``venv`` when given, to go on training)."""
    norm_file = Path(norm_file)
    try:
        if venv is not None:
            from stable_baselines3.common.vec_env import VecNormalize

            return VecNormalize.load(str(norm_file), venv)
        with open(norm_file, "rb") as fh:
            return pickle.load(fh)  # what VecNormalize.load does, without wrapping an env
    except (OSError, EOFError, ValueError, KeyError, AttributeError, pickle.UnpicklingError) as exc:
        raise RunDirError(f"cannot read {norm_file} ({type(exc).__name__}: {exc}); the observation statistics "
                          "are part of the policy: use an earlier checkpoint, or train again") from None


def normalization_stats(vec_normalize) -> dict | None:
    """``{"mean", "var", "clip", "epsilon"}`` of a VecNormalize that normalised observations, else None."""
    if vec_normalize is None or not getattr(vec_normalize, "norm_obs", False):
        return None
    return {"mean": vec_normalize.obs_rms.mean, "var": vec_normalize.obs_rms.var, "clip": vec_normalize.clip_obs,
            "epsilon": vec_normalize.epsilon}
