"""The highest rate a configuration sustains in steady state, bracketed to a set precision.

Pure logic over `measure(rate) -> (record, steady)`: one call is one time-window load step on a live server
(`harness.measure.step`), so the search is unit-testable with a model of a server.

- A step's rate is the rate it actually offered in its window (`Steady.offered_rate`, the realised Poisson rate),
  so the bracket is about loads that were tested, not asked for.
- `capacity_lo` is the highest steady step's rate clipped to the throughput it sustained there
  (`achieved_rate`): the result is never above a throughput that was measured. `capacity_hi` is the lowest rate
  that did not hold, or that held while serving clearly less than it offered (below (1 - precision / 2) of it, and
  by more than a steady load's noise: the clip bit, the step was above what the server delivers).
  `capacity` = `capacity_lo`.
- Rates go up x`growth` until a step fails. A step that fails for throughput (completions or a growing queue)
  measured the server's sustained throughput, which estimates its capacity: the next step goes straight to just
  below it (x (1 - precision / 2)) instead of halving step by step. Once a rate holds, the search bisects
  (geometric midpoint) between capacity_lo and the lower of capacity_hi and that throughput x (1 + precision):
  on a GPU a step 10-30% over capacity fails serving ~0.88 x its offer, so its rate is a loose bound and the
  throughput a tighter one. When that throughput agrees with capacity_lo (within the precision) it probes just
  above it; when the two ends are within two precisions, capacity_lo x (1 + precision), which closes the bracket
  or lifts it. A failure of the SLO percentiles alone halves.
- `growth` near the ceiling: a search that starts at the incumbent (warm start) and holds there is already near
  the edge; x2 overloads the server so far that the step's window measures a backlog, not a throughput, and its
  queue takes a minute to drain. A sweep that knows its ceiling asks for a smaller `growth` (1.25).
- A step whose client check failed measured the client, not the server: it bounds the search from above like a
  failure and the result is flagged `limited_by_client`.
- Stops when capacity_hi <= capacity_lo x (1 + precision), after `max_steps`, or below `min_rate`; with
  `stop_below` (a sampled trial's incumbent), also once a step held and a step at or below `stop_below` did not:
  the candidate is shown worse than the incumbent, and closing its bracket would cost GPU time that ranks nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.errors import UserError
from harness.load.window import WindowSpec
from harness.measure.steady import SteadyCriteria, apply_slo
from harness.records import SLO, RunRecord, Steady
from harness.study.scoring import slo_violations

DEFAULT_PRECISION = 0.05


@dataclass
class SearchStep:
    rate: float  # asked for
    offered_rate: float  # realised in the window
    holds: bool
    steady: Steady
    record: RunRecord
    client_limited: bool = False


@dataclass
class CapacityBracket:
    """The highest steady rate (capacity_lo), the lowest rate above it that did not hold (capacity_hi; None when
    no step failed), and every step, in order."""

    capacity_lo: float
    capacity_hi: float | None
    steps: list[SearchStep] = field(default_factory=list)
    limited_by_client: bool = False
    stopped: str = ""  # why the search ended
    precision: float = DEFAULT_PRECISION

    @property
    def capacity(self) -> float:
        return self.capacity_lo

    @property
    def converged(self) -> bool:
        return self.capacity_hi is not None and self.capacity_lo > 0 and (
            self.capacity_hi <= self.capacity_lo * (1 + self.precision)
        )

    @property
    def crossed(self) -> tuple[float, float] | None:
        """See `crossed_rates`."""
        return crossed_rates((s.offered_rate, s.holds, s.client_limited) for s in self.steps)

    @property
    def best(self) -> RunRecord | None:
        """The record of the step capacity_lo came from."""
        held = [s for s in self.steps if s.holds]
        return max(held, key=lambda s: _lo_candidate(s)).record if held else None

    def summary(self) -> dict[str, Any]:
        """The bracket and a compact verdict per step (JSON), for the trial's attributes and the report."""
        return {"capacity_lo": self.capacity_lo, "capacity_hi": self.capacity_hi, "converged": self.converged,
                "stopped": self.stopped, "limited_by_client": self.limited_by_client, "precision": self.precision,
                "crossed": list(self.crossed) if self.crossed else None,
                "steps": [{"rate": s.rate, "offered": s.offered_rate, "achieved": s.steady.achieved_rate,
                           "ratio": s.steady.completion_ratio, "holds": s.holds, "client_limited": s.client_limited,
                           "reason": s.steady.reasons[0] if s.steady.reasons else ""} for s in self.steps]}

    def curve(self) -> list[dict[str, Any]]:
        """Latency versus offered load, one point per step in rate order, for the report."""
        out = []
        for s in sorted(self.steps, key=lambda s: s.offered_rate):
            row: dict[str, Any] = {"rate": s.offered_rate, "ok": s.holds, "achieved": s.steady.achieved_rate}
            m = s.record.metrics
            if m is not None:
                for stat in ("ttft_ms", "tpot_ms", "e2e_ms"):
                    st = getattr(m, stat)
                    if st is not None:
                        row[f"p50_{stat}"], row[f"p99_{stat}"] = st.p50, st.p99
                row["output_throughput"] = m.output_throughput
                row["goodput"] = m.goodput
            out.append(row)
        return out


def crossed_rates(steps: Iterable[tuple[float, bool, bool]]) -> tuple[float, float] | None:
    """Of steps given as (offered rate, held, client-limited): (the highest rate that held, the lowest one below
    it that did not) when the verdicts contradict their order; one window's run-to-run noise is then wider than
    the distance between them, and a bracket no tighter than that noise, however narrow it reads. None when the
    verdicts are monotone (a client-limited step measured the client and is left out)."""
    steps = list(steps)
    held = [rate for rate, holds, _ in steps if holds]
    if not held:
        return None
    below = [rate for rate, holds, client in steps if not holds and not client and rate < max(held)]
    return (max(held), min(below)) if below else None


def step_verdict(record: RunRecord, steady: Steady, slo: SLO | None) -> Steady:
    """The steady verdict with the SLO percentiles of the window's metrics folded in (scoring's semantics: a
    failed run, >1% failed requests, or an invalid client check miss every limit)."""
    if slo is None:
        return steady
    misses = slo_violations(record, slo)
    ok = all(v <= 0 for v in misses)
    detail = ", ".join(f"{v:+.0%}" for v in misses if v > 0)
    return apply_slo(steady, ok, f"excess over limits {detail}" if detail else "")


def search_capacity(
    measure: Callable[[float], tuple[RunRecord, Steady]],
    *,
    start_rate: float,
    precision: float = DEFAULT_PRECISION,
    max_steps: int = 8,
    min_rate: float = 0.05,
    growth: float = 2.0,
    stop_below: float | None = None,
) -> CapacityBracket:
    """Bracket the highest steady rate, starting at `start_rate` (warm start: the last known capacity, or a plan's
    estimate); `measure` returns each step's record and its final verdict (SLO included, see `step_verdict`).
    `stop_below`: end the search once it has shown the capacity below this rate (a held step and a failed one at
    or below it)."""
    check_precision(precision)
    check_growth(growth)
    if not start_rate > 0:
        raise ValueError(f"start_rate must be > 0, got {start_rate!r}")
    steps: list[SearchStep] = []
    rate = float(start_rate)
    stopped = f"max_steps ({max_steps}) reached"
    while len(steps) < max_steps:
        record, steady = measure(rate)
        client_limited = record.client is not None and not record.client.valid
        offered = steady.offered_rate if steady.offered_rate > 0 else rate
        steps.append(SearchStep(rate, offered, steady.holds and not client_limited, steady, record, client_limited))
        lo, hi = _bracket(steps, precision)
        if hi is not None and lo > 0 and hi <= lo * (1 + precision):
            stopped = f"bracket within {precision:.0%}"
            break
        if stop_below is not None and lo > 0 and hi is not None and hi <= stop_below:
            stopped = f"below the incumbent's {stop_below:.3g} req/s (did not hold at {hi:.3g})"
            break
        nxt = _next_rate(steps, lo, hi, precision, growth)
        if nxt is None or nxt < min_rate:
            stopped = "no steady rate above min_rate" if lo == 0 else "no rate left to probe in the bracket"
            break
        rate = nxt
    lo, hi = _bracket(steps, precision)
    return CapacityBracket(capacity_lo=lo, capacity_hi=hi, steps=steps,
                           limited_by_client=any(s.client_limited for s in steps), stopped=stopped,
                           precision=precision)


def _lo_candidate(s: SearchStep) -> float:
    return min(s.offered_rate, s.steady.achieved_rate)


def _bracket(steps: list[SearchStep], precision: float) -> tuple[float, float | None]:
    lo = max((_lo_candidate(s) for s in steps if s.holds), default=0.0)
    uppers = [s.offered_rate for s in steps if not s.holds]
    uppers += [s.offered_rate for s in steps if s.holds and _served_short(s.steady, precision)]
    uppers = [u for u in uppers if u > lo]
    return lo, (min(uppers) if uppers else None)


def _served_short(steady: Steady, precision: float) -> bool:
    """Held, but served clearly less than offered: by more than half the precision and by more than two standard
    deviations of a steady load's shortfall (sqrt(2 x mean in flight + 1), see `harness.measure.steady`), so the
    rate is above what the server delivers, not unlucky in its window."""
    shortfall = steady.requests - steady.completed
    return (steady.achieved_rate < steady.offered_rate * (1 - precision / 2)
            and shortfall > 2.0 * math.sqrt(2.0 * steady.inflight_mean + 1.0))


def _throughput_estimate(steps: list[SearchStep]) -> float | None:
    """The lowest sustained throughput a step measured while failing for throughput (the server flat out)."""
    est = [s.steady.achieved_rate for s in steps
           if not s.holds and not s.client_limited and not s.steady.kept_up and s.steady.achieved_rate > 0]
    return min(est) if est else None


def _next_rate(steps: list[SearchStep], lo: float, hi: float | None, precision: float, growth: float) -> float | None:
    if hi is None:  # nothing failed yet: go up from the highest steady rate
        return max(s.offered_rate for s in steps) * growth
    est = _throughput_estimate(steps)
    tried = [s.rate for s in steps] + [s.offered_rate for s in steps]
    if lo == 0:  # nothing held yet
        last = steps[-1]
        if est is not None and not last.steady.kept_up and not last.client_limited:
            # it failed for throughput: go straight to just below what it sustained
            return min(est * (1 - precision / 2), hi * (1 - precision))
        return hi / 2.0  # the SLO percentiles (or the client) failed: the throughput says nothing; halve
    top = hi
    held_top = max(max(s.rate, s.offered_rate) for s in steps if s.holds)
    if est is not None and est >= lo and est * (1 + precision) > held_top * (1 + precision / 4):
        # a step that failed served `est` flat out: the capacity is not far above that, whatever rate failed
        # (below lo, the failed window measured a backlog, not a throughput; a step held above it: no bound)
        top = min(hi, est * (1 + precision))
    candidates = []
    if est is not None and lo <= est <= lo * (1 + precision):
        candidates.append(est * (1 + precision))  # the throughput agrees with lo: just above it closes the bracket
    if top <= lo * (1 + precision) ** 2:
        candidates.append(lo * (1 + precision))  # the closing probe: it fails (converged) or lifts lo by a step
    candidates += [math.sqrt(lo * top), math.sqrt(lo * hi)]
    for c in candidates:  # skip a probe the search has already made (within a quarter of the precision)
        if lo < c < hi and all(abs(c - t) > t * precision / 4 for t in tried):
            return c
    return None


# ---------------------------------------------------------------------------------------------- input


def check_precision(precision: Any, source: str | None = None) -> None:
    if not (isinstance(precision, (int, float)) and not isinstance(precision, bool) and math.isfinite(precision)
            and precision > 0):
        raise UserError(f"got {precision!r}; must be a relative precision > 0 (0.05 = 5%)", source=source,
                        key="precision")


def check_growth(growth: Any, source: str | None = None) -> None:
    if not (isinstance(growth, (int, float)) and not isinstance(growth, bool) and math.isfinite(growth)
            and growth > 1):
        raise UserError(f"got {growth!r}; must be a factor > 1 (the next rate after a step that held: 1.25 = +25%)",
                        source=source, key="growth")


def validate_steady_keys(values: Mapping[str, Any], source: str | None = None) -> None:
    """One-line UserError naming `source` and the key for a bad step_s, warmup_s, steady_fraction or precision;
    keys absent from `values` are not checked (the sweep-file parser and `harness.bench`'s CLI call this)."""
    window_keys = {k: values[k] for k in ("step_s", "warmup_s", "drain_s") if k in values}
    if window_keys:
        WindowSpec.from_dict(window_keys, source)
    if "steady_fraction" in values:
        try:
            SteadyCriteria(fraction=values["steady_fraction"])
        except UserError as exc:
            raise UserError(str(exc).split(": ", 1)[-1], source=source, key="steady_fraction") from None
    if "precision" in values:
        check_precision(values["precision"], source)
