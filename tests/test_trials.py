"""The trial schema: what `record_trial` writes is what every reader (runner, table, report) reads back."""

from __future__ import annotations

import optuna

from harness.paths import PROJECT_ROOT
from harness.records import Failure
from harness.settings import Topology
from harness.study.table import trials_table
from harness.study.trials import (Attr, Evaluation, Outcome, best_feasible, constraints_of, gpus_of, is_feasible,
                                  capacity_limit, default_settings_of, label_of, outcome_of, record_trial, study_ceiling)


def _study(evaluations: list[Evaluation]) -> optuna.Study:
    study = optuna.create_study(direction="maximize")
    for ev in evaluations:
        trial = study.ask()
        record_trial(trial, ev)
        if ev.values is None:
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            study.tell(trial, ev.values[0])
    return study


def test_every_trial_records_its_gpu_count_and_outcome() -> None:
    study = _study([
        Evaluation(settings={"replicas": 2, "tensor_parallel_size": 2}, values=[3.0], constraints=[0.0]),
        Evaluation(settings={"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, values=[5.0],
                   constraints=[0.4]),
        Evaluation(settings={"tensor_parallel_size": 8}, pruned_reason="needs 8 GPUs"),
        Evaluation(settings={}, values=[0.0], constraints=[1.0], failure=Failure("oom", "out of memory")),
    ])
    trials = study.get_trials()
    assert [t.user_attrs[Attr.GPUS] for t in trials] == [4, 4, 8, 1] == [gpus_of(t) for t in trials]
    assert [outcome_of(t) for t in trials] == [Outcome.OK, Outcome.SLO_VIOLATED, Outcome.PRUNED, "failed:oom"]
    assert [is_feasible(t) for t in trials] == [True, False, False, False]
    assert constraints_of(trials[1]) == [0.4]
    assert best_feasible(trials).number == 0  # the higher value violates its SLO
    table = trials_table(study)
    assert list(table["gpus"]) == [4, 4, 8, 1] and list(table["feasible"]) == [True, False, False, False]


def test_readers_of_a_trial_without_attributes() -> None:
    study = optuna.create_study()
    study.enqueue_trial({}, user_attrs={Attr.BASELINE: "vllm-defaults", Attr.SETTINGS: {"replicas": 3}})
    trial = study.ask()
    study.tell(trial, 1.0)
    frozen = study.trials[0]
    assert outcome_of(frozen) == Outcome.OK and not is_feasible(frozen)  # no constraint reported: infeasible
    assert gpus_of(frozen) == Topology(replicas=3).gpus == 3
    assert label_of(frozen) == "#0 (vLLM defaults)"


def test_the_plan_attribute_names_the_model_relative_to_the_project() -> None:
    """A study's SQLite file is committed: the planner's record names the model as the project does."""
    model = str(PROJECT_ROOT / "models" / "mistral-7b")
    study = _study([Evaluation(settings={}, values=[1.0], constraints=[0.0],
                               plan={"model": model, "kv_cache_tokens": 10})])
    assert study.trials[0].user_attrs[Attr.PLAN] == {"model": "models/mistral-7b", "kv_cache_tokens": 10}


def test_the_ceiling_is_the_most_any_step_served_per_gpu_held_or_not() -> None:
    study = _study([
        Evaluation(settings={}, values=[15.5], constraints=[0.0],
                   curve=[{"rate": 15.5, "ok": True, "achieved": 15.6}, {"rate": 21.1, "ok": False, "achieved": 17.1,
                                                                          "output_throughput": 4818.0}]),
        Evaluation(settings={"tensor_parallel_size": 2}, values=[9.0], constraints=[0.0],
                   curve=[{"rate": 36.0, "ok": False, "achieved": 30.0}]),  # 15 per GPU: not the ceiling
        Evaluation(settings={}, pruned_reason="does not fit"),
    ])
    c = study_ceiling(study.trials)
    assert c is not None and (c.trial, c.req_s_per_gpu, c.offered_per_gpu, c.held, c.gpus) == (0, 17.1, 21.1, False, 1)
    assert c.output_tok_s_per_gpu == 4818.0 and round(c.share(15.5) or 0, 3) == 0.906
    assert study_ceiling(study.trials[2:]) is None  # no load curve: no ceiling


def _capacity_trial(step: dict, metrics: dict | None = None) -> optuna.trial.FrozenTrial:
    held = {"rate": 15.5, "offered": 15.5, "achieved": 15.6, "ratio": 1.0, "holds": True, "client_limited": False,
            "reason": ""}
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr(Attr.CAPACITY, {"capacity_lo": 15.5, "capacity_hi": step["offered"], "steps": [held, step]})
    trial.set_user_attr(Attr.CURVE, [{"rate": 15.5, "ok": True}, {"rate": step["offered"], "ok": False,
                                                                   "p99_ttft_ms": 257.0, "p99_tpot_ms": 18.4}])
    trial.set_user_attr(Attr.METRICS, metrics or {})
    study.tell(trial, 15.5)
    return study.trials[0]


def test_capacity_limit_names_what_failed_above_the_capacity() -> None:
    throughput = _capacity_trial({"rate": 17.0, "offered": 17.5, "achieved": 16.1, "ratio": 0.92, "holds": False,
                                  "client_limited": False, "reason": "completed 483 of 524 arrivals"},
                                 {"peak_kv_usage": 0.102, "preemptions": 0})
    assert capacity_limit(throughput) == ("the server's throughput: at 17.5 req/s per GPU offered it served 16.1 "
                                          "(0.92 of arrivals); p99 TTFT 257 ms, p99 TPOT 18 ms; KV cache peak 10% at "
                                          "capacity, no preemptions")
    slo = _capacity_trial({"rate": 17.0, "offered": 17.5, "achieved": 17.4, "ratio": 0.99, "holds": False,
                           "client_limited": False, "reason": "SLO percentiles missed: excess over limits +12%"})
    assert capacity_limit(slo) == ("the latency SLO: at 17.5 req/s per GPU offered the server kept up but missed it "
                                   "(p99 TTFT 257 ms, p99 TPOT 18 ms)")
    client = _capacity_trial({"rate": 17.0, "offered": 17.5, "achieved": 17.4, "ratio": 0.99, "holds": False,
                              "client_limited": True, "reason": ""}, {"peak_kv_usage": 0.95, "preemptions": 3})
    assert capacity_limit(client).startswith("the load client") and capacity_limit(client).endswith(
        "KV cache peak 95% at capacity, 3 preemptions")
    assert capacity_limit(_study([Evaluation(settings={}, values=[1.0], constraints=[0.0])]).trials[0]) is None


def test_capacity_limit_says_when_the_steps_disagree() -> None:
    trial = _capacity_trial({"rate": 16.0, "offered": 16.6, "achieved": 15.6, "ratio": 0.94, "holds": False,
                             "client_limited": False, "reason": "completed 467 of 497 arrivals"})
    trial.user_attrs[Attr.CAPACITY]["steps"].append({"rate": 16.3, "offered": 17.0, "achieved": 16.4, "ratio": 0.96,
                                                     "holds": True, "client_limited": False, "reason": ""})
    assert capacity_limit(trial).endswith("; the steps disagree: 17 req/s per GPU held and 16.6 did not, so one "
                                          "window's noise is wider than their 2% gap, and than this bracket")


def test_default_settings_are_what_the_plan_resolved_for_the_settings_left_out() -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    trial.set_user_attr(Attr.SETTINGS, {"max_num_seqs": 194})  # the objective records them
    record_trial(trial, Evaluation(settings={"max_num_seqs": 194}, values=[1.0], constraints=[0.0],
                                   plan={"resolved": {"tp": 1, "max_num_seqs": 194, "block_size": 16,
                                                      "quantization": None}}))
    study.tell(trial, 1.0)
    assert default_settings_of(study.trials[0]) == {"tensor_parallel_size": 1, "block_size": 16}
    assert default_settings_of(_study([Evaluation(settings={}, values=[1.0], constraints=[0.0])]).trials[0]) == {}
