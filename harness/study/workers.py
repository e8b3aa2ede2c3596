"""Several workers on one Optuna study: the few steps that Optuna leaves to the caller.

Optuna's RDB storage (SQLite on one node, PostgreSQL across nodes; opened and locked by `harness.study.storage`)
already gives unique trial numbers, atomic hand-out of queued (WAITING) trials, heartbeats and the retry of a dead
worker's trial. What it leaves open, and this module supplies:

- `Budget`: the trial budget is global. A trial counts once it is finished, running (on any worker) or queued, so a
  worker does not start a trial that the others already cover; `surplus()` catches the rare race.
- `drain()`: before a worker leaves, it waits until no trial of the study is running anywhere, failing stale ones
  (Optuna's heartbeat check, which re-queues them through the retry callback; plus trials that never sent a
  heartbeat) and running the re-queued ones (`run_queued()`: takes a queued trial or nothing, where
  `study.optimize` would sample a new trial if another worker took the queued one first), so the study ends with
  every trial accounted for and every worker sees the same final best.
- `worker_seed()`: workers sharing a study seed their samplers differently, or they would propose the same
  candidates.
- `Claim`: one worker runs the confirmation of the winner; the others wait for its result. The claim carries a
  heartbeat like a trial, so a claim of a dead worker is taken over after the grace period.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import os
import socket
import sys
import threading
import time
from typing import Any, Callable

import optuna
from optuna.trial import FrozenTrial, TrialState

from harness.study.storage import rdb, study_lock
from harness.study.trials import Attr, baseline_of

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def worker_seed(seed: int) -> int:
    """The sweep's seed mixed with this worker's identity (host:pid): workers sharing a study sample differently."""
    digest = hashlib.sha256(f"{seed}:{worker_id()}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


# ---------------------------------------------------------------------------------------------- budget


# A candidate the planner rejects costs no GPU time, so it does not count toward the budget: `trials: 16` means 16
# launched trials. Rejections beyond this many per trial of the budget count again, so a space whose candidates are
# nearly all infeasible still ends.
PRUNED_ALLOWANCE = 10


class Budget:
    """`target` launched trials over every worker (complete, running or queued; planner rejections do not count,
    up to `PRUNED_ALLOWANCE` x target of them)."""

    def __init__(self, target: int) -> None:
        self.target = target

    def count(self, trials: list[FrozenTrial], exclude: int | None = None, *, done_only: bool = False) -> int:
        """Trials that use up the budget: finished ones, and with `done_only` False also running and queued."""
        launched = pruned = 0
        for t in trials:
            if t.number == exclude:
                continue
            if t.state == TrialState.PRUNED:
                pruned += 1
            elif t.state == TrialState.COMPLETE or (not done_only and t.state in (TrialState.RUNNING,
                                                                                   TrialState.WAITING)):
                launched += 1
        return launched + max(0, pruned - PRUNED_ALLOWANCE * self.target)

    def taken(self, study: optuna.Study, exclude: int | None = None) -> int:
        return self.count(study.get_trials(deepcopy=False), exclude)

    def done(self, study: optuna.Study) -> int:
        """Finished trials that count (what `trial k/N` and a rerun's remaining trials are measured against)."""
        return self.count(study.get_trials(deepcopy=False), done_only=True)

    def max_asks(self, study: optuna.Study) -> int:
        """An upper bound on the trials this worker may still ask for: what is left of the budget and of the
        allowance, which planner rejections and trials the harness failed (FAIL) share, so neither a stream of
        rejections nor of crashes runs forever."""
        trials = study.get_trials(deepcopy=False)
        pruned = sum(1 for t in trials if t.state in (TrialState.PRUNED, TrialState.FAIL))
        return max(self.target - self.count(trials, done_only=True) + PRUNED_ALLOWANCE * self.target - pruned, 0)

    def callback(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """After each trial: stop this worker's loop when the finished, running and queued trials fill the budget."""
        if self.taken(study) >= self.target:
            study.stop()

    def surplus(self, study: optuna.Study, number: int) -> bool:
        """Trial `number` is a freshly sampled one that the others' trials already cover (two workers asked at the
        same moment). Queued trials (baselines, retries of a dead worker's trial) are never surplus."""
        trials = study.get_trials(deepcopy=False)
        me = next((t for t in trials if t.number == number), None)
        if me is None or "failed_trial" in me.system_attrs or "fixed_params" in me.system_attrs \
                or baseline_of(me):
            return False
        # a later trial that is running or queued does not count against this one: of two asked at the same moment
        # the earlier runs (each counting the other, both would be surplus and the budget left unfilled)
        earlier = [t for t in trials if t.number < number or t.state not in (TrialState.RUNNING, TrialState.WAITING)]
        return self.count(earlier, exclude=number) >= self.target


class Surplus(Exception):
    """Raised by the objective for a surplus trial: Optuna marks it FAIL and no server is started."""


# ---------------------------------------------------------------------------------------------- drain


def drain(study: optuna.Study, objective: Callable[[optuna.Trial], Any], callbacks: list[Callable[..., None]], *,
          poll_s: float, out: Any = sys.stderr, deadline: float | None = None, settle_s: float = 2.0) -> None:
    """Wait until no trial of the study is running on any worker; run re-queued (WAITING) trials meanwhile.

    A dead worker's trial is failed by the heartbeat check after the grace period and re-queued by the retry
    callback (both Optuna's); whichever worker is draining then runs it. The study counts as drained after two
    empty looks `settle_s` apart: between failing a stale trial and queueing its retry, another worker's check
    sees neither. Past `deadline` (time.monotonic()) it starts nothing more and returns; a rerun picks up the rest.
    """
    from optuna.storages import fail_stale_trials

    shown: tuple[int, ...] | None = None
    empty_since: float | None = None
    while True:
        if deadline is not None and time.monotonic() >= deadline:
            return
        fail_stale_trials(study)
        fail_silent_trials(study)
        fail_dead_local_trials(study)
        trials = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
        if any(t.state == TrialState.WAITING for t in trials):
            empty_since = None
            run_queued(study, objective, callbacks)
            continue
        running = tuple(t.number for t in trials if t.state == TrialState.RUNNING)
        if not running:
            if empty_since is not None and time.monotonic() - empty_since >= settle_s:
                return
            empty_since = empty_since or time.monotonic()
            time.sleep(settle_s)
            continue
        empty_since = None
        if running != shown:
            shown = running
            print(f"    waiting for trial(s) {', '.join(f'#{n}' for n in running)} running on other workers "
                  f"(a dead worker's trial is retried after the heartbeat grace period)", file=out, flush=True)
        time.sleep(poll_s)


def run_queued(study: optuna.Study, objective: Callable[[optuna.Trial], Any],
               callbacks: list[Callable[..., None]]) -> bool:
    """Take one WAITING trial and run it as `study.optimize` would (heartbeat, tell, callbacks); False if none.

    `study.optimize` would do the same, except when another worker takes the queued trial first: then its
    `ask()` samples a new trial, beyond the budget. Here the trial is taken the way `ask()` takes it (an atomic
    WAITING -> RUNNING update), and nothing else is created."""
    storage = study._storage
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        try:
            if not storage.set_trial_state_values(frozen._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        trial = optuna.Trial(study, frozen._trial_id)
        try:
            from optuna.storages._heartbeat import get_heartbeat_thread

            beat: Any = get_heartbeat_thread(trial._trial_id, storage)
        except Exception:  # noqa: BLE001 - Optuna moved it: run without; the trial then cannot be retried
            beat = contextlib.nullcontext()
        values: Any = None
        state: TrialState | None = None
        error: BaseException | None = None
        with beat:
            try:
                values = objective(trial)
            except optuna.TrialPruned:
                state = TrialState.PRUNED
            except (Exception, KeyboardInterrupt) as exc:
                state, error = TrialState.FAIL, exc
        if state is None:
            done = study.tell(trial, values)
        else:
            done = study.tell(trial, state=state)
        if isinstance(error, KeyboardInterrupt):
            raise error
        if error is not None:
            print(f"    trial #{trial.number} failed: {error!r}", file=sys.stderr, flush=True)
        for cb in callbacks:
            cb(study, done)
        return True
    return False


def fail_silent_trials(study: optuna.Study) -> None:
    """Fail (and re-queue) RUNNING trials that never sent a heartbeat although they started more than the grace
    period ago: a worker that died between taking the trial and its first heartbeat, a window Optuna's stale check
    does not cover (it skips trials without a heartbeat row)."""
    storage = study._storage  # Optuna's cache layer in front of the RDB storage: state changes go through it
    backend = rdb(storage)
    grace = getattr(backend, "grace_period", None)
    if grace is None or getattr(backend, "heartbeat_interval", None) is None:
        return
    try:  # Optuna's own table of heartbeats; if its layout changes, fall back to Optuna's check alone
        import sqlalchemy
        from optuna.storages._rdb import models

        with backend.engine.connect() as conn:
            beating = {row[0] for row in conn.execute(sqlalchemy.select(models.TrialHeartbeatModel.trial_id))}
    except Exception:
        return
    now = _dt.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial._trial_id in beating or trial.datetime_start is None:
            continue
        if (now - trial.datetime_start).total_seconds() <= 2 * grace:
            continue
        _fail_and_requeue(study, trial)


def worker_record(trial_number: int | None = None) -> dict[str, Any]:
    """Host, pid and pid namespace (a pid is only this host's to check inside the same namespace: containers that
    share a host name do not share pids), and the trial it runs: a retry inherits the failed trial's user
    attributes, and the dead worker named there is not the one about to run the retry."""
    try:
        namespace: int | None = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = None
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_namespace": namespace, "trial": trial_number}


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Fail (and re-queue) RUNNING trials of a worker on this host whose process is gone: a sweep killed on this
    machine is resumed at once, not after the heartbeat grace period, and its trials do not count as taken by a
    live worker. A pid now used by a process younger than the trial is a dead worker's too."""
    import psutil

    me = worker_record()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = trial.user_attrs.get(Attr.WORKER)
        if not isinstance(owner, dict) or trial.datetime_start is None or not isinstance(owner.get("pid"), int) \
                or (owner.get("host"), owner.get("pid_namespace"), owner.get("trial")) != \
                (me["host"], me["pid_namespace"], trial.number):
            continue
        try:
            alive = psutil.Process(owner["pid"]).create_time() <= trial.datetime_start.timestamp()
        except psutil.Error:
            alive = False
        if not alive and _fail_and_requeue(study, trial):
            failed.append(trial.number)
    return failed


def _fail_and_requeue(study: optuna.Study, trial: FrozenTrial) -> bool:
    """FAIL a RUNNING trial and queue its retry as Optuna's heartbeat check does (RetryFailedTrialCallback)."""
    storage = study._storage  # Optuna's cache layer in front of the RDB storage: state changes go through it
    try:
        if not storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:
        callback(study, storage.get_trial(trial._trial_id))
    return True


# ---------------------------------------------------------------------------------------------- claim


class Claim:
    """A study-level job (the confirmation) done by one worker: `acquire()` under the study lock; the owner keeps
    `<key>.beat` fresh from a thread; a claim whose beat is older than `grace_s` belongs to a dead worker."""

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage, key: str, *,
                 heartbeat_s: float, grace_s: float) -> None:
        self.study, self.storage, self.key = study, storage, key
        self.heartbeat_s, self.grace_s = heartbeat_s, grace_s
        self.me = worker_id()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def owner(self) -> str | None:
        """The live owner, or None when unclaimed or its owner stopped beating."""
        claim = self.study.user_attrs.get(self.key)
        if not claim:
            return None
        beat = _dt.datetime.fromisoformat(claim["beat"])
        if (_dt.datetime.now(_dt.timezone.utc) - beat).total_seconds() > self.grace_s:
            return None
        return str(claim["worker"])

    def acquire(self) -> bool:
        with study_lock(self.storage, self.study.study_name):
            owner = self.owner()
            if owner is not None and owner != self.me:
                return False
            self._beat()
        self._thread = threading.Thread(target=self._run, name="claim-heartbeat", daemon=True)
        self._thread.start()
        return True

    def _beat(self) -> None:
        self.study.set_user_attr(self.key, {"worker": self.me,
                                            "beat": _dt.datetime.now(_dt.timezone.utc).isoformat()})

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a lost beat only lets another worker take over later
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.study.set_user_attr(self.key, None)


def wait_for(get: Callable[[], Any], claim: Claim, *, poll_s: float, out: Any = sys.stderr) -> Any:
    """Poll `get()` until it returns a value; None when the claim's owner died first (then take over)."""
    told = False
    while True:
        value = get()
        if value is not None:
            return value
        owner = claim.owner()
        if owner is None:
            return None
        if not told:
            print(f"    worker {owner} is confirming the winner; waiting for its result", file=out, flush=True)
            told = True
        time.sleep(poll_s)
