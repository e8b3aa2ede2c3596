"""Objective and constraint computation, and the capacity search, on hand-made runs."""

from __future__ import annotations

import pytest

from harness.records import ClientCheck, Failure, LatencyStats, RunMetrics, RunRecord, SLO
from harness.study.evaluate import objective_values, worst_values
from harness.study.scoring import capacity_search, metric_value, slo_holds, slo_violations
from harness.study.sweepfile import Objective


def stats(p99: float, p90: float | None = None) -> LatencyStats:
    p90 = p99 if p90 is None else p90
    return LatencyStats(mean=p90, std=0.0, p50=p90, p90=p90, p95=p99, p99=p99, max=p99, count=10)


def record(ttft99: float, tpot99: float, *, failed: int = 0, completed: int = 100, valid: bool = True,
           failure: Failure | None = None, out_tps: float = 1000.0, goodput: float | None = 5.0) -> RunRecord:
    metrics = RunMetrics(duration_s=10, completed=completed, failed=failed, total_input_tokens=1000,
                         total_output_tokens=10000, request_throughput=completed / 10, output_throughput=out_tps,
                         total_token_throughput=out_tps + 100, goodput=goodput, ttft_ms=stats(ttft99),
                         tpot_ms=stats(tpot99), itl_ms=stats(tpot99), e2e_ms=stats(ttft99 + 100 * tpot99))
    client = ClientCheck(requested_rate=10, achieved_rate=10, dispatch_lag_p99_ms=1, client_cpu_percent=10,
                         valid=valid)
    return RunRecord(run_id="r", created="", model="m", settings={}, workload={}, arrival={}, slo=None, argv=[],
                     metrics=None if failure else metrics, client=client, failure=failure)


SLO_ = SLO(ttft_ms=1000, tpot_ms=50, percentile=99)


def test_violations_are_relative_and_signed() -> None:
    v = slo_violations(record(500, 60), SLO_)
    assert v == pytest.approx([-0.5, 0.2])
    assert not slo_holds(record(500, 60), SLO_)
    assert slo_holds(record(1000, 50), SLO_)


def test_percentile_is_respected() -> None:
    rec = record(ttft99=2000, tpot99=10)
    rec.metrics.ttft_ms = stats(p99=2000, p90=800)  # type: ignore[union-attr]
    assert not slo_holds(rec, SLO(ttft_ms=1000, percentile=99))
    assert slo_holds(rec, SLO(ttft_ms=1000, percentile=90))


def test_failures_drops_and_client_limits_violate() -> None:
    assert slo_violations(record(1, 1, failure=Failure("oom", "x")), SLO_) == [1.0, 1.0]
    assert slo_violations(record(1, 1, failed=2, completed=98), SLO_) == [1.0, 1.0]  # 2% dropped
    assert slo_holds(record(1, 1, failed=1, completed=199), SLO_)  # 0.5% dropped is tolerated
    assert slo_violations(record(1, 1, valid=False), SLO_) == [1.0, 1.0]


def test_objective_values() -> None:
    rec = record(100, 10, out_tps=1234.0, goodput=7.5)
    assert objective_values(Objective(kind="goodput"), rec) == [7.5]
    assert objective_values(Objective(kind="throughput"), rec) == [1234.0]
    assert objective_values(Objective(kind="pareto", latency_metric="p99_tpot_ms"), rec) == [1234.0, 10.0]
    assert worst_values(Objective(kind="pareto")) == [0.0, float("inf")]
    assert worst_values(Objective(kind="capacity")) == [0.0]
    assert metric_value(rec.metrics, "mean_ttft_ms") == 100  # type: ignore[arg-type]


def fake_server(capacity: float):
    """A server whose p99 TTFT explodes above `capacity` req/s."""
    calls: list[float] = []

    def measure(rate: float) -> RunRecord:
        calls.append(rate)
        return record(ttft99=100 if rate <= capacity else 5000, tpot99=10)

    return measure, calls


def test_capacity_search_doubles_then_bisects() -> None:
    measure, calls = fake_server(capacity=5.0)
    res = capacity_search(measure, SLO_, start_rate=1.0, max_steps=8, rel_tol=0.05)
    assert calls[:4] == [1.0, 2.0, 4.0, 8.0]
    assert calls[4] == 6.0 and calls[5] == 5.0
    assert 4.5 <= res.capacity <= 5.0
    assert res.best is not None and res.capacity in [s.rate for s in res.steps if s.ok]
    curve = res.curve()
    assert [p["rate"] for p in curve] == sorted(p["rate"] for p in curve)


def test_capacity_search_halves_when_start_is_too_high() -> None:
    measure, calls = fake_server(capacity=0.3)
    res = capacity_search(measure, SLO_, start_rate=2.0, max_steps=6)
    assert calls[:4] == [2.0, 1.0, 0.5, 0.25]
    assert res.capacity >= 0.25


def test_capacity_zero_when_nothing_holds() -> None:
    measure, calls = fake_server(capacity=0.0)
    res = capacity_search(measure, SLO_, start_rate=1.0, max_steps=10, min_rate=0.1)
    assert res.capacity == 0.0 and res.best is None
    assert min(calls) >= 0.1 / 2


def test_client_limit_bounds_the_search_from_above() -> None:
    calls: list[float] = []

    def measure(rate: float) -> RunRecord:
        calls.append(rate)
        return record(100, 10, valid=rate < 4)

    res = capacity_search(measure, SLO_, start_rate=8.0, max_steps=4, rel_tol=0.01)
    assert calls == [8.0, 4.0, 2.0, 3.0]  # never above a rate the client could not drive
    assert res.limited_by_client and res.capacity == 3.0
