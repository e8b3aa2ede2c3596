"""From measured runs to what Optuna sees: objective values and constraint violations.

Constraints follow Optuna's convention (a value <= 0 is satisfied), so the SLOs reach the sampler through
`constraints_func` and a failed launch is a violation, never a good value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from harness.measure.stats import stat_at
from harness.records import RunMetrics, RunRecord, SLO

MAX_FAILED_FRACTION = 0.01  # a load step that drops more than 1% of its requests does not hold the SLOs


def slo_percentile_values(metrics: RunMetrics, slo: SLO) -> dict[str, float | None]:
    """The SLO percentile of each limited metric, in ms (None when the run has no such samples)."""
    out: dict[str, float | None] = {}
    for name in ("ttft", "tpot", "e2e"):
        if getattr(slo, f"{name}_ms") is not None:
            out[name] = stat_at(getattr(metrics, f"{name}_ms"), slo.percentile)
    return out


def slo_violations(record: RunRecord, slo: SLO) -> list[float]:
    """One number per limit: (measured - limit) / limit, so <= 0 holds and the size says by how much it misses.

    A run that failed, dropped requests, or whose client could not keep up is one violation of 1.0 per limit.
    """
    limits = [(n, getattr(slo, f"{n}_ms")) for n in ("ttft", "tpot", "e2e") if getattr(slo, f"{n}_ms") is not None]
    if not limits:
        limits = [("none", None)]
    m = record.metrics
    if record.failure is not None or m is None or m.completed == 0:
        return [1.0] * len(limits)
    sent = m.completed + m.failed
    if m.failed / sent > MAX_FAILED_FRACTION:
        return [1.0] * len(limits)
    if record.client is not None and not record.client.valid:
        return [1.0] * len(limits)
    values = slo_percentile_values(m, slo)
    out = []
    for name, limit in limits:
        if limit is None:
            out.append(0.0)
            continue
        v = values.get(name)
        out.append(1.0 if v is None else (v - limit) / limit)
    return out


def slo_holds(record: RunRecord, slo: SLO) -> bool:
    return all(v <= 0 for v in slo_violations(record, slo))


def metric_value(metrics: RunMetrics, name: str) -> float | None:
    """Look up `output_throughput`, `goodput`, or a percentile such as `p99_tpot_ms` / `mean_ttft_ms`."""
    if hasattr(metrics, name) and not name.endswith("_ms"):
        v = getattr(metrics, name)
        return float(v) if isinstance(v, (int, float)) else None
    stat, _, rest = name.partition("_")
    stats = getattr(metrics, rest, None)
    if stats is None:
        return None
    v = getattr(stats, stat, None)
    return float(v) if isinstance(v, (int, float)) else None


@dataclass
class CapacityStep:
    rate: float
    ok: bool
    record: RunRecord


@dataclass
class CapacityResult:
    """Highest rate that held the SLOs (0.0 when even `min_rate` failed) and every step on the way."""

    capacity: float
    best: RunRecord | None  # the run at `capacity`
    steps: list[CapacityStep] = field(default_factory=list)
    limited_by_client: bool = False

    def curve(self) -> list[dict[str, Any]]:
        """Latency versus offered load, one point per step, for the report."""
        out = []
        for s in sorted(self.steps, key=lambda s: s.rate):
            m = s.record.metrics
            row: dict[str, Any] = {"rate": s.rate, "ok": s.ok}
            if m is not None:
                for stat in ("ttft_ms", "tpot_ms", "e2e_ms"):
                    st = getattr(m, stat)
                    if st is not None:
                        row[f"p50_{stat}"], row[f"p99_{stat}"] = st.p50, st.p99
                row["output_throughput"] = m.output_throughput
                row["goodput"] = m.goodput
            out.append(row)
        return out


def capacity_search(measure: Callable[[float], RunRecord], slo: SLO, *, start_rate: float, max_steps: int,
                    min_rate: float = 0.05, rel_tol: float = 0.1) -> CapacityResult:
    """Double the rate until the SLOs break, halve it if they break at once, then bisect the bracket.

    Runs on one live server; each step is one measured load run. Stops early once the bracket is within
    `rel_tol`, because a finer answer is below the run-to-run noise.
    """
    steps: list[CapacityStep] = []
    lo: float | None = None  # highest rate that held
    hi: float | None = None  # lowest rate that broke
    rate = start_rate
    client_limited = False
    while len(steps) < max_steps:
        record = measure(rate)
        ok = slo_holds(record, slo)
        if record.client is not None and not record.client.valid:
            # The client, not the server, broke: this rate cannot be measured here, so it bounds the search
            # from above like a failed step, and the result says the client was the limit.
            client_limited = True
        steps.append(CapacityStep(rate, ok, record))
        if ok:
            lo = rate
        else:
            hi = rate
        if hi is None:
            rate = rate * 2
        elif lo is None:
            rate = rate / 2
            if rate < min_rate:
                break
        else:
            if (hi - lo) / hi <= rel_tol:
                break
            rate = (lo + hi) / 2
    best = next((s.record for s in steps if s.ok and s.rate == lo), None)
    return CapacityResult(capacity=lo or 0.0, best=best, steps=steps, limited_by_client=client_limited)
