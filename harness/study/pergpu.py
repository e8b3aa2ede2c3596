"""Per-GPU values: a candidate that takes more GPUs must not win by taking them.

Capacity, goodput and output tokens/s of a trial divided by the GPUs it used (replicas x TP x PP x DP), so
candidates of different GPU counts are ranked on equal hardware; a 2-GPU candidate beats a 1-GPU one only if it
delivers more than twice as much.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GPU_KEYS = ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size")


def gpus_used(settings: Mapping[str, Any]) -> int:
    """GPUs one trial's deployment takes: replicas x tensor x pipeline x data parallel size (each default 1)."""
    n = int(settings.get("replicas") or 1)
    for key in GPU_KEYS:
        n *= int(settings.get(key) or 1)
    if n < 1:
        raise ValueError(f"a deployment uses at least one GPU, got {n} from {dict(settings)!r}")
    return n


def per_gpu(value: float | None, gpus: int) -> float | None:
    """`value` per GPU (None stays None: a failed trial has no value to share out)."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    return None if value is None else value / gpus
