"""Metric math on hand-built RequestResults: every expected number below is computed by hand (or by numpy's
percentile with the same inputs), following vllm/benchmarks/serve.py `calculate_metrics`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from harness.measure.stats import (
    itl_values,
    latency_stats,
    percentile_with_failures,
    stat_at,
    summarize,
    tpot_s,
)
from harness.records import SLO, RequestResult, RunMetrics, from_dict, to_dict


def ok(ttft: float, e2e: float, out: int, *, prompt: int = 100, itl: list[float] | None = None,
       chunks: list[int] | None = None, warmup: bool = False) -> RequestResult:
    return RequestResult(ok=True, send_s=0.0, prompt_tokens=prompt, output_tokens=out, ttft_s=ttft, e2e_s=e2e,
                         itl_s=itl or [], chunk_tokens=chunks or [], warmup=warmup)


def failed(warmup: bool = False) -> RequestResult:
    return RequestResult(ok=False, send_s=0.0, prompt_tokens=0, output_tokens=0, error="HTTP 500", warmup=warmup)


def test_tpot_is_vllm_definition() -> None:
    # (e2e - ttft) / (out - 1): (1.1 - 0.1) / (11 - 1) = 0.1 s
    assert tpot_s(ok(0.1, 1.1, 11)) == pytest.approx(0.1)
    assert tpot_s(ok(0.1, 0.1, 1)) is None  # one token: no TPOT
    assert tpot_s(ok(0.1, 0.1, 0)) is None


def test_summary_by_hand() -> None:
    results = [
        ok(0.100, 1.100, 11, prompt=100, itl=[0.1] * 10),  # tpot 100 ms
        ok(0.200, 0.700, 6, prompt=50, itl=[0.1] * 5),  # tpot 100 ms
        ok(0.300, 0.300, 1, prompt=10),  # single token: no tpot, no itl
        failed(),
        ok(5.0, 50.0, 100, warmup=True),  # warmup: ignored everywhere
        failed(warmup=True),
    ]
    m = summarize(results, duration_s=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert m.total_input_tokens == 160
    assert m.total_output_tokens == 18
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(9.0)
    assert m.total_token_throughput == pytest.approx(89.0)
    assert m.goodput is None and m.slo_attainment is None  # no SLO given

    assert m.ttft_ms is not None and m.tpot_ms is not None and m.itl_ms is not None and m.e2e_ms is not None
    assert m.ttft_ms.mean == pytest.approx(200.0)
    assert m.ttft_ms.p50 == pytest.approx(200.0)
    assert m.ttft_ms.std == pytest.approx(math.sqrt((100**2 + 0 + 100**2) / 3))  # population std, as numpy/vLLM
    assert m.ttft_ms.max == pytest.approx(300.0)
    assert m.ttft_ms.count == 3
    # linear interpolation: p90 of [100, 200, 300] = 100 + 0.9 * 2 * 100 = 280
    assert m.ttft_ms.p90 == pytest.approx(280.0)
    assert m.ttft_ms.p99 == pytest.approx(298.0)
    assert m.tpot_ms.count == 2 and m.tpot_ms.mean == pytest.approx(100.0)
    assert m.itl_ms.count == 15 and m.itl_ms.mean == pytest.approx(100.0)
    assert m.e2e_ms.mean == pytest.approx((1100 + 700 + 300) / 3)
    # 3 completed + 1 failure (infinite): rank 0.99 * 3 = 2.97 interpolates towards infinity -> unbounded
    assert m.error_adjusted_p99_e2e_ms is None


def test_prefix_cached_fraction_over_requests_that_report_it() -> None:
    from dataclasses import replace

    results = [replace(ok(0.1, 0.2, 2, prompt=100), cached_tokens=64),
               replace(ok(0.1, 0.2, 2, prompt=60), cached_tokens=0),
               ok(0.1, 0.2, 2, prompt=1000),  # not reported: left out of both sums
               replace(ok(0.1, 0.2, 2, prompt=40), cached_tokens=40, warmup=True), failed()]
    assert summarize(results, 1.0).prefix_cached_fraction == pytest.approx(64 / 160)
    assert summarize([ok(0.1, 0.2, 2)], 1.0).prefix_cached_fraction is None  # server did not report: unknown, not 0


def test_percentiles_match_numpy_linear() -> None:
    rng = np.random.default_rng(3)
    values = rng.exponential(0.2, size=1001).tolist()
    s = latency_stats(values)
    assert s is not None
    a = np.array(values) * 1000
    assert s.p50 == pytest.approx(np.median(a))
    for q, got in ((90, s.p90), (95, s.p95), (99, s.p99)):
        assert got == pytest.approx(np.percentile(a, q, method="linear"))
    assert s.std == pytest.approx(np.std(a))
    assert latency_stats([]) is None


def test_goodput_vllm_semantics() -> None:
    # SLO ttft 150 ms, tpot 100 ms, e2e 1000 ms (a value equal to the limit meets it, as vLLM's `s >= r`)
    slo = SLO(ttft_ms=150, tpot_ms=100, e2e_ms=1000)
    results = [
        ok(0.100, 1.000, 10),  # tpot 100 ms (== limit), e2e 1000 (== limit): good
        ok(0.100, 1.001, 10),  # e2e over: bad
        ok(0.151, 0.500, 5),  # ttft over: bad
        ok(0.050, 0.950, 10),  # tpot 100 ms, good
        ok(0.120, 0.120, 1),  # single token: tpot counts as 0 for goodput -> good
        ok(0.100, 0.600, 2),  # tpot 500 ms: bad
        failed(),  # never good
        failed(),
    ]
    m = summarize(results, duration_s=4.0, slo=slo)
    assert m.goodput == pytest.approx(3 / 4.0)
    assert m.slo_attainment == pytest.approx(3 / 8)
    # only one limit given: only it applies
    m2 = summarize(results, duration_s=4.0, slo=SLO(ttft_ms=150))
    assert m2.goodput == pytest.approx(5 / 4.0)
    assert summarize(results, 4.0, SLO()).goodput is None  # no limits: no goodput


def test_multi_token_chunks() -> None:
    # chunks of 4, 4, 2 tokens; gaps 40 ms and 20 ms; 10 output tokens; ttft 100 ms; e2e 160 ms
    r = ok(0.100, 0.160, 10, itl=[0.040, 0.020], chunks=[4, 4, 2])
    assert tpot_s(r) == pytest.approx(0.060 / 9)  # per token, regardless of chunking
    assert itl_values(r) == [0.040, 0.020]  # vLLM: one entry per chunk
    assert itl_values(r, per_token=True) == pytest.approx([0.010] * 4 + [0.010] * 2)
    m = summarize([r], 1.0)
    assert m.itl_ms is not None and m.itl_ms.count == 2 and m.itl_ms.mean == pytest.approx(30.0)
    mt = summarize([r], 1.0, itl_per_token=True)
    assert mt.itl_ms is not None and mt.itl_ms.count == 6 and mt.itl_ms.mean == pytest.approx(10.0)


def test_error_adjusted_p99() -> None:
    e2e = [float(i) for i in range(1, 1001)]  # 1000 completed, 1..1000 s
    # no failures: plain numpy percentile
    assert percentile_with_failures(e2e, 0, 99) == pytest.approx(np.percentile(e2e, 99))
    # 5 failures in 1005: rank 0.99 * 1004 = 993.96 -> between sorted[993] = 994 and sorted[994] = 995
    assert percentile_with_failures(e2e, 5, 99) == pytest.approx(994 + 0.96)
    # same result as numpy with a huge stand-in for infinity, where that stand-in is not reached
    assert percentile_with_failures(e2e, 5, 99) == pytest.approx(np.percentile(e2e + [1e300] * 5, 99))
    # 11 failures in 1011 (> 1%): rank 999.9 interpolates with a failure -> unbounded
    assert percentile_with_failures(e2e, 11, 99) is None
    assert percentile_with_failures([], 3, 99) is None
    assert percentile_with_failures([], 0, 99) is None
    m = summarize([ok(0.1, x, 10) for x in e2e] + [failed()] * 5, 10.0)
    assert m.error_adjusted_p99_e2e_ms == pytest.approx(994.96 * 1000)
    # JSON carries None (unbounded), never inf or NaN
    m_bad = summarize([ok(0.1, 1.0, 10)] + [failed()] * 3, 1.0)
    text = json.dumps(to_dict(m_bad), allow_nan=False)
    assert from_dict(RunMetrics, json.loads(text)).error_adjusted_p99_e2e_ms is None


def test_all_failed_and_empty() -> None:
    m = summarize([failed(), failed()], 1.0, SLO(ttft_ms=100))
    assert m.completed == 0 and m.failed == 2
    assert m.ttft_ms is None and m.tpot_ms is None and m.itl_ms is None and m.e2e_ms is None
    assert m.request_throughput == 0.0 and m.goodput == 0.0 and m.slo_attainment == 0.0
    empty = summarize([], 0.0)
    assert empty.completed == 0 and empty.request_throughput == 0.0 and empty.error_adjusted_p99_e2e_ms is None


def test_stat_at_reads_the_summary() -> None:
    results = [ok(0.01 * (i + 1), 1.0, 11) for i in range(100)]  # ttft 10..1000 ms
    m = summarize(results, 10.0)
    assert stat_at(m.ttft_ms, 99) == pytest.approx(m.ttft_ms.p99)  # type: ignore[union-attr]
    assert stat_at(m.ttft_ms, 50) == pytest.approx(m.ttft_ms.p50)  # type: ignore[union-attr]
    assert stat_at(None, 99) is None
    with pytest.raises(ValueError, match="not summarized"):
        stat_at(m.ttft_ms, 97)

