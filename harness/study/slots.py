"""Device slots: concurrent trials get disjoint GPU sets (or CPU core sets on a CPU-only host).

A trial asks for the number of GPUs its candidate needs (replicas x tensor_parallel_size x pipeline_parallel_size)
and blocks until that many are free, so on a 4-GPU node four TP1 trials, or one TP2 and two TP1, run at once.
Requests are served first come, first served: a TP4 trial waiting for the whole node is not starved by TP1 trials
that keep grabbing the GPU freed a moment ago. A GPU is handed out only when NVML shows no process on it any more
(the previous server's memory is released). On a CPU host each slot is a set of cores that vLLM's CPU backend
binds its OpenMP threads to (VLLM_CPU_OMP_THREADS_BIND).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator


@dataclass(frozen=True)
class Slot:
    """Where one trial's servers run. `gpu_ids` empty means a CPU slot bound to `cpu_cores` (none: unbound)."""

    gpu_ids: tuple[int, ...] = ()
    cpu_cores: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        """Environment for a server using the whole slot (the replica split is `harness.bench.replica_placement`)."""
        if self.gpu_ids:
            # PCI order makes CUDA's numbering match NVML's, which the memory checks use
            return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpu_ids))}
        if self.cpu_cores:
            return {"VLLM_CPU_OMP_THREADS_BIND": _ranges(self.cpu_cores)}
        return {}


def _ranges(cores: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5' (the syntax VLLM_CPU_OMP_THREADS_BIND takes)."""
    out, start, prev = [], None, None
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
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return True
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
        procs = list(pynvml.nvmlDeviceGetComputeRunningProcesses(handle))
        try:
            procs += list(pynvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
        except Exception:
            pass
        return len(procs) == 0
    except Exception:
        return True
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


@dataclass
class SlotPool:
    """Hands out disjoint device sets to concurrent trials; `parallel=1` gives every trial all devices in turn."""

    gpu_ids: list[int] = field(default_factory=list)
    cpu_sets: list[tuple[int, ...]] = field(default_factory=list)  # CPU host: one entry per concurrent slot
    memory_free_check: bool = True  # NVML: wait until a GPU's memory is released before reusing it
    gpu_idle: Callable[[int], bool] = nvml_gpu_idle  # the check itself (tests pass a fake NVML)
    poll_s: float = 1.0  # how often a waiting trial re-checks a GPU whose memory is still held

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._free_gpus = list(self.gpu_ids)
        self._free_cpu = list(self.cpu_sets)
        self._tickets = itertools.count()
        self._queue: list[int] = []  # tickets of waiting requests, oldest first
        self.log: list[tuple[str, float, tuple[int, ...]]] = []  # (event, time, devices): for tests and reports

    @classmethod
    def for_host(cls, num_gpus: int, parallel: int) -> "SlotPool":
        """The visible GPUs on a GPU host; on a CPU host, the usable cores split into `parallel` equal sets."""
        if num_gpus > 0:
            return cls(gpu_ids=visible_gpus(num_gpus))
        return cls(cpu_sets=cpu_slots(parallel))

    @property
    def capacity(self) -> int:
        return len(self.gpu_ids) if self.gpu_ids else len(self.cpu_sets)

    @contextlib.contextmanager
    def acquire(self, n_gpus: int, timeout_s: float | None = None) -> Iterator[Slot]:
        """Block until `n_gpus` GPUs (or one CPU slot) are free, oldest request first; release them on exit."""
        if self.gpu_ids and n_gpus > len(self.gpu_ids):
            raise ValueError(f"a trial needs {n_gpus} GPUs but the node has {len(self.gpu_ids)}")
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            ticket = next(self._tickets)
            self._queue.append(ticket)
            try:
                while True:
                    slot = self._try_take(n_gpus) if self._queue[0] == ticket else None
                    if slot is not None:
                        break
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
            return Slot(gpu_ids=taken)
        if self._free_cpu:
            return Slot(cpu_cores=self._free_cpu.pop(0))
        return None

    def _memory_released(self, gpu: int) -> bool:
        """A GPU whose memory a previous server (or anyone) still holds is not handed out."""
        return True if not self.memory_free_check else self.gpu_idle(gpu)


def cpu_slots(parallel: int) -> list[tuple[int, ...]]:
    """`parallel` disjoint core sets over the cores this process may use; one unbound slot for parallel 1.

    vLLM's CPU backend accepts any explicit list, a single core included: its reservation of cores for the
    frontend (VLLM_CPU_NUM_OF_RESERVED_CPU) applies only to the automatic binding. The API server and engine-core
    processes are not bound and share the host's cores with every slot.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    parallel = max(1, min(parallel, len(cores)))
    if parallel == 1:
        return [()]  # no binding: vLLM picks its own threads
    size = len(cores) // parallel
    return [tuple(cores[i * size:(i + 1) * size]) for i in range(parallel)]
