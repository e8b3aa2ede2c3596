"""Where the harness keeps what it can rebuild: its own cache (argspec dumps, built test models) and vLLM's cache
root for the servers of a results folder (compiled graphs)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$VLLM_TUNE_CACHE_DIR, else $XDG_CACHE_HOME/vllm-tune, else ~/.cache/vllm-tune."""
    if os.environ.get("VLLM_TUNE_CACHE_DIR"):
        return Path(os.environ["VLLM_TUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vllm-tune"


VLLM_CACHE_DIRNAME = "vllm-cache"  # under a results folder; git-ignored, packed apart by scripts/offline-gpu-sweep.sh


def vllm_cache_root(results_dir: Path | str) -> Path:
    """VLLM_CACHE_ROOT for the servers a sweep starts: $VLLM_CACHE_ROOT when the user set one, else
    `<results_dir>/vllm-cache`.

    vLLM keeps its torch.compile cache (compiled graphs, inductor and triton kernels) there, keyed by everything that
    changes the compiled graph; trials and confirmation repeats of one configuration then compile once, and a host
    that keeps (or restores) the results folder keeps them across stretches of GPU time.
    """
    if os.environ.get("VLLM_CACHE_ROOT"):
        return Path(os.environ["VLLM_CACHE_ROOT"])
    return Path(results_dir).resolve() / VLLM_CACHE_DIRNAME
