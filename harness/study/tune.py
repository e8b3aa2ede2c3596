"""Tune one model end to end: study -> trials -> confirm -> configs/<model>.yaml and results/<study>/.

This is the body of `python -m harness.sweep`, one call per model in the sweep file.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.cachedir import vllm_cache_root
from harness.emit import EmittedConfig, read_config, write_config
from harness.envinfo import environment
from harness.launch.placement import SlotPool, gpu_sets
from harness.launch.vllm_args import load_argspec
from harness.load.prompts import build_requests
from harness.load.tokenizer import load_tokenizer
from harness.load.workload import load_workload
from harness.models import ensure_model
from harness.paths import portable, portable_path
from harness.plan import load_model_facts
from harness.plan.lint import require_feasible
from harness.settings import Topology
from harness.space import load_space
from harness.study import naming
from harness.study.confirm import CROSS_CHECK_SEED, Confirmation, confirm
from harness.study.evaluate import StudyContext
from harness.study.pergpu import fill_replicas, gpus_used, one_server
from harness.study.runner import enqueue_baselines, make_sampler, measured_as, open_study, run_trials
from harness.study.storage import GRACE_S, HEARTBEAT_S, default_storage, make_storage, redact, study_lock
from harness.study.sweepfile import ModelEntry, Sweep
from harness.study.table import write_table
from harness.study.timing import measured_costs, overload_drain_s, time_spent
from harness.study.trials import (BASELINE_COMMITTED, BASELINE_DEFAULTS, CLIENT_LIMITED_LABEL, Attr, StudyAttr,
                                  baseline_of, baseline_trial, best_feasible, capacity_limit, client_of, confirm_key,
                                  default_settings_of, is_feasible, metric_of, per_gpu_metric, settings_of,
                                  study_ceiling)
from harness.study.workers import Budget, Claim, wait_for, worker_seed


@dataclass
class ModelOutcome:
    model: str
    study_name: str
    config_path: Path | None
    table_path: Path
    confirmation: Confirmation | None
    message: str


def config_path_of(sweep: Sweep, entry: ModelEntry) -> Path:
    """Where the model's recommended config is (and is written): configs/<name>.yaml."""
    return Path(sweep.configs_dir) / f"{entry.name}.yaml"


def study_baselines(space: Any, config_path: Path,
                    named: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """The baselines a study queues first, by label: vLLM's defaults (the space's fixed settings only), the
    committed configs/<model>.yaml when there is one, and the sweep file's named baselines (each over the fixed
    settings)."""
    baselines = {BASELINE_DEFAULTS: dict(space.fixed)}
    if config_path.exists():
        # one server of it: the study measures servers and ranks them per GPU (its replicas are a deployment)
        baselines[BASELINE_COMMITTED] = one_server({**space.fixed, **read_config(config_path).settings})
    for label, settings in (named or {}).items():
        baselines[label] = one_server({**space.fixed, **settings})
    return baselines


def refuse_infeasible(sweep: Sweep, entry: ModelEntry, hardware: Any) -> None:
    """Before any trial: UserError naming the reason and the fix when the model's space has no feasible candidate."""
    facts = load_model_facts(ensure_model(entry.model, entry.build))
    space = load_space(sweep.space).for_model(facts.max_context, entry.fixed)
    longest = load_workload(entry.workload or sweep.workload).max_total_tokens()
    require_feasible(space, facts, hardware, source=sweep.source, key=f"models[{entry.name}]", longest_request=longest)


def build_context(sweep: Sweep, entry: ModelEntry, model: str, hardware: Any, parallel: int,
                  results_dir: Path) -> tuple[StudyContext, str]:
    facts = load_model_facts(model)
    space = load_space(sweep.space).for_model(facts.max_context, entry.fixed)
    argspec = load_argspec()
    argspec.check(dict(space.fixed), space.source)
    argspec.check({k: None for k in space.knobs}, space.source)
    for label, settings in entry.baselines.items():
        argspec.check(settings, f"{sweep.source} (models[{entry.name}].baselines.{label})")
    workload = load_workload(entry.workload or sweep.workload)
    tokenizer = load_tokenizer(model)
    obj = sweep.objective

    @functools.lru_cache(maxsize=16)
    def requests_for(step: int, n: int, prompt_set: int = 0) -> list[Any]:
        # windowed steps need rate x time requests (a count that follows from the step's rate); a set > 0 is the
        # same work in other tokens (`build_requests`)
        return build_requests(workload, tokenizer, n, seed=sweep.seed * 1000 + step, prompt_set=prompt_set)

    def completion_requests(n: int, k: int) -> list[Any]:
        # the workload's lengths as raw prompts: `vllm bench serve` replays them on /v1/completions (ignore_eos:
        # it runs with --ignore-eos, so both tools ask for the same output lengths). Set k has set 0's lengths
        # in other tokens: sets drawn with other lengths made vLLM's client's run 3.8% more prompt tokens on the
        # H200, and its TPOT 10% higher
        return build_requests(dataclasses.replace(workload, api="completions", ignore_eos=True), tokenizer, n,
                              seed=sweep.seed * 1000 + CROSS_CHECK_SEED, prompt_set=k)
    name = naming.study_name(entry.name, naming.hardware_tag(hardware.name, hardware.count), workload.name, obj.kind)
    sdir = naming.study_dir(results_dir, name)
    n_gpus = hardware.count if getattr(hardware, "arch", "") != "cpu" else 0
    slots = SlotPool.for_host(n_gpus, parallel, vllm_cache_root=str(vllm_cache_root(results_dir)))
    ctx = StudyContext(model=model, model_name=entry.model_name or entry.model, slug=entry.name, facts=facts, hardware=hardware, space=space, workload=workload,
                       objective=obj, requests_for=requests_for, study_dir=sdir, start_timeout_s=sweep.start_timeout_s,
                       slots=slots, out=sys.stderr, completion_requests=completion_requests)
    return ctx, name


def tune_model(sweep: Sweep, entry: ModelEntry, *, hardware: Any, storage_url: str | None, parallel: int,
               out: Any = sys.stderr, deadline: float | None = None) -> ModelOutcome:
    """`deadline` (time.monotonic()): start no trial or confirmation after it; a rerun resumes."""
    results_dir = Path(sweep.results_dir)
    model = ensure_model(entry.model, entry.build)
    ctx, name = build_context(sweep, entry, model, hardware, parallel, results_dir)
    ctx.out, ctx.out_tty = out, (False if parallel > 1 else None)  # side-by-side trials: no line rewritten in place
    trials = entry.trials or sweep.trials
    storage = make_storage(storage_url or default_storage(results_dir))
    identity = {"model": entry.model, "space": ctx.space.to_dict(), "workload": ctx.workload.to_dict(),
                "objective": sweep.objective.to_dict(), "hardware": _hw_identity(hardware)}
    config_path = config_path_of(sweep, entry)
    baselines = study_baselines(ctx.space, config_path, entry.baselines)
    # A shared storage may have other workers: each gets its own sampler seed, or all would propose the same
    # candidates (one node with the default storage stays reproducible from the sweep's seed).
    seed = sweep.seed if storage_url is None else worker_seed(sweep.seed)
    # Workers starting together: one at a time creates or checks the study and queues the missing baselines.
    with study_lock(storage, name):
        study = open_study(name, storage, sweep.objective.directions,
                           make_sampler(sweep.sampler, sweep.objective, ctx.space, seed, trials), identity)
        enqueue_baselines(study, baselines)
        # the file this study's recommendation goes to (the report names it, wherever configs_dir points)
        study.set_user_attr(StudyAttr.CONFIG, portable_path(config_path))
    print(f"== study {name}: {trials} trials, objective {sweep.objective.kind}, space {ctx.space.name} "
          f"({len(ctx.space.knobs)} knobs), storage {_storage_label(storage_url, results_dir)}", file=out, flush=True)
    run_trials(study, ctx, trials, parallel, out=out,
               timeout_s=None if deadline is None else max(deadline - time.monotonic(), 1.0))
    table = write_table(study, ctx.study_dir)
    print_time_spent(study, hardware, out)
    done = Budget(trials).done(study)
    if deadline is not None and time.monotonic() >= deadline and done < trials:
        return _out_of_time(entry, name, table, f"after {done}/{trials} finished trials", out)
    winner = best_feasible(study.get_trials(deepcopy=False))
    if winner is None:
        msg = (f"no feasible configuration among {len(study.trials)} trials; nothing emitted "
               f"(see {table} for each trial's reason)")
        print(msg, file=out)
        return ModelOutcome(entry.model, name, None, table, None, msg)
    baseline = baseline_trial(study.get_trials(deepcopy=False), BASELINE_DEFAULTS)
    rival = challenger(study.get_trials(deepcopy=False), winner, baseline) if sweep.confirm_repeats > 0 else winner
    if rival is not winner:  # without a confirmation the best trial stays what is emitted
        print(f"[confirm] vLLM's defaults measured best (trial #{winner.number}); they are confirmed against the "
              f"best other candidate, trial #{rival.number}, at the defaults' load", file=out, flush=True)
        winner = rival
    short = no_time_for(study, winner, baseline, sweep, deadline)
    if short:
        return _out_of_time(entry, name, table, f"after all {trials} trials, before the confirmation{short}", out)
    conf = study_confirmation(study, ctx, winner, baseline, sweep.confirm_repeats, out,
                              cross_check=sweep.confirm_cross_check)
    rec_trial = study.trials[conf.recommended_trial] if conf else winner
    mine = committed_rival(study, rec_trial, baselines.get(BASELINE_COMMITTED)) if conf is not None else None
    short = no_time_for(study, rec_trial, mine, sweep, deadline) if mine is not None else None
    if short:
        return _out_of_time(entry, name, table, f"after the confirmation, before the one against the committed "
                                                f"config (trial #{mine.number}){short}", out)
    versus = (study_confirmation(study, ctx, rec_trial, mine, sweep.confirm_repeats, out, primary=False)
              if mine is not None else None)
    msg = (conf.verdict if conf else f"trial #{winner.number} is the best feasible trial (not confirmed)")
    if versus is not None:
        msg += f"; against the committed config (trial #{versus.baseline_trial}): {versus.verdict}"
        if versus.recommended_trial == versus.baseline_trial:
            # the user's own config stays: a recommendation replaces it only when it beats it in the same run
            table = write_table(study, ctx.study_dir)
            msg += f", so {config_path} is left as it is"
            print(f"== {name}: {msg}\n   table:  {table}", file=out, flush=True)
            return ModelOutcome(entry.model, name, config_path, table, conf, msg)
    path = emit(config_path, study, ctx, rec_trial, baseline, conf, hardware, versus_committed=versus)
    table = write_table(study, ctx.study_dir)
    print(f"== {name}: {msg}\n   config: {path}\n   table:  {table}", file=out, flush=True)
    return ModelOutcome(entry.model, name, path, table, conf, msg)


def committed_rival(study: optuna.Study, recommended: FrozenTrial,
                    committed: dict[str, Any] | None = None) -> FrozenTrial | None:
    """The committed config's trial when the recommendation would replace it: measured, feasible, and another
    trial. A committed config that failed or was pruned on this node is no rival (the table says why). One that
    asks for what another baseline ran with (`committed`: its settings) was not queued again: that trial is it."""
    trials = study.get_trials(deepcopy=False)
    mine = baseline_trial(trials, BASELINE_COMMITTED)
    if mine is None and committed is not None:
        mine = measured_as(committed, (t for t in trials if t.state == TrialState.COMPLETE and baseline_of(t)))
    if mine is None or mine.number == recommended.number or not is_feasible(mine) or not mine.values:
        return None
    return mine


def print_time_spent(study: optuna.Study, hardware: Any, out: Any) -> None:
    """Where the trials' device time went, and trials per device-hour (what makes a stretch of GPU time go far)."""
    on_cpu = getattr(hardware, "arch", "") == "cpu"
    where = f"{hardware.name} host" if on_cpu else f"{hardware.count}x {hardware.name}"
    print("   " + time_spent(study.get_trials(deepcopy=False)).line("server" if on_cpu else "GPU", where),
          file=out, flush=True)


def _out_of_time(entry: ModelEntry, name: str, table: Path, when: str, out: Any) -> ModelOutcome:
    msg = f"time budget reached {when}; run the same command again to continue"
    print(msg, file=out)
    return ModelOutcome(entry.model, name, None, table, None, msg)


def no_time_for(study: optuna.Study, winner: FrozenTrial, baseline: FrozenTrial | None, sweep: Sweep,
                deadline: float | None) -> str | None:
    """Why this confirmation is not started before `deadline` (None: it is, or it ran before and is reused). It
    is minutes of servers and counts only when it ends: not started unless the study's own timings say it ends
    in time (a cut-off one is measured again from the start). The reason is a clause for the out-of-time line."""
    if deadline is None or sweep.confirm_repeats <= 0 or confirm_key(winner, baseline, sweep.confirm_repeats) in \
            study.user_attrs:
        return None
    need = confirmation_need_s(study.get_trials(deepcopy=False), winner, baseline, sweep)
    left = deadline - time.monotonic()
    if left > 0 and (need is None or need <= left):
        return None
    return (f" (it needs ~{need / 60:.1f} min by this study's start-ups and load steps, {max(left, 0) / 60:.1f} min "
            f"were left)" if need is not None else " (no time left)")


def confirmation_need_s(trials: list[FrozenTrial], winner: FrozenTrial, baseline: FrozenTrial | None,
                        sweep: Sweep) -> float | None:
    """Wall seconds the confirmation takes at worst (one side at a time: a start-up per alternating block), by
    this study's measured start-ups and load steps; None before any trial measured them."""
    costs = measured_costs(trials)
    if costs is None:
        return None
    sides = 1 if baseline is None or baseline.number == winner.number else 2
    both = [t for t in (winner, baseline)[:sides] if t is not None]
    startups = [metric_of(t, "startup_s") for t in both]
    load = (confirm_load(winner, baseline) or [0.0])[0]
    drains = [overload_drain_s(t, load, costs.step_s, sweep.objective.drain_s) for t in both]
    return costs.confirmation_s(sides, sweep.confirm_repeats, sweep.confirm_cross_check, startups, drains)


def challenger(trials: list[FrozenTrial], winner: FrozenTrial, baseline: FrozenTrial | None) -> FrozenTrial:
    """What the confirmation pits against vLLM's defaults: the best feasible trial, or, when that is the defaults
    themselves, the best other feasible one: "nothing beat the defaults" then rests on repeats, not on single
    load windows (which differ by a few percent run to run). The winner itself when no other trial is feasible."""
    if baseline is None or winner.number != baseline.number:
        return winner
    return best_feasible(t for t in trials if t.number != baseline.number) or winner


def confirm_load(winner: FrozenTrial, baseline: FrozenTrial | None) -> list[float]:
    """The values whose load the confirmation's repeats offer: the winner's, or the baseline's when it measured
    higher (a challenger below the defaults): both sides are then held to the higher claim, not the lower one,
    which the defaults would sustain too."""
    if (baseline is not None and baseline.values and winner.values and len(winner.values) == 1
            and baseline.values[0] > winner.values[0]):
        return list(baseline.values)
    return list(winner.values)


def study_confirmation(study: optuna.Study, ctx: StudyContext, winner: FrozenTrial, baseline: FrozenTrial | None,
                       repeats: int, out: Any, primary: bool = True, cross_check: bool = False
                       ) -> Confirmation | None:
    """Run (or reuse, on a rerun) the confirmation of this winner against the baseline. `primary`: the one
    against vLLM's defaults (the report's); otherwise the one against the committed config. `cross_check`: both
    sides measured once more with `vllm bench serve` next to our client."""
    if repeats <= 0:
        return None
    key = confirm_key(winner, baseline, repeats)
    saved = study.user_attrs.get(key)
    load = confirm_load(winner, baseline)
    metric = ctx.objective.confirm_metric(load)
    while saved is None:  # several workers: one confirms (a claim with a heartbeat), the others wait for its result
        claim = Claim(study, study._storage, f"{key}:owner", heartbeat_s=HEARTBEAT_S, grace_s=GRACE_S)
        if claim.acquire():
            try:
                conf = confirm(ctx, winner, baseline, repeats, metric, log=out, cross_check=cross_check,
                               load_values=load)
                study.set_user_attr(key, conf.to_dict())
                study.set_user_attr(StudyAttr.CONFIRM if primary else StudyAttr.CONFIRM_COMMITTED, conf.to_dict())
            finally:
                claim.release()
            name = "confirm.json" if primary else "confirm-committed.json"
            (ctx.study_dir / name).write_text(json.dumps(conf.to_dict(), indent=2))
            return conf
        saved = wait_for(lambda: study.user_attrs.get(key), claim, poll_s=min(HEARTBEAT_S, 5), out=out)
    return Confirmation.from_dict(saved)


def emit(path: Path, study: optuna.Study, ctx: StudyContext, trial: FrozenTrial, baseline: FrozenTrial | None,
         conf: Confirmation | None, hardware: Any, versus_committed: Confirmation | None = None) -> Path:
    settings = settings_of(trial)
    env = environment()
    provenance: dict[str, Any] = {
        "study": study.study_name,
        "trial": trial.number,
        "date": _dt.date.today().isoformat(),
        "hardware": _hw_dict(hardware),
        "vllm_version": env.get("vllm_version"),
        "harness_commit": env.get("harness_commit"),
        "workload": ctx.workload.to_dict(),
        "objective": ctx.objective.to_dict(),
        "metrics": trial.user_attrs.get(Attr.METRICS, {}),
        # whether the load client, not the server, set each number: 'client-limited (invalid): why' marks one
        "client_check": client_of(trial) or None,
        "baseline_metrics": baseline.user_attrs.get(Attr.METRICS, {}) if baseline is not None else None,
        "baseline_client_check": (client_of(baseline) or None) if baseline is not None else None,
        "baseline_settings": baseline.user_attrs.get(Attr.SETTINGS) if baseline is not None else None,
    }
    ceiling = study_ceiling(study.get_trials(deepcopy=False))
    if ceiling is not None:  # capacity studies: how close the capacity at the SLO is to what the GPU does at all
        provenance["ceiling"] = {**ceiling.to_dict(),
                                 "capacity_share": ceiling.share(per_gpu_metric(trial, ctx.objective.metric)),
                                 "what": "the highest throughput any load step of the study served, SLO or not"}
    limit = capacity_limit(trial, "server" if getattr(hardware, "arch", "") == "cpu" else "GPU")
    if limit:
        provenance["capacity_limit"] = limit  # what bounded the capacity from above
    if conf is not None and conf.cross_check:
        provenance["vllm_bench_cross_check"] = conf.cross_check
    if conf is not None:
        # each side's mean, sd and n are over its valid repeats; `invalid` lists the client-limited ones apart
        provenance["improvement"] = {"metric": conf.metric, "relative": conf.improvement,
                                     "per_gpu": conf.per_gpu, "winner_gpus": conf.winner_gpus,
                                     "baseline_gpus": conf.baseline_gpus, "sides": conf.pairing,
                                     "winner": conf.winner.to_dict(), "baseline": conf.baseline.to_dict(),
                                     "verdict": conf.verdict}
        if conf.gain_basis():  # a baseline repeat counted at its capacity's goodput, not at its collapse
            provenance["improvement"]["basis"] = conf.gain_basis()
        invalid = len(conf.winner.invalid_runs) + len(conf.baseline.invalid_runs)
        if invalid:
            provenance["improvement"]["client_limited"] = (
                f"{invalid} repeat(s) {CLIENT_LIMITED_LABEL}: left out of the means; not server numbers")
    if versus_committed is not None:
        v = versus_committed
        provenance["versus_committed"] = {"trial": v.baseline_trial, "metric": v.metric, "relative": v.improvement,
                                          "sides": v.pairing, "winner": v.winner.to_dict(),
                                          "committed": v.baseline.to_dict(), "verdict": v.verdict}
    settings = one_server(settings)
    if Topology.of(settings).servers_per_gpu > 1 and settings.get("gpu_memory_utilization") is None:
        # the instances must state their share of the GPU: of vLLM's default, as the trial ran with it (the
        # plan's resolved value for that vLLM and GPU), else this vLLM's
        ran = default_settings_of(trial).get("gpu_memory_utilization")
        settings = {**settings, "gpu_memory_utilization": float(ran) if ran is not None else
                    load_argspec().default_utilization}
    provenance["deployment"] = deployment_provenance(settings, conf, hardware)
    settings = {**settings, "replicas": provenance["deployment"]["replicas"]}
    if settings["replicas"] == 1:
        settings.pop("replicas")
    argspec = load_argspec()
    argv_tail = argspec.to_argv(argspec.server_settings(settings))  # one server's command (its share of the GPU)
    topo = Topology.of(settings)
    sets = (gpu_sets(max(hardware.count, topo.gpus), topo.tp, topo.replicas, topo.pp) if topo.servers > 1
            else None)
    header = (f"generated by vllm-tune: study {study.study_name}, trial {trial.number}, "
              f"{_dt.date.today().isoformat()}\n"
              f"{conf.verdict if conf else 'best feasible trial (not confirmed)'}")
    return write_config(path, EmittedConfig(model=ctx.model_name, settings=settings, provenance=provenance,
                                            header=header), gpu_sets=sets, argv_tail=argv_tail)


def deployment_provenance(settings: dict[str, Any], conf: Confirmation | None, hardware: Any) -> dict[str, Any]:
    """How many replicas of the measured server the emitted config deploys, and where that number comes from: the
    node's GPUs / the server's GPUs (derived from the per-GPU value, not measured) unless the confirmation ran
    exactly that replica count (then its scaling efficiency is the evidence)."""
    node = hardware.count if getattr(hardware, "arch", "") != "cpu" else 0
    replicas = fill_replicas(settings, node)
    per_server = gpus_used(settings)
    out: dict[str, Any] = {"replicas": replicas, "gpus_per_replica": per_server, "gpus": replicas * per_server,
                           "node_gpus": node}
    topo = Topology.of(settings)
    if topo.servers_per_gpu > 1:
        util = settings.get("gpu_memory_utilization")  # emit() states vLLM's default when the trial left it out
        util = None if util is None else float(util)
        out.update({"servers_per_gpu": topo.servers_per_gpu, "servers": replicas * topo.servers_per_gpu,
                    "gpu_memory_utilization": util,
                    "gpu_memory_utilization_per_server": topo.server_utilization(util) if util is not None else None,
                    "servers_per_gpu_note": (
                        f"{topo.servers_per_gpu} servers share each GPU (vllm_instances lists each, with its "
                        f"gpu_devices); gpu_memory_utilization is the GPU's share for all of them, split evenly; "
                        f"start them one after another, each once the one before is ready (vLLM sizes its KV cache "
                        f"from the GPU memory it finds at start-up); the study measured the {topo.servers_per_gpu} "
                        f"servers together on one GPU, started so, load spread over them, and ranked them per GPU")})
    scaling = conf.scaling if conf is not None else None
    if replicas == 1:
        out["replica_count"] = "one server (as measured)" if node else "one server on the CPU host (as measured)"
        if topo.servers_per_gpu > 1:
            out["replica_count"] = f"one GPU of {topo.servers_per_gpu} servers (as measured)"
    elif scaling and scaling.get("replicas") == replicas and scaling.get("efficiency") is not None:
        out["replica_count"] = (f"measured by the confirmation: {replicas} replicas on {scaling['gpus']} GPUs, "
                                f"scaling efficiency {scaling['efficiency']:.0%} of the one server's per-GPU value")
        out["scaling"] = scaling
    else:
        out["replica_count"] = (f"derived from the per-GPU value of one measured server ({node} GPUs / {per_server} "
                                f"per server), not measured with {replicas} replicas")
    return out


def _hw_dict(hardware: Any) -> dict[str, Any]:
    return {"name": hardware.name, "count": hardware.count,
            "memory_gib": getattr(hardware, "memory_gib", None), "arch": getattr(hardware, "arch", None)}


def _hw_identity(hardware: Any) -> dict[str, Any]:
    """The hardware part of a study's identity: what must not change between the runs that share a study.

    A CPU host's memory is left out: on VMs that fault memory in lazily, NUMA node 0's total grows while the host
    runs (see plan/hardware.py), so it would refuse a resume on the same machine. A GPU's CUDA-visible total is fixed.
    """
    d = _hw_dict(hardware)
    return {**d, "memory_gib": None} if d["arch"] == "cpu" else d


def _storage_label(url: str | None, results_dir: Path) -> str:
    return portable(redact(url) if url else default_storage(results_dir))
