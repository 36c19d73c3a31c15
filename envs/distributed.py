"""The temperature VecEnv over N Ray workers: one model copy and ``B`` rows per worker, one learner.

:func:`make_vec_env` builds the training env from the ``env:`` block: ``env.workers = 1`` (the default)
gives the in-process :class:`~envs.generation.TemperatureVecEnv` and never imports Ray; ``env.workers =
N > 1`` gives a :class:`RayVecEnv`. Validation and evaluation always build an in-process
``TemperatureVecEnv`` (their numbers must not depend on how many workers trained the policy).

:class:`RayVecEnv` is an SB3 ``VecEnv`` of ``N x B`` rows (``B = env.batch_size``, rows per model copy).
Each of its N Ray actors (:class:`ShardWorker`) loads its own model copy on its own device and runs a
``TemperatureVecEnv`` of ``B`` rows: **shard** ``i`` owns rows ``i*B .. (i+1)*B - 1`` of the driver's view.
``step_async`` sends every shard its slice of the actions; ``step_wait`` gathers the shards' results in
shard order. Everything a row does (synchronised groups, per-row autoreset, ``terminal_observation``,
``TimeLimit.truncated``, ``episode``, ``active``) happens inside its shard's env, so it is exactly what
one process does; PPO, VecNormalize and the callbacks see one VecEnv.

**Groups never straddle shards.** ``B`` is a multiple of ``group_size``, so a shard owns whole groups
and the reward state that spans a group's rows (diversity across its samples) lives in one process.
The ``group`` of an end-of-episode info is renumbered to the driver's view (``i * B / group_size + g``).

**Seeds.** Shard ``i`` is ``TemperatureVecEnv(config, shard=(i, N))`` (:class:`~envs.generation.GenerationCore`):
its groups follow the prompt schedule of an env of ``N x B`` rows (the same seeded prompt order; global
group ``i * B / group_size + g``), and its λ draws and token draws come from streams derived from
``(seed, i)`` (shard 0 keeps the seed's own). So the same seed and N give the same rollouts, equal to
those of N in-process shards built the same way, and row ``r`` meets the same prompts as row ``r`` of
an in-process env of ``N x B`` rows (its tokens differ: one random stream cannot be split).

**Devices.** When the cluster has GPUs and ``model.device`` is ``auto`` or ``cuda``, each worker
reserves one (``num_gpus=1``; Ray makes it the worker's ``cuda``), with one CPU thread. Otherwise the
cluster's CPUs are split: each worker reserves and uses ``CPUs // N`` torch threads (at least 1, at most
the CPUs of the largest node).
``env.ray_address`` None starts a local Ray instance (``num_cpus = max(CPUs, N)``, no dashboard) that
:meth:`RayVecEnv.close` stops again; an address joins that cluster; a Ray this process has already
started is used as it is (and left running).

**Faults: a dead worker is an error that names its shard, never a silent restart.** The actors run
with ``max_restarts=0``. When one dies (killed, out of memory, a crashed CUDA context), the next
``step``/``reset`` raises :class:`WorkerDiedError` naming the shard, its rows, its process and host, and
the env closes itself (the other workers are stopped, a Ray instance it started is shut down): no
orphaned processes. A training run then still saves its model (``kelvin.training``), and
``train.py --resume RUN_DIR`` continues from it with fresh workers. Restarting the actor in place
was rejected: the restarted shard would replay its seed's schedule from the start (the same seed
would no longer give the same rollouts), its rows' unfinished episodes would have to be reported as
truncations that never happened in the middle of a PPO rollout (a wrong bootstrap), the group reward
state would be lost, and a deterministic failure (out of memory) would only repeat. An exception
raised inside a worker (a NaN action, a bad prompt) is re-raised on the driver with the same type and
the shard named, and also closes the env: the other shards have already stepped.

**Timings.** :attr:`RayVecEnv.timings` has the keys of ``TemperatureVecEnv.timings``, aggregated over
the shards: ``tokens`` and ``waiting_rows`` are summed; ``model_s`` and ``env_s`` are the mean over the
workers (they run in parallel, so ``model_s / wall`` is each worker's share of wall time in its model).
Each shard's own are in :attr:`RayVecEnv.shard_timings`.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence, Union

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3.common.vec_env import VecEnv

from envs.config import EnvConfig
from envs.generation import TemperatureVecEnv
from envs.lm import CausalLM, ModelConfig, load_causal_lm
from envs.prompts import Prompt
from envs.rewards import RewardConfig
from policies.actions import ActionMapping
from policies.features import FeatureSpec

__all__ = ["RayVecEnv", "ShardInfo", "ShardWorker", "WorkerDiedError", "make_vec_env"]

ModelSource = Union[ModelConfig, Callable[[], CausalLM]]
"""What each worker loads: a :class:`ModelConfig` (``load_causal_lm`` on the worker's device), or a picklable
zero-argument callable returning a :class:`CausalLM` (a test's stub model)."""

TIMING_KEYS = ("model_s", "env_s", "tokens", "waiting_rows")
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # a local instance's object store: the env's messages are kilobytes


def make_vec_env(config: EnvConfig, lm: CausalLM | None = None, reward: RewardConfig | None = None,
                 prompts: Sequence[Prompt] | None = None, model: ModelSource | None = None,
                 twins: bool = False) -> VecEnv:
    """The VecEnv the ``env:`` block asks for: ``TemperatureVecEnv`` when ``config.workers == 1``, else
    :class:`RayVecEnv` (``workers x batch_size`` rows). ``twins``: twin groups (``train.twin_groups``, one
    in-process env only: :class:`envs.generation_core.GenerationCore`).

    ``lm`` is used by the in-process env (default: load ``model``); Ray workers load their own copy from
    ``model`` (the run's ``model:`` block), so ``model`` is required when ``config.workers > 1``.
    """
    if config.workers == 1:
        if lm is None:
            lm = model() if callable(model) else load_causal_lm(model or ModelConfig())
        return TemperatureVecEnv(config, lm=lm, reward=reward, prompts=prompts, twins=twins)
    if twins:
        raise ValueError(f"train.twin_groups pairs the groups of one in-process env: set env.workers=1 "
                         f"(it is {config.workers})")
    if model is None:
        raise ValueError(f"env.workers={config.workers}: every Ray worker loads its own model copy, so pass "
                         "make_vec_env(..., model=config.model) (the run's model block); a loaded lm is not shipped")
    return RayVecEnv(config, model=model, reward=reward, prompts=prompts)


class WorkerDiedError(RuntimeError):
    """A Ray worker of a :class:`RayVecEnv` died; the message names the shard. The env has closed itself."""


@dataclass(frozen=True)
class ShardInfo:
    """Where a shard runs: its index, its rows in the driver's view, its process, host, device and torch threads."""

    index: int
    rows: range
    pid: int
    host: str
    device: str
    threads: int


class ShardWorker:
    """One shard of a :class:`RayVecEnv`, run as a Ray actor: its own model copy and a ``TemperatureVecEnv``
    of ``config.batch_size`` rows built as shard ``index`` of ``count`` (see the module doc).

    The constructor only stores its arguments; :meth:`start` loads the model, so a failure to load comes
    back as the original exception (a task error), not as a dead actor.
    """

    def __init__(self, config: EnvConfig, index: int, count: int, model: ModelSource,
                 reward: RewardConfig | None, prompts: Sequence[Prompt] | None, threads: int):
        self.config, self.index, self.count = config, index, count
        self.model, self.reward, self.prompts, self.threads = model, reward, prompts, threads
        self.env: TemperatureVecEnv | None = None

    def start(self, device: str) -> dict:
        """Load the model on ``device`` and build the shard's env; returns where it runs."""
        torch.set_num_threads(self.threads)
        if callable(self.model):
            lm = self.model()
        else:
            lm = load_causal_lm(replace(self.model, device=device))
        self.env = TemperatureVecEnv(self.config, lm=lm, reward=self.reward, prompts=self.prompts,
                                     shard=(self.index, self.count))
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(lm.device),
                "threads": torch.get_num_threads(), "obs_dim": int(self.env.observation_space.shape[0])}

    def reset(self, seed: int | None):
        if seed is not None:
            self.env.seed(seed)
        return self.env.reset(), dict(self.env.timings)

    def step(self, actions: np.ndarray):
        obs, rewards, dones, infos = self.env.step(np.array(actions))  # a writable copy: Ray's arrays are read-only
        return obs, rewards, dones, infos, dict(self.env.timings)

    def get_attr(self, name: str, indices: list[int]) -> list[Any]:
        return self.env.get_attr(name, indices)

    def set_attr(self, name: str, value: Any, indices: list[int]) -> None:
        self.env.set_attr(name, value, indices)

    def env_method(self, name: str, args: tuple, kwargs: dict, indices: list[int]) -> list[Any]:
        return self.env.env_method(name, *args, indices=indices, **kwargs)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ImportError("env.workers > 1 runs the env on Ray, which is not installed: `pip install -e '.[ray]'` "
                          "(scripts/setup.sh installs it), or set env.workers=1") from None
    return ray


class RayVecEnv(VecEnv):
    """Batched temperature environment over N Ray workers, one model copy each (see the module doc).

    ## Description, Action Space, Observation Space, Rewards, Starting State, Episode End
    Those of :class:`~envs.generation.TemperatureVecEnv`, row by row: ``num_envs = env.workers x
    env.batch_size``, and shard ``i`` (one worker) owns rows ``i*B .. (i+1)*B - 1``. Infos are the shard
    env's, with ``group`` numbered in the driver's view.

    ## Arguments
    ``config`` (:class:`EnvConfig`: ``workers``, ``ray_address`` and every env setting, applied to each
    shard), ``model`` (what each worker loads: a :class:`ModelConfig`, default the embedded model, or a
    picklable zero-argument callable returning a ``CausalLM``), ``reward`` (:class:`RewardConfig`),
    ``prompts`` (override the prompt file; shipped to every worker).
    """

    metadata = {"render_modes": []}

    def __init__(self, config: EnvConfig, model: ModelSource | None = None, reward: RewardConfig | None = None,
                 prompts: Sequence[Prompt] | None = None):
        if reward is not None and not isinstance(reward, RewardConfig):
            raise TypeError(f"RayVecEnv(reward={type(reward).__name__}): pass a RewardConfig; every worker builds its "
                            "own reward function from it")
        ray = _import_ray()
        self._ray = ray
        self.config = config
        self.model = model if model is not None else ModelConfig()
        self.n_workers = config.workers
        self.rows_per_worker = config.batch_size
        self.render_mode = None
        self.closed = False
        self.waiting = False
        self._actors: list = []
        self._pending: list = []
        self._owns_ray = False
        self.shards: list[ShardInfo] = []
        self.shard_timings: list[dict[str, float]] = [dict.fromkeys(TIMING_KEYS, 0) for _ in range(self.n_workers)]
        self._spec = config.feature_spec()
        try:
            self._connect()
            self._start_workers(reward, prompts)
        except BaseException:
            self.close()
            raise
        obs_space = gym.spaces.Box(-np.inf, np.inf, shape=(self._spec.dim,), dtype=np.float32)
        act_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        super().__init__(self.n_workers * self.rows_per_worker, obs_space, act_space)

    # ------------------------------------------------------------------ start and stop
    def _connect(self) -> None:
        ray = self._ray
        if ray.is_initialized():
            return  # someone in this process started Ray: use it as it is and leave it running
        address = self.config.ray_address or os.environ.get("RAY_ADDRESS")
        if address is None:  # a local instance for this env, with a CPU for every worker
            ray.init(num_cpus=max(os.cpu_count() or 1, self.n_workers), object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                     include_dashboard=False)
        else:  # join a cluster: its resources are its own (Ray refuses num_cpus and the like here)
            ray.init(address=address)
        self._owns_ray = True

    def _placement(self) -> tuple[str, int, float, float]:
        """``(worker device, torch threads, num_cpus, num_gpus)`` per worker, checked against the cluster."""
        resources = self._ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), int(resources.get("GPU", 0))
        n = self.n_workers
        wanted = "cpu" if callable(self.model) else self.model.device
        if wanted.startswith("cuda") or (wanted == "auto" and gpus > 0):
            if gpus < n:
                raise ValueError(f"env.workers={n} needs {n} GPUs (one per worker) but the Ray cluster has {gpus}; set "
                                 f"env.workers={max(gpus, 1)} and raise env.batch_size instead, or model.device=cpu")
            return "cuda", 1, 1.0, 1.0
        if cpus < n:
            raise ValueError(f"env.workers={n} needs {n} CPUs (one per worker) but the Ray cluster has {cpus}; lower "
                             "env.workers or add nodes to the cluster")
        # no more than one node holds, or Ray would wait forever for a node that big (a cluster of small nodes)
        per_node = max((int(node["Resources"].get("CPU", 0)) for node in self._ray.nodes() if node.get("Alive")),
                       default=cpus)
        threads = max(1, min(cpus // n, per_node))
        return ("cpu" if wanted == "auto" else wanted), threads, float(threads), 0.0

    def _start_workers(self, reward: RewardConfig | None, prompts: Sequence[Prompt] | None) -> None:
        device, threads, num_cpus, num_gpus = self._placement()
        actor = self._ray.remote(ShardWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0,
                                                      max_task_retries=0)
        prompts = list(prompts) if prompts is not None else None
        self._actors = [actor.remote(self.config, i, self.n_workers, self.model, reward, prompts, threads)
                        for i in range(self.n_workers)]
        started = self._gather([a.start.remote(device) for a in self._actors], "start")
        B = self.rows_per_worker
        for i, s in enumerate(started):
            if s["obs_dim"] != self._spec.dim:
                raise RuntimeError(f"env shard {i}: observation width {s['obs_dim']} but the config's feature spec has "
                                   f"{self._spec.dim}; the workers run another Kelvin version than the driver")
            self.shards.append(ShardInfo(i, range(i * B, (i + 1) * B), s["pid"], s["host"], s["device"], s["threads"]))

    def close(self) -> None:
        """Stop the workers (and the local Ray instance this env started). Idempotent; timings stay readable."""
        if self.closed:
            return
        self.closed = True
        self.waiting = False
        self._pending = []
        for actor in self._actors:
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # already dead, or Ray already gone: nothing left to stop
                pass
        self._actors = []
        if self._owns_ray and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns_ray = False

    # ------------------------------------------------------------------ results and faults
    def _describe(self, i: int) -> str:
        B = self.rows_per_worker
        where = ""
        if i < len(self.shards):
            s = self.shards[i]
            where = f", pid {s.pid} on {s.host}, {s.device}"
        return f"env shard {i} of {self.n_workers} (rows {i * B}-{(i + 1) * B - 1}{where})"

    def _gather(self, refs: list, what: str, shards: Sequence[int] | None = None) -> list:
        """``ray.get`` the replies of ``shards`` (default: all, in order); a failure closes the env and names the shard."""
        ray = self._ray
        out = []
        for i, ref in zip(range(len(refs)) if shards is None else shards, refs):
            try:
                out.append(ray.get(ref))
            except ray.exceptions.RayActorError as exc:
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                message = (f"{self._describe(i)} died during {what}: {detail} The env is closed (its other workers "
                           "are stopped). Kelvin does not restart a dead worker (envs/distributed.py says why): a "
                           "training run has saved its model; continue it with `train.py --resume RUN_DIR`.")
                self.close()
                raise WorkerDiedError(message) from None
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                message = f"{self._describe(i)} failed during {what}: {cause}"
                self.close()
                try:
                    error = type(cause)(message)
                except Exception:  # an exception type that wants other arguments
                    error = RuntimeError(message)
                raise error from exc
        return out

    # ------------------------------------------------------------------ VecEnv
    @property
    def feature_spec(self) -> FeatureSpec:
        return self._spec

    @property
    def action_mapping(self) -> ActionMapping:
        return self.config.action

    @property
    def timings(self) -> dict[str, float]:
        """``tokens`` and ``waiting_rows`` summed over the shards; ``model_s`` and ``env_s`` their mean over workers."""
        n = len(self.shard_timings)
        return {"model_s": sum(t["model_s"] for t in self.shard_timings) / n,
                "env_s": sum(t["env_s"] for t in self.shard_timings) / n,
                "tokens": sum(int(t["tokens"]) for t in self.shard_timings),
                "waiting_rows": sum(int(t["waiting_rows"]) for t in self.shard_timings)}

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this RayVecEnv is closed (close() was called, or a worker failed); build a new one")

    def warm_prompts(self, episodes: int) -> dict[str, float]:
        """Every shard's :meth:`TemperatureVecEnv.warm_prompts`, in parallel: prompts summed, the slowest shard's wall."""
        self._check_open()
        replies = self._gather([a.env_method.remote("warm_prompts", (episodes,), {}, [0]) for a in self._actors],
                               "warm_prompts")
        return {"prompts": sum(r[0]["prompts"] for r in replies), "wall_s": max(r[0]["wall_s"] for r in replies)}

    def reset(self) -> np.ndarray:
        self._check_open()
        seed = self._seeds[0] if self._seeds and self._seeds[0] is not None else None
        replies = self._gather([a.reset.remote(seed) for a in self._actors], "reset")
        self._reset_seeds()
        self._reset_options()
        for i, (_, timings) in enumerate(replies):
            self.shard_timings[i] = timings
        return np.concatenate([obs for obs, _ in replies])  # (N*B, F)

    def step_async(self, actions: np.ndarray) -> None:
        self._check_open()
        actions = np.asarray(actions, dtype=np.float32).reshape(self.num_envs, -1)  # (N*B, 1)
        B = self.rows_per_worker
        self._pending = [a.step.remote(actions[i * B:(i + 1) * B]) for i, a in enumerate(self._actors)]
        self.waiting = True

    def step_wait(self):
        if not self._pending:
            raise RuntimeError("step_wait() called without step_async(); call env.step(actions)")
        pending, self._pending = self._pending, []
        replies = self._gather(pending, "step")
        self.waiting = False
        groups_per_shard = self.rows_per_worker // self.config.group_size
        infos: list[dict] = []
        for i, (_, _, _, shard_infos, timings) in enumerate(replies):
            self.shard_timings[i] = timings
            for info in shard_infos:
                if "group" in info:  # end of episode: the shard's group number -> the driver's
                    info["group"] += i * groups_per_shard
                infos.append(info)
        obs = np.concatenate([r[0] for r in replies])  # (N*B, F)
        rewards = np.concatenate([r[1] for r in replies])  # (N*B,)
        dones = np.concatenate([r[2] for r in replies])  # (N*B,)
        return obs, rewards, dones, infos

    # ------------------------------------------------------------------ VecEnv plumbing (forwarded per shard)
    def _by_shard(self, indices) -> dict[int, list[int]]:
        """Driver rows -> {shard: its local rows}, shards in order."""
        rows = list(range(self.num_envs)) if indices is None else [indices] if isinstance(indices, int) else list(indices)
        out: dict[int, list[int]] = {}
        for r in rows:
            out.setdefault(r // self.rows_per_worker, []).append(r % self.rows_per_worker)
        return out

    def get_attr(self, attr_name: str, indices=None) -> list[Any]:
        self._check_open()
        parts = self._by_shard(indices)
        replies = self._gather([self._actors[i].get_attr.remote(attr_name, rows) for i, rows in parts.items()],
                               f"get_attr({attr_name!r})", list(parts))
        return [value for reply in replies for value in reply]

    def set_attr(self, attr_name: str, value: Any, indices=None) -> None:
        self._check_open()
        parts = self._by_shard(indices)
        self._gather([self._actors[i].set_attr.remote(attr_name, value, rows) for i, rows in parts.items()],
                     f"set_attr({attr_name!r})", list(parts))

    def env_method(self, method_name: str, *method_args, indices=None, **method_kwargs) -> list[Any]:
        self._check_open()
        parts = self._by_shard(indices)
        replies = self._gather([self._actors[i].env_method.remote(method_name, method_args, method_kwargs, rows)
                                for i, rows in parts.items()], f"env_method({method_name!r})", list(parts))
        return [value for reply in replies for value in reply]

    def env_is_wrapped(self, wrapper_class, indices=None) -> list[bool]:  # noqa: ARG002 (SB3's VecEnv signature)
        return [False for rows in self._by_shard(indices).values() for _ in rows]

    def get_images(self):
        return [None for _ in range(self.num_envs)]
