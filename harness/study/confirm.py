"""Confirm the winner against the baseline: repeated measurements, spread reported, no win inside the noise.

What one repeat measures is the objective's (`Objective.measure_repeat`): for capacity studies one load step at
the winner's capacity, scored by goodput; for the fixed-load objectives the trial's own measurement. Servers are
started as few times as the devices allow (see `confirm`).

The decision rule is a rank test, not a threshold: the winner is recommended only when every one of its repeats
beats every baseline repeat (with 3 + 3 runs that is a one-sided Mann-Whitney test at p = 0.05) and its mean is
higher. Otherwise the baseline is kept and the output says so.
"""

from __future__ import annotations

import contextlib
import statistics
from dataclasses import dataclass, field
from typing import Any, Iterator

from optuna.trial import FrozenTrial

from harness.deploy import DeployJob, deploy_together
from harness.launch.server import ServerStartError
from harness.study.evaluate import StudyContext, evaluate, finalize, measure_live, plan_settings
from harness.study.trials import CLIENT_LIMITED_LABEL as CLIENT_LIMITED, Evaluation, Spread, settings_of

CLIENT_RETRIES = 2  # a repeat whose load client fell behind is measured again, at most this many times
SLOT_WAIT_S = 30.0  # for devices whose memory the last trial's servers are still releasing; then: not free now
MODE_LIVE = "live servers, repeats interleaved"
MODE_IN_TURN = "live servers, one configuration at a time"
MODE_FRESH = "fresh server per repeat"


@dataclass
class Confirmation:
    metric: str
    winner_trial: int
    baseline_trial: int | None
    winner: Spread
    baseline: Spread
    recommended_trial: int
    verdict: str
    winner_metrics: list[dict[str, Any]] = field(default_factory=list)  # per repeat, summary numbers
    baseline_metrics: list[dict[str, Any]] = field(default_factory=list)
    mode: str = MODE_FRESH  # how the repeats were run (MODE_*; phases joined by ' + ')

    @property
    def improvement(self) -> float | None:
        """Relative gain of the winner's mean over the baseline's mean (valid repeats only)."""
        if not self.winner.valid_runs or not self.baseline.valid_runs or self.baseline.mean <= 0:
            return None
        return self.winner.mean / self.baseline.mean - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "winner_trial": self.winner_trial, "baseline_trial": self.baseline_trial,
                "winner": self.winner.to_dict(), "baseline": self.baseline.to_dict(),
                "improvement": self.improvement, "recommended_trial": self.recommended_trial,
                "verdict": self.verdict, "winner_metrics": self.winner_metrics,
                "baseline_metrics": self.baseline_metrics, "mode": self.mode}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> Confirmation:
        """Back from `to_dict()` (a study attribute: a rerun, or another worker, reuses the confirmation)."""
        return cls(metric=saved["metric"], winner_trial=saved["winner_trial"],
                   baseline_trial=saved["baseline_trial"],
                   winner=Spread.from_dict(saved["winner"], saved.get("winner_metrics")),
                   baseline=Spread.from_dict(saved["baseline"], saved.get("baseline_metrics")),
                   recommended_trial=saved["recommended_trial"],
                   verdict=saved["verdict"], winner_metrics=saved["winner_metrics"],
                   baseline_metrics=saved["baseline_metrics"], mode=saved.get("mode", ""))


def _client_limited(ev: Evaluation) -> list[str]:
    """Why the load client, not the server, limited this run (empty: a valid server number)."""
    client = getattr(ev.record, "client", None) if ev.record is not None and ev.failure is None else None
    return list(client.reasons or ["client check failed"]) if client is not None and not client.valid else []


def _verdict(winner: FrozenTrial, baseline: FrozenTrial | None, w: Spread, b: Spread, metric: str,
             same: bool, missing: list[str]) -> tuple[str, int]:
    """(verdict, recommended trial). The rank test needs every repeat of both sides measured and valid: a
    client-limited repeat is no server number, and with fewer repeats `beats` would no longer be a test at p = 0.05."""
    kept = winner.number if same or baseline is None else baseline.number
    if missing:
        return (f"not confirmed: {len(missing)} confirmation repeat(s) could not be measured ({missing[0]}); "
                + ("the baseline (vLLM defaults) is kept" if same or baseline is None else
                   f"the baseline is kept (trial #{winner.number} stays unconfirmed)"), kept)
    invalid = len(w.invalid_runs) + (0 if same else len(b.invalid_runs))
    total = len(w.runs) + (0 if same else len(b.runs))
    if invalid:
        return (f"not confirmed: {invalid} of {total} confirmation repeats were {CLIENT_LIMITED} (the load client "
                f"fell behind, so they measured the client, not the server); "
                + ("the baseline (vLLM defaults) is kept" if same or baseline is None else
                   f"the baseline is kept (trial #{winner.number} stays unconfirmed)"), kept)
    if same:
        return "the baseline (vLLM defaults) is the best candidate found; it is kept", winner.number
    if beats(w.runs, b.runs):
        return (f"trial #{winner.number} beats the baseline in every repeat "
                f"({w.mean:.4g} vs {b.mean:.4g} {metric})", winner.number)
    return (f"trial #{winner.number} does not beat the baseline beyond the run-to-run spread; the baseline is kept",
            kept)


def beats(winner: list[float], baseline: list[float]) -> bool:
    return bool(winner) and bool(baseline) and min(winner) > max(baseline) and \
        statistics.fmean(winner) > statistics.fmean(baseline)


def confirm(ctx: StudyContext, winner: FrozenTrial, baseline: FrozenTrial | None, repeats: int,
            metric: str, log: Any = None) -> Confirmation:
    """Re-measure winner and baseline, `repeats` times each.

    When both configurations can be up at once (a CPU host, or disjoint GPU sets free), each is started once and
    the repeats alternate between the two live servers (a winner that is the baseline: one live server). When they
    cannot (a winner on every GPU of the node), each is started once in turn and its repeats run back to back:
    two start-ups instead of one per repeat, which on GPUs (minutes each) decides whether a confirmation fits a
    time slot at all. Only when a configuration cannot be started on its own slot now does every repeat start a
    fresh server.
    """
    # What a repeat measures is the objective's (`Objective.measure_repeat`): capacity studies offer both configs
    # the winner's claimed capacity and score goodput, so a baseline that also sustains it ties (and is kept).
    winner_values = list(winner.values)
    same = baseline is None or baseline.number == winner.number
    pairs = [("winner", winner)] + ([] if same else [("baseline", baseline)])
    runs: dict[str, list[float]] = {"winner": [], "baseline": []}
    valid: dict[str, list[bool]] = {"winner": [], "baseline": []}
    unmeasured: dict[str, list[str]] = {"winner": [], "baseline": []}
    metrics: dict[str, list[dict[str, Any]]] = {"winner": [], "baseline": []}
    modes: list[str] = []
    with contextlib.closing(_phases(ctx, pairs, repeats)) as phases:
        for mode, live, order in phases:
            modes += [] if mode in modes else [mode]
            for i, (who, trial) in order:
                if log is not None:
                    print(f"[confirm {i + 1}/{repeats}] {who} (trial #{trial.number}, {mode})", file=log, flush=True)
                settings = settings_of(trial)
                for attempt in range(1 + CLIENT_RETRIES):
                    label = f"confirm-{who}{i + 1}" + (f"-again{attempt}" if attempt else "")
                    if live:
                        ev, _ = plan_settings(ctx, settings)
                        measure_live(ctx, live[who], ev, label, repeat_of=winner_values)
                        ev = finalize(ctx, ev, label)
                    else:
                        ev = evaluate(ctx, settings, label, repeat_of=winner_values)
                    reasons = _client_limited(ev)
                    if not reasons:
                        break
                    if log is not None:
                        print(f"    -> not a server number ({reasons[0]}); measured again", file=log, flush=True)
                if ev.values is None:  # pruned at launch (the host's memory changed): no number at all
                    unmeasured[who].append(f"not started: {ev.pruned_reason}")
                    if log is not None:
                        print(f"    -> not measured: {ev.pruned_reason}", file=log, flush=True)
                    continue
                value = ev.values[0]
                runs[who].append(float(value))
                valid[who].append(not reasons)
                metrics[who].append({**ev.summary(), "client_valid": not reasons,
                                     **({"client_reason": reasons[0]} if reasons else {})})
                if log is not None:
                    print(f"    -> {metric} = {value:.4g}"
                          + (f" ({CLIENT_LIMITED}: {reasons[0]}; left out of the means)" if reasons else ""),
                          file=log, flush=True)
    w = Spread(runs["winner"], valid["winner"])
    b = Spread(runs["baseline"], valid["baseline"]) if not same else Spread(list(w.runs), list(w.flags))
    missing = unmeasured["winner"] + ([] if same else unmeasured["baseline"])
    verdict, rec = _verdict(winner, baseline, w, b, metric, same, missing)
    return Confirmation(metric=metric, winner_trial=winner.number,
                        baseline_trial=None if baseline is None else baseline.number, winner=w,
                        baseline=b, recommended_trial=rec, verdict=verdict,
                        winner_metrics=metrics["winner"], baseline_metrics=metrics["baseline"],
                        mode=" + ".join(modes))


Phase = tuple[str, "dict[str, Any] | None", list[tuple[int, tuple[str, FrozenTrial]]]]


def _phases(ctx: StudyContext, pairs: list[tuple[str, FrozenTrial]], repeats: int) -> Iterator[Phase]:
    """(mode, live deployments by role or None, the repeats to run on them). Each phase's servers are up only
    while the caller works through its repeats; closing the generator tears them down."""
    interleaved = [(i, pair) for i in range(repeats) for pair in pairs]
    if getattr(ctx, "slots", None) is None:
        yield MODE_FRESH, None, interleaved
        return
    plans = [plan_settings(ctx, settings_of(trial)) for _, trial in pairs]
    if any(ev.pruned_reason for ev, _ in plans):
        yield MODE_FRESH, None, interleaved
        return
    needs = {trial.number: n for (_, trial), (_, n) in zip(pairs, plans)}
    if not ctx.slots.gpu_ids or sum(needs.values()) <= ctx.slots.capacity:
        with _deployed(ctx, pairs, needs) as deps:
            if deps is not None:
                yield MODE_LIVE, deps, interleaved
                return
    left = interleaved
    if len(pairs) > 1:
        for pair in pairs:
            with _deployed(ctx, [pair], needs) as deps:
                if deps is None:
                    continue  # no free devices for it now: its repeats start fresh servers (which wait for them)
                yield MODE_IN_TURN, deps, [(i, pair) for i in range(repeats)]
            left = [(i, p) for i, p in left if p is not pair]
    if left:
        yield MODE_FRESH, None, left


@contextlib.contextmanager
def _deployed(ctx: StudyContext, pairs: list[tuple[str, FrozenTrial]],
              needs: dict[int, int]) -> Iterator[dict[str, Any] | None]:
    """These configurations started at once on free devices (disjoint GPU sets), or None when they do not fit now."""
    with contextlib.ExitStack() as stack:
        try:
            jobs = []
            for who, trial in pairs:
                # GPUs: all need free devices now; CPU: only one of them is under load at any time
                slot = (stack.enter_context(ctx.slots.acquire(needs[trial.number], timeout_s=SLOT_WAIT_S))
                        if ctx.slots.gpu_ids else ctx.slots.cpu_host_slot())
                jobs.append(DeployJob(ctx.model, settings_of(trial), slot, ctx.study_dir / "logs" / f"confirm-{who}"))
            deps = stack.enter_context(deploy_together(jobs, start_timeout_s=ctx.start_timeout_s))
        except (TimeoutError, ValueError, ServerStartError):
            deps = None
        if not deps:
            stack.close()
            yield None
            return
        yield {who: dep for (who, _), dep in zip(pairs, deps)}
