"""The env's side threads (``env.overlap``): work the model does not wait for, run while it decodes.

Also the one lock that survives a copy (:class:`CopyableLock`), for objects those threads share.

One module owns them (DESIGN, Devices and speed): :class:`SideThreads` keeps one single-thread pool per job,
``score`` (the completion components of the groups that end at a step, needed at the end of that step) and
``prefetch`` (prefilling into the prompt cache the prompts groups start next, needed many steps later, so it
runs at a lower priority and never delays a score).
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import torch

__all__ = ["CopyableLock", "SideThreads", "init_helper_thread"]


def init_helper_thread(nice: int = 0) -> None:
    """Initialise a helper thread: one torch thread, and ``nice`` steps below the caller's scheduling priority
    (Linux; elsewhere none).

    One thread, not the process's count: a helper that runs torch ops with N threads keeps its own OpenMP team
    alive, and with more OpenMP threads than cores the workers stop spinning between parallel regions (most
    likely: each of the model's hundreds of small regions a step then pays a wake-up). On the 2-core CPU at 2
    torch threads, B = 64 (docs/speed.md): an env whose side threads had run once with 2 threads stepped 45%
    slower for the rest of the process (40 steps 7.0 s -> 10.1 s), the threads idle; with 1 thread, no change."""
    torch.set_num_threads(1)
    if nice:
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.getpriority(os.PRIO_PROCESS, 0) + nice)


class CopyableLock:
    """A ``threading.Lock`` (``with lock:``) that pickles and deep-copies as a new, unlocked lock: an object that
    holds one can be sent to a Ray worker or copied, and the copy gets a lock of its own."""

    def __init__(self):
        self._lock = threading.Lock()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc) -> None:
        self._lock.__exit__(*exc)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._lock = threading.Lock()


class SideThreads:
    """The ``score`` and ``prefetch`` threads of one env (started on first use; a pickled copy starts its own)."""

    NICE = {"score": 0, "prefetch": 5}

    def __init__(self):
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._prefetching: list[Future] = []

    def __getstate__(self) -> dict:
        return {"_pools": {}, "_prefetching": []}  # a thread is not copied

    def _pool(self, job: str) -> ThreadPoolExecutor:
        if job not in self._pools:
            self._pools[job] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kelvin-side-{job}",
                                                  initializer=init_helper_thread,
                                                  initargs=(self.NICE[job],))
        return self._pools[job]

    def score(self, fn: Callable, *args) -> Future:
        """``fn(*args)`` on the ``score`` thread."""
        return self._pool("score").submit(fn, *args)

    def prefetch(self, fn: Callable, *args) -> None:
        """``fn(*args)`` on the ``prefetch`` thread; :meth:`wait_prefetch` waits for it."""
        self._prefetching.append(self._pool("prefetch").submit(fn, *args))

    def wait_prefetch(self) -> None:
        pending, self._prefetching = self._prefetching, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Stop the threads (idempotent)."""
        self._prefetching = []
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        self._pools = {}
