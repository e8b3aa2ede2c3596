"""Run one time-window load step against live servers and judge it: load, server queue series, metrics, verdict.

The pieces a windowed step needs, in the order they happen: the `/metrics` scraper starts, the client runs the
step's whole schedule (warm-up, window, tail) with no client-side warm-up and each request's timeout at the
plan's `drain_s`, the scraper stops; then the window's arrivals give the metrics (definitions of
`harness.measure.stats`) and every request, warm-up included, gives the steady verdict. The SLO part of the
verdict is folded in by the caller (`harness.measure.steady.apply_slo`), which owns the SLO semantics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.load.client import LoadProgress, LoadResult, Target, run_load_sync
from harness.load.prompts import RequestSpec
from harness.load.window import WindowPlan, mark_window
from harness.measure.stats import summarize
from harness.measure.steady import SteadyCriteria, assess
from harness.measure.vllm_metrics import WAITING_METRIC, MetricsScraper
from harness.records import SLO, RequestResult, RunMetrics, ServerStats, Steady


@dataclass
class WindowStep:
    """What one step measured: the raw load, the window-marked results, the window's metrics and the verdict."""

    plan: WindowPlan
    load: LoadResult
    results: list[RequestResult]  # every sent request; those outside the window flagged warmup
    metrics: RunMetrics  # over the window's arrivals
    steady: Steady
    server: ServerStats | None = None  # from /metrics over the whole step (None without metrics targets)


def window_metrics(results: Sequence[RequestResult], plan: WindowPlan, slo: SLO | None = None) -> tuple[list[RequestResult], RunMetrics]:
    """The window's arrivals as the measured requests, and their metrics; the duration is first send -> last
    completion of those requests, as `vllm bench serve` defines it."""
    marked = mark_window(results, plan)
    measured = [r for r in marked if not r.warmup]
    if measured:
        start = min(r.send_s for r in measured)
        end = max(r.send_s + r.e2e_s for r in measured)
        duration = max(end - start, 0.0)
    else:
        duration = 0.0
    return marked, summarize(marked, duration, slo)


def run_window_step(
    targets: list[Target] | list[tuple[str, str | None]],
    requests: list[RequestSpec],
    plan: WindowPlan,
    *,
    model: str,
    api: str,
    slo: SLO | None = None,
    criteria: SteadyCriteria = SteadyCriteria(),
    scrape_period_s: float | None = 0.5,
    extra_body: dict[str, Any] | None = None,
    progress: Callable[[LoadProgress], None] | None = None,
) -> WindowStep:
    """Run `plan` on `targets` (replicas of one configuration) with `requests` (at least
    `plan.requests_needed()`); `scrape_period_s` None skips the server's /metrics (no queue series); `progress`
    is the client's live progress (about once a second)."""
    if len(requests) < plan.requests_needed():
        raise ValueError(f"the step needs {plan.requests_needed()} requests, got {len(requests)}")
    scraper = None
    if scrape_period_s is not None:
        scraper = MetricsScraper([tuple(t) for t in targets], period_s=scrape_period_s).start()  # type: ignore[misc]
    try:
        load = run_load_sync(targets, requests, plan.arrival(), model=model, api=api, warmup=0,
                             timeout_s=plan.drain_s, extra_body=extra_body, progress=progress)
    finally:
        server = scraper.stop() if scraper is not None else None
    waiting = None
    if scraper is not None:
        t0 = load.t0_perf_ns / 1e9
        waiting = [(t - t0, v) for t, v in scraper.series[WAITING_METRIC]]
    marked, metrics = window_metrics(load.results, plan, slo)
    steady = assess(load.results, plan.window, target_rate=plan.rate, waiting=waiting, criteria=criteria)
    return WindowStep(plan=plan, load=load, results=marked, metrics=metrics, steady=steady, server=server)
