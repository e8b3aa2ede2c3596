"""The records every stage hands to the next, and their JSON form.

One JSON file per run (a `RunRecord`) is the unit of evidence: a sweep table, a report and an emitted config
are all derived from these, so every field says what it measured and in which unit.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.paths import portable
from harness.yamlfile import check_keys, positive

# ---------------------------------------------------------------------------------------------- client side


@dataclass
class RequestResult:
    """One request as the client saw it. Times are seconds on the monotonic clock; `send` is the origin."""

    ok: bool
    send_s: float  # when the request was sent, relative to the start of the measured run
    prompt_tokens: int
    output_tokens: int  # from the server's `usage`
    ttft_s: float = 0.0  # send -> first chunk carrying content
    e2e_s: float = 0.0  # send -> last byte
    itl_s: list[float] = field(default_factory=list)  # gap before each content chunk after the first
    chunk_tokens: list[int] = field(default_factory=list)  # tokens carried by each content chunk
    error: str | None = None
    warmup: bool = False
    replica: int = 0
    # prompt tokens served from vLLM's prefix cache (usage.prompt_tokens_details, which the launcher turns on);
    # None when the server did not report it
    cached_tokens: int | None = None


@dataclass
class LatencyStats:
    """Summary of one latency distribution, milliseconds; percentiles by numpy's linear interpolation."""

    mean: float
    std: float
    p50: float
    p90: float
    p95: float
    p99: float
    max: float
    count: int


SLO_PERCENTILES = (50, 90, 95, 99)  # the percentiles every RunMetrics carries


@dataclass
class SLO:
    """Service-level objectives in milliseconds; None means no limit on that metric."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    percentile: float = 99.0  # the percentile a capacity search holds to the limits


def parse_slo(data: Any, source: str, key: str = "objective.slo") -> SLO:
    """An SLO mapping of a sweep file (or `--slo` items): ttft_ms, tpot_ms, e2e_ms (positive), percentile."""
    if data is None:
        return SLO()
    if not isinstance(data, dict):
        raise UserError("must be a mapping with ttft_ms, tpot_ms, e2e_ms, percentile", source=source, key=key)
    check_keys(data, ("ttft_ms", "tpot_ms", "e2e_ms", "percentile"), source, key)
    pct = data.get("percentile", 99)
    if pct not in SLO_PERCENTILES:
        raise UserError(f"percentile must be one of {list(SLO_PERCENTILES)}, got {pct!r}", source=source,
                        key=f"{key}.percentile")
    return SLO(ttft_ms=positive(data.get("ttft_ms"), source, f"{key}.ttft_ms"),
               tpot_ms=positive(data.get("tpot_ms"), source, f"{key}.tpot_ms"),
               e2e_ms=positive(data.get("e2e_ms"), source, f"{key}.e2e_ms"), percentile=float(pct))


@dataclass
class RunMetrics:
    """What a measured run achieved, with definitions identical to `vllm bench serve`."""

    duration_s: float
    completed: int
    failed: int
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (input + output) tokens / s
    goodput: float | None  # requests / s that met every SLO (None when no SLO was given)
    ttft_ms: LatencyStats | None
    tpot_ms: LatencyStats | None
    itl_ms: LatencyStats | None
    e2e_ms: LatencyStats | None
    # Tails with failed requests counted as infinitely slow: a config that drops requests cannot hide it.
    error_adjusted_p99_e2e_ms: float | None = None
    slo_attainment: float | None = None  # fraction of sent requests that met every SLO
    # completed requests' prompt tokens served from the prefix cache / all their prompt tokens (None: not reported)
    prefix_cached_fraction: float | None = None


@dataclass
class ClientCheck:
    """Did the client, not the server, limit the run? A run that fails these checks is not a server number."""

    requested_rate: float | None  # requests / s asked for (None for closed loop)
    achieved_rate: float  # requests / s actually sent
    dispatch_lag_p99_ms: float  # how late requests left compared with their schedule
    client_cpu_percent: float  # CPU of the client's event loop(s) over the run, summed over processes (100 = one core)
    valid: bool
    reasons: list[str] = field(default_factory=list)  # why the run is invalid
    warnings: list[str] = field(default_factory=list)  # worth knowing, not enough to discard the run
    dispatch_lag_mean_ms: float | None = None
    processes: int = 1  # client worker processes (run_load(processes=...))
    busiest_process_cpu_percent: float | None = None  # the busiest process's loop: what "saturated" is judged on


@dataclass
class Steady:
    """Did the server keep up over a measured time window at one rate? (`harness.measure.steady` decides.)

    Counts are over the window [warmup_s, warmup_s + window_s) of the step's schedule; "arrivals" are requests the
    client sent inside it, "completions" requests that finished OK inside it (whenever they were sent), so the
    ratio does not depend on how long the drain after the window lasts. Growths are a least-squares slope across
    the window times its length, in requests; a limit is the most growth that still counts as no trend.
    """

    holds: bool  # kept_up and (slo_ok is not False)
    kept_up: bool  # completion ratio, in-flight trend and server waiting trend all within their limits
    reasons: list[str] = field(default_factory=list)  # why it does not hold
    warnings: list[str] = field(default_factory=list)  # worth knowing (too few requests, no server series)
    window_s: float = 0.0
    warmup_s: float = 0.0
    target_rate: float | None = None  # requests / s the schedule asked for
    offered_rate: float = 0.0  # arrivals in the window / window_s (the realised Poisson/gamma rate)
    achieved_rate: float = 0.0  # sustained throughput: completions in the window / window_s
    requests: int = 0  # arrivals in the window: the requests the step's latency metrics are over
    completed: int = 0  # completions in the window
    completion_ratio: float = 0.0  # completed / requests
    completion_limit: float = 0.0  # the most shortfall (requests - completed) that still holds
    fraction: float = 0.95  # the completion fraction asked for
    inflight_mean: float = 0.0  # our own requests in flight, mean over the window
    inflight_slope: float = 0.0  # requests / s
    inflight_growth: float = 0.0  # requests over the window
    growth_limit: float = 0.0  # the most growth (in-flight or waiting) that still holds
    waiting_slope: float | None = None  # vllm:num_requests_waiting, requests / s (None: no series)
    waiting_growth: float | None = None
    waiting_samples: int = 0
    batch_fill_s: float | None = None  # p99 decode time (E2E - TTFT) of the step's requests: the next warm-up
    slo_ok: bool | None = None  # the SLO percentiles over the window's requests (None: not judged)

    @property
    def warmup_basis_s(self) -> float | None:
        """What sizes the next step's warm-up: this step's batch fill, only when the server kept up. An overloaded
        step's decode times carry its overload (a batch far past its steady size, every TPOT inflated); a warm-up
        sized from them is minutes of load that measure nothing (146 s after a 2x overload on one H200)."""
        return self.batch_fill_s if self.kept_up else None


# ---------------------------------------------------------------------------------------------- server side


@dataclass
class GpuUsage:
    index: int
    name: str
    memory_total_mib: float
    memory_peak_mib: float
    memory_mean_mib: float
    util_mean_percent: float
    power_mean_w: float


@dataclass
class MemoryUsage:
    """Device memory during the run (NVML on GPUs) and the server process tree's RSS (always)."""

    gpus: list[GpuUsage] = field(default_factory=list)
    peak_gpu_memory_mib: float | None = None  # highest single-GPU peak
    rss_peak_mib: float | None = None
    rss_mean_mib: float | None = None


@dataclass
class StartupPhases:
    """Where one server's start-up went, in seconds: what vLLM's log states, plus the harness's own clock.

    The phases partition `total_s` (launch -> /health answered): `python_s` + `weights_s` + `compile_s` +
    `cuda_graphs_s` + `kv_profile_s` + `api_s` + `other_s`. `python_s` and `api_s` come from the log's timestamps
    (one-second resolution), the others from the durations vLLM prints; None: the log does not say (an older or
    newer vLLM, enforce_eager, a server that did not start).
    """

    total_s: float | None = None  # the harness's start-up: launch -> /health 200
    python_s: float | None = None  # launch -> engine core start: Python imports, argument and config resolution
    weights_s: float | None = None  # "Model loading took ... and X seconds" (else "Loading weights took X seconds")
    compile_s: float | None = None  # "torch.compile took X s in total" (CPU build: its compilation warm-up)
    cuda_graphs_s: float | None = None  # "Graph capturing finished in X secs"
    kv_profile_s: float | None = None  # the rest of vLLM's engine init: memory profiling, KV cache, warm-up
    api_s: float | None = None  # engine initialized -> /health 200: the API server's own start
    other_s: float | None = None  # total minus the phases above: engine/worker processes, device set-up
    engine_init_s: float | None = None  # "init engine (profile, create kv cache, warmup model) took X s"
    dynamo_s: float | None = None  # "Dynamo bytecode transform time: X s" (part of compile_s)
    compile_cache: str | None = None  # COMPILE_CACHE_STATES; None: nothing was compiled (enforce_eager)
    compile_cache_key: str | None = None  # the hash directory vLLM used under torch_compile_cache/


COMPILE_CACHE_STATES = ("hit", "partial", "miss", "load_failed", "off")
STARTUP_PHASES = ("python_s", "weights_s", "compile_s", "cuda_graphs_s", "kv_profile_s", "api_s", "other_s")


@dataclass
class ServerStats:
    """From vLLM itself: its log (capacity, start-up phases) and its Prometheus /metrics (usage during the run)."""

    kv_cache_tokens: int | None = None  # "GPU KV cache size: N tokens" (CPU build reports it the same way)
    kv_cache_blocks: int | None = None
    max_concurrency: float | None = None  # vLLM's "Maximum concurrency for L tokens per request"
    peak_kv_usage: float | None = None  # 0..1, sampled
    preemptions: int | None = None
    prefix_cache_hit_rate: float | None = None  # 0..1
    startup: StartupPhases | None = None  # the first replica's start-up, from its log


@dataclass
class ServerSide:
    """What a run on a server the harness did not start (`bench --url`) could observe of it, said in the record.

    Without the process there is no per-process GPU memory, no RSS, no start-up log (KV capacity from the log,
    start-up time) and no argv; `/metrics` is still scraped. `settings` of such a record are what the server
    reported, each key's source in `observed`.
    """

    note: str  # "attached: no process figures (...)"
    urls: list[str] = field(default_factory=list)
    observed: dict[str, str] = field(default_factory=dict)  # setting -> where the server reported it
    gpu_memory: str | None = None  # whose memory `memory.gpus` holds; None: not sampled
    metrics_endpoint: bool = True  # /metrics answered when the harness attached


@dataclass
class Failure:
    """Why a server did not start or died. `kind` is one of FAILURE_KINDS."""

    kind: str
    message: str
    log_tail: str = ""
    max_fitting_len: int | None = None  # vLLM's "estimated maximum model length" when the KV cache is too small
    exit_code: int | None = None


FAILURE_KINDS = ("oom", "kv_too_small", "bad_arg", "start_timeout", "crash", "infeasible", "client_invalid",
                 "interrupted")


@dataclass
class RunRecord:
    """One measured (or failed) run of one configuration under one workload."""

    run_id: str
    created: str  # ISO 8601, UTC
    model: str
    settings: dict[str, Any]  # every setting the harness passed, by the user's key names
    workload: dict[str, Any]
    arrival: dict[str, Any]
    slo: SLO | None
    argv: list[list[str]] | None  # one argv per replica (None: attached, the command line is unknown)
    metrics: RunMetrics | None = None
    client: ClientCheck | None = None
    memory: MemoryUsage | None = None
    server: ServerStats | None = None
    failure: Failure | None = None
    plan: dict[str, Any] | None = None  # the planner's estimates, to compare with `server`
    env: dict[str, Any] = field(default_factory=dict)
    log_paths: list[str] = field(default_factory=list)
    startup_s: float | None = None
    steady: Steady | None = None  # the steady-state verdict of a time-window load step
    server_side: ServerSide | None = None  # set when the harness attached to servers it did not start

    @property
    def ok(self) -> bool:
        return self.failure is None and self.metrics is not None


# ---------------------------------------------------------------------------------------------- JSON


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-ready structures."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def from_dict(cls: type, data: Any) -> Any:
    """Plain structures -> dataclass `cls`, recursively, following the type hints."""
    if data is None:
        return None
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _convert(hints[f.name], data[f.name])
    return cls(**kwargs)


def _convert(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            if arg is not type(None):
                return _convert(arg, value)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if origin is list:
        (arg,) = typing.get_args(hint) or (Any,)
        return [_convert(arg, v) for v in value]
    return value


def save_record(record: RunRecord, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(portable(to_dict(record)), indent=2, sort_keys=False))  # committed: no machine paths
    tmp.replace(path)
    return path


def load_record(path: Path) -> RunRecord:
    return from_dict(RunRecord, json.loads(Path(path).read_text()))
