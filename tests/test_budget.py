"""A sweep's `trials` budget counts launched trials: candidates the planner rejects cost no GPU time and do not use
it up (within an allowance, so a space of nearly only infeasible candidates still ends), and an error of the host or
the input stops the study instead of failing every next trial alike."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from conftest import fake_study
from harness.errors import HostError, UserError
from harness.launch.placement import SlotPool
from harness.space.spec import parse_space
from harness.study.evaluate import StudyContext
from harness.study.runner import run_trials
from harness.study.workers import PRUNED_ALLOWANCE, Budget

SPACE = parse_space({"name": "t", "fixed": {}, "knobs": {
    "tensor_parallel_size": {"type": "categorical", "choices": [1, 2]},
    "max_num_seqs": {"type": "int", "low": 1, "high": 1000}}}, "test")


def _study(tmp_path: Path, ok: Any, monkeypatch: pytest.MonkeyPatch, deploy_error: Exception | None = None,
           ) -> tuple[optuna.Study, StudyContext, io.StringIO]:
    """A study on a fake 1-GPU node whose planner accepts a candidate when `ok(settings)`; each launched trial
    'measures' capacity 1 at once (or its deployment raises `deploy_error`)."""

    def fake_plan(ctx: Any, settings: dict[str, Any]) -> Any:
        feasible = ok(settings)
        return SimpleNamespace(feasible=feasible, gpus_needed=1, to_dict=lambda: {"feasible": feasible},
                               reason=lambda: "" if feasible else "rejected by the fake planner")

    class FakeDeploy:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.topology = SimpleNamespace(gpus=1)

        def __enter__(self) -> "FakeDeploy":
            if deploy_error is not None:
                raise deploy_error
            return self

        def __exit__(self, *exc: Any) -> None:
            pass

    ctx = fake_study(monkeypatch, tmp_path, SPACE, SlotPool(gpu_ids=[0], gpu_idle=lambda g: True), fake_plan,
                     FakeDeploy)
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=3))
    return study, ctx, io.StringIO()


def _states(study: optuna.Study) -> list[TrialState]:
    return [t.state for t in study.get_trials(deepcopy=False)]


def test_planner_rejections_do_not_use_up_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study, ctx, log = _study(tmp_path, lambda s: s["tensor_parallel_size"] == 1, monkeypatch)
    run_trials(study, ctx, target=5, parallel=1, out=log)
    states = _states(study)
    assert states.count(TrialState.COMPLETE) == 5 and states.count(TrialState.PRUNED) > 0, states
    assert "[5/5]" in log.getvalue() and "[6/5]" not in log.getvalue()
    assert Budget(5).done(study) == 5
    run_trials(study, ctx, target=5, parallel=1, out=log)  # a rerun: nothing left
    assert _states(study) == states and "5 trials already finished" in log.getvalue()


def test_a_space_of_only_rejected_candidates_still_ends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study, ctx, log = _study(tmp_path, lambda s: False, monkeypatch)
    run_trials(study, ctx, target=2, parallel=1, out=log)
    assert _states(study) == [TrialState.PRUNED] * (2 + PRUNED_ALLOWANCE * 2)


def test_an_error_of_the_host_stops_the_study_after_one_trial(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    held = HostError("GPU 0 still held memory after 300 s", key="CUDA_VISIBLE_DEVICES")
    study, ctx, log = _study(tmp_path, lambda s: True, monkeypatch, deploy_error=held)
    with pytest.raises(UserError, match="GPU 0 still held memory"):
        run_trials(study, ctx, target=4, parallel=1, out=log)
    assert _states(study) == [TrialState.FAIL]  # retried on the next run, as an interrupted trial is


def test_an_error_of_one_candidate_fails_that_trial_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A UserError of a candidate's settings (not of the host) is that trial's failure; the study goes on."""
    bad = UserError("servers_per_gpu > 1 with data_parallel_size > 1", key="servers_per_gpu")
    study, ctx, log = _study(tmp_path, lambda s: True, monkeypatch, deploy_error=bad)
    run_trials(study, ctx, target=2, parallel=1, out=log)  # every trial fails alike here, and none raises
    assert _states(study) == [TrialState.FAIL] * (2 + PRUNED_ALLOWANCE * 2)  # bounded like rejections


def test_a_host_error_in_a_queued_trial_is_raised_after_the_drain(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Queued trials (baselines, a dead worker's retries) run outside Optuna's loop: the host error still ends the
    study with its message, and the other queued trial measures nothing."""
    held = HostError("GPU 0 still held memory after 300 s", key="CUDA_VISIBLE_DEVICES")
    study, ctx, log = _study(tmp_path, lambda s: True, monkeypatch, deploy_error=held)
    for seqs in (4, 8):
        study.enqueue_trial({"tensor_parallel_size": 1, "max_num_seqs": seqs})
    with pytest.raises(HostError, match="GPU 0 still held memory"):
        run_trials(study, ctx, target=2, parallel=1, out=log)
    assert _states(study) == [TrialState.FAIL, TrialState.FAIL]


def test_side_by_side_trials_that_end_pruned_leave_no_budget_unfilled(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """With trials side by side a running trial counts as taken; one that then ends pruned must not leave the
    study a launched trial short."""
    study, ctx, log = _study(tmp_path, lambda s: s["tensor_parallel_size"] == 1, monkeypatch)
    ctx.slots = SlotPool(gpu_ids=[0, 1], gpu_idle=lambda g: True)
    run_trials(study, ctx, target=6, parallel=2, out=log)
    assert _states(study).count(TrialState.COMPLETE) == 6
