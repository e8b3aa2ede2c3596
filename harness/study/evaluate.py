"""Evaluate one candidate: plan it, launch it, load it, score it. Used by sweep trials and by confirmation runs.

Everything a trial learns is returned in an `Evaluation`, so the Optuna glue (`harness.study.runner`) stays thin and
the same code measures a confirmation repeat.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from harness.records import Failure, RunRecord, save_record, to_dict
from harness.study.scoring import capacity_search, metric_value, slo_violations
from harness.study.sweepfile import Objective


@dataclass
class StudyContext:
    """What stays the same across the trials of one study."""

    model: str  # passed to vLLM: a local dir (absolute) or a hub name
    model_name: str  # as the user wrote it; what the emitted config names
    slug: str
    facts: Any  # harness.plan.ModelFacts
    hardware: Any  # harness.plan.Hardware
    space: Any  # harness.space.SearchSpace
    workload: Any  # harness.load.workload.Workload
    objective: Objective
    requests_for: Callable[[int], list[Any]]  # step k -> RequestSpecs: the same prompts for step k of every trial,
    # different prompts across the steps of one server, so the prefix cache never replays an earlier step
    study_dir: Path
    start_timeout_s: float
    slots: Any  # harness.study.slots.SlotPool


@dataclass
class Evaluation:
    """The outcome of one candidate. `values is None` means pruned before launch (see `pruned_reason`)."""

    settings: dict[str, Any]
    values: list[float] | None = None
    constraints: list[float] = field(default_factory=list)
    pruned_reason: str | None = None
    failure: Failure | None = None
    plan: dict[str, Any] | None = None
    record: RunRecord | None = None  # the run the values come from
    record_paths: list[str] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)  # capacity: latency vs offered load
    device_seconds: float = 0.0  # wall time servers held their devices, times the devices held
    capacity: float | None = None

    def summary(self) -> dict[str, Any]:
        """Flat numbers for trial user attributes, the table and the dashboard."""
        out: dict[str, Any] = {}
        rec = self.record
        if rec is not None and rec.metrics is not None:
            m = rec.metrics
            out.update(request_throughput=m.request_throughput, output_throughput=m.output_throughput,
                       total_token_throughput=m.total_token_throughput, goodput=m.goodput,
                       completed=m.completed, failed=m.failed, prefix_cached_fraction=m.prefix_cached_fraction)
            for stat in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
                st = getattr(m, stat)
                if st is not None:
                    for q in ("mean", "p50", "p90", "p99"):
                        out[f"{q}_{stat}"] = getattr(st, q)
        if rec is not None and rec.memory is not None:
            out["peak_gpu_memory_mib"] = rec.memory.peak_gpu_memory_mib
            out["rss_peak_mib"] = rec.memory.rss_peak_mib
        if rec is not None and rec.server is not None:
            out["kv_cache_tokens"] = rec.server.kv_cache_tokens
            out["peak_kv_usage"] = rec.server.peak_kv_usage
            out["preemptions"] = rec.server.preemptions
        if rec is not None and rec.startup_s is not None:
            out["startup_s"] = rec.startup_s
        if self.plan:
            out["planned_kv_cache_tokens"] = self.plan.get("kv_cache_tokens")
        if self.capacity is not None:
            out["capacity_rps"] = self.capacity
        return {k: v for k, v in out.items() if v is not None}


def _plan(ctx: StudyContext, settings: dict[str, Any]) -> Any:
    from harness.plan import detect_hardware, plan_candidate

    hardware = ctx.hardware
    if getattr(hardware, "arch", "") == "cpu":
        # vLLM's CPU build sizes its KV cache from the NUMA node's memory at launch, and on some VMs that grows
        # as memory is first touched: read it again right before each launch (it is a cheap /sys read).
        hardware = detect_hardware(None, None)
    return plan_candidate(ctx.facts, hardware, settings, longest_request=ctx.workload.max_total_tokens())


def plan_settings(ctx: StudyContext, settings: dict[str, Any]) -> tuple[Evaluation, int]:
    """Conditions and planner; returns the evaluation so far (pruned when impossible) and the GPUs needed."""
    ev = Evaluation(settings=dict(settings))
    broken = ctx.space.violations(settings)
    if broken:
        ev.pruned_reason = "violates " + "; ".join(broken)
        return ev, 0
    plan = _plan(ctx, settings)
    ev.plan = plan.to_dict()
    if not plan.feasible:
        ev.pruned_reason = plan.reason()
    return ev, max(int(plan.gpus_needed or 0), 0)


def evaluate(ctx: StudyContext, settings: dict[str, Any], label: str, *, start_rate: float | None = None,
             max_steps: int | None = None, fixed_rate: float | None = None) -> Evaluation:
    """Plan, then (if feasible) launch and measure `settings` under the study's objective.

    `fixed_rate` replaces a capacity search by one load step at that Poisson rate, scored by goodput: what a
    confirmation repeat measures at the winner's claimed capacity.
    """
    ev, n_devices = plan_settings(ctx, settings)
    if ev.pruned_reason:
        return ev

    from harness.bench import deploy
    from harness.launch.server import ServerStartError

    t0 = time.monotonic()
    with ctx.slots.acquire(n_devices) as slot:
        try:
            with deploy(ctx.model, settings, slot=slot, log_dir=ctx.study_dir / "logs" / label,
                        start_timeout_s=ctx.start_timeout_s) as dep:
                measure_live(ctx, dep, ev, label, start_rate=start_rate, max_steps=max_steps,
                             fixed_rate=fixed_rate)
        except ServerStartError as exc:
            ev.failure = exc.failure
        finally:
            ev.device_seconds = (time.monotonic() - t0) * max(n_devices, 1)
    return finalize(ctx, ev, label)


def measure_live(ctx: StudyContext, dep: Any, ev: Evaluation, label: str, *, start_rate: float | None = None,
                 max_steps: int | None = None, fixed_rate: float | None = None) -> Evaluation:
    """Score a running deployment under the study's objective; each load step is saved as a RunRecord."""
    obj = ctx.objective
    run_dir = ctx.study_dir / "runs"
    step = 0

    def measure(arrival_kwargs: dict[str, Any]) -> RunRecord:
        nonlocal step
        step += 1
        record = dep.run(ctx.workload, ctx.requests_for(step), slo=obj.slo, plan=ev.plan, **arrival_kwargs)
        ev.record_paths.append(str(save_record(record, run_dir / f"{label}-step{step}.json")))
        return record

    if obj.kind == "capacity" and fixed_rate is not None:
        record = measure({"rate": fixed_rate, "burstiness": obj.burstiness, "num_requests": obj.num_requests})
        ev.record = record
        ev.constraints = slo_violations(record, obj.slo)
        ev.values = [float(record.metrics.goodput or 0.0) if record.metrics else 0.0]
    elif obj.kind == "capacity":
        result = capacity_search(
            lambda rate: measure({"rate": rate, "burstiness": obj.burstiness, "num_requests": obj.num_requests}),
            obj.slo, start_rate=start_rate or obj.start_rate, max_steps=max_steps or obj.max_steps,
            min_rate=obj.min_rate)
        ev.capacity = result.capacity
        ev.curve = result.curve()
        ev.record = result.best or result.steps[-1].record
        ev.values = [result.capacity]
        ev.constraints = [0.0 if result.capacity > 0 else 1.0]
    else:
        load = ({"concurrency": obj.concurrency} if obj.concurrency else
                {"rate": obj.rate, "burstiness": obj.burstiness})
        record = measure({**load, "num_requests": obj.num_requests, "duration_s": obj.duration_s})
        ev.record = record
        ev.constraints = slo_violations(record, obj.slo)
        ev.values = objective_values(obj, record)
    return ev


def finalize(ctx: StudyContext, ev: Evaluation, label: str) -> Evaluation:
    """A server that failed to start or died under load: worst values, a violation, and a failure file."""
    if ev.record is not None and ev.record.failure is not None and ev.failure is None:
        ev.failure = ev.record.failure  # the server died during the load
    if ev.failure is not None:
        ev.values = worst_values(ctx.objective)
        ev.constraints = [1.0]
        fail_path = ctx.study_dir / "runs" / f"{label}-failure.json"
        fail_path.parent.mkdir(parents=True, exist_ok=True)
        fail_path.write_text(json.dumps({"settings": ev.settings, "failure": to_dict(ev.failure),
                                         "plan": ev.plan}, indent=2))
        ev.record_paths.append(str(fail_path))
    return ev


def objective_values(obj: Objective, record: RunRecord) -> list[float]:
    m = record.metrics
    if m is None:
        return worst_values(obj)
    if obj.kind == "goodput":
        return [float(m.goodput or 0.0)]
    if obj.kind == "throughput":
        return [float(m.output_throughput)]
    latency = metric_value(m, obj.latency_metric)
    return [float(m.output_throughput), float("inf") if latency is None else latency]


def worst_values(obj: Objective) -> list[float]:
    """What a failed candidate reports: the worst possible value in each direction, never a good one."""
    return [0.0 if d == "maximize" else float("inf") for d in obj.directions]
