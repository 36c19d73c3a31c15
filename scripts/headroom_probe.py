"""How much a hand-made, state-dependent change of a run's tuned base gains on held-out prompts.

PPO's residual can only win what some state-dependent temperature wins over the base. This script measures the
best shapes the validation probes found (docs/results.md), fixed by hand before they are run here, against the
base alone, on any split with the same prompts and random stream for both (training's validation machinery):

* ``hot2``: at λ >= 1, +0.25 action (0.3 T on the default [0, 2.4] range) on the first 2 tokens; at λ = 0,
  -0.1 everywhere.
* ``hot4``: at λ >= 1, +0.5 on the first 4 tokens and -0.1 after; at λ = 0, -0.1 everywhere.

The λ = 0 part is the same in both, so their λ = 0 rows must be identical: a check on the script itself. Any other
shape is ``WHERE:BOOST:AFTER`` (``--shapes 4:0.1:0,4:0.25:0``: the slope of the hot start near the base), or
``WHERE:BOOST:AFTER:CATEGORIES`` to change only the rows of some categories (``4:0.5:0:open``: the open prompts,
every category but math and factual_question; ``:math+code``: those two). ``WHERE`` is a number of first tokens or a
condition on one observed feature of the untempered distribution, ``FEATURE<VALUE`` or ``FEATURE>VALUE``
(``max_prob<0.3:0.5:0``: +0.5 where the model's top token has less than 0.3 probability, the base elsewhere). Usage:

    .venv/bin/python scripts/headroom_probe.py runs/default --split test            # the whole test split
    .venv/bin/python scripts/headroom_probe.py runs/default --split test --seeds 4    # 16 samples of each prompt
    .venv/bin/python scripts/headroom_probe.py runs/default --split validation --prompts 80
    .venv/bin/python scripts/headroom_probe.py runs/b64n64-s0 --split test --seeds 4 --learned
    .venv/bin/python scripts/headroom_probe.py runs/hold0-s0 --split test --seeds 4 --learned --shapes ''

With ``--learned`` the run's learned policy is measured the same way (``learned − base`` is what PPO adds).
It prints, per λ, probe − base reward with its paired 95% interval over the prompts (a prompt's value: the mean
over its samples of every seed), and accuracy. ``--save FILE`` also writes those per-prompt values as JSON;
``--pool FILE FILE ...`` reads several (one per training seed, the same split and prompts) and prints each
policy − its own run's base averaged over the runs, prompt by prompt, with the interval over the prompts, and each
run's own mean with their standard deviation (that interval leaves out how far seeds differ; the SD shows it):

    .venv/bin/python scripts/headroom_probe.py runs/hold0-s1 --split test --seeds 4 --learned --shapes '' \
        --save runs/hold0-s1/probe-test.json
    .venv/bin/python scripts/headroom_probe.py --pool runs/hold0-s*/probe-test.json

``--against FILE ...`` (one per ``--pool`` file, in the same order: the same run before more training, say) puts
each of those runs' learned policy in the base's place, so the figures are what the later policy adds over the earlier
one, prompt by prompt; the two probes must share their base's rewards (the same base, split, prompts and streams):

    .venv/bin/python scripts/headroom_probe.py --pool runs/lsd3long-s*/probe-test-l12.json \
        --against runs/lsd3-s0/probe-test-l2.json runs/lsd3-s1/probe-test-l2.json runs/lsd3-s2/probe-test-l2.json

``--reference NAME`` (with ``--pool``) puts a probed policy in the base's place instead, so each other policy is
measured against it: the learned policy against the hand-made shape its residual started at, say
(``--shapes 4:0:-0.1`` in the probe, ``--reference 4:0:-0.1`` in the pool).

``--splice N`` also runs the learned policy on the first N tokens and the base after them ("learned-start"): with
``--learned``, learned − learned-start is what the learned finish adds on top of its own start.

``--lambdas 2`` probes part of the λ grid (each λ runs on its own seeded env, so its figures are those of the whole
grid); ``--first-seed 4 --seeds 4`` runs the streams 4..7, which ``--pool`` averages with a saved run of streams
0..3 into the figures of 32 samples a prompt:

    .venv/bin/python scripts/headroom_probe.py runs/twin02-s0 --split test --lambdas 2 --first-seed 4 --seeds 4 \
        --shapes 4:0.5:0 --save runs/twin02-s0/probe-4to7.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.lm import load_causal_lm  # noqa: E402
from envs.prompts import load_prompts  # noqa: E402
from kelvin.evaluation.policies import load_base_policy, load_learned_policy  # noqa: E402
from kelvin.rundir import RunDir  # noqa: E402
from kelvin.validation import Validation, paired_margin, prompt_means, summarize_episodes  # noqa: E402
from policies.base import TemperaturePolicy  # noqa: E402

# (where: the first tokens that get the boost or a feature's test, boost, offset elsewhere, categories: () = all) at
# λ >= 1; the offset at λ = 0 is LAMBDA0_OFFSET.
SHAPES = {"hot2": (2, 0.25, 0.0, ()), "hot4": (4, 0.5, -0.1, ())}
LAMBDA0_OFFSET = -0.1


# --shapes' category word for the open prompts: every category but the answerable ones
ANSWERABLE = ("math", "factual_question")


def parse_shapes(text: str) -> dict[str, tuple]:
    """``--shapes``: comma-separated names of :data:`SHAPES` or ``WHERE:BOOST:AFTER[:CATEGORIES]`` (e.g.
    ``4:0.1:0``, the hot4 shape at a fifth of its boost: the slope near the base; ``4:0.5:0:open``, the same
    change only on prompts of a category outside :data:`ANSWERABLE`, or ``:math+code`` on those categories; the
    other rows keep the base at λ >= 1). ``WHERE`` is an int (the first tokens) or ``(FEATURE, '<' or '>', VALUE)``
    from ``FEATURE<VALUE``; the feature's name is checked against the run's when the shape is built. Raises
    ValueError saying what it takes."""
    shapes = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item in SHAPES:
            shapes[item] = SHAPES[item]
            continue
        fields = item.split(":")
        try:
            if len(fields) not in (3, 4) or (len(fields) == 4 and not fields[3]):
                raise ValueError
            shapes[item] = (_parse_where(fields[0]), float(fields[1]), float(fields[2]),
                            tuple(fields[3].split("+")) if len(fields) == 4 else ())
        except ValueError:
            raise ValueError(f"--shapes takes names from {', '.join(SHAPES)} or WHERE:BOOST:AFTER[:CATEGORIES] (WHERE: "
                             f"first tokens >= 1 or FEATURE<VALUE / FEATURE>VALUE; boost and offset after them in "
                             f"action units; categories joined by + or 'open'; e.g. 4:0.1:0, 4:0.5:0:open or "
                             f"max_prob<0.3:0.5:0); got {item!r}") from None
    return shapes


def _parse_where(text: str) -> int | tuple[str, str, float]:
    """A shape's ``WHERE``: ``4`` -> 4 (first tokens, >= 1); ``max_prob<0.3`` -> ("max_prob", "<", 0.3) (a finite
    threshold). Raises ValueError otherwise."""
    for op in "<>":
        name, sep, value = text.partition(op)
        if sep:
            if not name.strip() or not math.isfinite(float(value)):
                raise ValueError(text)
            return (name.strip(), op, float(value))
    if int(text) < 1:
        raise ValueError(text)
    return int(text)


def shaped_offset(hit: torch.Tensor, diversity: torch.Tensor, shape: tuple,
                  chosen: torch.Tensor | None = None) -> torch.Tensor:
    """The hand-made change (B,) in action units given the rows where the shape's condition holds, ``hit`` (B,)
    bool (the first tokens, or the feature's test), and the dial ``diversity`` (B,); ``chosen`` (B,) bool: the rows
    of the shape's categories (None: every row)."""
    boost, after = shape[1:3]
    hot = torch.where(hit, torch.full_like(diversity, boost), torch.full_like(diversity, after))
    if chosen is not None:
        hot = torch.where(chosen, hot, torch.zeros_like(hot))
    return torch.where(diversity >= 0.5, hot, torch.full_like(diversity, LAMBDA0_OFFSET))


class ShapedBase(TemperaturePolicy):
    """A tuned base plus :func:`shaped_offset`, clipped to the action range."""

    name = "shaped-base"

    def __init__(self, base: TemperaturePolicy, shape: tuple):
        super().__init__(base.feature_spec, base.action_mapping)
        self.base, self.shape = base, shape
        spec = base.feature_spec
        self._diversity_col = spec.index("diversity")
        if shape[3] and not spec.category_slots:  # "open" would name no slot and the shape would apply everywhere
            raise ValueError(f"--shapes: categories {list(shape[3])} given, but the run's observations carry no "
                             "category (env.include_category: false); drop the categories from the shape")
        open_slots = [c for c in spec.category_slots if c not in ANSWERABLE]
        cats = [slot for c in shape[3] for slot in (open_slots if c == "open" else [c])]
        unknown = [c for c in cats if c not in spec.category_slots]
        if unknown:
            raise ValueError(f"--shapes: categories {unknown} are not the run's ({', '.join(spec.category_slots)})")
        self._category_cols = [spec.index(f"category_{c}") for c in cats] or None
        try:  # FeatureSpec.index names an unknown feature and the nearest ones
            self._where_col = None if isinstance(shape[0], int) else spec.index(shape[0][0])
        except KeyError as exc:
            raise ValueError(f"--shapes: {exc.args[0]}") from None

    def hit(self, obs: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the rows where the shape's condition holds (its first tokens, or its feature's test)."""
        where = self.shape[0]
        if self._where_col is None:
            return self.tokens_done(obs) < where
        column = obs[:, self._where_col]
        return column < where[2] if where[1] == "<" else column > where[2]

    def actions(self, obs: torch.Tensor, episode_start: torch.Tensor | None = None) -> torch.Tensor:
        chosen = None if self._category_cols is None else obs[:, self._category_cols].sum(dim=-1) > 0.5
        offset = shaped_offset(self.hit(obs), obs[:, self._diversity_col], self.shape, chosen)
        return (self.base.actions(obs, episode_start) + offset).clamp(-1.0, 1.0)


class Spliced(TemperaturePolicy):
    """``first``'s action on a row's first ``tokens`` tokens and ``then``'s after them: a learned start on its base's
    finish, say. Both policies see every step (a stateful one keeps its state)."""

    name = "spliced"

    def __init__(self, first: TemperaturePolicy, then: TemperaturePolicy, tokens: int):
        if first.feature_spec != then.feature_spec:
            raise ValueError("--splice: the learned policy and the base read different observations")
        super().__init__(then.feature_spec, then.action_mapping)
        self.first, self.then, self.tokens = first, then, tokens

    def actions(self, obs: torch.Tensor, episode_start: torch.Tensor | None = None) -> torch.Tensor:
        early = self.tokens_done(obs) < self.tokens
        return torch.where(early, self.first.actions(obs, episode_start), self.then.actions(obs, episode_start))


def pooled_differences(saved: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """Per λ and policy that every saved run probed, ``policy − base`` of each prompt averaged over the runs: {λ: {name:
    (P,)}}. Each run's difference is against its own base; a prompt missing from any run is refused, not dropped."""
    return mean_over_runs(run_differences(saved))


def mean_over_runs(by_run: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, np.ndarray]]:
    """:func:`run_differences`' (R, P) arrays averaged over the runs: {λ: {name: (P,)}}."""
    return {lam: {n: d.mean(axis=0) for n, d in diffs.items()} for lam, diffs in by_run.items()}


def run_differences(saved: list[dict]) -> dict[str, dict[str, np.ndarray]]:
    """:func:`pooled_differences` before the average over runs: {λ: {name: (R, P)}}, row r the r-th run's."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for lam in [lam for lam in saved[0]["reward"] if all(lam in run["reward"] for run in saved)]:
        ids = sorted(saved[0]["reward"][lam]["base"])
        names = [n for n in saved[0]["reward"][lam] if n != "base" and all(n in r["reward"][lam] for r in saved)]
        for run in saved:
            if sorted(run["reward"][lam]["base"]) != ids:
                raise ValueError(f"{run['run']}: its prompts at λ={lam} differ from {saved[0]['run']}'s; pool runs "
                                 "probed on the same split and --prompts")
        out[lam] = {n: np.asarray([[r["reward"][lam][n][pid] - r["reward"][lam]["base"][pid] for pid in ids]
                                   for r in saved], dtype=np.float64) for n in names}
    return out


def with_base(rewards: dict, new_base: dict, promoted: str | None = None) -> dict:
    """One λ's rewards ({policy: {prompt: reward}}) with ``new_base`` in the base's place; ``promoted``, the policy
    that became the base, leaves the others' list."""
    return {**{n: r for n, r in rewards.items() if n not in ("base", promoted)}, "base": new_base}


def against_earlier(later: dict, earlier: dict) -> dict:
    """``later`` with ``earlier``'s learned policy as its base, at each λ both probed (the base's rewards must agree:
    the same base, prompts and streams), so pooling it measures later − earlier prompt by prompt."""
    out = {**later, "reward": {}}
    for lam, rewards in later["reward"].items():
        if lam not in earlier["reward"] or "learned" not in earlier["reward"][lam]:
            continue
        base, before = earlier["reward"][lam]["base"], earlier["reward"][lam]["learned"]
        if sorted(base) != sorted(rewards["base"]) or any(abs(base[k] - rewards["base"][k]) > 1e-9 for k in base):
            raise ValueError(f"--against: {later['run']} and {earlier['run']} differ in their base's rewards at "
                             f"λ={lam}; compare probes of the same base, split, --prompts and --seeds")
        out["reward"][lam] = with_base(rewards, before)
    return out


def rebased(saved: dict, name: str) -> dict:
    """``saved`` with its policy ``name`` (a shape, say) in the base's place at each λ that probed it, so pooling it
    measures every other policy − ``name`` prompt by prompt. Raises ValueError when no λ probed it."""
    out = {**saved, "reward": {lam: with_base(rewards, rewards[name], promoted=name)
                               for lam, rewards in saved["reward"].items() if name in rewards}}
    if not out["reward"]:
        raise ValueError(f"--reference: {saved['run']} did not probe {name!r}; give a policy it probed "
                         f"({', '.join(next(iter(saved['reward'].values())))})")
    return out


def pool(paths: list[str], against: list[str] | None = None, reference: str = "base") -> int:
    saved = [json.loads(Path(path).read_text()) for path in paths]
    if reference != "base":
        saved = [rebased(s, reference) for s in saved]
    if against is not None:
        if len(against) != len(paths):
            print(f"error: --against takes one file per --pool file ({len(paths)}); got {len(against)}",
                  file=sys.stderr)
            return 2
        earlier = [json.loads(Path(path).read_text()) for path in against]
        saved = [against_earlier(s, e) for s, e in zip(saved, earlier)]
        print(f"base replaced by the learned policy of: {', '.join(e['run'] for e in earlier)}")
    print(f"{len(saved)} runs pooled: {', '.join(s['run'] for s in saved)}")
    by_run = run_differences(saved)
    pooled = mean_over_runs(by_run)
    if against is not None:  # the earlier probes' learned policy
        reference = "earlier"
    for lam in sorted({lam for s in saved for lam in s["reward"]} - set(pooled), key=float):
        print(f"λ={lam} left out: not probed in {', '.join(s['run'] for s in saved if lam not in s['reward'])}")
    if not any(pooled.values()):
        print("error: --pool: no λ with a policy that every run probed; pool probes of the same --lambdas "
              "(and --learned or --shapes)", file=sys.stderr)
        return 2
    for lam, diffs in pooled.items():
        cells = [f"λ={lam}"]
        for name, d in diffs.items():
            m = paired_margin(d, np.zeros_like(d), 2000, 0)
            cells.append(f"{name} − {reference} {m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]")
        print(" | ".join(cells))
        if len(saved) > 1:  # the interval above is over prompts; how far the runs (seeds) themselves differ:
            for name, d in by_run[lam].items():
                means = d.mean(axis=1)  # (R,)
                print(f"  {name} by run: {' / '.join(f'{x:+.3f}' for x in means)} (between runs, SD "
                      f"{means.std(ddof=1):.3f})")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", help="a finished run directory with base.json")
    p.add_argument("--pool", nargs="+", metavar="FILE", help="pool the JSON files --save wrote, one per run")
    p.add_argument("--against", nargs="+", metavar="FILE",
                   help="with --pool: one saved probe per pooled file whose learned policy takes the base's place")
    p.add_argument("--reference", default="base", metavar="NAME",
                   help="with --pool: each policy minus this one of the same probe (a shape, e.g. 4:0:-0.1) in place "
                        "of the base")
    p.add_argument("--save", default=None, help="also write the per-prompt rewards to this JSON file")
    p.add_argument("--split", default="test")
    p.add_argument("--prompts", type=int, default=None, help="prompts (default: every prompt of the split)")
    p.add_argument("--seeds", type=int, default=1,
                   help="random streams (validation seeds 0..N-1): N x K samples of every prompt and policy")
    p.add_argument("--first-seed", type=int, default=0,
                   help="start the streams at this seed: --first-seed 4 --seeds 4 runs seeds 4..7, which --pool "
                   "averages with a saved run of seeds 0..3 into the figures of --seeds 8")
    p.add_argument("--lambdas", default=None,
                   help="comma-separated λ to probe (default: the run's validation grid, 0 / 1 / 2); each λ runs on "
                   "its own seeded env, so a λ's figures do not depend on which others are probed")
    p.add_argument("--learned", action="store_true",
                   help="also the run's learned policy (what PPO adds, measured the same way)")
    p.add_argument("--splice", type=int, default=None, metavar="N",
                   help="also 'learned-start': the learned policy on the first N tokens, the base after them")
    p.add_argument("--model", default=None, help="with --learned: a checkpoint to read instead of the final model")
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated hand-made shapes to run: names (default {','.join(SHAPES)}; '' for none) "
                   "or WHERE:BOOST:AFTER[:CATEGORIES], e.g. 4:0.1:0 or max_prob<0.3:0.5:0")
    args = p.parse_args(argv)
    if (args.against or args.reference != "base") and not args.pool:
        p.error("--against and --reference compare pooled probes: give --pool FILE ... with them")
    if args.against and args.reference != "base":
        p.error("--against and --reference each replace the base: give one of them")
    if args.pool:
        try:
            return pool(args.pool, args.against, args.reference)
        except ValueError as exc:  # a --reference some probe lacks, or --against probes of another base
            p.error(str(exc))
    if args.run is None:
        p.error("give a run directory, or --pool FILE ...")
    try:
        shapes = parse_shapes(args.shapes)
    except ValueError as exc:
        p.error(str(exc))
    if args.splice is not None and args.splice < 1:
        p.error(f"--splice takes the first tokens to splice, >= 1; got {args.splice}")
    if args.seeds < 1 or args.first_seed < 0:
        p.error(f"--seeds must be >= 1 and --first-seed >= 0; got {args.seeds} and {args.first_seed}")
    config = RunDir(args.run).load_config()
    lambdas = None
    if args.lambdas:
        try:
            lambdas = [float(v) for v in args.lambdas.split(",") if v.strip()]
        except ValueError:
            p.error(f"--lambdas: give comma-separated numbers, e.g. 2 or 1,2; got {args.lambdas!r}")
        low, high = config.env.diversity_bounds
        if not lambdas or any(not low <= v <= high for v in lambdas):
            p.error(f"--lambdas {args.lambdas}: every λ must lie in the run's range [{low:g}, {high:g}]")
    n = args.prompts or len(load_prompts(split=args.split))
    warnings: list[str] = []
    lm = load_causal_lm(config.model)
    names = ("base", *shapes, *(("learned",) if args.learned else ()), *(("learned-start",) if args.splice else ()))
    config = replace(config, train=replace(config.train, validation_split=args.split, validation_prompts=n,
                                           validation_diversity=lambdas or config.train.validation_diversity,
                                           validation_streams=1))  # the streams are this script's seeds
    base, _ = load_base_policy(args.run, config, warnings)
    try:
        policies = {"base": base,
                    **{name: ShapedBase(base, shape) for name, shape in shapes.items()}}
    except ValueError as exc:  # a category or feature this run does not observe
        p.error(str(exc))
    learned = load_learned_policy(args.model or args.run, config, warnings)[0] if args.learned or args.splice else None
    if args.learned:
        policies["learned"] = learned
    if args.splice:
        try:
            policies["learned-start"] = Spliced(learned, base, args.splice)
        except ValueError as exc:  # a learned policy that reads other observations than its base
            p.error(str(exc))
    runs: dict[str, list[list[dict]]] = {name: [] for name in names}  # per policy, per λ: episodes of every seed
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    for seed in seeds:  # one Validation per random stream: its seed is train.seed's
        validation = Validation(replace(config, train=replace(config.train, seed=seed)), lm, None, None)
        try:
            for name, policy in policies.items():
                eps = validation.episodes(policy)
                per = len(eps) // len(validation.lambdas)
                blocks = [eps[i * per:(i + 1) * per] for i in range(len(validation.lambdas))]
                runs[name] = [old + new for old, new in zip(runs[name], blocks)] if runs[name] else blocks
        finally:  # each stream's env releases its model state and side threads before the next is built
            validation.close()
    print(f"{args.run}, {args.split} split, {n} prompts x {config.env.group_size} samples x seeds {seeds.start}.."
          f"{seeds.stop - 1}")
    saved = {"run": args.run, "split": args.split, "seeds": args.seeds, "first_seed": args.first_seed, "reward": {}}
    for i, lam in enumerate(validation.lambdas):
        part = {name: runs[name][i] for name in names}
        reward = {name: prompt_means(eps, [e["episode"]["r"] for e in eps]) for name, eps in part.items()}
        ids = sorted(reward["base"])
        vec = {name: np.asarray([reward[name][pid] for pid in ids]) for name in names}
        saved["reward"][f"{lam:g}"] = reward
        cells = [f"λ={lam:g}", f"base {vec['base'].mean():.3f} acc {summarize_episodes(part['base'])['accuracy']:.3f}"]
        for name in names[1:]:
            d = paired_margin(vec[name], vec["base"], 2000, 0)
            acc = summarize_episodes(part[name])["accuracy"]
            cells.append(f"{name} − base {d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}] acc {acc:.3f}")
        print(" | ".join(cells), flush=True)
    if args.save:
        Path(args.save).write_text(json.dumps(saved, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
