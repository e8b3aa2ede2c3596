"""Measure one vLLM configuration for real: `python -m harness.bench --model M --set k=v --workload W`.

`deploy()` starts the server(s) of one configuration (replicas on disjoint GPU or core sets); `Deployment.run()`
drives one measured load against them and returns a `RunRecord` with metrics, client self-check, memory and
vLLM's own counters. The sweep calls the same two functions for every trial, so a bench number and a sweep number
are the same measurement.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator


from harness.errors import UserError, main_guard
from harness.records import SLO, RunRecord, save_record
from harness.yamlfile import parse_scalars

DEFAULT_REQUEST_TIMEOUT_S = 600.0


@dataclass
class Deployment:
    """Live servers of one configuration: what `run()` needs to load and observe them."""

    model: str
    settings: dict[str, Any]
    group: Any  # harness.launch.server.ServerGroup
    gpu_ids: list[int] = field(default_factory=list)
    startup_s: float | None = None

    @property
    def log_paths(self) -> list[str]:
        return [str(s.log_path) for s in self.group.servers]

    def dead_server_failure(self) -> Any:
        """A Failure if any replica exited during the run (crash, OOM under load), else None."""
        from harness.launch.failures import classify

        for server in self.group.servers:
            code = server.returncode
            if code is not None:
                return classify(server.read_log(), code, False)
        return None

    def run(self, workload: Any, requests: list[Any], *, slo: SLO | None = None, plan: dict[str, Any] | None = None,
            rate: float | None = None, burstiness: float = 1.0, concurrency: int | None = None,
            num_requests: int | None = None, duration_s: float | None = None,
            timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S) -> RunRecord:
        """One measured load: `requests[:warmup]` unmeasured, then the rest at the given rate or concurrency."""
        from harness.envinfo import environment
        from harness.load.arrival import Arrival
        from harness.load.client import run_load_sync
        from harness.measure.sampler import ResourceSampler
        from harness.measure.stats import summarize
        from harness.measure.vllm_metrics import MetricsScraper, merge_stats, server_stats_from_log

        if rate is not None:
            arrival = Arrival(mode="poisson" if burstiness == 1.0 else "gamma", rate=rate, burstiness=burstiness,
                              num_requests=num_requests, duration_s=duration_s, seed=workload.seed)
        else:
            arrival = Arrival(mode="concurrency", max_concurrency=concurrency or 1, num_requests=num_requests,
                              duration_s=duration_s, seed=workload.seed)
        warmup = min(workload.warmup_requests, max(len(requests) - 1, 0))
        pids = [s.pid for s in self.group.servers if s.pid is not None]
        with ResourceSampler(pids, self.gpu_ids) as sampler, MetricsScraper(self.group.targets) as scraper:
            load = run_load_sync(self.group.targets, requests, arrival, model=self.model, api=workload.api,
                                 warmup=warmup, timeout_s=timeout_s)
        memory = sampler.result()
        from_metrics = scraper.result()
        log_stats = server_stats_from_log(self.group.servers[0].read_log())
        record = RunRecord(
            run_id=f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%S}-{secrets.token_hex(3)}",
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            model=self.model, settings=dict(self.settings), workload=workload.to_dict(), arrival=arrival.to_dict(),
            slo=slo, argv=self.group.argv, metrics=summarize(load.results, load.duration_s, slo),
            client=load.client, memory=memory, server=merge_stats(log_stats, from_metrics), plan=plan,
            env=environment(), log_paths=self.log_paths, startup_s=self.startup_s)
        record.failure = self.dead_server_failure()
        return record


def replica_placement(settings: dict[str, Any], slot: Any) -> list[dict[str, Any]]:
    """Per replica: its GPUs (a TP group) or its CPU cores, from the trial's slot."""
    from harness.launch.server import cpu_bind_sets, gpu_sets

    replicas = int(settings.get("replicas", 1) or 1)
    per = int(settings.get("tensor_parallel_size", 1) or 1) * int(settings.get("pipeline_parallel_size", 1) or 1)
    gpu_ids = list(getattr(slot, "gpu_ids", ()) or ())
    if gpu_ids:
        sets = gpu_sets(len(gpu_ids), per, replicas)
        return [{"gpus": [gpu_ids[i] for i in s], "env": {}} for s in sets]
    cores = list(getattr(slot, "cpu_cores", ()) or ())
    if replicas > 1 and not cores:
        import os

        cores = sorted(os.sched_getaffinity(0))
    if cores:
        return [{"gpus": None, "env": {"VLLM_CPU_OMP_THREADS_BIND": b}} for b in cpu_bind_sets(cores, replicas)]
    return [{"gpus": None, "env": {}}]


@contextlib.contextmanager
def deploy(model: str, settings: dict[str, Any], *, slot: Any = None, log_dir: Path,
           start_timeout_s: float = 900.0) -> Iterator[Deployment]:
    """Start every replica of `settings`, wait until all are ready, tear all down on exit (also on Ctrl-C).

    Raises `ServerStartError` with a classified failure when any replica fails to start.
    """
    with deploy_together(model, [(settings, slot, log_dir)], start_timeout_s=start_timeout_s) as (dep,):
        yield dep


@contextlib.contextmanager
def deploy_together(model: str, jobs: list[tuple[dict[str, Any], Any, Path]], *,
                    start_timeout_s: float = 900.0) -> Iterator[list[Deployment]]:
    """Several deployments (settings, slot, log dir) started at once: their start-ups (minutes each on GPUs, for
    torch.compile and CUDA graphs) overlap instead of adding up. All are torn down on exit or on any start failure.
    """
    from harness.launch.server import ServerGroup, ServerSpec, stop_groups, wait_all_ready

    groups: list[ServerGroup] = []
    gpu_ids: list[list[int]] = []
    for settings, slot, log_dir in jobs:
        placement = replica_placement(settings, slot)
        log_dir.mkdir(parents=True, exist_ok=True)
        groups.append(ServerGroup([ServerSpec(model=model, settings=settings, gpus=p["gpus"], env=p["env"],
                                              log_path=log_dir / f"server{i}.log", start_timeout_s=start_timeout_s)
                                   for i, p in enumerate(placement)]))
        gpu_ids.append([g for p in placement for g in (p["gpus"] or [])])
    try:
        for group in groups:
            group.start()
        wait_all_ready(groups)
        yield [Deployment(model=model, settings=dict(settings), group=group, gpu_ids=ids, startup_s=group.startup_s)
               for (settings, _, _), group, ids in zip(jobs, groups, gpu_ids)]
    finally:
        stop_groups(groups)


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model directory or hub name (or take it from --config)")
    p.add_argument("--config", help="a config in the user's format (vllm: block); --set overrides its values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a vLLM setting by its config name, e.g. max_num_seqs=64 (repeatable)")
    p.add_argument("--workload", default="chat-short", help="preset name or workload YAML file")
    p.add_argument("--duration", type=float, help="seconds of measured load (default: the workload's request count)")
    p.add_argument("--num-requests", type=int, help="measured requests (default: the workload's)")
    p.add_argument("--concurrency", type=int, help="closed loop with this many requests in flight (default 16)")
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals (1 = Poisson)")
    p.add_argument("--slo", action="append", default=[], metavar="METRIC=MS",
                   help="goodput thresholds: ttft_ms=500 tpot_ms=50 e2e_ms=10000 (repeatable)")
    p.add_argument("--gpus", help="GPU indices to use, e.g. 0,1 (default: the first ones the config needs)")
    p.add_argument("--results-dir", default="results", help="where the JSON record and the server log go")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for the server")
    p.add_argument("--seed", type=int, help="prompt seed (default: the workload's)")
    return p.parse_args(argv)


def _slo(items: list[str]) -> SLO | None:
    from harness.study.sweepfile import parse_slo

    if not items:
        return None
    data = parse_scalars(items, "--slo")
    return parse_slo(data, "--slo", key="--slo")


def _print_table(record: RunRecord, out: Any = sys.stdout) -> None:
    m = record.metrics
    rows: list[tuple[str, str]] = []
    if m is not None:
        rows += [("completed / failed requests", f"{m.completed} / {m.failed}"),
                 ("duration (s)", f"{m.duration_s:.2f}"),
                 ("request throughput (req/s)", f"{m.request_throughput:.3f}"),
                 ("output throughput (tok/s)", f"{m.output_throughput:.1f}"),
                 ("total token throughput (tok/s)", f"{m.total_token_throughput:.1f}")]
        if m.goodput is not None:
            rows.append(("goodput (req/s)", f"{m.goodput:.3f}"))
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            st = getattr(m, name)
            if st is not None:
                rows.append((f"{name[:-3].upper()} mean / p50 / p90 / p99 (ms)",
                             f"{st.mean:.2f} / {st.p50:.2f} / {st.p90:.2f} / {st.p99:.2f}"))
        if m.prefix_cached_fraction is not None:
            rows.append(("prompt tokens from the prefix cache", f"{m.prefix_cached_fraction:.1%}"))
    if record.server is not None:
        s = record.server
        rows.append(("KV cache capacity (tokens)", str(s.kv_cache_tokens)))
        rows.append(("peak KV usage / preemptions",
                     f"{'-' if s.peak_kv_usage is None else f'{s.peak_kv_usage:.1%}'} / {s.preemptions}"))
    if record.plan and record.plan.get("kv_cache_tokens") is not None:
        rows.append(("planned KV capacity (tokens)", str(record.plan["kv_cache_tokens"])))
    if record.memory is not None:
        mem = record.memory
        if mem.peak_gpu_memory_mib is not None:
            rows.append(("peak GPU memory (MiB)", f"{mem.peak_gpu_memory_mib:.0f}"))
        if mem.rss_peak_mib is not None:
            rows.append(("server RSS peak (MiB)", f"{mem.rss_peak_mib:.0f}"))
    if record.client is not None:
        c = record.client
        rows.append(("client check", "valid" if c.valid else "INVALID: " + "; ".join(c.reasons)))
        rows.append(("client dispatch lag p99 (ms) / CPU (%)",
                     f"{c.dispatch_lag_p99_ms:.2f} / {c.client_cpu_percent:.0f}"))
    if record.startup_s is not None:
        rows.append(("server start-up (s)", f"{record.startup_s:.1f}"))
    width = max(len(k) for k, _ in rows) if rows else 0
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.emit import read_config
    from harness.launch.server import ServerStartError
    from harness.launch.vllm_args import load_argspec
    from harness.load.prompts import build_requests
    from harness.load.workload import load_workload
    from harness.study.slots import Slot
    from harness.study.tune import _load_tokenizer

    settings: dict[str, Any] = {}
    model = args.model
    if args.config:
        cfg = read_config(args.config)
        settings.update(cfg.settings)
        model = model or cfg.model
    settings.update(parse_scalars(args.set, "--set"))
    if not model:
        raise UserError("give --model (a local directory or a hub name) or --config", key="--model")
    if (model.startswith((".", "/")) or Path(model).parent != Path(".")) and not Path(model).exists() \
            and not _looks_like_hub_name(model):
        raise UserError("no such model directory", source=model, key="--model")
    for name, value in (("--duration", args.duration), ("--rate", args.rate), ("--burstiness", args.burstiness)):
        if value is not None and value <= 0:
            raise UserError(f"must be > 0, got {value}", key=name)
    for name, value in (("--num-requests", args.num_requests), ("--concurrency", args.concurrency)):
        if value is not None and value < 1:
            raise UserError(f"must be >= 1, got {value}", key=name)
    if args.rate is not None and args.concurrency is not None:
        raise UserError("choose one load: --rate (open loop) or --concurrency (closed loop)", key="--rate")
    load_argspec().check(settings, args.config or "--set")
    workload = load_workload(args.workload)
    slo = _slo(args.slo)
    model_path = str(Path(model).resolve()) if Path(model).exists() else model
    settings = _size_cpu_launch(settings)
    plan_dict = _plan(model_path, settings)
    tokenizer = _load_tokenizer(model_path)
    concurrency = args.concurrency if args.rate is None else None
    if args.rate is None and concurrency is None:
        concurrency = 16
    num = args.num_requests or (None if args.duration else workload.num_requests or 64)
    from harness.load.arrival import Arrival

    arrival = (Arrival(mode="poisson" if args.burstiness == 1.0 else "gamma", rate=args.rate,
                       burstiness=args.burstiness, num_requests=num, duration_s=args.duration)
               if args.rate else Arrival(mode="concurrency", max_concurrency=concurrency, num_requests=num,
                                         duration_s=args.duration))
    n_build = arrival.requests_needed() or num or 64
    requests = build_requests(workload, tokenizer, n_build + workload.warmup_requests,
                              seed=args.seed if args.seed is not None else workload.seed)
    gpus = tuple(int(g) for g in args.gpus.split(",")) if args.gpus else _default_gpus(settings)
    stamp = f"{_dt.datetime.now():%Y%m%d-%H%M%S}"
    run_dir = Path(args.results_dir) / "bench" / stamp
    print(f"starting vLLM for {model} with {settings or 'vLLM defaults'} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        with deploy(model_path, settings, slot=Slot(gpu_ids=gpus), log_dir=run_dir,
                    start_timeout_s=args.start_timeout) as dep:
            print(f"ready in {dep.startup_s:.1f} s; running workload '{workload.name}' ...", file=sys.stderr,
                  flush=True)
            record = dep.run(workload, requests, slo=slo, plan=plan_dict, rate=args.rate,
                             burstiness=args.burstiness, concurrency=concurrency, num_requests=num,
                             duration_s=args.duration)
    except ServerStartError as exc:
        path = run_dir / "failure.json"
        import json

        from harness.records import to_dict

        path.write_text(json.dumps({"model": model, "settings": settings, "failure": to_dict(exc.failure)},
                                   indent=2))
        print(f"error: the server did not start ({exc.failure.kind}): {exc.failure.message}", file=sys.stderr)
        if exc.failure.max_fitting_len:
            print(f"hint: vLLM estimates the longest max_model_len that fits is {exc.failure.max_fitting_len}",
                  file=sys.stderr)
        print(f"log: {exc.log_path}  record: {path}", file=sys.stderr)
        return 3
    path = save_record(record, run_dir / "record.json")
    _print_table(record)
    print(f"\nrecord: {path}\nserver log(s): {', '.join(record.log_paths)}\n"
          f"wall time {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if record.failure is not None:
        print(f"error: a server died during the run ({record.failure.kind}): {record.failure.message}",
              file=sys.stderr)
        return 3
    return 0


def _looks_like_hub_name(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/"))


def _default_gpus(settings: dict[str, Any]) -> tuple[int, ...]:
    from harness.plan import detect_hardware

    hw = detect_hardware(None, None)
    if getattr(hw, "arch", "") == "cpu":
        return ()
    need = int(settings.get("replicas", 1) or 1) * int(settings.get("tensor_parallel_size", 1) or 1)
    return tuple(range(need))


def _size_cpu_launch(settings: dict[str, Any]) -> dict[str, Any]:
    """On the CPU build, vLLM's default gpu_memory_utilization lowered to what the memory node holds now."""
    from harness.plan import detect_hardware
    from harness.plan.hardware import size_cpu_launch

    settings, note = size_cpu_launch(settings, detect_hardware(None, None))
    if note:
        print(f"planner: {note}", file=sys.stderr)
    return settings


def _plan(model: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The planner's view of this config, kept in the record to compare with what vLLM reports."""
    from harness.plan import detect_hardware, load_model_facts, plan_candidate

    try:
        facts = load_model_facts(model)
    except UserError:
        return None
    plan = plan_candidate(facts, detect_hardware(None, None), settings)
    for finding in plan.findings:
        if getattr(finding, "severity", "") == "error":
            print(f"planner: {finding.message}", file=sys.stderr)
    return plan.to_dict()


if __name__ == "__main__":
    sys.exit(main())
