"""Where a study's device time went: server start-up (by phase), load steps, failed starts, interrupted trials, and
pruned candidates (0 s); and what it bought: finished trials per device-hour.

GPU time comes in short stretches, so a trial's cost is what decides how many candidates a study can try. The
numbers are device-seconds (wall seconds x the devices held), from the trial schema (`harness.study.trials`):
`device_seconds` per finished trial, the harness's start-up seconds and vLLM's start-up phases. The sweep prints
`TimeSpent.line()` after each model; the report draws `TimeSpent.rows()`.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Iterable

from optuna.trial import FrozenTrial

from harness.measure.vllm_bench import VLLM_BENCH_START_S
from harness.records import STARTUP_PHASES
from harness.study.confirm import alternating_blocks
from harness.study.trials import Attr, Outcome, capacity_of, category_of, devices_held_of, metric_of, startup_of

PHASE_LABELS = {
    "python_s": "Python imports and config, until the engine starts",
    "weights_s": "weights loading",
    "compile_s": "torch.compile",
    "cuda_graphs_s": "CUDA graph capture",
    "kv_profile_s": "memory profiling, KV cache, warm-up",
    "api_s": "API server start after the engine",
    "other_s": "other (engine and worker processes, device set-up; servers sharing a GPU, started one after another)",
}
FINISHED = ("ok", "slo_violated", "failed", "pruned")  # outcomes that count toward a study's trial budget


@dataclass
class TimeSpent:
    """Device-seconds by where they went, over one study's trials (confirmation runs are not trials)."""

    finished: int = 0  # ok, SLO missed, failed, pruned: the trials the budget counts
    launched: int = 0  # finished trials that held devices
    pruned: int = 0  # ruled out before launch: 0 device-seconds
    interrupted: int = 0
    device_s: float = 0.0  # held by finished trials (their recorded device_seconds)
    startup_s: float = 0.0  # of which server start-up (the harness's clock: launch -> /health 200)
    phases_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STARTUP_PHASES, 0.0))
    phases_known_s: float = 0.0  # the start-up seconds the phases cover (trials whose log was parsed)
    phases_trials: int = 0  # launched trials with phases (older studies recorded none)
    started: int = 0  # launched trials whose servers became ready
    serving_s: float = 0.0  # held minus start-up: load steps, teardown, waiting for memory release
    failed_start_s: float = 0.0  # held by trials whose servers never became ready
    # an upper bound, not in the total: a killed trial records nothing, and its duration (until a rerun marks it
    # failed) includes waiting for free devices and the time between two stretches of GPU time
    interrupted_max_s: float = 0.0
    compile_cache: Counter[str] = field(default_factory=Counter)  # state (or "none") -> launched trials

    @property
    def trials_per_device_hour(self) -> float | None:
        """Finished trials (pruned ones included: they cost nothing) per device-hour the finished trials held."""
        return self.finished / (self.device_s / 3600.0) if self.device_s > 0 else None

    @property
    def launched_per_device_hour(self) -> float | None:
        """Launched trials per device-hour: what one candidate that runs costs, whatever the planner pruned."""
        return self.launched / (self.device_s / 3600.0) if self.device_s > 0 else None

    def share(self, seconds: float) -> float | None:
        return seconds / self.device_s if self.device_s > 0 else None

    def rows(self) -> list[tuple[str, float, float | None]]:
        """(what, device-seconds, share of all device time): start-up and its phases, load steps, failed starts,
        interrupted trials, pruned candidates."""
        out: list[tuple[str, float, float | None]] = [("server start-up", self.startup_s, self.share(self.startup_s))]
        if self.phases_known_s > 0:
            cover = "" if self.phases_trials == self.started else f" ({self.phases_trials} of {self.started} trials)"
            out += [(f"start-up: {PHASE_LABELS[name]}{cover}", secs, self.share(secs))
                    for name, secs in self.phases_s.items()]
        out.append(("load steps (and teardown)", self.serving_s, self.share(self.serving_s)))
        out.append(("start-ups that failed", self.failed_start_s, self.share(self.failed_start_s)))
        out.append((f"pruned before launch ({self.pruned} trials)", 0.0, 0.0 if self.device_s > 0 else None))
        out.append(("all finished trials", self.device_s, 1.0 if self.device_s > 0 else None))
        if self.interrupted:
            out.append((f"interrupted trials ({self.interrupted}): at most, not in the total", self.interrupted_max_s,
                        None))
        return out

    def line(self, device: str, where: str) -> str:
        """One line for the sweep's output; `device`: what a device-hour is of ("GPU", "server" on a CPU host),
        `where`: the devices ("4x NVIDIA H200")."""
        rate, launched = self.trials_per_device_hour, self.launched_per_device_hour
        parts = [f"{self.finished} finished trials ({self.launched} launched) in {self.device_s / 3600.0:.2f} "
                 f"{device}-hours" + (f" = {rate:.1f} trials ({launched:.1f} launched) per {device}-hour"
                                      if rate is not None and launched is not None else "")]
        for label, secs in (("start-up", self.startup_s), ("load steps", self.serving_s),
                            ("failed starts", self.failed_start_s)):
            share = self.share(secs)
            if secs > 0 and share is not None:
                parts.append(f"{label} {share:.0%}")
        parts.append(f"pruned {self.pruned} (0 s)")
        if self.interrupted:
            parts.append(f"{self.interrupted} interrupted (not counted)")
        if self.compile_cache:
            parts.append("compile cache " + ", ".join(f"{k} x{n}" for k, n in sorted(self.compile_cache.items())))
        return f"time on {where}: " + "; ".join(parts)


def time_spent(trials: Iterable[FrozenTrial]) -> TimeSpent:
    """Add up the trials' device time by where it went."""
    t = TimeSpent()
    for trial in trials:
        cat = category_of(trial)
        devices = devices_held_of(trial)
        if cat == Outcome.INTERRUPTED:
            t.interrupted += 1
            if trial.duration is not None:
                t.interrupted_max_s += trial.duration.total_seconds() * devices
            continue
        if cat not in FINISHED:
            continue  # running, waiting, surplus: nothing held, or not yet known
        t.finished += 1
        t.pruned += cat == Outcome.PRUNED
        held = float(trial.user_attrs.get(Attr.DEVICE_SECONDS) or 0.0)
        if held <= 0:
            continue
        t.launched += 1
        t.device_s += held
        startup = metric_of(trial, "startup_s")
        if startup is None:  # never became ready (or recorded before start-ups were): all of it was starting
            t.failed_start_s += held
            continue
        t.started += 1
        up = min(startup * devices, held)
        t.startup_s += up
        t.serving_s += held - up
        phases = startup_of(trial)
        if phases is not None:
            t.compile_cache[phases.compile_cache or "not compiled"] += 1
        if phases is not None and phases.total_s:
            t.phases_trials += 1
            for name in STARTUP_PHASES:
                t.phases_s[name] += (getattr(phases, name) or 0.0) * devices
            # the trial's start-up is its servers' wall time (servers sharing a GPU start in turn); the first
            # replica's phases cover the rest as "other"
            t.phases_s["other_s"] += max(startup - phases.total_s, 0.0) * devices
            t.phases_known_s += up
    return t


@dataclass(frozen=True)
class MeasuredCosts:
    """What one server start-up and one load step take, wall seconds: this study's medians (`measured_costs`),
    better than a plan's guess, or that guess in the dry run; what a confirmation costs is derived from them."""

    startup_s: float
    step_s: float  # warm-up, window, tail and drain of one load step

    def confirmation_s(self, sides: int, repeats: int, cross_check: bool,
                       startups: Sequence[float | None] = (), drains: Sequence[float] = ()) -> float:
        """A confirmation at worst (one side at a time: a start-up per alternating block), its repeats, and with
        `cross_check` per side our client's run and vllm bench serve's (a step each, and that tool's start).
        `startups`: each side's own start-up (winner, baseline), where known: three servers sharing a GPU start in
        turn and take three times one server's; else the median. `drains`: each side's extra seconds per repeat
        past what it sustains (`overload_drain_s`)."""
        if repeats <= 0:
            return 0.0
        blocks = alternating_blocks(list(range(sides)), repeats)
        own = list(startups) + [None] * sides
        starts = sum(own[side] or self.startup_s for side, _ in blocks)
        bench = sides if cross_check else 0
        # a side's cross-check (our client, then vllm bench serve) offers the repeats' load twice more
        return (starts + (sides * repeats + 2 * bench) * self.step_s + bench * VLLM_BENCH_START_S
                + (repeats + (2 if cross_check else 0)) * sum(list(drains)[:sides]))


def overload_drain_s(trial: FrozenTrial, load: float, step_s: float, cap_s: float) -> float:
    """Extra wall seconds one confirmation repeat of `trial` spends draining when offered `load` (on its values'
    scale) above what it sustains, by its own capacity search: the step's sends build a backlog of (load -
    served) x step_s, which the server then works off at the rate it served its own overloaded steps. One
    DialoGPT server offered 2.3x its capacity served about half of it: its repeats drain for minutes, as long as
    the per-request timeout `cap_s` lets them, where a median step says under one. 0 within its capacity or
    without a capacity search (a fixed-load objective's repeats are its trials' own steps); `cap_s` for a search
    that found no rate it sustains."""
    cap = capacity_of(trial)
    if not cap.get("steps") or load <= 0:
        return 0.0
    capacity = cap.get("capacity_lo")
    if capacity is None:  # a bracket stored before it had its ends: no backlog to estimate from
        return 0.0
    value = trial.values[0] if trial.values else None
    if capacity <= 0 or not value or value <= 0:
        return cap_s
    if load <= value:
        return 0.0
    over = load / value  # offered, in units of what the trial sustains
    served = [s["achieved"] / capacity for s in cap["steps"]
              if s.get("offered", 0.0) > capacity and s.get("achieved") is not None]
    rate = min([1.0] + served)  # served under overload, in the same units (its worst measured)
    return min(cap_s, (over - rate) * step_s / max(rate, 0.05))


def measured_costs(trials: Iterable[FrozenTrial]) -> MeasuredCosts | None:
    """None until a trial has measured a start-up and its load steps."""
    ups: list[float] = []
    steps: list[float] = []
    for trial in trials:
        held = float(trial.user_attrs.get(Attr.DEVICE_SECONDS) or 0.0)
        startup = metric_of(trial, "startup_s")
        if category_of(trial) not in (Outcome.OK, Outcome.SLO_VIOLATED) or held <= 0 or startup is None:
            continue
        wall = held / devices_held_of(trial)
        ups.append(startup)
        steps.append(max(wall - startup, 0.0) / max(len(capacity_of(trial).get("steps") or []), 1))
    return MeasuredCosts(statistics.median(ups), statistics.median(steps)) if ups else None
