"""The trial schema: what a trial stores in Optuna and how every reader gets it back.

Optuna keeps values, constraints and states; everything else a trial knows lives in its user attributes (which
the dashboard shows too). Each attribute key is named here once (`Attr`, and `StudyAttr` for the study's own),
`record_trial` is the one writer, and the readers below (outcome, feasibility, constraints, labels, the best
feasible trial) are what the study, the trials table and the report all use, so they cannot disagree.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.paths import portable
from harness.records import Failure, RunRecord, StartupPhases, from_dict, to_dict
from harness.settings import Topology
from harness.study.capacity import crossed_rates
from harness.study.pergpu import devices_text


class Attr:
    """Trial user-attribute keys (JSON values)."""

    SETTINGS = "settings"  # the configuration measured (user keys), sampled or queued
    BASELINE = "baseline"  # BASELINE_DEFAULTS / BASELINE_COMMITTED for the queued baselines, absent otherwise
    OUTCOME = "outcome"  # Outcome.*; failed ones as "failed:<Failure.kind>"
    REASON = "reason"  # why a trial is not a clean measurement, one line
    CONSTRAINTS = "constraints"  # the constraint values again (Optuna keeps them; the dashboard shows these)
    METRICS = "metrics"  # Evaluation.summary(): flat numbers of the run the values come from
    RECORDS = "records"  # paths of the run records (one per load step) and of a failure file
    DEVICE_SECONDS = "device_seconds"  # wall time the servers held their devices, times the devices held
    GPUS = "gpus"  # replicas x DP x TP x PP of the settings (Topology.gpus): what every per-GPU value divides by
    PLAN = "plan"  # the planner's prediction (Plan.to_dict())
    CURVE = "curve"  # capacity: latency vs offered load, one point per load step
    CAPACITY = "capacity"  # capacity: the bracket (capacity_lo/hi), converged, stopped, limited_by_client, steps
    STEADY = "steady"  # the steady verdict of the run the values come from (holds, ratio, trends, reasons)
    MAX_FITTING_LEN = "max_fitting_len"  # vLLM's estimate after a max_model_len start failure
    WORKER = "worker"  # host, pid and pid namespace of the process running the trial (workers.worker_record)
    CLIENT = "client"  # {"valid": bool, "reasons": [...]}: whether the load client, not the server, set the values
    STARTUP = "startup"  # StartupPhases of the first replica of the run the values come from (and its compile cache)


class StudyAttr:
    """Study user-attribute keys."""

    IDENTITY = "identity"  # model, space, workload, objective, hardware: what a resume must match
    CONFIRM = "confirm"  # the latest Confirmation.to_dict() against vLLM's defaults
    CONFIRM_COMMITTED = "confirm_committed"  # the recommendation against the committed config, when one ran
    CONFIG = "config"  # where the sweep wrote the recommendation (the sweep file's configs_dir), as it was given


class Outcome:
    OK = "ok"
    SLO_VIOLATED = "slo_violated"
    PRUNED = "pruned"
    FAILED = "failed"  # stored as "failed:<kind>"
    SURPLUS = "surplus"  # beyond the study's budget: nothing ran
    CLIENT_LIMITED = "client_limited"  # it ran, but the load client fell behind: its values are no server number
    INTERRUPTED = "interrupted"  # FAIL: interrupted or the harness raised; retried on a rerun


MEASURED = (Outcome.OK, Outcome.SLO_VIOLATED)  # outcomes that carry a measurement

CLIENT_LIMITED_LABEL = "client-limited (invalid)"  # how every presentation names a number the client limited

BASELINE_DEFAULTS = "vllm-defaults"
BASELINE_COMMITTED = "committed-config"
BASELINE_NAMES = {BASELINE_DEFAULTS: "vLLM defaults", BASELINE_COMMITTED: "committed config"}


def confirm_key(winner: FrozenTrial, baseline: FrozenTrial | None, repeats: int) -> str:
    """The study attribute holding this winner's confirmation against this baseline (a rerun reuses it)."""
    return f"confirm:{winner.number}:{baseline.number if baseline else None}:{repeats}"


# ------------------------------------------------------------------------------------------------- confirmation


@dataclass
class Spread:
    """One configuration's confirmation repeats. A repeat the load client limited (its self-check failed) is kept
    in `runs` with `valid` False and left out of mean, sd, min, max and n: it measured the client, not the server."""

    runs: list[float]
    valid: list[bool] | None = None  # per run; None: all valid

    @property
    def flags(self) -> list[bool]:
        return list(self.valid) if self.valid is not None else [True] * len(self.runs)

    @property
    def valid_runs(self) -> list[float]:
        return [v for v, ok in zip(self.runs, self.flags) if ok]

    @property
    def invalid_runs(self) -> list[float]:
        return [v for v, ok in zip(self.runs, self.flags) if not ok]

    @property
    def mean(self) -> float:
        runs = self.valid_runs
        return statistics.fmean(runs) if runs else 0.0

    @property
    def std(self) -> float:
        runs = self.valid_runs
        return statistics.stdev(runs) if len(runs) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        runs = self.valid_runs
        return {"runs": self.runs, "valid": self.flags, "mean": self.mean if runs else None,
                "std": self.std if runs else None, "min": min(runs, default=None), "max": max(runs, default=None),
                "n": len(runs), "invalid": self.invalid_runs}

    @classmethod
    def from_dict(cls, saved: dict[str, Any], metrics: list[dict[str, Any]] | None = None) -> Spread:
        """Back from `to_dict()`; a confirmation saved before `valid` existed takes it from the per-repeat
        metrics' `client_valid`."""
        valid = saved.get("valid")
        if valid is None and metrics and len(metrics) == len(saved["runs"]):
            valid = [bool(m.get("client_valid", True)) for m in metrics]
        return cls(list(saved["runs"]), None if valid is None else [bool(v) for v in valid])


# ------------------------------------------------------------------------------------------------- writer


@dataclass
class Evaluation:
    """The outcome of one candidate. `values is None` means pruned before launch (see `pruned_reason`)."""

    settings: dict[str, Any]
    values: list[float] | None = None
    constraints: list[float] = field(default_factory=list)
    pruned_reason: str | None = None
    failure: Failure | None = None
    plan: dict[str, Any] | None = None
    record: RunRecord | None = None  # the run the values come from
    record_paths: list[str] = field(default_factory=list)
    curve: list[dict[str, Any]] = field(default_factory=list)  # capacity: latency vs offered load
    device_seconds: float = 0.0  # wall time servers held their devices, times the devices held
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own numbers (capacity_rps, ...)
    client_reasons: list[str] = field(default_factory=list)  # why the load client limited the run (empty: valid)
    values_invalid: bool = False  # the values themselves come from a client-limited run
    capacity: dict[str, Any] | None = None  # capacity searches: CapacityBracket.summary()

    @property
    def gpus(self) -> int:
        """GPUs the measured deployment used (1 for a CPU server): what the per-GPU numbers divide by."""
        return max(Topology.of(self.settings).gpus, 1)

    def summary(self) -> dict[str, Any]:
        """Flat numbers for trial user attributes, the table and the dashboard; every throughput-like number also
        per GPU (`<name>_per_gpu`), so candidates of different GPU counts compare on equal hardware."""
        out: dict[str, Any] = {}
        rec = self.record
        if rec is not None and rec.metrics is not None:
            m = rec.metrics
            out.update(request_throughput=m.request_throughput, output_throughput=m.output_throughput,
                       total_token_throughput=m.total_token_throughput, goodput=m.goodput,
                       completed=m.completed, failed=m.failed, prefix_cached_fraction=m.prefix_cached_fraction)
            for stat in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
                st = getattr(m, stat)
                if st is not None:
                    for q in ("mean", "p50", "p90", "p99"):
                        out[f"{q}_{stat}"] = getattr(st, q)
        if rec is not None and rec.memory is not None:
            out["peak_gpu_memory_mib"] = rec.memory.peak_gpu_memory_mib
            out["rss_peak_mib"] = rec.memory.rss_peak_mib
        if rec is not None and rec.server is not None:
            out["kv_cache_tokens"] = rec.server.kv_cache_tokens
            out["peak_kv_usage"] = rec.server.peak_kv_usage
            out["preemptions"] = rec.server.preemptions
        if rec is not None and rec.startup_s is not None:
            out["startup_s"] = rec.startup_s
        if self.plan:
            out["planned_kv_cache_tokens"] = self.plan.get("kv_cache_tokens")
        out.update(self.metrics)
        if rec is not None and rec.client is not None:
            out["client_valid"] = not self.client_reasons
        if self.capacity is not None:
            out["capacity_hi"] = self.capacity.get("capacity_hi")
        steady = getattr(rec, "steady", None)
        if steady is not None:
            out["steady_completion_ratio"] = steady.completion_ratio
            out["steady_holds"] = steady.holds
        for name in PER_GPU_METRICS:
            if isinstance(out.get(name), (int, float)):
                out[f"{name}_per_gpu"] = out[name] / self.gpus
        return {k: v for k, v in out.items() if v is not None}


PER_GPU_METRICS = ("capacity_rps", "goodput", "output_throughput", "request_throughput", "total_token_throughput")


def steady_summary(steady: Any) -> dict[str, Any] | None:
    """The compact steady verdict a trial keeps (the full block is in its run record)."""
    if steady is None:
        return None
    return {"holds": steady.holds, "kept_up": steady.kept_up, "slo_ok": steady.slo_ok,
            "completion_ratio": steady.completion_ratio, "offered_rate": steady.offered_rate,
            "achieved_rate": steady.achieved_rate, "inflight_growth": steady.inflight_growth,
            "waiting_growth": steady.waiting_growth, "growth_limit": steady.growth_limit,
            "window_s": steady.window_s, "reasons": list(steady.reasons), "warnings": list(steady.warnings)}


def record_trial(trial: optuna.Trial, ev: Evaluation) -> None:
    """Constraints for the sampler (Optuna's own), and everything the dashboard, the table and the report need
    as user attributes (JSON-safe; the dashboard shows user attributes, so the constraints are repeated there)."""
    constraints = ev.constraints or [1.0]
    for i, value in enumerate(constraints):
        trial.set_constraint(f"c{i}", value)
    trial.set_user_attr(Attr.CONSTRAINTS, constraints)
    trial.set_user_attr(Attr.METRICS, json_safe(ev.summary()))
    trial.set_user_attr(Attr.RECORDS, ev.record_paths)
    trial.set_user_attr(Attr.DEVICE_SECONDS, round(ev.device_seconds, 1))
    trial.set_user_attr(Attr.GPUS, Topology.of(ev.settings).gpus)
    if ev.plan is not None:
        trial.set_user_attr(Attr.PLAN, json_safe(portable(ev.plan)))  # committed studies: no machine path
    if ev.curve:
        trial.set_user_attr(Attr.CURVE, json_safe(ev.curve))
    if ev.record is not None and ev.record.server is not None and ev.record.server.startup is not None:
        trial.set_user_attr(Attr.STARTUP, json_safe(ev.record.server.startup))
    if ev.capacity is not None:
        trial.set_user_attr(Attr.CAPACITY, json_safe(ev.capacity))
    if getattr(ev.record, "steady", None) is not None:
        trial.set_user_attr(Attr.STEADY, json_safe(steady_summary(ev.record.steady)))
    if ev.pruned_reason:
        trial.set_user_attr(Attr.OUTCOME, Outcome.PRUNED)
        trial.set_user_attr(Attr.REASON, ev.pruned_reason)
    elif ev.failure is not None:
        trial.set_user_attr(Attr.OUTCOME, f"{Outcome.FAILED}:{ev.failure.kind}")
        trial.set_user_attr(Attr.REASON, ev.failure.message[:500])
        if ev.failure.max_fitting_len is not None:
            trial.set_user_attr(Attr.MAX_FITTING_LEN, ev.failure.max_fitting_len)
    elif ev.values_invalid:
        trial.set_user_attr(Attr.OUTCOME, Outcome.CLIENT_LIMITED)
        trial.set_user_attr(Attr.REASON, f"{CLIENT_LIMITED_LABEL}: {'; '.join(ev.client_reasons)}"[:500])
    else:
        ok = all(c <= 0 for c in ev.constraints)
        trial.set_user_attr(Attr.OUTCOME, Outcome.OK if ok else Outcome.SLO_VIOLATED)
        notes = [f"{CLIENT_LIMITED_LABEL}: {'; '.join(ev.client_reasons)}"] if ev.client_reasons else []
        if not ok:
            notes.insert(0, "SLO not met: violations " + ", ".join(f"{c:+.2f}" for c in ev.constraints))
        if notes:
            trial.set_user_attr(Attr.REASON, "; ".join(notes)[:500])
    if ev.record is not None and ev.record.client is not None:
        trial.set_user_attr(Attr.CLIENT, {"valid": not ev.client_reasons, "reasons": ev.client_reasons})


def record_surplus(trial: optuna.Trial) -> None:
    trial.set_user_attr(Attr.OUTCOME, Outcome.SURPLUS)
    trial.set_user_attr(Attr.REASON, "the other workers' trials already fill the budget; nothing was run")


def json_safe(obj: Any) -> Any:
    """Dataclasses to dicts; inf and NaN (not JSON) to None."""
    obj = to_dict(obj)
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------------------------- readers


def settings_of(trial: FrozenTrial) -> dict[str, Any]:
    return dict(trial.user_attrs.get(Attr.SETTINGS) or {})


# the plan's resolved values (harness.plan.estimate.Resolved) by the setting names they resolve
_RESOLVED_AS = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size"}


def default_settings_of(trial: FrozenTrial) -> dict[str, Any]:
    """The values vLLM ran with for the settings the trial left out, as its plan resolved them from vLLM's
    defaults for that vLLM and GPU (the plan's KV cache agrees with vLLM's own to 0.05% on an H200); empty for a
    trial without a plan."""
    resolved = (trial.user_attrs.get(Attr.PLAN) or {}).get("resolved") or {}
    given = settings_of(trial)
    out = {_RESOLVED_AS.get(k, k): v for k, v in resolved.items()}
    return {k: v for k, v in out.items() if k not in given and v is not None}


def baseline_of(trial: FrozenTrial) -> str | None:
    """The baseline label of a queued baseline trial, None for a sampled one."""
    return trial.user_attrs.get(Attr.BASELINE) or None


def outcome_of(trial: FrozenTrial) -> str:
    """ok | slo_violated | failed:<kind> | pruned | surplus | interrupted (FAIL) | running | waiting."""
    outcome = trial.user_attrs.get(Attr.OUTCOME)
    if outcome:
        return str(outcome)
    if trial.state == TrialState.COMPLETE:
        return Outcome.OK
    if trial.state == TrialState.PRUNED:
        return Outcome.PRUNED
    if trial.state == TrialState.FAIL:
        return Outcome.INTERRUPTED
    return trial.state.name.lower()


def category_of(trial: FrozenTrial) -> str:
    """The outcome without the failure kind: ok, slo_violated, failed, pruned, interrupted, running, waiting."""
    return outcome_of(trial).split(":", 1)[0]


def reason_of(trial: FrozenTrial) -> str:
    reason = str(trial.user_attrs.get(Attr.REASON) or "")
    if not reason and trial.state == TrialState.FAIL:
        reason = "the trial was interrupted or the harness raised (see the sweep's output); it may be retried"
    return reason


def constraints_of(trial: FrozenTrial) -> list[float]:
    """Optuna's constraints (`Trial.set_constraint`), else the copy in the user attributes (older studies); as for
    the sampler, a trial that never reported any is infeasible."""
    found = list(trial.constraints.values()) or trial.user_attrs.get(Attr.CONSTRAINTS) or []
    return [float(c) for c in found] or [1.0]


def is_feasible(trial: FrozenTrial) -> bool:
    """Completed, and every constraint holds (<= 0)."""
    return trial.state == TrialState.COMPLETE and all(c <= 0 for c in constraints_of(trial))


def is_measured(trial: FrozenTrial) -> bool:
    """Completed with a real measurement (not a failed launch scored with the worst value)."""
    return (trial.state == TrialState.COMPLETE and category_of(trial) in MEASURED and bool(trial.values)
            and all(v is not None and math.isfinite(v) for v in trial.values))


def metric_of(trial: FrozenTrial, name: str) -> float | None:
    """A finite number from the trial's metrics, else None."""
    value = (trial.user_attrs.get(Attr.METRICS) or {}).get(name)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def client_of(trial: FrozenTrial) -> str:
    """'valid', 'client-limited (invalid): <why>', or '' when no load ran: how the table and report mark it."""
    client = trial.user_attrs.get(Attr.CLIENT)
    if not isinstance(client, dict):
        return ""
    if client.get("valid", True):
        return "valid"
    return f"{CLIENT_LIMITED_LABEL}: {'; '.join(client.get('reasons') or [])}".rstrip(": ")


def gpus_of(trial: FrozenTrial) -> int:
    """Replicas x TP x PP of the trial's settings (recorded since the attribute exists; else from the settings)."""
    gpus = trial.user_attrs.get(Attr.GPUS)
    return int(gpus) if isinstance(gpus, int) else Topology.of(settings_of(trial)).gpus


def startup_of(trial: FrozenTrial) -> StartupPhases | None:
    """Where the trial's server start-up went (None: not launched, failed to start, or recorded before it existed)."""
    data = trial.user_attrs.get(Attr.STARTUP)
    return from_dict(StartupPhases, data) if isinstance(data, dict) else None


def devices_held_of(trial: FrozenTrial) -> int:
    """The devices a trial's device_seconds counts (the planner's GPUs needed; one on a CPU host)."""
    needed = (trial.user_attrs.get(Attr.PLAN) or {}).get("gpus_needed")
    return max(int(needed) if isinstance(needed, (int, float)) else gpus_of(trial), 1)


def capacity_of(trial: FrozenTrial) -> dict[str, Any]:
    """The capacity bracket of a capacity trial ({} for other kinds and for trials stored before brackets)."""
    return dict(trial.user_attrs.get(Attr.CAPACITY) or {})


def steady_of(trial: FrozenTrial) -> dict[str, Any]:
    """The compact steady verdict of the trial's run ({} before steady verdicts were recorded)."""
    return dict(trial.user_attrs.get(Attr.STEADY) or {})


def per_gpu_metric(trial: FrozenTrial, name: str) -> float | None:
    """`name` per GPU of the trial: recorded (`<name>_per_gpu`), else the absolute number / its GPUs (studies
    stored before per-GPU numbers)."""
    recorded = metric_of(trial, f"{name}_per_gpu")
    if recorded is not None:
        return recorded
    value = metric_of(trial, name)
    return None if value is None else value / max(gpus_of(trial), 1)


def label_of(trial: FrozenTrial) -> str:
    """`#3` or `#0 (vLLM defaults)`."""
    baseline = baseline_of(trial)
    return f"#{trial.number}" + (f" ({BASELINE_NAMES.get(baseline, baseline)})" if baseline else "")


def fmt_values(values: list[float] | None) -> str:
    if not values:
        return "-"
    return " / ".join("inf" if math.isinf(v) else f"{v:.4g}" for v in values)


def describe(trial: FrozenTrial, on_cpu: bool = False) -> str:
    """One progress line's account of a finished trial: its outcome, values (with the GPUs they used, or the CPU
    host, and for a capacity search the bracket) and reason."""
    outcome = trial.user_attrs.get(Attr.OUTCOME, trial.state.name.lower())
    reason = trial.user_attrs.get(Attr.REASON)
    if trial.state == TrialState.COMPLETE:
        gpus = gpus_of(trial)
        cap = capacity_of(trial)
        bracket = ""
        if cap and cap.get("capacity_lo") is not None:
            hi = cap.get("capacity_hi")
            bracket = (f", capacity {cap['capacity_lo']:.3g}-{'?' if hi is None else f'{hi:.3g}'} req/s"
                       + (" (client-limited)" if cap.get("limited_by_client") else ""))
        return (f"{outcome}: {fmt_values(trial.values)} [{devices_text(gpus, on_cpu)}{bracket}]"
                + (f" ({reason})" if reason else ""))
    return f"{outcome}" + (f": {reason}" if reason else "")


@dataclass(frozen=True)
class Ceiling:
    """The highest throughput any load step of a study served in its window, whether the step held or not (SLO
    met or not, steady or not), per GPU: what the GPU does flat out, which the capacity at the SLO is read against."""

    req_s_per_gpu: float
    trial: int
    offered_per_gpu: float  # the step's offered rate
    held: bool  # whether that step held (steady and within the SLO)
    gpus: int
    output_tok_s_per_gpu: float | None = None  # over that step's requests
    p99_ttft_ms: float | None = None
    p99_tpot_ms: float | None = None

    def share(self, capacity_per_gpu: float | None) -> float | None:
        """`capacity_per_gpu` as a fraction of the ceiling (how close a capacity at the SLO is to flat out)."""
        return None if capacity_per_gpu is None or self.req_s_per_gpu <= 0 else capacity_per_gpu / self.req_s_per_gpu

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def study_ceiling(trials: Iterable[FrozenTrial]) -> Ceiling | None:
    """The study's ceiling over every capacity step it recorded (None: no trial has a load curve)."""
    best: Ceiling | None = None
    for t in trials:
        gpus = max(gpus_of(t), 1)
        for row in t.user_attrs.get(Attr.CURVE) or []:
            served = row.get("achieved")
            if not isinstance(served, (int, float)) or served <= 0 or (best and served / gpus <= best.req_s_per_gpu):
                continue
            out = row.get("output_throughput")
            best = Ceiling(served / gpus, t.number, float(row.get("rate") or 0.0) / gpus, bool(row.get("ok")), gpus,
                           None if out is None else out / gpus, row.get("p99_ttft_ms"), row.get("p99_tpot_ms"))
    return best


def capacity_limit(trial: FrozenTrial, device: str = "GPU") -> str | None:
    """In words, what bounded the capacity from above: the step at capacity_hi failed for the load client, the
    SLO percentiles (the server kept up), or the server's throughput (its window did not keep up, or it held while
    serving clearly less than offered), with that step's latencies and the KV cache's peak use at capacity; None
    for a trial without a capacity bracket or with nothing failed above capacity_lo. Rates are per `device` (a
    GPU; "server" on a CPU host)."""
    cap = capacity_of(trial)
    hi = cap.get("capacity_hi")
    if hi is None or not cap.get("steps"):
        return None
    step = min(cap["steps"], key=lambda st: abs(float(st.get("offered") or 0.0) - hi))
    row = min(trial.user_attrs.get(Attr.CURVE) or [{}], key=lambda r: abs(float(r.get("rate") or 0.0) - hi))
    gpus = max(gpus_of(trial), 1)
    at = f"at {hi / gpus:.3g} req/s per {device} offered"
    lat = ", ".join(f"p99 {name} {row[key]:.0f} ms" for name, key in (("TTFT", "p99_ttft_ms"), ("TPOT", "p99_tpot_ms"))
                    if isinstance(row.get(key), (int, float)))
    if step.get("client_limited"):
        text = f"the load client: {at} its own check failed (not a server number)"
    elif str(step.get("reason", "")).startswith("SLO percentiles missed"):
        text = f"the latency SLO: {at} the server kept up but missed it" + (f" ({lat})" if lat else "")
    else:
        served = step.get("achieved")
        text = (f"the server's throughput: {at} it served {float(served) / gpus:.3g}" if served is not None else
                f"the server's throughput: {at} its window did not keep up")
        text += (f" ({float(step['ratio']):.2f} of arrivals)" if step.get("ratio") is not None else "")
        text += f"; {lat}" if lat else ""
    kv, pre = metric_of(trial, "peak_kv_usage"), metric_of(trial, "preemptions")
    if kv is not None:  # the metrics are the capacity step's (the last step's when none held)
        text += f"; KV cache peak {kv:.0%} " + ("at capacity" if (cap.get("capacity_lo") or 0) > 0 else "in its steps")
        text += "" if pre is None else (f", {pre:.0f} preemptions" if pre else ", no preemptions")
    crossed = crossed_rates((float(st.get("offered") or 0.0), bool(st.get("holds")), bool(st.get("client_limited")))
                            for st in cap["steps"])
    if crossed:
        held, failed = (r / gpus for r in crossed)
        text += (f"; the steps disagree: {held:.3g} req/s per {device} held and {failed:.3g} did not, so one "
                 f"window's noise is wider than their {held / failed - 1:.0%} gap, and than this bracket")
    return text


def best_feasible(trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """The highest first value among feasible trials (for pareto: the highest throughput on the feasible front),
    the earliest trial on a tie."""
    feasible = [t for t in trials if is_feasible(t) and t.values]
    return max(feasible, key=lambda t: (t.values[0], -t.number)) if feasible else None


def baseline_trial(trials: Iterable[FrozenTrial], label: str = BASELINE_DEFAULTS) -> FrozenTrial | None:
    """The measured (valued) trial of this baseline, None if there is none."""
    return next((t for t in trials if baseline_of(t) == label and t.values is not None), None)
