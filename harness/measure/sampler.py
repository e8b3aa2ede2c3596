"""Resource sampling during a run: per-GPU memory / utilization / power (NVML) and the server tree's RSS (psutil).

GPU memory is what decides whether a configuration fits, and vLLM pre-allocates it, so the peak says how close a
configuration ran to the limit. RSS covers CPU servers (and host memory of GPU servers): the server process and
all its descendants (engine core, workers), summed. RSS counts shared pages once per process, so it overstates
memory that processes share (e.g. shared-memory queues); it is a ceiling, consistent across configurations.
"""

from __future__ import annotations

import statistics
import threading
from dataclasses import dataclass, field
from typing import Any

import psutil

from harness.nvml import nvml
from harness.records import GpuUsage, MemoryUsage

MIB = 2**20


@dataclass
class _GpuTrace:
    index: int
    name: str
    total_mib: float
    memory_mib: list[float] = field(default_factory=list)
    util: list[float] = field(default_factory=list)
    power_w: list[float] = field(default_factory=list)


class ResourceSampler:
    """Background sampler (thread, context manager) of GPUs `gpu_indices` and the process trees of `pids`.

    `pids` are root processes (one per replica); their descendants are found anew at every sample, since vLLM
    starts its engine core and workers after the API server. With no NVML the GPU list stays empty and only RSS
    is measured. `result()` is a `MemoryUsage`.
    """

    def __init__(self, pids: list[int], gpu_indices: list[int] | None = None, period_s: float = 0.25) -> None:
        self.pids = list(pids)
        self.gpu_indices = list(gpu_indices or [])
        self.period_s = period_s
        self.samples = 0
        self.rss_mib: list[float] = []
        self._gpus: list[_GpuTrace] = []
        self._handles: list[Any] = []
        self._nv: Any | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._procs: dict[int, psutil.Process] = {}

    def _open_gpus(self) -> None:
        if not self.gpu_indices:
            return
        self._nv = nvml()
        if self._nv is None:
            return
        nv = self._nv
        for idx in self.gpu_indices:
            try:
                h = nv.nvmlDeviceGetHandleByIndex(idx)
                name = nv.nvmlDeviceGetName(h)
                name = name.decode() if isinstance(name, bytes) else str(name)
                total = nv.nvmlDeviceGetMemoryInfo(h).total / MIB
            except Exception:  # noqa: BLE001 - an index that does not exist is skipped, not fatal
                continue
            self._handles.append(h)
            self._gpus.append(_GpuTrace(idx, name, total))

    def _process(self, pid: int) -> psutil.Process | None:
        # Cache Process objects: psutil.Process() re-reads /proc for its creation time every time.
        proc = self._procs.get(pid)
        if proc is None:
            try:
                proc = psutil.Process(pid)
            except psutil.Error:
                return None
            self._procs[pid] = proc
        return proc

    def tree_rss_mib(self) -> float:
        """Sum of RSS over the roots and all their descendants now."""
        total = 0
        seen: set[int] = set()
        for pid in self.pids:
            root = self._process(pid)
            if root is None:
                continue
            try:
                members = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue
            for proc in members:
                if proc.pid in seen:
                    continue
                seen.add(proc.pid)
                try:
                    total += self._process(proc.pid).memory_info().rss  # type: ignore[union-attr]
                except (psutil.Error, AttributeError):
                    continue
        return total / MIB

    def sample(self) -> None:
        """Take one sample now (also called by the thread)."""
        self.samples += 1
        self.rss_mib.append(self.tree_rss_mib())
        nv = self._nv
        if nv is None:
            return
        for trace, h in zip(self._gpus, self._handles):
            try:
                trace.memory_mib.append(nv.nvmlDeviceGetMemoryInfo(h).used / MIB)
                trace.util.append(float(nv.nvmlDeviceGetUtilizationRates(h).gpu))
            except Exception:  # noqa: BLE001
                continue
            try:
                trace.power_w.append(nv.nvmlDeviceGetPowerUsage(h) / 1000.0)
            except Exception:  # noqa: BLE001 - some boards do not report power
                pass

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def start(self) -> ResourceSampler:
        self._open_gpus()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="resource-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> MemoryUsage:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5 * self.period_s + 2)
            self._thread = None
            self.sample()
        return self.result()

    def result(self) -> MemoryUsage:
        gpus = [
            GpuUsage(
                index=t.index,
                name=t.name,
                memory_total_mib=round(t.total_mib, 1),
                memory_peak_mib=round(max(t.memory_mib), 1) if t.memory_mib else 0.0,
                memory_mean_mib=round(statistics.fmean(t.memory_mib), 1) if t.memory_mib else 0.0,
                util_mean_percent=round(statistics.fmean(t.util), 1) if t.util else 0.0,
                power_mean_w=round(statistics.fmean(t.power_w), 1) if t.power_w else 0.0,
            )
            for t in self._gpus
        ]
        rss = [r for r in self.rss_mib if r > 0]
        return MemoryUsage(
            gpus=gpus,
            peak_gpu_memory_mib=max((g.memory_peak_mib for g in gpus), default=None),
            rss_peak_mib=round(max(rss), 1) if rss else None,
            rss_mean_mib=round(statistics.fmean(rss), 1) if rss else None,
        )

    def __enter__(self) -> ResourceSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
