"""Env steps/s of TemperatureVecEnv against bare batched decoding with the same model, batch, device.

Four variants, interleaved in one process (env, bare, bare+restarts, env without dedup, ...), each starting
from a prefilled batch (the initial prefill is not timed in any of them) and producing
B * steps tokens:

* **env**: ``TemperatureVecEnv.step`` with uniform random actions in [-1, 1] (seeded, the same
  every repeat), the default reward (MiniLM embedding at episode ends included) and the per-row
  autoresets that happen (``replace_rows`` prefills of restarted rows). ``env.seed`` before every
  ``reset``, so every repeat replays the same trajectory.
* **bare+restarts**: ``lm.decode`` loop on the same initial prompts with argmax tokens, which
  also restarts the same rows with the same prompts at the same steps as the env did
  (``lm.replace_rows``): the same model work as the env, none of the env's own work. This is the
  fair baseline; ``env / bare+restarts`` is the headline ratio (goal >= 0.90 on CPU).
* **bare**: the same decode loop without any restart (cache grows to prompt + steps; no prefill
  inside the loop): the raw decode speed, for reference.
* **env without the prompt cache**: the env again with an empty, zero-sized prompt cache (every
  restart runs the model on its prompt, as before the cache): ``this / env`` time is the prompt
  cache's speed-up.
* **env with overlap**: the env with ``env.overlap`` on (default off), so the work the default env runs
  on the one thread (scoring finished groups: MiniLM, text checks; prefetching the next prompts) runs on a
  second thread while the model decodes: ``env/variant`` below 1 means the side thread pays, above 1 that it
  costs (at torch's own 2 threads on a 2-core CPU the model already has both cores).

Then one extra env pass (``env.overlap`` off, as by default), not used for the ratios, with ``time.perf_counter`` wrappers around the
env's components (featurizer, sampler, reward pieces, episode-end pieces incl. MiniLM, autoreset
prefill), printed as a tree with ms/step and share of that pass's time. The wrappers are put on the
instances (and on module attributes of envs.generation_core / envs.rewards) by this script and removed
after; library code is not edited. Nothing is asserted: the script only measures and prints.

    .venv/bin/python benchmarks/env_throughput.py                  # B=16, 100 steps, 3 repeats (12 min on 2 CPUs shared with a training job)
    .venv/bin/python benchmarks/env_throughput.py --quick          # B=8, 30 steps, 2 repeats (2.5 min there)
    .venv/bin/python benchmarks/env_throughput.py --batch-sizes 16,64 --steps 200 --json env.json
    .venv/bin/python benchmarks/env_throughput.py --smoke          # seconds: checks the script still runs (tests do)
    .venv/bin/python benchmarks/env_throughput.py --quick --threads 1   # and again at 1 thread, a side line

The headline runs at torch's own thread count (the README's commands); ``--threads N`` adds the same
measurements at N threads as a side line.

The headline ratio is ``ratio_env_over_bare``: env tokens/s over bare decoding without restarts at
the same batch (goal >= 0.90): what the env costs on top of the model, restarts included.
"""

from __future__ import annotations

import inspect
import time
from collections import defaultdict
from dataclasses import replace

import _common  # noqa: F401  (puts the repository on sys.path)
import numpy as np
import torch
from _common import benchmark_parser, fill_preset, format_table, median, start, sync, torch_threads, write_json

DEFAULTS = {"batch_sizes": "16", "group": 4, "max_new_tokens": 32, "steps": 100, "repeats": 3}
QUICK = {"batch_sizes": "8", "group": 4, "max_new_tokens": 12, "steps": 30, "repeats": 2}
SMOKE = {"batch_sizes": "4", "group": 2, "max_new_tokens": 3, "steps": 4, "repeats": 1}


def parse_args(argv=None):
    p = benchmark_parser(__doc__, DEFAULTS["repeats"])
    p.add_argument("--batch-sizes", default=None,
                   help=f"comma-separated env batch sizes B (default {DEFAULTS['batch_sizes']}; --quick {QUICK['batch_sizes']})")
    p.add_argument("--group", type=int, default=None, help=f"rows per prompt group (default {DEFAULTS['group']})")
    p.add_argument("--tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=None,
                   help=f"env max_new_tokens, the episode length limit (default {DEFAULTS['max_new_tokens']})")
    p.add_argument("--steps", type=int, default=None, help=f"env steps per timed run (default {DEFAULTS['steps']})")
    p.add_argument("--no-profile", action="store_true", help="skip the per-component profile pass")
    args = p.parse_args(argv)
    fill_preset(args, DEFAULTS, QUICK, SMOKE)
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",") if b.strip()]
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        p.error("--batch-sizes needs positive integers")
    for b in args.batch_sizes:
        if b % min(args.group, b):
            p.error(f"--group {args.group} must divide every batch size (got B={b})")
    if args.steps < 1 or args.repeats < 1 or args.max_new_tokens < 1:
        p.error("--steps, --repeats and --tokens must be >= 1")
    return args


# --------------------------------------------------------------------------- instrumentation

def _set(obj, attr, value):
    if isinstance(obj, type):
        setattr(obj, attr, value)  # a class attribute (a staticmethod)
    else:
        object.__setattr__(obj, attr, value)  # works on frozen dataclasses (ActionMapping) and modules alike


class Patches:
    """Replace attributes on instances / modules and put the originals back afterwards."""

    def __init__(self):
        self._undo = []

    def replace(self, obj, attr, make):
        own = isinstance(obj, type(torch)) or attr in getattr(obj, "__dict__", {})
        raw = inspect.getattr_static(obj, attr)  # a staticmethod stays one when it is put back
        wrapped = make(getattr(obj, attr))
        _set(obj, attr, staticmethod(wrapped) if isinstance(raw, staticmethod) else wrapped)
        self._undo.append((obj, attr, raw, own))

    def restore(self):
        for obj, attr, original, own in reversed(self._undo):
            if own:
                _set(obj, attr, original)
            else:
                object.__delattr__(obj, attr)  # back to the class's method
        self._undo.clear()


class Profiler:
    """Nested perf_counter timers keyed by call path ("parent/child"), device-synced at both ends."""

    def __init__(self, device):
        self.device = device
        self.stack: list[str] = []
        self.total = defaultdict(float)
        self.calls = defaultdict(int)
        self.order: list[str] = []

    def wrap(self, name):
        def make(fn):
            def timed(*args, **kwargs):
                self.stack.append(name)
                path = "/".join(self.stack)
                if path not in self.total:
                    self.order.append(path)
                    self.total[path] = 0.0
                sync(self.device)
                t0 = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    sync(self.device)
                    self.total[path] += time.perf_counter() - t0
                    self.calls[path] += 1
                    self.stack.pop()
            return timed
        return make

    def report(self, wall: float, steps: int) -> tuple[str, list[dict]]:
        """A tree: each timer, then '(rest)' = its time minus its children's."""
        children = defaultdict(list)
        for path in self.order:
            parent = path.rsplit("/", 1)[0] if "/" in path else ""
            children[parent].append(path)
        rows, records = [], []

        def emit(path, depth):
            name = path.rsplit("/", 1)[-1]
            t = self.total[path]
            rows.append(["  " * depth + name, self.calls[path], t, 1000 * t / steps, f"{100 * t / wall:.1f}%"])
            records.append({"path": path, "calls": self.calls[path], "seconds": t, "ms_per_step": 1000 * t / steps,
                            "share_of_wall": t / wall})
            kids = children.get(path, [])
            for kid in kids:
                emit(kid, depth + 1)
            if kids:
                rest = t - sum(self.total[k] for k in kids)
                rows.append(["  " * (depth + 1) + "(rest)", "", rest, 1000 * rest / steps, f"{100 * rest / wall:.1f}%"])
                records.append({"path": path + "/(rest)", "calls": None, "seconds": rest,
                                "ms_per_step": 1000 * rest / steps, "share_of_wall": rest / wall})

        for top in children[""]:
            emit(top, 0)
        outside = wall - sum(self.total[p] for p in children[""])
        rows.append(["(outside step_wait: VecEnv.step, loop)", "", outside, 1000 * outside / steps,
                     f"{100 * outside / wall:.1f}%"])
        return format_table(["component", "calls", "total s", "ms/step", "% of pass"], rows), records


def instrument(env, prof: Profiler, patches: Patches) -> None:
    import envs.generation_core as generation_core
    import envs.rewards as rewards

    core, lm = env.core, env.core.lm
    w = prof.wrap
    patches.replace(env, "step_wait", w("VecEnv.step_wait"))
    patches.replace(core, "step", w("core.step"))
    patches.replace(core.mapping, "to_temperature", w("action -> temperature"))
    patches.replace(generation_core, "sample", w("sample (truncate, temper, draw)"))
    patches.replace(core.featurizer, "update", w("featurizer.update"))
    patches.replace(generation_core, "closes_repeated_ngram", w("repeated n-gram check"))
    patches.replace(core.reward, "step_components", w("reward.step_components"))
    patches.replace(lm, "is_eos", w("is_eos"))
    patches.replace(lm, "decode", w("lm.decode (MODEL)"))
    patches.replace(core.featurizer, "observe", w("featurizer.observe"))
    patches.replace(core.reward, "combine", w("reward.combine"))
    patches.replace(core, "_episode_components", w("episode-end components"))
    patches.replace(core, "completion_ids", w("completion_ids"))
    patches.replace(lm, "decode_text", w("tokenizer decode_text"))
    patches.replace(core.reward, "episode_components", w("reward.episode_components"))
    patches.replace(rewards.AnomalyDetector, "text_scores", w("text anomaly scores"))
    patches.replace(rewards, "novel_ngram_fraction", w("group n-gram diversity"))
    patches.replace(rewards, "is_correct", w("answer check"))
    if core.reward.config.needs_embedder:
        patches.replace(core.reward.embedder, "encode", w("MiniLM embed"))
    patches.replace(core, "episode_info", w("episode_info"))
    patches.replace(core, "reset_groups", w("reset_groups (autoreset)"))
    patches.replace(lm, "replace_rows", w("lm.replace_rows (MODEL: prefill restarted rows)"))
    patches.replace(core.featurizer, "reset", w("featurizer.reset"))


# --------------------------------------------------------------------------- variants

class RestartRecorder:
    """Records which rows the env restarts at which step, with which prompts (wraps core.reset_groups)."""

    def __init__(self, env):
        self.core = env.core
        self.active = False
        self.step = 0
        self.events: list[tuple[int, list[int], list[int]]] = []
        original = env.core.reset_groups

        def reset_groups(groups=None, prompt_indices=None, diversity=None):
            obs = original(groups, prompt_indices, diversity)
            if self.active and groups is not None:
                r = self.core.group_rows(np.asarray(groups, dtype=np.int64))
                self.events.append((self.step, r.tolist(), self.core.episode.prompt[r].tolist()))
            return obs

        env.core.reset_groups = reset_groups


def run_env(env, recorder: RestartRecorder, steps: int, seed: int, after_reset=None) -> dict:
    core = env.core
    dev = core.device
    env.seed(seed)
    env.reset()  # initial prefill: not timed
    if after_reset is not None:
        after_reset()
    init_prompts = core.episode.prompt.tolist()
    actions = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(steps, env.num_envs, 1)).astype(np.float32)
    before = dict(core.timings)
    recorder.events = []
    recorder.active = True
    episodes = 0
    sync(dev)
    t0 = time.perf_counter()
    for s in range(steps):
        recorder.step = s
        _, _, done, _ = env.step(actions[s])
        episodes += int(done.sum())
    sync(dev)
    wall = time.perf_counter() - t0
    recorder.active = False
    return {"wall_s": wall, "model_s": core.timings["model_s"] - before["model_s"],
            "env_s": core.timings["env_s"] - before["env_s"], "tokens": core.timings["tokens"] - before["tokens"],
            "episodes": episodes, "restart_events": list(recorder.events), "init_prompts": init_prompts}


def run_bare(lm, prompt_ids, init_prompts, steps: int, restarts=None) -> dict:
    """argmax + lm.decode for ``steps`` steps; optionally replay the env's restarts (replace_rows)."""
    dev = lm.device
    by_step = {}
    for s, rows, prompts in restarts or []:
        by_step.setdefault(s, []).append((rows, prompts))
    logits, state = lm.prefill([prompt_ids[i] for i in init_prompts])  # not timed (the env's reset is not either)
    restart_s = 0.0
    sync(dev)
    t0 = time.perf_counter()
    for s in range(steps):
        logits = lm.decode(state, logits.argmax(-1))
        for rows, prompts in by_step.get(s, ()):
            t1 = time.perf_counter()
            rows_t = torch.as_tensor(rows, device=dev)
            new = lm.replace_rows(state, rows_t, [prompt_ids[i] for i in prompts])
            logits = logits.clone()  # what the env's reset_groups does with its logits
            logits[rows_t] = new
            sync(dev)
            restart_s += time.perf_counter() - t1
    sync(dev)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "restart_s": restart_s, "tokens": steps * len(init_prompts)}


# --------------------------------------------------------------------------- main

def measure(args, lm) -> dict:
    """Every variant at every batch size, at torch's current thread count: ``{B: _report(...)}``."""
    from envs.config import EnvConfig
    from envs.generation import TemperatureVecEnv
    from envs.kv_cache import PromptCache

    all_results = {}
    for B in args.batch_sizes:
        group = min(args.group, B)
        cfg = EnvConfig(batch_size=B, group_size=group, max_new_tokens=args.max_new_tokens, seed=args.seed)
        env = TemperatureVecEnv(cfg, lm=lm)
        core = env.core
        prompt_ids = lm.encode([p.text for p in core.prompts])  # the same ids the env prefills
        recorder = RestartRecorder(env)
        print(f"# B={B}, group {group}, max_new_tokens {args.max_new_tokens}, {args.steps} steps per run, "
              f"{args.repeats} repeats, {len(core.prompts)} train prompts, default reward", flush=True)

        with torch.inference_mode():
            # Warm-up: load MiniLM, a few env steps, bare decode with one restart.
            t_w = time.perf_counter()
            if core.reward.config.needs_embedder:
                core.reward.embedder.encode(["warm-up sentence"])
            run_env(env, recorder, 3, args.seed)
            run_bare(lm, prompt_ids, core.episode.prompt.tolist(), 3, [(0, [0], [int(core.episode.prompt[0])])])
            print(f"# warm-up done in {time.perf_counter() - t_w:.1f} s", flush=True)

            runs = {"env": [], "bare_restarts": [], "bare": [], "env_nocache": [], "env_overlap": []}
            pattern = None
            for rep in range(args.repeats):
                e = run_env(env, recorder, args.steps, args.seed)
                if pattern is None:
                    pattern = (e["init_prompts"], e["restart_events"])
                elif (e["init_prompts"], e["restart_events"]) != pattern:
                    print("# NOTE: the env's restart pattern changed between repeats (non-deterministic draws?); "
                          "bare+restarts replays the first one", flush=True)
                # bare variants in alternating order after the env (which must run first: it records the pattern)
                second = [("bare_restarts", pattern[1]), ("bare", None)]
                if rep % 2:
                    second.reverse()
                for name, restarts in second:
                    runs[name].append(run_bare(lm, prompt_ids, pattern[0], args.steps, restarts))
                runs["env"].append(e)
                kept, lm.prompt_cache = lm.prompt_cache, PromptCache(0)  # (a') every restart prefills its prompt
                try:
                    runs["env_nocache"].append(run_env(env, recorder, args.steps, args.seed))
                finally:
                    lm.prompt_cache = kept
                core.config = replace(cfg, overlap=True)  # (a'') the scoring and prefetch on a side thread
                try:
                    runs["env_overlap"].append(run_env(env, recorder, args.steps, args.seed))
                finally:
                    core.config = cfg
                br, bb = runs["bare_restarts"][-1], runs["bare"][-1]
                print(f"  repeat {rep + 1}/{args.repeats}: env {e['wall_s']:.2f} s (model {e['model_s']:.2f}, "
                      f"env {e['env_s']:.2f}, {e['episodes']} episodes ended)  bare+restarts {br['wall_s']:.2f} s "
                      f"(restarts {br['restart_s']:.2f})  bare {bb['wall_s']:.2f} s  env without the prompt cache "
                      f"{runs['env_nocache'][-1]['wall_s']:.2f} s  env with overlap "
                      f"{runs['env_overlap'][-1]['wall_s']:.2f} s", flush=True)

            profile_rows, profile_records, profile_wall = None, None, None
            if not args.no_profile:
                prof, patches = Profiler(lm.device), Patches()
                core.config = replace(cfg, overlap=False)  # one thread: the timers nest on one call stack
                try:
                    p = run_env(env, recorder, args.steps, args.seed,
                                after_reset=lambda: instrument(env, prof, patches))
                finally:
                    patches.restore()
                    core.config = cfg
                profile_wall = p["wall_s"]
                profile_rows, profile_records = prof.report(profile_wall, args.steps)

        all_results[B] = _report(B, args, runs, pattern, profile_rows, profile_records, profile_wall)
    return all_results


def _summary(all_results: dict) -> str:
    return "; ".join(f"B={B}: env/bare {r['ratio_env_over_bare']:.3f} (with overlap: "
                     f"{r['ratio_env_overlap_over_bare']:.3f}), "
                     f"env/bare+restarts {r['ratio_env_over_bare_restarts']:.3f}, "
                     f"prompt cache speed-up {r['ratio_prompt_cache_speedup']:.3f}, env's own work "
                     f"{100 * r['env_breakdown']['own_work_share']:.1f}% of its step time"
                     for B, r in all_results.items())


def main(argv=None) -> dict:
    args = parse_args(argv)
    lm, info = start(args, set_threads=False)  # the headline at torch's own thread count, as the README runs
    load = info.get("loadavg_start")
    if load and lm.device.type == "cpu" and load[0] > (info["cpu_count"] or 1) and torch.get_num_threads() > 1:
        print(f"# NOTE: the CPU is busy (load {load[0]:.1f} on {info['cpu_count']} CPUs); absolute numbers will be "
              "noisy; --threads 1 adds the figures at 1 thread as a side line", flush=True)
    t_start = time.perf_counter()
    all_results = measure(args, lm)
    side = None
    if args.threads is not None:
        print(f"\n# side line: the same at --threads {args.threads}", flush=True)
        with torch_threads(args.threads):
            side = measure(args, lm)
    print(f"# total {time.perf_counter() - t_start:.0f} s")
    extra = "" if side is None else f"; at --threads {args.threads}: {_summary(side)}"
    print(f"SUMMARY env_throughput: {_summary(all_results)} (goal env/bare >= 0.90){extra}")
    payload = {"benchmark": "env_throughput", "args": vars(args), "environment": info,
               "results": {str(b): r for b, r in all_results.items()}, "total_s": time.perf_counter() - t_start,
               "threads_side_line": None if side is None else {
                   "threads": args.threads, "results": {str(b): r for b, r in side.items()}}}
    write_json(args.json, payload)
    return payload


def _report(B, args, runs, pattern, profile_rows, profile_records, profile_wall) -> dict:
    steps = args.steps
    tokens = B * steps
    env_w = [r["wall_s"] for r in runs["env"]]
    br_w = [r["wall_s"] for r in runs["bare_restarts"]]
    bb_w = [r["wall_s"] for r in runs["bare"]]
    ratio_r = median(b / e for e, b in zip(env_w, br_w))  # env tok/s / bare tok/s = bare time / env time
    ratio_b = median(b / e for e, b in zip(env_w, bb_w))
    nd_w = [r["wall_s"] for r in runs["env_nocache"]]
    ratio_nd = median(b / e for e, b in zip(env_w, nd_w))
    ov_w = [r["wall_s"] for r in runs["env_overlap"]]
    ratio_overlap = median(b / s for s, b in zip(ov_w, bb_w))  # env with overlap / bare
    n_restart_rows = sum(len(rows) for _, rows, _ in pattern[1])
    n_restart_calls = len(pattern[1])
    n_restart_unique = sum(len(set(prompts)) for _, _, prompts in pattern[1])
    print()
    print(f"Env vs bare batched decode, B={B}, {steps} steps = {tokens} tokens per run, medians of {args.repeats} "
          f"interleaved repeats ({n_restart_rows} rows restarted in {n_restart_calls} replace_rows calls per run, "
          f"{n_restart_unique} distinct prompts within those calls)")
    rows = [
        ["(a) env: TemperatureVecEnv.step", median(env_w), tokens / median(env_w), 1000 * median(env_w) / steps, "1.00"],
        ["(b) bare decode + the env's restarts", median(br_w), tokens / median(br_w), 1000 * median(br_w) / steps,
         f"{ratio_r:.3f}"],
        ["(b') bare decode, no restarts", median(bb_w), tokens / median(bb_w), 1000 * median(bb_w) / steps,
         f"{ratio_b:.3f}"],
        ["(a') env without the prompt cache", median(nd_w), tokens / median(nd_w),
         1000 * median(nd_w) / steps, f"{ratio_nd:.3f}"],
        ["(a'') env with overlap (side thread)", median(ov_w), tokens / median(ov_w),
         1000 * median(ov_w) / steps, f"{median(s / e for e, s in zip(env_w, ov_w)):.3f}"],
    ]
    print(format_table(["variant", "time s", "tok/s", "ms/step", "env/variant tok/s"], rows))
    print("  (c) ratio = median over repeats of env tok/s / variant tok/s measured next to it (= variant time / env time).")
    print("      (b) does the same model work as the env (decode + prefill of the same restarted rows, same steps);")
    print("      (b') is raw decoding without any restart (its cache grows to prompt + steps tokens).")
    print("      (a') is the env with an empty prompt cache: its ratio is the cache's speed-up.")
    print("      (a'') is the env with env.overlap on: scoring and prefetch on a side thread;")
    print(f"      its own ratio to (b') is {ratio_overlap:.3f} (ratio_env_overlap_over_bare).")

    model = median(r["model_s"] for r in runs["env"])
    own = median(r["env_s"] for r in runs["env"])
    wall = median(env_w)
    wrapper = median(r["wall_s"] - r["model_s"] - r["env_s"] for r in runs["env"])
    restart_bare = median(r["restart_s"] for r in runs["bare_restarts"])
    print()
    print(f"(d) where the env's time goes (core.timings, medians over repeats; B={B}, {steps} steps)")
    brk = [
        ["model_s: lm.decode + replace_rows prefill", model, 1000 * model / steps, f"{100 * model / wall:.1f}%"],
        ["env_s: core.step / reset_groups own work", own, 1000 * own / steps, f"{100 * own / wall:.1f}%"],
        ["VecEnv wrapper: infos, episode_info, obs->numpy", wrapper, 1000 * wrapper / steps,
         f"{100 * wrapper / wall:.1f}%"],
        ["total env step time", wall, 1000 * wall / steps, "100.0%"],
    ]
    print(format_table(["part", "s", "ms/step", "% of env"], brk))
    print(f"  for comparison, bare+restarts spent {median(br_w):.2f} s on the same model work "
          f"({restart_bare:.2f} s of it in replace_rows); overhead of the env = "
          f"{1000 * (wall - median(br_w)) / steps:.1f} ms/step")
    if profile_rows:
        print()
        print(f"Profile of one extra env pass (timers around each component, device-synced; pass took "
              f"{profile_wall:.2f} s, {100 * (profile_wall / wall - 1):+.1f}% vs the timed median: timer overhead "
              "+ noise). Nested rows are included in their parent; (rest) = parent minus listed children.")
        print(profile_rows)
    return {
        "batch_size": B, "steps": steps, "tokens_per_run": tokens,
        "env_tokens_per_s": tokens / median(env_w), "bare_restarts_tokens_per_s": tokens / median(br_w),
        "bare_tokens_per_s": tokens / median(bb_w),
        "ratio_env_over_bare_restarts": ratio_r, "ratio_env_over_bare": ratio_b, "ratio_prompt_cache_speedup": ratio_nd,
        "ratio_env_overlap_over_bare": ratio_overlap, "env_overlap_tokens_per_s": tokens / median(ov_w),
        "restart_rows_per_run": n_restart_rows, "replace_rows_calls_per_run": n_restart_calls,
        "restart_distinct_prompts_per_run": n_restart_unique,
        "env_breakdown": {"model_s": model, "env_s": own, "wrapper_s": wrapper, "wall_s": wall,
                          "own_work_share": (own + wrapper) / wall},
        "profile": profile_records, "profile_wall_s": profile_wall,
        "raw": {k: [{kk: vv for kk, vv in r.items() if kk not in ("restart_events", "init_prompts")} for r in v]
                for k, v in runs.items()},
    }


if __name__ == "__main__":
    main()
