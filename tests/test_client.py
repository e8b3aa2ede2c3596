"""The streaming client against the fake server (a real HTTP server with known delays and injected failures).

Timing tolerance rationale: the fake server records, on the same monotonic clock, when it wrote each chunk. The
claim under test is that the client measures what happened: its TTFT and ITL must agree with the server's recorded
writes within 1 ms (the only difference allowed is loopback delivery and the client's own read latency). Against
the nominal delays only lower bounds are exact: the fake sleeps until monotonic deadlines counted from the moment
it received the request (never less: event-loop timers may fire early, see `fakeserver.sleep_until`), the client
stamps the send before the request leaves and the first chunk after it arrived, so a measured TTFT is never below
the injected delay. How late the server is depends on scheduling on a shared 2-core machine, so upper bounds
against the nominal values get tens of ms of slack, and means are used where a gap's lateness is repaid by the
next gap (ITL deadlines do not drift).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import statistics
import time
from typing import Any

import numpy as np
import pytest
from fakeserver import FakeConfig, FakeServer

from harness.errors import UserError
from harness.load.arrival import Arrival
from harness.load.client import CONTINUOUS_USAGE, LoadProgress, Target, _Conn, _Endpoint, _Req, _result, run_load, run_load_sync
from harness.load.prompts import RequestSpec
from harness.load.spread import Workers, WorkerFailed, context, resolve_processes, split, usable_cpus
from harness.measure.stats import summarize


@pytest.fixture(scope="module")
def server() -> Any:
    """One fake server in its own process (its timers must not share the client's GIL)."""
    with FakeServer(FakeConfig(), process=True) as srv:
        yield srv


@pytest.fixture
def srv(server: FakeServer) -> FakeServer:
    server.configure(**{k: v for k, v in FakeConfig().__dict__.items()})
    server.reset()
    return server


def specs(n: int, max_tokens: int = 8, chat: bool = False) -> list[RequestSpec]:
    """Request i has i + 1 prompt words, so the server's log can be matched to the client's results."""
    out = []
    for i in range(n):
        text = " ".join(["w"] * (i + 1))
        if chat:
            out.append(RequestSpec(None, [{"role": "user", "content": text}], i + 1, max_tokens))
        else:
            out.append(RequestSpec(text, None, i + 1, max_tokens))
    return out


# what the self-check of a client that a loaded machine made late says: its mean lag, or a rate below the schedule's
LATE = ("dispatch lag", "of the schedule's")


def closed(c: int) -> Arrival:
    return Arrival(mode="concurrency", max_concurrency=c)


def run(srv: FakeServer, reqs: list[RequestSpec], arrival: Arrival, *, api: str = "completions", warmup: int = 0,
        timeout_s: float = 10.0, key: str | None = None, processes: int = 1, **kw: Any) -> Any:
    return run_load_sync([Target(srv.url, key)], reqs, arrival, model="fake", api=api, warmup=warmup,
                         timeout_s=timeout_s, processes=processes, **kw)


# ---------------------------------------------------------------------------------------------- timings


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_ttft_and_itl_match_the_wire(srv: FakeServer, api: str, processes: int) -> None:
    """The same truth with the load spread over 2 worker processes: every timestamp is on the one system clock."""
    srv.configure(first_token_delay_s=0.050, chunk_delay_s=0.020)
    res = run(srv, specs(12, max_tokens=8, chat=api == "chat"), closed(4), api=api, processes=processes)
    assert res.client.processes == processes
    assert all(r.ok for r in res.results), [r.error for r in res.results]
    log = {e["prompt_tokens"]: e for e in srv.log()}
    ttft_err, itl_err, server_ttft = [], [], []
    for i, r in enumerate(res.results):
        e = log[i + 1]
        writes = e["writes_ns"][:8]  # 8 token chunks; the 9th write is the usage + [DONE] tail
        send_abs = res.t0_perf_ns + r.send_s * 1e9
        ttft_err.append(r.ttft_s - (writes[0] - send_abs) / 1e9)
        itl_err.extend(np.array(r.itl_s) - np.diff(writes) / 1e9)
        server_ttft.append((writes[0] - e["recv_ns"]) / 1e9)
        assert r.output_tokens == 8 and r.chunk_tokens == [1] * 8 and len(r.itl_s) == 7
        assert r.prompt_tokens == i + 1
    # measurement vs the wire: within 1 ms (received after written, so TTFT error is >= 0)
    assert statistics.median(ttft_err) < 1e-3
    assert min(ttft_err) > -1e-4
    assert statistics.median(np.abs(itl_err)) < 1e-3
    assert abs(float(np.mean(itl_err))) < 2e-3
    # vs the nominal delays. Exact: nothing is written before its deadline and the client's send precedes the
    # server's receipt, so every TTFT is >= 50 ms. Slack: the server's lateness on a loaded machine.
    assert min(server_ttft) >= 0.050
    assert min(r.ttft_s for r in res.results) >= 0.050
    assert statistics.median(r.ttft_s for r in res.results) < 0.050 + 0.050
    # exact per chunk: chunk k is written no earlier than 50 + 20 k ms after the request arrived
    for r in res.results:
        arrivals = np.cumsum([r.ttft_s, *r.itl_s])
        assert all(t >= 0.050 + 0.020 * k for k, t in enumerate(arrivals)), arrivals
    # ITL deadlines are absolute, so the mean gap is 20 ms within (last - first write lateness) / 7: slack for a
    # server process that a loaded machine leaves waiting for a CPU
    itls = [x for r in res.results for x in r.itl_s]
    assert abs(float(np.mean(itls)) - 0.020) < 0.015
    m = summarize(res.results, res.duration_s)
    assert m.tpot_ms is not None and abs(m.tpot_ms.mean - 20.0) < 15.0
    assert m.itl_ms is not None and m.itl_ms.count == 12 * 7


def test_multi_token_chunks(srv: FakeServer) -> None:
    srv.configure(chunk_delay_s=0.005, tokens_per_chunk=4)
    res = run(srv, specs(4, max_tokens=10), closed(2), extra_body=CONTINUOUS_USAGE)
    for r in res.results:
        assert r.ok, r.error
        assert r.output_tokens == 10
        assert r.chunk_tokens == [4, 4, 2]
        assert len(r.itl_s) == 2
    m = summarize(res.results, res.duration_s)
    assert m.itl_ms is not None and m.itl_ms.count == 8
    mt = summarize(res.results, res.duration_s, itl_per_token=True)
    assert mt.itl_ms is not None and mt.itl_ms.count == 4 * 6


def test_chat_role_chunk_is_not_output(srv: FakeServer) -> None:
    srv.configure(first_token_delay_s=0.03)
    res = run(srv, specs(2, max_tokens=3, chat=True), closed(2), api="chat")
    for r in res.results:
        assert r.ok and r.output_tokens == 3 and len(r.chunk_tokens) == 3
        assert r.ttft_s >= 0.03  # exact: the fake never writes before its deadline, counted from its receipt


def test_without_continuous_usage_counts_one_token_per_chunk(srv: FakeServer) -> None:
    # the default body is vLLM's benchmark's: final usage only (per-chunk usage costs the server TTFT)
    srv.configure(tokens_per_chunk=3)
    res = run_load_sync([Target(srv.url)], specs(2, max_tokens=6), closed(1), model="m", api="completions",
                        warmup=0, timeout_s=5)
    for r in res.results:
        assert r.ok and r.output_tokens == 6 and r.chunk_tokens == [1, 1]


def test_cached_prompt_tokens_from_usage_details(srv: FakeServer) -> None:
    res = run(srv, specs(3), closed(3))
    assert all(r.ok and r.cached_tokens is None for r in res.results)  # not reported: unknown
    srv.configure(cached_prompt_tokens=2)
    res = run(srv, specs(3), closed(3))  # prompts of 1, 2 and 3 words
    assert sorted(r.cached_tokens for r in res.results) == [1, 2, 2]
    assert summarize(res.results, res.duration_s).prefix_cached_fraction == pytest.approx(5 / 6)


# ---------------------------------------------------------------------------------------------- failures


def test_http_errors_are_counted(srv: FakeServer) -> None:
    srv.configure(error_every=3)
    res = run(srv, specs(9), closed(3))
    bad = [r for r in res.results if not r.ok]
    assert len(bad) == 3
    assert all(r.error and r.error.startswith("HTTP 500") and "injected failure" in r.error for r in bad)
    m = summarize(res.results, res.duration_s)
    assert (m.completed, m.failed) == (6, 3)


def test_dropped_connection(srv: FakeServer) -> None:
    srv.configure(drop_every=2, drop_after_chunks=2, chunk_delay_s=0.002)
    res = run(srv, specs(6), closed(2))
    bad = [r for r in res.results if not r.ok]
    assert len(bad) == 3
    assert all("connection" in (r.error or "") for r in bad)


def test_stream_without_usage_fails(srv: FakeServer) -> None:
    srv.configure(omit_usage=True)
    res = run(srv, specs(2), closed(2))
    assert all(not r.ok and r.error == "stream ended without usage" for r in res.results)


def test_timeout(srv: FakeServer) -> None:
    srv.configure(stall_s=3.0)
    t = time.perf_counter()
    res = run(srv, specs(2), closed(2), timeout_s=0.3)
    assert time.perf_counter() - t < 2.5
    assert all(not r.ok and r.error and r.error.startswith("timeout") for r in res.results)


def test_api_key(srv: FakeServer) -> None:
    srv.configure(api_key="secret")
    good = run(srv, specs(1), closed(1), key="secret")
    assert good.results[0].ok
    bad = run(srv, specs(1), closed(1), key="wrong")
    assert not bad.results[0].ok and bad.results[0].error.startswith("HTTP 401")  # type: ignore[union-attr]


def test_connection_refused() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens here now
    res = run_load_sync([Target(f"http://127.0.0.1:{port}")], specs(2), closed(2), model="m", api="completions",
                        warmup=0, timeout_s=5)
    assert all(not r.ok and r.error and r.error.startswith("connection error") for r in res.results)


def test_api_mismatch_is_a_user_error(srv: FakeServer) -> None:
    with pytest.raises(UserError, match="api chat needs requests built with messages"):
        run(srv, specs(1), closed(1), api="chat")


# ---------------------------------------------------------------------------------------------- load shape


def test_warmup_excluded_and_connections_reused(srv: FakeServer) -> None:
    srv.configure(chunk_delay_s=0.001)
    res = run(srv, specs(23, max_tokens=4), closed(4), warmup=3)
    assert [r.warmup for r in res.results] == [True] * 3 + [False] * 20
    assert all(r.ok for r in res.results)
    assert len(res.measured()) == 20
    assert min(r.send_s for r in res.measured()) == 0.0
    assert all(r.send_s < 0 for r in res.results[:3])
    assert summarize(res.results, res.duration_s).completed == 20
    peers = {tuple(e["peer"]) for e in srv.log()}
    assert len(peers) <= 4 + 3  # keep-alive: at most one connection per slot (warmup's 3 are reused too)
    assert res.client.valid, res.client.reasons
    assert res.client.requested_rate is None


def test_open_loop_poisson(srv: FakeServer) -> None:
    srv.configure(first_token_delay_s=0.005, chunk_delay_s=0.002)
    arrival = Arrival(mode="poisson", rate=40.0, seed=1)
    res = run(srv, specs(60, max_tokens=4), arrival)
    assert all(r.ok for r in res.results)
    sends = sorted(r.send_s for r in res.results)
    sched = arrival.schedule(60)
    # How late requests leave depends on the CPU the client gets (asyncio timers wake ~1 ms late on an idle
    # machine; tens of ms when a loaded 2-core machine leaves the client waiting), so the pace is a benchmark's
    # business. What must hold on any machine: the client never hides its lateness. The self-check's lag (send -
    # scheduled, per request) matches the lateness seen here (relative to the first send, itself maybe late), and
    # a run whose mean lag reshapes the arrival process is marked invalid for exactly that reason.
    late = np.array(sends) - sched
    assert res.client.requested_rate == 40.0
    lag = res.client.dispatch_lag_mean_ms
    assert lag is not None and lag >= 0.0
    assert float(np.mean(late)) * 1e3 <= lag + 0.5
    if lag <= 2.0:  # the client kept pace: the rate it achieved is the schedule's
        assert res.client.achieved_rate == pytest.approx(40.0, rel=0.05)
    if lag > 10.0:  # a mean lag over a tenth of the 25 ms gap: invalid, and said so
        assert not res.client.valid and any("dispatch lag" in x for x in res.client.reasons), res.client.reasons
    else:  # on time on average; a loaded machine may still delay the last sends (the rate check) or use up a core
        late_reasons = ("below 95% of the schedule", "of a core")
        assert res.client.valid or all(any(w in x for w in late_reasons) for x in res.client.reasons), \
            res.client.reasons


def test_open_loop_concurrency_cap(srv: FakeServer) -> None:
    srv.configure(first_token_delay_s=0.02)
    res = run(srv, specs(12, max_tokens=2), Arrival(mode="poisson", rate=500.0, max_concurrency=2))
    assert all(r.ok for r in res.results)
    spans = [(r.send_s, r.send_s + r.e2e_s) for r in res.results]
    in_flight = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert in_flight <= 2
    # waiting for the cap is not dispatch lag: it would be >= 20 ms per request here (exact: each waits for a
    # request with a 20 ms TTFT), so a mean below 20 ms shows it was not counted (10 ms of room for a loaded machine)
    assert res.client.dispatch_lag_mean_ms is not None and res.client.dispatch_lag_mean_ms < 10.0


def test_duration_mode_stops_sending(srv: FakeServer) -> None:
    srv.configure(chunk_delay_s=0.01)
    arrival = Arrival(mode="poisson", rate=50.0, duration_s=0.4, seed=2)
    n = arrival.requests_needed()
    assert n is not None and n >= 20
    res = run(srv, specs(n, max_tokens=3), arrival)
    # exact: only the schedule's requests before duration_s are sent; when they leave is the client's lateness
    # (tens of ms when a loaded machine leaves it waiting for a CPU)
    assert len(res.results) == len(arrival.schedule(n)) < n
    assert max(r.send_s for r in res.results) < 0.4 + 0.2
    # valid, unless a loaded machine made the client late, which its self-check must then say
    assert res.client.valid or all(any(w in x for w in LATE) for x in res.client.reasons), res.client.reasons
    # too few requests for the duration: flagged
    short = run(srv, specs(5, max_tokens=3), arrival)
    assert not short.client.valid and any("ran out of requests" in x for x in short.client.reasons)
    # closed loop with a duration: stops at the deadline, waits for requests in flight
    res_c = run(srv, specs(200, max_tokens=3), Arrival(mode="concurrency", max_concurrency=2, duration_s=0.3))
    assert 2 < len(res_c.results) < 200
    assert max(r.send_s for r in res_c.results) < 0.3 + 0.2


def test_replicas_least_outstanding() -> None:
    cfg = FakeConfig(first_token_delay_s=0.005, chunk_delay_s=0.002)
    with FakeServer(cfg) as a, FakeServer(cfg) as b:
        res = run_load_sync([Target(a.url), (b.url, None)], specs(20, max_tokens=4), closed(4), model="m",
                            api="completions", warmup=0, timeout_s=10)
        assert all(r.ok for r in res.results)
        per = [sum(r.replica == i for r in res.results) for i in (0, 1)]
        assert per[0] + per[1] == 20 and min(per) >= 8  # 2 slots each; the faster replica may take a few more
        assert len(a.log()) == per[0] and len(b.log()) == per[1]


def test_idle_connections_closed_by_server_are_replaced() -> None:
    with FakeServer(FakeConfig(), keepalive_s=0.1) as srv:
        res = run_load_sync([Target(srv.url)], specs(4, max_tokens=2), Arrival(mode="poisson", rate=4.0),
                            model="m", api="completions", warmup=1, timeout_s=5)
        assert all(r.ok for r in res.results), [r.error for r in res.results]


def test_run_load_in_a_running_loop(srv: FakeServer) -> None:
    async def main() -> Any:
        return await run_load([Target(srv.url)], specs(3), closed(3), model="m", api="completions", warmup=0,
                              timeout_s=5)

    res = asyncio.run(main())
    assert all(r.ok for r in res.results)


def test_progress_callback(srv: FakeServer) -> None:
    srv.configure(first_token_delay_s=0.02, chunk_delay_s=0.01)
    seen: list[LoadProgress] = []
    arrival = Arrival(mode="poisson", rate=40.0, seed=3)

    async def main() -> Any:
        return await run_load([Target(srv.url)], specs(22, max_tokens=5), arrival, model="m", api="completions",
                              warmup=2, timeout_s=10, progress=seen.append, progress_interval_s=0.1)

    res = asyncio.run(main())
    assert all(r.ok for r in res.results)
    assert len(seen) >= 3  # ~0.5 s of schedule plus the tail, every 0.1 s, and the final state
    last = seen[-1]
    assert (last.sent, last.completed, last.failed, last.in_flight) == (20, 20, 0, 0)  # warmup not counted
    assert last.total_s == pytest.approx(float(arrival.schedule(20)[-1]))
    assert last.p50_ttft_ms is not None and last.p50_ttft_ms >= 20.0  # exact lower bound (see module docstring)
    assert last.p50_tpot_ms is not None and last.p50_tpot_ms >= 10.0 - 1.0  # gaps repay lateness: mean-like
    for a, b in zip(seen, seen[1:]):
        assert a.elapsed_s <= b.elapsed_s and a.sent <= b.sent and a.completed <= b.completed
        assert a.in_flight == a.sent - a.completed - a.failed >= 0
    assert any(p.in_flight > 0 for p in seen[:-1])


# ---------------------------------------------------------------------------------------------- worker processes


def _by_words(log: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The server's log by prompt length (request i has i + 1 words); each request must have arrived once."""
    words = [e["prompt_tokens"] for e in log]
    assert len(words) == len(set(words)), "a request reached the server twice"
    return {e["prompt_tokens"]: e for e in log}


def _max_in_flight(log: list[dict[str, Any]]) -> int:
    """Most requests the server held at once: each from its receipt to its last write. A client slot's next request
    leaves after the client read the end of the previous one, so one slot never counts twice."""
    events = sorted([(e["recv_ns"], 1) for e in log] + [(e["writes_ns"][-1], -1) for e in log])
    held = peak = 0
    for _, step in events:
        held += step
        peak = max(peak, held)
    return peak


@pytest.mark.parametrize("arrival", [Arrival(mode="poisson", rate=40.0, seed=4),
                                     Arrival(mode="gamma", rate=60.0, burstiness=0.5, duration_s=0.6, seed=5)],
                         ids=["poisson", "gamma-duration"])
def test_processes_keep_the_schedule(srv: FakeServer, arrival: Arrival) -> None:
    """Over 2 processes every request is sent once, none twice, none before its scheduled instant (exact: the
    server's receipt and the client's send stamp are never earlier than start + offset on the one clock); warm-up,
    a duration limit (a time-window step's arrival) and merged progress behave as in one process."""
    srv.configure(first_token_delay_s=0.005, chunk_delay_s=0.002)
    n = 2 + (arrival.requests_needed() or 30)
    seen: list[LoadProgress] = []
    res = run(srv, specs(n, max_tokens=4), arrival, warmup=2, processes=2, progress=seen.append,
              progress_interval_s=0.1)
    offsets = arrival.schedule(n - 2)
    assert len(res.results) == 2 + len(offsets)  # a duration-limited schedule sends only what is due before it ends
    assert all(r.ok for r in res.results), [r.error for r in res.results if not r.ok]
    assert [r.warmup for r in res.results] == [True, True] + [False] * len(offsets)
    log = _by_words(srv.log())
    assert sorted(log) == list(range(1, len(res.results) + 1))
    due = (res.start_perf_ns + np.rint(offsets * 1e9)).astype(np.int64)
    for k, r in enumerate(res.measured()):
        assert log[k + 3]["recv_ns"] >= due[k]  # exact, integer nanoseconds
        assert res.t0_perf_ns + r.send_s * 1e9 >= due[k] - 1e3  # exact up to the float seconds of send_s
    assert min(r.send_s for r in res.measured()) == 0.0
    # the self-check covers both workers' sends, and its lag is >= the lateness seen here
    lateness = [(res.t0_perf_ns + r.send_s * 1e9 - d) / 1e6 for r, d in zip(res.measured(), due)]
    assert res.client.processes == 2
    assert res.client.dispatch_lag_mean_ms is not None
    assert res.client.dispatch_lag_mean_ms == pytest.approx(float(np.mean(lateness)), abs=0.01)
    assert res.client.valid or all(any(w in x for w in LATE) for x in res.client.reasons), res.client.reasons
    last = seen[-1]
    assert (last.sent, last.completed, last.failed, last.in_flight) == (len(offsets), len(offsets), 0, 0)
    assert last.p50_ttft_ms is not None and last.p50_ttft_ms >= 5.0  # exact lower bound
    assert all(a.sent <= b.sent and a.completed <= b.completed for a, b in zip(seen, seen[1:]))


def test_processes_closed_loop_concurrency(srv: FakeServer) -> None:
    """C = 5 over 2 processes (3 + 2 slots, one shared queue): the server never holds more than 5, and holds 5."""
    srv.configure(first_token_delay_s=0.03, chunk_delay_s=0.01)
    res = run(srv, specs(60, max_tokens=6), closed(5), warmup=3, processes=2)
    assert all(r.ok for r in res.results)
    log = srv.log()
    _by_words(log)
    assert len(log) == 60 and len(res.measured()) == 57
    # <= 5 is the claim; == 5: a slot takes the next request as soon as it frees (~1 s of 90 ms requests, so a
    # worker held up for a while by a loaded machine still overlaps the other)
    assert _max_in_flight(log) == 5
    # an open loop's cap over processes: at most 3 in flight even at 500 req/s
    srv.reset()
    res = run(srv, specs(20, max_tokens=2), Arrival(mode="poisson", rate=500.0, max_concurrency=3), processes=2)
    assert all(r.ok for r in res.results)
    assert _max_in_flight(srv.log()) <= 3


def test_processes_errors_propagate(srv: FakeServer) -> None:
    srv.configure(error_every=3)
    res = run(srv, specs(9), closed(3), processes=2)
    bad = [r for r in res.results if not r.ok]
    assert len(bad) == 3 and all(r.error and r.error.startswith("HTTP 500") for r in bad)
    # bad input fails before any process starts
    with pytest.raises(UserError, match="api chat needs requests built with messages"):
        run(srv, specs(1), closed(1), api="chat", processes=2)
    with pytest.raises(UserError, match="processes"):
        run(srv, specs(1), closed(1), processes=0)


def test_dead_worker_fails_the_run(srv: FakeServer) -> None:
    """A worker killed mid-run: the run raises at once, names the worker, and leaves no process behind."""
    srv.configure(chunk_delay_s=0.05)  # 40 requests x 20 chunks x 50 ms at 2 in flight: ~20 s if it hung on

    def kill_one(p: LoadProgress) -> None:
        for c in multiprocessing.active_children():
            if c.name == "vllm-tune-load-1" and c.pid is not None:
                os.kill(c.pid, signal.SIGKILL)

    t = time.perf_counter()
    with pytest.raises(WorkerFailed, match=r"load worker 1 .* exited with code -9"):
        run(srv, specs(40, max_tokens=20), closed(2), processes=2, progress=kill_one, progress_interval_s=0.2)
    assert time.perf_counter() - t < 10.0
    assert not [c for c in multiprocessing.active_children() if c.name.startswith("vllm-tune-load-")]


def test_worker_exception_fails_the_run() -> None:
    """An exception inside a worker reaches the parent with the worker's traceback."""
    from harness.load import client

    with Workers(context(), client._worker, [(None, None)]) as workers:
        with pytest.raises(WorkerFailed, match=r"(?s)load worker 0 failed:.*AttributeError"):
            workers.gather("ready")


def test_processes_in_a_running_loop(srv: FakeServer) -> None:
    seen: list[LoadProgress] = []

    async def main() -> Any:
        loop = asyncio.get_running_loop()

        def on_loop(p: LoadProgress) -> None:
            assert asyncio.get_running_loop() is loop  # progress still runs on the caller's loop
            seen.append(p)

        return await run_load([Target(srv.url)], specs(6), closed(3), model="m", api="completions", warmup=0,
                              timeout_s=5, processes=2, progress=on_loop, progress_interval_s=0.1)

    res = asyncio.run(main())
    assert all(r.ok for r in res.results) and len(res.results) == 6
    assert seen and seen[-1].completed == 6


def test_resolve_processes() -> None:
    reqs = specs(10, max_tokens=500)
    assert resolve_processes(3, reqs, closed(8), 0) == 3
    assert resolve_processes(4, reqs, closed(2), 0) == 2  # never more workers than slots
    # auto: 400 req/s x 500 tokens = 200k chunks/s -> 2 workers at 100k each, if there are 2 CPUs
    assert resolve_processes("auto", reqs, Arrival(mode="poisson", rate=400.0), 0) == min(2, usable_cpus())
    assert resolve_processes("auto", reqs, Arrival(mode="poisson", rate=4.0), 0) == 1
    assert resolve_processes("auto", reqs, closed(16), 0) == 1  # 16 streams x 200 tok/s
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(UserError, match="processes"):
            resolve_processes(bad, reqs, closed(1), 0)  # type: ignore[arg-type]
    assert split(7, 3) == [3, 2, 2] and split(2, 3) == [1, 1, 0] and sum(split(5, 2)) == 5


# ---------------------------------------------------------------------------------------------- the parser


class _StubRun:
    chat = False

    def __init__(self) -> None:
        self.done: list[_Req] = []

    def finish(self, req: _Req, ts: int) -> None:
        req.finished = True
        req.end_ns = ts
        self.done.append(req)

    def resend(self, req: _Req) -> None:  # pragma: no cover - not reached in parser tests
        raise AssertionError("resend")


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def _chunked(*events: bytes) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


def _completion_event(text: str, ct: int) -> bytes:
    return (b'data: {"choices":[{"index":0,"text":"%s","finish_reason":null}],'
            b'"usage":{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}}\n\n') % (text.encode(), ct, ct + 5)


RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    + _chunked(
        b": ping comment\n\n",
        _completion_event(" a", 1),
        _completion_event(" b c", 3).replace(b"\n\n", b"\r\n\r\n"),  # CRLF event separator
        _completion_event("", 3),  # empty text, no new token: not an output chunk
        _completion_event("", 4),  # empty text but a token (e.g. a special token): an output chunk
        b'event: message\ndata: {"choices":[{"index":0,"text":" d","finish_reason":"length"}],\n'
        b'data: "usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}\n\n',  # multi-line data
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}\n\n',
        b"data: [DONE]\n\n",
    )
)


def _feed(pieces: list[bytes], chat: bool = False) -> tuple[_StubRun, _Req, _Conn]:
    stub = _StubRun()
    stub.chat = chat
    ep = _Endpoint(0, Target("http://127.0.0.1:1"), "chat" if chat else "completions")
    conn = _Conn(stub, ep)  # type: ignore[arg-type]
    conn.connection_made(_Transport())  # type: ignore[arg-type]
    req = _Req(0, b"{}", False)
    req.ep = ep
    req.send_ns = time.perf_counter_ns()
    conn.send(req)
    for p in pieces:
        conn.data_received(p)
    return stub, req, conn


def _check(req: _Req) -> None:
    r = _result(req, req.send_ns)
    assert r.ok, r.error
    assert (r.prompt_tokens, r.output_tokens) == (5, 5)
    assert r.chunk_tokens == [1, 2, 1, 1]
    assert len(r.itl_s) == 3


def test_parser_any_split_point() -> None:
    stub, req, conn = _feed([RESPONSE])
    assert stub.done == [req]
    _check(req)
    assert conn in conn.ep.idle  # keep-alive: reusable
    for cut in range(1, len(RESPONSE)):
        stub, req, _ = _feed([RESPONSE[:cut], RESPONSE[cut:]])
        assert stub.done == [req], cut
        _check(req)


def test_parser_random_fragments() -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        cuts = sorted(set(rng.integers(1, len(RESPONSE), size=int(rng.integers(2, 40))).tolist()))
        pieces = [RESPONSE[a:b] for a, b in zip([0] + cuts, cuts + [len(RESPONSE)])]
        stub, req, _ = _feed(pieces)
        assert stub.done == [req]
        _check(req)


def test_parser_content_length_and_close_delimited() -> None:
    body = b"".join([_completion_event(" a", 1), _completion_event(" b", 2),
                     b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}\n\n'])
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    stub, req, _ = _feed([head + body[:10], body[10:]])
    r = _result(req, req.send_ns)
    assert stub.done == [req] and r.ok and r.output_tokens == 2 and r.chunk_tokens == [1, 1]
    # no length, no chunking: the body ends when the server closes
    stub, req, conn = _feed([b"HTTP/1.0 200 OK\r\n\r\n" + body])
    assert stub.done == []
    conn.connection_lost(None)
    r = _result(req, req.send_ns)
    assert stub.done == [req] and r.ok and r.output_tokens == 2


def test_parser_in_stream_error_and_bad_status() -> None:
    err = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           + _chunked(_completion_event(" a", 1), b'data: {"error":{"message":"engine died","code":500}}\n\n'))
    _, req, _ = _feed([err])
    r = _result(req, req.send_ns)
    assert not r.ok and r.error is not None and "engine died" in r.error
    bad = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 9\r\nConnection: close\r\n\r\noverload!"
    _, req, conn = _feed([bad])
    r = _result(req, req.send_ns)
    assert not r.ok and r.error == "HTTP 503: overload!"
    assert conn not in conn.ep.idle
