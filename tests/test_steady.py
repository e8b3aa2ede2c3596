"""Steady-state verdict, windowed steps, the capacity search's logic, per-GPU ranking, input validation.

The verdict's false-alarm and detection rates are checked on simulated FIFO multi-slot queues (the model of
`tests/capacity_fake.py`, in pure Python), over many seeds, so the thresholds are tested on the noise they are
built for, fast.
"""

from __future__ import annotations

import heapq

import numpy as np
import pytest

from harness.errors import UserError
from harness.load.window import WindowSpec, mark_window
from harness.measure.steady import SteadyCriteria, apply_slo, assess, inflight
from harness.measure.step import window_metrics
from harness.records import ClientCheck, RequestResult, RunRecord, Steady, from_dict, to_dict
from harness.study.capacity import search_capacity, step_verdict, validate_steady_keys
from harness.study.pergpu import gpus_used, per_gpu

SLOTS, SERVICE_S = 8, 0.32  # capacity 25 req/s
CAPACITY = SLOTS / SERVICE_S


def simulate(rate: float, duration_s: float, seed: int, slots: int = SLOTS, service_s: float = SERVICE_S) -> list[RequestResult]:
    """Poisson arrivals into a FIFO queue in front of `slots` servers of fixed service time."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * duration_s * 1.5) + 50)
    sends = np.cumsum(gaps) - gaps[0]
    sends = sends[sends < duration_s]
    free = [0.0] * slots
    out = []
    for a in sends:
        start = max(a, free[0])
        heapq.heapreplace(free, start + service_s)
        out.append(RequestResult(ok=True, send_s=float(a), prompt_tokens=4, output_tokens=8,
                                 ttft_s=start - a + 0.04, e2e_s=start + service_s - a))
    return out


def verdict(rate: float, seed: int, step_s: float = 8.0, warmup_s: float = 1.0) -> Steady:
    plan = WindowSpec(step_s=step_s, warmup_s=warmup_s, tail_e2e_factor=0).plan(rate, SERVICE_S)
    return assess(simulate(rate, plan.send_s, seed), plan.window, target_rate=rate)


# ---------------------------------------------------------------------------------------------- the verdict


@pytest.mark.parametrize(("load", "step_s"), [(0.5, 8.0), (0.7, 8.0), (0.85, 60.0), (0.95, 60.0)])
def test_steady_poisson_load_below_capacity_is_not_flagged(load: float, step_s: float) -> None:
    """Near capacity the queue's excursions last seconds (its relaxation time grows as 1 / (1 - sqrt(load))^2),
    so the no-false-alarm claim there is for a window of a minute, the default."""
    flagged = [s for s in (verdict(load * CAPACITY, seed, step_s, step_s / 6) for seed in range(40)) if not s.holds]
    assert not flagged, [(s.reasons, s.requests) for s in flagged]


@pytest.mark.parametrize("load", [1.25, 1.5, 3.0])
def test_overload_is_flagged_in_a_short_window(load: float) -> None:
    judged = 0
    for seed in range(20):
        s = verdict(load * CAPACITY, seed)
        # the server's throughput, not the offered rate, is what completed in the window
        assert s.achieved_rate == pytest.approx(CAPACITY, rel=0.08)
        if s.offered_rate < 1.15 * CAPACITY:
            continue  # this window's Poisson arrivals came in close to capacity: within the 5% tolerance
        judged += 1
        assert not s.holds and not s.kept_up
        assert s.completion_ratio < 0.95
        assert s.inflight_growth > s.growth_limit
    assert judged >= 15


def test_overload_is_flagged_in_a_60s_window() -> None:
    for seed in range(20):
        s = verdict(1.1 * CAPACITY, seed, step_s=60.0, warmup_s=10.0)
        assert not s.holds, s
        assert s.offered_rate == pytest.approx(1.1 * CAPACITY, rel=0.05)


def test_completion_ratio_does_not_depend_on_the_drain() -> None:
    """Completions are counted inside the window: a long drain that finishes every request changes nothing."""
    results = simulate(1.5 * CAPACITY, 9.0, seed=3)
    plan = WindowSpec(step_s=8.0, warmup_s=1.0, tail_e2e_factor=0).plan(1.5 * CAPACITY, SERVICE_S)
    full = assess(results, plan.window)
    # cut the drain short: requests that would finish after the window fail there instead
    cut = [r if r.send_s + r.e2e_s < plan.window[1] + 0.5 else RequestResult(
        ok=False, send_s=r.send_s, prompt_tokens=4, output_tokens=0, e2e_s=plan.window[1] + 0.5 - r.send_s,
        error="timeout") for r in results]
    short = assess(cut, plan.window)
    assert full.completed == short.completed and full.completion_ratio == short.completion_ratio
    assert full.requests == short.requests == sum(1 for r in results if plan.in_window(r.send_s))


def test_window_counts_and_rates() -> None:
    s = verdict(0.7 * CAPACITY, seed=1)
    assert s.window_s == 8.0 and s.warmup_s == 1.0
    assert s.offered_rate == pytest.approx(s.requests / 8.0)
    assert s.achieved_rate == pytest.approx(s.completed / 8.0)
    assert s.offered_rate == pytest.approx(0.7 * CAPACITY, rel=0.2)
    assert s.inflight_mean == pytest.approx(0.7 * CAPACITY * SERVICE_S, rel=0.25)  # Little's law


def test_inflight_counts_requests_on_the_send_clock() -> None:
    rs = [RequestResult(ok=True, send_s=0.0, prompt_tokens=1, output_tokens=1, e2e_s=2.0),
          RequestResult(ok=True, send_s=1.0, prompt_tokens=1, output_tokens=1, e2e_s=0.5),
          RequestResult(ok=False, send_s=1.2, prompt_tokens=1, output_tokens=0, e2e_s=0.0, error="cancelled")]
    assert inflight(rs, np.array([0.5, 1.2, 1.6, 2.5])).tolist() == [1, 3, 2, 1]


def test_server_queue_trend_alone_flags_the_step() -> None:
    results = simulate(0.6 * CAPACITY, 9.0, seed=0)
    ok = [(t, 0.0) for t in np.arange(0, 9, 0.25)]
    growing = [(t, max(0.0, 12.0 * (t - 1))) for t in np.arange(0, 9, 0.25)]  # 12 req/s into the queue
    assert assess(results, (1.0, 9.0), waiting=ok).holds
    s = assess(results, (1.0, 9.0), waiting=growing)
    assert not s.holds and s.waiting_growth == pytest.approx(96, rel=0.05)
    assert any("num_requests_waiting" in r for r in s.reasons)
    few = assess(results, (1.0, 9.0), waiting=growing[:6])
    assert few.holds and few.waiting_growth is None and any("not tested" in w for w in few.warnings)


def test_few_requests_warn_and_empty_window_fails() -> None:
    s = assess(simulate(5.0, 9.0, seed=0), (1.0, 9.0))
    assert any("lengthen step_s" in w for w in s.warnings)
    empty = assess([], (1.0, 9.0))
    assert not empty.holds and "no request arrived" in empty.reasons[0]


def test_apply_slo_and_step_verdict() -> None:
    s = verdict(0.7 * CAPACITY, seed=2)
    assert s.holds and s.slo_ok is None
    bad = apply_slo(s, False, "p99 TTFT")
    assert not bad.holds and bad.kept_up and bad.slo_ok is False and "SLO" in bad.reasons[-1]
    plan = WindowSpec(step_s=8.0, warmup_s=1.0, tail_e2e_factor=0).plan(0.7 * CAPACITY, SERVICE_S)
    from harness.records import SLO

    marked, metrics = window_metrics(simulate(0.7 * CAPACITY, plan.send_s, 2), plan)
    record = RunRecord("r", "", "m", {}, {}, {}, None, [], metrics=metrics)
    assert step_verdict(record, s, SLO(ttft_ms=10_000)).holds
    missed = step_verdict(record, s, SLO(e2e_ms=100))  # every E2E is >= 320 ms
    assert not missed.holds and missed.slo_ok is False and "+" in missed.reasons[-1]
    assert step_verdict(record, s, None) is s


def test_window_metrics_are_over_window_arrivals_only() -> None:
    plan = WindowSpec(step_s=8.0, warmup_s=1.0, tail_e2e_factor=0).plan(0.7 * CAPACITY, SERVICE_S)
    results = simulate(0.7 * CAPACITY, plan.send_s, 4)
    marked, metrics = window_metrics(results, plan)
    inside = [r for r in results if 1.0 <= r.send_s < 9.0]
    assert metrics.completed == len(inside) == sum(not r.warmup for r in marked)
    assert len(marked) == len(results) and mark_window(marked, plan) == marked


def test_steady_block_round_trips_in_the_run_record() -> None:
    s = verdict(1.5 * CAPACITY, seed=0)
    record = RunRecord("r", "", "m", {}, {}, {}, None, [], steady=s)
    back = from_dict(RunRecord, to_dict(record))
    assert back.steady == s and back.steady.reasons
    assert from_dict(RunRecord, {k: v for k, v in to_dict(record).items() if k != "steady"}).steady is None


# ---------------------------------------------------------------------------------------------- window plans


def test_window_plan_warmup_tail_and_request_count() -> None:
    spec = WindowSpec(step_s=60.0, warmup_s=10.0, warmup_e2e_factor=3.0, tail_e2e_factor=1.0, drain_s=90.0)
    quick = spec.plan(20.0, expected_e2e_s=2.0)
    assert (quick.warmup_s, quick.tail_s, quick.window) == (10.0, 2.0, (10.0, 70.0))  # the floor wins
    slow = spec.plan(20.0, expected_e2e_s=8.0)
    assert (slow.warmup_s, slow.tail_s, slow.window) == (24.0, 8.0, (24.0, 84.0))  # 3 x E2E wins
    first = spec.plan(20.0)  # no estimate yet: the floor, no tail
    assert (first.warmup_s, first.tail_s) == (10.0, 0.0)
    arrival = slow.arrival()
    assert arrival.mode == "poisson" and arrival.rate == 20.0 and arrival.num_requests == slow.requests_needed() == 1841
    offsets = arrival.schedule(slow.requests_needed())
    assert offsets[0] == 0.0 and offsets[-1] == pytest.approx(92.0, abs=0.05)  # the schedule spans the send time
    in_window = np.sum((offsets >= 24.0) & (offsets < 84.0))
    assert in_window == pytest.approx(1200, rel=0.06)
    assert slow.expected_requests() == 1200.0
    assert WindowSpec(burstiness=0.5).plan(5.0).arrival().mode == "gamma"


@pytest.mark.parametrize(
    ("values", "key"),
    [({"step_s": 0}, "step_s"), ({"step_s": -5}, "step_s"), ({"step_s": "60"}, "step_s"),
     ({"steady_fraction": 0}, "steady_fraction"), ({"steady_fraction": 1.2}, "steady_fraction"),
     ({"steady_fraction": -0.1}, "steady_fraction"), ({"precision": 0}, "precision"),
     ({"precision": -0.05}, "precision"), ({"warmup_s": -1}, "warmup_s"), ({"precision": True}, "precision")],
)
def test_bad_steady_keys_are_one_line_errors(values: dict, key: str) -> None:
    with pytest.raises(UserError) as info:
        validate_steady_keys(values, "sweeps/l40s.yaml")
    msg = str(info.value)
    assert info.value.key == key and "\n" not in msg
    assert msg.startswith(f"sweeps/l40s.yaml: {key}: got ")


def test_good_steady_keys_pass() -> None:
    validate_steady_keys({"step_s": 60, "steady_fraction": 1.0, "precision": 0.05, "warmup_s": 0}, "f.yaml")
    validate_steady_keys({}, "f.yaml")
    assert SteadyCriteria(fraction=0.9).fraction == 0.9


# ---------------------------------------------------------------------------------------------- capacity search


class ModelServer:
    """measure(rate) for a server of capacity `mu` whose SLO breaks above `slo_rate`; counts its steps."""

    def __init__(self, mu: float, slo_rate: float | None = None, client_limit: float | None = None) -> None:
        self.mu, self.slo_rate, self.client_limit = mu, slo_rate, client_limit
        self.rates: list[float] = []

    def __call__(self, rate: float) -> tuple[RunRecord, Steady]:
        self.rates.append(rate)
        achieved = min(rate, self.mu)
        ratio = achieved / rate
        kept = ratio >= 0.95
        s = Steady(holds=kept, kept_up=kept, offered_rate=rate, achieved_rate=achieved, completion_ratio=ratio,
                   target_rate=rate, reasons=[] if kept else ["completions"], window_s=60.0,
                   requests=round(rate * 60), completed=round(achieved * 60), inflight_mean=achieved * SERVICE_S)
        if self.slo_rate is not None:
            s = apply_slo(s, rate <= self.slo_rate)
        valid = self.client_limit is None or rate <= self.client_limit
        client = ClientCheck(requested_rate=rate, achieved_rate=rate, dispatch_lag_p99_ms=0, client_cpu_percent=10,
                             valid=valid)
        return RunRecord("r", "", "m", {}, {}, {}, None, [], client=client), s


@pytest.mark.parametrize("start", [1.0, 10.0, 24.0, 26.0, 50.0, 400.0])
def test_search_brackets_capacity_to_the_precision(start: float) -> None:
    server = ModelServer(25.0)
    b = search_capacity(server, start_rate=start, precision=0.05, max_steps=12)
    assert b.converged and b.stopped == "bracket within 5%"
    assert b.capacity_hi is not None and b.capacity_hi <= b.capacity_lo * 1.05
    assert 25.0 * 0.95 <= b.capacity == b.capacity_lo <= 25.0
    assert b.best is not None


def test_far_failure_jumps_to_the_measured_throughput() -> None:
    server = ModelServer(25.0)
    b = search_capacity(server, start_rate=200.0)
    assert server.rates[1] == pytest.approx(25.0 * 0.975)  # not 100, 50, 25, ...
    assert len(b.steps) <= 3


def test_a_candidate_shown_below_the_incumbent_stops_there() -> None:
    """Warm start at the incumbent's 30 req/s: the step there fails, the next (below the measured throughput)
    holds, and the search ends: the bracket says worse than the incumbent; closing it would rank nothing."""
    server = ModelServer(20.0)
    b = search_capacity(server, start_rate=30.0, max_steps=8, stop_below=30.0)
    assert len(b.steps) == 2 and b.stopped.startswith("below the incumbent's 30 req/s")
    assert b.capacity_hi == 30.0 and 19.0 <= b.capacity_lo <= 20.0 and not b.converged
    full = search_capacity(ModelServer(20.0), start_rate=30.0, max_steps=8)  # a baseline: the bracket closes
    assert full.converged and len(full.steps) > 2
    better = search_capacity(ModelServer(40.0), start_rate=30.0, max_steps=12, stop_below=30.0)
    assert better.converged and 38.0 <= better.capacity_lo <= 40.0  # above the incumbent: nothing stops it early


def test_a_gpu_shaped_overload_closes_the_bracket_from_the_incumbent() -> None:
    """On the H200 (2026-12-01, trial #1 of the one-GPU study) every step 10-30% over capacity failed serving
    ~0.88 x its offer, so a failed step's throughput was no edge: probing just above it failed again and again
    (5 steps, bracket [15.2, 18.4) left open). Bisecting below that throughput closes the bracket."""
    capacity = 16.8

    def measure(rate: float) -> tuple[RunRecord, Steady]:
        ok = rate <= capacity
        achieved = rate if ok else 0.88 * rate
        s = Steady(holds=ok, kept_up=ok, offered_rate=rate, achieved_rate=achieved, completion_ratio=achieved / rate,
                   window_s=30.0, requests=round(rate * 30), completed=round(achieved * 30), inflight_mean=40.0)
        return RunRecord("r", "", "m", {}, {}, {}, None, []), s

    b = search_capacity(measure, start_rate=15.77, precision=0.05, max_steps=5, growth=1.25)
    assert b.converged and len(b.steps) <= 4, b.summary()
    assert capacity / 1.05 <= b.capacity_lo <= capacity


def _scripted(results: list[tuple[float, float, bool]], inflight: float = 40.0):  # type: ignore[no-untyped-def]
    """measure(rate) returning (offered, served, holds) in turn; the rates asked are in .rates."""
    def measure(rate: float) -> tuple[RunRecord, Steady]:
        measure.rates.append(rate)
        offered, served, ok = results[len(measure.rates) - 1]
        s = Steady(holds=ok, kept_up=ok, offered_rate=offered, achieved_rate=served, completion_ratio=served / offered,
                   window_s=30.0, requests=round(offered * 30), completed=round(served * 30), inflight_mean=inflight)
        return RunRecord("r", "", "m", {}, {}, {}, None, []), s

    measure.rates = []
    return measure


def test_a_failed_step_that_measured_a_backlog_does_not_bound_the_bisection() -> None:
    # 20 holds; 25 fails serving 12 (its window saw a backlog, not a throughput): bisect 20..25, not 20..12.6
    m = _scripted([(20.0, 20.0, True), (25.0, 12.0, False), (22.4, 22.4, True)])
    search_capacity(m, start_rate=20.0, max_steps=3, growth=1.25)
    assert m.rates[2] == pytest.approx((20.0 * 25.0) ** 0.5)


def test_a_step_that_held_at_the_failed_steps_throughput_lifts_that_bound() -> None:
    # 20 holds; 30 fails serving 21, so the search probes just above it, 22.05, and that holds (serving 21.0 of
    # 21.8 offered, within a steady load's noise): 22.05 bounds nothing any more, the next probe is below 30
    m = _scripted([(20.0, 20.0, True), (30.0, 21.0, False), (21.8, 21.0, True), (25.1, 23.0, False)], inflight=200.0)
    search_capacity(m, start_rate=20.0, max_steps=4, growth=1.5)
    assert m.rates[2] == pytest.approx(22.05) and m.rates[3] == pytest.approx((21.0 * 30.0) ** 0.5)


def test_verdicts_that_contradict_their_order_are_flagged_as_noise() -> None:
    # trial #7 of the one-H200 study: 15.8 held, 20.5, 17.7 and 16.6 failed, then 17.0 held: the bracket reads
    # [16.4, 16.6), 1.4% wide, but a window failed 2.4% below one that held, so the noise is wider than that
    m = _scripted([(15.8, 15.2, True), (20.5, 18.0, False), (17.7, 16.1, False), (16.6, 15.6, False),
                   (17.0, 16.4, True)], inflight=60.0)
    b = search_capacity(m, start_rate=15.5, max_steps=5, growth=1.25)
    assert b.crossed == (17.0, 16.6) and b.summary()["crossed"] == [17.0, 16.6]
    monotone = search_capacity(_scripted([(15.8, 15.2, True), (20.5, 18.0, False), (17.7, 16.1, False)]),
                               start_rate=15.5, max_steps=3, growth=1.25)
    assert monotone.crossed is None and monotone.summary()["crossed"] is None


def test_growth_sets_the_step_above_a_held_one() -> None:
    server = ModelServer(25.0)
    search_capacity(server, start_rate=20.0, max_steps=2, growth=1.25)
    assert server.rates[1] == pytest.approx(25.0)  # 20 x 1.25, not 40
    for bad in (1.0, 0.5, float("nan"), True, "2"):
        with pytest.raises(UserError, match="growth"):
            search_capacity(server, start_rate=20.0, growth=bad)  # type: ignore[arg-type]


def test_slo_only_failure_halves() -> None:
    server = ModelServer(25.0, slo_rate=9.0)
    b = search_capacity(server, start_rate=20.0, max_steps=12)
    assert server.rates[1] == pytest.approx(10.0)
    assert 9.0 * 0.95 <= b.capacity_lo <= 9.0 and b.converged


def test_capacity_is_clipped_to_the_sustained_throughput() -> None:
    """A step that 'holds' at 26 req/s while completing 25 req/s never reports 26."""
    b = search_capacity(ModelServer(25.0), start_rate=26.0, max_steps=1)
    assert b.steps[0].holds and b.capacity_lo == 25.0 and b.capacity_hi == 26.0
    assert all(b.capacity_lo <= s.steady.achieved_rate for s in b.steps if s.holds and s.steady.achieved_rate == b.capacity_lo)


def test_a_steady_step_short_by_noise_does_not_cap_the_search() -> None:
    """51 arrivals, 49 completions in a 5 s window at half capacity: Poisson noise, not a ceiling."""
    calls: list[float] = []

    def measure(rate: float) -> tuple[RunRecord, Steady]:
        calls.append(rate)
        if len(calls) == 1:
            s = Steady(holds=True, kept_up=True, offered_rate=10.2, achieved_rate=9.8, requests=51, completed=49,
                       inflight_mean=2.0, window_s=5.0)
        else:
            s = Steady(holds=False, kept_up=False, offered_rate=rate, achieved_rate=20.0)
        return RunRecord("r", "", "m", {}, {}, {}, None, []), s

    b = search_capacity(measure, start_rate=10.0, max_steps=2)
    assert len(calls) == 2 and calls[1] == pytest.approx(20.4) and b.capacity_lo == 9.8


def test_bracket_uses_the_realised_offered_rate() -> None:
    def measure(rate: float) -> tuple[RunRecord, Steady]:
        offered = rate * 0.9  # the window's Poisson arrivals came in 10% below the schedule
        ok = offered <= 25.0
        s = Steady(holds=ok, kept_up=ok, offered_rate=offered, achieved_rate=min(offered, 25.0))
        return RunRecord("r", "", "m", {}, {}, {}, None, []), s

    b = search_capacity(measure, start_rate=20.0, max_steps=12)
    assert b.capacity_lo <= 25.0 and b.steps[0].offered_rate == 18.0 and b.steps[0].rate == 20.0


def test_client_limited_step_bounds_from_above_and_is_flagged() -> None:
    server = ModelServer(100.0, client_limit=30.0)
    b = search_capacity(server, start_rate=20.0, max_steps=10)
    assert b.limited_by_client
    assert b.capacity_hi is not None and b.capacity_hi <= 40.0  # the step at 40 is the client's, not the server's
    assert 20.0 <= b.capacity_lo <= 30.0


def test_max_steps_and_min_rate_stop_the_search() -> None:
    b = search_capacity(ModelServer(1000.0), start_rate=1.0, max_steps=3)
    assert len(b.steps) == 3 and b.capacity_hi is None and b.capacity_lo == 4.0 and "max_steps" in b.stopped
    never = search_capacity(ModelServer(25.0, slo_rate=0.0), start_rate=1.0, min_rate=0.2, max_steps=20)
    assert never.capacity_lo == 0.0 and never.best is None and "min_rate" in never.stopped


def test_precision_is_validated() -> None:
    with pytest.raises(UserError, match="precision"):
        search_capacity(ModelServer(25.0), start_rate=1.0, precision=0.0)


# ---------------------------------------------------------------------------------------------- per GPU


def test_per_gpu_ranks_one_gpu_above_two_gpus_of_less_than_twice_its_capacity() -> None:
    one = {"tensor_parallel_size": 1, "max_num_seqs": 256}
    two = {"tensor_parallel_size": 2}
    two_replicas = {"replicas": 2}
    assert gpus_used(one) == 1 and gpus_used(two) == 2 and gpus_used(two_replicas) == 2
    assert gpus_used({"replicas": 2, "tensor_parallel_size": 2, "pipeline_parallel_size": 2}) == 8
    capacity = {"one": 22.0, "two": 40.0, "two_replicas": 43.9}  # absolute: the 2-GPU ones "win"
    gpus = {"one": gpus_used(one), "two": gpus_used(two), "two_replicas": gpus_used(two_replicas)}
    ranked = sorted(capacity, key=lambda k: per_gpu(capacity[k], gpus[k]), reverse=True)  # type: ignore[arg-type, return-value]
    assert ranked[0] == "one"
    assert per_gpu(45.0, 2) > per_gpu(22.0, 1)  # more than twice: the 2-GPU candidate earns its GPUs  # type: ignore[operator]
    assert per_gpu(None, 2) is None
    with pytest.raises(ValueError):
        per_gpu(1.0, 0)


def test_batch_fill_is_the_longest_decode_not_the_queue():
    """After an overloaded step the mean E2E is mostly queue (TTFT); the next warm-up needs only the time the
    longest requests spend decoding, so a queue of a minute must not make it a minute."""
    from harness.measure.steady import batch_fill_s

    rs = [RequestResult(ok=True, send_s=float(i), prompt_tokens=4, output_tokens=64, ttft_s=60.0 + i,
                        e2e_s=60.0 + i + (1.0 if i % 10 else 8.0)) for i in range(100)]
    fill = batch_fill_s(rs)
    assert fill is not None and 7.0 < fill <= 8.0  # the long decodes (8 s), none of the 60-160 s of queue
    assert batch_fill_s([RequestResult(ok=False, send_s=0.0, prompt_tokens=1, output_tokens=0, e2e_s=0.0,
                                       error="x")]) is None
    steady = assess(rs, (0.0, 50.0))
    assert steady.batch_fill_s == pytest.approx(fill)
