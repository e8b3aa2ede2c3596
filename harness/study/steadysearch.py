"""The steady-state capacity search on live servers: `measure(rate)` as windowed load steps on deployments.

`harness.study.capacity.search_capacity` is pure logic over `measure(rate) -> (record, steady)`; this module is
that `measure` on real servers, one or several deployments (load spread round-robin over every server's target),
so a study, a script and a benchmark run the same step:

- before each step it waits until every server's queue is empty (`harness.measure.vllm_metrics.wait_idle`), so one
  step's backlog does not load the next;
- the step's warm-up and tail follow the previous step's mean E2E (`WindowSpec.plan`);
- each step gets its own prompts (`requests_for(step, n)`), so the prefix cache never replays an earlier step;
- the record carries the window's metrics, the client check, vLLM's counters (/metrics over the step, the KV
  capacity from the start-up log), the SLO verdict folded in (`step_verdict`), and a failure when a server died.
"""

from __future__ import annotations

import datetime as _dt
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from harness.deploy import Deployment
from harness.envinfo import environment
from harness.load.client import LoadProgress
from harness.load.prompts import RequestSpec
from harness.load.window import WindowPlan, WindowSpec
from harness.measure.step import WindowStep, run_window_step
from harness.measure.vllm_metrics import merge_stats, wait_idle
from harness.records import SLO, RunRecord, Steady
from harness.study.capacity import step_verdict

__all__ = ["ServerDied", "StepLog", "live_measure"]


class ServerDied(RuntimeError):
    """A server exited during a step: the search cannot go on (`record.failure` says why)."""

    def __init__(self, record: RunRecord) -> None:
        failure = record.failure
        super().__init__(f"{failure.kind}: {failure.message}" if failure is not None else "server died")
        self.record = record


@dataclass
class StepLog:
    """What `live_measure` keeps of every step, in order (the search keeps only record and verdict)."""

    steps: list[WindowStep] = field(default_factory=list)
    idle_wait_s: list[float] = field(default_factory=list)


def live_measure(
    deployments: Sequence[Deployment],
    workload: Any,
    requests_for: Callable[[int, int], list[RequestSpec]],
    spec: WindowSpec,
    slo: SLO | None,
    *,
    before_step: Callable[[int, WindowPlan], None] | None = None,
    idle_timeout_s: float = 300.0,
    log: StepLog | None = None,
    first_step: int = 0,
    expected_e2e_s: float | None = None,
    progress: Callable[[int, LoadProgress], None] | None = None,
) -> Callable[[float], tuple[RunRecord, Steady]]:
    """measure(rate) for `search_capacity` on `deployments` (all serving one model; their servers share the load).

    `requests_for(step, n)` gives step `step`'s `n` requests; `before_step(step, plan)` may raise to stop the
    search before a step starts (a deadline); a server that died raises `ServerDied`. A search resumed after
    `first_step` steps (replayed from their records) passes their count and the last step's batch fill time, so the
    next step gets the prompts and the warm-up an uninterrupted search would have given it. `progress(step, p)`
    is the client's live progress.
    """
    targets = [t for dep in deployments for t in dep.group.targets]
    first = deployments[0]
    last_e2e: list[float] = [expected_e2e_s] if expected_e2e_s else []
    k = [first_step]

    def measure(rate: float) -> tuple[RunRecord, Steady]:
        plan = spec.plan(rate, last_e2e[-1] if last_e2e else None)
        if before_step is not None:
            before_step(k[0], plan)
        waited = wait_idle(targets, timeout_s=idle_timeout_s)
        step_k = k[0]
        step = run_window_step(targets, requests_for(step_k, plan.requests_needed()), plan, model=first.model,
                               api=workload.api, slo=slo,
                               progress=None if progress is None else (lambda p: progress(step_k, p)))
        k[0] += 1
        if step.steady.warmup_basis_s is not None:
            last_e2e.append(step.steady.warmup_basis_s)
        log_stats = first.log_stats()
        now = _dt.datetime.now(_dt.timezone.utc)
        record = RunRecord(
            run_id=f"{now:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}", created=now.isoformat(timespec="seconds"),
            model=first.model, settings=dict(first.settings), workload=workload.to_dict(),
            arrival=plan.arrival().to_dict(), slo=slo, argv=[a for dep in deployments for a in dep.group.argv],
            metrics=step.metrics, client=step.load.client,
            server=merge_stats(log_stats, step.server) if step.server is not None else log_stats,
            env=environment(), log_paths=[p for dep in deployments for p in dep.log_paths],
            startup_s=max((dep.startup_s or 0.0) for dep in deployments))
        record.failure = next((f for f in (dep.dead_server_failure() for dep in deployments) if f is not None), None)
        record.steady = step_verdict(record, step.steady, slo)
        if log is not None:
            log.steps.append(step)
            log.idle_wait_s.append(waited)
        if record.failure is not None:
            raise ServerDied(record)
        return record, record.steady

    return measure
