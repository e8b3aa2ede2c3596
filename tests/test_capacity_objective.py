"""The capacity objective end to end over the known-capacity fake: LoadSteps -> Deployment.run_window -> the
windowed step -> the steady verdict -> search_capacity; and per-GPU ranking through the study's own code.

The fake (`tests/capacity_fake.py`) has 8 slots serving 8-token requests in 0.2 s: 40 req/s in closed form.
"""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import pytest

from capacity_fake import CapacityConfig, CapacityFake, requests_for
from harness.deploy import Deployment
from harness.records import SLO, RunMetrics, RunRecord, Steady, load_record, save_record
from harness.study.objectives import CapacityObjective, GoodputObjective, LoadSteps
from harness.study.trials import Attr, Evaluation, best_feasible, capacity_of, record_trial, steady_of

CONFIG = CapacityConfig(slots=8, prefill_s=0.025, token_s=0.025, tokens_per_chunk=4)
OUTPUT_TOKENS = 8
MU = CONFIG.capacity(4, OUTPUT_TOKENS)
SLO_ = SLO(ttft_ms=1000.0, tpot_ms=50.0)


@pytest.fixture(scope="module")
def fake():  # type: ignore[no-untyped-def]
    with CapacityFake(CONFIG) as server:
        yield server


def fake_deployment(fake: CapacityFake, settings: dict[str, Any] | None = None) -> Deployment:
    """A Deployment whose one 'server' is the fake (no process of ours to sample or to read a log from)."""
    server = SimpleNamespace(pid=None, returncode=None, read_log=lambda: "", log_path="fake.log",
                             launched_at=None, startup_s=None)
    group = SimpleNamespace(targets=[(fake.url, None)], servers=[server], argv=[])
    return Deployment(model=fake.config.model, settings=dict(settings or {}), group=group)  # type: ignore[arg-type]


def load_steps(fake: CapacityFake, tmp_path: Path, out: Any = None, settings: dict[str, Any] | None = None) -> LoadSteps:
    workload = SimpleNamespace(api="completions", warmup_requests=0, seed=0, to_dict=lambda: {"name": "fake"})
    saved: list[Path] = []

    def save(record: RunRecord, step: int) -> None:
        saved.append(save_record(record, tmp_path / f"step{step}.json"))

    steps = LoadSteps(deployment=fake_deployment(fake, settings), workload=workload,
                      requests_for=lambda step, n: requests_for(n, OUTPUT_TOKENS), slo=SLO_, plan=None, save=save,
                      label="trial000", out=out)
    steps.saved = saved  # type: ignore[attr-defined]
    return steps


def test_capacity_objective_finds_the_fakes_true_capacity(fake: CapacityFake, tmp_path: Path) -> None:
    log = io.StringIO()
    obj = CapacityObjective(slo=SLO_, step_s=5.0, warmup_s=1.0, drain_s=60.0, start_rate=1.5 * MU, max_steps=6)
    steps = load_steps(fake, tmp_path, out=log)
    got = obj.measure(steps)
    cap = got.capacity
    assert cap is not None
    trace = [(round(s["offered"], 1), round(s["achieved"], 1), s["holds"], s["reason"]) for s in cap["steps"]]
    assert abs(cap["capacity_lo"] - MU) <= 0.05 * MU, trace
    assert cap["capacity_hi"] is not None and cap["capacity_lo"] < cap["capacity_hi"] <= MU * 1.2, trace
    assert got.values == [pytest.approx(cap["capacity_lo"])]  # one server on 1 "GPU": per GPU = absolute
    assert got.metrics["capacity_rps"] == cap["capacity_lo"] and got.constraints == [0.0]
    # every step's record was saved with its steady block, and the value's record holds
    records = [load_record(p) for p in steps.saved]  # type: ignore[attr-defined]
    assert len(records) == len(cap["steps"]) and all(r.steady is not None for r in records)
    assert got.record is not None and got.record.steady is not None and got.record.steady.holds
    assert got.record.steady.slo_ok is True
    # the step line says which step of the search it is on, and the verdict
    text = log.getvalue()
    assert "trial000 step 1: capacity search step 1 of at most 6:" in text and "does not hold" in text


def test_a_short_burst_above_capacity_is_not_steady(fake: CapacityFake, tmp_path: Path) -> None:
    """A 3 s step at 1.5x capacity: a request-count step of this size passes its percentiles; the window does not."""
    obj = CapacityObjective(slo=SLO(ttft_ms=5000.0, tpot_ms=500.0), step_s=3.0, warmup_s=0.5, drain_s=60.0)
    steps = load_steps(fake, tmp_path)
    record = steps.run_window(1.5 * MU, obj.window_spec(), obj.criteria())
    assert record.steady is not None and not record.steady.holds and not record.steady.kept_up
    assert record.steady.completion_ratio < 0.9 and record.steady.reasons


def test_confirmation_repeat_is_a_windowed_step_at_the_winners_rate(fake: CapacityFake, tmp_path: Path) -> None:
    obj = CapacityObjective(slo=SLO_, step_s=5.0, warmup_s=0.5, drain_s=60.0)
    steps = load_steps(fake, tmp_path)
    got = obj.measure_repeat(steps, [0.5 * MU])
    assert got.record is not None and got.record.steady is not None and got.record.steady.holds
    assert got.record.arrival["rate"] == pytest.approx(0.5 * MU) and "window" in got.record.arrival
    assert got.values[0] == pytest.approx(0.5 * MU, rel=0.15)  # goodput at a rate it sustains: about the rate
    assert all(c <= 0 for c in got.constraints)
    assert obj.confirm_metric([20.0]) == "goodput_per_gpu_at_20_rps_per_gpu"


# ---------------------------------------------------------------------------------------------- per GPU


class ModelSteps:
    """LoadSteps' interface over a model server of `capacity` req/s on `gpus` GPUs (no load runs)."""

    def __init__(self, capacity: float, gpus: int) -> None:
        self.capacity, self._gpus, self.rates = capacity, gpus, []

    @property
    def gpus(self) -> int:
        return self._gpus

    def run_window(self, rate: float, spec: Any, criteria: Any, note: str = "") -> RunRecord:
        self.rates.append(rate)
        served = min(rate, self.capacity)
        holds = rate <= self.capacity
        n = int(rate * spec.step_s)
        steady = Steady(holds=holds, kept_up=holds, offered_rate=rate, achieved_rate=served, requests=n,
                        completed=int(served * spec.step_s), completion_ratio=served / rate, slo_ok=True,
                        reasons=[] if holds else ["completed too few"])
        metrics = RunMetrics(duration_s=spec.step_s, completed=int(served * spec.step_s), failed=0,
                             total_input_tokens=0, total_output_tokens=0, request_throughput=served,
                             output_throughput=100 * served, total_token_throughput=100 * served, goodput=served, ttft_ms=None,
                             tpot_ms=None, itl_ms=None, e2e_ms=None)
        return RunRecord(run_id="r", created="", model="m", settings={}, workload={}, arrival={"rate": rate},
                         slo=None, argv=[], metrics=metrics, steady=steady)


def test_study_ranks_per_gpu_a_one_gpu_candidate_above_a_two_gpu_one_of_less_than_twice_its_capacity() -> None:
    obj = CapacityObjective(slo=SLO_, start_rate=8.0, max_steps=10)
    study = optuna.create_study(direction="maximize")
    candidates = {"tp1": ({"tensor_parallel_size": 1}, 22.0), "tp2": ({"tensor_parallel_size": 2}, 40.0)}
    for name, (settings, capacity) in candidates.items():
        steps = ModelSteps(capacity, gpus=2 if name == "tp2" else 1)
        got = obj.measure(steps)  # type: ignore[arg-type]
        trial = study.ask()
        trial.set_user_attr(Attr.SETTINGS, settings)
        ev = Evaluation(settings=settings, values=got.values, constraints=got.constraints, record=got.record,
                        curve=got.curve, metrics=got.metrics, capacity=got.capacity)
        record_trial(trial, ev)
        study.tell(trial, got.values[0])
    t1, t2 = study.trials
    assert t2.user_attrs[Attr.METRICS]["capacity_rps"] > t1.user_attrs[Attr.METRICS]["capacity_rps"]  # absolute
    assert t1.values[0] > t2.values[0]  # per GPU: ~22 vs ~20
    assert t2.user_attrs[Attr.GPUS] == 2 and t2.user_attrs[Attr.METRICS]["capacity_rps_per_gpu"] == t2.values[0]
    assert t2.user_attrs[Attr.METRICS]["goodput_per_gpu"] == pytest.approx(t2.user_attrs[Attr.METRICS]["goodput"] / 2)
    assert best_feasible(study.trials) is t1 or best_feasible(study.trials).number == t1.number
    assert capacity_of(t1)["capacity_lo"] <= 22.0 and steady_of(t1)["holds"]


def test_fixed_load_is_offered_per_gpu() -> None:
    loads: list[dict[str, Any]] = []

    class Steps:
        gpus = 2

        def run(self, **load: Any) -> RunRecord:
            loads.append(load)
            return ModelSteps(100.0, 2).run_window(load["rate"], SimpleNamespace(step_s=10.0), None)

    got = GoodputObjective(slo=SLO_, rate=5.0, num_requests=50).measure(Steps())  # type: ignore[arg-type]
    assert loads[0]["rate"] == 10.0 and loads[0]["num_requests"] == 100
    assert got.values == [pytest.approx(5.0)]  # goodput 10 req/s on 2 GPUs


def test_a_sampled_trial_shown_below_the_incumbent_stops_and_a_baseline_closes_its_bracket() -> None:
    obj = CapacityObjective(slo=SLO_, start_rate=8.0, max_steps=8, growth=1.25)
    sampled, baseline = ModelSteps(10.0, gpus=1), ModelSteps(10.0, gpus=1)
    got = obj.measure(sampled, incumbent=[20.0], must_beat=True)  # type: ignore[arg-type]
    assert sampled.rates[0] == 20.0 and len(sampled.rates) == 2  # at the incumbent, then just below its throughput
    assert got.capacity is not None and got.capacity["stopped"].startswith("below the incumbent's 20 req/s")
    assert 9.5 <= got.values[0] <= 10.0 and not got.capacity["converged"]
    full = obj.measure(baseline, incumbent=[20.0])  # type: ignore[arg-type]
    assert full.capacity is not None and full.capacity["converged"] and len(baseline.rates) > 2
    assert obj.to_dict() == CapacityObjective(slo=SLO_, start_rate=8.0, max_steps=8).to_dict()  # growth: not identity
