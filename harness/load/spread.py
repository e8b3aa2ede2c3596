"""Worker processes for a load beyond one core: how many, how slots are split, one shared queue, loud failure.

One event loop parses ~300k streamed chunks per CPU second (benchmarks/README.md); a node of fast GPUs streams
more, and a client that saturates its core delays its own timestamps. `run_load(processes=N)` then runs N copies of
the client, each in its own process, on one system-wide clock (`time.perf_counter_ns`, CLOCK_MONOTONIC on Linux),
so every timestamp of every worker is comparable and the merged result is as exact as one process's.

This module holds what does not depend on the client's internals: the process context (forkserver where the
platform has it: no fork of a process that has threads, and starting a worker is a fork of a small, already
imported server), the shared request counter that deals requests in order to whichever worker has a free slot,
the split of a concurrency over workers, the `processes="auto"` estimate, and `Workers`, which relays the workers'
messages to the parent and fails loudly when one dies.
"""

from __future__ import annotations

import math
import multiprocessing
import multiprocessing.connection
import os
from collections.abc import Callable, Sequence
from typing import Any

from harness.errors import UserError
from harness.load.arrival import Arrival
from harness.load.prompts import RequestSpec

# `processes="auto"`: a third of the chunks one worker parses per CPU second (~300k measured), so each worker's event
# loop stays mostly idle and dispatches on time
CHUNKS_PER_PROCESS_S = 100_000.0
# a closed loop's chunk rate depends on the server; "auto" assumes every stream decodes this fast (a fast GPU)
STREAM_TOKENS_PER_S = 200.0
_CONTEXT_PRELOAD = ["harness.load.client"]


class WorkerFailed(RuntimeError):
    """A load worker raised or died: the run has no complete result and is void."""


def usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def resolve_processes(processes: int | str, requests: Sequence[RequestSpec], arrival: Arrival, warmup: int) -> int:
    """The worker count for `run_load(processes=...)`: an integer >= 1, or "auto" (enough workers for the expected
    chunk rate at `CHUNKS_PER_PROCESS_S` each, at most one per usable CPU). Never more workers than slots."""
    if processes == "auto":
        measured = requests[warmup:]
        tokens = sum(r.max_tokens for r in measured) / len(measured) if measured else 0.0
        if arrival.open_loop:
            assert arrival.rate is not None
            chunks_per_s = arrival.rate * tokens
            if arrival.max_concurrency is not None:
                chunks_per_s = min(chunks_per_s, arrival.max_concurrency * STREAM_TOKENS_PER_S)
        else:
            chunks_per_s = (arrival.max_concurrency or 1) * STREAM_TOKENS_PER_S
        n = min(max(1, math.ceil(chunks_per_s / CHUNKS_PER_PROCESS_S)), usable_cpus())
    elif isinstance(processes, int) and not isinstance(processes, bool) and processes >= 1:
        n = processes
    else:
        raise UserError(f"got {processes!r}; must be an integer >= 1 or 'auto'", key="processes")
    if arrival.max_concurrency is not None:
        n = min(n, arrival.max_concurrency)  # each worker holds at least one slot
    return n


def split(total: int, parts: int) -> list[int]:
    """`total` slots over `parts` workers, the remainder to the first ones (7 over 3: 3, 2, 2)."""
    return [total // parts + (1 if k < total % parts else 0) for k in range(parts)]


def context() -> multiprocessing.context.BaseContext:
    """forkserver where available (Linux), else spawn; the server preloads the client so a worker starts fast."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(_CONTEXT_PRELOAD)
        return ctx
    return multiprocessing.get_context("spawn")


class Counter:
    """The next request index, dealt in order up to a stop: in this process, or shared by worker processes (a
    lock-guarded integer in shared memory, taken once per request, never per chunk)."""

    def __init__(self, shared: Any = None) -> None:
        self.shared = shared
        self.value = 0

    def claim(self, stop: int) -> int | None:
        """The next index below `stop`, or None when none is left."""
        shared = self.shared
        if shared is None:
            i = self.value
            if i >= stop:
                return None
            self.value = i + 1
            return i
        with shared.get_lock():
            i = shared.value
            if i >= stop:
                return None
            shared.value = i + 1
            return i


class Workers:
    """N worker processes running `target(conn, *args[k])`, each with a pipe to the parent.

    Messages are `(kind, payload)` tuples; `poll` returns those that arrived as (worker, kind, payload), raises
    WorkerFailed on an `("error", traceback)` message or when a worker exits before it sent `("done", ...)`, and
    `close` (also on leaving a `with` block) terminates every worker still running, so nothing is left behind.
    """

    def __init__(self, ctx: multiprocessing.context.BaseContext, target: Callable[..., None],
                 args: Sequence[tuple[Any, ...]]) -> None:
        self.conns: list[multiprocessing.connection.Connection] = []
        self.procs: list[Any] = []
        self.done = [False] * len(args)
        try:
            for k, a in enumerate(args):
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=target, args=(child, *a), name=f"vllm-tune-load-{k}", daemon=True)
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_all(self, message: Any) -> None:
        for conn in self.conns:
            conn.send(message)

    def poll(self, timeout_s: float | None) -> list[tuple[int, str, Any]]:
        live = [k for k in range(len(self.procs)) if not self.done[k]]
        by_conn = {self.conns[k]: k for k in live}
        by_sentinel = {self.procs[k].sentinel: k for k in live}
        ready = multiprocessing.connection.wait([*by_conn, *by_sentinel], timeout_s)
        out: list[tuple[int, str, Any]] = []
        dead: list[int] = []
        for obj in ready:
            if obj in by_conn:
                k = by_conn[obj]  # type: ignore[index]
                try:
                    while obj.poll():  # type: ignore[union-attr]
                        kind, payload = obj.recv()  # type: ignore[union-attr]
                        if kind == "error":
                            raise WorkerFailed(f"load worker {k} failed:\n{payload}")
                        if kind == "done":
                            self.done[k] = True
                        out.append((k, kind, payload))
                except EOFError:
                    dead.append(k)
            else:
                dead.append(by_sentinel[obj])  # type: ignore[index]
        for k in dead:
            if not self.done[k]:
                proc = self.procs[k]
                proc.join(1.0)
                raise WorkerFailed(f"load worker {k} (pid {proc.pid}) exited with code {proc.exitcode} before it "
                                   "returned its results: the run is void")
        return out

    def gather(self, kind: str) -> list[Any]:
        """Wait for one `kind` message from every worker (nothing else may arrive meanwhile); payloads in order."""
        got: dict[int, Any] = {}
        while len(got) < len(self.procs):
            for k, kd, payload in self.poll(None):
                if kd != kind:
                    raise WorkerFailed(f"load worker {k} sent {kd!r} while {kind!r} was awaited")
                got[k] = payload
        return [got[k] for k in range(len(self.procs))]

    def close(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
