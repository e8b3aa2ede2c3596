"""`python -m harness.sweep SWEEP --dry-run`: what a sweep would do, before any GPU time.

Per model: the planned feasible share of its space with the pruning reasons counted, the baselines the study would
queue (`tune.study_baselines`, the study's own), the GPU slots its trials would take, an estimate of the device
time, and the exact commands it would launch. Nothing is started, built or written: a model the sweep would build
is planned from its architecture's shipped facts, and no study or storage is opened. The exit code is non-zero
when a model has no feasible candidate, as the sweep itself would refuse it.
"""

from __future__ import annotations

import os
import random
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.launch.placement import Slot, SlotPool, replica_placement
from harness.launch.server import Server, ServerSpec
from harness.load.workload import load_workload
from harness.models.build import resolve_config, served_path
from harness.plan import Plan, load_model_facts, plan_candidate
from harness.plan.estimate import startup_estimate_s
from harness.plan.lint import SpaceReport, infeasible_error, space_feasibility
from harness.plan.modelfacts import ModelFacts, facts_from_config
from harness.space import load_space
from harness.study.sweepfile import ModelEntry, Sweep
from harness.study.timing import MeasuredCosts
from harness.study.trials import BASELINE_NAMES
from harness.study.workers import PRUNED_ALLOWANCE
from harness.settings import Topology
from harness.study.tune import config_path_of, study_baselines

EXAMPLE_DRAWS = 400  # candidates drawn for the sampled example and the GPUs a sampled trial takes on average
DEFAULT_TPOT_S = 0.05  # a closed loop's pace when the SLO sets no TPOT: 50 ms per output token (assumed)
PLACEHOLDER_PORT = 8000  # shown in the commands; a real launch takes a free port and a random API key


@dataclass
class Launch:
    """One configuration the sweep would start: its label, settings, plan and exact command."""

    label: str
    settings: dict[str, Any]
    plan: Plan
    commands: list[str] = field(default_factory=list)  # one shell line per replica (env + argv), display only


@dataclass
class Estimate:
    """Device time of one model's study, and what it assumes."""

    trials: int
    launched: float  # trials expected to start servers (the budget, less what the planner's allowance cuts)
    startup_s: float
    steps: int
    step_s: float
    gpus_per_trial: float
    concurrent: int
    confirm_s: float  # wall time of the confirmation (at worst a start-up per alternating block, then the repeats)
    confirm_gpus: int

    @property
    def trial_s(self) -> float:
        return self.startup_s + self.steps * self.step_s

    @property
    def device_s(self) -> float:
        return self.launched * self.trial_s * self.gpus_per_trial + self.confirm_s * self.confirm_gpus

    @property
    def wall_s(self) -> float:
        return self.launched * self.trial_s / max(self.concurrent, 1) + self.confirm_s


@dataclass
class ModelPlan:
    entry: ModelEntry
    facts: ModelFacts
    note: str  # where the model facts came from (a model the sweep would build first, ...)
    report: SpaceReport
    baselines: list[Launch]
    examples: list[Launch]  # a sampled feasible candidate (and one with servers sharing a GPU, if any)
    slots: SlotPool
    estimate: Estimate
    error: UserError | None


def model_facts(entry: ModelEntry) -> tuple[ModelFacts, str]:
    """The model's facts without building or downloading it: its directory, the HF cache or the shipped facts;
    a model the sweep would build is planned from the architecture it would build."""
    path = Path(entry.model)
    if entry.build and not (path / "config.json").exists():
        facts = facts_from_config(resolve_config(entry.build), entry.model, f"architecture:{entry.build}")
        return facts, f"not built yet: the sweep builds '{entry.build}' into {entry.model} first; planned from that " \
                      f"architecture's config"
    facts = load_model_facts(entry.model)
    return facts, f"model facts: {facts.source}"


def plan_model(sweep: Sweep, entry: ModelEntry, hardware: Any, parallel: int) -> ModelPlan:
    facts, note = model_facts(entry)
    space = load_space(sweep.space).for_model(facts.max_context, entry.fixed)
    workload = load_workload(entry.workload or sweep.workload)
    longest = workload.max_total_tokens()
    report = space_feasibility(space, facts, hardware, longest_request=longest)
    error = infeasible_error(report, source=sweep.source, key=f"models[{entry.name}]")
    n_gpus = hardware.count if not hardware.is_cpu else 0
    slots = SlotPool.for_host(n_gpus, parallel)
    local = entry.build or Path(entry.model).exists() or entry.model.startswith((".", "/"))
    served = served_path(entry.model) if local else entry.model  # what the sweep passes to vLLM

    def launch(label: str, settings: dict[str, Any]) -> Launch:
        plan = plan_candidate(facts, hardware, settings, longest_request=longest)
        return Launch(label, settings, plan, commands(served, settings, slots) if plan.feasible else [])

    baselines = [launch(f"{BASELINE_NAMES.get(k, k)}", v)
                 for k, v in study_baselines(space, config_path_of(sweep, entry), entry.baselines).items()]
    rng = random.Random(sweep.seed)
    drawn = [s for s in (space.sample(rng) for _ in range(EXAMPLE_DRAWS)) if not space.violations(s)]
    plans = [(s, plan_candidate(facts, hardware, s, longest_request=longest)) for s in drawn]
    feasible = [(s, p) for s, p in plans if p.feasible]
    examples = [launch("sampled example", feasible[0][0])] if feasible else []
    shared = [s for s, _ in feasible if Topology.of(s).servers_per_gpu > 1]
    if shared and Topology.of(feasible[0][0]).servers_per_gpu == 1:  # show how servers sharing a GPU start too
        examples.append(launch("sampled example with servers sharing a GPU", shared[0]))
    estimate = estimate_model(sweep, entry, hardware, workload, report, baselines, [p for _, p in feasible], slots,
                              parallel)
    return ModelPlan(entry, facts, note, report, baselines, examples, slots, estimate, error)


def commands(model: str, settings: dict[str, Any], slots: SlotPool) -> list[str]:
    """The exact command of each server (replicas, and servers sharing a GPU), as the sweep would start it
    (`Server.build_argv`) on the pool's first devices; the port and the API key are placeholders (a launch takes a free port and a random key)."""
    slot = (Slot(gpu_ids=tuple(slots.gpu_ids[:max(Topology.of(settings).gpus, 1)])) if slots.gpu_ids else
            Slot(cpu_cores=slots.cpu_sets[0] if slots.cpu_sets else (), client_cores=slots.client_cores))
    out = []
    for replica in replica_placement(settings, slot):
        server = Server(ServerSpec(model=model, settings=settings, gpus=replica.gpus, env=replica.env,
                                   cpu_cores=replica.cpu_cores, port=PLACEHOLDER_PORT, log_path=Path(os.devnull)))
        argv = [("--api-key=<random>" if a.startswith("--api-key=") else a) for a in server.build_argv()]
        env = dict(replica.env)
        if replica.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in replica.gpus)
        pin = ["taskset", "-c", ",".join(str(c) for c in replica.cpu_cores)] if replica.cpu_cores else []
        out.append(shlex.join([f"{k}={v}" for k, v in sorted(env.items())] + pin + argv))
    return out


def estimate_model(sweep: Sweep, entry: ModelEntry, hardware: Any, workload: Any, report: SpaceReport,
                   baselines: list[Launch], sampled: list[Plan], slots: SlotPool, parallel: int) -> Estimate:
    """Start-ups x launched trials + their load steps, and the confirmation; see `describe_estimate` for what it
    assumes. The step duration is the objective's own (`Objective.expected_step_s`)."""
    obj = sweep.objective
    trials = entry.trials or sweep.trials
    n_base = sum(b.plan.feasible for b in baselines)
    # the budget counts launched trials: a rejected baseline or candidate uses none of it, until the rejections
    # pass the allowance (then a space of mostly infeasible candidates launches only its feasible share of them)
    n_sampled = max(trials - n_base, 0)
    launched = n_base + min(n_sampled, report.feasible_fraction * (n_sampled + PRUNED_ALLOWANCE * trials))
    tpot_s = (obj.slo.tpot_ms / 1000.0) if obj.slo.tpot_ms else DEFAULT_TPOT_S
    request_s = (workload.output_len.mean_value() or workload.max_output_tokens() or 256) * tpot_s
    step_s = obj.expected_step_s(request_s)
    weights = [p.weights_gib_per_gpu for p in sampled if p.weights_gib_per_gpu is not None]
    eager = bool(sweep_fixed(baselines).get("enforce_eager"))
    # servers sharing a GPU start one after another: a trial's start-up is theirs in turn
    servers = statistics.fmean([max(p.servers_per_gpu, 1) for p in sampled]) if sampled else 1.0
    startup = servers * startup_estimate_s(hardware, statistics.fmean(weights) if weights else None,
                                           enforce_eager=eager)
    gpus = [max(int(p.gpus_needed or 0), 1) for p in sampled] or [1]
    per_trial = statistics.fmean(gpus) if not hardware.is_cpu else 1.0
    # side by side: as many average trials as the pool's devices hold, at most `parallel` (the pool's CPU slots)
    concurrent = (len(slots.cpu_sets) if not slots.gpu_ids else
                  max(1, min(int(slots.capacity // per_trial), parallel)))
    repeats = sweep.confirm_repeats
    base = baselines[0].plan if baselines else None
    sides = 2 if base is not None and base.feasible else 1  # a pruned baseline has no values: the winner alone
    confirm_s = MeasuredCosts(startup, step_s).confirmation_s(sides, repeats, sweep.confirm_cross_check)
    winner_gpus = max(gpus)
    base_gpus = max(int(base.gpus_needed or 0), 1) if sides == 2 and base is not None else 0
    confirm_gpus = 0 if not repeats else (1 if hardware.is_cpu else
                                          min(winner_gpus + base_gpus, max(slots.capacity, 1)))
    return Estimate(trials, launched, startup, obj.expected_steps(), step_s, per_trial, concurrent, confirm_s,
                    confirm_gpus)


def sweep_fixed(baselines: list[Launch]) -> dict[str, Any]:
    """The settings every candidate shares: the defaults baseline's (the space's fixed ones)."""
    return dict(baselines[0].settings) if baselines else {}


def describe_estimate(e: Estimate, hardware: Any, parallel: int) -> list[str]:
    unit = "CPU-host hours" if hardware.is_cpu else f"GPU-hours ({hardware.name})"
    return ([
        f"estimate: {e.device_s / 3600:.1f} {unit}, wall ~{e.wall_s / 3600:.1f} h with {e.concurrent} trial(s) at "
        f"once (parallel {parallel})",
        f"  = {e.launched:.1f} launched trials (the budget of {e.trials}: candidates the planner rejects cost nothing "
        f"and do not count) x ({e.startup_s:.0f} s start-up + {e.steps} step(s) x {e.step_s:.0f} s) x "
        f"{e.gpus_per_trial:.1f} GPU(s) per trial"
        + (f", + confirmation {e.confirm_s:.0f} s on {e.confirm_gpus} GPU(s)" if e.confirm_s else ""),
    ] if not hardware.is_cpu else [
        f"estimate: {e.device_s / 3600:.1f} {unit}, wall ~{e.wall_s / 3600:.1f} h with {e.concurrent} trial(s) at "
        f"once (parallel {parallel})",
        f"  = {e.launched:.1f} launched trials x ({e.startup_s:.0f} s start-up + {e.steps} step(s) x {e.step_s:.0f} s)"
        + (f", + confirmation {e.confirm_s:.0f} s" if e.confirm_s else ""),
    ]) + [
        f"  assumes: a start-up of {e.startup_s:.0f} s ({hardware.arch}: measured start-ups, "
        "plan.estimate.STARTUP_BASE_S, plus the weights at 2 GiB/s, once per server of a GPU: they start in "
        "turn); every step as long as the objective's first "
        "(Objective.expected_step_s: its requests at the first rate, or duration_s; a closed loop paced by the "
        "SLO's TPOT, else 50 ms, x the workload's mean output), so an upper bound for a capacity search that "
        "doubles the rate; the budget's trials all launched (rejections do not count, up to "
        f"{PRUNED_ALLOWANCE}x the budget of them); GPUs per trial averaged over sampled feasible candidates; a "
        "confirmation's repeats as long as a step (once the study has run, the sweep's own estimate adds the "
        "backlog a side offered more than it sustains drains: timing.overload_drain_s)",
    ]


def print_model(mp: ModelPlan, hardware: Any, parallel: int, out: Any) -> None:
    e, r = mp.entry, mp.report
    print(f"== {e.name} ({e.model}){f', workload {e.workload}' if e.workload else ''}", file=out)
    print(f"   {mp.note}", file=out)
    how = f"{r.evaluated:,} sampled of {r.grid_size:,}" if r.sampled else f"all {r.grid_size:,}"
    print(f"   feasible: {r.feasible:,} of {how} candidates ({100 * r.feasible_fraction:.1f}%) of space {r.space}"
          + (f"; {r.violating_conditions:,} break a condition of the space" if r.violating_conditions else ""),
          file=out)
    for reason, count in r.reasons:
        fix = r.fixes.get(reason)
        print(f"     pruned {count:>7,}  {reason}" + (f"  (fix: {fix})" if fix else ""), file=out)
    if mp.error is not None:
        print(f"   error: {mp.error}", file=out)
    print(f"   baselines queued first ({len(mp.baselines)}), then sampled candidates:", file=out)
    for b in mp.baselines + mp.examples:
        print_launch(b, hardware, out)
    if not mp.examples and mp.error is None:
        print(f"   - no feasible candidate among {EXAMPLE_DRAWS} drawn for an example", file=out)
    pool = mp.slots
    where = (f"GPUs {pool.gpu_ids} of {hardware.count} x {hardware.name}" if pool.gpu_ids else
             "CPU core sets " + ", ".join(str(list(c)) or "[unbound]" for c in pool.cpu_sets)
             + (f", load client on core(s) {list(pool.client_cores)}" if pool.client_cores else ""))
    print(f"   slots: {where}; parallel {parallel}: each trial takes replicas x TP x PP GPUs (servers_per_gpu "
          f"servers share each), trials run side by side while they fit", file=out)
    for line in describe_estimate(mp.estimate, hardware, parallel):
        print(f"   {line}", file=out)


def print_launch(b: Launch, hardware: Any, out: Any) -> None:
    gpus = max(int(b.plan.gpus_needed or 0), 1)
    state = ((f"feasible, {gpus} GPU(s)" if not hardware.is_cpu else "feasible") if b.plan.feasible else
             f"pruned before launch: {b.plan.reason()}")
    if b.plan.feasible and b.plan.servers_per_gpu > 1:
        state += (f", {b.plan.servers_per_gpu} servers per {'GPU' if not hardware.is_cpu else 'core set'} at "
                  f"gpu_memory_utilization {b.plan.server_gpu_memory_utilization:g} each")
    shown = ", ".join(f"{k}={v}" for k, v in b.settings.items()) or "(vLLM defaults)"
    print(f"   - {b.label}: {shown}: {state}", file=out)
    for cmd in b.commands:
        print(f"       $ {cmd}", file=out)


def dry_run(sweep: Sweep, models: list[ModelEntry], hardware: Any, parallel: int, out: Any) -> int:
    """Print every model's plan; 1 when a model has no feasible candidate (its reason and fix on stderr), else 0."""
    detected = "detected" if getattr(hardware, "detected", False) else "planned for, not detected"
    print(f"dry run of {sweep.source}: {len(models)} model(s) on {hardware.count} x {hardware.name} ({detected}), "
          f"objective {sweep.objective.kind}, {sweep.trials} trials per model, {sweep.confirm_repeats} confirmation "
          f"repeats; nothing is started, built or written", file=out)
    plans = [plan_model(sweep, entry, hardware, parallel) for entry in models]
    total = 0.0
    for mp in plans:
        print_model(mp, hardware, parallel, out)
        total += mp.estimate.device_s
    unit = "CPU-host hours" if hardware.is_cpu else "GPU-hours"
    print(f"== total estimate: {total / 3600:.1f} {unit} for {len(plans)} model(s)", file=out)
    bad = [mp for mp in plans if mp.error is not None]
    for mp in bad:
        print(f"error: {mp.error}", file=out)
    return 1 if bad else 0
