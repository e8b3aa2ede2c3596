"""The steady-state verdict of a time-window load step: did the server keep up over the measured window?

A rate holds only if, over the window [w0, w1) of length T (`harness.load.window`):

1. Completions keep up with arrivals. `requests` = arrivals (sends) in the window, `completed` = requests that
   finished OK in the window, whenever they were sent. Counting completions inside the window, not completions
   of the window's arrivals, makes the ratio independent of the drain: an overloaded server finishes every
   request eventually, but in the window it finishes only its service rate's worth. By flow balance
   `requests - completed` = in-flight(w1) - in-flight(w0): in steady state only noise, in overload (lambda - mu) T.
2. Our own in-flight count does not grow: in-flight(t) = sent by t and not finished by t, from the request
   timestamps, sampled on a grid over the window; its least-squares slope x T is its growth in requests.
3. The server's queue does not grow: the same growth for `vllm:num_requests_waiting` (summed over replicas),
   from `MetricsScraper.series`, when at least `min_samples` scrapes fall in the window.
4. The SLO percentiles hold (judged upstream on the window's metrics; `apply_slo`).

Limits, with `tol = 1 - fraction` (0.05) and L0 = mean in-flight over the window's first tenth (the level
the warm-up reached; under overload it has not grown yet, so it does not inflate the allowance):

- shortfall `requests - completed` <= max(tol x requests, z sqrt(2 L0 + 1)): the first term is the asked-for
  fraction; the second is z standard deviations of the difference of two in-flight counts of a steady Poisson
  load (each Poisson with mean ~L0, variance ~L0), so a steady load is not flagged for its noise when the window
  holds few requests.
- growth <= max(tol x requests, z (L0 + 1) sqrt(24 / requests)): the first term says the queue may not take on
  more than the completion tolerance over the window; the second is z standard deviations of the least-squares
  slope x T of a stationary in-flight series with variance L0 and correlation time tau = L0 / rate (Little's
  law): sd = tau sqrt(24 rate / T) = L0 sqrt(24 / (rate T)) (exponential-like correlation; a deterministic
  service time gives sqrt(12), so 24 is the conservative end).
- z = 3: a steady step is flagged by noise less than about once in 700 per test.

An overload of (1 + e) x capacity builds e x requests over the window, so anything beyond the tolerance (5%)
is flagged once the window holds enough requests that the noise term is below tol x requests; with fewer
than `min_requests` arrivals the verdict says so in its warnings (lengthen `step_s`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from harness.errors import UserError
from harness.records import RequestResult, Steady

GRID_POINTS = 400  # in-flight samples over the window


@dataclass(frozen=True)
class SteadyCriteria:
    """Thresholds of the verdict (sweep file / bench key `steady_fraction`)."""

    fraction: float = 0.95  # completions in the window >= fraction x arrivals in the window
    z: float = 3.0  # noise allowance, standard deviations of a steady load's statistic
    min_requests: int = 100  # fewer arrivals in the window: a warning that the verdict is noisy
    min_samples: int = 5  # server waiting scrapes needed in the window to test its trend

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str | None = None) -> None:
        f = self.fraction
        if not (isinstance(f, (int, float)) and not isinstance(f, bool) and math.isfinite(f) and 0 < f <= 1):
            raise UserError(f"got {f!r}; must be a fraction in (0, 1]", source=source, key="steady_fraction")
        if not (isinstance(self.z, (int, float)) and self.z >= 0):
            raise UserError(f"got {self.z!r}; must be >= 0", source=source, key="steady_z")


def inflight(results: Sequence[RequestResult], times: np.ndarray) -> np.ndarray:
    """Requests sent by each time and not finished by it (a request that never ended stays in flight)."""
    sends = np.sort(np.array([r.send_s for r in results], dtype=np.float64))
    ends = np.sort(np.array([_end_s(r) for r in results], dtype=np.float64))
    return (np.searchsorted(sends, times, side="right") - np.searchsorted(ends, times, side="right")).astype(float)


def slope(t: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y over t (0 for fewer than two distinct times)."""
    if len(t) < 2:
        return 0.0
    tc = t - t.mean()
    denom = float(np.dot(tc, tc))
    return float(np.dot(tc, y - y.mean()) / denom) if denom > 0 else 0.0


def assess(
    results: Sequence[RequestResult],
    window: tuple[float, float],
    *,
    target_rate: float | None = None,
    waiting: Sequence[tuple[float, float]] | None = None,
    criteria: SteadyCriteria = SteadyCriteria(),
) -> Steady:
    """The verdict over `window` (seconds on the results' `send_s` clock) from every request of the step, warm-up
    and tail included; `waiting` is (time on the same clock, vllm:num_requests_waiting) per scrape."""
    w0, w1 = window
    T = w1 - w0
    if not T > 0:
        raise ValueError(f"empty window {window!r}")
    arrivals = sum(1 for r in results if w0 <= r.send_s < w1)
    completed = sum(1 for r in results if r.ok and w0 <= _end_s(r) < w1)
    tol = 1.0 - criteria.fraction
    z = criteria.z

    grid = w0 + (np.arange(GRID_POINTS) + 0.5) * (T / GRID_POINTS)
    counts = inflight(results, grid)
    head = counts[: max(1, GRID_POINTS // 10)]
    l0 = float(head.mean())
    inflight_slope = slope(grid, counts)
    growth = inflight_slope * T

    completion_limit = max(tol * arrivals, z * math.sqrt(2.0 * l0 + 1.0))
    growth_limit = max(tol * arrivals, z * (l0 + 1.0) * math.sqrt(24.0 / max(arrivals, 1)))
    ratio = completed / arrivals if arrivals else 0.0

    reasons: list[str] = []
    warnings: list[str] = []
    if arrivals == 0:
        reasons.append(f"no request arrived in the {T:g} s window")
    elif arrivals - completed > completion_limit:
        reasons.append(
            f"completed {completed} of {arrivals} arrivals in the {T:g} s window (ratio {ratio:.3f} < "
            f"{criteria.fraction:g}; shortfall {arrivals - completed} > limit {completion_limit:.1f})"
        )
    if growth > growth_limit:
        reasons.append(f"own requests in flight grew by {growth:.1f} over the window (limit {growth_limit:.1f})")

    w_slope = w_growth = None
    n_wait = 0
    if waiting is not None:
        pts = [(t, v) for t, v in waiting if w0 <= t < w1]
        n_wait = len(pts)
        if n_wait >= criteria.min_samples:
            wt = np.array([p[0] for p in pts], dtype=np.float64)
            wv = np.array([p[1] for p in pts], dtype=np.float64)
            w_slope = slope(wt, wv)
            w_growth = w_slope * T
            if w_growth > growth_limit:
                reasons.append(
                    f"vllm:num_requests_waiting grew by {w_growth:.1f} over the window (limit {growth_limit:.1f})"
                )
        else:
            warnings.append(f"{n_wait} server queue samples in the window (< {criteria.min_samples}): its trend is not tested")
    if 0 < arrivals < criteria.min_requests:
        warnings.append(
            f"only {arrivals} arrivals in the window (< {criteria.min_requests}): the verdict is noisy; lengthen step_s"
        )
    kept_up = not reasons
    return Steady(
        holds=kept_up,
        kept_up=kept_up,
        reasons=reasons,
        warnings=warnings,
        window_s=T,
        warmup_s=w0,
        target_rate=target_rate,
        offered_rate=arrivals / T,
        achieved_rate=completed / T,
        requests=arrivals,
        completed=completed,
        completion_ratio=ratio,
        completion_limit=completion_limit,
        fraction=criteria.fraction,
        inflight_mean=float(counts.mean()),
        inflight_slope=inflight_slope,
        inflight_growth=growth,
        growth_limit=growth_limit,
        waiting_slope=w_slope,
        waiting_growth=w_growth,
        waiting_samples=n_wait,
    )


def apply_slo(steady: Steady, ok: bool, detail: str = "") -> Steady:
    """The verdict with the SLO judgement of the window's metrics folded in: holds = kept up and SLOs met."""
    reasons = list(steady.reasons)
    if not ok:
        reasons.append(f"SLO percentiles missed{': ' + detail if detail else ''}")
    return dataclasses.replace(steady, slo_ok=ok, holds=steady.kept_up and ok, reasons=reasons)


def _end_s(r: RequestResult) -> float:
    """When a request finished on the send clock; never, for a failure without an end time."""
    if r.e2e_s > 0 or r.ok:
        return r.send_s + r.e2e_s
    return math.inf
