"""How many streamed chunks per second the client sustains on one core, next to `vllm bench serve`'s own client.

Both clients stream the same responses from the zero-delay fake server (`tests/fakeserver.py`), which runs in its
own process pinned to another CPU, while this process is pinned to one CPU: the number is the client's ceiling, not
the server's (the table's `server busy` column shows how far from saturated the server was). Responses are
byte-identical for both clients (vLLM's request function is given the same `stream_options`, continuous usage
included, through its `extra_body`), each event its own HTTP chunk as uvicorn sends them. vLLM's client is its
`async_request_openai_completions` from the installed vllm package, driven the way `vllm bench serve` drives it
(one aiohttp session with its connector settings, a semaphore of `max_concurrency`, the default asyncio loop).

Reported per client: chunks per wall second (median and best round) and chunks per CPU second of this process (its
own cost, which other load on a shared machine changes little). A last test alternates the two clients round by
round and reports the median of the paired ratios, so slow drifts in machine load cancel out. This is a
measurement, not a pass/fail test.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakeserver import FakeConfig, FakeServer  # noqa: E402
from vllm_client import VllmClientMissing, request_module  # noqa: E402

from harness.load.arrival import Arrival  # noqa: E402
from harness.load.client import JSON_PARSER, Target, run_load_sync  # noqa: E402
from harness.load.prompts import RequestSpec  # noqa: E402

N_REQUESTS = 384
OUTPUT_TOKENS = 128
CONCURRENCY = 32
ROUNDS = 5
PAIRS = 4
STREAM_OPTIONS = {"include_usage": True, "continuous_usage_stats": True}
CHUNKS = N_REQUESTS * OUTPUT_TOKENS
VLLM = "vllm bench serve client (asyncio)"

_RESULTS: dict[str, dict[str, float]] = {}
_ALL_CPUS: set[int] = set()
_PAIRED: dict[str, float] = {}


# ---------------------------------------------------------------------------------------------- setup


def _vllm_request_module() -> ModuleType:
    try:
        return request_module()
    except VllmClientMissing as exc:
        pytest.skip(str(exc))


def _by_idleness(cpus: list[int], sample_s: float = 0.3) -> list[int]:
    """CPUs ordered from most to least idle over a short sample of /proc/stat (as given when unreadable)."""

    def idle() -> dict[int, int]:
        out = {}
        try:
            for line in Path("/proc/stat").read_text().splitlines():
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    out[int(name[3:])] = int(fields[3]) + int(fields[4])  # idle + iowait
        except (OSError, ValueError, IndexError):
            pass
        return out

    a = idle()
    time.sleep(sample_s)
    b = idle()
    if not a or not b:
        return cpus
    return sorted(cpus, key=lambda c: -(b.get(c, 0) - a.get(c, 0)))


def _write_table(request: pytest.FixtureRequest, client_cpu: int | None, server_cpu: int | None) -> None:
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    if reporter is None or not _RESULTS:
        return
    base = _RESULTS.get(VLLM)
    lines = [
        "",
        f"streamed chunks per second, client on one core: {N_REQUESTS} requests x {OUTPUT_TOKENS} chunks, "
        f"concurrency {CONCURRENCY}, {ROUNDS} rounds (median / best), client CPU {client_cpu}, "
        f"fake server CPU {server_cpu}, our JSON parser {JSON_PARSER}, load average {os.getloadavg()[0]:.1f}",
        f"{'client':40s} {'wall median':>12s} {'wall best':>12s} {'phase wall':>12s} {'per CPU-s':>12s} "
        f"{'x vLLM wall':>12s} {'x vLLM CPU':>11s} {'server busy':>12s}",
    ]
    for name, r in _RESULTS.items():
        wall_x = f"{r['chunks_per_s'] / base['chunks_per_s']:.2f}x" if base else "-"
        cpu_x = f"{r['chunks_per_cpu_s'] / base['chunks_per_cpu_s']:.2f}x" if base else "-"
        busy = f"{r['server_busy'] * 100:.0f}%" if r["server_busy"] >= 0 else "-"
        lines.append(f"{name:40s} {r['chunks_per_s']:12,.0f} {r['chunks_per_s_best']:12,.0f} "
                     f"{r['chunks_per_phase_s']:12,.0f} {r['chunks_per_cpu_s']:12,.0f} {wall_x:>12s} {cpu_x:>11s} "
                     f"{busy:>12s}")
    if _PAIRED:
        lines.append(f"alternating rounds ({PAIRS} pairs, vllm-tune asyncio vs vLLM): median paired ratio "
                     f"{_PAIRED['wall_ratio']:.2f}x wall, {_PAIRED['cpu_ratio']:.2f}x CPU")
    lines.append("wall rates include time this process waited for its CPU (other load on a shared machine); "
                 "phase wall: first send -> last completion (without process start-up); per CPU-s is the client's "
                 "own cost, worker processes included")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            for line in lines:
                reporter.write_line(line)
    else:
        for line in lines:
            reporter.write_line(line)


@pytest.fixture(scope="module")
def pinned(request: pytest.FixtureRequest) -> Any:
    """Client on one CPU, fake server (own process) on another; prints the comparison table at the end."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    _ALL_CPUS.update(cpus)
    ranked = _by_idleness(cpus)  # on a shared machine, give the client the CPU others use least
    client_cpu = ranked[0] if ranked else None
    server_cpu = ranked[1] if len(ranked) > 1 else None
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    server = FakeServer(FakeConfig(record=False), process=True, cpu=server_cpu).start()
    try:
        yield server
    finally:
        server.stop()
        if cpus:
            os.sched_setaffinity(0, set(cpus))
    _write_table(request, client_cpu, server_cpu)


# ---------------------------------------------------------------------------------------------- the clients


def _specs() -> list[RequestSpec]:
    return [RequestSpec(" ".join(["w"] * 32), None, 32, OUTPUT_TOKENS) for _ in range(N_REQUESTS)]


def _ours(server: FakeServer, use_uvloop: bool, processes: int = 1) -> Callable[[], tuple[int, float, float]]:
    """(chunks, measured-phase seconds, worker processes' CPU seconds) per round."""
    specs = _specs()

    def run() -> tuple[int, float, float]:
        res = run_load_sync([Target(server.url)], specs, Arrival(mode="concurrency", max_concurrency=CONCURRENCY),
                            model="fake", api="completions", warmup=0, timeout_s=60, use_uvloop=use_uvloop,
                            processes=processes)
        bad = [r.error for r in res.results if not r.ok]
        assert not bad, bad[:3]
        return sum(len(r.chunk_tokens) for r in res.results), res.duration_s, sum(res.worker_cpu_s)

    return run


def _vllm(server: FakeServer) -> Callable[[], int]:
    import aiohttp

    mod = _vllm_request_module()
    url = server.url + "/v1/completions"
    inputs = [
        mod.RequestFuncInput(prompt=s.prompt, api_url=url, prompt_len=s.prompt_tokens, output_len=OUTPUT_TOKENS,
                             model="fake", ignore_eos=True, extra_body={"stream_options": STREAM_OPTIONS})
        for s in _specs()
    ]

    async def drive() -> int:
        # as vllm bench serve's benchmark(): one session, its connector settings, a semaphore of max_concurrency
        connector = aiohttp.TCPConnector(limit=CONCURRENCY, limit_per_host=CONCURRENCY, ttl_dns_cache=300,
                                         use_dns_cache=True, keepalive_timeout=60, enable_cleanup_closed=True,
                                         force_close=False, ssl=False)
        session = aiohttp.ClientSession(connector=connector, trust_env=True, timeout=mod.AIOHTTP_TIMEOUT)
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def limited(inp: Any) -> Any:
            async with semaphore:
                return await mod.async_request_openai_completions(request_func_input=inp, session=session, pbar=None)

        outs = await asyncio.gather(*(limited(i) for i in inputs))
        await session.close()
        bad = [o.error for o in outs if not o.success]
        assert not bad, bad[:3]
        return sum(len(o.itl) + 1 for o in outs)

    return lambda: asyncio.run(drive())


class _Rounds:
    """Wall, client CPU (this process and any worker processes) and server CPU seconds of each round of one client,
    and for our client the measured phase's wall seconds (first send -> last completion: without process start-up)."""

    def __init__(self, server: FakeServer, run: Callable[[], int | tuple[int, float, float]]) -> None:
        self.server = server
        self.run = run
        self.wall: list[float] = []
        self.phase: list[float] = []
        self.cpu: list[float] = []
        self.server_cpu: list[float] = []

    def __call__(self) -> None:
        w0, c0, s0 = time.perf_counter(), time.process_time(), self.server.cpu_seconds()
        got = self.run()
        wall = time.perf_counter() - w0
        chunks, phase, worker_cpu = got if isinstance(got, tuple) else (got, wall, 0.0)
        self.wall.append(wall)
        self.phase.append(phase)
        self.cpu.append(time.process_time() - c0 + worker_cpu)
        s1 = self.server.cpu_seconds()
        self.server_cpu.append(s1 - s0 if s1 is not None and s0 is not None else -1.0)
        assert chunks == CHUNKS


def _median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _record(benchmark: Any, name: str, rounds: _Rounds) -> None:
    """Median (and best) over the measured rounds; the warmup round is dropped when there was more than one."""
    k = 1 if len(rounds.wall) > 1 else 0
    wall, cpu, srv = rounds.wall[k:], rounds.cpu[k:], rounds.server_cpu[k:]
    result = {
        "chunks_per_s": CHUNKS / _median(wall),
        "chunks_per_s_best": CHUNKS / min(wall),
        "chunks_per_phase_s": CHUNKS / _median(rounds.phase[k:]),
        "chunks_per_cpu_s": CHUNKS / _median(cpu),
        "server_busy": _median([s / w for s, w in zip(srv, wall)]) if min(srv) >= 0 else -1.0,
    }
    _RESULTS[name] = result
    benchmark.extra_info.update({key: round(v, 3) for key, v in result.items()})
    benchmark.extra_info.update({"chunks": CHUNKS, "requests": N_REQUESTS, "concurrency": CONCURRENCY})


# ---------------------------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_ours(benchmark: Any, pinned: FakeServer, loop: str) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    rounds = _Rounds(pinned, _ours(pinned, use_uvloop=loop == "uvloop"))
    benchmark.pedantic(rounds, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _record(benchmark, f"vllm-tune client ({loop})", rounds)


@pytest.mark.parametrize("cpus", ["client core", "all cores"])
def test_ours_two_processes(benchmark: Any, pinned: FakeServer, cpus: str) -> None:
    """processes=2 (asyncio loops, concurrency split 16 + 16): on the client's one core (workers take the caller's
    affinity), and free over every CPU, which on a 2-core machine shares the fake server's core."""
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if cpus == "all cores" and mine is not None:
        os.sched_setaffinity(0, _ALL_CPUS)
    try:
        rounds = _Rounds(pinned, _ours(pinned, use_uvloop=False, processes=2))
        benchmark.pedantic(rounds, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    finally:
        if mine is not None:
            os.sched_setaffinity(0, mine)
    _record(benchmark, f"vllm-tune, 2 processes ({cpus})", rounds)


def test_vllm_bench_serve_client(benchmark: Any, pinned: FakeServer) -> None:
    rounds = _Rounds(pinned, _vllm(pinned))
    benchmark.pedantic(rounds, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    _record(benchmark, VLLM, rounds)


def test_paired_ratio(pinned: FakeServer) -> None:
    """Alternate the two clients (order swapped every pair) and take the median of the per-pair ratios."""
    ours, theirs = _Rounds(pinned, _ours(pinned, use_uvloop=False)), _Rounds(pinned, _vllm(pinned))
    ours()  # warm both up
    theirs()
    for i in range(PAIRS):
        for client in (ours, theirs) if i % 2 == 0 else (theirs, ours):
            client()
    wall = [t / o for o, t in zip(ours.wall[1:], theirs.wall[1:])]
    cpu = [t / o for o, t in zip(ours.cpu[1:], theirs.cpu[1:])]
    _PAIRED.update({"wall_ratio": _median(wall), "cpu_ratio": _median(cpu)})
