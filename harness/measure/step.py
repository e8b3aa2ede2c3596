"""Run one time-window load step against live servers and judge it: load, server queue series, metrics, verdict.
`run_window_step` loads the replicas of one configuration; `run_mixed_window_step` several models' servers at
once (one mixed load, one window), each model judged on its own servers and requests.

The pieces a windowed step needs, in the order they happen: the `/metrics` scraper starts, the client runs the
step's whole schedule (warm-up, window, tail) with no client-side warm-up and each request's timeout at the
plan's `drain_s`, the scraper stops; then the window's arrivals give the metrics (definitions of
`harness.measure.stats`) and every request, warm-up included, gives the steady verdict. The SLO part of the
verdict is folded in by the caller (`harness.measure.steady.apply_slo`), which owns the SLO semantics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from harness.load.client import LoadProgress, LoadResult, Target, run_load_sync
from harness.load.mixed import Stream, run_mixed_load_sync
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


@dataclass
class WindowStream:
    """One model's part of a mixed windowed step: its servers, requests, plan (its rate, the common window) and SLO."""

    name: str
    targets: list[Target] | list[tuple[str, str | None]]
    requests: list[RequestSpec]
    plan: WindowPlan
    model: str  # the name the servers serve
    api: str
    slo: SLO | None = None
    extra_body: dict[str, Any] | None = None


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
    _check_requests(requests, plan)
    with _scraping([targets], scrape_period_s) as scrapers:
        load = run_load_sync(targets, requests, plan.arrival(), model=model, api=api, warmup=0,
                             timeout_s=plan.drain_s, extra_body=extra_body, progress=progress)
    return _judge(load, plan, slo, criteria, scrapers[0])


def run_mixed_window_step(
    streams: Sequence[WindowStream],
    *,
    criteria: SteadyCriteria = SteadyCriteria(),
    scrape_period_s: float | None = 0.5,
    progress: Callable[[str, LoadProgress], None] | None = None,
) -> dict[str, WindowStep]:
    """Every stream's plan at once (one mixed load, `harness.load.mixed`), each judged on its own servers: window
    metrics over its window arrivals, the steady verdict with its servers' queue series. The plans must share
    their window (`harness.load.window.common_window`)."""
    if len({s.plan.window for s in streams}) > 1:
        raise ValueError("the streams of a mixed step need one common window (harness.load.window.common_window)")
    for s in streams:
        _check_requests(s.requests, s.plan)
    mixed = [Stream(s.name, s.targets, s.requests, s.plan.arrival(), s.model, s.api, s.extra_body) for s in streams]
    with _scraping([s.targets for s in streams], scrape_period_s) as scrapers:
        loads = run_mixed_load_sync(mixed, timeout_s=max(s.plan.drain_s for s in streams), progress=progress)
    return {s.name: _judge(loads[s.name], s.plan, s.slo, criteria, scraper) for s, scraper in zip(streams, scrapers)}


def _check_requests(requests: Sequence[RequestSpec], plan: WindowPlan) -> None:
    if len(requests) < plan.requests_needed():
        raise ValueError(f"the step needs {plan.requests_needed()} requests, got {len(requests)}")


@contextlib.contextmanager
def _scraping(target_sets: Sequence[Sequence[Any]], period_s: float | None) -> Iterator[list[_Scrape]]:
    """One /metrics scraper per target set while the load runs (None each when `period_s` is None)."""
    scrapes = [_Scrape(MetricsScraper([tuple(t) for t in ts], period_s=period_s).start() if period_s is not None
                       else None) for ts in target_sets]  # type: ignore[misc]
    try:
        yield scrapes
    finally:
        for sc in scrapes:
            sc.stop()


class _Scrape:
    """A running scraper and, once stopped, what it said over the step."""

    def __init__(self, scraper: MetricsScraper | None) -> None:
        self.scraper = scraper
        self.server: ServerStats | None = None

    def stop(self) -> None:
        if self.scraper is not None and self.server is None:
            self.server = self.scraper.stop()

    def waiting(self, t0_perf_ns: int) -> list[tuple[float, float]] | None:
        """The server queue series on the load's send clock."""
        if self.scraper is None:
            return None
        t0 = t0_perf_ns / 1e9
        return [(t - t0, v) for t, v in self.scraper.series[WAITING_METRIC]]


def _judge(load: LoadResult, plan: WindowPlan, slo: SLO | None, criteria: SteadyCriteria, scrape: _Scrape
           ) -> WindowStep:
    """The step's window metrics and steady verdict from its load and its servers' queue series."""
    marked, metrics = window_metrics(load.results, plan, slo)
    steady = assess(load.results, plan.window, target_rate=plan.rate, waiting=scrape.waiting(load.t0_perf_ns),
                    criteria=criteria)
    return WindowStep(plan=plan, load=load, results=marked, metrics=metrics, steady=steady, server=scrape.server)
