"""Where a study's device time went: start-up phases through the trial schema, the table, the sweep's line and the
report's table, with known device-seconds."""

from __future__ import annotations

import optuna
import pytest

from harness.records import Failure, RunRecord, ServerStats, StartupPhases
from harness.report.document import Doc, _time_section
from harness.report.results import StudyResults
from harness.study.table import trials_table
from harness.study.timing import time_spent
from harness.study.trials import Attr, Evaluation, record_trial, startup_of

# the first replica's start-up (95 s) of a 2-GPU trial whose slowest replica took 100 s
PHASES = StartupPhases(total_s=95.0, python_s=20.0, weights_s=10.0, compile_s=30.0, cuda_graphs_s=15.0,
                       kv_profile_s=5.0, api_s=5.0, other_s=10.0, engine_init_s=50.0, dynamo_s=4.0,
                       compile_cache="hit", compile_cache_key="5c4d3e2f1a0b9c8d")
HW = {"name": "NVIDIA H200", "count": 4, "memory_gib": 139.8, "arch": "hopper"}


def _record(startup_s: float, phases: StartupPhases | None) -> RunRecord:
    return RunRecord(run_id="r", created="", model="m", settings={}, workload={}, arrival={}, slo=None, argv=[],
                     server=ServerStats(startup=phases), startup_s=startup_s)


def _study() -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    evaluations = [
        # launched on 2 GPUs for 150 s: 100 s start-up, 50 s of load steps
        Evaluation(settings={"replicas": 2}, values=[3.0], constraints=[0.0], plan={"gpus_needed": 2},
                   record=_record(100.0, PHASES), device_seconds=300.0),
        # launched on 1 GPU, recorded before start-up phases existed
        Evaluation(settings={}, values=[2.0], constraints=[0.5], plan={"gpus_needed": 1},
                   record=_record(150.0, None), device_seconds=200.0),
        Evaluation(settings={"tensor_parallel_size": 8}, pruned_reason="needs 8 GPUs"),
        # never became ready: all 50 s were a start-up that failed
        Evaluation(settings={}, values=[0.0], constraints=[1.0], plan={"gpus_needed": 1}, device_seconds=50.0,
                   failure=Failure("oom", "out of memory")),
    ]
    for ev in evaluations:
        trial = study.ask()
        trial.set_user_attr(Attr.SETTINGS, ev.settings)
        record_trial(trial, ev)
        if ev.values is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, ev.values[0])
    interrupted = study.ask()  # a killed worker: nothing recorded, FAIL on the rerun
    interrupted.set_user_attr(Attr.PLAN, {"gpus_needed": 4})
    study.tell(interrupted, state=optuna.trial.TrialState.FAIL)
    return study


def test_startup_phases_round_trip_through_the_trial_and_the_table() -> None:
    study = _study()
    trials = study.get_trials()
    assert startup_of(trials[0]) == PHASES
    assert startup_of(trials[1]) is None and startup_of(trials[2]) is None
    table = trials_table(study)
    assert table.loc[0, "startup.compile_s"] == 30.0 and table.loc[0, "compile_cache"] == "hit"
    assert table.loc[0, "compile_cache_key"] == "5c4d3e2f1a0b9c8d" and table.loc[0, "startup_s"] == 100.0
    assert "startup.total_s" not in table  # the metrics' startup_s is the start-up


def test_time_spent_adds_device_seconds_by_where_they_went() -> None:
    t = time_spent(_study().get_trials())
    assert (t.finished, t.launched, t.pruned, t.interrupted, t.started) == (4, 3, 1, 1, 2)
    assert t.device_s == 550.0
    assert t.startup_s == 100.0 * 2 + 150.0 and t.serving_s == 100.0 + 50.0 and t.failed_start_s == 50.0
    assert t.trials_per_device_hour == pytest.approx(4 / (550 / 3600))
    assert t.launched_per_device_hour == pytest.approx(3 / (550 / 3600))
    # trial 0's phases x 2 GPUs; the 5 s its slowest replica took longer counts as "other"
    assert t.phases_s["compile_s"] == 60.0 and t.phases_s["other_s"] == (10.0 + 5.0) * 2
    assert sum(t.phases_s.values()) == 200.0 == t.phases_known_s and t.phases_trials == 1
    assert dict(t.compile_cache) == {"hit": 1}
    assert t.share(t.startup_s) == pytest.approx(350 / 550)
    rows = {where: (secs, share) for where, secs, share in t.rows()}
    assert rows["start-up: torch.compile (1 of 2 trials)"] == (60.0, pytest.approx(60 / 550))
    assert rows["pruned before launch (1 trials)"] == (0.0, 0.0) and rows["all finished trials"] == (550.0, 1.0)
    assert rows["interrupted trials (1): at most, not in the total"][1] is None
    line = t.line("GPU", "4x NVIDIA H200")
    assert line.startswith("time on 4x NVIDIA H200: 4 finished trials (3 launched) in 0.15 GPU-hours = 26.2 trials "
                           "(19.6 launched) per GPU-hour")
    assert "start-up 64%; load steps 27%; failed starts 9%; pruned 1 (0 s); 1 interrupted" in line
    assert "compile cache hit x1" in line


def test_an_empty_study_spends_nothing() -> None:
    t = time_spent([])
    assert t.trials_per_device_hour is None and t.share(1.0) is None
    assert "0 finished trials (0 launched) in 0.00 GPU-hours; pruned 0 (0 s)" in t.line("GPU", "1x H200")


def test_report_table_says_which_gpus() -> None:
    study = _study()
    study.set_user_attr("identity", {"hardware": HW, "model": "m"})
    r = StudyResults(name="m@h200x4@chat@capacity", study=study, table=trials_table(study), identity={},
                     confirm=None, dir=None).refresh()
    df = r.time_table()
    assert df.attrs["hardware"] == "4x NVIDIA H200, 139.8 GiB each"
    assert df.loc[df["where"] == "server start-up", "device_seconds"].item() == 350.0
    assert r.summary()["trials_per_device_hour"] == pytest.approx(26.18, abs=0.01)
    doc = Doc("t")
    _time_section(doc, r)
    md = doc.markdown()
    assert "| where the time went | GPU-minutes on 4x NVIDIA H200, 139.8 GiB each | share |" in md
    assert "**26.2 trials per GPU-hour**" in md and "| server start-up | 5.8 | 64% |" in md


def test_a_confirmation_estimate_starts_each_side_with_its_own_start_up() -> None:
    """One GPU: blocks A, B B, A A, B start the winner twice and the baseline twice. Three servers sharing the GPU
    start in turn (~245 s on the H200, one server ~100 s): the study's median start-up would make the estimate
    minutes short, and a confirmation cut off by the stretch's end is lost."""
    from harness.study.timing import MeasuredCosts

    costs = MeasuredCosts(startup_s=100.0, step_s=60.0)
    assert costs.confirmation_s(2, 3, False) == 4 * 100.0 + 6 * 60.0
    assert costs.confirmation_s(2, 3, False, [245.0, 100.0]) == 2 * 245.0 + 2 * 100.0 + 6 * 60.0
    assert costs.confirmation_s(2, 3, False, [245.0, None]) == 2 * 245.0 + 2 * 100.0 + 6 * 60.0
    assert costs.confirmation_s(1, 3, False, [245.0]) == 245.0 + 3 * 60.0


def _capacity_trial(value: float, steps: list[tuple[float, float]]) -> optuna.trial.FrozenTrial:
    """A capacity trial: its value, and its search's steps as (offered, achieved) req/s."""
    cap = {"capacity_lo": value, "steps": [{"offered": o, "achieved": a, "holds": a >= 0.95 * o} for o, a in steps]}
    return optuna.trial.FrozenTrial(number=0, state=optuna.trial.TrialState.COMPLETE, value=value,
                                    datetime_start=None, datetime_complete=None, params={}, distributions={},
                                    user_attrs={Attr.CAPACITY: cap}, system_attrs={}, intermediate_values={},
                                    trial_id=0)


def test_a_repeat_past_what_the_side_sustains_is_costed_by_its_own_overloaded_steps() -> None:
    """The DialoGPT study's confirmation offers one server 162.6 req/s, 2.3x its 71.2: its search's overloaded
    steps served as little as 33 req/s, so a repeat's backlog drains until the per-request timeout (120 s), not in
    a median step's 50 s. The estimate that left this out said 13.8 minutes for a confirmation of ~18, and one
    cut off by the stretch's end is lost. A side 5% over its capacity that still served it drains in seconds."""
    from harness.study.timing import MeasuredCosts, overload_drain_s

    one_server = _capacity_trial(71.2, [(64.9, 65.0), (91.4, 37.9), (78.1, 33.2), (71.2, 71.3), (75.6, 43.0)])
    assert overload_drain_s(one_server, 162.6, 50.0, 120.0) == 120.0
    assert overload_drain_s(one_server, 80.0, 50.0, 1e9) == pytest.approx((80.0 / 71.2 - 33.2 / 71.2) * 50.0
                                                                           / (33.2 / 71.2))
    assert overload_drain_s(one_server, 71.2, 50.0, 120.0) == 0.0  # its own capacity: it holds, no backlog
    fp8 = _capacity_trial(17.43, [(14.2, 13.8), (18.27, 17.43)])
    assert overload_drain_s(fp8, 18.4, 47.0, 120.0) == pytest.approx((18.4 / 17.43 - 1.0) * 47.0)
    fixed_load = optuna.trial.create_trial(value=40.0)  # no capacity search: its repeats are its own steps
    assert overload_drain_s(fixed_load, 80.0, 50.0, 120.0) == 0.0
    # a step that served nothing is the worst collapse, not a missing number; a search that sustained nothing
    # drains every repeat to the timeout
    stalled = _capacity_trial(71.2, [(71.2, 71.3), (91.4, 0.0)])
    assert overload_drain_s(stalled, 80.0, 50.0, 1e9) == pytest.approx(80.0 / 71.2 * 50.0 / 0.05)
    assert overload_drain_s(_capacity_trial(0.0, [(10.0, 0.0)]), 80.0, 50.0, 120.0) == 120.0
    old = _capacity_trial(71.2, [(91.4, 37.9)])
    del old.user_attrs[Attr.CAPACITY]["capacity_lo"]  # a bracket stored before its ends were: no estimate
    assert overload_drain_s(old, 162.6, 50.0, 120.0) == 0.0
    costs = MeasuredCosts(startup_s=100.0, step_s=50.0)
    assert costs.confirmation_s(2, 2, False, [242.0, 143.0], [0.0, 120.0]) == \
        2 * 242.0 + 143.0 + 4 * 50.0 + 2 * 120.0
    # the cross-check offers each side the repeats' load twice more (our client, then vllm bench serve)
    from harness.measure.vllm_bench import VLLM_BENCH_START_S

    assert costs.confirmation_s(2, 2, True, [242.0, 143.0], [0.0, 120.0]) == \
        2 * 242.0 + 143.0 + (4 + 4) * 50.0 + 2 * VLLM_BENCH_START_S + (2 + 2) * 120.0
