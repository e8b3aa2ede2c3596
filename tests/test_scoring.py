"""Objective and constraint computation and the objective classes, on hand-made runs (the capacity search itself:
tests/test_steady.py; over a fake server: tests/test_capacity_objective.py)."""

from __future__ import annotations

from typing import Any

import pytest

from harness.records import ClientCheck, Failure, LatencyStats, RunMetrics, RunRecord, SLO
from harness.study.objectives import (OBJECTIVES, CapacityObjective, GoodputObjective, ParetoObjective,
                                      ThroughputObjective, objective_from_dict)
from harness.study.scoring import metric_value, slo_holds, slo_violations


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

    gpus = 1

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
    from test_capacity_objective import ModelSteps

    obj = CapacityObjective(slo=SLO_, start_rate=1.0, max_steps=8)
    steps = ModelSteps(5.0, gpus=2)  # 5 req/s on 2 GPUs: 2.5 per GPU
    got = obj.measure(steps, incumbent=[2.0])  # type: ignore[arg-type]
    assert steps.rates[0] == 4.0  # started where the best trial so far is: 2 per GPU x 2 GPUs
    assert 2.0 <= got.values[0] <= 2.5 and got.constraints == [0.0]
    assert got.metrics == {"capacity_rps": pytest.approx(2 * got.values[0])}
    assert got.capacity is not None and got.capacity["capacity_lo"] == got.metrics["capacity_rps"]
    assert [p["rate"] for p in got.curve] == sorted(steps.rates)
    repeat = ModelSteps(5.0, gpus=2)
    again = obj.measure_repeat(repeat, [2.25])  # type: ignore[arg-type]
    assert repeat.rates == [4.5] and again.values == [pytest.approx(2.25)]
    assert obj.confirm_metric([2.25]) == "goodput_per_gpu_at_2.25_rps_per_gpu"
    assert not obj.confirms_on_own_scale("goodput_per_gpu_at_2.25_rps_per_gpu")
    assert obj.confirms_on_own_scale("capacity_rps")


def test_old_stored_objectives_read_back_absolute_and_request_count() -> None:
    old = {"kind": "capacity", "slo": {"ttft_ms": 1000}, "num_requests": 300, "max_steps": 6}
    obj = objective_from_dict(old)
    assert obj.per_gpu is False and obj.step_s is None and obj.num_requests == 300
    assert "before steady-state windows" in obj.describe("-", "p99 SLO")
    assert obj.ranked([10.0], 2) == [10.0] and CapacityObjective().ranked([10.0], 2) == [5.0]
    assert objective_from_dict({"kind": "goodput", "rate": 4}).per_gpu is False



def test_objectives_come_back_from_a_stored_identity() -> None:
    for kind, cls in OBJECTIVES.items():
        obj = cls(slo=SLO(ttft_ms=500, percentile=90), concurrency=4)
        stored = obj.to_dict()
        assert stored["kind"] == kind and list(stored)[0] == "kind"
        assert objective_from_dict(stored) == obj
