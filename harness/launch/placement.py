"""Where a configuration's servers run: GPU sets, CPU-core sets, and the slots concurrent trials take.

A configuration needs `Topology.gpus` GPUs (replicas x tensor_parallel_size x pipeline_parallel_size, from
`harness.settings`). A trial asks the `SlotPool` for that many and blocks until they are free, so on a 4-GPU node
four TP1 trials, or one TP2 and two TP1, run at once. Requests are served first come, first served: a TP4 trial
waiting for the whole node is not starved by TP1 trials that keep grabbing the GPU freed a moment ago. A GPU is
handed out only when NVML shows no process on it any more (the previous server's memory is released). On a CPU host
each slot is a set of cores that vLLM's CPU backend binds its OpenMP threads to (VLLM_CPU_OMP_THREADS_BIND) and the
server's processes are pinned to; the load client, which runs in the harness, keeps a core of its own
(`client_cores`), so a busy server cannot delay the client's sends and its timestamps (on 2 cores: the server on
core 1, the client on core 0). `replica_placement` splits one slot among the servers of a configuration: replicas
on disjoint GPU sets, `servers_per_gpu` servers on each of them (a CPU slot's cores split between all servers).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from harness.errors import HostError, UserError
from harness.nvml import nvml_session
from harness.settings import Topology


@dataclass(frozen=True)
class Slot:
    """Where one trial's servers run. `gpu_ids` empty means a CPU slot bound to `cpu_cores` (none: unbound);
    `client_cores`: where its load client's thread runs (none: wherever the OS puts it); `vllm_cache_root`: the
    servers' VLLM_CACHE_ROOT (their compile cache; None: vLLM's default, ~/.cache/vllm)."""

    gpu_ids: tuple[int, ...] = ()
    cpu_cores: tuple[int, ...] = ()
    client_cores: tuple[int, ...] = ()
    vllm_cache_root: str | None = None


@dataclass(frozen=True)
class Replica:
    """One server of a configuration: its GPUs (a TP x PP group; None on a CPU host), extra environment, and on a
    CPU host the cores its processes are pinned to (empty: not pinned)."""

    gpus: list[int] | None = None
    env: dict[str, str] = field(default_factory=dict)
    cpu_cores: tuple[int, ...] = ()


def core_ranges(cores: list[int] | tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5' (the syntax VLLM_CPU_OMP_THREADS_BIND takes)."""
    out: list[str] = []
    start = prev = None
    for c in sorted(cores):
        if start is None:
            start = prev = c
        elif c == prev + 1:  # type: ignore[operator]
            prev = c
        else:
            out.append(f"{start}-{prev}" if start != prev else f"{start}")
            start = prev = c
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else f"{start}")
    return ",".join(out)


def gpu_sets(total_gpus: int, tp: int, replicas: int, pp: int = 1) -> list[list[int]]:
    """Disjoint GPU index sets, one per replica, each of tp*pp GPUs: [[0,1],[2,3]] for 4 GPUs, tp 2, 2 replicas."""
    per = tp * pp
    if tp < 1 or pp < 1 or replicas < 1:
        raise UserError(f"tensor_parallel_size, pipeline_parallel_size and replicas must be >= 1 "
                        f"(got {tp}, {pp}, {replicas})")  # fmt: skip
    if per * replicas > total_gpus:
        raise UserError(
            f"{replicas} replica(s) x {per} GPU(s) (tensor_parallel_size {tp} x pipeline_parallel_size {pp}) "
            f"need {per * replicas} GPUs, only {total_gpus} available",
            key="replicas",
        )
    return [list(range(r * per, (r + 1) * per)) for r in range(replicas)]


def cpu_core_sets(cores: list[int], replicas: int) -> list[tuple[int, ...]]:
    """Disjoint core sets, one per CPU server: [(0..7), (8..15)]."""
    if replicas < 1 or len(cores) < replicas:
        raise UserError(f"{replicas} server(s) (replicas x servers_per_gpu) need at least {replicas} CPU cores, "
                        f"{len(cores)} available", key="replicas")  # fmt: skip
    per = len(cores) // replicas
    return [tuple(cores[r * per : (r + 1) * per]) for r in range(replicas)]


def cpu_bind_sets(cores: list[int], replicas: int) -> list[str]:
    """Disjoint core lists for VLLM_CPU_OMP_THREADS_BIND, one per CPU replica: ['0-7', '8-15']."""
    return [core_ranges(c) for c in cpu_core_sets(cores, replicas)]


def replica_placement(settings: dict[str, Any], slot: Slot | None) -> list[Replica]:
    """Per server: its GPUs (a TP x PP group; with servers_per_gpu N, N servers in a row on the same GPU) or its
    CPU cores (the slot's cores split between all servers), from the trial's slot."""
    topo = Topology.of(settings)
    if topo.servers_per_gpu > 1 and topo.per_replica > 1:
        raise UserError(f"servers_per_gpu {topo.servers_per_gpu} needs single-GPU servers, not tensor_parallel_size "
                        f"{topo.tp} x pipeline_parallel_size {topo.pp} x data_parallel_size {topo.dp}",
                        key="servers_per_gpu")
    cache = {"VLLM_CACHE_ROOT": slot.vllm_cache_root} if slot is not None and slot.vllm_cache_root else {}
    gpu_ids = list(slot.gpu_ids) if slot is not None else []
    if gpu_ids:
        return [Replica(gpus=[gpu_ids[i] for i in s], env=dict(cache))
                for s in gpu_sets(len(gpu_ids), topo.tp, topo.replicas, topo.pp)
                for _ in range(topo.servers_per_gpu)]
    cores = list(slot.cpu_cores) if slot is not None else []
    if topo.servers > 1 and not cores:
        cores = sorted(os.sched_getaffinity(0))
    if cores:
        return [Replica(env={"VLLM_CPU_OMP_THREADS_BIND": core_ranges(c), **cache}, cpu_cores=c)
                for c in cpu_core_sets(cores, topo.servers)]
    return [Replica(env=dict(cache))]


@contextlib.contextmanager
def pinned_thread(cores: tuple[int, ...]) -> Iterator[None]:
    """Run the calling thread (only it: Linux affinity is per thread) on `cores` for the block; nothing when empty
    or where affinity cannot be set."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def visible_gpus(count: int) -> list[int]:
    """NVML (PCI-order) indices of the GPUs this process may use: CUDA_VISIBLE_DEVICES when it lists indices
    (a node shared by a scheduler, `CUDA_VISIBLE_DEVICES=2,3 python -m harness.sweep ...`), else 0..count-1."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    listed = [p.strip() for p in env.split(",") if p.strip()]
    if listed and all(p.isdigit() for p in listed):
        return [int(p) for p in listed][:count]
    return list(range(count))


def nvml_gpu_idle(gpu: int) -> bool:
    """True when no process holds memory on GPU `gpu` (NVML index); True without NVML (nothing to check)."""
    with nvml_session() as nv:
        if nv is None:
            return True
        try:
            handle = nv.nvmlDeviceGetHandleByIndex(gpu)
            procs = list(nv.nvmlDeviceGetComputeRunningProcesses(handle))
            try:
                procs += list(nv.nvmlDeviceGetGraphicsRunningProcesses(handle))
            except Exception:  # noqa: BLE001 - not every GPU reports graphics processes
                pass
            return len(procs) == 0
        except Exception:  # noqa: BLE001
            return True


HELD_NOTE_S = 15.0  # a GPU still holding memory this long after it was free for us is worth a line


@dataclass
class SlotPool:
    """Hands out disjoint device sets to concurrent trials; `parallel=1` gives every trial all devices in turn."""

    gpu_ids: list[int] = field(default_factory=list)
    cpu_sets: list[tuple[int, ...]] = field(default_factory=list)  # CPU host: one entry per concurrent slot
    client_cores: tuple[int, ...] = ()  # CPU host: the load clients' core (see client_cores())
    memory_free_check: bool = True  # NVML: wait until a GPU's memory is released before reusing it
    gpu_idle: Callable[[int], bool] = nvml_gpu_idle  # the check itself (tests pass a fake NVML)
    poll_s: float = 1.0  # how often a waiting trial re-checks a GPU whose memory is still held
    held_timeout_s: float = 300.0  # a GPU still held this long is not one a server of ours left: give up, saying so
    vllm_cache_root: str | None = None  # every slot's VLLM_CACHE_ROOT (harness.cachedir.vllm_cache_root)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._free_gpus = list(self.gpu_ids)
        self._free_cpu = list(self.cpu_sets)
        self._tickets = itertools.count()
        self._queue: list[int] = []  # tickets of waiting requests, oldest first
        self.log: list[tuple[str, float, tuple[int, ...]]] = []  # (event, time, devices): for tests and reports

    @classmethod
    def for_host(cls, num_gpus: int, parallel: int, vllm_cache_root: str | None = None) -> "SlotPool":
        """The visible GPUs on a GPU host; on a CPU host, the usable cores but the client's split into `parallel`
        equal sets."""
        if num_gpus > 0:
            return cls(gpu_ids=visible_gpus(num_gpus), vllm_cache_root=vllm_cache_root)
        return cls(cpu_sets=cpu_slots(parallel), client_cores=client_cores(parallel), vllm_cache_root=vllm_cache_root)

    def cpu_host_slot(self) -> Slot:
        """CPU host: every server core of the pool in one slot (servers that are never under load at once, such
        as a confirmation's winner and baseline, share them), the client's core, and the pool's cache root."""
        cores = tuple(sorted({c for s in self.cpu_sets for c in s}))
        return Slot(cpu_cores=cores, client_cores=self.client_cores, vllm_cache_root=self.vllm_cache_root)

    @property
    def capacity(self) -> int:
        return len(self.gpu_ids) if self.gpu_ids else len(self.cpu_sets)

    def cores_per_cpu_slot(self) -> int | None:
        """CPU host: the fewest cores a slot pins its servers to (each server needs one of its own, cpu_core_sets);
        None on a GPU host or where servers are not pinned."""
        if self.gpu_ids or not self.cpu_sets or not all(self.cpu_sets):
            return None
        return min(len(s) for s in self.cpu_sets)

    @contextlib.contextmanager
    def acquire(self, n_gpus: int, timeout_s: float | None = None) -> Iterator[Slot]:
        """Block until `n_gpus` GPUs (or one CPU slot) are free, oldest request first; release them on exit."""
        if self.gpu_ids and n_gpus > len(self.gpu_ids):
            raise ValueError(f"a trial needs {n_gpus} GPUs but the node has {len(self.gpu_ids)}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            held: dict[str, float] = {}  # since / said: how long this request has waited on held memory
            try:
                while True:
                    slot = self._try_take(n_gpus) if self._queue[0] == ticket else None
                    if slot is not None:
                        break
                    self._check_held(n_gpus, ticket, held)
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(f"no free slot for {n_gpus} GPUs within {timeout_s} s")
                    self._cond.wait(timeout=min(remaining or self.poll_s, self.poll_s))
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()  # the next in line may fit in what is left
            self.log.append(("acquire", time.monotonic(), slot.gpu_ids or slot.cpu_cores))
        try:
            yield slot
        finally:
            with self._cond:
                if slot.gpu_ids:
                    self._free_gpus.extend(slot.gpu_ids)
                else:
                    self._free_cpu.append(slot.cpu_cores)
                self.log.append(("release", time.monotonic(), slot.gpu_ids or slot.cpu_cores))
                self._cond.notify_all()

    def _try_take(self, n_gpus: int) -> Slot | None:
        if self.gpu_ids:
            need = max(n_gpus, 1)
            ready = [g for g in sorted(self._free_gpus) if self._memory_released(g)]
            if len(ready) < need:
                return None
            taken = tuple(ready[:need])
            for g in taken:
                self._free_gpus.remove(g)
            return Slot(gpu_ids=taken, vllm_cache_root=self.vllm_cache_root)
        if self._free_cpu:
            return Slot(cpu_cores=self._free_cpu.pop(0), client_cores=self.client_cores,
                        vllm_cache_root=self.vllm_cache_root)
        return None

    def _check_held(self, n_gpus: int, ticket: int, wait: dict[str, float]) -> None:
        """While enough GPUs are ours but some still hold memory: after `HELD_NOTE_S` say so (a torn-down server
        releases its memory within seconds), and after `held_timeout_s` raise: a process outside the sweep holds
        them, and waiting on it would hang the sweep without a word."""
        if not self.gpu_ids or self._queue[0] != ticket or len(self._free_gpus) < max(n_gpus, 1):
            wait.clear()
            return
        held = [g for g in sorted(self._free_gpus) if not self._memory_released(g)]
        if not held:
            wait.clear()
            return
        now = time.monotonic()
        waited = now - wait.setdefault("since", now)
        gpus = ", ".join(map(str, held))
        if waited >= HELD_NOTE_S and "said" not in wait:
            wait["said"] = now
            print(f"waiting for GPU {gpus}: a process still holds memory there (nvidia-smi shows which); giving up "
                  f"after {self.held_timeout_s:g} s", file=sys.stderr, flush=True)
        if waited >= self.held_timeout_s:
            raise HostError(f"GPU {gpus} still held memory after {self.held_timeout_s:g} s, by a process this sweep "
                            f"did not start; stop it, or list free GPUs in CUDA_VISIBLE_DEVICES",
                            key="CUDA_VISIBLE_DEVICES")

    def _memory_released(self, gpu: int) -> bool:
        """A GPU whose memory a previous server (or anyone) still holds is not handed out."""
        return True if not self.memory_free_check else self.gpu_idle(gpu)


def _usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def client_cores(parallel: int = 1) -> tuple[int, ...]:
    """The core the load client keeps to itself on a CPU host: the first usable one, when the others still give
    each of `parallel` slots a core of its own; else none (the client then shares the cores with the servers)."""
    cores = _usable_cores()
    return (cores[0],) if len(cores) - 1 >= max(1, parallel) else ()


def cpu_slots(parallel: int) -> list[tuple[int, ...]]:
    """`parallel` disjoint core sets over the cores this process may use, less the client's (`client_cores`).

    vLLM's CPU backend accepts any explicit list, a single core included: its reservation of cores for the
    frontend (VLLM_CPU_NUM_OF_RESERVED_CPU) applies only to the automatic binding. The server's API-server and
    engine-core processes are pinned to the slot's cores too (`ServerSpec.cpu_cores`), so they never take the
    client's core. One core in all: one unbound slot.
    """
    reserved = set(client_cores(parallel))
    cores = [c for c in _usable_cores() if c not in reserved]
    if len(cores) < 2 and not reserved:
        return [()]  # one core: nothing to split or keep apart, vLLM picks its own threads
    parallel = max(1, min(parallel, len(cores)))
    size = len(cores) // parallel
    return [tuple(cores[i * size:(i + 1) * size]) for i in range(parallel)]
