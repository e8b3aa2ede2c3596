"""ResourceSampler: process-tree RSS (children included) and, without NVML, an empty GPU list."""

from __future__ import annotations

import subprocess
import sys
import time

from harness.measure.sampler import ResourceSampler

# A parent that starts a child holding ~64 MiB, like vLLM's API server and its engine core.
TREE = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', "
    "'import time; b = bytearray(64 * 2**20); b[::4096] = b\"x\" * len(b[::4096]); print(\"ready\", flush=True); "
    "time.sleep(30)'])\n"
    "time.sleep(30)\n"
)


def test_tree_rss_includes_children() -> None:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"  # the child has allocated
        with ResourceSampler([proc.pid], gpu_indices=[0], period_s=0.1) as sampler:
            deadline = time.monotonic() + 30
            while sampler.samples < 3 and time.monotonic() < deadline:  # a loaded machine may sample late
                time.sleep(0.1)
        usage = sampler.result()
    finally:
        for child in __import__("psutil").Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
    assert sampler.samples >= 3
    assert usage.rss_peak_mib is not None and usage.rss_mean_mib is not None
    assert usage.rss_peak_mib > 64 + 5  # child's 64 MiB plus two interpreters
    assert usage.rss_mean_mib <= usage.rss_peak_mib
    # This machine has no NVML: asking for GPU 0 yields no GPU entries rather than an error.
    try:
        import pynvml

        pynvml.nvmlInit()
        has_nvml = True
    except Exception:  # noqa: BLE001
        has_nvml = False
    if not has_nvml:
        assert usage.gpus == [] and usage.peak_gpu_memory_mib is None


def test_dead_pid_gives_no_rss() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with ResourceSampler([proc.pid], period_s=0.05) as sampler:
        time.sleep(0.15)
    assert sampler.result().rss_peak_mib is None
