"""Helpers shared by the benchmark scripts (not a library module: imported by path).

Every benchmark measures its variants side by side in one process, interleaved
(A, B, A, B, ... once per repeat), reports medians and, above all, ratios: absolute
numbers on a shared CPU drift with the load of other processes, ratios of variants
measured next to each other drift much less.
"""

from __future__ import annotations

import argparse
import contextlib

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

# Scripts run as `python benchmarks/x.py` from anywhere: make the repository importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402


def benchmark_parser(doc: str, default_repeats: int) -> argparse.ArgumentParser:
    """A benchmark's command line: its docstring's first paragraph as the description, the rest of the docstring's
    layout kept, and the arguments every benchmark takes (:func:`add_common_args`)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser, default_repeats)
    return parser


def fill_preset(args, defaults: dict, quick: dict, smoke: dict) -> None:
    """Every argument of the preset left None on the command line takes the preset's value: ``smoke`` with --smoke,
    else ``quick`` with --quick, else ``defaults``."""
    preset = smoke if args.smoke else quick if args.quick else defaults
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def add_common_args(parser, default_repeats: int) -> None:
    """Arguments every benchmark takes (defaults None where --quick may change them)."""
    from envs.lm import ModelConfig

    parser.add_argument("--model", default=ModelConfig().name,
                        help="embedded alias, local .gguf file or HF model directory (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (cuda when present, else cpu), cpu, cuda, cuda:1...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                        help="compute dtype of the LM (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=None,
                        help=f"interleaved repetitions of every variant; medians are reported (default {default_repeats})")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads(N) before measuring (default: torch's own choice). On a CPU "
                             "shared with other busy processes, 1 thread can be several times faster than 2. "
                             "env_throughput and train_throughput measure their headline at torch's own count and "
                             "add the figures at N threads as a side line.")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt choice and the token draws")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write every number to this JSON file")
    parser.add_argument("--quick", action="store_true", help="small settings for a quick check (1-3 minutes on 2 CPUs)")
    parser.add_argument("--smoke", action="store_true",
                        help="the smallest run that exercises every code path (seconds; what the test suite runs)")


def setup_torch(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # an older transformers: only the log is noisier
        pass


def load_lm(args):
    from envs.lm import load_causal_lm

    t0 = time.perf_counter()
    lm = load_causal_lm(name=args.model, device=args.device, dtype=args.dtype)
    print(f"# model {lm.name} on {lm.device} ({args.dtype}), loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    return lm


@contextlib.contextmanager
def torch_threads(threads: int):
    """``torch.set_num_threads(threads)`` inside the block; torch's count before it is restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def start(args, set_threads: bool = True):
    """Every benchmark's start: torch threads (``--threads``; ``set_threads=False``: torch's own, the flag is only
    checked), the model, the environment header. Returns ``(lm, info)``."""
    if args.threads is not None and args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    setup_torch(args.threads if set_threads else None)
    lm = load_lm(args)
    info = environment_info(lm)
    print_environment(info)
    return lm, info


def sync(device: torch.device) -> None:
    """Wait for queued device work, so that perf_counter brackets what it claims to."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def benchmark_prompt_ids(lm, n: int, seed: int) -> list[list[int]]:
    """``n`` chat-templated prompts of the packaged set (train split, every category), seeded order.

    Realistic lengths (about 35-90 tokens with SmolLM2's template); cycles when ``n`` exceeds the set.
    """
    import numpy as np

    from envs.prompts import load_prompts

    prompts = load_prompts(None, split="train")
    order = np.random.default_rng(seed).permutation(len(prompts))
    chosen = [prompts[order[i % len(prompts)]].text for i in range(n)]
    return lm.encode(chosen)


def median(xs: Iterable[float]) -> float:
    xs = list(xs)
    return statistics.median(xs) if xs else float("nan")


def environment_info(lm) -> dict:
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(lm.device),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    if lm.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(lm.device)
    try:
        info["loadavg_start"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def print_environment(info: dict) -> None:
    load = info.get("loadavg_start")
    load_s = f", load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}" if load else ""
    gpu = f" ({info['gpu']})" if "gpu" in info else ""
    print(f"# torch {info['torch']}, transformers {info['transformers']}, device {info['device']}{gpu}, "
          f"{info['torch_threads']} torch threads, {info['cpu_count']} CPUs{load_s}", flush=True)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]], left_first: bool = True) -> str:
    """A plain fixed-width table: first column left-aligned (labels, tree indentation), the rest right-aligned."""
    cells = [[str(h) for h in headers]] + [[c if isinstance(c, str) else _fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if (i == 0 and left_first) else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(x) -> str:
    if isinstance(x, float):
        if x != x:
            return "n/a"
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"
    return str(x)


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, default=_json_default))
    print(f"# wrote {target}")


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)
