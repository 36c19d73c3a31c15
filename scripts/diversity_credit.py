"""Does the training signal credit a sample with what its tokens did to its group? A check on real rollouts.

A sample's reward carries its own diversity terms (``group_semantic``, ``group_ngram``: its distance to the other
samples of its group), but its tokens also move the others' terms, which their rewards carry. The training return
adds that through ``reward.group_diversity_credit``: ``2`` counts the sample's own terms twice (exact for a
symmetric pairwise measure), ``exact`` adds what its tokens did to the others (envs/rewards.py). This script
measures which is right, on a run's tuned base and any split: one row of every group (row % K == 0) deviates from
the base by ``--delta`` action units on the tokens ``--tokens A:B`` (positions A..B-1, default the first 4), the
other rows keep the base, and with the
env's per-row uniforms their tokens stay what they were. Per group it compares the deviating sample's change in
quality and in its own diversity terms with the change in the others' terms, and prints, with paired 95% intervals
over the groups, each credit's training signal for the deviation against the group's true change (the change of
the sum of its samples' absolute returns, the objective validation scores):

    .venv/bin/python scripts/diversity_credit.py runs/trisnr-s1 --split train --prompts 86 --seeds 4 --lam 1

``--at learned`` deviates from the run's learned policy instead: the slope PPO follows where it ended.
``--noise SIGMA`` adds exploration noise to every row, deviating or not, as PPO's samples carry it (the same
draws in both runs): the slope of the noisy policy PPO measures, which may differ from the deterministic one's.
``--group-noise`` gives a group's samples one draw: the slope without the spread per-row noise gives a group.

A credit that over-counts what the deviation does to the others steers PPO past the optimum in the direction that
raises the sample's own diversity (hotter).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.rewards import GROUP_DIVERSITY_COMPONENTS  # noqa: E402
from kelvin.tuning import quality_diversity  # noqa: E402
from kelvin.validation import paired_margin  # noqa: E402
from policies.base import TemperaturePolicy  # noqa: E402


class OneRowDeviation(TemperaturePolicy):
    """A policy plus ``delta`` action units on the tokens at positions ``tokens`` = (A, B), A..B-1, of one row per
    group (row % K == 0)."""

    name = "one-row-deviation"

    def __init__(self, policy: TemperaturePolicy, delta: float, tokens: tuple[int, int], group_size: int):
        super().__init__(policy.feature_spec, policy.action_mapping)
        self.policy, self.delta, self.tokens, self.group_size = policy, delta, tokens, group_size

    def actions(self, obs: torch.Tensor, episode_start: torch.Tensor | None = None) -> torch.Tensor:
        act = self.policy.actions(obs, episode_start)
        row = torch.arange(obs.shape[0], device=obs.device) % self.group_size == 0
        position = self.tokens_done(obs)
        inside = (position >= self.tokens[0]) & (position < self.tokens[1])
        return (act + torch.where(row & inside, self.delta, 0.0)).clamp(-1.0, 1.0)


class EpisodeNoise(TemperaturePolicy):
    """A policy plus exploration noise as PPO's gSDE draws it in the position-bin recipes: per row and episode one
    N(0, ``sigma``²) action offset for each position bin (the observation's ``position_bin_*`` one-hot; one bin
    without ``env.features.position_bins``), held for the episode. Row r's e-th episode gets the same offsets in
    every run built with the same ``seed``, whatever the other rows do. ``group_size`` G > 1: the G rows of a
    group (contiguous) share one draw, row r that of row G * (r // G)."""

    name = "episode-noise"

    def __init__(self, policy: TemperaturePolicy, sigma: float, seed: int, group_size: int = 1):
        super().__init__(policy.feature_spec, policy.action_mapping)
        self.policy, self.sigma, self.group_size = policy, sigma, group_size
        spec = policy.feature_spec
        self.bin_cols = [spec.index(f"position_bin_{i}") for i in range(len(spec.position_bins) + 1)] \
            if spec.position_bins else None
        self.generator = torch.Generator().manual_seed(seed)
        self.table = torch.zeros(0, 0, len(spec.position_bins) + 1)  # (rows, episodes, bins)
        self.episode: torch.Tensor | None = None  # (B,) the episode index of each row

    def _offsets(self, rows: int, episodes: int) -> None:
        while self.table.shape[0] < rows or self.table.shape[1] < episodes:
            grown = torch.randn(max(rows, self.table.shape[0]), 2 * max(episodes, 8, self.table.shape[1]),
                                self.table.shape[2], generator=self.generator) * self.sigma
            grown[:self.table.shape[0], :self.table.shape[1]] = self.table
            self.table = grown

    def actions(self, obs: torch.Tensor, episode_start: torch.Tensor | None = None) -> torch.Tensor:
        act = self.policy.actions(obs, episode_start)
        position = self.tokens_done(obs).long().cpu()
        if self.episode is None or self.episode.shape[0] != obs.shape[0]:
            self.episode = torch.full((obs.shape[0],), -1, dtype=torch.long)
        self.episode += (position == 0).long()
        self._offsets(obs.shape[0], int(self.episode.max()) + 1)
        rows = torch.arange(obs.shape[0])
        bins = torch.zeros_like(rows) if self.bin_cols is None else obs[:, self.bin_cols].argmax(1).cpu()
        noise = self.table[rows // self.group_size * self.group_size, self.episode.clamp(min=0), bins]
        return (act + noise.to(act)).clamp(-1.0, 1.0)


def deviation_terms(before: list[dict], after: list[dict], group_size: int, reward_config) -> dict[str, np.ndarray]:
    """Per group (G,): the deviating sample's (row % K == 0) change in weighted quality (``quality_own``) and
    weighted diversity (``diversity_own``), the others' summed changes (``quality_others``, ``diversity_others``),
    the same for each group component (``group_semantic_own`` ...), and the change of its ``group_ngram_effect``
    credit term. ``before`` / ``after``: the same env and seed's episodes of a policy and of its
    :class:`OneRowDeviation`, row for row."""
    if [(e["row"], e["k"], e["prompt_id"]) for e in before] != [(e["row"], e["k"], e["prompt_id"]) for e in after]:
        raise ValueError("the two runs' episodes differ in rows or prompts: run both on the same env and seed")
    q0, d0 = quality_diversity(before, reward_config)
    q1, d1 = quality_diversity(after, reward_config)
    weights = reward_config.weights()
    groups: dict[tuple[int, int], list[int]] = {}
    for n, e in enumerate(before):
        groups.setdefault((int(e["row"]) // group_size, int(e["k"])), []).append(n)
    names = ["quality_own", "quality_others", "diversity_own", "diversity_others", "ngram_effect_own",
             *[f"{c}_{who}" for c in GROUP_DIVERSITY_COMPONENTS for who in ("own", "others")]]
    out: dict[str, list[float]] = {k: [] for k in names}
    for key in sorted(groups):
        members = groups[key]
        own = [n for n in members if int(before[n]["row"]) % group_size == 0]
        others = [n for n in members if int(before[n]["row"]) % group_size != 0]
        if len(own) != 1 or len(others) != group_size - 1:
            raise ValueError(f"group {key}: {len(members)} episodes, not one deviating row and {group_size - 1} others")
        i = own[0]
        out["quality_own"].append(q1[i] - q0[i])
        out["quality_others"].append(sum(q1[n] - q0[n] for n in others))
        out["diversity_own"].append(d1[i] - d0[i])
        out["diversity_others"].append(sum(d1[n] - d0[n] for n in others))
        effect = [e["reward_components"].get("group_ngram_effect", np.nan) for e in (before[i], after[i])]
        out["ngram_effect_own"].append(weights["group_ngram"] * (effect[1] - effect[0]))
        for c in GROUP_DIVERSITY_COMPONENTS:
            change = [after[n]["reward_components"][c] - before[n]["reward_components"][c] for n in members]
            out[f"{c}_own"].append(weights[c] * change[members.index(i)])
            out[f"{c}_others"].append(weights[c] * (sum(change) - change[members.index(i)]))
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def credit_signals(terms: dict[str, np.ndarray], lam: float) -> dict[str, np.ndarray]:
    """Per group: the deviating sample's training signal for its deviation under each credit (``credit 1``,
    ``credit 2``, ``exact``) and the group's true change (``group``: every sample's absolute return summed)."""
    own = terms["quality_own"]
    semantic = terms["group_semantic_own"]
    return {
        "credit 1": own + lam * terms["diversity_own"],
        "credit 2": own + lam * (terms["diversity_own"] + semantic + terms["group_ngram_own"]),
        "exact": own + lam * (terms["diversity_own"] + semantic + terms["ngram_effect_own"]),
        "group": own + terms["quality_others"] + lam * (terms["diversity_own"] + terms["diversity_others"]),
    }


def _interval(values: np.ndarray) -> str:
    m = paired_margin(values, np.zeros_like(values), 2000, 0)
    return f"{m['mean']:+.3f} [{m['low']:+.3f}, {m['high']:+.3f}]"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a finished run directory with base.json")
    p.add_argument("--split", default="train")
    p.add_argument("--prompts", type=int, default=None, help="prompts (default: every prompt of the split)")
    p.add_argument("--seeds", type=int, default=2, help="random streams (validation seeds 0..N-1)")
    p.add_argument("--lam", type=float, default=1.0, help="the dial λ of every group")
    p.add_argument("--delta", type=float, default=0.5, help="the deviation, in action units")
    p.add_argument("--at", choices=("base", "learned"), default="base",
                   help="the policy the row deviates from: the run's tuned base or its learned policy")
    p.add_argument("--tokens", default="0:4", help="A:B, the deviation's token positions A..B-1 (0:4 the first 4)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="every row explores as PPO does: per episode and position bin one N(0, NOISE^2) action "
                        "offset (the same draws in both runs); 0 (default): deterministic rows")
    p.add_argument("--group-noise", action="store_true",
                   help="with --noise: a group's samples share one draw, not one each")
    args = p.parse_args(argv)
    try:
        tokens = tuple(int(v) for v in args.tokens.split(":"))
        if len(tokens) != 2 or not 0 <= tokens[0] < tokens[1]:
            raise ValueError
    except ValueError:
        p.error(f"--tokens takes A:B with 0 <= A < B (4:16: every token after the first 4); got {args.tokens!r}")
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1; got {args.seeds}")
    if not args.noise >= 0.0:
        p.error(f"--noise must be >= 0 (action units, e.g. 0.22 for log std -1.5); got {args.noise}")

    from envs.lm import load_causal_lm
    from envs.prompts import load_prompts
    from kelvin.evaluation.policies import load_base_policy, load_learned_policy
    from kelvin.rundir import RunDir
    from kelvin.validation import Validation

    config = RunDir(args.run).load_config()
    low, high = config.env.diversity_bounds
    if not low <= args.lam <= high:
        p.error(f"--lam {args.lam:g}: must lie in the run's range [{low:g}, {high:g}]")
    k = config.env.group_size
    n = args.prompts or len(load_prompts(split=args.split))
    config = replace(config, train=replace(config.train, validation_split=args.split, validation_prompts=n,
                                           validation_diversity=(args.lam,), validation_streams=1))
    lm = load_causal_lm(config.model)
    load = load_base_policy if args.at == "base" else load_learned_policy
    policy = load(args.run, config, [])[0]

    def explored(seed: int) -> TemperaturePolicy:
        shared = k if args.group_noise else 1
        return EpisodeNoise(policy, args.noise, seed, group_size=shared) if args.noise > 0 else policy

    parts: list[dict[str, np.ndarray]] = []
    for seed in range(args.seeds):
        validation = Validation(replace(config, train=replace(config.train, seed=seed)), lm, None, None)
        deviation = OneRowDeviation(explored(seed), args.delta, tokens, k)
        try:
            parts.append(deviation_terms(validation.episodes(explored(seed)), validation.episodes(deviation), k,
                                         config.reward))
        finally:
            validation.close()
    terms = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
    noise = f", every {'group' if args.group_noise else 'row'} ± N(0, {args.noise:g}²) per episode and bin" \
        if args.noise > 0 else ""
    print(f"{args.run} ({args.at}{noise}), {args.split} split, {n} prompts x {k} samples x seeds 0..{args.seeds - 1}, λ = {args.lam:g}: "
          f"row 0 of each group {args.delta:+g} action on tokens {tokens[0]}..{tokens[1] - 1} ({len(terms['quality_own'])} "
          "groups); changes, weighted:")
    for name, values in terms.items():
        print(f"  {name:24s} {_interval(values)}")
    for c in GROUP_DIVERSITY_COMPONENTS:
        own, others = terms[f"{c}_own"].mean(), terms[f"{c}_others"].mean()
        ratio = f"{others / own:+.2f}" if own != 0 else "n/a (its own did not move)"
        print(f"  {c}: the others' change / the sample's own = {ratio} (credit 2 assumes +1)")
    print("training signal of the deviation vs the group's true change:")
    for name, values in credit_signals(terms, args.lam).items():
        print(f"  {name:10s} {_interval(values)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
