"""Measure one vLLM configuration for real: `python -m harness.bench --model M --set k=v --workload W`.

Starts the configuration's server(s), drives one measured load and prints the numbers; the record (JSON) and the
server logs go under `results/bench/`. It measures through `harness.deploy`, as every sweep trial does, so a bench
number and a sweep number are the same measurement.

With `--url http://HOST:PORT [--api-key KEY] --model SERVED_NAME [--tokenizer DIR]` it measures a server it did not
start (a production replica, a server started by hand) the same way; the record then says which figures need the
server's process and are absent (`server_side`), and its settings are what the server reports.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.deploy import attach, deploy
from harness.emit import read_config
from harness.errors import UserError, main_guard
from harness.launch.placement import Slot, client_cores, cpu_slots
from harness.launch.server import ServerStartError
from harness.launch.vllm_args import load_argspec
from harness.load.arrival import Arrival
from harness.load.progress import StepDisplay
from harness.load.prompts import RequestSpec, build_requests
from harness.load.tokenizer import load_tokenizer
from harness.load.window import DEFAULT_WARMUP_S, WindowPlan, WindowSpec
from harness.load.workload import Workload, load_workload
from harness.measure.steady import SteadyCriteria
from harness.models.build import served_path
from harness.plan import Hardware, detect_hardware, load_model_facts, plan_candidate
from harness.plan.hardware import size_cpu_launch
from harness.records import SLO, RunRecord, parse_slo, save_record, to_dict
from harness.settings import Topology
from harness.study.capacity import step_verdict, validate_steady_keys
from harness.yamlfile import parse_scalars

DEFAULT_START_TIMEOUT_S = 900.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local model directory or hub name (or take it from --config); with --url the "
                                    "name the server serves")
    p.add_argument("--url", action="append", metavar="http://HOST:PORT",
                   help="measure this running server instead of starting one (repeat for replicas of one model)")
    p.add_argument("--api-key", help="with --url: the server's API key (--api-key=KEY when it begins with -)")
    p.add_argument("--tokenizer", help="with --url: the served model's tokenizer directory (default: --model, if a "
                                       "local directory)")
    p.add_argument("--config", help="a config in the user's format (vllm: block); --set overrides its values")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a vLLM setting by its config name, e.g. max_num_seqs=64 (repeatable)")
    p.add_argument("--workload", default="chat-short", help="preset name or workload YAML file")
    p.add_argument("--duration", type=float, help="seconds of measured load (default: the workload's request count); "
                   "with --rate: a steady-state window step, the verdict printed (warm-up first, then the drain)")
    p.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S,
                   help=f"with --rate and --duration: seconds of warm-up before the window (floor; default "
                        f"{DEFAULT_WARMUP_S:g})")
    p.add_argument("--steady-fraction", type=float, default=0.95,
                   help="with --rate and --duration: completions in the window must reach this x arrivals")
    p.add_argument("--num-requests", type=int, help="measured requests (default: the workload's)")
    p.add_argument("--concurrency", type=int, help="closed loop with this many requests in flight (default 16)")
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma arrivals (1 = Poisson)")
    p.add_argument("--slo", action="append", default=[], metavar="METRIC=MS",
                   help="goodput thresholds: ttft_ms=500 tpot_ms=50 e2e_ms=10000 (repeatable)")
    p.add_argument("--gpus", help="GPU indices to use, e.g. 0,1 (default: the first ones the config needs)")
    p.add_argument("--results-dir", default="results", help="where the JSON record and the server log go")
    p.add_argument("--start-timeout", type=float, help="seconds to wait for the server (default 900)")
    p.add_argument("--seed", type=int, help="prompt seed (default: the workload's)")
    return p.parse_args(argv)


def _slo(items: list[str]) -> SLO | None:
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
            whole = record.server_side is not None and record.server_side.gpu_memory is not None
            rows.append(("peak GPU memory (MiB, whole device)" if whole else "peak GPU memory (MiB)",
                         f"{mem.peak_gpu_memory_mib:.0f}"))
        if mem.rss_peak_mib is not None:
            rows.append(("server RSS peak (MiB)", f"{mem.rss_peak_mib:.0f}"))
    if record.client is not None:
        c = record.client
        rows.append(("client check", "valid" if c.valid else "INVALID: " + "; ".join(c.reasons)))
        rows.append(("client dispatch lag p99 (ms) / CPU (%)",
                     f"{c.dispatch_lag_p99_ms:.2f} / {c.client_cpu_percent:.0f}"))
    if record.startup_s is not None:
        rows.append(("server start-up (s)", f"{record.startup_s:.1f}"))
    if record.server_side is not None:
        rows.append(("server side", record.server_side.note))
    rows += steady_rows(record)
    width = max(len(k) for k, _ in rows) if rows else 0
    for k, v in rows:
        print(f"{k:<{width}}  {v}", file=out)


def steady_rows(record: RunRecord) -> list[tuple[str, str]]:
    """The steady block: did the server keep up over the window, and why not."""
    st = record.steady
    if st is None:
        return []
    rows = [("steady", "holds" if st.holds else "DOES NOT HOLD"),
            ("window (s) / warm-up (s)", f"{st.window_s:.1f} / {st.warmup_s:.1f}"),
            ("offered / served in the window (req/s)", f"{st.offered_rate:.3f} / {st.achieved_rate:.3f}"),
            ("completion ratio (needed)", f"{st.completion_ratio:.3f} ({st.fraction:g})"),
            ("in flight: mean / growth (limit)", f"{st.inflight_mean:.1f} / {st.inflight_growth:+.1f} "
                                                 f"({st.growth_limit:.1f})")]
    if st.waiting_growth is not None:
        rows.append(("server queue growth (limit)", f"{st.waiting_growth:+.1f} ({st.growth_limit:.1f})"))
    rows += [("not steady because", reason) for reason in st.reasons]
    rows += [("note", warning) for warning in st.warnings]
    return rows


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.url:
        return _bench_attached(args)
    for name, value in (("--api-key", args.api_key), ("--tokenizer", args.tokenizer)):
        if value is not None:
            raise UserError("only applies with --url (a server the harness starts gets its own key and the "
                            "model's tokenizer)", key=name)
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
    _check_load_args(args)
    load_argspec().check(settings, args.config or "--set")
    workload = load_workload(args.workload)
    slo = _slo(args.slo)
    model_path = served_path(model) if Path(model).exists() else model
    hardware = detect_hardware(None, None)
    settings = _size_cpu_launch(settings, hardware)
    plan_dict = _plan(model_path, settings, hardware, workload.max_total_tokens(), args.config or "--set")
    tokenizer = load_tokenizer(model_path, key="--model")
    load = _build_load(args, workload, tokenizer)
    slot = _slot(args.gpus, settings, hardware)
    run_dir = _run_dir(args)
    print(f"starting vLLM for {model} with {settings or 'vLLM defaults'} ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        with deploy(model_path, settings, slot=slot, log_dir=run_dir,
                    start_timeout_s=args.start_timeout or DEFAULT_START_TIMEOUT_S) as dep:
            print(f"ready in {dep.startup_s:.1f} s; running workload '{workload.name}' ...", file=sys.stderr,
                  flush=True)
            record = _measure(dep, args, workload, load, slo, plan_dict)
    except ServerStartError as exc:
        path = run_dir / "failure.json"
        path.write_text(json.dumps({"model": model, "settings": settings, "failure": to_dict(exc.failure)},
                                   indent=2))
        print(f"error: the server did not start ({exc.failure.kind}): {exc.failure.message}", file=sys.stderr)
        if exc.failure.max_fitting_len:
            print(f"hint: vLLM estimates the longest max_model_len that fits is {exc.failure.max_fitting_len}",
                  file=sys.stderr)
        print(f"log: {exc.log_path}  record: {path}", file=sys.stderr)
        return 3
    return _finish(record, run_dir, t0)


# options that configure a server the harness starts; a server it attaches to runs with its own
_LAUNCH_ONLY = ("--set", "--config", "--gpus", "--start-timeout")


def _bench_attached(args: argparse.Namespace) -> int:
    """`--url`: check the server, drive the same load at it, record what can be observed from outside."""
    given = {"--set": bool(args.set), "--config": args.config is not None, "--gpus": args.gpus is not None,
             "--start-timeout": args.start_timeout is not None}
    refused = [name for name in _LAUNCH_ONLY if given[name]]
    if refused:
        raise UserError(f"{' '.join(refused)} configure a server the harness starts; with --url the server runs "
                        "with its own settings (drop them)", key=refused[0])
    if not args.model:
        raise UserError("give --model: the name the server serves (its GET /v1/models lists them)", key="--model")
    _check_load_args(args)
    tokenizer_path = args.tokenizer
    if tokenizer_path is None:
        if not Path(args.model).is_dir():
            raise UserError(f"{args.model!r} is not a local directory; give --tokenizer DIR (the served model's "
                            "tokenizer, for prompts of exact token lengths)", key="--tokenizer")
        tokenizer_path = args.model
    elif not Path(tokenizer_path).exists():
        raise UserError("no such tokenizer directory", source=tokenizer_path, key="--tokenizer")
    workload = load_workload(args.workload)
    slo = _slo(args.slo)
    dep = attach(args.url, args.api_key, args.model)
    load = _build_load(args, workload, load_tokenizer(str(Path(tokenizer_path).resolve()), key="--tokenizer"))
    run_dir = _run_dir(args)
    urls = ", ".join(dep.server_side.urls) if dep.server_side else ""
    print(f"attached to {urls} serving {args.model} (observed: {dep.settings or 'nothing'}); running workload "
          f"'{workload.name}' ...", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    record = _measure(dep, args, workload, load, slo, None)
    return _finish(record, run_dir, t0)


def _check_load_args(args: argparse.Namespace) -> None:
    for name, value in (("--duration", args.duration), ("--rate", args.rate), ("--burstiness", args.burstiness)):
        if value is not None and value <= 0:
            raise UserError(f"must be > 0, got {value}", key=name)
    for name, value in (("--num-requests", args.num_requests), ("--concurrency", args.concurrency)):
        if value is not None and value < 1:
            raise UserError(f"must be >= 1, got {value}", key=name)
    if args.rate is not None and args.concurrency is not None:
        raise UserError("choose one load: --rate (open loop) or --concurrency (closed loop)", key="--rate")
    for key, value in (("--warmup", {"warmup_s": args.warmup}), ("--steady-fraction",
                                                                  {"steady_fraction": args.steady_fraction})):
        try:
            validate_steady_keys(value)
        except UserError as exc:
            raise UserError(str(exc).split(": ", 1)[-1], key=key) from None


@dataclass
class _Load:
    """The load the options ask for: its requests (warm-up first), concurrency (closed loop) and request count;
    `window`: --rate with --duration, a steady-state step as a capacity search measures it."""

    requests: list[RequestSpec]
    concurrency: int | None
    num: int | None
    window: WindowPlan | None = None


def _measure(dep: Any, args: argparse.Namespace, workload: Workload, load: _Load, slo: SLO | None,
             plan: dict[str, Any] | None) -> RunRecord:
    """The one measurement of bench (launched or attached), with live progress; a window step's record gets the
    steady verdict with the SLO percentiles folded in, as a capacity search judges it."""
    display = StepDisplay(prefix="    ")
    try:
        if load.window is not None:
            w = load.window
            print(f"steady-state step: {args.rate:g} req/s, {w.warmup_s:g} s warm-up, {w.step_s:g} s window "
                  f"({w.requests_needed()} requests)", file=sys.stderr, flush=True)
            record = dep.run_window(workload, load.requests, w, slo=slo, plan=plan, progress=display,
                                    criteria=SteadyCriteria(fraction=args.steady_fraction))
            if record.steady is not None:
                record.steady = step_verdict(record, record.steady, slo)
            return record
        return dep.run(workload, load.requests, slo=slo, plan=plan, rate=args.rate, burstiness=args.burstiness,
                       concurrency=load.concurrency, num_requests=load.num, duration_s=args.duration,
                       progress=display)
    finally:
        display.finish()


def _build_load(args: argparse.Namespace, workload: Workload, tokenizer: Any) -> _Load:
    concurrency = args.concurrency if args.rate is None else None
    if args.rate is None and concurrency is None:
        concurrency = 16
    num = args.num_requests or (None if args.duration else workload.num_requests or 64)
    arrival = (Arrival(mode="poisson" if args.burstiness == 1.0 else "gamma", rate=args.rate,
                       burstiness=args.burstiness, num_requests=num, duration_s=args.duration)
               if args.rate else Arrival(mode="concurrency", max_concurrency=concurrency, num_requests=num,
                                         duration_s=args.duration))
    window = (WindowSpec(step_s=args.duration, warmup_s=args.warmup, burstiness=args.burstiness).plan(args.rate)
              if args.rate is not None and args.duration is not None else None)
    n_build = (window.requests_needed() if window is not None else None) or arrival.requests_needed() or num or 64
    requests = build_requests(workload, tokenizer, n_build + workload.warmup_requests,
                              seed=args.seed if args.seed is not None else workload.seed)
    return _Load(requests, concurrency, num, window)


def _run_dir(args: argparse.Namespace) -> Path:
    return Path(args.results_dir) / "bench" / f"{_dt.datetime.now():%Y%m%d-%H%M%S}"


def _finish(record: RunRecord, run_dir: Path, t0: float) -> int:
    """Save the record, print the table; exit code 3 when a server died during the run."""
    path = save_record(record, run_dir / "record.json")
    _print_table(record)
    where = (f"server log(s): {', '.join(record.log_paths)}" if record.server_side is None
             else f"server: {', '.join(record.server_side.urls)} ({record.server_side.note})")
    print(f"\nrecord: {path}\n{where}\nwall time {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if record.failure is not None:
        print(f"error: a server died during the run ({record.failure.kind}): {record.failure.message}",
              file=sys.stderr)
        return 3
    return 0


def _looks_like_hub_name(model: str) -> bool:
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "/"))


def _slot(gpus: str | None, settings: dict[str, Any], hardware: Hardware) -> Slot:
    """--gpus, else the first GPUs the config needs; on the CPU host the cores a sweep trial gets (the load client
    keeps a core of its own, see harness.launch.placement.cpu_slots)."""
    if gpus:
        return Slot(gpu_ids=tuple(int(g) for g in gpus.split(",")))
    if hardware.is_cpu:
        return Slot(cpu_cores=cpu_slots(1)[0], client_cores=client_cores(1))
    return Slot(gpu_ids=tuple(range(Topology.of(settings).gpus)))


def _size_cpu_launch(settings: dict[str, Any], hardware: Hardware) -> dict[str, Any]:
    """On the CPU build, vLLM's default gpu_memory_utilization lowered to what the memory node holds now (said on
    stderr): the default would make vLLM refuse to start."""
    settings, note = size_cpu_launch(settings, hardware)
    if note:
        print(f"planner: {note}", file=sys.stderr)
    return settings


def _plan(model: str, settings: dict[str, Any], hardware: Hardware, longest_request: int,
          source: str) -> dict[str, Any] | None:
    """The planner's view of this config, kept in the record to compare with what vLLM reports. A launch the
    planner knows would fail is refused before any server starts: UserError naming the key and the fix."""
    try:
        facts = load_model_facts(model)
    except UserError:
        return None
    plan = plan_candidate(facts, hardware, settings, longest_request=longest_request)
    errors = plan.errors()
    if errors:
        first = errors[0]
        more = f" (and {len(errors) - 1} more: {', '.join(f.key for f in errors[1:])})" if len(errors) > 1 else ""
        raise UserError(f"the planner refuses this launch on {_where(hardware)}: {first.message}"
                        + (f"; fix: {first.fix}" if first.fix else "") + more, source=source, key=first.key)
    for finding in plan.findings:
        if finding.severity == "warning":
            print(f"planner: warning: {finding.key}: {finding.message}"
                  + (f"; fix: {finding.fix}" if finding.fix else ""), file=sys.stderr)
    return plan.to_dict()


def _where(hardware: Hardware) -> str:
    return "this CPU host" if hardware.is_cpu else f"{hardware.count} x {hardware.name}"


if __name__ == "__main__":
    sys.exit(main())
