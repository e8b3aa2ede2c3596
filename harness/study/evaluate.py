"""Evaluate one candidate: plan it, launch it, load it, score it. Used by sweep trials and by confirmation runs.

Everything a trial learns is returned in an `Evaluation`, so the Optuna glue (`harness.study.runner`) stays thin and
the same code measures a confirmation repeat.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from harness.deploy import Deployment, deploy
from harness.launch.placement import SlotPool
from harness.launch.server import ServerStartError
from harness.plan import detect_hardware, plan_candidate
from harness.records import RunRecord, save_record, to_dict
from harness.settings import Topology
from harness.study.objectives import LoadSteps, Objective
from harness.study.trials import Evaluation


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
    # (step k, n[, prompt set s]) -> n RequestSpecs: the same prompts for step k of every trial, different prompts
    # across the steps of one server, so the prefix cache never replays an earlier step; set s > 0: other prompts
    # for step k (objectives.LoadSteps.prompt_set)
    requests_for: Callable[..., list[Any]]
    study_dir: Path
    start_timeout_s: float
    slots: SlotPool
    out: Any = None  # where load steps report their progress (None: quiet)
    out_tty: bool | None = None  # False: never rewrite a line in place (trials run side by side); None: ask `out`
    # (n, k) -> set k of n RequestSpecs of the workload's lengths as completions prompts (what `vllm bench serve`
    # replays), for the confirmation's cross-check; None: no cross-check possible
    completion_requests: Callable[[int, int], list[Any]] | None = None


def _plan(ctx: StudyContext, settings: dict[str, Any]) -> Any:
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
    cores, servers = ctx.slots.cores_per_cpu_slot(), Topology.of(settings).servers
    if not ev.pruned_reason and cores is not None and servers > cores:
        # the placement would refuse it at launch, and a launch error is retried on every rerun
        ev.pruned_reason = (f"{servers} servers (replicas x servers_per_gpu) need {servers} CPU cores, one each; "
                            f"a slot of this host has {cores}")
    return ev, max(int(plan.gpus_needed or 0), 0)


def evaluate(ctx: StudyContext, settings: dict[str, Any], label: str, *, incumbent: list[float] | None = None,
             must_beat: bool = False, repeat_of: list[float] | None = None, prompt_set: int = 0) -> Evaluation:
    """Plan, and if feasible start the server(s) and score them under the study's objective.

    `incumbent`: the best feasible trial's values so far (a capacity search starts there); `must_beat`: a sampled
    trial, whose measurement may stop once it is shown worse than the incumbent. `repeat_of`: the
    winner's values; measure a confirmation repeat instead of a trial (`Objective.measure_repeat`), with prompt
    set `prompt_set` (`LoadSteps.prompt_set`).
    """
    ev, n_devices = plan_settings(ctx, settings)
    if ev.pruned_reason:
        return ev

    t0 = time.monotonic()
    with ctx.slots.acquire(n_devices) as slot:
        try:
            with deploy(ctx.model, settings, slot=slot, log_dir=ctx.study_dir / "logs" / label,
                        start_timeout_s=ctx.start_timeout_s) as dep:
                measure_live(ctx, dep, ev, label, incumbent=incumbent, must_beat=must_beat, repeat_of=repeat_of,
                             prompt_set=prompt_set)
        except ServerStartError as exc:
            ev.failure = exc.failure
        finally:
            ev.device_seconds = (time.monotonic() - t0) * max(n_devices, 1)
    return finalize(ctx, ev, label)


def measure_live(ctx: StudyContext, dep: Deployment, ev: Evaluation, label: str, *,
                 incumbent: list[float] | None = None, must_beat: bool = False,
                 repeat_of: list[float] | None = None, prompt_set: int = 0) -> Evaluation:
    """Score a running deployment under the study's objective; each load step is saved as a RunRecord.
    `prompt_set`: which of the steps' prompt sets (LoadSteps.prompt_set; > 0 on a server that ran the others)."""
    run_dir = ctx.study_dir / "runs"

    def save(record: RunRecord, step: int) -> None:
        ev.record_paths.append(str(save_record(record, run_dir / f"{label}-step{step}.json")))

    steps = LoadSteps(deployment=dep, workload=ctx.workload, requests_for=ctx.requests_for, slo=ctx.objective.slo,
                      plan=ev.plan, save=save, label=label, out=ctx.out, tty=ctx.out_tty, prompt_set=prompt_set)
    obj = ctx.objective
    got = obj.measure_repeat(steps, repeat_of) if repeat_of is not None else obj.measure(steps, incumbent, must_beat)
    ev.values, ev.constraints, ev.record = got.values, got.constraints, got.record
    ev.curve, ev.metrics, ev.capacity = got.curve, got.metrics, got.capacity
    ev.client_reasons, ev.values_invalid = got.client_reasons, got.values_invalid
    return ev


def finalize(ctx: StudyContext, ev: Evaluation, label: str) -> Evaluation:
    """A server that failed to start or died under load: worst values, a violation, and a failure file."""
    if ev.record is not None and ev.record.failure is not None and ev.failure is None:
        ev.failure = ev.record.failure  # the server died during the load
    if ev.failure is not None:
        ev.values = ctx.objective.worst_values()
        ev.constraints = [1.0]
        fail_path = ctx.study_dir / "runs" / f"{label}-failure.json"
        fail_path.parent.mkdir(parents=True, exist_ok=True)
        fail_path.write_text(json.dumps({"settings": ev.settings, "failure": to_dict(ev.failure),
                                         "plan": ev.plan}, indent=2))
        ev.record_paths.append(str(fail_path))
    return ev
