"""Deploy one vLLM configuration and measure it: the one measurement path of `bench`, trials and confirmation.

`deploy()` starts the server(s) of one configuration (replicas on disjoint GPU or core sets, `servers_per_gpu`
servers on each GPU, see `harness.launch.placement`); `Deployment.run()` drives one measured load against them and returns a `RunRecord` with
metrics, client self-check, memory and vLLM's own counters. A bench number and a sweep number are therefore the
same measurement. `attach()` makes a Deployment of servers the harness did not start (`bench --url`): the same
`run()`, without the figures that need the process (its group is an `ExternalGroup`: targets, no processes).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from harness.envinfo import environment
from harness.launch.external import ExternalGroup, base_url, check_served, is_local
from harness.launch.failures import classify
from harness.launch.placement import Slot, pinned_thread, replica_placement
from harness.launch.server import ServerGroup, ServerSpec, stop_groups, wait_all_ready
from harness.load.arrival import Arrival
from harness.load.client import LoadProgress, LoadResult, run_load_sync
from harness.load.window import WindowPlan
from harness.measure.sampler import ResourceSampler
from harness.measure.stats import summarize
from harness.measure.steady import SteadyCriteria, assess
from harness.measure.step import run_window_step
from harness.measure.vllm_metrics import (WAITING_METRIC, MetricsScraper, merge_stats, scrape, server_stats_from_log,
                                          settings_from_cache_info, wait_idle)
from harness.nvml import nvml_session
from harness.records import SLO, Failure, RunMetrics, RunRecord, ServerSide, ServerStats, Steady
from harness.settings import Topology

__all__ = ["ATTACHED_NOTE", "DEFAULT_REQUEST_TIMEOUT_S", "DeployJob", "Deployment", "attach", "deploy",
           "deploy_together"]

DEFAULT_REQUEST_TIMEOUT_S = 600.0


@dataclass
class Deployment:
    """Live servers of one configuration: what `run()` needs to load and observe them."""

    model: str
    settings: dict[str, Any]
    group: ServerGroup | ExternalGroup
    gpu_ids: list[int] = field(default_factory=list)
    startup_s: float | None = None
    server_side: ServerSide | None = None  # attached: what the record cannot have, where the settings came from
    client_cores: tuple[int, ...] = ()  # where the load client's thread runs (CPU host: a core the servers leave)
    served_model_name: str | None = None  # what the servers answer to, when not the model path

    @property
    def served_name(self) -> str:
        """The model name requests must carry: vLLM's --served-model-name (its first), else the model path."""
        named = self.settings.get("served_model_name")
        if isinstance(named, (list, tuple)):
            named = named[0] if named else None
        return str(named or self.served_model_name or self.model)

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self.group.servers if s.pid is not None]

    @property
    def log_paths(self) -> list[str]:
        return [str(s.log_path) for s in self.group.servers]

    @property
    def topology(self) -> Topology:
        """Replicas x TP x PP (and servers per GPU) of the deployed settings."""
        return Topology.of(self.settings)

    def dead_server_failure(self) -> Failure | None:
        """A Failure if any replica exited during the run (crash, OOM under load), else None."""
        for server in self.group.servers:
            code = server.returncode
            if code is not None:
                return classify(server.read_log(), code, False)
        return None

    def log_stats(self) -> ServerStats:
        """What the first replica's log says: KV capacity and where its start-up went (nothing when attached)."""
        if not self.group.servers:
            return ServerStats()
        first = self.group.servers[0]
        return server_stats_from_log(first.read_log(), launched_at=first.launched_at, startup_s=first.startup_s)

    def run(self, workload: Any, requests: list[Any], *, slo: SLO | None = None, plan: dict[str, Any] | None = None,
            rate: float | None = None, burstiness: float = 1.0, concurrency: int | None = None,
            num_requests: int | None = None, duration_s: float | None = None,
            timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
            progress: Callable[[LoadProgress], None] | None = None) -> RunRecord:
        """One measured load: `requests[:warmup]` unmeasured, then the rest at the given rate or concurrency.

        The record's `steady` block judges the measured span (first to last measured send) the way a windowed
        step's window is judged (`harness.measure.steady.assess`), so even a request-count run says whether the
        server kept up; `run_window` is the measurement that a capacity verdict rests on."""
        if rate is not None:
            arrival = Arrival(mode="poisson" if burstiness == 1.0 else "gamma", rate=rate, burstiness=burstiness,
                              num_requests=num_requests, duration_s=duration_s, seed=workload.seed)
        else:
            arrival = Arrival(mode="concurrency", max_concurrency=concurrency or 1, num_requests=num_requests,
                              duration_s=duration_s, seed=workload.seed)
        warmup = min(workload.warmup_requests, max(len(requests) - 1, 0))
        with ResourceSampler(self.pids, self.gpu_ids) as sampler, MetricsScraper(self.group.targets) as scraper:
            with pinned_thread(self.client_cores):
                load = run_load_sync(self.group.targets, requests, arrival, model=self.served_name, api=workload.api,
                                     warmup=warmup, timeout_s=timeout_s, progress=progress)
        measured = [r.send_s for r in load.results if not r.warmup]
        steady = None
        if len(measured) > 1 and max(measured) > min(measured):
            t0 = load.t0_perf_ns / 1e9
            steady = assess(load.results, (min(measured), max(measured)), target_rate=rate,
                            waiting=[(t - t0, v) for t, v in scraper.series[WAITING_METRIC]])
        return self._record(workload, arrival, slo, plan, summarize(load.results, load.duration_s, slo), load,
                            sampler, scraper.result(), steady)

    def run_window(self, workload: Any, requests: list[Any], window: WindowPlan, *, slo: SLO | None = None,
                   plan: dict[str, Any] | None = None, criteria: SteadyCriteria = SteadyCriteria(),
                   progress: Callable[[LoadProgress], None] | None = None,
                   idle_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> RunRecord:
        """One time-window step (`harness.load.window`): wait until the servers are idle (nothing waiting or
        running on /metrics: the last step's backlog must not load this one), then warm-up, window, tail, drain.
        The record's metrics cover the window's arrivals; `steady` is the kept-up verdict (the caller folds the
        SLO judgement in, `harness.study.capacity.step_verdict`)."""
        if self.dead_server_failure() is None:  # a dead server never becomes idle: the step records the failure
            wait_idle(self.group.targets, timeout_s=idle_timeout_s)
        with ResourceSampler(self.pids, self.gpu_ids) as sampler, pinned_thread(self.client_cores):
            step = run_window_step(self.group.targets, requests, window, model=self.served_name, api=workload.api,
                                   slo=slo, criteria=criteria, progress=progress)
        return self._record(workload, window.arrival(), slo, plan, step.metrics, step.load, sampler,
                            step.server or ServerStats(), step.steady, window=window)

    def _record(self, workload: Any, arrival: Arrival, slo: SLO | None, plan: dict[str, Any] | None,
                metrics: RunMetrics, load: LoadResult, sampler: ResourceSampler, from_metrics: ServerStats,
                steady: Steady | None, window: WindowPlan | None = None) -> RunRecord:
        log_stats = self.log_stats()
        arrival_dict = arrival.to_dict()
        if window is not None:
            arrival_dict["window"] = {"warmup_s": window.warmup_s, "step_s": window.step_s, "tail_s": window.tail_s,
                                      "drain_s": window.drain_s}
        record = RunRecord(
            run_id=f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}",
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            model=self.model, settings=dict(self.settings), workload=workload.to_dict(), arrival=arrival_dict,
            slo=slo, argv=self.group.argv, metrics=metrics, client=load.client, memory=sampler.result(),
            server=merge_stats(log_stats, from_metrics), plan=plan, env=environment(), log_paths=self.log_paths,
            startup_s=self.startup_s, steady=steady, server_side=self.server_side)
        record.failure = self.dead_server_failure()
        return record


@dataclass(frozen=True)
class DeployJob:
    """One configuration to start: its model (local path or hub name), settings, slot and log folder, and the name
    its servers serve (None: the model path, vLLM's default)."""

    model: str
    settings: dict[str, Any]
    slot: Slot | None
    log_dir: Path
    served_model_name: str | None = None


@contextlib.contextmanager
def deploy(model: str, settings: dict[str, Any], *, slot: Slot | None = None, log_dir: Path,
           start_timeout_s: float = 900.0, served_model_name: str | None = None) -> Iterator[Deployment]:
    """Start every replica of `settings`, wait until all are ready, tear all down on exit (also on Ctrl-C).

    Raises `ServerStartError` with a classified failure when any replica fails to start.
    """
    with deploy_together([DeployJob(model, settings, slot, log_dir, served_model_name)],
                         start_timeout_s=start_timeout_s) as (dep,):
        yield dep


@contextlib.contextmanager
def deploy_together(jobs: list[DeployJob], *, start_timeout_s: float = 900.0) -> Iterator[list[Deployment]]:
    """Several deployments started at once (one configuration of one model each; the models may differ, as on a
    node shared between models): their start-ups (minutes each on GPUs, for torch.compile and CUDA graphs) overlap
    instead of adding up. All are torn down on exit or on any start failure.

    Servers that share a GPU (deployments on one GPU, or the `servers_per_gpu` servers of one configuration, each
    with its share of gpu_memory_utilization) start one after another instead: vLLM sizes its KV cache from the
    device's free memory before and after its own profiling run, so memory another server allocates meanwhile
    would be counted as this server's (a smaller KV cache, or a failed start). A server starts once every server
    started before it on one of its GPUs is ready. Each GPU's first server starts at once, then each one's
    second, ...: 2 replicas x 3 servers per GPU take 3 start-ups in turn, not 6.
    """
    groups: list[ServerGroup] = []
    gpu_ids: list[list[int]] = []
    for job in jobs:
        placement = replica_placement(job.settings, job.slot)
        job.log_dir.mkdir(parents=True, exist_ok=True)
        groups.append(ServerGroup([ServerSpec(model=job.model, settings=job.settings, gpus=p.gpus, env=p.env,
                                              cpu_cores=p.cpu_cores, log_path=job.log_dir / f"server{i}.log",
                                              start_timeout_s=start_timeout_s, served_model_name=job.served_model_name)
                                   for i, p in enumerate(placement)]))
        gpu_ids.append(list(dict.fromkeys(g for p in placement for g in (p.gpus or []))))
    try:
        taken: set[int] = set()  # GPUs of the servers started so far
        for k, group in enumerate(groups):
            # each GPU's first server first (then each one's second, ...), so that different GPUs' turns overlap
            gpus = [set(s.gpus) for s in group.servers]
            turn = [sum(1 for j in range(i) if gpus[j] & gpus[i]) for i in range(len(gpus))]
            for i in sorted(range(len(gpus)), key=lambda i: turn[i]):
                shared = taken & gpus[i]
                if shared:  # the started servers on this server's GPUs (of the groups started so far)
                    wait_all_ready(groups[:k + 1], shared)
                group.servers[i].start()
                taken |= gpus[i]
        wait_all_ready(groups)
        yield [Deployment(model=job.model, settings=dict(job.settings), group=group, gpu_ids=ids,
                          startup_s=group.startup_s, served_model_name=job.served_model_name,
                          client_cores=job.slot.client_cores if job.slot is not None else ())
               for job, group, ids in zip(jobs, groups, gpu_ids)]
    finally:
        stop_groups(groups)


ATTACHED_NOTE = ("attached: no process figures (per-process GPU memory, process RSS, the start-up log: KV capacity "
                 "from the log, start-up time; no argv); /metrics scraped")


def attach(urls: str | list[str], api_key: str | None, model: str) -> Deployment:
    """A Deployment of running servers (replicas of `model`) the harness did not start, checked first: each answers
    `/v1/models` with `api_key` and serves `model` (else a one-line UserError). Its settings are what the servers
    report (`max_model_len` from /v1/models, the cache settings from /metrics), marked as observed; its GPU memory
    is the whole of every device of this host when the servers are local and NVML exists, else none.
    """
    bases = [base_url(u) for u in ([urls] if isinstance(urls, str) else urls)]
    settings: dict[str, Any] = {}
    observed: dict[str, str] = {}
    card = check_served(bases[0], api_key, model)
    for other in bases[1:]:
        check_served(other, api_key, model)
    if card.max_model_len is not None:
        settings["max_model_len"], observed["max_model_len"] = card.max_model_len, "/v1/models"
    try:
        cache = settings_from_cache_info(scrape(bases[0], api_key))
        has_metrics = True
    except OSError:  # urllib's URLError/HTTPError and timeouts: a server without /metrics is still measured
        cache, has_metrics = {}, False
    for key, value in cache.items():
        settings.setdefault(key, value)
        observed.setdefault(key, "/metrics vllm:cache_config_info")
    gpu_ids: list[int] = []
    if all(is_local(b) for b in bases):
        with nvml_session() as nv:
            gpu_ids = list(range(nv.nvmlDeviceGetCount())) if nv is not None else []
    note = ATTACHED_NOTE if has_metrics else ATTACHED_NOTE.replace("/metrics scraped", "/metrics did not answer")
    side = ServerSide(note=note, urls=bases, observed=observed, metrics_endpoint=has_metrics,
                      gpu_memory="whole device: every process on this host's GPUs, not only the server's"
                      if gpu_ids else None)
    return Deployment(model=model, settings=settings, group=ExternalGroup([(b, api_key) for b in bases]),
                      gpu_ids=gpu_ids, server_side=side)
