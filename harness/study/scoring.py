"""From measured runs to what Optuna sees: SLO constraint violations and metric look-ups.

Constraints follow Optuna's convention (a value <= 0 is satisfied), so the SLOs reach the sampler through
`constraints_func` and a failed launch is a violation, never a good value.
"""

from __future__ import annotations

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
