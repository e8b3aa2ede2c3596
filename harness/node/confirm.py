"""`--confirm`: start every instance of a node plan at once and measure it under the mixed traffic it was made for.

What it does, per the plan's design (docs/node-plan.md): start all servers of the plan together on their GPU sets
(CPU build: core sets), drive every model's target rate at the same time (one mixed Poisson load, each request
routed to one of its model's servers), and report per model: steady-state SLO attainment, goodput, p99 TTFT and
TPOT, GPU memory per device; then the same for the user's own layout (their `vllm_instances:`) on the same node,
side by side. A plan whose confirmation misses a model's SLO is written, but not as recommended.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.node.build import NodePlan

DEPLOY_MODULE = "harness.launch.deploy"  # deploy_together(): several servers up at once, torn down together


@dataclass
class ModelConfirmation:
    """One model's measured result under the mixed load, on the GPUs the layout gave it."""

    name: str
    gpus: list[list[int]]  # one GPU set per server
    target_rps: float
    offered_rps: float
    slo_attainment: float  # fraction of requests within every SLO limit, steady-state window only
    goodput_rps: float
    p99_ttft_ms: float | None
    p99_tpot_ms: float | None
    kept_up: bool  # completions matched the offered rate with no growing queue
    gpu_memory_mib: dict[int, float] = field(default_factory=dict)  # device -> peak MiB

    @property
    def meets_slo(self) -> bool:
        return self.kept_up and self.slo_attainment >= 0.99


@dataclass
class NodeConfirmation:
    plan: list[ModelConfirmation]
    user_layout: list[ModelConfirmation] | None  # the user's vllm_instances on the same node, or None
    duration_s: float
    records: list[str] = field(default_factory=list)  # RunRecord JSON paths, one per model and layout

    @property
    def recommended(self) -> bool:
        return all(m.meets_slo for m in self.plan)


def confirm_plan(plan: NodePlan, *, results_dir: Path, user_config: Path | None = None, duration_s: float = 300.0,
                 warmup_s: float = 60.0, start_timeout_s: float = 600.0, out: Any = sys.stderr) -> NodeConfirmation:
    """Measure `plan` (and `user_config`'s vllm_instances, when given) with every instance up at once.

    Needs from harness.launch.deploy: `deploy_together([(model, settings, slot), ...], log_dir, start_timeout_s)`,
    a context manager yielding one live deployment per server (its base URL and API key), all torn down together
    even when one fails to start. From harness.load: one mixed open-loop load (per-model Poisson arrivals at each
    target rate, each request sent to the least-loaded of its model's servers) returning per-request results tagged
    by model, which harness.measure summarizes per model over the steady-state window.
    """
    if importlib.util.find_spec(DEPLOY_MODULE) is None:
        raise UserError(f"--confirm starts every instance of the plan together, which needs {DEPLOY_MODULE} "
                        f"(deploy_together); this installation has no such module, so nothing was started. The "
                        f"plan itself was computed and can be written without --confirm", key="--confirm")
    raise UserError(f"--confirm: {DEPLOY_MODULE} is present but the node confirmation is not wired to it in this "
                    f"version; nothing was started", key="--confirm")
