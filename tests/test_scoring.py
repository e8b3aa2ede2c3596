"""Objective and constraint computation, the objective classes, and the capacity search, on hand-made runs."""

from __future__ import annotations

from typing import Any

import pytest

from harness.records import ClientCheck, Failure, LatencyStats, RunMetrics, RunRecord, SLO
from harness.study.objectives import (OBJECTIVES, CapacityObjective, GoodputObjective, ParetoObjective,
                                      ThroughputObjective, objective_from_dict)
from harness.study.scoring import capacity_search, metric_value, slo_holds, slo_violations


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


class FakeSteps:
    """Stands in for LoadSteps: each run() is one 'load step' whose record `make(load)` returns."""

    def __init__(self, make: Any) -> None:
        self.make, self.loads = make, []

    def run(self, **load: Any) -> RunRecord:
        self.loads.append(load)
        return self.make(load)


def test_fixed_load_objectives_value_one_run() -> None:
    rec = record(100, 10, out_tps=1234.0, goodput=7.5)
    goodput = GoodputObjective(slo=SLO_, concurrency=8)
    steps = FakeSteps(lambda load: rec)
    got = goodput.measure(steps)
    assert got.values == [7.5] and got.constraints == slo_violations(rec, SLO_) and got.record is rec
    assert steps.loads == [{"concurrency": 8, "num_requests": 64, "duration_s": None}]
    assert ThroughputObjective(rate=2.0).measure(FakeSteps(lambda load: rec)).values == [1234.0]
    pareto = ParetoObjective(concurrency=4, latency_metric="p99_tpot_ms")
    assert pareto.measure(FakeSteps(lambda load: rec)).values == [1234.0, 10.0]
    failed = record(1, 1, failure=Failure("oom", "x"))
    assert pareto.measure(FakeSteps(lambda load: failed)).values == [0.0, float("inf")]
    assert pareto.worst_values() == [0.0, float("inf")] and list(pareto.directions) == ["maximize", "minimize"]
    assert CapacityObjective().worst_values() == [0.0]
    assert metric_value(rec.metrics, "mean_ttft_ms") == 100  # type: ignore[arg-type]


def test_capacity_objective_searches_from_the_incumbent_and_confirms_at_the_winners_rate() -> None:
    def at(load: dict[str, Any]) -> RunRecord:  # holds the SLO up to 5 req/s
        return record(100 if load["rate"] <= 5 else 5000, 10, goodput=min(load["rate"], 5.0))

    obj = CapacityObjective(slo=SLO_, start_rate=1.0, max_steps=8)
    steps = FakeSteps(at)
    got = obj.measure(steps, incumbent=[4.0])
    assert steps.loads[0]["rate"] == 4.0  # started where the best trial so far is
    assert 4.0 <= got.values[0] <= 5.0 and got.constraints == [0.0] and got.metrics == {"capacity_rps": got.values[0]}
    assert [p["rate"] for p in got.curve] == sorted(load["rate"] for load in steps.loads)
    repeat = FakeSteps(at)
    again = obj.measure_repeat(repeat, [4.5])
    assert [load["rate"] for load in repeat.loads] == [4.5] and again.values == [4.5]
    assert obj.confirm_metric([4.5]) == "goodput_rps_at_4.5_rps"
    assert not obj.confirms_on_own_scale("goodput_rps_at_4.5_rps") and obj.confirms_on_own_scale("capacity_rps")


def test_objectives_come_back_from_a_stored_identity() -> None:
    for kind, cls in OBJECTIVES.items():
        obj = cls(slo=SLO(ttft_ms=500, percentile=90), concurrency=4)
        stored = obj.to_dict()
        assert stored["kind"] == kind and list(stored)[0] == "kind"
        assert objective_from_dict(stored) == obj


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
