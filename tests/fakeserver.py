"""A real HTTP server that streams OpenAI-style completions like vLLM, with known delays and injected failures.

Tests measure the client against it: the server records, on the same monotonic clock as the client
(`time.perf_counter_ns`, CLOCK_MONOTONIC on Linux, shared by all processes), when it received each request and when
it wrote each chunk, so the client's TTFT and ITL can be checked against what actually happened on the wire, and
against the nominal injected delays.

Streams follow vLLM's format: per-chunk `usage` when `stream_options.continuous_usage_stats` is asked for, a final
chunk with empty `choices` and the `usage`, then `data: [DONE]`; chat streams open with a role-only chunk. Each
event is its own HTTP chunk, as uvicorn sends them.

Zero-delay mode (all delays 0, no failures) pre-renders each response once and writes it in one call, so a
benchmark of the client is not limited by this server. Run it in its own process (`FakeServer(process=True)`,
optionally pinned to a CPU) when the client's own core must not be shared.

`GET /v1/models` lists the one model (`FakeConfig.model`, with `max_model_len`), behind the key like the streams.
Control endpoints: POST /_config (JSON fields of FakeConfig), GET /_log (per-request timings), POST /_reset.
Script: `python tests/fakeserver.py --port 0 [--cpu N] [--config JSON]` prints `PORT <n>`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

from aiohttp import web

perf_ns = time.perf_counter_ns


@dataclass
class FakeConfig:
    """What the server does with each streaming request."""

    first_token_delay_s: float = 0.0  # request received -> first chunk written (at least this long, never less)
    chunk_delay_s: float = 0.0  # between chunks (on absolute deadlines from the request's arrival: no drift)
    tokens_per_chunk: int = 1  # multi-token chunks (speculative decoding, stream intervals)
    error_every: int = 0  # every k-th request answers HTTP `error_status` (0: never)
    error_status: int = 500
    drop_every: int = 0  # every k-th request: the connection is cut after `drop_after_chunks` chunks
    drop_after_chunks: int = 2
    omit_usage: bool = False  # no usage anywhere in the stream
    stall_s: float = 0.0  # extra wait before anything is written (timeouts)
    api_key: str | None = None  # require `Authorization: Bearer <key>` (401 otherwise)
    record: bool = True  # keep per-request timings for GET /_log
    model: str = "fake-model"
    cached_prompt_tokens: int | None = None  # final usage reports prompt_tokens_details.cached_tokens (capped)
    max_model_len: int | None = 2048  # reported by GET /v1/models, as vLLM's ModelCard does (None: left out)


# ---------------------------------------------------------------------------------------------- the app


def models_response(request: web.Request, model: str, api_key: str | None, max_model_len: int | None) -> web.Response:
    """GET /v1/models as vLLM answers it: 401 without the key, else a list with one ModelCard."""
    if api_key and request.headers.get("Authorization") != f"Bearer {api_key}":
        return web.json_response({"error": "Unauthorized"}, status=401)
    card: dict[str, Any] = {"id": model, "object": "model", "created": 0, "owned_by": "vllm", "root": model,
                            "parent": None, "permission": []}
    if max_model_len is not None:
        card["max_model_len"] = max_model_len
    return web.json_response({"object": "list", "data": [card]})


async def sleep_until(deadline_ns: int) -> None:
    """Sleep until `perf_counter_ns() >= deadline_ns`, never less.

    Event-loop timers can fire early: uvloop rounds a delay to whole milliseconds and counts it from the loop's
    cached time (taken at the start of the iteration, truncated to 1 ms), so `asyncio.sleep(0.030)` there may return
    after 29.3 ms. A ground-truth delay must be a lower bound, so the remainder is slept again until the deadline.
    """
    while True:
        left = deadline_ns - perf_ns()
        if left <= 0:
            return
        await asyncio.sleep(left / 1e9)


def _frame(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class _App:
    def __init__(self, config: FakeConfig) -> None:
        self.config = config
        self.count = 0
        self.log: list[dict[str, Any]] = []
        self._cache: dict[tuple[Any, ...], bytes] = {}

    # -- stream content
    def events(self, chat: bool, n_tokens: int, prompt_tokens: int, continuous: bool, include_usage: bool) -> list[bytes]:
        """The SSE events of one response, one entry per chunk (the role chunk joins the first)."""
        c = self.config
        k = max(1, c.tokens_per_chunk)
        model = c.model
        out: list[bytes] = []
        done = 0
        first = True
        while done < n_tokens:
            step = min(k, n_tokens - done)
            done += step
            text = " tok" * step
            finish = "length" if done >= n_tokens else None
            usage = (
                {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + done, "completion_tokens": done}
                if continuous and not c.omit_usage
                else None
            )
            if chat:
                obj: dict[str, Any] = {
                    "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": finish}],
                }
            else:
                obj = {
                    "id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                                 "stop_reason": None}],
                }
            if usage:
                obj["usage"] = usage
            event = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
            if chat and first:
                role: dict[str, Any] = {
                    "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}],
                }
                if continuous and not c.omit_usage:
                    role["usage"] = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens,
                                     "completion_tokens": 0}
                event = b"data: " + json.dumps(role, separators=(",", ":")).encode() + b"\n\n" + event
            first = False
            out.append(event)
        tail = b""
        if include_usage and not c.omit_usage:
            final = {
                "id": "fake", "object": "chat.completion.chunk" if chat else "text_completion", "created": 0,
                "model": model, "choices": [],
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n_tokens,
                          "completion_tokens": n_tokens},
            }
            if c.cached_prompt_tokens is not None:  # as vLLM with --enable-prompt-tokens-details
                final["usage"]["prompt_tokens_details"] = {"cached_tokens": min(c.cached_prompt_tokens, prompt_tokens)}
            tail = b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n"
        out.append(tail + b"data: [DONE]\n\n")
        return out

    # -- handlers
    async def models(self, request: web.Request) -> web.Response:
        c = self.config
        return models_response(request, c.model, c.api_key, c.max_model_len)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, chat=True)

    async def _stream(self, request: web.Request, chat: bool) -> web.StreamResponse:
        recv = perf_ns()
        c = self.config
        self.count += 1
        n = self.count
        if c.api_key and request.headers.get("Authorization") != f"Bearer {c.api_key}":
            return web.json_response({"error": {"message": "bad api key"}}, status=401)
        body = await request.json()
        n_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        if chat:
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        else:
            prompt_tokens = len(str(body.get("prompt", "")).split())
        opts = body.get("stream_options") or {}
        include_usage = bool(opts.get("include_usage"))
        continuous = bool(opts.get("continuous_usage_stats"))
        peer = request.transport.get_extra_info("peername") if request.transport is not None else None
        entry: dict[str, Any] = {"n": n, "chat": chat, "recv_ns": recv, "writes_ns": [], "status": 200,
                                 "max_tokens": n_tokens, "prompt_tokens": prompt_tokens,
                                 "peer": list(peer) if peer else None}
        if c.record:
            self.log.append(entry)
        if c.error_every and n % c.error_every == 0:
            entry["status"] = c.error_status
            return web.json_response({"error": {"message": "injected failure", "code": c.error_status}},
                                     status=c.error_status)

        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        drop = bool(c.drop_every and n % c.drop_every == 0)
        fast = not (c.first_token_delay_s or c.chunk_delay_s or c.stall_s or drop or c.record)
        if fast:
            key = (chat, n_tokens, prompt_tokens, continuous, include_usage, c.tokens_per_chunk, c.omit_usage)
            framed = self._cache.get(key)
            if framed is None:
                framed = b"".join(_frame(e) for e in self.events(chat, n_tokens, prompt_tokens, continuous,
                                                                   include_usage)) + b"0\r\n\r\n"
                if len(self._cache) < 4096:
                    self._cache[key] = framed
            writer = await resp.prepare(request)
            writer.chunked = False  # type: ignore[attr-defined]  # the body is framed already, one write
            await resp.write(framed)
            await resp.write_eof()
            return resp

        await resp.prepare(request)
        # deadlines on the clock the client uses, from the moment the request arrived
        start = recv + round((c.stall_s + c.first_token_delay_s) * 1e9)
        step = round(c.chunk_delay_s * 1e9)
        events = self.events(chat, n_tokens, prompt_tokens, continuous, include_usage)
        for i, event in enumerate(events):
            if drop and i >= c.drop_after_chunks:
                assert request.transport is not None
                request.transport.abort()
                entry["status"] = "dropped"
                return resp
            if i < len(events) - 1:  # the usage / [DONE] tail follows the last token chunk at once, as in vLLM
                await sleep_until(start + i * step)
            entry["writes_ns"].append(perf_ns())  # just before the bytes go to the socket
            await resp.write(event)
        await resp.write_eof()
        return resp

    async def set_config(self, request: web.Request) -> web.Response:
        data = await request.json()
        self.config = dataclasses.replace(self.config, **data)
        return web.json_response(dataclasses.asdict(self.config))

    async def get_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.log)

    async def reset(self, request: web.Request) -> web.Response:
        self.log = []
        self.count = 0
        return web.json_response({"ok": True})


def make_app(config: FakeConfig) -> web.Application:
    state = _App(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/completions", state.completions)
    app.router.add_post("/v1/chat/completions", state.chat)
    app.router.add_get("/v1/models", state.models)
    app.router.add_post("/_config", state.set_config)
    app.router.add_get("/_log", state.get_log)
    app.router.add_post("/_reset", state.reset)
    return app


# ---------------------------------------------------------------------------------------------- runners


class FakeServer:
    """The fake server on 127.0.0.1 and a free port, in a thread (default) or its own process."""

    def __init__(
        self,
        config: FakeConfig | None = None,
        *,
        process: bool = False,
        cpu: int | None = None,
        keepalive_s: float = 75.0,
    ) -> None:
        self.config = config or FakeConfig()
        self.process = process
        self.cpu = cpu
        self.keepalive_s = keepalive_s  # the server closes keep-alive connections idle this long
        self.port = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server process's id (process mode), e.g. to read its CPU time."""
        return self._proc.pid if self._proc is not None else None

    def cpu_seconds(self) -> float | None:
        """CPU time the server process has used so far (process mode on Linux), else None."""
        if self._proc is None:
            return None
        try:
            fields = open(f"/proc/{self._proc.pid}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def start(self) -> FakeServer:
        if self.process:
            cmd = [sys.executable, os.path.abspath(__file__), "--port", "0",
                   "--config", json.dumps(dataclasses.asdict(self.config)), "--keepalive", str(self.keepalive_s)]
            if self.cpu is not None:
                cmd += ["--cpu", str(self.cpu)]
            self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            assert self._proc.stdout is not None
            line = self._proc.stdout.readline()
            if not line.startswith("PORT "):
                self.stop()
                raise RuntimeError(f"fake server did not start: {line!r}")
            self.port = int(line.split()[1])
            return self
        ready = threading.Event()
        errors: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._serve(ready))
            except BaseException as exc:  # surfaced to start()
                errors.append(exc)
                ready.set()
            finally:
                loop.close()

        self._thread = threading.Thread(target=serve, name="fakeserver", daemon=True)
        self._thread.start()
        ready.wait(30)
        if errors:
            raise errors[0]
        return self

    async def _serve(self, ready: threading.Event) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(make_app(self.config), access_log=None, handle_signals=False,
                               keepalive_timeout=self.keepalive_s)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = runner.addresses[0][1]
        ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._thread is not None and self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(10)
            self._thread = None

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control
    def _call(self, method: str, path: str, data: Any = None) -> Any:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def configure(self, **fields: Any) -> None:
        """Change behaviour for the following requests (fields of FakeConfig)."""
        self._call("POST", "/_config", fields)
        self.config = dataclasses.replace(self.config, **fields)

    def log(self) -> list[dict[str, Any]]:
        """Per request, in arrival order: n, chat, recv_ns, writes_ns (one per chunk), status, max_tokens."""
        return self._call("GET", "/_log")

    def reset(self) -> None:
        self._call("POST", "/_reset", {})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    parser.add_argument("--config", default="{}", help="FakeConfig fields as JSON")
    parser.add_argument("--keepalive", type=float, default=75.0, help="idle keep-alive timeout, seconds")
    args = parser.parse_args()
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {args.cpu})
    config = FakeConfig(**json.loads(args.config))
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    async def serve() -> None:
        runner = web.AppRunner(make_app(config), access_log=None, keepalive_timeout=args.keepalive)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        print(f"PORT {runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
