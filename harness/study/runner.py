"""One Optuna study per (model, hardware, workload, objective): baselines first, then the sampler, then confirm.

Optuna owns the search and the storage; this module only turns an `Evaluation` into what Optuna records
(values, constraints, user attributes) so the dashboard, the table and the report read the same facts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

# Heartbeats and the retry callback are marked experimental; they are what multi-node resilience rests on.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own progress lines say what Optuna's INFO would

from harness.errors import UserError
from harness.records import to_dict
from harness.study.evaluate import Evaluation, StudyContext, evaluate

# Set on Ctrl-C / SIGTERM: trials running in worker threads end as FAIL (to be run again), never as a measured
# failure of the configuration they were testing.
INTERRUPTED = threading.Event()


class TrialInterrupted(Exception):
    """The sweep was interrupted while this trial ran; Optuna records it as FAIL and a rerun measures it again."""


class _QuietControlFlow(logging.Filter):
    """Optuna logs each exception an objective raises with its traceback. Ours that only steer the run (a surplus
    trial, an interrupted one) are told by our progress lines; their tracebacks would read as crashes."""

    def __init__(self) -> None:
        super().__init__()
        self._quiet: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        from harness.study.workers import Surplus

        message = record.getMessage()
        if not message.startswith("Trial "):
            return True
        number = message.split()[1]
        if record.exc_info and isinstance(record.exc_info[1], (Surplus, TrialInterrupted)):
            self._quiet.add(number)
            return False
        return not (number in self._quiet and "failed with value" in message)


logging.getLogger("optuna.study._optimize").addFilter(_QuietControlFlow())


BASELINE_DEFAULTS = "vllm-defaults"
BASELINE_COMMITTED = "committed-config"
# A worker silent for GRACE_S is presumed dead; its trial is failed and retried (env vars: for tests and slow disks).
HEARTBEAT_S = int(os.environ.get("VLLM_TUNE_HEARTBEAT_S", "20"))
GRACE_S = int(os.environ.get("VLLM_TUNE_GRACE_S", "60"))
MAX_RETRY = 2


def constraints_of(trial: FrozenTrial) -> list[float]:
    """The trial's constraint values (Optuna: <= 0 is feasible); a trial that never set one is infeasible."""
    return list(trial.constraints.values()) or [1.0]


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats, so a killed worker's trial is failed and retried rather than left RUNNING.

    Connects at once: a bad URL, an unreachable host or a wrong password is a one-line UserError here, before any
    study is touched."""
    from harness.study.workers import schema_lock, storage_url

    try:
        sa_url, engine_kwargs = storage_url(url)
        with schema_lock(sa_url, engine_kwargs):  # nodes started together on an empty database
            return optuna.storages.RDBStorage(
                sa_url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    except Exception as exc:  # sqlalchemy raises many types for a bad URL, host or password
        raise UserError(f"cannot open the study storage: {_first_line(exc)}", source=redact(url),
                        key="storage") from None


def _first_line(exc: BaseException) -> str:
    """The driver's reason without SQLAlchemy's '(psycopg2.OperationalError)' prefix and background links."""
    import re

    text = str(getattr(exc, "orig", None) or exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = " ".join(lines[:2]) if lines and lines[0].endswith("failed:") else (lines[0] if lines else "")
    line = re.sub(r"^\([\w.]+\)\s*", "", line)
    return line or type(exc).__name__


def redact(url: str) -> str:
    """Hide a password in a storage URL before it is printed or written into a report."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


def make_sampler(kind: str, objective_kind: str, space: Any, seed: int, n_trials: int) -> optuna.samplers.BaseSampler:
    if kind == "auto":
        kind = "nsga2" if objective_kind == "pareto" else "tpe"
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                          n_startup_trials=max(2, min(10, n_trials // 3)))
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=max(4, min(50, n_trials // 3)))
    if kind == "grid":
        return optuna.samplers.GridSampler(space.search_space_for_grid(), seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def open_study(name: str, storage: optuna.storages.BaseStorage, directions: list[str],
               sampler: optuna.samplers.BaseSampler, identity: dict[str, Any]) -> optuna.Study:
    """Create or resume; refuse to mix trials from a different space, workload or objective into one study."""
    try:
        study = optuna.create_study(study_name=name, storage=storage, directions=directions, sampler=sampler,
                                    load_if_exists=True)
    except ValueError as exc:
        raise UserError(f"study {name!r} exists with other directions: {exc}", key="objective") from None
    have = [d.name.lower() for d in study.directions]
    if have != [d.lower() for d in directions]:  # Optuna loads an existing study whatever directions are asked
        raise UserError(f"study {name!r} exists with other directions ({', '.join(have)}); nothing was changed",
                        key="objective")
    identity = json.loads(json.dumps(identity, sort_keys=True, default=str))  # as storage will hand it back
    existing = study.user_attrs.get("identity")
    if existing is None:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        study.set_user_attr("identity", identity)
    elif existing != identity:
        diff = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
        shown = "; ".join(f"{k}: was {_brief(existing.get(k))}, now {_brief(identity.get(k))}" for k in diff)
        raise UserError(f"study {name!r} was created with a different {', '.join(diff)} ({shown}); use a new "
                        f"results dir / storage or restore the original files (nothing was changed)", key=diff[0])
    return study


def _brief(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def finished(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def enqueue_baselines(study: optuna.Study, baselines: dict[str, dict[str, Any]]) -> None:
    """Baselines are trials 0 and 1: measured exactly like candidates, so every win is over something real."""
    # an interrupted (FAIL) baseline is measured again; one already measured under another label is not measured
    # twice (a committed config that is vLLM's defaults, on the first run or on a rerun)
    kept = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL and t.user_attrs.get("baseline")]
    present = {t.user_attrs["baseline"] for t in kept}
    seen: list[dict[str, Any]] = [t.user_attrs.get("settings") for t in kept]
    for label, settings in baselines.items():
        if label in present or settings in seen:
            continue
        seen.append(settings)
        study.enqueue_trial({}, user_attrs={"baseline": label, "settings": settings})


@dataclass
class Progress:
    """Trial k/N, the current settings, the best so far, and an ETA, one line per event on stderr."""

    total: int
    out: Any = field(default=sys.stderr)
    started: float = field(default_factory=time.monotonic)
    done: int = 0

    def start(self, number: int, label: str, settings: dict[str, Any]) -> None:
        shown = ", ".join(f"{k}={v}" for k, v in settings.items())
        print(f"[{self.done + 1}/{self.total}] trial #{number} ({label}): {shown}", file=self.out, flush=True)

    def end(self, study: optuna.Study, trial: FrozenTrial, note: str) -> None:
        self.done += 1
        elapsed = time.monotonic() - self.started
        eta = elapsed / self.done * max(self.total - self.done, 0)
        best = best_feasible(study)
        best_txt = (f"best so far: #{best.number} {fmt_values(best.values)}" if best is not None
                    else "no feasible trial yet")
        print(f"    -> {note} | {best_txt} | elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min",
              file=self.out, flush=True)


def fmt_values(values: list[float] | None) -> str:
    if not values:
        return "-"
    return " / ".join("inf" if math.isinf(v) else f"{v:.4g}" for v in values)


def feasible_trials(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if all(c <= 0 for c in constraints_of(t))]


def best_feasible(study: optuna.Study) -> FrozenTrial | None:
    """Single objective: the highest value. Pareto: the highest throughput on the feasible front."""
    trials = feasible_trials(study)
    if not trials:
        return None
    return max(trials, key=lambda t: (t.values[0], -t.number))


def make_objective(ctx: StudyContext, progress: Progress, budget: Any = None) -> Callable[[optuna.Trial], Any]:
    def objective(trial: optuna.Trial) -> Any:
        if budget is not None and budget.surplus(trial.study, trial.number):
            from harness.study.workers import Surplus

            trial.set_user_attr("outcome", "surplus")
            trial.set_user_attr("reason", "the other workers' trials already fill the budget; nothing was run")
            trial.study.stop()
            raise Surplus(f"trial #{trial.number} is beyond the study's budget of {budget.target}")
        from harness.study.workers import WORKER_ATTR, worker_record

        # who runs it: if this process dies, a rerun on this host retries the trial at once
        trial.set_user_attr(WORKER_ATTR, worker_record(trial.number))
        baseline = trial.user_attrs.get("baseline")
        if baseline:
            settings = dict(trial.user_attrs["settings"])
        else:
            settings = ctx.space.suggest(trial)
            trial.set_user_attr("settings", settings)
        label = f"trial{trial.number:03d}"
        progress.start(trial.number, baseline or "sampled", settings)
        start_rate = None
        best = best_feasible(trial.study) if ctx.objective.kind == "capacity" else None
        if best is not None and best.values[0] > 0:
            start_rate = best.values[0]  # start where the incumbent is: one step tells if this one is better
        if INTERRUPTED.is_set():
            raise TrialInterrupted("the sweep is stopping")
        ev = evaluate(ctx, settings, label, start_rate=start_rate)
        if INTERRUPTED.is_set():
            raise TrialInterrupted("interrupted while measuring; a rerun measures this trial again")
        record_trial(trial, ev)
        if ev.values is None:
            raise optuna.TrialPruned(ev.pruned_reason)
        return ev.values if len(ev.values) > 1 else ev.values[0]

    return objective


def record_trial(trial: optuna.Trial, ev: Evaluation) -> None:
    """Constraints for the sampler (Optuna's own), and everything the dashboard, the table and the report need
    as user attributes (JSON-safe; the dashboard shows user attributes, so the constraints are repeated there)."""
    constraints = ev.constraints or [1.0]
    for i, value in enumerate(constraints):
        trial.set_constraint(f"c{i}", value)
    trial.set_user_attr("constraints", constraints)
    trial.set_user_attr("metrics", _json_safe(ev.summary()))
    trial.set_user_attr("records", ev.record_paths)
    trial.set_user_attr("device_seconds", round(ev.device_seconds, 1))
    if ev.plan is not None:
        trial.set_user_attr("plan", _json_safe(ev.plan))
    if ev.curve:
        trial.set_user_attr("curve", _json_safe(ev.curve))
    if ev.pruned_reason:
        trial.set_user_attr("outcome", "pruned")
        trial.set_user_attr("reason", ev.pruned_reason)
    elif ev.failure is not None:
        trial.set_user_attr("outcome", f"failed:{ev.failure.kind}")
        trial.set_user_attr("reason", ev.failure.message[:500])
        if ev.failure.max_fitting_len is not None:
            trial.set_user_attr("max_fitting_len", ev.failure.max_fitting_len)
    else:
        ok = all(c <= 0 for c in ev.constraints)
        trial.set_user_attr("outcome", "ok" if ok else "slo_violated")
        if not ok:
            trial.set_user_attr("reason", "SLO not met: violations " + ", ".join(f"{c:+.2f}" for c in ev.constraints))


def _json_safe(obj: Any) -> Any:
    obj = to_dict(obj)
    if isinstance(obj, float) and (math.isinf(obj) or math.isnan(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def describe(trial: FrozenTrial) -> str:
    outcome = trial.user_attrs.get("outcome", trial.state.name.lower())
    reason = trial.user_attrs.get("reason")
    if trial.state == TrialState.COMPLETE:
        return f"{outcome}: {fmt_values(trial.values)}" + (f" ({reason})" if reason else "")
    return f"{outcome}" + (f": {reason}" if reason else "")


def run_trials(study: optuna.Study, ctx: StudyContext, target: int, parallel: int, out: Any = sys.stderr,
               timeout_s: float | None = None) -> None:
    """Run until `target` trials have finished (complete or pruned), counted over every worker and every rerun.

    Several processes (other machines, through a shared storage) may work on the same study: the budget is global
    (`workers.Budget`: finished, running and queued trials of every worker count). Trials of a dead worker are
    failed by the heartbeat and re-queued (RetryHeartbeatStaleTrialCallback); before leaving, a worker waits until
    no trial runs anywhere and runs the re-queued ones (`workers.drain`), so every trial is accounted for.
    `timeout_s`: start no trial after that many seconds (running ones finish). Ctrl-C propagates after the running
    trial's servers are torn down.
    """
    from harness.study.workers import Budget, drain, fail_dead_local_trials

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    retried = fail_dead_local_trials(study)
    if retried:
        print(f"trial(s) {', '.join(f'#{n}' for n in retried)} of a run on this host that was killed: "
              f"queued again", file=out, flush=True)
    budget = Budget(target)
    remaining = target - len(finished(study))
    if remaining <= 0 and not waiting(study) and not running(study):
        print(f"study {study.study_name}: {target} trials already finished; nothing to run", file=out)
        return
    progress = Progress(total=max(remaining, len(waiting(study)), 1), out=out)

    def callback(st: optuna.Study, trial: FrozenTrial) -> None:
        if trial.user_attrs.get("outcome") != "surplus":  # nothing ran: neither a step of the progress nor news
            progress.end(st, trial, f"trial #{trial.number} {describe(trial)}")

    objective = make_objective(ctx, progress, budget)
    if parallel > 1:
        _serialize_claims(study)
    if remaining > 0 and budget.taken(study) < target:
        study.optimize(objective, n_trials=remaining, n_jobs=parallel, callbacks=[callback, budget.callback],
                       catch=(Exception,), gc_after_trial=False, timeout=timeout_s)

    # Re-queued trials of workers that died: wait for the others, run the retries, so every trial is accounted for.
    drain(study, objective, [callback], poll_s=min(HEARTBEAT_S, 5), out=out, deadline=deadline)
    logging.getLogger(__name__).debug("study %s: %d trials finished", study.study_name, len(finished(study)))


def _serialize_claims(study: optuna.Study) -> None:
    """Threads of one worker claim queued trials one at a time. On SQLite Optuna's WAITING -> RUNNING check is not
    atomic between threads (no SELECT ... FOR UPDATE), so two threads could both claim the same queued baseline."""
    from harness.study.workers import rdb

    backend = rdb(study._storage)
    if getattr(backend, "_claims_serialized", False):
        return
    original = backend.set_trial_state_values
    lock = threading.Lock()

    def guarded(trial_id: int, state: TrialState, values: Any = None) -> bool:
        with lock:
            return original(trial_id, state, values)

    backend.set_trial_state_values = guarded
    backend._claims_serialized = True


def running(study: optuna.Study) -> list[FrozenTrial]:
    return list(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def waiting(study: optuna.Study) -> list[FrozenTrial]:
    return list(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))
