"""When requests are sent: a closed loop (fixed concurrency) or an open loop (Poisson or gamma arrivals).

Closed loop (`mode: concurrency`) keeps `max_concurrency` requests in flight: the server's speed sets the rate, which
is how a capacity search finds the throughput at a given concurrency. Open loop (`poisson`, `gamma`) sends on a
schedule that does not wait for the server, which is how real traffic behaves: a slow server builds a queue and its
latency shows it. Gamma arrivals follow `vllm bench serve --burstiness`: inter-arrival gaps are
Gamma(shape=burstiness, scale=1/(rate*burstiness)), mean 1/rate, coefficient of variation 1/sqrt(burstiness);
burstiness 1 is Poisson, < 1 burstier, > 1 more even. An open loop may also cap the requests in flight
(`max_concurrency`), as `vllm bench serve --max-concurrency` does together with `--request-rate`.

The run stops after `num_requests` or `duration_s` (whichever comes first when both are given). As in
`vllm bench serve`, a count-limited schedule is rescaled so its span matches the requested rate exactly, so runs
with different seeds offer the same load; a duration-limited schedule is not rescaled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.errors import UserError

MODES = ("concurrency", "poisson", "gamma")


@dataclass
class Arrival:
    """How requests arrive. `schedule(n)` gives open-loop send offsets in seconds from the start."""

    mode: str
    max_concurrency: int | None = None
    rate: float | None = None  # requests / s, open loop
    burstiness: float = 1.0  # gamma shape; 1 = Poisson
    num_requests: int | None = None
    duration_s: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, source: str | None = None) -> None:
        """Raise UserError naming the key for a setting that cannot describe a load."""
        if self.mode not in MODES:
            raise UserError(f"got {self.mode!r}; allowed values: {', '.join(MODES)}", source=source, key="mode")
        if self.max_concurrency is not None and (
            not isinstance(self.max_concurrency, int) or isinstance(self.max_concurrency, bool) or self.max_concurrency < 1
        ):
            raise UserError(f"got {self.max_concurrency!r}; must be an integer >= 1", source=source, key="max_concurrency")
        if self.mode == "concurrency":
            if self.max_concurrency is None:
                raise UserError("mode concurrency needs max_concurrency (an integer >= 1)", source=source, key="max_concurrency")
            if self.rate is not None:
                raise UserError("a closed loop has no rate; use mode poisson or gamma", source=source, key="rate")
        else:
            if self.rate is None or not _finite_positive(self.rate):
                raise UserError(f"got {self.rate!r}; mode {self.mode} needs a rate > 0 (requests/s)", source=source, key="rate")
        if not _finite_positive(self.burstiness):
            raise UserError(f"got {self.burstiness!r}; must be > 0", source=source, key="burstiness")
        if self.mode == "poisson" and self.burstiness != 1.0:
            raise UserError("poisson arrivals have burstiness 1; use mode gamma for other values", source=source, key="burstiness")
        if self.num_requests is not None and (not isinstance(self.num_requests, int) or self.num_requests < 1):
            raise UserError(f"got {self.num_requests!r}; must be an integer >= 1", source=source, key="num_requests")
        if self.duration_s is not None and not _finite_positive(self.duration_s):
            raise UserError(f"got {self.duration_s!r}; must be > 0 seconds", source=source, key="duration_s")

    @property
    def open_loop(self) -> bool:
        return self.mode != "concurrency"

    def schedule(self, n: int) -> np.ndarray:
        """Send offsets (seconds from the first request, which is at 0) for up to `n` requests.

        Closed loop: zeros (each request goes when a slot frees). Duration-limited open loop: only the offsets
        before `duration_s`, so the result may be shorter than `n`.
        """
        if n <= 0:
            return np.zeros(0)
        if not self.open_loop:
            return np.zeros(n)
        assert self.rate is not None
        rng = np.random.default_rng(self.seed)
        gaps = rng.gamma(shape=self.burstiness, scale=1.0 / (self.rate * self.burstiness), size=max(n - 1, 0))
        offsets = np.concatenate([[0.0], np.cumsum(gaps)])
        if self.duration_s is not None:
            return offsets[offsets < self.duration_s]
        if n > 1 and offsets[-1] > 0:
            # like vllm bench serve: make the schedule's span exactly (n - 1) / rate
            offsets *= ((n - 1) / self.rate) / offsets[-1]
        return offsets

    def requests_needed(self, expected_rps: float | None = None) -> int | None:
        """How many requests to build for a duration-limited run (None when `num_requests` decides).

        Open loop: the schedule's count plus 5% and 10 spare. Closed loop: the server's throughput is unknown, so
        `expected_rps` (a generous estimate) is needed; without it, 64 per slot.
        """
        if self.num_requests is not None and self.duration_s is None:
            return self.num_requests
        if self.duration_s is None:
            return None
        if self.open_loop:
            assert self.rate is not None
            need = math.ceil(self.rate * self.duration_s * 1.05) + 10
        elif expected_rps:
            need = math.ceil(expected_rps * self.duration_s * 1.5) + 2 * (self.max_concurrency or 1)
        else:
            need = 64 * (self.max_concurrency or 1)
        return min(need, self.num_requests) if self.num_requests is not None else need

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "max_concurrency": self.max_concurrency,
            "rate": self.rate,
            "burstiness": self.burstiness,
            "num_requests": self.num_requests,
            "duration_s": self.duration_s,
            "seed": self.seed,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str | None = None) -> Arrival:
        """Build from a plain mapping (a sweep file entry); unknown keys are a UserError."""
        allowed = ("mode", "max_concurrency", "rate", "burstiness", "num_requests", "duration_s", "seed")
        extra = sorted(set(data) - set(allowed))
        if extra:
            raise UserError(f"unknown key; allowed keys: {', '.join(allowed)}", source=source, key=extra[0])
        try:
            return cls(**data)
        except UserError as exc:
            if source and not exc.source:
                raise UserError(str(exc).split(": ", 1)[-1], source=source, key=exc.key) from None
            raise


def _finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0
