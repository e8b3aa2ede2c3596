"""An OpenAI-compatible streaming server with a known service capacity: the ground truth for steady-state tests.

Model: `slots` decode slots and a FIFO queue. A request holds one slot for its service time

    S = prefill_s + prefill_per_token_s x prompt_tokens + token_s x (output_tokens - 1)

(prefill yields the first token, each further token takes `token_s`; slots do not slow each other down), so the
server is an M/G/c queue whose sustainable rate is, in closed form, `slots / E[S]` (`capacity()`); above it the
queue grows without bound.

The queue is kept in virtual time: on arrival (the handler's first instant) a request takes the slot that frees
first, starts at max(arrival, that slot's free time) and frees it at start + S, all computed at once. Chunks are
then written on those deadlines. A late event loop (a loaded test machine) delays writes but never the
accounting, so the server's capacity stays exactly the closed form.

Streams are vLLM's (rendered by `tests/fakeserver.py`: continuous usage per chunk, a final usage chunk, `[DONE]`;
completions and chat); `GET /v1/models` lists the model. `/metrics` exports, in the Prometheus text format,
`vllm:num_requests_waiting` and `vllm:num_requests_running` computed from the virtual queue at the scrape's instant,
`vllm:kv_cache_usage_perc` (running / slots: a running request holds one slot's share of the cache),
`vllm:num_preemptions_total` (always 0) and `vllm:cache_config_info` (the config's block counts).

Script: `python tests/capacity_fake.py --port 0 --config JSON` prints `PORT <n>`; `CapacityFake` runs it in its
own process so the load client's process does not share its event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import heapq
import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiohttp import web

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fakeserver import FakeConfig, _App, models_response  # noqa: E402  (one home for vLLM's formats)


@dataclass
class CapacityConfig:
    slots: int = 8
    prefill_s: float = 0.02  # per request
    prefill_per_token_s: float = 0.0  # per prompt token
    token_s: float = 0.02  # per output token after the first
    tokens_per_chunk: int = 1
    api_key: str | None = None
    model: str = "fake-model"
    # what /v1/models and /metrics' vllm:cache_config_info report, as vLLM 0.32 does (nothing here depends on them)
    max_model_len: int = 2048
    block_size: int = 16
    num_gpu_blocks: int = 1024
    gpu_memory_utilization: float = 0.9

    def service_s(self, prompt_tokens: float, output_tokens: float) -> float:
        return self.prefill_s + self.prefill_per_token_s * prompt_tokens + self.token_s * max(output_tokens - 1, 0)

    def capacity(self, mean_prompt_tokens: float, mean_output_tokens: float) -> float:
        """Requests / s sustainable for a workload of these mean lengths (E[S] is linear in them)."""
        return self.slots / self.service_s(mean_prompt_tokens, mean_output_tokens)


class _Server:
    def __init__(self, config: CapacityConfig) -> None:
        self.config = config
        self.render = _App(FakeConfig(tokens_per_chunk=config.tokens_per_chunk, model=config.model, record=False))
        self.free = [0.0] * config.slots  # heap of the times each slot frees (virtual, time.perf_counter)
        self.jobs: deque[tuple[float, float, float]] = deque()  # (arrival, start, end), in arrival order
        self.served = 0

    def admit(self, now: float, service_s: float) -> float:
        """FIFO: the request starts when the earliest slot frees (or now); returns its start time."""
        start = max(now, self.free[0])
        heapq.heapreplace(self.free, start + service_s)
        self.jobs.append((now, start, start + service_s))
        return start

    def gauges(self, now: float) -> tuple[int, int]:
        while self.jobs and self.jobs[0][2] <= now and self.jobs[0][1] <= now:
            self.jobs.popleft()  # FIFO with equal-length slots: old finished jobs sit at the front
        waiting = sum(1 for a, s, e in self.jobs if a <= now < s)
        running = sum(1 for a, s, e in self.jobs if s <= now < e)
        return waiting, running

    async def models(self, request: web.Request) -> web.Response:
        c = self.config
        return models_response(request, c.model, c.api_key, c.max_model_len)

    async def metrics(self, request: web.Request) -> web.Response:
        c = self.config
        waiting, running = self.gauges(time.perf_counter())
        labels = f'{{engine="0",model_name="{self.config.model}"}}'
        text = (
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f"vllm:num_requests_running{labels} {float(running)}\n"
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f"vllm:num_requests_waiting{labels} {float(waiting)}\n"
            "# TYPE vllm:request_success_total counter\n"
            f'vllm:request_success_total{{engine="0",finished_reason="length",model_name="{self.config.model}"}} '
            f"{float(self.served)}\n"
            "# TYPE vllm:kv_cache_usage_perc gauge\n"  # each running request holds one slot's share of the cache
            f"vllm:kv_cache_usage_perc{labels} {running / c.slots}\n"
            "# TYPE vllm:num_preemptions_total counter\n"  # slots never preempt
            f"vllm:num_preemptions_total{labels} 0.0\n"
            "# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n"
            "# TYPE vllm:cache_config_info gauge\n"
            f'vllm:cache_config_info{{block_size="{c.block_size}",cache_dtype="auto",enable_prefix_caching="True",'
            f'engine="0",gpu_memory_utilization="{c.gpu_memory_utilization}",kv_cache_memory_bytes="None",'
            f'kv_cache_size_tokens="{c.num_gpu_blocks * c.block_size}",num_cpu_blocks="None",'
            f'num_gpu_blocks="{c.num_gpu_blocks}",num_gpu_blocks_override="None",'
            f'prefix_caching_hash_algo="sha256",user_specified_block_size="False"}} 1.0\n'
        )
        return web.Response(text=text, content_type="text/plain")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._stream(request, chat=True)

    async def _stream(self, request: web.Request, chat: bool) -> web.StreamResponse:
        now = time.perf_counter()
        c = self.config
        if c.api_key and request.headers.get("Authorization") != f"Bearer {c.api_key}":
            return web.json_response({"error": {"message": "bad api key"}}, status=401)
        body = await request.json()
        n_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
        if chat:
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        else:
            prompt_tokens = len(str(body.get("prompt", "")).split())
        opts = body.get("stream_options") or {}
        events = self.render.events(chat, n_tokens, prompt_tokens, bool(opts.get("continuous_usage_stats")),
                                    bool(opts.get("include_usage")))
        start = self.admit(now, c.service_s(prompt_tokens, n_tokens))
        first = start + c.prefill_s + c.prefill_per_token_s * prompt_tokens
        k = max(1, c.tokens_per_chunk)
        resp = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i, event in enumerate(events):
            if i < len(events) - 1:  # the usage / [DONE] tail goes with the last token chunk, as in vLLM
                # chunk i carries tokens i*k+1 .. (i+1)*k; it leaves when its last token is done
                last_token = min((i + 1) * k, n_tokens)
                delay = first + (last_token - 1) * c.token_s - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            await resp.write(event)
        await resp.write_eof()
        self.served += 1
        return resp


def make_app(config: CapacityConfig) -> web.Application:
    state = _Server(config)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/completions", state.completions)
    app.router.add_post("/v1/chat/completions", state.chat)
    app.router.add_get("/metrics", state.metrics)
    app.router.add_get("/v1/models", state.models)
    return app


class CapacityFake:
    """The server in its own process on 127.0.0.1 and a free port (a context manager)."""

    def __init__(self, config: CapacityConfig) -> None:
        self.config = config
        self.port = 0
        self._proc: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> CapacityFake:
        cmd = [sys.executable, os.path.abspath(__file__), "--port", "0",
               "--config", json.dumps(dataclasses.asdict(self.config))]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line.startswith("PORT "):
            self.stop()
            raise RuntimeError(f"capacity fake did not start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def __enter__(self) -> CapacityFake:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- drivers


def requests_for(n: int, output_tokens: int, prompt_words: int = 4) -> list:
    """`n` identical completions requests (the fake counts prompt tokens as words)."""
    from harness.load.prompts import RequestSpec

    return [RequestSpec(" ".join(["tok"] * prompt_words), None, prompt_words, output_tokens)] * n


def wait_idle(fake: CapacityFake, timeout_s: float = 60.0) -> None:
    """Until the fake's virtual queue is empty, so one step's backlog does not load the next."""
    from harness.measure.vllm_metrics import wait_idle as wait_servers_idle

    wait_servers_idle([(fake.url, None)], timeout_s=timeout_s, poll_s=0.05)


def fake_load_steps(fake: CapacityFake, output_tokens: int, slo: Any = None) -> Any:
    """The study's own load steps (`harness.study.objectives.LoadSteps` on `harness.deploy.attach`) on the fake:
    a capacity search here runs exactly the code a trial runs, warm-up rule and verdict included."""
    from harness.deploy import attach
    from harness.load.workload import parse_workload
    from harness.study.objectives import LoadSteps

    workload = parse_workload({"name": "fake", "api": "completions", "ignore_eos": True, "input_len": 4,
                               "output_len": output_tokens, "warmup_requests": 0}, source="capacity_fake")
    return LoadSteps(deployment=attach(fake.url, None, fake.config.model), workload=workload,
                     requests_for=lambda k, n: requests_for(n, output_tokens), slo=slo, plan=None,
                     save=lambda record, k: None)


def window_measure(fake: CapacityFake, spec: Any, output_tokens: int, slo: Any = None, *,
                   keep_client: bool = False) -> Any:
    """measure(rate) -> (RunRecord, Steady) for `search_capacity`: one `LoadSteps.run_window` step per call.

    `keep_client=False` judges the step without the client check: on a loaded 2-core test machine the client's
    sends can lag their schedule by tens of ms, which the check rightly calls "not a server number" in
    production; the verdict uses the actual send times, so the steps still measure the fake.
    """
    from harness.measure.steady import SteadyCriteria
    from harness.study.capacity import step_verdict

    steps = fake_load_steps(fake, output_tokens, None)  # the SLO is folded in below, once, as a trial does

    def measure(rate: float) -> Any:
        record = steps.run_window(rate, spec, SteadyCriteria())
        record.slo = slo
        if not keep_client:
            record.client = None
        if record.steady is not None:
            record.steady = step_verdict(record, record.steady, slo)
        return record, record.steady

    return measure


def count_measure(fake: CapacityFake, num_requests: int, output_tokens: int, slo: Any = None) -> Any:
    """measure(rate) -> RunRecord for request-count steps as the capacity objective ran them before time windows:
    `num_requests` Poisson arrivals at the rate, all measured, metrics as `harness.measure.stats` defines them."""
    from harness.load.arrival import Arrival
    from harness.load.client import run_load_sync
    from harness.measure.stats import summarize
    from harness.records import RunRecord

    def measure(rate: float) -> Any:
        wait_idle(fake)
        arrival = Arrival(mode="poisson", rate=rate, num_requests=num_requests)
        load = run_load_sync([(fake.url, None)], requests_for(num_requests, output_tokens), arrival,
                             model=fake.config.model, api="completions", warmup=0, timeout_s=300)
        return RunRecord(run_id=f"rate{rate:.2f}", created="", model=fake.config.model, settings={}, workload={},
                         arrival=arrival.to_dict(), slo=slo, argv=[], metrics=summarize(load.results, load.duration_s, slo),
                         client=None)

    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", default="{}", help="CapacityConfig fields as JSON")
    args = parser.parse_args()
    config = CapacityConfig(**json.loads(args.config))
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass

    async def serve() -> None:
        runner = web.AppRunner(make_app(config), access_log=None)
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
