"""How well the distribution's state at the answer's start tells an answerable prompt from an open one.

A policy without the category (``policy.base: fixed``, ``env.include_category: false``) must read the task from
what the featurizer sees. This script measures how much there is to read: for every prompt of each split it
decodes the first ``--tokens`` tokens greedily, takes the featurizer's distribution features
(:func:`policies.features.distribution_features`, T = 1) at each, and prints

- each feature's AUC for "answerable" (a prompt with answers) at the first token and averaged over the tokens
  (0.5: no information; 1 or 0: a perfect threshold);
- a logistic regression on all of them (standardised, L2), fitted on ``--fit-on`` and scored on every split:
  AUC and accuracy against the majority class's share;
- each category's mean ``max_prob`` at the first token on the fitting split.

    .venv/bin/python scripts/task_separability.py
    .venv/bin/python scripts/task_separability.py --tokens 1 --splits train,validation,test

(docs/results.md quotes it; about 1 minute on 2 CPU threads.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.lm import load_causal_lm  # noqa: E402
from envs.prompts import load_prompts  # noqa: E402
from policies.features import DISTRIBUTION_FEATURES, distribution_features  # noqa: E402


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """The probability that a random positive scores above a random negative, ties counting one half
    (the Mann-Whitney statistic over every pair)."""
    labels = np.asarray(labels, dtype=bool)
    pos, neg = np.asarray(scores)[labels], np.asarray(scores)[~labels]
    if not len(pos) or not len(neg):
        raise ValueError(f"AUC needs both classes: {len(pos)} positive and {len(neg)} negative labels")
    return float((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean())


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 3000,
                 rate: float = 0.5) -> Callable[[np.ndarray], np.ndarray]:
    """A logistic regression on standardised columns (full-batch gradient descent, an L2 penalty on every weight);
    returns the function from rows to logits (above 0: positive)."""
    y = np.asarray(y, dtype=float)
    mu, sd = x.mean(0), x.std(0) + 1e-9

    def design(rows):
        return np.c_[(rows - mu) / sd, np.ones(len(rows))]

    z, w = design(x), np.zeros(x.shape[1] + 1)
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-z @ w))
        w -= rate * (z.T @ (p - y) / len(y) + l2 * w)
    return lambda rows: design(rows) @ w


@torch.no_grad()
def start_features(lm, texts: list[str], tokens: int, batch: int = 16) -> np.ndarray:
    """(prompts, tokens, features): the distribution features at each of the first greedy tokens."""
    ids, out = lm.encode(texts), []
    for i in range(0, len(ids), batch):
        logits, state = lm.prefill(ids[i:i + batch])
        steps = []
        for t in range(tokens):
            steps.append(distribution_features(logits.float())[0])
            if t + 1 < tokens:
                logits = lm.decode(state, logits.argmax(-1))
        out.append(torch.stack(steps, 1))
    return torch.cat(out).numpy()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4, help="greedy tokens read at the answer's start")
    p.add_argument("--splits", default="train,test", help="comma-separated prompt splits")
    p.add_argument("--fit-on", default="train", help="the split the logistic regression is fitted on")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    if args.tokens < 1:
        raise SystemExit(f"--tokens must be at least 1, not {args.tokens}")
    if args.fit_on not in splits:
        splits.insert(0, args.fit_on)
    lm = load_causal_lm()
    data = {}
    for split in splits:
        prompts = load_prompts(split=split)
        data[split] = (start_features(lm, [p.text for p in prompts], args.tokens),
                       np.array([p.answerable for p in prompts]), np.array([p.category for p in prompts]))
    flat = {s: f.reshape(len(f), -1) for s, (f, _, _) in data.items()}
    score = fit_logistic(flat[args.fit_on], data[args.fit_on][1])
    for split, (feats, answerable, _) in data.items():
        print(f"{split}: {len(answerable)} prompts, {int(answerable.sum())} answerable")
        for j, name in enumerate(DISTRIBUTION_FEATURES):
            print(f"  {name:16s} AUC token 1 {auc(feats[:, 0, j], answerable):.3f}, "
                  f"mean of {args.tokens} {auc(feats[:, :, j].mean(1), answerable):.3f}")
        s = score(flat[split])
        majority = max(answerable.mean(), 1 - answerable.mean())
        print(f"  logistic on all {flat[split].shape[1]} (fitted on {args.fit_on}): AUC {auc(s, answerable):.3f}, "
              f"accuracy {((s > 0) == answerable).mean():.3f} (majority class {majority:.3f})")
    feats, _, category = data[args.fit_on]
    col = DISTRIBUTION_FEATURES.index("max_prob")
    print(f"mean max_prob at token 1 by category ({args.fit_on}):")
    for c in sorted(set(category)):
        print(f"  {c:20s} {int((category == c).sum()):4d} prompts  {feats[category == c, 0, col].mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
