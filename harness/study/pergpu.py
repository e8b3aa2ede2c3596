"""Per-GPU values: a candidate that takes more GPUs must not win by taking them.

Capacity, goodput and output tokens/s of a trial divided by the GPUs it used (replicas x TP x PP x DP), so
candidates of different GPU counts are ranked on equal hardware; a 2-GPU candidate beats a 1-GPU one only if it
delivers more than twice as much. Servers sharing a GPU (`servers_per_gpu`) count it once: two servers on one GPU
and one server on one GPU are both 1 GPU, and their totals compare as they are. The same arithmetic pairs a confirmation's sides on equal GPUs and fills a
node with replicas of the winner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Pairing:
    """The winner and a baseline as a confirmation deploys them: on the same number of GPUs when both fit the node
    as whole replicas of one server (`equal`), else each as one server, compared per GPU."""

    winner: dict[str, Any]  # settings, `replicas` set
    baseline: dict[str, Any]
    winner_gpus: int
    baseline_gpus: int
    on_cpu: bool = False  # a CPU host: one server a side, no GPU on either

    @property
    def equal(self) -> bool:
        return self.winner_gpus == self.baseline_gpus

    def describe(self) -> str:
        w, b = Topology.of(self.winner), Topology.of(self.baseline)
        if self.on_cpu:
            return "winner vs baseline, one server each on the CPU host (equal hardware)"
        sides = (f"winner {_side(w)} vs baseline {_side(b)}")
        return sides + (" (equal GPUs)" if self.equal else ", compared per GPU (no equal GPU count fits the node)")


def devices_text(gpus: int, on_cpu: bool = False) -> str:
    """What a value was measured on, in words: `N GPU(s)`, or the CPU host (where a server counts as one device
    for per-device ranking, but is no GPU)."""
    return "CPU host" if on_cpu else f"{gpus} GPU{'s' if gpus != 1 else ''}"


def _side(t: Topology) -> str:
    server = f"TP {t.tp}" + (f" x PP {t.pp}" if t.pp > 1 else "") + (f" x DP {t.dp}" if t.dp > 1 else "")
    reps = f"{t.replicas} x " if t.replicas > 1 else ""
    shared = f" x {t.servers_per_gpu} servers per GPU" if t.servers_per_gpu > 1 else ""
    return f"{reps}{server}{shared} on {devices_text(t.gpus)}"


def one_server(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings of one server (a `replicas` key dropped): what a study measures. `servers_per_gpu` stays:
    the servers sharing one GPU set are measured together, as one unit of that GPU set."""
    return {k: v for k, v in settings.items() if k != "replicas"}


def equal_gpu_pair(winner: dict[str, Any], baseline: dict[str, Any], node_gpus: int) -> Pairing:
    """Both sides on the least common multiple of their servers' GPU counts, as replicas, when that fits the node's
    `node_gpus` (vLLM's defaults at TP 1 next to a TP 2 winner: 2 replicas, 2 GPUs vs 2); otherwise each side as one
    server (the per-GPU values still compare). A CPU host (`node_gpus` 0) runs one server a side."""
    w1, b1 = one_server(winner), one_server(baseline)
    gw, gb = gpus_used(w1), gpus_used(b1)
    common = gw * gb // math.gcd(gw, gb)
    if common <= max(node_gpus, 1):
        w1 = {**w1, "replicas": common // gw} if common > gw else w1
        b1 = {**b1, "replicas": common // gb} if common > gb else b1
    return Pairing(winner=w1, baseline=b1, winner_gpus=gpus_used(w1), baseline_gpus=gpus_used(b1),
                   on_cpu=node_gpus == 0)


def fill_replicas(settings: dict[str, Any], node_gpus: int) -> int:
    """How many replicas of one server of `settings` fill `node_gpus` GPUs (at least 1; 1 on a CPU host)."""
    return max(node_gpus // gpus_used(one_server(settings)), 1)
