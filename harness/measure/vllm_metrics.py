"""What vLLM says about itself: KV-cache capacity from its start-up log, usage from its Prometheus /metrics.

Capacity (tokens that fit in the KV cache, and vLLM's own max concurrency at max_model_len) is printed once at
start-up; usage (KV cache fill, preemptions, prefix-cache hits) is exported on /metrics. Metric names changed
across versions (`vllm:gpu_cache_usage_perc` -> `vllm:kv_cache_usage_perc`, `gpu_prefix_cache_*` ->
`prefix_cache_*`), so each value is looked up under every name it has had.
"""

from __future__ import annotations

import math
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from harness.records import ServerStats

# vLLM 0.32 (v1/core/kv_cache_utils.py), one line: "CPU KV cache size: 43,680 tokens, Maximum concurrency for
# 512 tokens per request: 85.31x" ("GPU KV cache size" on CUDA). Older versions print two lines:
# "GPU KV cache size: 43,680 tokens" and "Maximum concurrency for 512 tokens per request: 85.31x".
_KV_TOKENS = re.compile(r"\b([A-Z]+(?: \+ host)?) KV cache size: ([\d,]+) tokens")
_MAX_CONC = re.compile(r"Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")
# "vllm cache_config_info with initialization after num_gpu_blocks is: 2730" (v1/metrics/loggers.py; logged at
# DEBUG level in 0.32, so usually absent: /metrics' `vllm:cache_config_info` labels carry the block count)
_NUM_BLOCKS = re.compile(r"num_gpu_blocks is: (\d+)")
# v0-era logs: "# GPU blocks: 2730, # CPU blocks: 512" / "# cpu blocks: 2730"
_V0_BLOCKS = re.compile(r"# (?:GPU|gpu|CPU|cpu) blocks: (\d+)")

KV_USAGE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "vllm:cpu_cache_usage_perc")
PREEMPTION_METRICS = ("vllm:num_preemptions_total", "vllm:num_preemptions")
PREFIX_HITS_METRICS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
PREFIX_QUERIES_METRICS = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
CACHE_INFO_METRIC = "vllm:cache_config_info"
WAITING_METRIC = "vllm:num_requests_waiting"  # requests queued for a batch slot (gauge)
RUNNING_METRIC = "vllm:num_requests_running"  # requests in the running batch (gauge)
SERIES_METRICS = (WAITING_METRIC, RUNNING_METRIC)


@dataclass
class LogCapacity:
    """KV capacity as vLLM logged it at start-up."""

    kv_cache_tokens: int | None = None
    max_concurrency: float | None = None
    max_concurrency_len: int | None = None  # the L in "Maximum concurrency for L tokens per request"
    kv_cache_blocks: int | None = None
    device: str | None = None  # "GPU", "CPU", ...


def kv_capacity_from_log(log_text: str) -> LogCapacity:
    """Parse the start-up log; the last occurrence wins (one per engine with DP; equal for equal engines)."""
    cap = LogCapacity()
    for m in _KV_TOKENS.finditer(log_text):
        cap.device = m.group(1)
        cap.kv_cache_tokens = int(m.group(2).replace(",", ""))
    for m in _MAX_CONC.finditer(log_text):
        cap.max_concurrency_len = int(m.group(1).replace(",", ""))
        cap.max_concurrency = float(m.group(2))
    for m in _NUM_BLOCKS.finditer(log_text):
        cap.kv_cache_blocks = int(m.group(1))
    if cap.kv_cache_blocks is None:
        for m in _V0_BLOCKS.finditer(log_text):
            cap.kv_cache_blocks = int(m.group(1))
            break
    return cap


def server_stats_from_log(log_text: str) -> ServerStats:
    """The capacity part of ServerStats, from the log alone."""
    cap = kv_capacity_from_log(log_text)
    return ServerStats(
        kv_cache_tokens=cap.kv_cache_tokens, kv_cache_blocks=cap.kv_cache_blocks, max_concurrency=cap.max_concurrency
    )


# ---------------------------------------------------------------------------------------------- Prometheus

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\d+)?$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


@dataclass
class MetricsSnapshot:
    """One scrape of /metrics, parsed; sums over label sets (engines, models) unless asked for labels."""

    samples: list[Sample] = field(default_factory=list)
    t: float = 0.0  # time.monotonic() of the scrape

    def values(self, name: str) -> list[Sample]:
        return [s for s in self.samples if s.name == name]

    def total(self, *names: str) -> float | None:
        """Sum of the first of `names` that is present (names are the same metric across vLLM versions)."""
        for name in names:
            found = self.values(name)
            if found:
                return sum(s.value for s in found if not math.isnan(s.value))
        return None

    def maximum(self, *names: str) -> float | None:
        for name in names:
            found = [s.value for s in self.values(name) if not math.isnan(s.value)]
            if found:
                return max(found)
        return None

    def labels(self, name: str) -> dict[str, str] | None:
        found = self.values(name)
        return found[0].labels if found else None


def parse_prometheus(text: str) -> MetricsSnapshot:
    """Prometheus text exposition format -> samples (comments and malformed lines skipped)."""
    snap = MetricsSnapshot(t=time.monotonic())
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line.strip())
        if not m:
            continue
        labels = {k: bytes(v, "utf-8").decode("unicode_escape") for k, v in _LABEL.findall(m.group(2) or "")}
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        snap.samples.append(Sample(m.group(1), labels, value))
    return snap


def fetch_metrics_text(base_url: str, api_key: str | None = None, timeout_s: float = 5.0) -> str:
    """GET {base_url}/metrics (the key is sent in case the server protects it)."""
    req = urllib.request.Request(base_url.rstrip("/") + "/metrics")
    if api_key:
        req.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:
        return resp.read().decode("utf-8", "replace")


def scrape(base_url: str, api_key: str | None = None, timeout_s: float = 5.0) -> MetricsSnapshot:
    """One parsed scrape of a server's /metrics."""
    return parse_prometheus(fetch_metrics_text(base_url, api_key, timeout_s))


def wait_idle(targets: list[tuple[str, str | None]], timeout_s: float = 120.0, poll_s: float = 0.1) -> float:
    """Until every server's queue is empty (waiting + running == 0 on /metrics), so one load step's backlog does
    not load the next; returns the seconds waited. Raises TimeoutError when a server is still busy (or does not
    answer) after `timeout_s`."""
    t0 = time.monotonic()
    busy = list(targets)
    while True:
        still = []
        for url, key in busy:
            try:
                snap = scrape(url, key)
            except (urllib.error.URLError, OSError, TimeoutError):
                still.append((url, key))
                continue
            if (snap.total(WAITING_METRIC) or 0.0) + (snap.total(RUNNING_METRIC) or 0.0) > 0:
                still.append((url, key))
        busy = still
        if not busy:
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{len(busy)} server(s) still busy after {timeout_s:g} s: {busy[0][0]}")
        time.sleep(poll_s)


def stats_from_snapshot(snap: MetricsSnapshot, since: MetricsSnapshot | None = None) -> ServerStats:
    """ServerStats from one scrape; counters (preemptions, prefix hits) as deltas from `since` when given.

    `peak_kv_usage` here is the usage at this instant; `MetricsScraper` keeps the peak over a run.
    """

    def delta(names: tuple[str, ...]) -> float | None:
        now = snap.total(*names)
        if now is None:
            return None
        before = since.total(*names) if since is not None else None
        return now - (before or 0.0)

    stats = ServerStats()
    stats.peak_kv_usage = snap.maximum(*KV_USAGE_METRICS)
    pre = delta(PREEMPTION_METRICS)
    stats.preemptions = int(round(pre)) if pre is not None else None
    hits, queries = delta(PREFIX_HITS_METRICS), delta(PREFIX_QUERIES_METRICS)
    if hits is not None and queries:
        stats.prefix_cache_hit_rate = hits / queries
    cap = capacity_from_cache_info(snap)
    stats.kv_cache_blocks, stats.kv_cache_tokens, stats.max_concurrency = (
        cap.kv_cache_blocks, cap.kv_cache_tokens, cap.max_concurrency
    )
    return stats


def capacity_from_cache_info(snap: MetricsSnapshot) -> LogCapacity:
    """KV capacity from the `vllm:cache_config_info` labels.

    vLLM 0.32 exports `num_gpu_blocks`, `block_size`, `kv_cache_size_tokens` and `kv_cache_max_concurrency`
    (CPU build too, where "gpu" blocks are CPU blocks); older versions only the first two, so tokens fall back
    to blocks x block size.
    """
    cap = LogCapacity()
    info = snap.labels(CACHE_INFO_METRIC)
    if not info:
        return cap

    def number(key: str) -> float | None:
        try:
            return float(info[key])
        except (KeyError, ValueError):
            return None

    blocks, block_size = number("num_gpu_blocks"), number("block_size")
    tokens, conc = number("kv_cache_size_tokens"), number("kv_cache_max_concurrency")
    cap.kv_cache_blocks = int(blocks) if blocks is not None else None
    if tokens is not None:
        cap.kv_cache_tokens = int(tokens)
    elif blocks is not None and block_size is not None:
        cap.kv_cache_tokens = int(blocks * block_size)
    cap.max_concurrency = conc
    return cap


# CacheConfig fields vLLM computes rather than takes (init=False): capacity goes to ServerStats, the rest is internal
_DERIVED_CACHE_FIELDS = frozenset({
    "engine", "num_gpu_blocks", "num_cpu_blocks", "kv_cache_size_tokens", "kv_cache_max_concurrency",
    "user_specified_block_size", "kv_cache_layout", "effective_attention_block_size", "hash_block_size",
    "cache_hit_alignment_tokens", "use_kda_recoverssm",
})


def settings_from_cache_info(snap: MetricsSnapshot) -> dict[str, bool | int | float | str]:
    """The cache settings a server runs with, from its `vllm:cache_config_info` labels (vLLM's CacheConfig, by
    the names that are also its engine arguments: block_size, gpu_memory_utilization, enable_prefix_caching, ...);
    values typed back from their label strings, unset (`None`) and computed fields left out. Empty when absent."""
    info = snap.labels(CACHE_INFO_METRIC) or {}
    out: dict[str, bool | int | float | str] = {}
    for key, text in sorted(info.items()):
        if key.startswith("_") or key in _DERIVED_CACHE_FIELDS or text in ("None", "", "[]", "{}"):
            continue
        out[key] = _typed(text)
    return out


def _typed(text: str) -> bool | int | float | str:
    if text in ("True", "False"):
        return text == "True"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            continue
    return text


class MetricsScraper:
    """Scrapes one or more servers' /metrics every `period_s` during a run and keeps the peak KV usage.

    Start it right before the measured load and stop it right after: `result()` then reports counters
    (preemptions, prefix-cache hits/queries) as deltas over the run, summed over all servers (replicas), and the
    highest KV usage any server showed. Scrape errors are counted, not raised: a busy server may answer late.

    `series[name]` keeps, for each gauge of SERIES_METRICS, (time.perf_counter() of the scrape round, value summed
    over all servers) for every round in which every server answered, so a steady-state verdict can test the
    server's queue for a trend on the load client's clock.
    """

    def __init__(self, targets: list[tuple[str, str | None]], period_s: float = 0.5, timeout_s: float = 3.0) -> None:
        self.targets = targets  # (base_url, api_key) per server
        self.period_s = period_s
        self.timeout_s = timeout_s
        self.first: list[MetricsSnapshot | None] = [None] * len(targets)
        self.last: list[MetricsSnapshot | None] = [None] * len(targets)
        self.peak_kv_usage: float | None = None
        self.scrapes = 0
        self.errors = 0
        self.series: dict[str, list[tuple[float, float]]] = {name: [] for name in SERIES_METRICS}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _scrape_all(self) -> None:
        t = time.perf_counter()
        sums: dict[str, float] | None = dict.fromkeys(SERIES_METRICS, 0.0)
        for i, (url, key) in enumerate(self.targets):
            try:
                snap = scrape(url, key, self.timeout_s)
            except (urllib.error.URLError, OSError, TimeoutError):
                self.errors += 1
                sums = None
                continue
            self.scrapes += 1
            if self.first[i] is None:
                self.first[i] = snap
            self.last[i] = snap
            usage = snap.maximum(*KV_USAGE_METRICS)
            if usage is not None and (self.peak_kv_usage is None or usage > self.peak_kv_usage):
                self.peak_kv_usage = usage
            if sums is not None:
                for name in SERIES_METRICS:
                    value = snap.total(name)
                    if value is None:
                        sums.pop(name, None)
                    elif name in sums:
                        sums[name] += value
        if sums is not None and self.targets:
            t = (t + time.perf_counter()) / 2  # the round's midpoint
            for name, value in sums.items():
                self.series[name].append((t, value))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._scrape_all()

    def start(self) -> MetricsScraper:
        self._scrape_all()  # the baseline for counter deltas
        self._thread = threading.Thread(target=self._loop, name="vllm-metrics", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> ServerStats:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s + self.period_s + 1)
        self._scrape_all()  # the final counters
        return self.result()

    def result(self) -> ServerStats:
        """Peak KV usage over the run; preemptions and prefix-cache hit rate over the run, all servers summed."""
        out = ServerStats(peak_kv_usage=self.peak_kv_usage)
        preempt = hits = queries = 0.0
        have_pre = have_prefix = False
        for first, last in zip(self.first, self.last):
            if first is None or last is None:
                continue
            s = stats_from_snapshot(last, since=first)
            if s.preemptions is not None:
                preempt += s.preemptions
                have_pre = True
            h = (last.total(*PREFIX_HITS_METRICS) or 0.0) - (first.total(*PREFIX_HITS_METRICS) or 0.0)
            q = (last.total(*PREFIX_QUERIES_METRICS) or 0.0) - (first.total(*PREFIX_QUERIES_METRICS) or 0.0)
            if last.total(*PREFIX_QUERIES_METRICS) is not None:
                hits, queries, have_prefix = hits + h, queries + q, True
            if out.kv_cache_blocks is None:
                out.kv_cache_blocks, out.kv_cache_tokens = s.kv_cache_blocks, s.kv_cache_tokens
                out.max_concurrency = s.max_concurrency
        out.preemptions = int(preempt) if have_pre else None
        out.prefix_cache_hit_rate = (hits / queries) if have_prefix and queries > 0 else None
        return out

    def __enter__(self) -> MetricsScraper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if not self._stop.is_set():
            self.stop()


def merge_stats(from_log: ServerStats, from_metrics: ServerStats) -> ServerStats:
    """Capacity from the log (authoritative), usage from /metrics; each field from whichever source has it."""
    return ServerStats(
        kv_cache_tokens=from_log.kv_cache_tokens if from_log.kv_cache_tokens is not None else from_metrics.kv_cache_tokens,
        kv_cache_blocks=from_log.kv_cache_blocks if from_log.kv_cache_blocks is not None else from_metrics.kv_cache_blocks,
        max_concurrency=from_log.max_concurrency if from_log.max_concurrency is not None else from_metrics.max_concurrency,
        peak_kv_usage=from_metrics.peak_kv_usage,
        preemptions=from_metrics.preemptions,
        prefix_cache_hit_rate=from_metrics.prefix_cache_hit_rate,
    )
