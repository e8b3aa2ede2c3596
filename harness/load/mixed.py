"""One mixed load over several models at once: each model's own schedule, requests and servers, one clock.

A node that serves several models sees all their traffic at the same time, so a node layout is measured that way:
per model a `Stream` (its servers, its workload's requests, its arrival process at its own rate, the name its
servers serve) and all streams run together on one event loop. Each stream is an ordinary `run_load` (requests go
only to that stream's targets, to the one with the fewest requests in flight, ties in turn: round-robin at equal
load), so every definition of the client holds per model. The streams start together (within the time it takes
to serialize one stream's bodies, milliseconds) and their results are put on one clock: every `send_s` counts from
the first send of any stream, so one time window means the same seconds for every model.

The client's self-check of each stream covers the one event loop the streams share: its CPU figure is the whole
loop's, which is what decides whether the client kept up.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from harness.load.arrival import Arrival
from harness.load.client import PROGRESS_INTERVAL_S, LoadProgress, LoadResult, Target, _loop_factory, run_load
from harness.load.prompts import RequestSpec


@dataclass
class Stream:
    """One model's share of a mixed load."""

    name: str  # the model's name in the traffic (a key of the result)
    targets: list[Target] | list[tuple[str, str | None]]  # this model's servers only
    requests: list[RequestSpec]
    arrival: Arrival  # open loop at this model's rate
    model: str  # the name the servers serve: the request body's "model"
    api: str  # completions | chat
    extra_body: dict[str, Any] | None = None


async def run_mixed_load(streams: Sequence[Stream], *, timeout_s: float,
                         progress: Callable[[str, LoadProgress], None] | None = None,
                         progress_interval_s: float = PROGRESS_INTERVAL_S) -> dict[str, LoadResult]:
    """Run every stream at once on the running loop (no warm-up requests: a windowed step has its warm-up in its
    schedule); results per stream name, all on the clock of the first send of any stream."""
    names = [s.name for s in streams]
    if not streams or len(set(names)) != len(names):
        raise ValueError(f"a mixed load needs streams with distinct names, got {names}")

    def relay(name: str) -> Callable[[LoadProgress], None] | None:
        return None if progress is None else (lambda p: progress(name, p))

    loads = await asyncio.gather(*(
        run_load(s.targets, s.requests, s.arrival, model=s.model, api=s.api, warmup=0, timeout_s=timeout_s,
                 extra_body=s.extra_body, progress=relay(s.name), progress_interval_s=progress_interval_s)
        for s in streams))
    return dict(zip(names, on_one_clock(loads)))


def run_mixed_load_sync(streams: Sequence[Stream], *, timeout_s: float,
                        progress: Callable[[str, LoadProgress], None] | None = None,
                        progress_interval_s: float = PROGRESS_INTERVAL_S, use_uvloop: bool = True
                        ) -> dict[str, LoadResult]:
    """`run_mixed_load` on a fresh event loop (uvloop when installed)."""
    box: list[dict[str, LoadResult]] = []

    async def main() -> None:
        box.append(await run_mixed_load(streams, timeout_s=timeout_s, progress=progress,
                                        progress_interval_s=progress_interval_s))

    with asyncio.Runner(loop_factory=_loop_factory(use_uvloop)) as runner:
        runner.run(main())
    return box[0]


def on_one_clock(loads: Sequence[LoadResult]) -> list[LoadResult]:
    """The loads with every `send_s` counted from the earliest first send among them (`t0_perf_ns`), so windows
    and in-flight counts of different loads refer to the same instants."""
    with_sends = [ld for ld in loads if ld.results]
    if not with_sends:
        return list(loads)
    t0 = min(ld.t0_perf_ns for ld in with_sends)
    out = []
    for ld in loads:
        shift = (ld.t0_perf_ns - t0) / 1e9 if ld.results else 0.0
        results = [dataclasses.replace(r, send_s=r.send_s + shift) for r in ld.results]
        out.append(dataclasses.replace(ld, results=results, t0_perf_ns=t0, started_at=ld.started_at - shift))
    return out
