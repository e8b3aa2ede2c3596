"""A sweep stopped by Ctrl-C ends promptly, and a rerun after a killed sweep on the same host resumes at once.

Found on a 4-GPU host: after Ctrl-C, a trial thread that was waiting for GPUs got them once the other servers were
stopped and started a new server, keeping the process alive past the slot's end; the rerun then waited a heartbeat
grace period for the killed run's trials and logged its surplus trials with tracebacks.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from harness.launch import server as server_mod
from harness.launch.server import Server, ServerSpec, ServerStartError
from harness.study.runner import TrialInterrupted, configure_optuna_logging
from harness.study.storage import make_storage
from harness.study.trials import Attr
from harness.study.workers import Surplus, fail_dead_local_trials, worker_record


def test_no_server_starts_after_stop_all(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(server_mod, "_STOPPED", threading.Event())  # this process's flag stays clear for others
    server_mod.stop_all()
    srv = Server(ServerSpec(model=str(tmp_path), log_path=tmp_path / "server.log"))
    with pytest.raises(ServerStartError) as exc:
        srv.start()
    assert exc.value.failure.kind == "interrupted" and srv.proc is None


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _running(study: optuna.Study, worker: dict[str, Any], inherited: bool = False) -> int:
    trial = study.ask()
    trial.set_user_attr(Attr.WORKER, {**worker, "trial": trial.number - inherited})
    trial.set_user_attr("settings", {"max_num_seqs": trial.number})
    return trial.number


def test_a_killed_runs_trials_on_this_host_are_queued_again_at_once(tmp_path: Path) -> None:
    study = optuna.create_study(storage=make_storage(f"sqlite:///{tmp_path / 'db.sqlite'}"), study_name="s")
    me = worker_record()
    dead = _running(study, {**me, "pid": _dead_pid()})
    alive = _running(study, me)  # this process: alive
    elsewhere = _running(study, {**me, "host": "another-node", "pid": _dead_pid()})  # left to the heartbeat
    container = _running(study, {**me, "pid_namespace": -1, "pid": _dead_pid()})  # same name, other pids
    # a retry just taken by a live worker still carries the failed trial's attributes (its dead worker)
    retry_taken = _running(study, {**me, "pid": _dead_pid()}, inherited=True)
    assert fail_dead_local_trials(study) == [dead]
    by_number = {t.number: t for t in study.get_trials()}
    assert by_number[dead].state == TrialState.FAIL
    assert {by_number[n].state for n in (alive, elsewhere, container, retry_taken)} == {TrialState.RUNNING}
    retry = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == dead]
    assert len(retry) == 1 and retry[0].state == TrialState.WAITING
    assert retry[0].user_attrs["settings"] == {"max_num_seqs": dead}
    assert fail_dead_local_trials(study) == []  # once


@pytest.mark.parametrize("error", [Surplus("trial #3 is beyond the study's budget of 2"),
                                   TrialInterrupted("the sweep is stopping")])
def test_control_flow_exceptions_are_not_logged_as_crashes(error: Exception) -> None:
    import io
    import logging

    seen = io.StringIO()
    handler = logging.StreamHandler(seen)  # beside Optuna's own stderr handler, which holds the stream it began with
    logging.getLogger("optuna").addHandler(handler)
    verbosity = optuna.logging.get_verbosity()
    configure_optuna_logging()  # what the sweep does at start; other tests may have lowered the verbosity
    try:
        study = optuna.create_study()

        def objective(trial: optuna.Trial) -> Any:
            raise error

        study.optimize(objective, n_trials=1, catch=(Exception,))
        assert study.trials[0].state == TrialState.FAIL
        assert "Traceback" not in seen.getvalue() and "failed with" not in seen.getvalue()

        def crash(trial: optuna.Trial) -> Any:
            raise RuntimeError("a real bug")

        study.optimize(crash, n_trials=1, catch=(Exception,))
        assert "RuntimeError: a real bug" in seen.getvalue()  # a real error is still shown, with its traceback
        assert "Trial 1 failed with value None" in seen.getvalue()
    finally:
        logging.getLogger("optuna").removeHandler(handler)
        optuna.logging.set_verbosity(verbosity)
