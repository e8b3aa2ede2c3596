"""Per-request timings -> run metrics, with the definitions of `vllm bench serve` (vllm/benchmarks/serve.py,
`calculate_metrics`), so a number here means what it means in vLLM's own benchmark.

Definitions (all over measured requests: warmup excluded):
- completed: requests with ok=True; failed: the others. Latencies and token totals come from completed requests.
- TTFT: send -> first output chunk. E2E: send -> end of the response.
- TPOT, per request with output_tokens > 1: (e2e - ttft) / (output_tokens - 1). Requests with one output token have
  no TPOT (vLLM leaves them out of the TPOT distribution and counts them as TPOT 0 for goodput; so does this).
- ITL: every gap between consecutive output chunks of every completed request, pooled: one entry per chunk, as
  vLLM records it. With multi-token chunks (speculative decoding, stream intervals) a chunk that carries k tokens
  after a gap g is one ITL of g, so ITL is then a per-chunk, not per-token, latency. `itl_per_token=True` instead
  spreads each gap over the chunk's tokens (k entries of g/k; `RequestResult.chunk_tokens` from the server's
  continuous usage), which is comparable across chunk sizes; TPOT is per token either way.
- Throughputs: completed requests, output tokens of completed requests, and input + output tokens, each divided by
  the measured duration (first measured send -> last measured completion).
- Goodput: completed requests per second that meet every SLO limit given (ttft_ms, tpot_ms, e2e_ms; a value equal to
  the limit meets it), vLLM's `--goodput ttft:.. tpot:.. e2el:..`; None without an SLO.
- slo_attainment: fraction of all measured requests (failed ones count as misses) that met every limit.
- prefix_cached_fraction: over completed requests that report it (vLLM's usage.prompt_tokens_details, on when the
  server runs with --enable-prompt-tokens-details), prompt tokens served from the prefix cache / their prompt tokens.
  Not in `vllm bench serve`; None when no request reported it.
- error_adjusted_p99_e2e_ms: p99 of E2E where each failed request counts as infinitely slow. When the 99th
  percentile falls among the failures (roughly: more than 1% failed) it is infinite; JSON has no infinity, so it is
  stored as None, meaning "unbounded", never as a number.

Statistics: mean, std (population, numpy's default ddof=0, as vLLM), p50 / p90 / p95 / p99 by `numpy.percentile`
with linear interpolation (numpy's default, vLLM's choice; p50 equals `numpy.median`), max; milliseconds. An
empty distribution gives None, not zeros (vLLM prints 0 for it, which reads as a perfect latency).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from harness.records import SLO, LatencyStats, RequestResult, RunMetrics

PERCENTILES = (50.0, 90.0, 95.0, 99.0)


def latency_stats(values_s: Sequence[float]) -> LatencyStats | None:
    """Summary in milliseconds of latencies given in seconds; None when there are none."""
    if len(values_s) == 0:
        return None
    a = np.asarray(values_s, dtype=np.float64) * 1000.0
    p50, p90, p95, p99 = np.percentile(a, PERCENTILES)
    return LatencyStats(
        mean=float(a.mean()),
        std=float(a.std()),
        p50=float(p50),
        p90=float(p90),
        p95=float(p95),
        p99=float(p99),
        max=float(a.max()),
        count=int(a.size),
    )


def tpot_s(result: RequestResult) -> float | None:
    """Time per output token after the first, vLLM's definition; None for fewer than two output tokens."""
    if result.output_tokens > 1:
        return (result.e2e_s - result.ttft_s) / (result.output_tokens - 1)
    return None


def itl_values(result: RequestResult, per_token: bool = False) -> list[float]:
    """The request's ITL entries: one per chunk gap (vLLM), or the gap spread over the chunk's tokens."""
    if not per_token:
        return list(result.itl_s)
    tokens = result.chunk_tokens
    out: list[float] = []
    for i, gap in enumerate(result.itl_s):
        k = tokens[i + 1] if i + 1 < len(tokens) and tokens[i + 1] > 0 else 1
        out.extend([gap / k] * k)
    return out


def percentile_with_failures(values: Sequence[float], failed: int, q: float) -> float | None:
    """numpy-linear percentile of `values` plus `failed` entries of +infinity; None when the result is infinite."""
    n = len(values) + failed
    if n == 0:
        return None
    if failed == 0:
        return float(np.percentile(np.asarray(values, dtype=np.float64), q))
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    rank = q / 100.0 * (n - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, n - 1)
    frac = rank - lo
    finite = len(ordered)
    if lo >= finite or (frac > 0 and hi >= finite):
        return None  # interpolates with (or lands on) an infinitely slow request
    return float(ordered[lo] + (ordered[hi] - ordered[lo]) * frac) if frac > 0 else float(ordered[lo])


def _meets(ttft: float, tpot: float, e2e: float, slo: SLO) -> bool:
    if slo.ttft_ms is not None and ttft * 1000.0 > slo.ttft_ms:
        return False
    if slo.tpot_ms is not None and tpot * 1000.0 > slo.tpot_ms:
        return False
    if slo.e2e_ms is not None and e2e * 1000.0 > slo.e2e_ms:
        return False
    return True


def summarize(
    results: Iterable[RequestResult],
    duration_s: float,
    slo: SLO | None = None,
    *,
    itl_per_token: bool = False,
) -> RunMetrics:
    """Metrics of one measured run (warmup requests are skipped), definitions as in the module docstring."""
    measured = [r for r in results if not r.warmup]
    done = [r for r in measured if r.ok]
    failed = len(measured) - len(done)

    ttfts = [r.ttft_s for r in done]
    e2es = [r.e2e_s for r in done]
    tpots: list[float] = []
    all_tpots: list[float] = []  # with 0 for single-token outputs, as vLLM's goodput uses
    itls: list[float] = []
    for r in done:
        t = tpot_s(r)
        if t is not None:
            tpots.append(t)
        all_tpots.append(t if t is not None else 0.0)
        itls.extend(itl_values(r, itl_per_token))

    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    dur = duration_s if duration_s > 0 else 0.0

    def rate(x: float) -> float:
        return x / dur if dur > 0 else 0.0

    goodput = None
    attainment = None
    has_limits = slo is not None and any(v is not None for v in (slo.ttft_ms, slo.tpot_ms, slo.e2e_ms))
    if has_limits:
        assert slo is not None
        good = sum(_meets(r.ttft_s, tp, r.e2e_s, slo) for r, tp in zip(done, all_tpots))
        goodput = rate(good)
        attainment = good / len(measured) if measured else None

    p99_adj = percentile_with_failures(e2es, failed, 99.0)
    reported = [r for r in done if r.cached_tokens is not None]
    reported_prompt = sum(r.prompt_tokens for r in reported)
    cached = sum(r.cached_tokens or 0 for r in reported) / reported_prompt if reported_prompt else None
    return RunMetrics(
        duration_s=duration_s,
        completed=len(done),
        failed=failed,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=rate(len(done)),
        output_throughput=rate(total_out),
        total_token_throughput=rate(total_in + total_out),
        goodput=goodput,
        ttft_ms=latency_stats(ttfts),
        tpot_ms=latency_stats(tpots),
        itl_ms=latency_stats(itls),
        e2e_ms=latency_stats(e2es),
        error_adjusted_p99_e2e_ms=None if p99_adj is None else p99_adj * 1000.0,
        slo_attainment=attainment,
        prefix_cached_fraction=cached,
    )


def stat_at(stats: LatencyStats | None, percentile: float) -> float | None:
    """The summary's value at 50, 90, 95 or 99 (or 100 = max)."""
    if stats is None:
        return None
    table = {50.0: stats.p50, 90.0: stats.p90, 95.0: stats.p95, 99.0: stats.p99, 100.0: stats.max}
    if float(percentile) not in table:
        raise ValueError(f"percentile {percentile} not summarized; use one of 50, 90, 95, 99, 100")
    return table[float(percentile)]
