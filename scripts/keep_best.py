"""``train.keep_best`` after the fact: validate a finished run's checkpoints and keep the best in ``RUN/best/``.

A run trained without ``train.keep_best`` (or validated too rarely to pick well) still has its checkpoints. This
script runs training's own validation (:class:`kelvin.validation.Validation`: the run's validation prompts, λ grid
and random streams, its cached baselines) on the checkpoint of every ``--every`` PPO updates and on ``model.zip``,
and hands each to the same :class:`kelvin.callbacks.KeepBest` training uses: ``best/`` then holds the policy with
the highest validation margin against the base (the base itself, margin 0, when none beats it), and the run's
export is rewritten from it. ``evaluate.py RUN`` and the samplers then use it; ``model.zip`` is left alone.

    .venv/bin/python scripts/keep_best.py runs/tri-sd-s1 --every 10

The checkpoints are validated with the statistics saved beside them; training validates at a rollout's end, one
rollout's worth of observation statistics later, so a margin here can differ a little from the run's own
``validation.json`` at the same update.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.lm import load_causal_lm  # noqa: E402
from kelvin.callbacks import KeepBest, updates  # noqa: E402
from kelvin.config import ConfigError  # noqa: E402
from kelvin.evaluation.policies import load_base_policy, load_learned_policy  # noqa: E402
from kelvin.export import export_run  # noqa: E402
from kelvin.atomic import write_text_atomic  # noqa: E402
from kelvin.rundir import RunDir, Snapshot, load_ppo, saved_step  # noqa: E402
from kelvin.training import zero_residual  # noqa: E402
from kelvin.tuning import EpisodeCache  # noqa: E402
from kelvin.validation import Validation, margin_text  # noqa: E402


def candidates(run: RunDir, config, every: int) -> list[tuple[int, Path, Path]]:
    """``(updates, model file, normaliser file)`` of the checkpoints at a multiple of ``every`` updates and of
    ``model.zip``, by update."""
    found = {}
    for step in run.checkpoints():
        n = updates(config, step)
        if n % every == 0:
            found[n] = run.checkpoint_files(step)
    if run.model_file.is_file():
        found[updates(config, saved_step(run.model_file) or 0)] = (run.model_file, run.normalizer_file)
    return [(n, *found[n]) for n in sorted(found)]


def file_snapshot(model_file: Path, norm_file: Path) -> Snapshot:
    """A saved model and its normaliser as a :class:`Snapshot` (the bytes as they are)."""
    norm = norm_file.read_bytes() if norm_file.is_file() else None
    return Snapshot(int(saved_step(model_file) or 0), 0, model_file.read_bytes(), norm)


def base_snapshot(model_file: Path, norm_file: Path) -> Snapshot:
    """The run's start: a saved model with its residual layer at zero (the deterministic policy is the base),
    with the normaliser saved beside it (its statistics then touch nothing)."""
    model = load_ppo(model_file)
    zero_residual(model)
    snapshot = Snapshot.take(model)
    return replace(snapshot, normalizer=norm_file.read_bytes() if norm_file.is_file() else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="a train.py run directory with checkpoints")
    p.add_argument("--every", type=int, default=None,
                   help="validate the checkpoint of every N PPO updates (default: the run's train.validate_every)")
    p.add_argument("--streams", type=int, default=None,
                   help="validate on N random streams (default: the run's train.validation_streams); the new "
                        "streams' baselines are computed once and cached in the run")
    p.add_argument("--prompts", type=int, default=None,
                   help="validate on the first N validation prompts, taken round-robin over categories (default: "
                        "the run's train.validation_prompts; more than the split holds takes all of it)")
    p.add_argument("--mix", default=None,
                   help="how many validation prompts each category gives, split or equal (default: the run's "
                        "train.validation_mix)")
    p.add_argument("--overwrite", action="store_true", help="replace the run's best/ if it has one")
    args = p.parse_args(argv)
    run = RunDir(args.run).require()
    overrides = [f"train.{field}={n}" for field, n in (("validation_streams", args.streams),
                                                       ("validation_prompts", args.prompts),
                                                       ("validation_mix", args.mix)) if n is not None]
    try:  # the config's own checks name a bad value
        config = run.load_config(overrides)
    except ConfigError as exc:
        p.error(str(exc))
    every = config.train.validate_every if args.every is None else args.every
    if every < 1:
        p.error(f"--every {every}: give a number of PPO updates >= 1")
    if run.best_dir.exists():
        if not args.overwrite:
            p.error(f"{run.best_dir} exists (the run kept a best policy already); --overwrite replaces it")
        shutil.rmtree(run.best_dir)
    found = candidates(run, config, every)
    if not found:
        p.error(f"{run.path} has no model.zip and no checkpoint at a multiple of {every} updates")
    warnings: list[str] = []
    lm = load_causal_lm(config.model)
    base, _ = load_base_policy(str(run.path), config, warnings)
    cache = EpisodeCache(run.cache_dir, EpisodeCache.default_dir(config.model))
    validation = Validation(config, lm, base, cache)
    try:
        validation.prepare()
        cache.keep_in(run.cache_dir)  # new streams' baselines go with the run, as training's do
        keep = KeepBest(run, base_snapshot(*found[0][1:]))
        scores = []
        for n, model_file, norm_file in found:
            policy = load_learned_policy(str(model_file), config, warnings)[0]
            v = validation.compare(validation.episodes(policy), saved_step(model_file) or 0)
            kept = keep.offer(v, n, lambda: file_snapshot(model_file, norm_file))
            name, value = KeepBest.criterion(v)
            scores.append({"updates": n, "file": str(model_file), name: v[name],
                           "at_each_lambda": {k: at.get(name) for k, at in v["by_diversity"].items()}})
            print(f"update {n:4d}: {name} {margin_text(v[name])}"
                  + "".join(f"  λ={k} {at[name]['mean']:+.3f}" for k, at in v["by_diversity"].items())
                  + ("  <- kept" if kept else ""), flush=True)
    finally:
        validation.close()
    record = {**keep.record, "picked_by": "scripts/keep_best.py", "every": every,
              "streams": config.train.validation_streams, "prompts": len(validation.prompts),
              "mix": config.train.validation_mix, "validated": scores}
    write_text_atomic(run.best_record_file, json.dumps(record, indent=2))
    export = export_run(run.path, run.export_dir, lm=lm)
    print(f"kept update {record['updates']} ({record['what']}) in {run.best_dir}; exported to {export}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
