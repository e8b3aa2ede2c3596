"""One Optuna study per (model, hardware, workload, objective): baselines first, then the sampler, then confirm.

Optuna owns the search and the storage; this module only turns an `Evaluation` into what Optuna records
(values, constraints, user attributes) so the dashboard, the table and the report read the same facts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.errors import HostError, UserError
from harness.settings import STATED_DEFAULT_KEYS
from harness.study.evaluate import StudyContext, evaluate
from harness.study.objectives import Objective
from harness.study.storage import HEARTBEAT_S, rdb
from harness.study.trials import (Attr, StudyAttr, baseline_of, best_feasible, describe, fmt_values, outcome_of,
                                  Outcome, default_settings_of, record_surplus, record_trial,
                                  settings_of)
from harness.study.workers import Budget, Surplus, drain, fail_dead_local_trials, worker_record

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
        message = record.getMessage()
        if not message.startswith("Trial "):
            return True
        number = message.split()[1]
        if record.exc_info and isinstance(record.exc_info[1], (Surplus, TrialInterrupted)):
            self._quiet.add(number)
            return False
        return not (number in self._quiet and "failed with value" in message)


_CONTROL_FLOW_FILTER = _QuietControlFlow()


def configure_optuna_logging() -> None:
    """What the CLIs call once at start: Optuna at WARNING (our own progress lines say what its INFO would), no
    experimental-feature warnings (heartbeats and retries are what multi-node resilience rests on), and no
    tracebacks for the exceptions that only steer a run. Never done at import: a library user keeps theirs."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logger = logging.getLogger("optuna.study._optimize")
    if _CONTROL_FLOW_FILTER not in logger.filters:
        logger.addFilter(_CONTROL_FLOW_FILTER)


def make_sampler(kind: str, objective: Objective, space: Any, seed: int,
                 n_trials: int) -> optuna.samplers.BaseSampler:
    """`kind` from the sweep file; `auto` is the objective's choice (TPE, NSGA-II for a Pareto front)."""
    if kind == "auto":
        kind = objective.default_sampler
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
    existing = _without_space_source(study.user_attrs.get(StudyAttr.IDENTITY))
    if existing is None:
        for key, value in identity.items():
            study.set_user_attr(key, value)
        study.set_user_attr(StudyAttr.IDENTITY, identity)
    elif existing != identity:
        diff = sorted(k for k in set(existing) | set(identity) if existing.get(k) != identity.get(k))
        shown = "; ".join(f"{k}: was {_brief(existing.get(k))}, now {_brief(identity.get(k))}" for k in diff)
        raise UserError(f"study {name!r} was created with a different {', '.join(diff)} ({shown}); use a new "
                        f"results dir / storage or restore the original files (nothing was changed)", key=diff[0])
    return study


def _without_space_source(identity: dict[str, Any] | None) -> dict[str, Any] | None:
    """A stored identity without the space file's path, which studies stored before it was left out have."""
    if identity is None or not isinstance(identity.get("space"), dict) or "source" not in identity["space"]:
        return identity
    return {**identity, "space": {k: v for k, v in identity["space"].items() if k != "source"}}


def _brief(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def enqueue_baselines(study: optuna.Study, baselines: dict[str, dict[str, Any]]) -> None:
    """Baselines are trials 0 and 1: measured exactly like candidates, so every win is over something real."""
    # an interrupted (FAIL) baseline is measured again; one already measured under another label is not measured
    # twice (a committed config that is vLLM's defaults, on the first run or on a rerun)
    kept = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL and baseline_of(t)]
    present = {baseline_of(t) for t in kept}
    queued: list[dict[str, Any]] = []
    for label, settings in baselines.items():
        if label in present or settings in queued or measured_as(settings, kept) is not None:
            continue
        queued.append(settings)
        study.enqueue_trial({}, user_attrs={Attr.BASELINE: label, Attr.SETTINGS: settings})


def measured_as(settings: dict[str, Any], trials: Iterable[FrozenTrial]) -> FrozenTrial | None:
    """The first of `trials` that ran with what `settings` ask for (`same_settings`), None when none did."""
    return next((t for t in trials if same_settings(settings, settings_of(t), default_settings_of(t))), None)


def same_settings(settings: dict[str, Any], given: dict[str, Any], defaults: dict[str, Any]) -> bool:
    """Whether `settings` ask for what a trial that set `given` ran with: the same, but for a setting an emitted
    config states where the trial left it out (`STATED_DEFAULT_KEYS`), at the value the trial's plan resolved for
    it (`defaults`). A servers_per_gpu config states vLLM's 0.92, split between its vllm_instances; read back as
    a baseline, it is the trial it came from, not a new one to measure again. Only those keys: the plan's table
    of vLLM's defaults is checked against vLLM for the memory it sizes, not for every setting."""
    stated = {k: v for k, v in settings.items()
              if not (k in STATED_DEFAULT_KEYS and k not in given and k in defaults and defaults[k] == v)}
    return stated == given


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

    def end(self, study: optuna.Study, trial: FrozenTrial, note: str, counted: bool = True) -> None:
        self.done += counted
        elapsed = time.monotonic() - self.started
        eta = elapsed / max(self.done, 1) * max(self.total - self.done, 0)
        best = best_feasible(study.get_trials(deepcopy=False))
        best_txt = (f"best so far: #{best.number} {fmt_values(best.values)}" if best is not None
                    else "no feasible trial yet")
        print(f"    -> {note} | {best_txt} | elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min",
              file=self.out, flush=True)


def make_objective(ctx: StudyContext, progress: Progress, budget: Budget | None = None,
                   fatal: list[HostError] | None = None) -> Callable[[optuna.Trial], Any]:
    """`fatal` collects a HostError raised while measuring (the host, not the candidate: every next trial would
    fail alike): the study stops, later trials measure nothing, and `run_trials` raises it."""
    def objective(trial: optuna.Trial) -> Any:
        if budget is not None and budget.surplus(trial.study, trial.number):
            record_surplus(trial)
            trial.study.stop()
            raise Surplus(f"trial #{trial.number} is beyond the study's budget of {budget.target}")
        # who runs it: if this process dies, a rerun on this host retries the trial at once
        trial.set_user_attr(Attr.WORKER, worker_record(trial.number))
        baseline = baseline_of(trial)
        if baseline:
            settings = settings_of(trial)
        else:
            settings = ctx.space.suggest(trial)
            trial.set_user_attr(Attr.SETTINGS, settings)
        label = f"trial{trial.number:03d}"
        progress.start(trial.number, baseline or "sampled", settings)
        best = best_feasible(trial.study.get_trials(deepcopy=False))
        if INTERRUPTED.is_set() or fatal:
            raise TrialInterrupted(f"the sweep is stopping{f': {fatal[0]}' if fatal else ''}")
        # a baseline's bracket is closed (the report compares them); a sampled trial stops once shown worse
        try:
            ev = evaluate(ctx, settings, label, incumbent=list(best.values) if best is not None else None,
                          must_beat=not baseline)
        except HostError as exc:
            if fatal is not None:
                fatal.append(exc)
            with contextlib.suppress(RuntimeError):  # a queued trial run by `drain` has no optimize loop to stop
                trial.study.stop()
            raise
        if INTERRUPTED.is_set():
            raise TrialInterrupted("interrupted while measuring; a rerun measures this trial again")
        record_trial(trial, ev)
        if ev.values is None:
            raise optuna.TrialPruned(ev.pruned_reason)
        return ev.values if len(ev.values) > 1 else ev.values[0]

    return objective


def run_trials(study: optuna.Study, ctx: StudyContext, target: int, parallel: int, out: Any = sys.stderr,
               timeout_s: float | None = None) -> None:
    """Run until `target` trials have finished, counted over every worker and every rerun; a candidate the planner
    rejects (pruned: no server started) does not count, up to `workers.PRUNED_ALLOWANCE` x target of them.

    Several processes (other machines, through a shared storage) may work on the same study: the budget is global
    (`workers.Budget`: finished, running and queued trials of every worker count). Trials of a dead worker are
    failed by the heartbeat and re-queued (RetryHeartbeatStaleTrialCallback); before leaving, a worker waits until
    no trial runs anywhere and runs the re-queued ones (`workers.drain`), so every trial is accounted for.
    `timeout_s`: start no trial after that many seconds (running ones finish). Ctrl-C propagates after the running
    trial's servers are torn down.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    retried = fail_dead_local_trials(study)
    if retried:
        print(f"trial(s) {', '.join(f'#{n}' for n in retried)} of a run on this host that was killed: "
              f"queued again", file=out, flush=True)
    budget = Budget(target)
    remaining = target - budget.done(study)
    if remaining <= 0 and not waiting(study) and not running(study):
        print(f"study {study.study_name}: {target} trials already finished; nothing to run", file=out)
        return
    progress = Progress(total=max(remaining, len(waiting(study)), 1), out=out)
    on_cpu = getattr(ctx.hardware, "arch", "") == "cpu"

    def callback(st: optuna.Study, trial: FrozenTrial) -> None:
        if outcome_of(trial) != Outcome.SURPLUS:  # nothing ran: neither a step of the progress nor news
            # a candidate the planner rejected is news, but not a step: it does not count toward the budget
            progress.end(st, trial, f"trial #{trial.number} {describe(trial, on_cpu)}",
                         counted=trial.state != TrialState.PRUNED)

    fatal: list[HostError] = []
    objective = make_objective(ctx, progress, budget, fatal)
    if parallel > 1:
        _serialize_claims(study)
    # Side by side, the budget counts a running trial as taken; one that then ends pruned (or interrupted) leaves
    # the budget short after the loop has stopped, so the loop runs again until the budget is filled or spent.
    # Each round finishes a launched trial or uses up some of the allowance (pruned, failed and surplus trials
    # share it), so the rounds end; one that asked for nothing ends them too.
    while True:
        left_s = None if deadline is None else deadline - time.monotonic()
        if (budget.taken(study) >= target or budget.max_asks(study) <= 0 or fatal or INTERRUPTED.is_set()
                or (left_s is not None and left_s <= 0)):
            break
        asked = len(study.get_trials(deepcopy=False))
        study.optimize(objective, n_trials=budget.max_asks(study), n_jobs=parallel,
                       callbacks=[callback, budget.callback],
                       catch=(Exception,), gc_after_trial=False, timeout=left_s)
        if len(study.get_trials(deepcopy=False)) == asked:
            break
    if fatal:
        raise fatal[0]

    # Re-queued trials of workers that died: wait for the others, run the retries, so every trial is accounted for.
    drain(study, objective, [callback], poll_s=min(HEARTBEAT_S, 5), out=out, deadline=deadline)
    if fatal:
        raise fatal[0]
    logging.getLogger(__name__).debug("study %s: %d trials finished", study.study_name, budget.done(study))


def _serialize_claims(study: optuna.Study) -> None:
    """Threads of one worker claim queued trials one at a time. On SQLite Optuna's WAITING -> RUNNING check is not
    atomic between threads (no SELECT ... FOR UPDATE), so two threads could both claim the same queued baseline."""
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
