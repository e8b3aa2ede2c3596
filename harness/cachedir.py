"""Where the harness keeps what it can rebuild (argspec dumps, built test models): one directory for all."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """$VLLM_TUNE_CACHE_DIR, else $XDG_CACHE_HOME/vllm-tune, else ~/.cache/vllm-tune."""
    if os.environ.get("VLLM_TUNE_CACHE_DIR"):
        return Path(os.environ["VLLM_TUNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vllm-tune"
