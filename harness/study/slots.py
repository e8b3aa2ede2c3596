"""Device slots: concurrent trials get disjoint GPU sets (or CPU core sets on a CPU-only host).

A trial asks for the number of GPUs its candidate needs (replicas x tensor_parallel_size) and blocks until that
many are free, so on a 4-GPU node four TP1 trials, or one TP2 and two TP1, run at once. On a CPU host each slot
is a set of cores that vLLM's CPU backend binds its threads to.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(frozen=True)
class Slot:
    """Where one trial's servers run. `gpu_ids` empty means a CPU slot bound to `cpu_cores`."""

    gpu_ids: tuple[int, ...] = ()
    cpu_cores: tuple[int, ...] = ()

    def env(self) -> dict[str, str]:
        """Environment for every server of the trial (replica split is the launcher's job)."""
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


@dataclass
class SlotPool:
    """Hands out disjoint device sets to concurrent trials; `parallel=1` gives every trial all devices in turn."""

    gpu_ids: list[int] = field(default_factory=list)
    cpu_sets: list[tuple[int, ...]] = field(default_factory=list)  # CPU host: one entry per concurrent slot
    memory_free_check: bool = True  # NVML: wait until a GPU's memory is released before reusing it

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._free_gpus = list(self.gpu_ids)
        self._free_cpu = list(self.cpu_sets)

    @classmethod
    def for_host(cls, num_gpus: int, parallel: int) -> "SlotPool":
        """GPUs 0..n-1 on a GPU host; on a CPU host, the usable cores split into `parallel` equal sets."""
        if num_gpus > 0:
            return cls(gpu_ids=list(range(num_gpus)))
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
        parallel = max(1, min(parallel, len(cores)))
        size = len(cores) // parallel
        if parallel == 1:
            return cls(cpu_sets=[()])  # one slot, no binding: vLLM picks its own threads
        return cls(cpu_sets=[tuple(cores[i * size:(i + 1) * size]) for i in range(parallel)])

    @property
    def capacity(self) -> int:
        return len(self.gpu_ids) if self.gpu_ids else len(self.cpu_sets)

    @contextlib.contextmanager
    def acquire(self, n_gpus: int, timeout_s: float | None = None) -> Iterator[Slot]:
        """Block until `n_gpus` GPUs (or one CPU slot) are free; release them when the trial ends."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self.gpu_ids:
                    if n_gpus > len(self.gpu_ids):
                        raise ValueError(f"a trial needs {n_gpus} GPUs but the node has {len(self.gpu_ids)}")
                    ready = [g for g in sorted(self._free_gpus) if self._memory_released(g)]
                    if len(ready) >= max(n_gpus, 1):
                        taken = tuple(ready[:max(n_gpus, 1)])
                        for g in taken:
                            self._free_gpus.remove(g)
                        slot = Slot(gpu_ids=taken)
                        break
                elif self._free_cpu:
                    slot = Slot(cpu_cores=self._free_cpu.pop(0))
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"no free slot for {n_gpus} GPUs within {timeout_s} s")
                self._cond.wait(timeout=min(remaining or 1.0, 1.0))
        try:
            yield slot
        finally:
            with self._cond:
                if slot.gpu_ids:
                    self._free_gpus.extend(slot.gpu_ids)
                else:
                    self._free_cpu.append(slot.cpu_cores)
                self._cond.notify_all()

    def _memory_released(self, gpu: int) -> bool:
        """A GPU whose memory a previous server still holds is not handed out (NVML; true without NVML)."""
        if not self.memory_free_check:
            return True
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(gpu)
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            return len(procs) == 0
        except Exception:
            return True
