"""`--confirm`: start every instance of a node layout at once and measure it under the mixed traffic it is for.

A layout is a list of servers, each a model, its settings and its devices: the plan's (`harness.node.emit`
instances) or the user's own `vllm_instances:` (their guide's format: `model_name`, settings, `gpu_devices`).
Measuring one layout:

1. Every server starts at once (`harness.deploy.deploy_together`; all torn down together, also when one fails to
   start) on its devices: GPU i of the layout is the i-th GPU this process may use; on vLLM's CPU build, device i
   is the i-th of as many disjoint core sets as the node has devices (one core each on a 2-core machine), and the
   memory node is shared: an instance that fixes no KV cache (`kv_cache_memory_bytes`) gets an equal share of what
   fits now as its `gpu_memory_utilization`. Each server runs its model's local path (built when the sweep says
   `build:`) and serves the model's name (`served_model_name`, default the sweep's `model_name` or `model`), which
   is the name its requests carry.
2. One mixed load (`harness.measure.step.run_mixed_window_step`): per model a Poisson schedule at its target rate
   with its workload's requests, sent only to its own servers, all models at the same time over one common window
   (`WindowSpec`: warm-up, measured window, tail, drain; the longest warm-up and tail any model needs).
3. Per model, over the window's arrivals: SLO attainment (share of the window's requests that met every SLO limit,
   failures count as misses), goodput (those requests per second of the window), p99 TTFT / TPOT, offered and achieved rate against the target, the steady
   verdict (`harness.measure.steady.assess` on its servers' queue), and memory: peak per GPU (NVML) or, on the CPU
   build, the peak RSS of its server process trees.

A model meets its SLO when its servers kept up (steady) and its attainment is at least the SLO's percentile (p99:
99% of the window's requests within every limit). The plan is recommended only when every model with traffic
meets it; the user's layout, when given, is measured the same way on the same node right after, for comparison.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.deploy import DeployJob, deploy_together
from harness.envinfo import environment
from harness.errors import UserError
from harness.launch.placement import Slot, cpu_slots, visible_gpus
from harness.launch.server import ServerStartError
from harness.load.client import LoadProgress
from harness.load.prompts import build_requests
from harness.load.tokenizer import load_tokenizer
from harness.load.window import WindowSpec, common_window
from harness.load.workload import load_workload
from harness.measure.sampler import ResourceSampler
from harness.measure.step import WindowStep, WindowStream, run_mixed_window_step
from harness.models import ensure_model
from harness.node.build import NodePlan
from harness.node.emit import instances as plan_instances
from harness.plan import detect_hardware
from harness.plan.hardware import CPU_LAUNCH_MARGIN_GIB, cpu_utilization_that_fits
from harness.plan.lint import read_user_config
from harness.records import SLO, RunRecord, save_record, to_dict
from harness.settings import Topology

PROGRESS_EVERY_S = 5.0


# ---------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Instance:
    """One server of a layout: which model (its traffic name), its vLLM settings, its devices on the node."""

    name: str
    settings: dict[str, Any]
    devices: tuple[int, ...]
    label: str  # where it came from: "plan instance 1", "vllm_instances[2]"


@dataclass
class Layout:
    label: str  # "plan" or "user"
    source: str  # the plan's sweep file, or the user's config file
    instances: list[Instance]


def plan_layout(plan: NodePlan) -> Layout:
    """The plan's servers, as `configs/node.yaml` lists them."""
    out = []
    for i, (a, block, gpus) in enumerate(plan_instances(plan), 1):
        settings = {k: v for k, v in block.items() if k != "model_name"}
        out.append(Instance(a.demand.name, settings, tuple(gpus), f"plan instance {i}"))
    return Layout("plan", plan.inputs.sweep.source, out)


def user_layout(path: str | Path, plan: NodePlan) -> Layout:
    """The user's `vllm_instances:` on the plan's node. Each instance's `model_name` must be a model of the sweep
    (its name, model or model_name) and its `gpu_devices` a TP x PP group of the node's GPUs, disjoint from the
    others'; the user's VLLMConfig defaults fill what an instance leaves out, as their tooling does."""
    source = str(path)
    targets = read_user_config(path, user_defaults=True)
    entries = plan.inputs.sweep.models
    known = ", ".join(e.name for e in entries)
    used: dict[int, str] = {}
    out = []
    for t in targets:
        model = str(t.settings.get("model_name"))
        entry = next((e for e in entries if model in (e.name, e.model, e.model_name)), None)
        if entry is None:
            raise UserError(f"'{model}' is not a model of the sweep (models: {known})", source=source,
                            key=f"{t.label}.model_name")
        if t.gpu_devices is None:
            raise UserError("each instance needs gpu_devices: the GPUs it runs on", source=source,
                            key=f"{t.label}.gpu_devices")
        settings = {k: v for k, v in t.settings.items() if k != "model_name"}
        need = Topology.of(settings).gpus
        if len(t.gpu_devices) != need:
            raise UserError(f"{len(t.gpu_devices)} GPU(s) listed for tensor_parallel_size x pipeline_parallel_size = "
                            f"{need}", source=source, key=f"{t.label}.gpu_devices")
        for d in t.gpu_devices:
            if d >= plan.hardware.count:
                raise UserError(f"GPU {d} is not on the node ({plan.hardware.count}x {plan.hardware.name}: GPUs "
                                f"0-{plan.hardware.count - 1})", source=source, key=f"{t.label}.gpu_devices")
            if d in used:
                raise UserError(f"GPU {d} is already taken by {used[d]}", source=source, key=f"{t.label}.gpu_devices")
            used[d] = t.label
        out.append(Instance(entry.name, settings, tuple(t.gpu_devices), t.label))
    return Layout("user", source, out)


# ---------------------------------------------------------------------------------------------- results


@dataclass
class ModelConfirmation:
    """One model's measured result under the mixed load, on the devices the layout gave it."""

    name: str
    layout: str  # "plan" or "user"
    devices: list[list[int]]  # the layout's device indices, one list per server
    placed_on: list[str]  # what each server ran on here: "GPU 2,3" or "cores 0"
    target_rps: float
    slo: SLO
    offered_rps: float = 0.0  # the window's arrivals / window
    achieved_rps: float = 0.0  # completions in the window / window
    requests: int = 0  # arrivals in the window: the requests the figures are over
    failed: int = 0
    slo_attainment: float | None = None  # share of the window's requests within every SLO limit
    goodput_rps: float | None = None  # the window's arrivals within every SLO limit / window
    p99_ttft_ms: float | None = None
    p99_tpot_ms: float | None = None
    kept_up: bool = False  # the steady verdict
    steady_reasons: list[str] = field(default_factory=list)
    client_valid: bool | None = None
    gpu_memory_mib: dict[int, float] = field(default_factory=dict)  # device -> peak MiB (NVML)
    rss_peak_mib: float | None = None  # peak RSS of its server process trees (the CPU build's memory)
    note: str = ""  # why there is no measurement (not served, a server failed)
    record: str | None = None  # the RunRecord JSON of this model's window

    @property
    def meets_slo(self) -> bool:
        """Steady and at least the SLO's percentile of the window's requests within every limit."""
        if self.note or not self.kept_up:
            return False
        return self.slo_attainment is None or self.slo_attainment >= self.slo.percentile / 100.0

    def miss_reason(self) -> str | None:
        if self.meets_slo:
            return None
        if self.note:
            return f"{self.name}: {self.note}"
        parts = []
        if not self.kept_up:
            parts.append("not steady (" + "; ".join(self.steady_reasons) + ")")
        if self.slo_attainment is not None and self.slo_attainment < self.slo.percentile / 100.0:
            parts.append(f"SLO attainment {self.slo_attainment:.1%} < {self.slo.percentile:g}%")
        return f"{self.name}: " + ", ".join(parts)


@dataclass
class ServerRun:
    """One server as it ran: for the record and for checking that a layout's servers ran at the same time."""

    label: str
    name: str
    placed_on: str
    served_model_name: str
    pids: list[int]
    ready_at: float  # wall clock (time.time()) when every server of the layout was ready
    stopped_at: float  # wall clock when the layout's teardown began (the server was still alive then)
    alive_after_load: bool
    requests_sent: int  # requests the client sent to it
    log_paths: list[str]
    first_sent_at: float | None = None  # wall clock of the first request sent to it
    last_done_at: float | None = None  # wall clock when the last request sent to it ended


@dataclass
class LayoutConfirmation:
    label: str
    source: str
    models: list[ModelConfirmation]
    servers: list[ServerRun] = field(default_factory=list)
    failure: str | None = None  # a server did not start, or died under load
    startup_s: float | None = None

    @property
    def meets_all(self) -> bool:
        return self.failure is None and all(m.meets_slo for m in self.models)

    def reasons(self) -> list[str]:
        out = [f"a server failed: {self.failure}"] if self.failure else []
        return out + [r for m in self.models if (r := m.miss_reason())]


@dataclass
class NodeConfirmation:
    plan: LayoutConfirmation
    user_layout: LayoutConfirmation | None  # the user's vllm_instances on the same node, or None
    window: dict[str, float]  # warmup_s, step_s, tail_s, drain_s of the common window
    node: str  # what the numbers ran on here, e.g. "2x NVIDIA L40S" or "CPU build, 2 core sets of 1 core"
    planned_for: str  # the plan's node, e.g. "4x L40S"
    path: str | None = None  # the JSON record
    records: list[str] = field(default_factory=list)  # RunRecord JSON paths, one per model and layout

    @property
    def recommended(self) -> bool:
        return self.plan.meets_all

    def reasons(self) -> list[str]:
        return self.plan.reasons()

    @property
    def duration_s(self) -> float:
        return self.window["step_s"]


# ---------------------------------------------------------------------------------------------- the node here


@dataclass(frozen=True)
class NodeHere:
    """Where a layout's device i runs on this machine."""

    description: str
    slots: list[Slot]  # one per device index of the plan's node
    cpu: bool
    hardware: Any

    def slot(self, devices: tuple[int, ...]) -> Slot:
        if self.cpu:
            return Slot(cpu_cores=tuple(c for d in devices for c in self.slots[d].cpu_cores))
        return Slot(gpu_ids=tuple(g for d in devices for g in self.slots[d].gpu_ids))

    def describe(self, slot: Slot) -> str:
        return ("cores " + ",".join(map(str, slot.cpu_cores))) if self.cpu else (
            "GPU " + ",".join(map(str, slot.gpu_ids)))


def node_here(devices: int) -> NodeHere:
    """This machine as `devices` devices: its GPUs (NVML), else (vLLM's CPU build) that many disjoint core sets."""
    hw = detect_hardware(None, None)
    if hw.is_cpu:
        slots = cpu_slots(devices)  # one unbound slot for a single device
        if len(slots) < devices:
            raise UserError(f"the layout has {devices} devices; on vLLM's CPU build each is a set of cores and this "
                            f"machine has {len(slots)} core(s)", key="--confirm")
        desc = ("vLLM CPU build, all cores unbound" if devices == 1 else
                f"vLLM CPU build, {devices} disjoint core sets of {len(slots[0])} core(s)")
        return NodeHere(desc, [Slot(cpu_cores=s) for s in slots], True, hw)
    if hw.count < devices:
        raise UserError(f"the layout uses {devices} GPU(s); this machine has {hw.count} ({hw.name})", key="--confirm")
    gpus = visible_gpus(devices)
    return NodeHere(f"{devices}x {hw.name} (GPUs {','.join(map(str, gpus))})", [Slot(gpu_ids=(g,)) for g in gpus],
                    False, hw)


def _cpu_memory_shares(layout: Layout, here: NodeHere) -> dict[int, dict[str, Any]]:
    """On the CPU build: settings of the instances that fix no KV cache, with an equal share of the memory that
    fits now as gpu_memory_utilization (several servers share one memory node; a GPU fraction means nothing here)."""
    if not here.cpu or here.hardware.cpu_kv_cache_space_gib is not None:
        return {}
    sized = [i for i, inst in enumerate(layout.instances) if inst.settings.get("kv_cache_memory_bytes") is None]
    if not sized:
        return {}
    share = cpu_utilization_that_fits(here.hardware, CPU_LAUNCH_MARGIN_GIB) / len(layout.instances)
    share = int(share * 100) / 100
    if share <= 0:
        raise UserError(f"the memory node has {here.hardware.available_memory_gib:.2f} GiB available: too little for "
                        f"{len(layout.instances)} CPU servers; fix kv_cache_memory_bytes per model", key="--confirm")
    return {i: {**layout.instances[i].settings, "gpu_memory_utilization": share} for i in sized}


# ---------------------------------------------------------------------------------------------- confirm


def confirm_plan(plan: NodePlan, *, results_dir: Path, user_config: Path | None = None, duration_s: float = 300.0,
                 warmup_s: float = 60.0, start_timeout_s: float = 600.0, out: Any = sys.stderr) -> NodeConfirmation:
    """Measure the plan's layout (and `user_config`'s vllm_instances, when given) on this machine, each with all
    its servers up at once under every model's target traffic; write the JSON record under
    `results_dir/node/<stamp>/` and return the per-model results."""
    layouts = [plan_layout(plan)]
    if user_config is not None:
        layouts.append(user_layout(user_config, plan))  # bad input fails before anything starts
    here = node_here(plan.hardware.count)
    spec = WindowSpec(step_s=duration_s, warmup_s=warmup_s)
    run_dir = Path(results_dir) / "node" / f"{_dt.datetime.now():%Y%m%d-%H%M%S}"
    streams = _model_streams(plan)
    print(f"confirming on {here.description} (planned for {plan.hardware.count}x {plan.hardware.name}); "
          f"window {duration_s:g} s after a warm-up of at least {warmup_s:g} s", file=out, flush=True)
    results = [_measure(layout, plan, streams, here, spec, run_dir, start_timeout_s, out) for layout in layouts]
    plans = results[0][1]
    conf = NodeConfirmation(plan=results[0][0], user_layout=results[1][0] if len(results) > 1 else None,
                            window={k: round(v, 3) for k, v in _window_of(plans).items()}, node=here.description,
                            planned_for=f"{plan.hardware.count}x {plan.hardware.name}")
    conf.records = [m.record for lc, _ in results for m in lc.models if m.record]
    path = run_dir / "confirm.json"
    conf.path = str(path)
    payload = {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "sweep": plan.inputs.sweep.source, "recommended": conf.recommended, "reasons": conf.reasons(),
               **to_dict(conf), "env": environment()}
    for lc, key in ((conf.plan, "plan"), (conf.user_layout, "user_layout")):
        if lc is not None:
            payload[key]["models"] = [{**to_dict(m), "meets_slo": m.meets_slo} for m in lc.models]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return conf


@dataclass(frozen=True)
class _ModelStream:
    """What a model brings to any layout: its local path, served name, workload, tokenizer source, target."""

    name: str
    path: str
    served: str
    workload: Any
    target_rps: float
    slo: SLO


def _model_streams(plan: NodePlan) -> dict[str, _ModelStream]:
    out = {}
    for t in plan.inputs.traffic:
        entry = plan.inputs.entry(t.name)
        out[t.name] = _ModelStream(t.name, ensure_model(entry.model, entry.build), entry.model_name or entry.model,
                                   load_workload(t.workload), t.target_rps, t.slo)
    return out


def _window_of(plans: list[Any]) -> dict[str, float]:
    if not plans:
        return {"warmup_s": 0.0, "step_s": 0.0, "tail_s": 0.0, "drain_s": 0.0}
    p = plans[0]
    return {"warmup_s": p.warmup_s, "step_s": p.step_s, "tail_s": p.tail_s, "drain_s": p.drain_s}


def _measure(layout: Layout, plan: NodePlan, models: dict[str, _ModelStream], here: NodeHere, spec: WindowSpec,
             run_dir: Path, start_timeout_s: float, out: Any) -> tuple[LayoutConfirmation, list[Any]]:
    """Start the layout, run the mixed load, judge each model; a start failure is a result, not an exception."""
    sized = _cpu_memory_shares(layout, here)
    jobs, slots = [], []
    for i, inst in enumerate(layout.instances):
        m = models[inst.name]
        settings = sized.get(i, inst.settings)
        served = _served_name(settings, m.served)
        slot = here.slot(inst.devices)
        slots.append(slot)
        jobs.append(DeployJob(m.path, settings, slot, run_dir / "logs" / layout.label / f"{i + 1}-{inst.name}",
                              None if served == m.path else served))
    _one_name_per_model(layout, jobs, models)
    if sized:
        share = next(iter(sized.values()))["gpu_memory_utilization"]
        print(f"  CPU build: each server without kv_cache_memory_bytes gets gpu_memory_utilization {share:g} "
              f"(an equal share of the memory node)", file=out)
    served_models = {inst.name for inst in layout.instances}
    active = [m for m in models.values() if m.target_rps > 0 and m.name in served_models]
    plans = _plans(active, spec)
    result = LayoutConfirmation(layout.label, layout.source, [])
    print(f"[{layout.label}] starting {len(jobs)} server(s) at once: " + "; ".join(
        f"{inst.name} on {here.describe(s)}" for inst, s in zip(layout.instances, slots)) + " ...", file=out, flush=True)
    t0 = time.monotonic()
    steps: dict[str, WindowStep] = {}
    memory: dict[str, Any] = {}
    try:
        with deploy_together(jobs, start_timeout_s=start_timeout_s) as deps:
            ready_at = time.time()
            result.startup_s = time.monotonic() - t0
            print(f"[{layout.label}] all ready in {result.startup_s:.0f} s; mixed load: " + ", ".join(
                f"{m.name} {m.target_rps:g} req/s" for m in active) + f" (warm-up {plans[0].warmup_s:g} s, window "
                f"{plans[0].step_s:g} s)" if plans else f"[{layout.label}] ready; no model has traffic",
                file=out, flush=True)
            streams = []
            for m, p in zip(active, plans):
                mine = [d for inst, d in zip(layout.instances, deps) if inst.name == m.name]
                targets = [t for d in mine for t in d.group.targets]
                requests = build_requests(m.workload, load_tokenizer(m.path), p.requests_needed(), seed=p.seed)
                streams.append(WindowStream(m.name, targets, requests, p, mine[0].served_name, m.workload.api, m.slo))
            with contextlib.ExitStack() as stack:
                samplers = {m.name: stack.enter_context(ResourceSampler(
                    [pid for inst, d in zip(layout.instances, deps) if inst.name == m.name for pid in d.pids],
                    [g for inst, d in zip(layout.instances, deps) if inst.name == m.name for g in d.gpu_ids]))
                    for m in active}
                steps = run_mixed_window_step(streams, progress=_progress_printer(layout.label, out)) if streams else {}
            memory = {name: s.result() for name, s in samplers.items()}
            stopped_at = time.time()
            dead = [(inst, d.dead_server_failure()) for inst, d in zip(layout.instances, deps)]
            result.failure = "; ".join(f"{inst.label} ({inst.name}) died under load: {f.kind}: {f.message}"
                                       for inst, f in dead if f is not None) or None
            seen: dict[str, int] = {}
            for inst, d, slot in zip(layout.instances, deps, slots):
                k = seen.get(inst.name, 0)
                seen[inst.name] = k + len(d.group.targets)
                step = steps.get(inst.name)
                mine = [r for r in step.load.results if k <= r.replica < seen[inst.name]] if step else []
                at = step.load.started_at if step else 0.0
                result.servers.append(ServerRun(
                    inst.label, inst.name, here.describe(slot), d.served_name, d.pids, ready_at, stopped_at,
                    d.dead_server_failure() is None, len(mine), d.log_paths,
                    min((at + r.send_s for r in mine), default=None),
                    max((at + r.send_s + r.e2e_s for r in mine), default=None)))
    except ServerStartError as exc:
        result.failure = f"a server did not start ({exc.failure.kind}): {exc.failure.message} (log: {exc.log_path})"
        print(f"[{layout.label}] {result.failure}", file=out, flush=True)
    for m in models.values():
        result.models.append(_model_result(layout, m, here, slots, steps.get(m.name), memory.get(m.name), result,
                                           run_dir))
    return result, plans


def _served_name(settings: dict[str, Any], default: str) -> str:
    named = settings.get("served_model_name")
    if isinstance(named, (list, tuple)):
        named = named[0] if named else None
    return str(named or default)


def _one_name_per_model(layout: Layout, jobs: list[DeployJob], models: dict[str, _ModelStream]) -> None:
    names: dict[str, set[str]] = {}
    for inst, job in zip(layout.instances, jobs):
        names.setdefault(inst.name, set()).add(_served_name(job.settings, models[inst.name].served))
    for name, served in names.items():
        if len(served) > 1:
            raise UserError(f"the servers of {name} serve different names ({sorted(served)}): its traffic needs one",
                            source=layout.source, key="served_model_name")


def _plans(active: list[_ModelStream], spec: WindowSpec) -> list[Any]:
    """Each model's step at its target rate (its own arrival seed), shaped to one common window."""
    return common_window([dataclasses.replace(spec.plan(m.target_rps), seed=spec.seed + k)
                          for k, m in enumerate(active)])


def _progress_printer(label: str, out: Any) -> Any:
    latest: dict[str, LoadProgress] = {}
    last = [time.monotonic()]

    def show(name: str, p: LoadProgress) -> None:
        latest[name] = p
        now = time.monotonic()
        if now - last[0] < PROGRESS_EVERY_S:
            return
        last[0] = now
        total = max((q.total_s or 0.0) for q in latest.values())
        print(f"[{label}] {p.elapsed_s:.0f}/{total:.0f} s: " + "; ".join(
            f"{n} sent {q.sent}, done {q.completed}, failed {q.failed}, in flight {q.in_flight}"
            for n, q in latest.items()), file=out, flush=True)

    return show


def _model_result(layout: Layout, m: _ModelStream, here: NodeHere, slots: list[Slot], step: WindowStep | None,
                  memory: Any, result: LayoutConfirmation, run_dir: Path) -> ModelConfirmation:
    mine = [(inst, s) for inst, s in zip(layout.instances, slots) if inst.name == m.name]
    mc = ModelConfirmation(m.name, layout.label, [list(inst.devices) for inst, _ in mine],
                           [here.describe(s) for _, s in mine], m.target_rps, m.slo)
    if m.target_rps <= 0:  # no traffic: nothing to meet, served or not
        mc.kept_up = True
        return mc
    if not mine:
        mc.note = "not served by this layout"
        return mc
    if step is None:
        mc.note = result.failure or "not measured"
        return mc
    met, st = step.metrics, step.steady
    mc.offered_rps, mc.achieved_rps, mc.requests = st.offered_rate, st.achieved_rate, st.requests
    mc.failed = met.failed
    mc.slo_attainment = met.slo_attainment
    if met.slo_attainment is not None and st.window_s > 0:  # per second of the window, like offered and achieved
        mc.goodput_rps = met.slo_attainment * st.requests / st.window_s
    mc.p99_ttft_ms = met.ttft_ms.p99 if met.ttft_ms else None
    mc.p99_tpot_ms = met.tpot_ms.p99 if met.tpot_ms else None
    mc.kept_up, mc.steady_reasons = st.kept_up, list(st.reasons)
    mc.client_valid = step.load.client.valid
    if memory is not None:
        mc.gpu_memory_mib = {g.index: g.memory_peak_mib for g in memory.gpus}
        mc.rss_peak_mib = memory.rss_peak_mib
    if result.failure and any(inst.label in result.failure for inst, _ in mine):
        mc.note = result.failure
    record = RunRecord(
        run_id=f"{run_dir.name}-{layout.label}-{m.name}",
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), model=m.name,
        settings={"layout": layout.label, "instances": [{"settings": inst.settings, "devices": list(inst.devices)}
                                                         for inst, _ in mine]},
        workload=m.workload.to_dict(), arrival=step.plan.arrival().to_dict(), slo=m.slo, argv=[],
        metrics=met, client=step.load.client, memory=memory, server=step.server, env=environment(),
        steady=st)
    mc.record = str(save_record(record, run_dir / "records" / f"{layout.label}-{m.name}.json"))
    return mc


# ---------------------------------------------------------------------------------------------- the table


def print_confirmation(conf: NodeConfirmation, out: Any) -> None:
    """Per model, the plan's row and the user's layout's row side by side; which devices every number used."""
    w = conf.window
    print(f"\nconfirmation on {conf.node} (plan made for {conf.planned_for}); one mixed load, all models at once: "
          f"warm-up {w['warmup_s']:g} s, measured window {w['step_s']:g} s, tail {w['tail_s']:g} s", file=out)
    layouts = [x for x in (conf.plan, conf.user_layout) if x is not None]
    rows = [["MODEL", "LAYOUT", "SERVERS ON", "TARGET", "OFFERED", "ACHIEVED", "SLO ATTAIN", "GOODPUT", "P99 TTFT",
             "P99 TPOT", "STEADY", "MEMORY (PEAK)", "MEETS SLO"]]
    names = [m.name for m in conf.plan.models]
    for name in names:
        for lc in layouts:
            m = next(x for x in lc.models if x.name == name)
            rows.append([name, lc.label, "; ".join(m.placed_on) or "-", f"{m.target_rps:.3g}/s",
                         _num(m.offered_rps if m.requests else None, "/s"),
                         _num(m.achieved_rps if m.requests else None, "/s"),
                         f"{m.slo_attainment:.1%}" if m.slo_attainment is not None else "-",
                         _num(m.goodput_rps, "/s"), _num(m.p99_ttft_ms, " ms"), _num(m.p99_tpot_ms, " ms"),
                         ("yes" if m.kept_up else "no") if m.requests else "-", _memory(m),
                         "yes" if m.meets_slo else ("no: " + m.note if m.note else "no")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip(), file=out)
    for lc in layouts:
        for reason in lc.reasons():
            print(f"  {lc.label}: {reason}", file=out)
    slos = {m.name: m.slo for m in conf.plan.models}
    print("SLO per model: " + "; ".join(f"{n} p{s.percentile:g} " + ", ".join(
        f"{k} {getattr(s, k + '_ms'):g} ms" for k in ("ttft", "tpot", "e2e") if getattr(s, k + "_ms"))
        for n, s in slos.items()), file=out)
    verdict = "RECOMMENDED: every model met its SLO" if conf.recommended else "NOT RECOMMENDED: " + "; ".join(
        conf.reasons())
    print(f"plan: {verdict}\nrecord: {conf.path}", file=out)


def _num(v: float | None, unit: str) -> str:
    return "-" if v is None else f"{v:.3g}{unit}"


def _memory(m: ModelConfirmation) -> str:
    if m.gpu_memory_mib:
        return ", ".join(f"GPU{d} {v / 1024:.1f} GiB" for d, v in sorted(m.gpu_memory_mib.items()))
    return f"RSS {m.rss_peak_mib / 1024:.2f} GiB" if m.rss_peak_mib else "-"
