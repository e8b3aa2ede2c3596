"""A load step as a time window at a rate: warm-up, measured window, tail, drain.

A step that is a request count (64 or 300 requests) lasts seconds at a high rate, so an overloaded server's queue
has no time to build and the step looks fine. A windowed step is:

    0 ........ warmup_s ................. warmup_s + step_s ........ + tail_s ...... drain
    | warm-up  |      measured window     |          tail          | nothing sent  |
    sent, not measured                     sent, not measured       in-flight requests finish

- warm-up: requests sent on the same open-loop schedule but not measured, until the running batch has filled and
  the in-flight count is in its steady state. A server below capacity reaches it after about one end-to-end
  latency (every request in flight then arrived after the start: Little's law); `warmup_e2e_factor` (3) x the
  expected E2E covers the slower fill of a server near its capacity and the first requests' longer latency, and
  `warmup_s` is a floor for when no E2E estimate exists yet (the first step of a search).
- measured window: `step_s` seconds. Only requests that arrive (are sent) inside it are measured, so neither the
  empty start nor the drain skews the latencies; the request count follows from rate x time.
- tail: the schedule keeps sending for `tail_e2e_factor` x the expected E2E after the window, so the window's last
  arrivals are served next to a full batch, as in production, not by a draining server (which would flatter
  their TPOT).
- drain: nothing more is sent; requests in flight finish or fail at `drain_s` after their send (the per-request
  timeout), which bounds the time an overloaded step can spend draining its queue.

Arrivals are Poisson (or gamma with `burstiness`) from `seed`: rate x send_s requests whose schedule is rescaled to
span the send time exactly, so a step offers its rate over the whole schedule (as `vllm bench serve` rescales);
within the window the count still varies (a window of a minute at 20 req/s by about +-2%), and the steady verdict
reports the window's realised rate as the offered rate.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.errors import UserError
from harness.load.arrival import Arrival, _finite_positive
from harness.records import RequestResult

DEFAULT_STEP_S = 60.0  # a minute at a rate: long enough for a queue to build on a GPU server that cannot keep up
DEFAULT_WARMUP_S = 10.0


@dataclass(frozen=True)
class WindowSpec:
    """How every windowed step of a run is shaped (sweep file / bench CLI keys)."""

    step_s: float = DEFAULT_STEP_S
    warmup_s: float = DEFAULT_WARMUP_S  # floor of the warm-up
    warmup_e2e_factor: float = 3.0  # warm-up >= this x the expected E2E
    tail_e2e_factor: float = 1.0  # keep sending this x the expected E2E after the window
    drain_s: float = 120.0  # per-request timeout: a request not done this long after its send failed
    burstiness: float = 1.0  # 1 = Poisson; gamma otherwise (vllm bench serve --burstiness)
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str | None = None) -> None:
        """UserError naming the key for a value that cannot shape a step."""
        for key in ("step_s", "drain_s"):
            if not _finite_positive(getattr(self, key)):
                raise UserError(f"got {getattr(self, key)!r}; must be a number of seconds > 0", source=source, key=key)
        for key in ("warmup_s", "warmup_e2e_factor", "tail_e2e_factor"):
            if not _finite_nonnegative(getattr(self, key)):
                raise UserError(f"got {getattr(self, key)!r}; must be a number >= 0", source=source, key=key)
        if not _finite_positive(self.burstiness):
            raise UserError(f"got {self.burstiness!r}; must be > 0", source=source, key="burstiness")

    def plan(self, rate: float, expected_e2e_s: float | None = None) -> WindowPlan:
        """The step at `rate` requests/s; `expected_e2e_s` (the previous step's `Steady.batch_fill_s`) sizes warm-up and tail."""
        if not _finite_positive(rate):
            raise ValueError(f"rate must be > 0, got {rate!r}")
        e2e = expected_e2e_s if expected_e2e_s is not None and expected_e2e_s > 0 else 0.0
        return WindowPlan(
            rate=float(rate),
            warmup_s=max(self.warmup_s, self.warmup_e2e_factor * e2e),
            step_s=self.step_s,
            tail_s=self.tail_e2e_factor * e2e,
            drain_s=self.drain_s,
            burstiness=self.burstiness,
            seed=self.seed,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> WindowSpec:
        allowed = [f.name for f in dataclasses.fields(cls)]
        extra = sorted(set(data) - set(allowed))
        if extra:
            raise UserError(f"unknown key; allowed keys: {', '.join(allowed)}", source=source, key=extra[0])
        try:
            return cls(**data)
        except UserError as exc:  # raised by __post_init__, which does not know the file
            raise UserError(str(exc).split(": ", 1)[-1], source=source, key=exc.key) from None


@dataclass(frozen=True)
class WindowPlan:
    """One step: its schedule (offsets from the first send, which is at 0) and which arrivals are measured."""

    rate: float
    warmup_s: float
    step_s: float
    tail_s: float
    drain_s: float
    burstiness: float = 1.0
    seed: int = 0

    @property
    def window(self) -> tuple[float, float]:
        """[start, end) of the measured window, seconds from the first send."""
        return self.warmup_s, self.warmup_s + self.step_s

    @property
    def send_s(self) -> float:
        """How long requests are sent: warm-up + window + tail."""
        return self.warmup_s + self.step_s + self.tail_s

    def arrival(self) -> Arrival:
        """The open-loop arrival process the client runs (no client-side warm-up: the warm-up is in the schedule):
        rate x send_s requests, their schedule rescaled to span send_s exactly (as `vllm bench serve` does)."""
        mode = "poisson" if self.burstiness == 1.0 else "gamma"
        return Arrival(mode=mode, rate=self.rate, burstiness=self.burstiness, num_requests=self.requests_needed(),
                       seed=self.seed)

    def requests_needed(self) -> int:
        """How many requests the step sends: rate x (warm-up + window + tail), the first at 0."""
        return math.floor(self.rate * self.send_s) + 1

    def expected_requests(self) -> float:
        """Arrivals the window should hold on average: rate x step_s."""
        return self.rate * self.step_s

    def in_window(self, send_s: float) -> bool:
        lo, hi = self.window
        return lo <= send_s < hi


def common_window(plans: Sequence[WindowPlan]) -> list[WindowPlan]:
    """Plans of one mixed load (one per model, each at its own rate) shaped alike: the longest warm-up and tail of
    any of them, so the measured window covers the same seconds for every model and each model's last window
    arrivals are still served next to everyone's traffic."""
    if len({(p.step_s, p.drain_s) for p in plans}) > 1:
        raise ValueError("the plans of one mixed load need one step_s and drain_s")
    warmup = max((p.warmup_s for p in plans), default=0.0)
    tail = max((p.tail_s for p in plans), default=0.0)
    return [dataclasses.replace(p, warmup_s=warmup, tail_s=tail) for p in plans]


def mark_window(results: Sequence[RequestResult], plan: WindowPlan) -> list[RequestResult]:
    """Copies of `results` with every arrival outside the measured window flagged `warmup` (not measured), so
    `harness.measure.stats.summarize` gives the window's metrics."""
    return [r if (not plan.in_window(r.send_s)) == r.warmup else dataclasses.replace(r, warmup=not plan.in_window(r.send_s))
            for r in results]


def _finite_nonnegative(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
