"""What a study optimises: one class per objective kind.

An objective owns everything that depends on its kind: how it measures a live deployment (`measure`), the values
it gives Optuna and their directions, the worst values a failed candidate reports, what a confirmation repeat
measures and under which metric name, and how the report labels its value. The rest of the harness asks the
objective; nothing else switches on the kind. A new kind is a new subclass registered in `OBJECTIVES` (and, if
it has keys of its own, a few lines in the sweep-file parser).

The contract, for a subclass:

- `kind`, `directions` (one per value), `metric` (the `Evaluation.summary()` key of the first value), `unit`;
- `measure(steps, incumbent=None) -> Measurement`: the trial's values and constraints (Optuna's convention:
  <= 0 holds), from load steps on the live deployment `steps.deployment` (each `steps.run(...)` is one measured,
  saved load step);
- `worst_values()`: what a candidate that failed reports (never a good value);
- `confirm_metric(winner_values)` and `measure_repeat(steps, winner_values)`: what a confirmation repeat of the
  winner and the baseline measures, a higher first value being better.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

from harness.deploy import Deployment
from harness.errors import UserError
from harness.records import SLO, RunRecord, to_dict
from harness.study.scoring import capacity_search, metric_value, slo_violations

MAXIMIZE, MINIMIZE = "maximize", "minimize"


@dataclass
class Measurement:
    """What an objective made of one live deployment."""

    values: list[float]
    constraints: list[float]
    record: RunRecord | None  # the run the values come from
    curve: list[dict[str, Any]] = field(default_factory=list)  # latency vs offered load, one point per load step
    metrics: dict[str, float] = field(default_factory=dict)  # the objective's own numbers for the trial's metrics
    client_reasons: list[str] = field(default_factory=list)  # why the load client, not the server, set the values
    values_invalid: bool = False  # the values come from a run the client limited: not a server number at all


def client_reasons(record: RunRecord | None) -> list[str]:
    """Why the load client, not the server, limited this run (its self-check); empty for a server number."""
    client = getattr(record, "client", None)
    return list(client.reasons or ["the client self-check failed"]) if client is not None and not client.valid else []


@dataclass
class LoadSteps:
    """One candidate's live deployment under the study's workload: each `run()` is one measured load step.

    Step k gets the study's prompts for step k (the same for every trial, different across the steps of one
    server, so the prefix cache never replays an earlier step) and is saved by `save(record, k)`."""

    deployment: Deployment
    workload: Any  # harness.load.workload.Workload
    requests_for: Callable[[int], list[Any]]
    slo: SLO
    plan: dict[str, Any] | None
    save: Callable[[RunRecord, int], None]
    count: int = 0

    def run(self, **load: Any) -> RunRecord:
        """`load`: Deployment.run's arrival keywords (rate, burstiness, concurrency, num_requests, duration_s)."""
        self.count += 1
        record = self.deployment.run(self.workload, self.requests_for(self.count), slo=self.slo, plan=self.plan,
                                     **load)
        self.save(record, self.count)
        return record


@dataclass
class Objective:
    """How one trial is scored; the fields are the sweep file's `objective:` keys (shared by every kind, so a
    study's stored identity keeps one shape)."""

    kind: ClassVar[str] = ""
    directions: ClassVar[tuple[str, ...]] = (MAXIMIZE,)
    default_sampler: ClassVar[str] = "tpe"  # what `sampler: auto` picks
    metric: ClassVar[str] = ""  # the summary key of the first value
    unit: ClassVar[str] = ""
    needs_slo: ClassVar[bool] = False
    needs_fixed_load: ClassVar[bool] = False
    load_curve: ClassVar[bool] = False  # one trial measures several offered loads (the report draws the curve)

    slo: SLO = field(default_factory=SLO)
    concurrency: int | None = None  # closed-loop load for the fixed-load kinds
    rate: float | None = None  # open-loop Poisson rate for the fixed-load kinds
    burstiness: float = 1.0
    num_requests: int = 64  # per load step
    duration_s: float | None = None
    start_rate: float = 1.0  # capacity search: first rate tried (req/s)
    min_rate: float = 0.05  # capacity search: below this the config has no capacity
    max_steps: int = 6  # capacity search: load steps per trial (doubling + bisection)
    latency_metric: str = "p99_tpot_ms"  # pareto: the latency objective

    # ---------------------------------------------------------------------------------------------- sweep file

    def check(self, source: str) -> None:
        """A UserError for a combination of keys this kind cannot run with."""
        if self.needs_fixed_load and self.concurrency is None and self.rate is None:
            raise UserError(f"the {self.kind} objective needs a fixed load: 'concurrency' or 'rate'", source=source,
                            key="objective")
        slo = self.slo
        if self.needs_slo and slo.ttft_ms is None and slo.tpot_ms is None and slo.e2e_ms is None:
            raise UserError(f"the {self.kind} objective needs at least one SLO (ttft_ms, tpot_ms or e2e_ms)",
                            source=source, key="objective.slo")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **to_dict(self)}

    # ---------------------------------------------------------------------------------------------- planning

    def expected_steps(self) -> int:
        """Load steps one trial runs (a dry run's GPU-time estimate)."""
        return 1

    def expected_step_s(self, request_s: float) -> float:
        """Seconds one load step is expected to take: its duration when the objective fixes one, else its requests
        at the offered load; `request_s` (one request's expected end-to-end time) paces a closed loop. The one
        home of this estimate: a dry run asks the objective, never the kind."""
        if self.duration_s is not None:
            return float(self.duration_s)
        rate = self.offered_rate()
        if rate is not None:
            return self.num_requests / rate + request_s  # the last arrival, then its own latency
        return math.ceil(self.num_requests / max(self.concurrency or 1, 1)) * request_s

    def offered_rate(self) -> float | None:
        """The open-loop rate a load step offers (None for a closed loop)."""
        return self.rate if self.concurrency is None else None

    # ---------------------------------------------------------------------------------------------- measuring

    def measure(self, steps: LoadSteps, incumbent: list[float] | None = None) -> Measurement:
        """Score the live deployment; `incumbent`: the best feasible trial's values so far, if any."""
        raise NotImplementedError

    def worst_values(self) -> list[float]:
        """What a failed candidate reports: the worst possible value in each direction, never a good one."""
        return [0.0 if d == MAXIMIZE else float("inf") for d in self.directions]

    # ---------------------------------------------------------------------------------------------- confirming

    def confirm_metric(self, winner_values: list[float]) -> str:
        """The name of what a confirmation repeat measures (its first value)."""
        return self.metric

    def measure_repeat(self, steps: LoadSteps, winner_values: list[float]) -> Measurement:
        """One confirmation repeat (of the winner or the baseline): by default, measured as a trial is."""
        return self.measure(steps)

    def confirms_on_own_scale(self, metric: str) -> bool:
        """Whether a confirmation stored under `metric` is on this objective's scale (comparable to trial values)."""
        return metric == self.confirm_metric([])

    # ---------------------------------------------------------------------------------------------- reporting

    def value_label(self) -> str:
        """Axis label of the first value, with its unit."""
        raise NotImplementedError

    def title(self) -> str:
        """The value in a few words, for figure titles."""
        raise NotImplementedError

    def latency_value(self) -> str | None:
        """The latency metric among the values (a pareto front's second axis), if any."""
        return None

    def describe(self, load: str, slo: str) -> str:
        """The objective in one line, given its offered load and SLOs in words."""
        raise NotImplementedError


@dataclass
class CapacityObjective(Objective):
    """Highest Poisson rate whose SLO percentile holds (double, then bisect). Confirmation: the winner's capacity
    offered to both configurations, scored by goodput, so a baseline that also sustains it ties (and is kept)."""

    kind: ClassVar[str] = "capacity"
    metric: ClassVar[str] = "capacity_rps"
    unit: ClassVar[str] = "req/s"
    needs_slo: ClassVar[bool] = True
    load_curve: ClassVar[bool] = True

    def measure(self, steps: LoadSteps, incumbent: list[float] | None = None) -> Measurement:
        # start where the incumbent is: one step tells whether this candidate is better
        start = incumbent[0] if incumbent and incumbent[0] > 0 else self.start_rate
        result = capacity_search(
            lambda rate: steps.run(rate=rate, burstiness=self.burstiness, num_requests=self.num_requests),
            self.slo, start_rate=start, max_steps=self.max_steps, min_rate=self.min_rate)
        limited = [(st.rate, client_reasons(st.record)) for st in result.steps if client_reasons(st.record)]
        reasons = [f"the client limited the step at {rate:.3g} req/s ({'; '.join(why)}): the capacity is a lower "
                   f"bound set by the client" for rate, why in limited[:1]]
        return Measurement(values=[result.capacity], constraints=[0.0 if result.capacity > 0 else 1.0],
                           record=result.best or result.steps[-1].record, curve=result.curve(),
                           metrics={self.metric: result.capacity}, client_reasons=reasons,
                           values_invalid=bool(limited) and result.best is None)

    def expected_steps(self) -> int:
        return self.max_steps

    def offered_rate(self) -> float | None:
        # the search starts at start_rate and doubles: its first step is the longest
        return self.start_rate

    def confirm_metric(self, winner_values: list[float]) -> str:
        return f"goodput_rps_at_{winner_values[0]:.3g}_rps" if winner_values else "goodput_rps"

    def measure_repeat(self, steps: LoadSteps, winner_values: list[float]) -> Measurement:
        if not winner_values or winner_values[0] <= 0:
            return self.measure(steps)
        record = steps.run(rate=winner_values[0], burstiness=self.burstiness, num_requests=self.num_requests)
        return Measurement(values=[float(record.metrics.goodput or 0.0) if record.metrics else 0.0],
                           constraints=slo_violations(record, self.slo), record=record,
                           client_reasons=client_reasons(record), values_invalid=bool(client_reasons(record)))

    def confirms_on_own_scale(self, metric: str) -> bool:
        return metric in (self.metric, self.kind)

    def value_label(self) -> str:
        pct = self.slo.percentile
        return f"Capacity: highest rate meeting the {f'p{pct:g} ' if pct is not None else ''}SLO (req/s)"

    def title(self) -> str:
        return "capacity"

    def describe(self, load: str, slo: str) -> str:
        return f"capacity: the highest Poisson request rate whose {slo} holds"


@dataclass
class FixedLoadObjective(Objective):
    """One load step at the objective's fixed load (concurrency or Poisson rate), subject to the SLOs."""

    needs_fixed_load: ClassVar[bool] = True

    def measure(self, steps: LoadSteps, incumbent: list[float] | None = None) -> Measurement:
        load: dict[str, Any] = ({"concurrency": self.concurrency} if self.concurrency else
                                {"rate": self.rate, "burstiness": self.burstiness})
        record = steps.run(**load, num_requests=self.num_requests, duration_s=self.duration_s)
        values = self.values(record) if record.metrics is not None else self.worst_values()
        return Measurement(values=values, constraints=slo_violations(record, self.slo), record=record,
                           client_reasons=client_reasons(record), values_invalid=bool(client_reasons(record)))

    def values(self, record: RunRecord) -> list[float]:
        """The values of one measured run (which has metrics)."""
        raise NotImplementedError


@dataclass
class GoodputObjective(FixedLoadObjective):
    """Requests per second that met every SLO, at a fixed offered load."""

    kind: ClassVar[str] = "goodput"
    metric: ClassVar[str] = "goodput"
    unit: ClassVar[str] = "req/s"
    needs_slo: ClassVar[bool] = True

    def values(self, record: RunRecord) -> list[float]:
        return [float(record.metrics.goodput or 0.0)]

    def confirm_metric(self, winner_values: list[float]) -> str:
        return "goodput_rps"

    def confirms_on_own_scale(self, metric: str) -> bool:
        return metric in ("goodput", "goodput_rps")

    def value_label(self) -> str:
        return "Goodput: requests meeting every SLO (req/s)"

    def title(self) -> str:
        return "goodput"

    def describe(self, load: str, slo: str) -> str:
        return f"goodput at {load}: requests/s meeting {slo}"


@dataclass
class ThroughputObjective(FixedLoadObjective):
    """Output tokens per second at a fixed offered load, subject to the SLOs."""

    kind: ClassVar[str] = "throughput"
    metric: ClassVar[str] = "output_throughput"
    unit: ClassVar[str] = "tok/s"

    def values(self, record: RunRecord) -> list[float]:
        return [float(record.metrics.output_throughput)]

    def confirms_on_own_scale(self, metric: str) -> bool:
        return metric in ("output_throughput", "throughput", "pareto")

    def value_label(self) -> str:
        return "Output throughput (tok/s)"

    def title(self) -> str:
        return "output throughput"

    def describe(self, load: str, slo: str) -> str:
        return f"output tokens/s at {load}, subject to {slo}"


@dataclass
class ParetoObjective(ThroughputObjective):
    """Output tokens per second against a latency percentile (`latency_metric`), searched with NSGA-II."""

    kind: ClassVar[str] = "pareto"
    directions: ClassVar[tuple[str, ...]] = (MAXIMIZE, MINIMIZE)
    default_sampler: ClassVar[str] = "nsga2"

    def values(self, record: RunRecord) -> list[float]:
        latency = metric_value(record.metrics, self.latency_metric)
        return [float(record.metrics.output_throughput), float("inf") if latency is None else latency]

    def latency_value(self) -> str | None:
        return self.latency_metric

    def describe(self, load: str, slo: str) -> str:
        return f"output tokens/s vs {self.latency_metric} at {load} (NSGA-II), subject to {slo}"


OBJECTIVES: dict[str, type[Objective]] = {
    cls.kind: cls for cls in (CapacityObjective, GoodputObjective, ThroughputObjective, ParetoObjective)}


def objective_class(kind: str) -> type[Objective]:
    """The class of an objective kind; a UserError naming the known kinds otherwise."""
    try:
        return OBJECTIVES[kind]
    except KeyError:
        raise UserError(f"kind {kind!r} is not one of {list(OBJECTIVES)}", key="objective.kind") from None


def objective_from_dict(data: dict[str, Any]) -> Objective:
    """An objective back from its stored `to_dict()` (a study's identity); unknown keys are left out."""
    cls = objective_class(str(data.get("kind") or "capacity"))
    names = {f.name for f in fields(cls)}
    kwargs = {k: v for k, v in data.items() if k in names and k != "slo"}
    slo = data.get("slo") or {}
    return cls(slo=SLO(**{k: v for k, v in slo.items() if k in {f.name for f in fields(SLO)}}), **kwargs)
