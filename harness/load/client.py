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
  `completion_tokens` deltas of `continuous_usage_stats`, 1 per chunk when the server does not send them).
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
request's slot freed (closed loop); time held back by a `max_concurrency` cap is not lag.
"""

from __future__ import annotations

import asyncio
import math
import resource
import ssl as ssl_module
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np

from harness.errors import UserError
from harness.load.arrival import Arrival
from harness.load.prompts import RequestSpec
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


class _Progress:
    """Counts and latencies of finished measured requests, reported by a timer on the loop (nothing per chunk)."""

    def __init__(self, fn: Callable[[LoadProgress], None], interval_s: float) -> None:
        self.fn = fn
        self.interval_s = interval_s
        self.sent = 0
        self.completed = 0
        self.failed = 0
        self.ttft_ns: list[int] = []
        self.tpot_ns: list[float] = []
        self.start_ns = 0
        self.total_s: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

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

    def start(self, loop: asyncio.AbstractEventLoop, total_s: float | None) -> None:
        self.loop = loop
        self.start_ns = perf_ns()
        self.total_s = total_s
        self.timer = loop.call_later(self.interval_s, self._tick)

    def _tick(self) -> None:
        assert self.loop is not None
        self.timer = self.loop.call_later(self.interval_s, self._tick)
        self.report()

    def report(self) -> None:
        ttft = float(np.median(self.ttft_ns)) / 1e6 if self.ttft_ns else None
        tpot = float(np.median(self.tpot_ns)) / 1e6 if self.tpot_ns else None
        done = self.completed + self.failed
        self.fn(LoadProgress(elapsed_s=(perf_ns() - self.start_ns) / 1e9, total_s=self.total_s, sent=self.sent,
                             completed=self.completed, failed=self.failed, in_flight=self.sent - done,
                             p50_ttft_ms=ttft, p50_tpot_ms=tpot))

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
    """Dispatches requests over endpoints under an arrival process and collects results."""

    def __init__(
        self,
        targets: list[Target],
        requests: list[RequestSpec],
        arrival: Arrival,
        *,
        model: str,
        api: str,
        warmup: int,
        timeout_s: float,
        extra_body: dict[str, Any] | None,
    ) -> None:
        if api not in ("completions", "chat"):
            raise UserError(f"got {api!r}; allowed values: completions, chat", key="api")
        if not targets:
            raise ValueError("run_load needs at least one target")
        if warmup < 0 or warmup > len(requests):
            raise ValueError(f"warmup={warmup} must be between 0 and the number of requests ({len(requests)})")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        self.loop = asyncio.get_running_loop()
        self.chat = api == "chat"
        self.arrival = arrival
        self.timeout_s = timeout_s
        self.eps = [_Endpoint(i, t, api) for i, t in enumerate(targets)]
        self.reqs = [
            _Req(i, _body(spec, model, api, extra_body), i < warmup) for i, spec in enumerate(requests)
        ]
        self.warmup = warmup
        self.outstanding = 0
        self.phase_done: asyncio.Future[None] | None = None
        self.slot_free: asyncio.Future[None] | None = None
        self.next_idx = 0
        self.stop_idx = 0
        self.closed_loop_slots = 0
        self.deadline_ns: int | None = None
        self.exhausted = False
        self.cap_waits = 0
        self.progress: _Progress | None = None  # set for the measured phase when a progress callback is given

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
        if self.progress is not None and not req.warmup:
            self.progress.sent += 1
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
        if self.progress is not None and not req.warmup:
            self.progress.finished(req)
        if self.closed_loop_slots:
            self._next_closed(ts)
        elif self.slot_free is not None and not self.slot_free.done():
            self.slot_free.set_result(None)
        if self.outstanding == 0 and self.next_idx >= self.stop_idx and self.phase_done is not None:
            if not self.phase_done.done():
                self.phase_done.set_result(None)

    # -- closed loop
    def _next_closed(self, ts: int) -> None:
        if self.next_idx >= self.stop_idx:
            if self.deadline_ns is not None and ts < self.deadline_ns:
                self.exhausted = True  # a slot freed before duration_s with nothing left to send
            return
        if self.deadline_ns is not None and ts >= self.deadline_ns:
            self.stop_idx = self.next_idx  # duration reached: send nothing more
            return
        req = self.reqs[self.next_idx]
        self.next_idx += 1
        self.dispatch(req, ts)

    async def closed_loop(self, start: int, stop: int, slots: int, duration_s: float | None) -> None:
        self.next_idx, self.stop_idx = start, stop
        self.closed_loop_slots = slots
        self.phase_done = self.loop.create_future()
        now = perf_ns()
        self.deadline_ns = now + int(duration_s * 1e9) if duration_s else None
        try:
            for _ in range(min(slots, stop - start)):
                req = self.reqs[self.next_idx]
                self.next_idx += 1
                self.dispatch(req, now)
            if self.outstanding:
                await self.phase_done
        finally:
            self.closed_loop_slots = 0
            self.deadline_ns = None

    # -- open loop
    async def open_loop(self, start: int, offsets: np.ndarray, cap: int | None) -> None:
        stop = start + len(offsets)
        self.next_idx, self.stop_idx = start, stop
        self.phase_done = self.loop.create_future()
        t0 = perf_ns()
        due_ns = (t0 + np.rint(offsets * 1e9)).astype(np.int64).tolist()
        burst = 0
        held = 0  # when the dispatcher last resumed after waiting for the concurrency cap
        for k, i in enumerate(range(start, stop)):
            due = due_ns[k]
            now = perf_ns()
            if due > now:
                burst = 0
                await asyncio.sleep((due - now) / 1e9)
            elif burst >= 32:
                burst = 0
                await asyncio.sleep(0)  # let reads run during a catch-up burst
            burst += 1
            if cap is not None and self.outstanding >= cap:
                while self.outstanding >= cap:
                    self.cap_waits += 1
                    self.slot_free = self.loop.create_future()
                    await self.slot_free
                held = perf_ns()
            # time held back by the cap (this request's or an earlier one's) is not dispatch lag
            self.next_idx = i + 1
            self.dispatch(self.reqs[i], max(due, held))
        if self.outstanding:
            await self.phase_done


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
    payload["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
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
) -> LoadResult:
    """Send `requests` to `targets` (replicas of one config): the first `warmup` unmeasured, the rest under `arrival`.

    `timeout_s` bounds each request (send -> end of stream). A duration-limited run stops sending at
    `arrival.duration_s` and waits for the requests in flight. `extra_body` adds fields to every request body.
    `progress` is called on the event loop every `progress_interval_s` of the measured phase and once at its end
    with a `LoadProgress`; it must return quickly (it runs between reads, like the client itself).
    """
    _raise_fd_limit()
    run = _Run(
        [Target(*t) for t in targets],
        requests,
        arrival,
        model=model,
        api=api,
        warmup=warmup,
        timeout_s=timeout_s,
        extra_body=extra_body,
    )
    n_total = len(requests)
    try:
        # warmup: closed loop at the run's concurrency (all at once when uncapped), as vllm bench serve does
        if warmup:
            slots = min(warmup, arrival.max_concurrency or warmup)
            await run.open_connections(math.ceil(slots / len(run.eps)))
            await run.closed_loop(0, warmup, slots, None)

        measured_n = n_total - warmup
        if arrival.num_requests is not None:
            measured_n = min(measured_n, arrival.num_requests)
        stop = warmup + measured_n
        exhausted = False
        offsets = np.zeros(0)
        if not arrival.open_loop:
            slots = arrival.max_concurrency or 1
            await run.open_connections(math.ceil(slots / len(run.eps)))
        if progress is not None:
            run.progress = _Progress(progress, progress_interval_s)
        wall0 = time.time()
        cpu0 = time.thread_time()
        t_start = perf_ns()
        if measured_n > 0:
            if arrival.open_loop:
                offsets = arrival.schedule(measured_n)
                if run.progress is not None:
                    span = float(offsets[-1]) if len(offsets) else 0.0
                    run.progress.start(run.loop, arrival.duration_s or span)
                if arrival.duration_s is not None and len(offsets) == measured_n:
                    # the schedule wanted more requests than were built before duration_s
                    more = arrival.schedule(measured_n + 1)
                    exhausted = len(more) > measured_n
                await run.open_loop(warmup, offsets, arrival.max_concurrency)
            else:
                if run.progress is not None:
                    run.progress.start(run.loop, arrival.duration_s)
                await run.closed_loop(warmup, stop, arrival.max_concurrency or 1, arrival.duration_s)
                exhausted = run.exhausted
        t_end = perf_ns()
        cpu1 = time.thread_time()
        if run.progress is not None and run.progress.timer is not None:
            run.progress.stop()
            run.progress.report()  # the final state
    finally:
        if run.progress is not None:
            run.progress.stop()
        for ep in run.eps:
            for conn in list(ep.idle):
                if conn.transport is not None:
                    conn.transport.close()
            ep.idle.clear()
        for req in run.reqs:
            if req.send_ns and not req.finished:
                req.error = req.error or "run cancelled"
                if req.conn is not None:
                    req.conn.abort()
                req.finished = True

    measured = [r for r in run.reqs[warmup:] if r.send_ns]
    t0 = measured[0].send_ns if measured else t_start
    results = [_result(r, t0) for r in run.reqs if r.send_ns]
    if measured:
        duration_s = (max(r.end_ns for r in measured) - min(r.send_ns for r in measured)) / 1e9
    else:
        duration_s = 0.0
    wall_s = max((t_end - t_start) / 1e9, 1e-9)
    check = _client_check(run, measured, offsets, arrival, (cpu1 - cpu0) / wall_s * 100.0, exhausted)
    started_at = wall0 + (t0 - t_start) / 1e9
    return LoadResult(results=results, duration_s=duration_s, client=check, started_at=started_at, t0_perf_ns=t0)


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
) -> LoadResult:
    """`run_load` on a fresh event loop (uvloop when installed: lower dispatch lag and per-read cost)."""
    factory = None
    if use_uvloop:
        try:
            import uvloop

            factory = uvloop.new_event_loop
        except ImportError:
            factory = None
    box: list[LoadResult] = []

    async def main() -> None:
        # the result leaves through `box`, not as the task's result: asyncio.Runner's SIGINT-handler cleanup can
        # repr the main task, result included, which for a large run (every request's ITL list) takes seconds
        box.append(
            await run_load(
                targets, requests, arrival, model=model, api=api, warmup=warmup, timeout_s=timeout_s,
                extra_body=extra_body, progress=progress,
            )
        )

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    return box[0]


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


def _client_check(
    run: _Run, measured: list[_Req], offsets: np.ndarray, arrival: Arrival, cpu_percent: float, exhausted: bool
) -> ClientCheck:
    reasons: list[str] = []
    warnings: list[str] = []
    lags = np.array([(r.send_ns - r.sched_ns) / 1e6 for r in measured]) if measured else np.zeros(1)
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
    sends = sorted(r.send_ns for r in measured)
    span = (sends[-1] - sends[0]) / 1e9 if len(sends) > 1 else 0.0
    achieved = (len(sends) - 1) / span if span > 0 else 0.0
    requested = arrival.rate if arrival.open_loop else None
    if arrival.open_loop and len(sends) > 1 and span > 0 and not run.cap_waits:
        sched_span = float(offsets[len(sends) - 1] - offsets[0])
        if sched_span > 0 and sched_span / span < MIN_RATE_FRACTION:
            reasons.append(
                f"sent {achieved:.2f} req/s, below {MIN_RATE_FRACTION:.0%} of the schedule's "
                f"{(len(sends) - 1) / sched_span:.2f} req/s"
            )
    if cpu_percent >= MAX_CLIENT_CPU_PERCENT:
        reasons.append(f"client event loop used {cpu_percent:.0f}% of a core (limit {MAX_CLIENT_CPU_PERCENT:g}%)")
    if exhausted:
        reasons.append(
            "ran out of requests before duration_s: build more (Arrival.requests_needed) so the load lasts the run"
        )
    return ClientCheck(
        requested_rate=requested,
        achieved_rate=achieved,
        dispatch_lag_p99_ms=lag_p99,
        client_cpu_percent=cpu_percent,
        valid=not reasons,
        reasons=reasons,
        warnings=warnings,
        dispatch_lag_mean_ms=lag_mean,
    )
