"""Rollouts on N Ray workers against one in-process env, and the PPO learner's share of wall time.

Two variants, interleaved in one process (1 worker, N workers, 1 worker, ...), both PPO (stable-baselines3) on the
same ``env:`` settings:

* **1 worker**: today's in-process env (``env.workers=1``): one model copy decoding ``B`` rows (what adding
  workers with a device each scales), or ``N x B`` rows with ``--same-total-rows`` (the same batch split in N),
  with the driver's torch threads (``--threads``).
* **N workers**: :class:`envs.distributed.RayVecEnv` (``env.workers=N``): N Ray actors with a model copy and ``B``
  rows each, the CPUs split between them (one GPU each on a GPU machine), one PPO learner in the driver.

Each repeat runs ``--updates`` PPO updates per variant. A callback splits the wall time into the rollout
(``collect_rollouts``: the env steps, the policy's forward pass, the transfer) and the learner (the PPO update).
``rollout tok/s`` = completion tokens the env drew / rollout time; ``ratio_workers_over_one`` = the N-worker
rollout rate over the 1-worker one, per repeat, median. ``learner share`` = update time / (rollout + update).
``worker busy`` = a worker's time inside its env steps (``timings``: model + env work, the mean over workers) over
the rollout time: the rest is the driver (the policy's forward pass, Ray's messages) and waiting for a CPU.

It also prints what N workers on N GPUs would give by this measurement: each worker keeps its B rows, so a
rollout takes about as long for every N, while the update grows with the N x B x n_steps samples it learns from.
With ``r`` the rollout seconds and ``l`` the update seconds per update of one worker's B rows, N workers spend
``r + N l`` per update, the learner's share is ``N l / (r + N l)``, and it passes half at ``N = r / l``.

    .venv/bin/python benchmarks/ray_throughput.py --threads 1                 # 1 x 8 vs 2 x 8 rows, 2 updates, 2 repeats
    .venv/bin/python benchmarks/ray_throughput.py --threads 1 --same-total-rows   # 1 x 16 vs 2 x 8 rows
    .venv/bin/python benchmarks/ray_throughput.py --quick --json ray.json
    .venv/bin/python benchmarks/ray_throughput.py --smoke                     # the test suite runs it
"""

from __future__ import annotations

import os
import time

import _common  # noqa: F401  (puts the repository on sys.path)
from _common import benchmark_parser, fill_preset, environment_info, format_table, median, print_environment, setup_torch, write_json
from stable_baselines3.common.callbacks import BaseCallback  # noqa: E402

DEFAULTS = {"batch_size": 8, "group_size": 4, "max_new_tokens": 16, "n_steps": 16, "updates": 2, "repeats": 2}
QUICK = {"batch_size": 4, "group_size": 2, "max_new_tokens": 8, "n_steps": 8, "updates": 1, "repeats": 2}
SMOKE = {"batch_size": 2, "group_size": 2, "max_new_tokens": 4, "n_steps": 4, "updates": 1, "repeats": 1}


def parse_args(argv=None):
    p = benchmark_parser(__doc__, DEFAULTS["repeats"])
    p.add_argument("--workers", type=int, default=2, help="Ray workers of the distributed variant (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"rows per worker, B (the in-process env runs workers x B) (default {DEFAULTS['batch_size']})")
    p.add_argument("--group-size", type=int, default=None, help=f"rows per prompt (default {DEFAULTS['group_size']})")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"episode length limit (default {DEFAULTS['max_new_tokens']})")
    p.add_argument("--n-steps", type=int, default=None, help=f"PPO steps per row per update (default {DEFAULTS['n_steps']})")
    p.add_argument("--updates", type=int, default=None, help=f"PPO updates per variant and repeat (default {DEFAULTS['updates']})")
    p.add_argument("--same-total-rows", action="store_true",
                   help="the in-process variant decodes workers x B rows (default: B rows, one worker's share)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="BLOCK.KEY=VALUE",
                   help="further config overrides, as train.py --set (env., reward., ppo.)")
    args = p.parse_args(argv)
    fill_preset(args, DEFAULTS, QUICK, SMOKE)
    if args.workers < 2:
        p.error(f"--workers={args.workers}: the distributed variant needs at least 2 (1 is the in-process variant)")
    if min(args.updates, args.repeats, args.n_steps) < 1:
        p.error("--updates, --repeats and --n-steps must be >= 1")
    return args


def _config(args, workers: int):
    """The run config of one variant: ``workers`` model copies (B rows each; N x B for one with --same-total-rows)."""
    from kelvin.config_loading import load_config

    per_copy = args.workers * args.batch_size if workers == 1 and args.same_total_rows else args.batch_size
    rows = workers * per_copy
    overrides = [f"model.name={args.model}", f"model.device={args.device}", f"model.dtype={args.dtype}",
                 f"env.workers={workers}", f"env.batch_size={per_copy}", f"env.group_size={args.group_size}",
                 f"env.max_new_tokens={args.max_new_tokens}", f"env.seed={args.seed}", f"ppo.n_steps={args.n_steps}",
                 *args.overrides]
    # PPO's default minibatch (256) cut to the rollout when the rollout is smaller; --set ppo.batch_size wins
    minibatch = [f"ppo.batch_size={min(256, args.n_steps * rows)}"] + (["ppo.n_epochs=1"] if args.smoke else [])
    return load_config(None, minibatch + overrides)


class PhaseTimer(BaseCallback):
    """An SB3 callback that adds up the wall time of the rollouts (the rest of ``learn`` is the PPO update)."""

    def __init__(self):
        super().__init__(verbose=0)
        self.rollout_s = 0.0
        self._t = 0.0

    def _on_rollout_start(self) -> None:
        self._t = time.perf_counter()

    def _on_step(self) -> bool:
        return True

    def _on_rollout_end(self) -> None:
        self.rollout_s += time.perf_counter() - self._t


def _learn(model, env, updates: int) -> dict:
    """``updates`` PPO updates on ``env``: wall time split into rollout and learner, tokens drawn."""
    timer = PhaseTimer()
    before = dict(env.timings)
    t0 = time.perf_counter()
    model.learn(total_timesteps=updates * model.n_steps * env.num_envs, callback=timer, reset_num_timesteps=False)
    wall = time.perf_counter() - t0
    after = env.timings
    busy = (after["model_s"] + after["env_s"]) - (before["model_s"] + before["env_s"])  # a worker's (mean) env work
    return {"wall_s": wall, "rollout_s": timer.rollout_s, "learner_s": wall - timer.rollout_s,
            "tokens": after["tokens"] - before["tokens"], "worker_busy_s": busy}


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup_torch(args.threads)
    import torch
    from stable_baselines3 import PPO

    from envs.distributed import make_vec_env
    from envs.lm import load_causal_lm

    one_cfg, many_cfg = _config(args, 1), _config(args, args.workers)
    t0 = time.perf_counter()
    lm = load_causal_lm(one_cfg.model)
    print(f"# model {lm.name} on {lm.device} ({args.dtype}), loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    info = environment_info(lm)
    print_environment(info)
    envs = {"1 worker": make_vec_env(one_cfg.env, lm=lm, reward=one_cfg.reward, model=one_cfg.model)}
    t0 = time.perf_counter()
    envs[f"{args.workers} workers"] = make_vec_env(many_cfg.env, reward=many_cfg.reward, model=many_cfg.model)
    ray_env = envs[f"{args.workers} workers"]
    print(f"# {args.workers} Ray workers started in {time.perf_counter() - t0:.1f} s: " + "; ".join(
        f"shard {s.index} pid {s.pid} {s.device} {s.threads} thread(s)" for s in ray_env.shards), flush=True)
    print(f"# rows: in-process 1 x {one_cfg.env.batch_size}, Ray {args.workers} x {args.batch_size}; group "
          f"{args.group_size}, max_new_tokens {args.max_new_tokens}, PPO n_steps {args.n_steps}, minibatch "
          f"{one_cfg.ppo.batch_size} / {many_cfg.ppo.batch_size}, {one_cfg.ppo.n_epochs} epochs; {args.updates} "
          f"update(s) x {args.repeats} repeat(s)", flush=True)
    runs: dict[str, list[dict]] = {name: [] for name in envs}
    try:
        models = {}
        for name, env in envs.items():
            cfg = one_cfg if env is envs["1 worker"] else many_cfg
            models[name] = PPO("MlpPolicy", env, seed=args.seed, device="cpu", verbose=0, **cfg.ppo.kwargs())
            _learn(models[name], env, 1)  # warm-up, untimed: the first reset and prefill, first-call allocations
        for rep in range(args.repeats):
            for name, env in envs.items():
                r = _learn(models[name], env, args.updates)
                runs[name].append(r)
                print(f"  repeat {rep + 1}/{args.repeats} {name}: {r['tokens']} tokens, rollout {r['rollout_s']:.1f} s "
                      f"({r['tokens'] / r['rollout_s']:.1f} tok/s), learner {r['learner_s']:.1f} s", flush=True)
    finally:
        for env in envs.values():
            env.close()
    one, many = "1 worker", f"{args.workers} workers"
    ratio = median((m["tokens"] / m["rollout_s"]) / (o["tokens"] / o["rollout_s"]) for o, m in zip(runs[one], runs[many]))
    table, summary = [], {}
    for name in envs:
        rs = runs[name]
        s = {"rollout_tokens_per_s": median(r["tokens"] / r["rollout_s"] for r in rs),
             "rollout_s_per_update": median(r["rollout_s"] / args.updates for r in rs),
             "learner_s_per_update": median(r["learner_s"] / args.updates for r in rs),
             "learner_share": median(r["learner_s"] / r["wall_s"] for r in rs),
             "worker_busy_share": median(r["worker_busy_s"] / r["rollout_s"] for r in rs)}
        summary[name] = s
        table.append([name, s["rollout_tokens_per_s"], s["rollout_s_per_update"], s["learner_s_per_update"],
                      f"{100 * s['learner_share']:.1f}%", f"{100 * s['worker_busy_share']:.1f}%"])
    print(format_table(["variant", "rollout tok/s", "rollout s/update", "learner s/update", "learner share",
                        "worker busy"], table))
    print("worker busy = a worker's time in its env step (model + env work) over the rollout's wall time; the rest "
          "is the driver (policy forward pass, Ray messages) and waiting for a CPU")
    # N workers on N GPUs, by this measurement: one worker's rollout r per update stays, the update grows as N l
    r = summary[many]["rollout_s_per_update"]
    l = summary[many]["learner_s_per_update"] / args.workers  # noqa: E741 (the module doc's symbol) one worker's update
    crossover = r / l if l > 0 else float("inf")
    projection = {n: {"samples_per_s_speedup": n * (r + l) / (r + n * l), "learner_share": n * l / (r + n * l)}
                  for n in (1, 2, 4, 8, 16)}
    samples = args.batch_size * args.n_steps  # one worker's share of an update
    learner_rate = samples / l if l > 0 else float("inf")
    print(f"per update of one worker's {args.batch_size} rows x {args.n_steps} steps: rollout r = {r:.2f} s, "
          f"learner l = {l:.3f} s; N workers on N devices: learner share N l / (r + N l) = " +
          ", ".join(f"N={n}: {100 * p['learner_share']:.0f}% (x{p['samples_per_s_speedup']:.1f} samples/s)"
                    for n, p in projection.items()) +
          f"; the learner takes half the wall time from N = r / l = {crossover:.1f}. The learner digests "
          f"{learner_rate:.0f} samples/s (PPO with these settings on the driver's CPU): N workers of R samples/s "
          f"(row-steps/s) each keep it under half the wall time while N x R < {learner_rate:.0f}")
    print(f"SUMMARY ray_throughput: 1 x {one_cfg.env.batch_size} vs {args.workers} x {args.batch_size} rows: rollout tok/s {args.workers} workers / 1 worker {ratio:.3f}; learner "
          f"share {100 * summary[one]['learner_share']:.1f}% (1 worker), {100 * summary[many]['learner_share']:.1f}% "
          f"({args.workers} workers); learner is half the wall time from N = {crossover:.1f} workers")
    payload = {"benchmark": "ray_throughput", "args": vars(args), "environment": info, "cpu_count": os.cpu_count(),
               "torch_threads_driver": torch.get_num_threads(), "ratio_workers_over_one": ratio,
               "learner_share_one": summary[one]["learner_share"], "learner_share_workers": summary[many]["learner_share"],
               "summary": summary, "projection": projection, "learner_half_at_workers": crossover,
               "learner_samples_per_s": learner_rate, "raw": runs}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
