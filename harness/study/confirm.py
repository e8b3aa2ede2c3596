"""Confirm the winner against the baseline: interleaved repeats, spread reported, no win inside the noise.

The decision rule is a rank test, not a threshold: the winner is recommended only when every one of its repeats
beats every baseline repeat (with 3 + 3 runs that is a one-sided Mann-Whitney test at p = 0.05) and its mean is
higher. Otherwise the baseline is kept and the output says so.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import FrozenTrial

from harness.study.evaluate import StudyContext, evaluate


@dataclass
class Spread:
    runs: list[float]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.runs) if self.runs else 0.0

    @property
    def std(self) -> float:
        return statistics.stdev(self.runs) if len(self.runs) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "mean": self.mean, "std": self.std,
                "min": min(self.runs, default=0.0), "max": max(self.runs, default=0.0), "n": len(self.runs)}


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

    @property
    def improvement(self) -> float | None:
        """Relative gain of the winner's mean over the baseline's mean."""
        if not self.baseline.runs or self.baseline.mean <= 0:
            return None
        return self.winner.mean / self.baseline.mean - 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "winner_trial": self.winner_trial, "baseline_trial": self.baseline_trial,
                "winner": self.winner.to_dict(), "baseline": self.baseline.to_dict(),
                "improvement": self.improvement, "recommended_trial": self.recommended_trial,
                "verdict": self.verdict, "winner_metrics": self.winner_metrics,
                "baseline_metrics": self.baseline_metrics}


def beats(winner: list[float], baseline: list[float]) -> bool:
    return bool(winner) and bool(baseline) and min(winner) > max(baseline) and \
        statistics.fmean(winner) > statistics.fmean(baseline)


def confirm(ctx: StudyContext, winner: FrozenTrial, baseline: FrozenTrial | None, repeats: int,
            metric: str, log: Any = None) -> Confirmation:
    """Re-measure winner and baseline alternately `repeats` times each (fresh servers every time)."""
    w_runs: list[float] = []
    b_runs: list[float] = []
    w_metrics: list[dict[str, Any]] = []
    b_metrics: list[dict[str, Any]] = []
    same = baseline is None or baseline.number == winner.number
    for i in range(repeats):
        for who, trial, runs, metrics in (("winner", winner, w_runs, w_metrics),
                                          ("baseline", baseline, b_runs, b_metrics)):
            if trial is None or (who == "baseline" and same):
                continue
            if log is not None:
                print(f"[confirm {i + 1}/{repeats}] {who} (trial #{trial.number})", file=log, flush=True)
            start = trial.values[0] if ctx.objective.kind == "capacity" and trial.values[0] > 0 else None
            ev = evaluate(ctx, dict(trial.user_attrs["settings"]), f"confirm-{who}{i + 1}", start_rate=start)
            value = ev.values[0] if ev.values else 0.0
            runs.append(float(value))
            metrics.append(ev.summary())
            if log is not None:
                print(f"    -> {metric} = {value:.4g}", file=log, flush=True)
    if same:
        verdict = "the baseline (vLLM defaults) is the best candidate found; it is kept"
        rec = winner.number
        b_runs = list(w_runs)
    elif beats(w_runs, b_runs):
        verdict = (f"trial #{winner.number} beats the baseline in every repeat "
                   f"({statistics.fmean(w_runs):.4g} vs {statistics.fmean(b_runs):.4g} {metric})")
        rec = winner.number
    else:
        verdict = (f"trial #{winner.number} does not beat the baseline beyond the run-to-run spread; "
                   f"the baseline is kept")
        rec = baseline.number if baseline is not None else winner.number
    return Confirmation(metric=metric, winner_trial=winner.number,
                        baseline_trial=None if baseline is None else baseline.number, winner=Spread(w_runs),
                        baseline=Spread(b_runs), recommended_trial=rec, verdict=verdict,
                        winner_metrics=w_metrics, baseline_metrics=b_metrics)
