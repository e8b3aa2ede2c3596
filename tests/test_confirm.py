"""The confirmation rule: interleaved repeats, spread, and no recommendation inside the noise."""

from __future__ import annotations

from typing import Any

import optuna
import yaml
import pytest

from harness.study import confirm as confirm_mod
from harness.study.confirm import Spread, beats, confirm
from harness.study.objectives import CapacityObjective
from harness.study.trials import Evaluation


class Ctx:
    objective = CapacityObjective()


def frozen(number: int, value: float, settings: dict[str, Any],
           metrics: dict[str, float] | None = None) -> optuna.trial.FrozenTrial:
    attrs: dict[str, Any] = {"settings": settings} | ({"metrics": metrics} if metrics else {})
    return optuna.trial.FrozenTrial(number=number, state=optuna.trial.TrialState.COMPLETE, value=value,
                                 datetime_start=None, datetime_complete=None, params={}, distributions={},
                                 user_attrs=attrs, system_attrs={}, intermediate_values={}, trial_id=number)


def fake_evaluate(values: dict[str, list[float]], calls: list[tuple[str, float | None]]):  # type: ignore[no-untyped-def]
    def evaluate(ctx: Any, settings: dict[str, Any], label: str, *,
                 repeat_of: list[float] | None = None, prompt_set: int = 0) -> Evaluation:
        who = settings["who"]
        calls.append((who, repeat_of[0] if repeat_of else None))
        return Evaluation(settings=settings, values=[values[who].pop(0)], constraints=[0.0])

    return evaluate


def test_interleaved_and_recommended(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, float | None]] = []
    monkeypatch.setattr(confirm_mod, "evaluate", fake_evaluate({"w": [5.0, 5.5, 5.2], "b": [4.0, 4.1, 3.9]}, calls))
    conf = confirm(Ctx(), frozen(7, 5.0, {"who": "w"}), frozen(0, 4.0, {"who": "b"}), 3, "capacity_rps")
    assert [c[0] for c in calls] == ["w", "b", "w", "b", "w", "b"]  # alternating
    assert calls[0][1] == 5.0 and calls[1][1] == 5.0  # both measured at the winner's claimed capacity
    assert conf.recommended_trial == 7
    assert conf.improvement == pytest.approx(5.2333333 / 4.0 - 1, rel=1e-4)
    assert conf.winner.std > 0 and conf.to_dict()["baseline"]["n"] == 3


def test_overlap_keeps_the_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, float | None]] = []
    monkeypatch.setattr(confirm_mod, "evaluate", fake_evaluate({"w": [5.0, 4.0, 6.0], "b": [4.5, 4.6, 4.4]}, calls))
    conf = confirm(Ctx(), frozen(3, 6.0, {"who": "w"}), frozen(0, 4.5, {"who": "b"}), 3, "capacity_rps")
    assert conf.recommended_trial == 0
    assert "does not beat the baseline" in conf.verdict


def _feasible(number: int, value: float, who: str, baseline: str | None = None) -> optuna.trial.FrozenTrial:
    t = frozen(number, value, {"who": who})
    t.user_attrs.update({"constraints": [0.0], **({"baseline": baseline} if baseline else {})})
    return t


def test_when_the_defaults_measured_best_the_best_other_candidate_is_confirmed_at_their_load(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.study.tune import challenger, confirm_load

    defaults, user, sampled = (_feasible(0, 15.5, "b", "vllm-defaults"), _feasible(1, 15.2, "u", "user-setting"),
                               _feasible(3, 15.0, "s"))
    trials = [defaults, user, sampled]
    rival = challenger(trials, defaults, defaults)
    assert rival is user  # the best trial other than the defaults, baseline or sampled
    assert challenger(trials, user, defaults) is user and challenger([defaults], defaults, defaults) is defaults
    assert confirm_load(rival, defaults) == [15.5]  # held to the defaults' higher capacity, not its own 15.2
    assert confirm_load(_feasible(4, 16.0, "w"), defaults) == [16.0] and confirm_load(user, None) == [15.2]
    calls: list[tuple[str, float | None]] = []
    monkeypatch.setattr(confirm_mod, "evaluate", fake_evaluate({"u": [14.8, 14.9, 15.0], "b": [15.4, 15.5, 15.3]},
                                                               calls))
    conf = confirm(Ctx(), rival, defaults, 3, "goodput_per_gpu_at_15.5_rps_per_gpu", load_values=[15.5])
    assert {c[1] for c in calls} == {15.5} and conf.recommended_trial == 0 and "does not beat" in conf.verdict


def test_a_baseline_that_collapses_at_the_winners_load_counts_its_own_capacity_in_the_gain(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """One DialoGPT server offered 2.3x its capacity serves a fraction of it (a collapse, not its capacity): the
    rank test still sees the measured numbers, but the gain counts such a repeat at what the baseline's search
    measured at its capacity, on the repeats' own scale (goodput per GPU there, 65.4 at a capacity of 71.2: the
    window's arrivals over first send to last completion), so it reads as the capacities' ratio, not 15x. A
    baseline that held keeps its number."""
    def evaluate(ctx: Any, settings: dict[str, Any], label: str, *, repeat_of: list[float] | None = None,
                 prompt_set: int = 0) -> Evaluation:
        who = settings["who"]
        value, held = {"w": (147.0, True), "b": (10.0, False), "h": (140.0, True),
                       "fp8-w": (16.4, True), "fp8-b": (16.0, False)}[who]
        return Evaluation(settings=settings, values=[value], constraints=[0.0], metrics={"steady_holds": held})

    monkeypatch.setattr(confirm_mod, "evaluate", evaluate)
    winner = frozen(2, 162.6, {"who": "w"}, {"goodput_per_gpu": 147.4})
    conf = confirm(Ctx(), winner, frozen(0, 71.2, {"who": "b"}, {"goodput_per_gpu": 65.4}), 3, "goodput")
    assert conf.recommended_trial == 2 and conf.floored == 3 and conf.baseline.mean == 10.0
    assert conf.improvement == pytest.approx(147.0 / 65.4 - 1)
    assert "did not hold this load in 3 of 3 repeats" in conf.verdict and "65.4 per GPU" in conf.verdict
    saved = confirm_mod.Confirmation.from_dict(conf.to_dict())
    assert saved.improvement == pytest.approx(conf.improvement) and saved.gain_basis() == conf.gain_basis()
    held = confirm(Ctx(), winner, frozen(0, 140.0, {"who": "h"}, {"goodput_per_gpu": 128.0}), 3, "goodput")
    assert held.floored == 0 and held.improvement == pytest.approx(147.0 / 140.0 - 1) and not held.gain_basis()
    # ahead of every repeat of a baseline that did not hold, yet below what it sustains: no gain, kept
    short = confirm(Ctx(), winner, frozen(0, 165.0, {"who": "b"}, {"goodput_per_gpu": 150.0}), 3, "goodput")
    assert short.recommended_trial == 0 and short.improvement is not None and short.improvement < 0
    assert "not what it sustains" in short.verdict and "the baseline is kept" in short.verdict
    # FP8 Mistral: offered the winner's 18.4, above the defaults' bracket (17.4, 18.3), the defaults do not hold;
    # the winner beats their every repeat and what they sustain on this scale (16.19), though not their capacity
    # as a rate (17.4): floored at the rate, the winner would be kept out by the scales' difference alone
    fp8 = confirm(Ctx(), frozen(1, 18.4, {"who": "fp8-w"}, {"goodput_per_gpu": 16.44}),
                  frozen(0, 17.43, {"who": "fp8-b"}, {"goodput_per_gpu": 16.19}), 3, "goodput")
    assert fp8.recommended_trial == 1 and fp8.floored == 3
    assert fp8.improvement == pytest.approx(16.4 / 16.19 - 1)
    # a trial stored without its goodput: floored at its capacity (the gain understated, never inflated)
    old = confirm(Ctx(), winner, frozen(0, 71.2, {"who": "b"}), 3, "goodput")
    assert old.improvement == pytest.approx(147.0 / 71.2 - 1)


def test_baseline_is_winner(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, float | None]] = []
    monkeypatch.setattr(confirm_mod, "evaluate", fake_evaluate({"w": [5.0, 5.0]}, calls))
    b = frozen(0, 5.0, {"who": "w"})
    conf = confirm(Ctx(), b, b, 2, "capacity_rps")
    assert conf.recommended_trial == 0 and len(calls) == 2 and "kept" in conf.verdict


def test_beats_rule() -> None:
    assert beats([3, 4, 5], [1, 2, 2.9])
    assert not beats([3, 4, 5], [1, 2, 3])
    assert not beats([], [1])
    assert Spread([1.0, 3.0]).std == pytest.approx(1.4142, rel=1e-3)


# ---------------------------------------------------------------------------------------------- live servers


def _gpu_ctx(n_gpus: int) -> Any:
    from pathlib import Path

    from harness.launch.placement import SlotPool

    ctx = Ctx()
    ctx.slots = SlotPool(gpu_ids=list(range(n_gpus)), memory_free_check=False)  # type: ignore[attr-defined]
    ctx.model, ctx.start_timeout_s, ctx.study_dir = "m", 60.0, Path("/nonexistent")  # type: ignore[attr-defined]
    return ctx


def _fake_live(monkeypatch: pytest.MonkeyPatch, values: dict[str, list[float]], gpus_needed: dict[str, int],
               started: list[list[tuple[str, tuple[int, ...]]]], measured: list[str],
               prompt_sets: list[tuple[int, str, int]] | None = None) -> None:
    """`prompt_sets`: (start-up number, side, prompt set) of every live repeat."""
    import contextlib

    def plan_settings(ctx: Any, settings: dict[str, Any]) -> tuple[Evaluation, int]:
        return Evaluation(settings=settings), gpus_needed[settings["who"]]

    @contextlib.contextmanager
    def deploy_together(jobs: list[Any], *, start_timeout_s: float) -> Any:
        started.append([(job.settings["who"], job.slot.gpu_ids) for job in jobs])
        yield [job.settings["who"] for job in jobs]

    def measure_live(ctx: Any, dep: str, ev: Evaluation, label: str, *,
                     repeat_of: list[float] | None = None, prompt_set: int = 0) -> Evaluation:
        measured.append(dep)
        if prompt_sets is not None:
            prompt_sets.append((len(started) - 1, dep, prompt_set))
        ev.values = [values[dep].pop(0)]
        return ev

    monkeypatch.setattr(confirm_mod, "plan_settings", plan_settings)
    monkeypatch.setattr(confirm_mod, "measure_live", measure_live)
    monkeypatch.setattr(confirm_mod, "finalize", lambda ctx, ev, label: ev)
    monkeypatch.setattr(confirm_mod, "deploy_together", deploy_together)
    monkeypatch.setattr(confirm_mod, "measure_scaling", lambda ctx, winner, log=None: None)  # tested on its own


def test_both_configs_start_once_together_on_disjoint_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[list[tuple[str, tuple[int, ...]]]] = []
    measured: list[str] = []
    _fake_live(monkeypatch, {"w": [5.0, 5.1], "b": [4.0, 4.1]}, {"w": 2, "b": 1}, started, measured)
    monkeypatch.setattr(confirm_mod, "evaluate", lambda *a, **k: pytest.fail("a fresh server was started"))
    conf = confirm(_gpu_ctx(4), frozen(5, 5.0, {"who": "w"}), frozen(0, 4.0, {"who": "b"}), 2, "goodput_rps")
    assert len(started) == 1 and [who for who, _ in started[0]] == ["w", "b"]  # one start-up, both at once
    (_, gw), (_, gb) = started[0]
    assert len(gw) == 2 and len(gb) == 1 and not set(gw) & set(gb)
    assert measured == ["w", "b", "w", "b"] and conf.recommended_trial == 5


def test_a_winner_on_every_gpu_and_the_baseline_alternate_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 + 1 GPUs do not fit a 4-GPU node together: A, B B, A A, B: 4 start-ups (not one per repeat), the repeats
    # alternate (neither side measured mostly early) and each side is measured on two servers
    started: list[list[tuple[str, tuple[int, ...]]]] = []
    measured: list[str] = []
    sets: list[tuple[int, str, int]] = []
    _fake_live(monkeypatch, {"w": [5.0, 5.1, 5.2], "b": [4.0, 4.1, 3.9]}, {"w": 4, "b": 1}, started, measured,
               sets)
    monkeypatch.setattr(confirm_mod, "evaluate", lambda *a, **k: pytest.fail("a fresh server was started"))
    conf = confirm(_gpu_ctx(4), frozen(5, 5.0, {"who": "w"}), frozen(0, 4.0, {"who": "b"}), 3, "goodput_rps")
    # repeat i sends prompt set i on both sides, so no server is sent the same prompts twice (its prefix cache
    # served 99% of a second repeat's prompt tokens on the H200 when both repeats sent the same set)
    assert sets == [(0, "w", 0), (1, "b", 0), (1, "b", 1), (2, "w", 1), (2, "w", 2), (3, "b", 2)]
    assert [[(who, len(gpus)) for who, gpus in s] for s in started] == [[("w", 4)], [("b", 1)], [("w", 4)],
                                                                         [("b", 1)]]
    assert measured == ["w", "b", "b", "w", "w", "b"]
    assert conf.mode == confirm_mod.MODE_BLOCKS and conf.to_dict()["mode"] == confirm_mod.MODE_BLOCKS
    assert conf.recommended_trial == 5 and conf.baseline.runs == [4.0, 4.1, 3.9]


@pytest.mark.parametrize("repeats, blocks", [(1, ["a0", "b0"]), (2, ["a0", "b01", "a1"]), (3, ["a0", "b01", "a12", "b2"]),
                                             (4, ["a0", "b01", "a12", "b23", "a3"])])
def test_alternating_blocks(repeats: int, blocks: list[str]) -> None:
    got = confirm_mod.alternating_blocks(["a", "b"], repeats)
    assert [side + "".join(map(str, idx)) for side, idx in got] == blocks
    assert confirm_mod.alternating_blocks(["a"], 2) == [("a", [0, 1])]


def test_a_config_without_free_gpus_now_falls_back_to_a_fresh_server_per_repeat(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # another worker holds 2 of the 4 GPUs: the 4-GPU winner cannot be up now, so its repeats wait for a fresh
    # server each (evaluate queues for the GPUs); the baseline still gets one live server
    started: list[list[tuple[str, tuple[int, ...]]]] = []
    measured: list[str] = []
    calls: list[tuple[str, float | None]] = []
    _fake_live(monkeypatch, {"b": [4.0, 4.1]}, {"w": 4, "b": 1}, started, measured)
    monkeypatch.setattr(confirm_mod, "evaluate", fake_evaluate({"w": [5.0, 5.1]}, calls))
    monkeypatch.setattr(confirm_mod, "SLOT_WAIT_S", 0.2)
    ctx = _gpu_ctx(4)
    with ctx.slots.acquire(2):
        conf = confirm(ctx, frozen(5, 5.0, {"who": "w"}), frozen(0, 4.0, {"who": "b"}), 2, "goodput_rps")
    assert started == [] or all(who == "b" for s in started for who, _ in s)
    assert [c[0] for c in calls] == ["w", "w"] and conf.winner.runs == [5.0, 5.1]
    assert conf.mode.endswith(confirm_mod.MODE_FRESH) and conf.recommended_trial == 5


def test_a_winner_that_is_the_baseline_is_repeated_on_one_live_server(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[list[tuple[str, tuple[int, ...]]]] = []
    measured: list[str] = []
    _fake_live(monkeypatch, {"w": [5.0, 5.1, 4.9]}, {"w": 1}, started, measured)
    monkeypatch.setattr(confirm_mod, "evaluate", lambda *a, **k: pytest.fail("a fresh server was started"))
    b = frozen(0, 5.0, {"who": "w"})
    conf = confirm(_gpu_ctx(4), b, b, 3, "goodput_rps")
    assert [[who for who, _ in s] for s in started] == [["w"]] and measured == ["w", "w", "w"]
    assert conf.recommended_trial == 0 and conf.winner.runs == [5.0, 5.1, 4.9]


def _client_checked(runs: dict[str, list[tuple[float, bool]]], measured: list[str],  # type: ignore[no-untyped-def]
                    sets: list[int] | None = None):
    """A fake measure_live: each repeat's (value, client valid) in turn, its label appended to `measured` (and
    its prompt set to `sets`)."""
    sets = [] if sets is None else sets
    from types import SimpleNamespace

    def measure_live(ctx: Any, dep: str, ev: Evaluation, label: str, *,
                     repeat_of: list[float] | None = None, prompt_set: int = 0) -> Evaluation:
        value, valid = runs[dep].pop(0)
        measured.append(label)
        sets.append(prompt_set)
        ev.values = [value]
        ev.record = SimpleNamespace(metrics=None, memory=None, server=None, startup_s=None,  # type: ignore[assignment]
                                    client=SimpleNamespace(valid=valid, reasons=[] if valid else ["dispatch lag 40 ms"]))
        return ev

    return measure_live


def test_a_repeat_whose_client_fell_behind_is_measured_again(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[list[tuple[str, tuple[int, ...]]]] = []
    measured: list[str] = []
    _fake_live(monkeypatch, {}, {"w": 1, "b": 1}, started, measured)
    # the winner's first run: client behind (its value must not count); then valid runs
    runs = {"w": [(9.9, False), (5.0, True), (5.2, True)], "b": [(4.0, True), (4.1, True)]}
    sets: list[int] = []
    monkeypatch.setattr(confirm_mod, "measure_live", _client_checked(runs, measured, sets))
    conf = confirm(_gpu_ctx(4), frozen(5, 5.0, {"who": "w"}), frozen(0, 4.0, {"who": "b"}), 2, "goodput_rps")
    assert measured == ["confirm-winner1", "confirm-winner1-again1", "confirm-baseline1", "confirm-winner2",
                        "confirm-baseline2"]
    assert sets == [0, 2, 0, 1, 1]  # the retry on the same live server is sent prompts it has not seen
    assert conf.winner.runs == [5.0, 5.2] and all(m["client_valid"] for m in conf.winner_metrics)


def test_repeats_the_client_still_limited_are_marked_and_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeat still client-limited after its retries is kept, marked invalid, and left out of mean/sd/n; no
    recommendation rests on it, and the saved confirmation reads back the same."""
    _fake_live(monkeypatch, {}, {"w": 1, "b": 1}, [], [])
    runs = {"w": [(9.0, False)] * 3 + [(6.0, True)], "b": [(4.0, True), (4.2, True)]}
    monkeypatch.setattr(confirm_mod, "measure_live", _client_checked(runs, []))
    conf = confirm(_gpu_ctx(4), frozen(5, 9.0, {"who": "w"}), frozen(0, 4.0, {"who": "b"}), 2, "goodput_rps")
    assert conf.winner.runs == [9.0, 6.0] and conf.winner.valid == [False, True]
    assert conf.winner.mean == 6.0 and conf.winner.std == 0.0  # the invalid 9.0 is not in the mean
    saved = conf.to_dict()
    assert saved["winner"]["n"] == 1 and saved["winner"]["invalid"] == [9.0] and saved["winner"]["max"] == 6.0
    assert conf.recommended_trial == 0 and "client-limited (invalid)" in conf.verdict
    assert conf.winner_metrics[0]["client_valid"] is False and "dispatch lag" in conf.winner_metrics[0]["client_reason"]
    back = confirm_mod.Confirmation.from_dict(saved)
    assert back.winner.valid == [False, True] and back.winner.mean == 6.0
    # a confirmation saved before `valid` existed: the per-repeat client_valid says which runs count
    old = {**saved, "winner": {"runs": [9.0, 6.0]}}
    assert confirm_mod.Confirmation.from_dict(old).winner.valid_runs == [6.0]


# ---------------------------------------------------------------------------------------------- time budget


@pytest.mark.parametrize("left_s", [-1.0, 600.0])
def test_a_confirmation_is_not_started_past_the_time_budget(tmp_path, tiny_model, monkeypatch,  # type: ignore[no-untyped-def]
                                                            left_s: float) -> None:
    # The trials are done but the slot's time is up, or too little of it is left for what this study's start-ups
    # and steps say the confirmation takes (4 start-ups of 120 s, 6 repeats of 60 s: 14 min > 10): it would be cut
    # off by the slot's end, so the sweep stops and a rerun (with time) confirms; nothing is emitted yet.
    import io
    import re
    import time

    from conftest import write_sweep

    from harness.plan import detect_hardware
    from harness.study import tune
    from harness.study.sweepfile import load_sweep

    opened: list[optuna.Study] = []

    def run_trials(study: optuna.Study, ctx: Any, target: int, parallel: int, out: Any, timeout_s: Any) -> None:
        opened.append(study)
        for value in (3.0, 5.0):
            trial = study.ask()
            trial.set_user_attr("settings", {"max_num_seqs": 4})
            trial.set_user_attr("baseline", "vllm-defaults" if value == 3.0 else None)
            trial.set_user_attr("device_seconds", 120.0 + 3 * 60.0)  # a 120 s start-up and 3 steps of 60 s
            trial.set_user_attr("metrics", {"startup_s": 120.0})
            trial.set_user_attr("capacity", {"steps": [{"offered": value, "holds": True}] * 3})
            trial.set_constraint("slo", 0.0)
            study.tell(trial, value)

    monkeypatch.setattr(tune, "run_trials", run_trials)
    monkeypatch.setattr(tune, "study_confirmation", lambda *a, **k: pytest.fail("confirmation started"))
    sweep = load_sweep(write_sweep(tmp_path, tiny_model, trials=2, confirm=3))
    out = io.StringIO()
    outcome = tune.tune_model(sweep, sweep.models[0], hardware=detect_hardware("CPU"), storage_url=None, parallel=1,
                              out=out, deadline=time.monotonic() + left_s)
    assert outcome.config_path is None and "before the confirmation" in outcome.message
    if left_s > 0:
        # to a tenth of a minute: whole minutes read "17 min, 17 min were left" for a confirmation that did not fit
        assert re.search(r"it needs ~14\.0 min by this study's start-ups and load steps, (10\.0|9\.\d) min were "
                         r"left", outcome.message), outcome.message
    assert not (tmp_path / "configs" / "tiny.yaml").exists()
    # nothing emitted, yet the report names the sweep's configs_dir file (as a committed file may: no machine path)
    assert opened[0].user_attrs["config"] == "tiny.yaml"


def _with_committed_config(study: optuna.Study, ctx: Any, target: int, parallel: int, out: Any,
                           timeout_s: Any) -> None:
    """`run_trials` of a study with the user's committed config: #0 vLLM's defaults (3.0), #1 the committed
    config (4.0), #2 a sampled trial (5.0), the winner."""
    for value, label, seqs in ((3.0, "vllm-defaults", 2), (4.0, "committed-config", 4), (5.0, None, 8)):
        trial = study.ask()
        trial.set_user_attr("settings", {"max_num_seqs": seqs})
        trial.set_user_attr("baseline", label)
        trial.set_constraint("slo", 0.0)
        study.tell(trial, value)


def _tune_with_committed_config(tmp_path: Any, tiny_model: Any, monkeypatch: pytest.MonkeyPatch,
                                study_confirmation: Any, deadline: float | None = None) -> Any:
    """The sweep's outcome for a study of `_with_committed_config`, its confirmations by `study_confirmation`."""
    import io

    from conftest import write_sweep

    from harness.plan import detect_hardware
    from harness.study import tune
    from harness.study.sweepfile import load_sweep

    sweep = load_sweep(write_sweep(tmp_path, tiny_model, trials=3, confirm=3))
    monkeypatch.setattr(tune, "run_trials", _with_committed_config)
    monkeypatch.setattr(tune, "study_confirmation", study_confirmation)
    return tune.tune_model(sweep, sweep.models[0], hardware=detect_hardware("CPU"), storage_url=None, parallel=1,
                           out=io.StringIO(), deadline=deadline)


def _committed_config(tmp_path: Any) -> Any:
    """The user's committed configs/tiny.yaml: max_num_seqs 4 (trial #1 of `_with_committed_config`)."""
    from harness.emit import EmittedConfig, write_config

    config = tmp_path / "configs" / "tiny.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    write_config(config, EmittedConfig(model="tiny", settings={"max_num_seqs": 4}, provenance={}, header="mine"))
    return config


@pytest.mark.parametrize("beats_mine", [False, True])
def test_a_recommendation_replaces_the_committed_config_only_when_it_beats_it(
        tmp_path, tiny_model, monkeypatch, beats_mine: bool) -> None:  # type: ignore[no-untyped-def]
    # Winner #2 beats vLLM's defaults (#0); the user's committed config (#1) is then confirmed against it in the
    # same run, and the committed file is rewritten only when the winner beats that too.
    asked: list[tuple[int, int | None, bool]] = []

    def study_confirmation(study: Any, ctx: Any, winner: Any, baseline: Any, repeats: int, out: Any,
                           primary: bool = True, cross_check: bool = False) -> confirm_mod.Confirmation:
        asked.append((winner.number, baseline.number, primary))
        win = primary or beats_mine
        w, b = confirm_mod.Spread([5.0] * 3, [True] * 3), confirm_mod.Spread([(3.0 if win else 5.5)] * 3, [True] * 3)
        return confirm_mod.Confirmation(metric="capacity_rps", winner_trial=winner.number,
                                        baseline_trial=baseline.number, winner=w, baseline=b,
                                        recommended_trial=winner.number if win else baseline.number,
                                        verdict="beats" if win else "does not beat")

    config = _committed_config(tmp_path)
    before = config.read_text()
    outcome = _tune_with_committed_config(tmp_path, tiny_model, monkeypatch, study_confirmation)
    assert asked == [(2, 0, True), (2, 1, False)]
    emitted = yaml.safe_load(config.read_text())
    if beats_mine:
        assert emitted["vllm"]["max_num_seqs"] == 8 and emitted["provenance"]["versus_committed"]["trial"] == 1
        assert "against the committed config (trial #1): beats" in outcome.message
    else:
        assert config.read_text() == before and "is left as it is" in outcome.message


def test_the_confirmation_against_the_committed_config_is_not_started_past_the_time_budget(
        tmp_path, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # The first confirmation (winner vs vLLM's defaults) used the slot's time: the one against the committed
    # config is minutes more and counts only when it ends, so it is not started; a rerun reuses the first.
    from types import SimpleNamespace

    from harness.study import tune

    clock = [1000.0]  # the sweep's clock: only the fake confirmation moves it
    monkeypatch.setattr(tune, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    deadline = clock[0] + 600.0
    asked: list[bool] = []

    def study_confirmation(study: Any, ctx: Any, winner: Any, baseline: Any, repeats: int, out: Any,
                           primary: bool = True, cross_check: bool = False) -> confirm_mod.Confirmation:
        asked.append(primary)
        clock[0] = deadline + 1.0  # it ran until the slot's end
        w, b = confirm_mod.Spread([5.0] * 3, [True] * 3), confirm_mod.Spread([3.0] * 3, [True] * 3)
        return confirm_mod.Confirmation(metric="capacity_rps", winner_trial=winner.number,
                                        baseline_trial=baseline.number, winner=w, baseline=b,
                                        recommended_trial=winner.number, verdict="beats")

    config = _committed_config(tmp_path)
    before = config.read_text()
    outcome = _tune_with_committed_config(tmp_path, tiny_model, monkeypatch, study_confirmation, deadline=deadline)
    assert asked == [True]
    assert "before the one against the committed config (trial #1)" in outcome.message, outcome.message
    assert config.read_text() == before and outcome.config_path is None


def test_a_repeat_that_could_not_start_is_no_number(monkeypatch: pytest.MonkeyPatch) -> None:
    """A repeat pruned at launch (the host's memory changed since the trial) is not a 0 in the spread."""
    def evaluate(ctx: Any, settings: dict[str, Any], label: str, *, repeat_of: list[float] | None = None,
                 prompt_set: int = 0) -> Evaluation:
        return Evaluation(settings=settings, pruned_reason="gpu_memory_utilization: only 2.74 GiB is available")

    monkeypatch.setattr(confirm_mod, "evaluate", evaluate)
    b = frozen(0, 5.0, {"who": "w"})
    conf = confirm(Ctx(), b, b, 3, "goodput_rps")
    assert conf.winner.runs == [] and conf.to_dict()["winner"]["mean"] is None
    assert conf.verdict.startswith("not confirmed: 3 confirmation repeat(s) could not be measured (not started: ")


# ---------------------------------------------------------------------------------------------- equal hardware


def test_defaults_run_as_tp1_replicas_on_the_winners_gpu_count() -> None:
    from harness.study.pergpu import equal_gpu_pair

    defaults: dict[str, Any] = {"max_model_len": 4096}
    tp2 = {"max_model_len": 4096, "tensor_parallel_size": 2, "max_num_seqs": 128}
    p = equal_gpu_pair(tp2, defaults, node_gpus=4)
    assert p.winner == tp2 and p.baseline == {**defaults, "replicas": 2}  # 2 GPUs vs 2
    assert p.equal and p.winner_gpus == p.baseline_gpus == 2
    assert "winner TP 2 on 2 GPUs vs baseline 2 x TP 1 on 2 GPUs (equal GPUs)" == p.describe()
    one = equal_gpu_pair({"max_num_seqs": 64}, defaults, node_gpus=4)
    assert one.winner_gpus == one.baseline_gpus == 1 and "replicas" not in one.baseline  # 1 GPU vs 1
    # the user's committed TP 2 config next to a TP 1 winner: the winner as 2 replicas, 2 GPUs vs 2
    committed = {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.9}
    c = equal_gpu_pair({"max_num_seqs": 64}, committed, node_gpus=4)
    assert c.winner == {"max_num_seqs": 64, "replicas": 2} and c.baseline == committed and c.equal
    # an emitted config's replicas are a deployment: the pair starts from one server of it
    assert equal_gpu_pair({"tensor_parallel_size": 2}, {**committed, "replicas": 2}, 4).baseline == committed
    # no common GPU count fits (TP 4 next to TP 2 x PP 3 = 6 on a 4-GPU node... lcm 12): one server a side, per GPU
    far = equal_gpu_pair({"tensor_parallel_size": 4}, {"tensor_parallel_size": 2, "pipeline_parallel_size": 3}, 8)
    assert not far.equal and (far.winner_gpus, far.baseline_gpus) == (4, 6) and "per GPU" in far.describe()
    # a CPU host: one server a side
    cpu = equal_gpu_pair({"max_num_seqs": 8}, {}, node_gpus=0)
    assert cpu.winner_gpus == 1 and cpu.describe() == "winner vs baseline, one server each on the CPU host (equal hardware)"


def test_a_trial_on_the_cpu_host_is_not_described_as_on_a_gpu() -> None:
    from harness.study.trials import describe
    trial = optuna.trial.create_trial(value=12.9, user_attrs={"outcome": "ok", "gpus": 1,
                                                              "capacity": {"capacity_lo": 12.9, "capacity_hi": 17.8}})
    assert describe(trial, on_cpu=True) == "ok: 12.9 [CPU host, capacity 12.9-17.8 req/s]"
    assert describe(trial) == "ok: 12.9 [1 GPU, capacity 12.9-17.8 req/s]"


def test_confirmation_pairs_sides_on_equal_gpus_and_measures_scaling(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[dict[str, Any], str, Any]] = []

    def evaluate(ctx: Any, settings: dict[str, Any], label: str, *, repeat_of: list[float] | None = None,
                 incumbent: list[float] | None = None, prompt_set: int = 0) -> Evaluation:
        calls.append((settings, label, repeat_of or incumbent))
        if label == "confirm-scaling":  # 2 replicas of TP 2 on 4 GPUs: 90% of the one server's per-GPU value
            return Evaluation(settings=settings, values=[4.5], constraints=[0.0])
        return Evaluation(settings=settings, values=[5.0 if settings.get("tensor_parallel_size") == 2 else 3.0],
                          constraints=[0.0])

    monkeypatch.setattr(confirm_mod, "evaluate", evaluate)
    ctx = Ctx()
    ctx.slots = type("S", (), {"gpu_ids": [0, 1, 2, 3]})()  # type: ignore[attr-defined]
    def phases(ctx: Any, pairs: Any, sides: Any, repeats: int) -> Any:  # fresh servers (evaluate) per repeat
        yield confirm_mod.MODE_FRESH, None, [(i, p) for i in range(repeats) for p in pairs]

    monkeypatch.setattr(confirm_mod, "_phases", phases)
    winner = frozen(4, 5.0, {"tensor_parallel_size": 2})
    conf = confirm(ctx, winner, frozen(0, 3.0, {}), 2, "goodput_per_gpu")
    baseline_settings = [c[0] for c in calls if c[1].startswith("confirm-baseline")]
    assert baseline_settings == [{"replicas": 2}, {"replicas": 2}]  # vLLM's defaults as 2 TP 1 replicas
    assert conf.winner_gpus == conf.baseline_gpus == 2 and conf.recommended_trial == 4
    assert conf.improvement == pytest.approx(5.0 / 3.0 - 1)  # per GPU, on equal hardware
    assert conf.scaling is not None and conf.scaling["replicas"] == 2 and conf.scaling["gpus"] == 4
    assert conf.scaling["efficiency"] == pytest.approx(0.9)
    assert calls[-1] == ({"tensor_parallel_size": 2, "replicas": 2}, "confirm-scaling", [5.0])
    saved = confirm_mod.Confirmation.from_dict(conf.to_dict())
    assert saved.scaling == conf.scaling and saved.baseline_gpus == 2 and "equal GPUs" in saved.pairing


def test_the_cross_check_measures_each_live_side_once_after_its_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    """With cross_check, each side's live server gets one run of our client and of `vllm bench serve` after its
    repeats, at the rate its repeats offered (the winner's capacity per GPU x the side's GPUs), and the gain per GPU
    is reported as each tool measured it."""
    import contextlib
    from pathlib import Path
    from types import SimpleNamespace

    from harness.launch.placement import SlotPool

    events: list[str] = []
    values = {"w": [5.0, 5.1], "b": [4.0, 4.1]}

    def plan_settings(ctx: Any, settings: dict[str, Any]) -> tuple[Evaluation, int]:
        return Evaluation(settings=settings), 1

    def dep(who: str) -> Any:
        return SimpleNamespace(who=who, topology=SimpleNamespace(gpus=1), served_name="m",
                               group=SimpleNamespace(targets=[(f"http://127.0.0.1/{who}", "k")]))

    @contextlib.contextmanager
    def deploy_together(jobs: list[Any], *, start_timeout_s: float) -> Any:
        yield [dep(job.settings["who"]) for job in jobs]

    def measure_live(ctx: Any, d: Any, ev: Evaluation, label: str, *, repeat_of: list[float] | None = None,
                     prompt_set: int = 0) -> Evaluation:
        events.append(f"repeat {d.who} set {prompt_set}")  # repeat i: prompt set i (no cache hit on its server)
        ev.values = [values[d.who].pop(0)]
        return ev

    def cross_check(target: Any, model: str, tokenizer: str, requests: list[Any], rate: float, workdir: Path,
                    **_: Any) -> dict[str, Any]:
        who = target.base_url.rsplit("/", 1)[1]
        events.append(f"cross-check {who} at {rate:g} with {len(requests)}")
        good = {"w": (5.0, 4.9), "b": (4.0, 4.1)}[who]
        row = {"goodput": 0.0, "ttft_p99": 1.0, "tpot_mean": 1.0}
        return {"ours": {**row, "goodput": good[0]}, "vllm": {**row, "goodput": good[1]}}

    monkeypatch.setattr(confirm_mod, "plan_settings", plan_settings)
    monkeypatch.setattr(confirm_mod, "measure_live", measure_live)
    monkeypatch.setattr(confirm_mod, "finalize", lambda ctx, ev, label: ev)
    monkeypatch.setattr(confirm_mod, "deploy_together", deploy_together)
    monkeypatch.setattr(confirm_mod, "measure_scaling", lambda ctx, winner, log=None: None)
    monkeypatch.setattr(confirm_mod, "run_cross_check", cross_check)
    ctx = SimpleNamespace(objective=CapacityObjective(step_s=30.0), slots=SlotPool(gpu_ids=[0, 1],
                          memory_free_check=False), model="m", start_timeout_s=60.0, study_dir=Path("/nonexistent"),
                          completion_requests=lambda n, k: list(range(n)))
    conf = confirm(ctx, frozen(5, 5.0, {"who": "w"}), frozen(0, 4.0, {"who": "b"}), 2,  # type: ignore[arg-type]
                   "goodput", cross_check=True)
    assert events == ["repeat w set 0", "repeat b set 0", "repeat w set 1", "repeat b set 1",
                      "cross-check w at 5 with 150", "cross-check b at 5 with 150"]
    cc = conf.cross_check
    assert cc is not None and cc["winner"]["gpus"] == 1 and cc["baseline"]["ours"]["goodput"] == 4.0
    assert cc["goodput_gain_per_gpu"] == {"ours": pytest.approx(0.25), "vllm": pytest.approx(4.9 / 4.1 - 1)}
    assert confirm_mod.Confirmation.from_dict(conf.to_dict()).cross_check == cc
    without = confirm(ctx, frozen(5, 5.0, {"who": "w"}), frozen(0, 4.0, {"who": "b"}), 0,  # type: ignore[arg-type]
                      "goodput")
    assert without.cross_check is None


@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_a_block_whose_server_does_not_start_sends_that_sides_repeats_to_fresh_servers(
        monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    """Every repeat runs exactly once whichever block's deploy fails, and a side that failed is not started again
    for its later blocks (each try would cost a whole start-up timeout)."""
    import contextlib

    started: list[Any] = []
    measured: list[str] = []
    _fake_live(monkeypatch, {"w": [5.0, 5.1, 5.2], "b": [4.0, 4.1, 3.9]}, {"w": 4, "b": 1}, started, measured)
    inner = confirm_mod.deploy_together
    calls = {"n": 0}

    @contextlib.contextmanager
    def flaky(jobs: list[Any], *, start_timeout_s: float) -> Any:
        k, calls["n"] = calls["n"], calls["n"] + 1
        if k == fail_at:
            started.append("failed")
            yield []
            return
        with inner(jobs, start_timeout_s=start_timeout_s) as deps:
            yield deps

    fresh: list[str] = []

    def evaluate(ctx: Any, settings: dict[str, Any], label: str, *, repeat_of: list[float] | None = None,
                 prompt_set: int = 0) -> Evaluation:
        fresh.append(settings["who"])
        return Evaluation(settings=settings, values=[{"w": 9.0, "b": 8.0}[settings["who"]]], constraints=[0.0])

    monkeypatch.setattr(confirm_mod, "deploy_together", flaky)
    monkeypatch.setattr(confirm_mod, "evaluate", evaluate)
    conf = confirm(_gpu_ctx(4), frozen(5, 5.0, {"who": "w"}), frozen(0, 4.0, {"who": "b"}), 3, "goodput_rps")
    assert len(conf.winner.runs) == 3 and len(conf.baseline.runs) == 3
    side = ["w", "b", "w", "b"][fail_at]
    assert len(measured) + len(fresh) == 6 and set(fresh) == {side}
    starts_of_side = sum(1 for s in started if s != "failed" and s[0][0] == side)
    assert starts_of_side == (0 if fail_at < 2 else 1) and started.count("failed") == 1  # never tried again


def test_without_a_confirmation_the_best_trial_is_emitted_even_when_it_is_the_defaults(
        tmp_path, tiny_model, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # the challenger (the best trial other than the defaults) is only for a confirmation; with none, the config is
    # the best trial's
    import io

    from conftest import write_sweep

    from harness.plan import detect_hardware
    from harness.study import tune
    from harness.study.sweepfile import load_sweep

    def run_trials(study: optuna.Study, ctx: Any, target: int, parallel: int, out: Any, timeout_s: Any) -> None:
        for value, seqs in ((5.0, 2), (3.0, 4)):
            trial = study.ask()
            trial.set_user_attr("settings", {"max_num_seqs": seqs} if value == 3.0 else {})
            trial.set_user_attr("baseline", "vllm-defaults" if value == 5.0 else None)
            trial.set_constraint("slo", 0.0)
            study.tell(trial, value)

    monkeypatch.setattr(tune, "run_trials", run_trials)
    sweep = load_sweep(write_sweep(tmp_path, tiny_model, trials=2, confirm=0))
    outcome = tune.tune_model(sweep, sweep.models[0], hardware=detect_hardware("CPU"), storage_url=None, parallel=1,
                              out=io.StringIO())
    assert outcome.config_path is not None
    assert yaml.safe_load(outcome.config_path.read_text())["provenance"]["trial"] == 0


def test_a_repeats_prompt_set_is_step_ones_work_in_other_tokens(tiny_model: Any, tmp_path: Any) -> None:
    """The study's prompt sets (tune.build_context): set s of a step keeps the step's request lengths (the same
    work in every repeat, on both sides) and changes every prompt, and LoadSteps asks for its set."""
    from harness.plan import detect_hardware
    from harness.study.objectives import LoadSteps
    from harness.study.sweepfile import DEMO_SWEEP, parse_sweep
    from harness.study.tune import build_context

    sweep = parse_sweep({**DEMO_SWEEP, "models": [{"name": "tiny", "model": str(tiny_model)}],
                         "workload": "chat-mix"}, "s.yaml")
    ctx, _ = build_context(sweep, sweep.models[0], str(tiny_model), detect_hardware("CPU"), 1, tmp_path)
    first, second = ctx.requests_for(1, 30), ctx.requests_for(1, 30, 1)
    assert [(q.prompt_tokens, q.max_tokens) for q in first] == [(q.prompt_tokens, q.max_tokens) for q in second]
    assert all(a.messages != b.messages for a, b in zip(first, second))
    again = ctx.requests_for.__wrapped__(1, 30, 1)  # type: ignore[attr-defined]  # not the lru_cache's own list
    assert [q.messages for q in again] == [q.messages for q in second]  # deterministic
    asked: list[tuple[Any, ...]] = []
    steps = LoadSteps(deployment=None, workload=None, requests_for=lambda *a: asked.append(a) or [],  # type: ignore[arg-type]
                      slo=None, plan=None, save=lambda r, k: None, prompt_set=2)  # type: ignore[arg-type]
    steps.count = 1
    steps._requests(7)
    assert asked == [(1, 7, 2)]


def test_a_verbatim_datasets_other_prompt_set_is_other_rows(tiny_model: Any, tmp_path: Any) -> None:
    """Dataset prompts sent as they are have no tokens to vary: set s > 0 draws other rows of the file, or every
    live repeat after the first would be the first one's prompts again."""
    import json

    import yaml

    from harness.plan import detect_hardware
    from harness.study.sweepfile import DEMO_SWEEP, parse_sweep
    from harness.study.tune import build_context

    (tmp_path / "data.jsonl").write_text("".join(json.dumps({"prompt": f"row {i} zaba kelo muti pano"}) + "\n"
                                                 for i in range(40)))
    (tmp_path / "w.yaml").write_text(yaml.safe_dump({"name": "rows", "api": "completions", "output_len": 8,
                                                     "input_len": {"dist": "dataset", "path": "data.jsonl"}}))
    sweep = parse_sweep({**DEMO_SWEEP, "models": [{"name": "tiny", "model": str(tiny_model)}],
                         "workload": str(tmp_path / "w.yaml")}, "s.yaml")
    ctx, _ = build_context(sweep, sweep.models[0], str(tiny_model), detect_hardware("CPU"), 1, tmp_path)
    assert ctx.workload.verbatim_prompts
    first = {q.prompt for q in ctx.requests_for(1, 10)}
    second = {q.prompt for q in ctx.requests_for(1, 10, 1)}
    assert len(first) == len(second) == 10 and len(first & second) < 10
