"""How a run's learned policy moved away from its tuned base during training: learned − base temperature at a few
token positions and λ, read off the actor of every checkpoint (no language model, no text: seconds).

Each state has the given position (and its bin, with ``env.features.position_bins``), λ and category and every
other feature at 0. For an actor that reads only those (``policy.actor_features: [position, diversity]``, or the
bins and the category one-hot) that is exactly what the policy does there; for one that reads the distribution
features it is a sketch at one arbitrary state, and the script says so. The
mapping's rate limit is left out (the difference of the mapped actions). Update numbers are the checkpoint's
timesteps over a rollout's samples (``ppo.n_steps`` x ``env.workers`` x ``env.batch_size``).

    .venv/bin/python scripts/residual_path.py runs/twin-s0
    .venv/bin/python scripts/residual_path.py runs/twin-s0 --lambdas 1,2 --positions 0,15 --category math --every 10
    .venv/bin/python scripts/residual_path.py runs/l1bngl1-s0 --lambdas 1 --positions 0,8 --noise

``--noise`` adds, under each checkpoint's line, the training's gSDE exploration at the same states: the action
noise's std at each, and the correlation of the first and the last position's noise at each λ (one exploration
matrix serves a whole rollout, so correlated noise credits one position's return to the other's action).
``--coupling`` adds the cosine of the first and the last position's gradients of the mean action over the actor's
parameters, at each λ: how far a step that moves one position moves the other (0 for a table residual).

(docs/results.md quotes it.)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kelvin.callbacks import updates  # noqa: E402
from kelvin.config import KelvinConfig  # noqa: E402
from kelvin.evaluation.policies import load_base_policy, load_learned_policy  # noqa: E402
from kelvin.rundir import RunDir, load_ppo, load_vecnormalize, model_files  # noqa: E402
from policies.base import TemperaturePolicy  # noqa: E402
from policies.features import FeatureSpec, position_bin_onehot  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run directory with base.json (a residual policy) and checkpoints/")
    p.add_argument("--lambdas", default=None,
                   help="comma-separated λ values (default: the λ > 0 the run draws from env.diversity_values, "
                        "else 0.5,1,1.5,2)")
    p.add_argument("--positions", default="0,15", help="comma-separated token positions (default 0,15)")
    p.add_argument("--category", default="math", help="the category one-hot (default math; ignored without one)")
    p.add_argument("--noise", action="store_true", help="also the gSDE exploration noise: std and correlation")
    p.add_argument("--coupling", action="store_true",
                   help="also the cosine of the first and last position's gradients over the actor's parameters")
    p.add_argument("--every", type=int, default=10, help="read every N-th update's checkpoint (default 10)")
    return p


def states(spec: FeatureSpec, lambdas: list[float], positions: list[int], category: str) -> torch.Tensor:
    """Observations (len(lambdas) x len(positions), F), λ-major: each the given position (over the spec's
    horizon) and its position bin (``env.features.position_bins``), λ and category slot, every other feature 0."""
    obs = torch.zeros(len(lambdas) * len(positions), spec.dim)
    for i, (lam, pos) in enumerate((lam, pos) for lam in lambdas for pos in positions):
        obs[i, spec.index("position")] = pos / spec.horizon
        if spec.position_bins:
            first = spec.index("position_bin_0")
            obs[i, first:first + len(spec.position_bins) + 1] = position_bin_onehot(
                torch.tensor([pos]), torch.tensor(spec.position_bins))[0]
        if "diversity" in spec.names:
            obs[i, spec.index("diversity")] = lam
        if spec.categories:
            obs[i, spec.index(f"category_{spec.category_slots[spec.category_slot(category)]}")] = 1.0
    return obs


def mapped_temperatures(policy: TemperaturePolicy, obs: torch.Tensor) -> torch.Tensor:
    """The policy's actions at ``obs`` through its action mapping, without the rate limit (B,)."""
    with torch.no_grad():
        return policy.action_mapping.to_temperature(policy.actions(obs))


def _policy_and_normaliser(target: str | Path):
    """The SB3 policy of the model at ``target`` (a run or a checkpoint) and its normaliser (None: none)."""
    _, model_file, norm_file = model_files(target)
    model = load_ppo(model_file)
    return model.policy, None if norm_file is None else load_vecnormalize(norm_file, step=model.num_timesteps)


def exploration_of(policy, vec, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """gSDE's action noise of a loaded SB3 policy and its normaliser (None: none) at raw observations ``obs``
    (B, F): its std (B,) and correlation matrix (B, B) across the states (``latent @ W`` with one matrix W for all:
    cov = latent diag(std_W²) latentᵀ; the latent is the actor's, or the bins' one-hot with ``noise_columns``).
    None for a model without gSDE."""
    if not policy.use_sde:
        return None
    x = obs if vec is None else torch.as_tensor(vec.normalize_obs(obs.numpy()), dtype=torch.float32)
    with torch.no_grad():
        latent = policy.get_distribution(x)._latent_sde  # the latent the policy's own noise reads (SB3 keeps it)
        var_w = policy.action_dist.get_std(policy.log_std)[:, 0] ** 2  # (latent,)
        cov = (latent * var_w) @ latent.T
    std = cov.diagonal().sqrt()
    return std, cov / torch.outer(std, std)


def coupling_of(policy, vec, obs: torch.Tensor) -> torch.Tensor:
    """(B, B): the cosine between the states' gradients of the deterministic action over the actor's parameters
    (its layers and output; not the critic's, not the noise). Near 1: a step that moves one state's action moves the
    other's alike; 0: a step for one leaves the other where it is (a table's cells, or heads the states' λ do not
    mix)."""
    x = obs if vec is None else torch.as_tensor(vec.normalize_obs(obs.numpy()), dtype=torch.float32)
    params = [p for name, p in policy.named_parameters()
              if name.startswith(("action_net.", "mlp_extractor.policy_net.", "pi_features_extractor."))]
    rows = []
    for i in range(len(x)):
        grads = torch.autograd.grad(policy.get_distribution(x[i:i + 1]).distribution.mean.sum(), params,
                                    allow_unused=True)
        rows.append(torch.cat([torch.zeros(p.numel()) if g is None else g.flatten() for g, p in zip(grads, params)]))
    g = torch.stack(rows)
    g = g / g.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return g @ g.T


def checkpoints(run: RunDir, config: KelvinConfig, every: int) -> list[tuple[int | None, Path]]:
    """(update, path) of every ``every``-th update's checkpoint, then the final model (None, the run) once the run
    has one (so a run still training can be read)."""
    found = [(updates(config, step), run.checkpoint_files(step)[0]) for step in run.checkpoints()]
    chosen = [(u, p) for u, p in found if every <= 1 or u % every == 0]
    return chosen + ([(None, run.path)] if run.model_file.is_file() else [])


def default_lambdas(config: KelvinConfig) -> list[float]:
    """The λ columns to read when none are given: the λ > 0 the run trained on (``env.diversity_values``; a λ it
    never drew reads a head no update reached), else 0.5, 1, 1.5, 2 over a drawn range."""
    drawn = sorted({float(v) for v in config.env.diversity_values or () if v > 0})
    return drawn or [0.5, 1.0, 1.5, 2.0]


def reads_only_what_states_set(config: KelvinConfig) -> bool:
    """Whether the actor reads nothing but what :func:`states` sets: position (and its bins), λ, the category."""
    set_here = {n for n in config.env.feature_spec().names if n.startswith(("position_bin_", "category_"))}
    return set(config.policy.actor_features or ()) <= {"position", "diversity", *set_here} and bool(config.policy.actor_features)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    run = RunDir(args.run)
    config = run.load_config()
    lambdas = [float(x) for x in args.lambdas.split(",")] if args.lambdas else default_lambdas(config)
    positions = [int(x) for x in args.positions.split(",")]
    warnings: list[str] = []
    base, _ = load_base_policy(args.run, config, warnings)
    obs = states(base.feature_spec, lambdas, positions, args.category)
    base_t = mapped_temperatures(base, obs)
    if not reads_only_what_states_set(config):
        print("note: this actor reads more than position, λ and the category; the states below set every other "
              "feature to 0")
    head = "  ".join(f"λ={lam:g} pos {pos:>2d}" for lam in lambdas for pos in positions)
    print(f"{args.run}: learned − base T ({args.category}); base T " + "  ".join(f"{t:.3f}" for t in base_t.tolist()))
    print(f"{'update':>8s}  {head}")
    for update, path in checkpoints(run, config, args.every):
        policy, _, _ = load_learned_policy(str(path), config, warnings)
        diff = mapped_temperatures(policy, obs) - base_t
        label = "final" if update is None else str(update)
        print(f"{label:>8s}  " + "  ".join(f"{d:+11.3f}" for d in diff.tolist()), flush=True)
        ends = [(i * len(positions), (i + 1) * len(positions) - 1) for i in range(len(lambdas))]
        loaded = _policy_and_normaliser(path) if args.noise or args.coupling else None  # once for both
        noise = exploration_of(*loaded, obs) if args.noise else None
        if noise is not None:
            std, corr = noise
            print(f"{'noise':>8s}  " + "  ".join(f"{s:11.3f}" for s in std.tolist()) + "   corr(first, last): "
                  + "  ".join(f"λ={lam:g} {corr[a, b]:+.2f}" for lam, (a, b) in zip(lambdas, ends)), flush=True)
        if args.coupling:
            cos = coupling_of(*loaded, obs)
            print(f"{'coupling':>8s}  gradient cosine(first, last): "
                  + "  ".join(f"λ={lam:g} {cos[a, b]:+.2f}" for lam, (a, b) in zip(lambdas, ends)), flush=True)
    for w in dict.fromkeys(warnings):
        print(f"warning: {w}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
