"""Per-GPU values: a candidate that takes more GPUs must not win by taking them.

Capacity, goodput and output tokens/s of a trial divided by the GPUs it used (replicas x TP x PP x DP), so
candidates of different GPU counts are ranked on equal hardware; a 2-GPU candidate beats a 1-GPU one only if it
delivers more than twice as much.
"""

from __future__ import annotations

from typing import Any

from harness.settings import Topology


def gpus_used(settings: dict[str, Any]) -> int:
    """GPUs one trial's deployment takes (the topology's arithmetic; at least one)."""
    return max(Topology.of(settings).gpus, 1)


def per_gpu(value: float | None, gpus: int) -> float | None:
    """`value` per GPU (None stays None: a failed trial has no value to share out)."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    return None if value is None else value / gpus
