"""Async streaming client for vLLM's OpenAI-compatible server, built so that the client is never the bottleneck.

Why not aiohttp: at high chunk rates a Python client spends its time in per-chunk machinery (stream readers,
futures, string decoding, `json.loads`), and a saturated client delays the timestamps it takes, which then read as
server latency. This client is an `asyncio.Protocol` over plain keep-alive HTTP/1.1 connections: the event loop
hands each read straight to `data_received`, which takes one `time.perf_counter_ns()` stamp for the read (every
SSE event in that read arrived at that instant), undoes the chunked transfer encoding, splits SSE events on bytes
and parses each JSON payload with orjson or msgspec (stdlib json when neither is installed). No coroutine or future is touched
per chunk; one future per request at most, and in a closed loop the next request is written from the callback
that saw the previous one finish.

Per request (see `harness.records.RequestResult`):
- ttft_s: send -> the first chunk that carries output (non-empty `text` / `delta.content`, or reasoning text, or
  a continuous-usage `completion_tokens` increase: tokens that decode to "" are still tokens).
- itl_s: gap before each such chunk after the first; chunk_tokens: tokens each carried (from the
  `completion_tokens` deltas of `continuous_usage_stats` when the body asks for them (`CONTINUOUS_USAGE`), else
  1 per chunk: vLLM sends one token per chunk without speculative decoding). The default body is vLLM's own
  benchmark's (final `usage` only): per-chunk usage costs the server time it would report as our TTFT.
- e2e_s: send -> end of the HTTP response (vLLM's own client stops at its last token chunk; the usage chunk and
  `[DONE]` follow in the same flush, microseconds later).
- output_tokens / prompt_tokens: the server's final `usage`.
- ok=False with `error` on HTTP status != 200, connection errors, timeouts, an in-stream `error` object, a stream
  without `usage`, or one without any output chunk.

The send time of a request is when the client decides to send it; when no idle keep-alive connection is left the
connect time is part of its latency (as in `vllm bench serve`); a closed loop opens its connections beforehand.

Load: several `Target`s are replicas of one configuration; each request goes to the replica with the fewest
requests in flight. `run_load` runs `warmup` requests first (not measured), then the rest under the `Arrival`,
and checks itself (`ClientCheck`): a run is invalid (it measured the client, not the server) when the mean
dispatch lag reshapes an open-loop arrival process (beyond 10 ms or a tenth of the mean arrival gap), when it sent
below 95% of the schedule's rate, when the client's event-loop thread used >= 90% of a core, or when a
duration-limited run ran out of requests; an occasional late send (p99 lag > 10 ms, e.g. the OS scheduling the
client behind a busy server on a small machine) is a warning, since each latency is measured from the actual send.
Dispatch lag is the actual send time minus the scheduled one (open loop) or minus the instant the previous
request's slot freed (closed loop); time held back by a `max_concurrency` cap is not lag. No request leaves before
its scheduled instant.

Beyond one core (`processes=N` or "auto"): N worker processes run this client, each on its own event loop, on the
one system-wide monotonic clock, so every timestamp stays as exact as in one process and the results merge into
one `LoadResult` (all requests in request order, send_s from the first measured send, one self-check over all
sends; CPU summed over workers, saturation judged on the busiest). Open-loop request i is due at the shared start
instant + offset i in whichever worker sends it; a shared counter deals requests in order to whichever worker has
a free slot, and a concurrency C is split over the workers (remainder to the first), so exactly C are in flight
however long each request is. Warm-up runs in every worker before the common start; progress is merged in the
parent. A worker that raises or dies fails the run (`harness.load.spread.WorkerFailed`) and the others are stopped.
Workers are started by forkserver (spawn where there is none); a script that calls `run_load_sync(processes=...)`
needs the usual `if __name__ == "__main__":` guard.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import ssl as ssl_module
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np

from harness.errors import UserError
from harness.load.arrival import Arrival
from harness.load.prompts import RequestSpec
from harness.load.spread import Counter, Workers, context, resolve_processes, split
from harness.records import ClientCheck, RequestResult

# JSON per streamed chunk is most of the client's CPU: take the fastest parser installed. orjson or msgspec (a
# dependency of vllm, where orjson is not always) parse a chunk ~5x faster than the standard library's json.
try:
    import orjson

    _loads = orjson.loads
    _dumps = orjson.dumps
    JSON_PARSER = "orjson"
except ImportError:
    try:
        import msgspec

        _loads = msgspec.json.Decoder().decode
        _dumps = msgspec.json.Encoder().encode
        JSON_PARSER = "msgspec"
    except ImportError:  # pragma: no cover - keep the client usable with the standard library alone
        import json

        _loads = json.loads

        def _dumps(obj: Any) -> bytes:
            return json.dumps(obj, separators=(",", ":")).encode()

        JSON_PARSER = "json"


perf_ns = time.perf_counter_ns

MAX_DISPATCH_LAG_MS = 10.0
PROGRESS_INTERVAL_S = 1.0
MIN_RATE_FRACTION = 0.95
MAX_CLIENT_CPU_PERCENT = 90.0
_MAX_HEAD_BYTES = 64 * 1024
_MAX_ERROR_BODY = 2048


class Target(NamedTuple):
    """One server replica: its base URL (`http://127.0.0.1:8000`, with or without `/v1`) and API key."""

    base_url: str
    api_key: str | None = None


@dataclass
class LoadResult:
    """Every sent request's result in request order (warmup flagged; a duration-limited run may leave later
    requests unsent, and they are not listed), the measured duration and the client's self-check."""

    results: list[RequestResult]
    duration_s: float  # first measured send -> last measured completion
    client: ClientCheck
    started_at: float  # wall-clock (time.time()) of the first measured send, to line up with server samples
    t0_perf_ns: int = 0  # time.perf_counter_ns() of the first measured send: `send_s` is relative to it
    start_perf_ns: int = 0  # the instant the measured schedule counts from (open loop: request i due at + offset i)
    worker_cpu_s: list[float] = field(default_factory=list)  # CPU time of each worker process, start to end

    def measured(self) -> list[RequestResult]:
        return [r for r in self.results if not r.warmup]


@dataclass
class LoadProgress:
    """Where a measured load step stands, for a live display (`run_load(progress=...)`, about once a second).

    Counts and medians cover the measured requests only (warmup excluded); the medians are over the requests
    completed so far (None before the first), TPOT per request as in the final metrics.
    """

    elapsed_s: float  # since the measured phase began
    total_s: float | None  # the step's planned length: duration_s, or an open loop's schedule span; None if unknown
    sent: int
    completed: int  # finished OK
    failed: int
    in_flight: int
    p50_ttft_ms: float | None
    p50_tpot_ms: float | None


class _Tally:
    """Counts and latencies of the measured requests that finished (nothing per chunk). A worker process ships
    what changed since its last report (`take`) and the parent adds it up (`add`)."""

    def __init__(self) -> None:
        self.sent = 0
        self.completed = 0
        self.failed = 0
        self.ttft_ns: list[int] = []
        self.tpot_ns: list[float] = []
        self._shipped = (0, 0, 0, 0, 0)

    def finished(self, req: _Req) -> None:
        times = req.times
        if req.error is None and req.usage is not None and times:
            self.completed += 1
            self.ttft_ns.append(times[0] - req.send_ns)
            n_out = int(req.usage.get("completion_tokens") or 0)
            if n_out > 1:
                self.tpot_ns.append((req.end_ns - times[0]) / (n_out - 1))
        else:
            self.failed += 1

    def take(self) -> tuple[int, int, int, list[int], list[float]]:
        """What changed since the last `take`: counts and the new latency samples."""
        s, c, f, a, b = self._shipped
        out = (self.sent - s, self.completed - c, self.failed - f, self.ttft_ns[a:], self.tpot_ns[b:])
        self._shipped = (self.sent, self.completed, self.failed, len(self.ttft_ns), len(self.tpot_ns))
        return out

    def add(self, delta: tuple[int, int, int, list[int], list[float]]) -> None:
        self.sent += delta[0]
        self.completed += delta[1]
        self.failed += delta[2]
        self.ttft_ns.extend(delta[3])
        self.tpot_ns.extend(delta[4])

    def progress(self, elapsed_s: float, total_s: float | None) -> LoadProgress:
        ttft = float(np.median(self.ttft_ns)) / 1e6 if self.ttft_ns else None
        tpot = float(np.median(self.tpot_ns)) / 1e6 if self.tpot_ns else None
        done = self.completed + self.failed
        return LoadProgress(elapsed_s=elapsed_s, total_s=total_s, sent=self.sent, completed=self.completed,
                            failed=self.failed, in_flight=self.sent - done, p50_ttft_ms=ttft, p50_tpot_ms=tpot)


class _Ticker:
    """Calls `fn` every `interval_s` on the running loop until stopped."""

    def __init__(self, fn: Callable[[], None], interval_s: float) -> None:
        self.fn = fn
        self.interval_s = interval_s
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = self.loop.call_later(interval_s, self._tick)

    def _tick(self) -> None:
        self.timer = self.loop.call_later(self.interval_s, self._tick)
        self.fn()

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


# ---------------------------------------------------------------------------------------------- HTTP plumbing


class _Endpoint:
    """One target: address, pre-built request head, idle keep-alive connections, requests in flight."""

    def __init__(self, index: int, target: Target, api: str) -> None:
        parts = urlsplit(target.base_url if "://" in target.base_url else "http://" + target.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UserError(f"got {target.base_url!r}; expected http://host:port", key="base_url")
        self.index = index
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl_module.SSLContext | None = ssl_module.create_default_context() if parts.scheme == "https" else None
        path = parts.path.rstrip("/")
        if not path.endswith("/v1"):
            path += "/v1"
        path += "/chat/completions" if api == "chat" else "/completions"
        host_header = self.host if parts.port is None else f"{self.host}:{parts.port}"
        lines = [
            f"POST {path} HTTP/1.1",
            f"Host: {host_header}",
            "User-Agent: vllm-tune",
            "Accept: text/event-stream",
            "Content-Type: application/json",
            "Connection: keep-alive",
        ]
        if target.api_key:
            lines.append(f"Authorization: Bearer {target.api_key}")
        self.head = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self.idle: list[_Conn] = []
        self.outstanding = 0
        self.assigned = 0


class _Req:
    """One request in flight: its timestamps and what the stream has said so far."""

    __slots__ = (
        "idx", "body", "warmup", "sched_ns", "send_ns", "end_ns", "ep", "conn", "timer", "times", "toks",
        "last_ct", "usage", "error", "finished", "retried", "status", "got_bytes",
    )

    def __init__(self, idx: int, body: bytes, warmup: bool) -> None:
        self.idx = idx
        self.body = body
        self.warmup = warmup
        self.sched_ns = 0
        self.send_ns = 0
        self.end_ns = 0
        self.ep: _Endpoint | None = None
        self.conn: _Conn | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.times: list[int] = []  # perf_counter_ns of each output chunk
        self.toks: list[int] = []  # tokens each output chunk carried (continuous usage), -1 when unknown
        self.last_ct = 0
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None
        self.finished = False
        self.retried = False
        self.status = 0
        self.got_bytes = False


_HEAD, _CHUNKED, _LENGTH, _UNTIL_CLOSE = range(4)
# chunked sub-states (values of _Conn.crem when not reading chunk data)
_SIZE, _CRLF, _TRAILER = 0, -1, -2


class _Conn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection running one request at a time; the per-read hot path lives here."""

    def __init__(self, run: _Run, ep: _Endpoint) -> None:
        self.run = run
        self.ep = ep
        self.chat = run.chat
        self.transport: asyncio.Transport | None = None
        self.req: _Req | None = None
        self.closed = False
        self.used = False
        self._reset()

    def _reset(self) -> None:
        self.state = _HEAD
        self.hbuf = b""
        self.cbuf = b""
        self.crem = _SIZE
        self.left = 0
        self.sse = b""
        self.errbody = b""
        self.keep_alive = True

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        try:
            self.ep.idle.remove(self)
        except ValueError:
            pass
        req = self.req
        if req is None or req.finished:
            return
        self.req = None
        if self.state == _UNTIL_CLOSE and exc is None:
            self._complete(req, perf_ns())
            return
        if not req.got_bytes and self.used and not req.retried:
            # a reused keep-alive connection the server had closed: send again on a fresh one (send time kept)
            req.retried = True
            self.run.resend(req)
            return
        req.error = f"connection lost: {exc}" if exc else "connection closed by the server before the response ended"
        self.run.finish(req, perf_ns())

    def eof_received(self) -> bool:
        return False

    def send(self, req: _Req) -> None:
        self.req = req
        req.conn = self
        self._reset()
        body = req.body
        assert self.transport is not None
        self.transport.write(b"%b%d\r\n\r\n%b" % (self.ep.head, len(body), body))

    def data_received(self, data: bytes) -> None:
        ts = perf_ns()
        req = self.req
        if req is None or req.finished:
            if self.transport is not None:
                self.transport.abort()  # bytes nobody asked for: the connection is unusable
            return
        req.got_bytes = True
        state = self.state
        if state == _HEAD:
            data = self._head(data, req)
            if data is None:
                return
            state = self.state
        if state == _CHUNKED:
            payload, done = self._dechunk(data)
        elif state == _LENGTH:
            if len(data) >= self.left:
                payload, done = data[: self.left], True
            else:
                payload, done = data, False
            self.left -= len(payload)
        else:
            payload, done = data, False
        if payload:
            if req.status == 200:
                self._events(payload, ts, req)
            elif len(self.errbody) < _MAX_ERROR_BODY:
                self.errbody += payload
        if done:
            self._complete(req, ts)

    # -- parsing
    def _head(self, data: bytes, req: _Req) -> bytes | None:
        buf = self.hbuf + data if self.hbuf else data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > _MAX_HEAD_BYTES:
                self._fail(req, "response head too large")
            else:
                self.hbuf = buf
            return None
        lines = buf[:end].decode("latin-1").split("\r\n")
        rest = buf[end + 4 :]
        self.hbuf = b""
        try:
            version, code = lines[0].split(" ", 2)[:2]
            status = int(code)
        except ValueError:
            self._fail(req, f"bad HTTP status line {lines[0][:80]!r}")
            return None
        if 100 <= status < 200:  # interim response: the real head follows
            return self._head(rest, req) if rest else None
        headers = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
        req.status = status
        connection = headers.get("connection", "").lower()
        self.keep_alive = connection != "close" and (version != "HTTP/1.0" or connection == "keep-alive")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = _CHUNKED
        elif "content-length" in headers:
            self.state = _LENGTH
            self.left = int(headers["content-length"])
            if self.left == 0:
                self._complete(req, perf_ns())
                return None
        else:
            self.state = _UNTIL_CLOSE
            self.keep_alive = False
        return rest

    def _dechunk(self, data: bytes) -> tuple[bytes, bool]:
        """Undo chunked transfer encoding on what has arrived; returns (payload, response finished)."""
        buf = self.cbuf + data if self.cbuf else data
        n = len(buf)
        pos = 0
        rem = self.crem
        out = []
        find = buf.find
        while pos < n:
            if rem == _SIZE:
                eol = find(b"\r\n", pos)
                if eol < 0:
                    break
                try:
                    size = int(buf[pos:eol], 16)
                except ValueError:  # chunk extensions: "size;name=value"
                    size = int(buf[pos:eol].split(b";", 1)[0], 16)
                pos = eol + 2
                if size == 0:
                    rem = _TRAILER
                    continue
                end = pos + size
                if end + 2 <= n:  # the whole chunk and its CRLF are here: the common case, one step
                    out.append(buf[pos:end])
                    pos = end + 2
                else:
                    rem = size
            elif rem > 0:  # inside chunk data
                end = pos + rem
                if end <= n:
                    out.append(buf[pos:end])
                    pos = end
                    rem = _CRLF
                else:
                    out.append(buf[pos:])
                    rem -= n - pos
                    pos = n
            elif rem == _CRLF:
                if n - pos < 2:
                    break
                pos += 2
                rem = _SIZE
            else:  # trailer section after the last chunk: ends with an empty line
                if buf.startswith(b"\r\n", pos) or find(b"\r\n\r\n", pos) >= 0:
                    self.cbuf = b""
                    self.crem = _SIZE
                    return b"".join(out), True
                break
        self.cbuf = buf[pos:] if pos < n else b""
        self.crem = rem
        if len(out) == 1:
            return out[0], False
        return b"".join(out), False

    def _events(self, payload: bytes, ts: int, req: _Req) -> None:
        """Split SSE events and record output chunks; the one place that runs per streamed chunk."""
        buf = self.sse + payload if self.sse else payload
        if b"\r" in buf:
            buf = buf.replace(b"\r\n", b"\n")
        start = 0
        chat = self.chat
        find = buf.find
        startswith = buf.startswith
        times = req.times
        toks = req.toks
        while True:
            j = find(b"\n\n", start)
            if j < 0:
                break
            if startswith(b"data: ", start):
                data = buf[start + 6 : j]
            else:
                data = _event_data(buf[start:j])
                if data is None:
                    start = j + 2
                    continue
            start = j + 2
            if data == b"[DONE]":
                continue
            try:
                obj = _loads(data)
            except ValueError:  # msgspec.DecodeError and orjson.JSONDecodeError are ValueErrors
                req.error = f"unparseable stream event: {data[:120]!r}"
                continue
            usage = obj.get("usage")
            choices = obj.get("choices")
            if choices:
                c0 = choices[0]
                if chat:
                    delta = c0.get("delta")
                    text = (delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")) if delta else None
                else:
                    text = c0.get("text")
                if usage:
                    req.usage = usage
                    ct = usage.get("completion_tokens") or 0
                    carried = ct - req.last_ct
                    if text or carried > 0:
                        times.append(ts)
                        toks.append(carried)
                        req.last_ct = ct
                elif text or not chat:
                    # without per-chunk usage a completions chunk is a token chunk even when its text is empty (a
                    # token that decodes to ""), as vLLM sends none without tokens; a chat delta without content
                    # is the role chunk
                    times.append(ts)
                    toks.append(-1)
            elif usage:
                req.usage = usage
            else:
                err = obj.get("error")
                if err:
                    msg = err.get("message", err) if isinstance(err, dict) else err
                    req.error = f"server error in stream: {str(msg)[:300]}"
        self.sse = buf[start:] if start < len(buf) else b""

    # -- endings
    def _complete(self, req: _Req, ts: int) -> None:
        if req.status != 200:
            text = self.errbody[:_MAX_ERROR_BODY].decode("utf-8", "replace").strip().replace("\n", " ")
            req.error = f"HTTP {req.status}: {text[:300]}"
        elif self.sse.strip():
            tail = self.sse
            self.sse = b""
            self._events(tail + b"\n\n", ts, req)
        self.req = None
        self.used = True  # has served a request: if the server closes it while idle, a resend is safe
        if self.keep_alive and not self.cbuf and not self.closed:
            self.ep.idle.append(self)  # before finish(): a closed loop sends its next request on this connection
        elif self.transport is not None and not self.closed:
            self.transport.close()
        self.run.finish(req, ts)

    def _fail(self, req: _Req, error: str) -> None:
        req.error = error
        self.req = None
        if self.transport is not None:
            self.transport.abort()
        self.run.finish(req, perf_ns())

    def abort(self) -> None:
        self.req = None
        if self.transport is not None:
            self.transport.abort()


def _event_data(ev: bytes) -> bytes | None:
    """The data of an SSE event that is not a single `data: ` line (comments, `event:` lines, multi-line data)."""
    parts = []
    for line in ev.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            parts.append(value[1:] if value.startswith(b" ") else value)
    if not parts:
        return None
    return b"\n".join(parts)


# ---------------------------------------------------------------------------------------------- the run


class _Run:
    """Dispatches requests over endpoints under an arrival process and collects results (one process's share).

    Request indices come from a `Counter`: this process's own, or one shared by worker processes, so that requests
    go out in order to whichever process has a free slot (`harness.load.spread`).
    """

    def __init__(self, targets: list[Target], bodies: list[bytes], warmup: int, *, chat: bool, timeout_s: float,
                 counter: Counter) -> None:
        self.loop = asyncio.get_running_loop()
        self.chat = chat
        self.timeout_s = timeout_s
        self.eps = [_Endpoint(i, t, "chat" if chat else "completions") for i, t in enumerate(targets)]
        self.reqs = [_Req(i, body, i < warmup) for i, body in enumerate(bodies)]
        self.counter = counter
        self.outstanding = 0
        self.phase_done: asyncio.Future[None] | None = None
        self.slot_free: asyncio.Future[None] | None = None
        self.stop_idx = 0
        self.drained = False  # this phase has nothing more for this process to send
        self.closed_loop_slots = 0
        self.deadline_ns: int | None = None
        self.exhausted = False
        self.cap_waits = 0
        self.tally: _Tally | None = None  # set for the measured phase when progress is reported

    # -- dispatch
    def _pick(self) -> _Endpoint:
        eps = self.eps
        if len(eps) == 1:
            return eps[0]
        return min(eps, key=lambda e: (e.outstanding, e.assigned))

    def dispatch(self, req: _Req, sched_ns: int) -> None:
        ep = self._pick()
        ep.outstanding += 1
        ep.assigned += 1
        self.outstanding += 1
        req.ep = ep
        req.sched_ns = sched_ns
        req.send_ns = perf_ns()
        req.timer = self.loop.call_later(self.timeout_s, self._timeout, req)
        if self.tally is not None and not req.warmup:
            self.tally.sent += 1
        self._send(ep, req)

    def _send(self, ep: _Endpoint, req: _Req) -> None:
        while ep.idle:
            conn = ep.idle.pop()
            if not conn.closed:
                conn.send(req)
                return
        self.loop.create_task(self._connect_and_send(ep, req))

    def resend(self, req: _Req) -> None:
        assert req.ep is not None
        self.loop.create_task(self._connect_and_send(req.ep, req))

    async def _connect_and_send(self, ep: _Endpoint, req: _Req) -> None:
        try:
            _, conn = await self.loop.create_connection(lambda: _Conn(self, ep), ep.host, ep.port, ssl=ep.ssl)
        except OSError as exc:
            if not req.finished:
                req.error = f"connection error: {exc}"
                self.finish(req, perf_ns())
            return
        if req.finished:  # timed out while connecting
            ep.idle.append(conn)
        else:
            conn.send(req)

    async def open_connections(self, per_endpoint: int) -> None:
        """Open keep-alive connections ahead of a closed loop, so no measured request pays a connect."""

        async def one(ep: _Endpoint) -> None:
            try:
                _, conn = await self.loop.create_connection(lambda: _Conn(self, ep), ep.host, ep.port, ssl=ep.ssl)
            except OSError:
                return  # the requests will report the error
            ep.idle.append(conn)

        tasks = [one(ep) for ep in self.eps for _ in range(max(0, per_endpoint - len(ep.idle)))]
        if tasks:
            await asyncio.gather(*tasks)

    def _timeout(self, req: _Req) -> None:
        if req.finished:
            return
        req.error = f"timeout after {self.timeout_s:g} s"
        if req.conn is not None and req.conn.req is req:
            req.conn.abort()
        self.finish(req, perf_ns())

    def finish(self, req: _Req, ts: int) -> None:
        if req.finished:
            return
        req.finished = True
        req.end_ns = ts
        if req.timer is not None:
            req.timer.cancel()
        assert req.ep is not None
        req.ep.outstanding -= 1
        self.outstanding -= 1
        if self.tally is not None and not req.warmup:
            self.tally.finished(req)
        if self.closed_loop_slots:
            self._next_closed(ts)
        elif self.slot_free is not None and not self.slot_free.done():
            self.slot_free.set_result(None)
        if self.outstanding == 0 and self.drained and self.phase_done is not None and not self.phase_done.done():
            self.phase_done.set_result(None)

    # -- phases
    async def warm(self, warmup: int, slots: int) -> None:
        """Unmeasured requests 0..warmup-1: a closed loop at `slots` (this process's share), as vllm bench serve."""
        if warmup and slots:
            await self.open_connections(math.ceil(slots / len(self.eps)))
            await self.closed_loop(warmup, slots, perf_ns(), None)

    async def measure(self, arrival: Arrival, start: int, stop: int, offsets: np.ndarray, slots: int | None,
                      start_ns: int) -> None:
        """Requests start..stop-1 under `arrival` from `start_ns` on: an open loop sends request i at
        start_ns + offsets[i - start] (at most `slots` of this process's in flight when capped), a closed loop keeps
        `slots` in flight until `arrival.duration_s` after `start_ns`."""
        if arrival.open_loop:
            due_ns = (start_ns + np.rint(offsets * 1e9)).astype(np.int64).tolist()
            await self.open_loop(start, stop, due_ns, slots)
        else:
            assert slots is not None
            deadline = start_ns + int(arrival.duration_s * 1e9) if arrival.duration_s else None
            await self.closed_loop(stop, slots, start_ns, deadline)

    def close(self) -> None:
        """Close idle connections; abort what is still in flight (a cancelled run)."""
        for ep in self.eps:
            for conn in list(ep.idle):
                if conn.transport is not None:
                    conn.transport.close()
            ep.idle.clear()
        for req in self.reqs:
            if req.send_ns and not req.finished:
                req.error = req.error or "run cancelled"
                if req.conn is not None:
                    req.conn.abort()
                req.finished = True

    def sent(self) -> list[_Sent]:
        """Every request this process sent, with its raw clock readings (send_s is filled in by `_load_result`)."""
        return [_Sent(r.idx, r.send_ns, r.sched_ns, r.end_ns, _result(r, r.send_ns)) for r in self.reqs if r.send_ns]

    # -- closed loop
    def _next_closed(self, ts: int) -> None:
        if self.drained:
            return
        if self.deadline_ns is not None and ts >= self.deadline_ns:
            self.drained = True  # duration reached: send nothing more
            return
        i = self.counter.claim(self.stop_idx)
        if i is None:
            self.drained = True
            if self.deadline_ns is not None:
                self.exhausted = True  # a slot freed before duration_s with nothing left to send
            return
        self.dispatch(self.reqs[i], ts)

    async def closed_loop(self, stop: int, slots: int, start_ns: int, deadline_ns: int | None) -> None:
        self.stop_idx = stop
        self.drained = False
        self.closed_loop_slots = slots
        self.phase_done = self.loop.create_future()
        self.deadline_ns = deadline_ns
        try:
            await _sleep_until(start_ns)  # the start instant every worker process shares
            for _ in range(slots):
                i = self.counter.claim(stop)
                if i is None:
                    self.drained = True
                    break
                self.dispatch(self.reqs[i], start_ns)
            if self.outstanding:
                await self.phase_done
        finally:
            self.closed_loop_slots = 0
            self.deadline_ns = None

    # -- open loop
    async def open_loop(self, start: int, stop: int, due_ns: list[int], cap: int | None) -> None:
        self.stop_idx = stop
        self.drained = False
        self.phase_done = self.loop.create_future()
        burst = 0
        held = 0  # when a request held back by the concurrency cap could go: what it and any backlog count lag from
        while True:
            freed = 0
            if cap is not None and self.outstanding >= cap:
                while self.outstanding >= cap:
                    self.slot_free = self.loop.create_future()
                    await self.slot_free
                freed = perf_ns()
            # a free slot first, then the next request: with worker processes, the next request goes to the one
            # with a free slot, so a cap split over them holds back a request only when every slot is taken
            i = self.counter.claim(stop)
            if i is None:
                break
            due = due_ns[i - start]
            if freed > due:
                self.cap_waits += 1
                held = freed
            now = perf_ns()
            if due > now:
                burst = 0
                await _sleep_until(due)
            elif burst >= 32:
                burst = 0
                await asyncio.sleep(0)  # let reads run during a catch-up burst
            burst += 1
            # time held back by the cap (this request's or an earlier one's) is not dispatch lag
            self.dispatch(self.reqs[i], max(due, held))
        self.drained = True
        if self.outstanding:
            await self.phase_done


async def _sleep_until(deadline_ns: int) -> None:
    """Sleep until `perf_counter_ns() >= deadline_ns`: never send before the schedule (uvloop timers round to
    whole milliseconds and may fire up to 1 ms early, so the remainder is slept again)."""
    while True:
        left = deadline_ns - perf_ns()
        if left <= 0:
            return
        await asyncio.sleep(left / 1e9)


class _Sent(NamedTuple):
    """One sent request as a process reports it: its index, raw monotonic-clock readings and its result."""

    idx: int
    send_ns: int
    sched_ns: int
    end_ns: int
    result: RequestResult


# Per-chunk token counts (`chunk_tokens`) from the server, as an extra body. Not the default: on one H200 (Mistral-7B,
# 12 req/s, identical requests) asking for them raised mean TTFT ~10% and TPOT ~2% against the same body without
# them, which is `vllm bench serve`'s body (docs/gpu-results.md, "Our client vs vllm bench serve").
CONTINUOUS_USAGE: dict[str, Any] = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}


def _body(spec: RequestSpec, model: str, api: str, extra: dict[str, Any] | None) -> bytes:
    """The JSON body, serialized once before the run so dispatch only writes bytes."""
    payload: dict[str, Any] = {"model": model}
    if api == "chat":
        if spec.messages is None:
            raise UserError("api chat needs requests built with messages (workload api: chat)", key="api")
        payload["messages"] = spec.messages
        payload["max_completion_tokens"] = spec.max_tokens
    else:
        if spec.prompt is None:
            raise UserError("api completions needs requests built with a prompt (workload api: completions)", key="api")
        payload["prompt"] = spec.prompt
        payload["max_tokens"] = spec.max_tokens
    payload["stream"] = True
    payload["stream_options"] = {"include_usage": True}  # CONTINUOUS_USAGE (extra body) for per-chunk counts
    payload["ignore_eos"] = spec.ignore_eos
    if extra:
        payload.update(extra)
    return _dumps(payload)


def _raise_fd_limit() -> None:
    """An open loop past saturation holds one socket per request in flight; allow as many as the system does."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


# ---------------------------------------------------------------------------------------------- public


async def run_load(
    targets: list[Target] | list[tuple[str, str | None]],
    requests: list[RequestSpec],
    arrival: Arrival,
    *,
    model: str,
    api: str,
    warmup: int,
    timeout_s: float,
    extra_body: dict[str, Any] | None = None,
    progress: Callable[[LoadProgress], None] | None = None,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
    processes: int | str = 1,
) -> LoadResult:
    """Send `requests` to `targets` (replicas of one config): the first `warmup` unmeasured, the rest under `arrival`.

    `timeout_s` bounds each request (send -> end of stream). A duration-limited run stops sending at
    `arrival.duration_s` and waits for the requests in flight. `extra_body` adds fields to every request body.
    `progress` is called on the event loop every `progress_interval_s` of the measured phase and once at its end
    with a `LoadProgress`; it must return quickly (it runs between reads, like the client itself).

    `processes` > 1 (or "auto": enough for the expected chunk rate, `harness.load.spread`) runs the load in that
    many worker processes with one merged result: one schedule on one clock, one queue of requests, the
    concurrency split over the workers (see `_run_spread`). This coroutine then waits in a thread.
    """
    n = resolve_processes(processes, requests, arrival, warmup)
    bodies = _prepare(targets, requests, model=model, api=api, warmup=warmup, timeout_s=timeout_s,
                      extra_body=extra_body)
    tgts = [Target(*t) for t in targets]
    if n > 1:
        loop = asyncio.get_running_loop()
        relay = None if progress is None else (lambda p: loop.call_soon_threadsafe(progress, p))
        return await asyncio.to_thread(_run_spread, n, tgts, bodies, arrival, chat=api == "chat", warmup=warmup,
                                       timeout_s=timeout_s, progress=relay, progress_interval_s=progress_interval_s,
                                       use_uvloop=True)
    return await _run_here(tgts, bodies, arrival, chat=api == "chat", warmup=warmup, timeout_s=timeout_s,
                           progress=progress, progress_interval_s=progress_interval_s)


def run_load_sync(
    targets: list[Target] | list[tuple[str, str | None]],
    requests: list[RequestSpec],
    arrival: Arrival,
    *,
    model: str,
    api: str,
    warmup: int,
    timeout_s: float,
    extra_body: dict[str, Any] | None = None,
    use_uvloop: bool = True,
    progress: Callable[[LoadProgress], None] | None = None,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
    processes: int | str = 1,
) -> LoadResult:
    """`run_load` on a fresh event loop (uvloop when installed: lower dispatch lag and per-read cost), or, with
    `processes` > 1, in worker processes (each on its own loop), `progress` then called from this thread."""
    n = resolve_processes(processes, requests, arrival, warmup)
    if n > 1:
        bodies = _prepare(targets, requests, model=model, api=api, warmup=warmup, timeout_s=timeout_s,
                          extra_body=extra_body)
        return _run_spread(n, [Target(*t) for t in targets], bodies, arrival, chat=api == "chat", warmup=warmup,
                           timeout_s=timeout_s, progress=progress, progress_interval_s=progress_interval_s,
                           use_uvloop=use_uvloop)
    box: list[LoadResult] = []

    async def main() -> None:
        # the result leaves through `box`, not as the task's result: asyncio.Runner's SIGINT-handler cleanup can
        # repr the main task, result included, which for a large run (every request's ITL list) takes seconds
        box.append(
            await run_load(
                targets, requests, arrival, model=model, api=api, warmup=warmup, timeout_s=timeout_s,
                extra_body=extra_body, progress=progress, progress_interval_s=progress_interval_s,
            )
        )

    with asyncio.Runner(loop_factory=_loop_factory(use_uvloop)) as runner:
        runner.run(main())
    return box[0]


def _loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if use_uvloop:
        try:
            import uvloop

            return uvloop.new_event_loop
        except ImportError:
            pass
    return None


def _prepare(targets: list[Target] | list[tuple[str, str | None]], requests: list[RequestSpec], *, model: str,
             api: str, warmup: int, timeout_s: float, extra_body: dict[str, Any] | None) -> list[bytes]:
    """Check the arguments (before any process starts) and serialize every request body once."""
    if api not in ("completions", "chat"):
        raise UserError(f"got {api!r}; allowed values: completions, chat", key="api")
    if not targets:
        raise ValueError("run_load needs at least one target")
    if warmup < 0 or warmup > len(requests):
        raise ValueError(f"warmup={warmup} must be between 0 and the number of requests ({len(requests)})")
    if not timeout_s > 0:
        raise ValueError("timeout_s must be > 0")
    for i, t in enumerate(targets):
        _Endpoint(i, Target(*t), api)  # a bad URL is a UserError now, not in a worker
    return [_body(spec, model, api, extra_body) for spec in requests]


class _Plan(NamedTuple):
    """The measured phase: requests start..stop-1, open-loop offsets (zeros: none), its planned length, and
    whether a duration-limited schedule wanted more requests than were built."""

    start: int
    stop: int
    offsets: np.ndarray
    total_s: float | None
    exhausted: bool


def _plan(arrival: Arrival, n_total: int, warmup: int) -> _Plan:
    measured_n = n_total - warmup
    if arrival.num_requests is not None:
        measured_n = min(measured_n, arrival.num_requests)
    offsets = np.zeros(0)
    exhausted = False
    total_s = arrival.duration_s
    if arrival.open_loop and measured_n > 0:
        offsets = arrival.schedule(measured_n)
        total_s = arrival.duration_s or (float(offsets[-1]) if len(offsets) else 0.0)
        if arrival.duration_s is not None and len(offsets) == measured_n:
            exhausted = len(arrival.schedule(measured_n + 1)) > measured_n  # the schedule wanted more
    stop = warmup + (len(offsets) if arrival.open_loop else measured_n)
    return _Plan(warmup, stop, offsets, total_s, exhausted)


def _slots(arrival: Arrival) -> int | None:
    """Measured requests in flight at most: a closed loop's concurrency, an open loop's cap (None: uncapped)."""
    return arrival.max_concurrency or (None if arrival.open_loop else 1)


def _warm_slots(arrival: Arrival, warmup: int) -> int:
    # warmup: closed loop at the run's concurrency (all at once when uncapped), as vllm bench serve does
    return min(warmup, arrival.max_concurrency or warmup)


async def _run_here(targets: list[Target], bodies: list[bytes], arrival: Arrival, *, chat: bool, warmup: int,
                    timeout_s: float, progress: Callable[[LoadProgress], None] | None,
                    progress_interval_s: float) -> LoadResult:
    """The whole load in this process, on the running loop."""
    _raise_fd_limit()
    run = _Run(targets, bodies, warmup, chat=chat, timeout_s=timeout_s, counter=Counter())
    plan = _plan(arrival, len(bodies), warmup)
    slots = _slots(arrival)
    ticker: _Ticker | None = None
    try:
        await run.warm(warmup, _warm_slots(arrival, warmup))
        if not arrival.open_loop:
            await run.open_connections(math.ceil((slots or 1) / len(run.eps)))
        wall0 = time.time()
        cpu0 = time.thread_time()
        t_start = perf_ns()
        if progress is not None:
            tally = run.tally = _Tally()
            ticker = _Ticker(lambda: progress(tally.progress((perf_ns() - t_start) / 1e9, plan.total_s)),
                             progress_interval_s)
        if plan.stop > plan.start:
            await run.measure(arrival, plan.start, plan.stop, plan.offsets, slots, t_start)
        t_end = perf_ns()
        cpu_s = time.thread_time() - cpu0
        if ticker is not None:
            ticker.stop()
            ticker.fn()  # the final state
    finally:
        if ticker is not None:
            ticker.stop()
        run.close()
    return _load_result(run.sent(), plan, arrival, [cpu_s], run.cap_waits, run.exhausted, t_start, t_end,
                        wall0)


# ---------------------------------------------------------------------------------------------- worker processes

# how far ahead of "now" the parent puts the start instant, so every worker is awake and waiting when it comes
_START_LEAD_S = 0.1


class _Job(NamedTuple):
    """What one worker process runs (pickled to it): every request body (any of them may become its turn) and
    its share of the slots."""

    targets: list[Target]
    bodies: list[bytes]
    arrival: Arrival
    chat: bool
    warmup: int
    timeout_s: float
    warm_slots: int
    slots: int | None
    progress_interval_s: float | None
    use_uvloop: bool
    cpus: set[int] | None  # the caller's CPU affinity: workers run where the caller may run
    plan: _Plan


class _Done(NamedTuple):
    """What a worker sends back: its requests, its event loop's CPU seconds over the measured phase, cap waits,
    whether it ran out of requests, when its measured phase ended, and its whole process's CPU seconds."""

    sent: list[_Sent]
    loop_cpu_s: float
    cap_waits: int
    exhausted: bool
    end_ns: int
    process_cpu_s: float


def _run_spread(n: int, targets: list[Target], bodies: list[bytes], arrival: Arrival, *, chat: bool, warmup: int,
                timeout_s: float, progress: Callable[[LoadProgress], None] | None, progress_interval_s: float,
                use_uvloop: bool) -> LoadResult:
    """The load in `n` worker processes, merged.

    - Schedule: the parent draws the open-loop offsets once; every worker counts them from one start instant on
      the system-wide monotonic clock, so request i is due at start + offsets[i] whichever process sends it.
    - Requests: one shared counter deals them in order to whichever worker has a free slot (`spread.Counter`);
      each is sent exactly once.
    - Concurrency: a closed loop's C (an open loop's cap, the warm-up's slots) is split over the workers,
      remainder to the first ones; since a worker takes the next request from the shared queue whenever one of its
      slots frees, exactly C are in flight until the queue runs dry, however long each request is, as in one
      process (a static split of the requests would leave a worker idle while another still had long ones).
    - Warm-up: each worker runs its share and the measured phase starts only when all are done.
    - Progress: workers ship their counts and new latencies every interval; the parent adds them up and reports.
    - Result: all requests in request order on the one clock, send_s from the first measured send, duration over
      the whole run, the self-check over all sends; CPU is the sum over workers, and the busiest worker's loop
      decides whether the client was saturated.
    """
    plan = _plan(arrival, len(bodies), warmup)
    slots = _slots(arrival)
    warm = split(_warm_slots(arrival, warmup), n)
    shares: list[int | None] = [None] * n if slots is None else split(slots, n)  # type: ignore[list-item]
    ctx = context()
    shared = ctx.Value("q", 0)
    interval = progress_interval_s if progress is not None else None
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    jobs = [(_Job(targets, bodies, arrival, chat, warmup, timeout_s, warm[k], shares[k], interval, use_uvloop, cpus,
                  plan), shared) for k in range(n)]
    tally = _Tally()
    with Workers(ctx, _worker, jobs) as workers:
        workers.gather("ready")
        now = perf_ns()
        wall0 = time.time() + _START_LEAD_S
        t_start = now + int(_START_LEAD_S * 1e9)
        workers.send_all(("go", t_start))
        done: dict[int, _Done] = {}
        next_tick = t_start + int(progress_interval_s * 1e9)
        while len(done) < n:
            wait_s = max(0.0, (next_tick - perf_ns()) / 1e9) if progress is not None else None
            for k, kind, payload in workers.poll(wait_s):
                if kind == "tally":
                    tally.add(payload)
                elif kind == "done":
                    done[k] = payload
            if progress is not None and perf_ns() >= next_tick:
                next_tick += int(progress_interval_s * 1e9)
                progress(tally.progress(max(0.0, (perf_ns() - t_start) / 1e9), plan.total_s))
    parts = [done[k] for k in range(n)]
    t_end = max(d.end_ns for d in parts)
    if progress is not None:
        progress(tally.progress((t_end - t_start) / 1e9, plan.total_s))  # the final state
    sent = sorted((s for d in parts for s in d.sent), key=lambda s: s.idx)
    result = _load_result(sent, plan, arrival, [d.loop_cpu_s for d in parts], sum(d.cap_waits for d in parts),
                          any(d.exhausted for d in parts), t_start, t_end, wall0)
    result.worker_cpu_s = [d.process_cpu_s for d in parts]
    return result


def _worker(conn: Any, job: _Job, shared: Any) -> None:
    """One worker process: warm up its share, say ready, wait for the start instant, run, send back what it sent."""
    try:
        if job.cpus is not None:
            os.sched_setaffinity(0, job.cpus)  # a forkserver started earlier may have had another affinity
        _raise_fd_limit()
        box: list[Any] = []
        with asyncio.Runner(loop_factory=_loop_factory(job.use_uvloop)) as runner:
            runner.run(_work(conn, job, shared, box))
        conn.send(("done", box[0]._replace(process_cpu_s=time.process_time())))
    except BaseException:  # noqa: BLE001 - everything goes to the parent, which fails the run
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass


async def _work(conn: Any, job: _Job, shared: Any, box: list[_Done]) -> None:
    plan = job.plan
    run = _Run(job.targets, job.bodies, job.warmup, chat=job.chat, timeout_s=job.timeout_s, counter=Counter(shared))
    ticker: _Ticker | None = None
    try:
        await run.warm(job.warmup, job.warm_slots)
        if not job.arrival.open_loop:
            await run.open_connections(math.ceil((job.slots or 1) / len(run.eps)))
        conn.send(("ready", None))
        _, start_ns = conn.recv()  # blocks this loop, which has nothing else to do before the start
        tally = run.tally = _Tally() if job.progress_interval_s is not None else None
        if tally is not None:
            ticker = _Ticker(lambda: conn.send(("tally", tally.take())), job.progress_interval_s)
        cpu0 = time.thread_time()
        if plan.stop > plan.start:
            await run.measure(job.arrival, plan.start, plan.stop, plan.offsets, job.slots, start_ns)
        end_ns = perf_ns()
        cpu_s = time.thread_time() - cpu0
        if ticker is not None:
            ticker.stop()
            ticker.fn()
    finally:
        if ticker is not None:
            ticker.stop()
        run.close()
    box.append(_Done(run.sent(), cpu_s, run.cap_waits, run.exhausted, end_ns, 0.0))


# ---------------------------------------------------------------------------------------------- results


def _result(req: _Req, t0: int) -> RequestResult:
    send = req.send_ns
    usage = req.usage or {}
    error = req.error
    times = req.times
    if error is None:
        if req.usage is None:
            error = "stream ended without usage"
        elif not times:
            error = "stream carried no output chunk"
    ok = error is None
    toks = req.toks
    if toks and min(toks) >= 0:
        chunk_tokens = toks
    else:
        chunk_tokens = [1] * len(times)
    return RequestResult(
        ok=ok,
        send_s=(send - t0) / 1e9,
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
        ttft_s=(times[0] - send) / 1e9 if times else 0.0,
        e2e_s=(req.end_ns - send) / 1e9 if req.end_ns else 0.0,
        itl_s=[(b - a) / 1e9 for a, b in zip(times, times[1:])],
        chunk_tokens=list(chunk_tokens),
        error=error,
        warmup=req.warmup,
        replica=req.ep.index if req.ep is not None else 0,
        cached_tokens=_cached_tokens(usage),
    )


def _cached_tokens(usage: dict[str, Any]) -> int | None:
    details = usage.get("prompt_tokens_details")
    value = details.get("cached_tokens") if isinstance(details, dict) else None
    return int(value) if isinstance(value, (int, float)) else None


def _load_result(sent: list[_Sent], plan: _Plan, arrival: Arrival, cpu_s: list[float], cap_waits: int,
                 exhausted: bool, t_start: int, t_end: int, wall_at_start: float) -> LoadResult:
    """One LoadResult from the sent requests (in request order) of one or several processes on one clock;
    `cpu_s` is each process's event-loop CPU time over the measured phase, `t_start` its start instant."""
    measured = [s for s in sent if s.idx >= plan.start]
    t0 = min(s.send_ns for s in measured) if measured else t_start
    for s in sent:
        s.result.send_s = (s.send_ns - t0) / 1e9
    duration_s = (max(s.end_ns for s in measured) - t0) / 1e9 if measured else 0.0
    wall_s = max((t_end - t_start) / 1e9, 1e-9)
    cpu = [c / wall_s * 100.0 for c in cpu_s]
    check = _client_check(measured, plan.offsets, arrival, cpu, cap_waits, exhausted or plan.exhausted)
    return LoadResult(results=[s.result for s in sent], duration_s=duration_s, client=check,
                      started_at=wall_at_start + (t0 - t_start) / 1e9, t0_perf_ns=t0, start_perf_ns=t_start)


def _client_check(measured: list[_Sent], offsets: np.ndarray, arrival: Arrival, cpu_percent: list[float],
                  cap_waits: int, exhausted: bool) -> ClientCheck:
    """`cpu_percent`: each client process's event loop, 100 = one core."""
    reasons: list[str] = []
    warnings: list[str] = []
    lags = np.array([(s.send_ns - s.sched_ns) / 1e6 for s in measured]) if measured else np.zeros(1)
    lag_p99 = float(np.percentile(lags, 99))
    lag_mean = float(np.mean(lags))
    # Late sends are only the client's failure when they are systematic: a mean lag beyond a tenth of the mean
    # gap between arrivals reshapes the arrival process. Occasional late sends (the OS scheduling the client
    # behind a busy server on a small machine) are reported, and the latency of each request is still measured
    # from its actual send.
    gap_ms = 1000.0 / arrival.rate if arrival.open_loop and arrival.rate else None
    if gap_ms is not None and lag_mean > max(MAX_DISPATCH_LAG_MS, 0.1 * gap_ms):
        reasons.append(f"dispatch lag mean {lag_mean:.1f} ms > {max(MAX_DISPATCH_LAG_MS, 0.1 * gap_ms):.1f} ms "
                       f"(a tenth of the {gap_ms:.0f} ms mean arrival gap): the client fell behind")
    elif lag_p99 > MAX_DISPATCH_LAG_MS:
        warnings.append(f"dispatch lag p99 {lag_p99:.1f} ms > {MAX_DISPATCH_LAG_MS:g} ms (mean {lag_mean:.1f} ms)")
    sends = sorted(s.send_ns for s in measured)
    span = (sends[-1] - sends[0]) / 1e9 if len(sends) > 1 else 0.0
    achieved = (len(sends) - 1) / span if span > 0 else 0.0
    requested = arrival.rate if arrival.open_loop else None
    if arrival.open_loop and len(sends) > 1 and span > 0 and not cap_waits:
        sched_span = float(offsets[len(sends) - 1] - offsets[0])
        if sched_span > 0 and sched_span / span < MIN_RATE_FRACTION:
            reasons.append(
                f"sent {achieved:.2f} req/s, below {MIN_RATE_FRACTION:.0%} of the schedule's "
                f"{(len(sends) - 1) / sched_span:.2f} req/s"
            )
    busiest = max(cpu_percent)
    if busiest >= MAX_CLIENT_CPU_PERCENT:
        which = "client event loop" if len(cpu_percent) == 1 else "busiest client worker's event loop"
        reasons.append(f"{which} used {busiest:.0f}% of a core (limit {MAX_CLIENT_CPU_PERCENT:g}%)")
    if exhausted:
        reasons.append(
            "ran out of requests before duration_s: build more (Arrival.requests_needed) so the load lasts the run"
        )
    return ClientCheck(
        requested_rate=requested,
        achieved_rate=achieved,
        dispatch_lag_p99_ms=lag_p99,
        client_cpu_percent=sum(cpu_percent),
        valid=not reasons,
        reasons=reasons,
        warnings=warnings,
        dispatch_lag_mean_ms=lag_mean,
        processes=len(cpu_percent),
        busiest_process_cpu_percent=busiest,
    )
