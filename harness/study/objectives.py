"""What a study optimises: one class per objective kind.

An objective owns everything that depends on its kind: how it measures a live deployment (`measure`), the values
it gives Optuna and their directions, the worst values a failed candidate reports, what a confirmation repeat
measures and under which metric name, and how the report labels its value. The rest of the harness asks the
objective; nothing else switches on the kind. A new kind is a new subclass registered in `OBJECTIVES` (and, if
it has keys of its own, a few lines in the sweep-file parser).

The contract, for a subclass:

- `kind`, `directions` (one per value), `metric` (the `Evaluation.summary()` key of the first value), `unit`;
- `measure(steps, incumbent=None, must_beat=False) -> Measurement`: the trial's values and constraints (Optuna's
  convention: <= 0 holds), from load steps on the live deployment `steps.deployment` (each `steps.run(...)` is one
  measured, saved load step); `must_beat` (a sampled trial, not a baseline): the objective may stop measuring once
  the candidate is shown worse than the incumbent;
- `worst_values()`: what a candidate that failed reports (never a good value);
- `confirm_metric(winner_values)` and `measure_repeat(steps, winner_values)`: what a confirmation repeat of the
  winner and the baseline measures, a higher first value being better.

Per GPU: with `per_gpu` (every new study) the first value Optuna sees is per GPU of the deployment measured
(`ranked()`), and a fixed load (`rate`, `concurrency`) is offered per GPU (a 2-GPU server gets twice the load),
so candidates of different GPU counts compare on equal hardware; the absolute number is kept next to it in the
trial's metrics. Studies stored before this have no `per_gpu` key and read back as absolute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar

from optuna.trial import FrozenTrial

from harness.deploy import Deployment
from harness.errors import UserError
from harness.load.progress import StepDisplay
from harness.load.window import DEFAULT_STEP_S, DEFAULT_WARMUP_S, WindowSpec
from harness.measure.steady import SteadyCriteria
from harness.records import SLO, RunRecord, to_dict
from harness.study.capacity import DEFAULT_PRECISION, search_capacity, step_verdict
from harness.study.pergpu import per_gpu
from harness.study.scoring import metric_value, slo_violations
from harness.study.steadysearch import ServerDied
from harness.study.trials import per_gpu_metric

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
    capacity: dict[str, Any] | None = None  # capacity searches: CapacityBracket.summary()


def client_reasons(record: RunRecord | None) -> list[str]:
    """Why the load client, not the server, limited this run (its self-check); empty for a server number."""
    client = getattr(record, "client", None)
    return list(client.reasons or ["the client self-check failed"]) if client is not None and not client.valid else []


@dataclass
class LoadSteps:
    """One candidate's live deployment under the study's workload: each `run()` / `run_window()` is one measured,
    saved load step.

    Step k gets the study's prompts for step k (`requests_for(k, n)`: the same for every trial, different across
    the steps of one server, so the prefix cache never replays an earlier step) and is saved by `save(record, k)`.
    `prompt_set` s > 0: other prompts for step k (`requests_for(k, n, s)`: the step's lengths in other tokens, or
    other rows of a dataset whose prompts are verbatim), so that a confirmation's repeats on one live server are
    never sent prompts it has seen (its prefix cache would serve them).
    `out`: where step lines and live progress go (None: quiet); `label` prefixes them."""

    deployment: Deployment
    workload: Any
    requests_for: Callable[..., list[Any]]  # (step k, n[, prompt set s]) -> n requests
    slo: SLO
    plan: dict[str, Any] | None
    save: Callable[[RunRecord, int], None]
    count: int = 0
    label: str = ""
    out: Any = None
    tty: bool | None = None  # False: a progress line every 10 s even on a terminal (several trials at once)
    prompt_set: int = 0
    last_e2e_s: float | None = None  # the last step's batch fill time (p99 decode): sizes the next warm-up and tail

    @property
    def gpus(self) -> int:
        """GPUs of the deployment measured (replicas x DP x TP x PP; 1 for a CPU server)."""
        return max(self.deployment.topology.gpus, 1)

    def run(self, **load: Any) -> RunRecord:
        """`load`: Deployment.run's arrival keywords (rate, burstiness, concurrency, num_requests, duration_s)."""
        self.count += 1
        n = int(load.get("num_requests") or 64) + self.workload.warmup_requests
        display = self._display()
        try:
            record = self.deployment.run(self.workload, self._requests(n), slo=self.slo,
                                         plan=self.plan, progress=display, **load)
        finally:
            if display is not None:
                display.finish()
        self.save(record, self.count)
        return record

    def run_window(self, rate: float, spec: WindowSpec, criteria: SteadyCriteria, note: str = "") -> RunRecord:
        """One time-window step at `rate` (req/s over the whole deployment); the record's `steady` is the final
        verdict, SLO percentiles of the window folded in."""
        self.count += 1
        window = spec.plan(rate, self.last_e2e_s)
        self._say(f"{note + ': ' if note else ''}{rate:.3g} req/s, {window.step_s:g} s window after "
                  f"{window.warmup_s:.0f} s warm-up ({window.requests_needed()} requests)")
        display = self._display()
        try:
            record = self.deployment.run_window(self.workload, self._requests(window.requests_needed()),
                                                window, slo=self.slo, plan=self.plan, criteria=criteria,
                                                progress=display)
        finally:
            if display is not None:
                display.finish()
        if record.steady is not None and record.steady.warmup_basis_s is not None:
            self.last_e2e_s = record.steady.warmup_basis_s  # the longest steady decode: the next warm-up
        if record.steady is not None:
            record.steady = step_verdict(record, record.steady, self.slo)
            st = record.steady
            self._say(f"{'holds' if st.holds else 'does not hold'}: offered {st.offered_rate:.3g}, served "
                      f"{st.achieved_rate:.3g} req/s (ratio {st.completion_ratio:.2f})"
                      + (f"; {st.reasons[0]}" if st.reasons else ""))
        self.save(record, self.count)
        return record

    def _requests(self, n: int) -> list[Any]:
        if self.prompt_set:
            return self.requests_for(self.count, n, self.prompt_set)
        return self.requests_for(self.count, n)

    def _display(self) -> StepDisplay | None:
        return (StepDisplay(prefix=f"    {self.label} step {self.count}: ", out=self.out, tty=self.tty)
                if self.out else None)

    def _say(self, text: str) -> None:
        if self.out is not None:
            print(f"    {self.label} step {self.count}: {text}", file=self.out, flush=True)


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
    windowed: ClassVar[bool] = False  # measures time-window steps (the window keys belong to its identity)

    slo: SLO = field(default_factory=SLO)
    concurrency: int | None = None  # closed-loop load for the fixed-load kinds
    rate: float | None = None  # open-loop Poisson rate for the fixed-load kinds
    burstiness: float = 1.0
    num_requests: int = 64  # per load step
    duration_s: float | None = None
    start_rate: float = 1.0  # capacity search: first rate tried (req/s)
    min_rate: float = 0.05  # capacity search: below this the config has no capacity
    max_steps: int = 6  # capacity search: load steps per trial
    growth: float = 2.0  # capacity search: the next rate after a step that held, until one fails (x this)
    latency_metric: str = "p99_tpot_ms"  # pareto: the latency objective
    # windowed steps (capacity): None only for a study stored before steps were time windows
    step_s: float | None = DEFAULT_STEP_S  # measured window of each step, seconds
    warmup_s: float = DEFAULT_WARMUP_S  # warm-up floor before the window, seconds
    drain_s: float = 120.0  # per-request timeout after its send, seconds
    steady_fraction: float = 0.95  # completions in the window >= this x arrivals
    precision: float = DEFAULT_PRECISION  # the capacity bracket's relative width
    per_gpu: bool = True  # rank by the first value per GPU (studies stored before this: absolute)

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
        """The study's identity: every key that changes what a trial measures (the window keys only for kinds
        that measure windows, so the identity of an older fixed-load study keeps its shape; not `SEARCH_KEYS`)."""
        d = {"kind": self.kind, **to_dict(self)}
        for key in SEARCH_KEYS:
            d.pop(key, None)
        if not self.windowed:
            for key in WINDOW_KEYS:
                d.pop(key, None)
        elif self.step_s is not None:
            d.pop("num_requests", None)  # a window's request count follows from rate x step_s
        return d

    # ---------------------------------------------------------------------------------------------- per GPU

    def ranked(self, values: list[float], gpus: int) -> list[float]:
        """Optuna's values from absolute ones: the first per GPU (with `per_gpu`), the others as measured."""
        if not self.per_gpu or not values:
            return list(values)
        return [float(per_gpu(values[0], max(gpus, 1)))] + list(values[1:])

    def absolute(self, values: list[float], gpus: int) -> list[float]:
        """The inverse of `ranked`: the first value for the whole deployment of `gpus` GPUs."""
        if not self.per_gpu or not values:
            return list(values)
        return [values[0] * max(gpus, 1)] + list(values[1:])

    def per_gpu_words(self) -> str:
        return " per GPU" if self.per_gpu else ""

    def window_spec(self) -> WindowSpec:
        if self.step_s is None:
            raise UserError("this study was measured with request-count steps (before time windows); start a new "
                            "study (another results_dir) to measure it with step_s windows", key="objective.step_s")
        return WindowSpec(step_s=self.step_s, warmup_s=self.warmup_s, drain_s=self.drain_s,
                          burstiness=self.burstiness)

    def criteria(self) -> SteadyCriteria:
        return SteadyCriteria(fraction=self.steady_fraction)

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

    def measure(self, steps: LoadSteps, incumbent: list[float] | None = None, must_beat: bool = False
                ) -> Measurement:
        """Score the live deployment; `incumbent`: the best feasible trial's values so far, if any; `must_beat`:
        the measurement may end once the candidate is shown worse than the incumbent (sampled trials)."""
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

    def gain_floor(self, baseline: FrozenTrial) -> float | None:
        """What a repeat of `baseline` (the trial) that did not hold the confirmation's load counts as, at least, in
        the gain (None: as measured). A repeat is measured as a trial is here, so its number is the baseline's own."""
        return None

    def cross_check_rate(self, winner_values: list[float], gpus: int) -> float | None:
        """The open-loop rate a confirmation repeat offered a side of `gpus` GPUs (what the `vllm bench serve`
        cross-check replays); None when the repeats are a closed loop."""
        rate = self.offered_rate()
        return None if rate is None else rate * (max(gpus, 1) if self.per_gpu else 1)

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
    """The highest Poisson rate the server sustains in steady state with its SLO percentiles held, bracketed to
    `precision` by time-window steps (`harness.study.capacity.search_capacity`); ranked per GPU. Confirmation:
    one windowed step per repeat at the winner's capacity per GPU times the GPUs of the side measured, scored by
    goodput per GPU, so a baseline that also sustains it ties (and is kept)."""

    kind: ClassVar[str] = "capacity"
    metric: ClassVar[str] = "capacity_rps"
    unit: ClassVar[str] = "req/s"
    needs_slo: ClassVar[bool] = True
    load_curve: ClassVar[bool] = True
    windowed: ClassVar[bool] = True

    def expected_steps(self) -> int:
        return self.max_steps

    def expected_step_s(self, request_s: float) -> float:
        # a window step: warm-up (at least a few requests' lifetimes), the measured window, the tail, and the wait
        # for the last requests; old request-count studies keep the request-based estimate
        if self.step_s is None:
            return super().expected_step_s(request_s)
        plan = self.window_spec().plan(self.start_rate, request_s)
        return plan.warmup_s + plan.step_s + plan.tail_s + request_s

    def offered_rate(self) -> float | None:
        # the search starts at start_rate and doubles: its first step is the longest
        return self.start_rate

    def measure(self, steps: LoadSteps, incumbent: list[float] | None = None, must_beat: bool = False
                ) -> Measurement:
        # start where the incumbent is (its value per GPU x this deployment's GPUs): one step tells whether this
        # candidate is better; a sampled candidate shown below it stops there (its bracket stays open)
        known = incumbent is not None and bool(incumbent) and incumbent[0] > 0
        start = self.absolute(incumbent, steps.gpus)[0] if known and incumbent else self.start_rate
        spec, criteria = self.window_spec(), self.criteria()

        def step(rate: float) -> tuple[RunRecord, Any]:
            record = steps.run_window(rate, spec, criteria,
                                      note=f"capacity search step {len(bracket_steps) + 1} of at most {self.max_steps}")
            bracket_steps.append(record)
            if record.failure is not None:
                raise ServerDied(record)
            return record, record.steady

        bracket_steps: list[RunRecord] = []
        try:
            bracket = search_capacity(step, start_rate=start, precision=self.precision, max_steps=self.max_steps,
                                      min_rate=self.min_rate, growth=self.growth,
                                      stop_below=start if must_beat and known else None)
        except ServerDied as died:
            return Measurement(values=self.worst_values(), constraints=[1.0], record=died.record)
        capacity = bracket.capacity_lo
        limited = [(st.rate, client_reasons(st.record)) for st in bracket.steps if st.client_limited]
        reasons = [f"the client limited the step at {rate:.3g} req/s ({'; '.join(why)}): the capacity is a lower "
                   f"bound set by the client" for rate, why in limited[:1]]
        return Measurement(values=self.ranked([capacity], steps.gpus),
                           constraints=[0.0 if capacity > 0 else 1.0],
                           record=bracket.best or bracket.steps[-1].record, curve=bracket.curve(),
                           metrics={self.metric: capacity}, capacity=bracket.summary(), client_reasons=reasons,
                           values_invalid=bool(limited) and bracket.best is None)

    def confirm_metric(self, winner_values: list[float]) -> str:
        if not winner_values:
            return "goodput_rps"
        if self.per_gpu:
            return f"goodput_per_gpu_at_{winner_values[0]:.3g}_rps_per_gpu"
        return f"goodput_rps_at_{winner_values[0]:.3g}_rps"

    def measure_repeat(self, steps: LoadSteps, winner_values: list[float]) -> Measurement:
        if not winner_values or winner_values[0] <= 0:
            return self.measure(steps)
        rate = self.absolute(winner_values, steps.gpus)[0]
        record = steps.run_window(rate, self.window_spec(), self.criteria(), note="confirmation at the winner's capacity")
        goodput = float(record.metrics.goodput or 0.0) if record.metrics else 0.0
        held = record.steady is not None and record.steady.holds
        return Measurement(values=self.ranked([goodput], steps.gpus),
                           constraints=slo_violations(record, self.slo) + [0.0 if held else 1.0], record=record,
                           client_reasons=client_reasons(record), values_invalid=bool(client_reasons(record)))

    def confirms_on_own_scale(self, metric: str) -> bool:
        return metric in (self.metric, self.kind)

    def gain_floor(self, baseline: FrozenTrial) -> float | None:
        # Offered the winner's higher rate, a server past what it sustains collapses (one DialoGPT server served
        # 36-55 req/s offered 74-91, its capacity 71), so its goodput there would inflate the gain far beyond the
        # capacities' ratio. The floor is what the baseline's search measured at its capacity on the repeats' own
        # scale: its goodput per GPU there. A repeat's goodput counts the window's arrivals over first send to last
        # completion, so it runs below the window's rate, the capacity (4-11% in the one-GPU studies: DialoGPT 65.4
        # vs 71.2, FP8 Mistral 16.2 vs 17.4); flooring at the capacity itself would understate the gain by as much,
        # and would have kept the baseline against a winner that beat its every repeat. Never above the capacity;
        # a trial stored without its goodput: the capacity (the gain understated, never inflated).
        # (per GPU only: an absolute capacity is of the baseline's own GPUs, its repeats may run on others)
        values = list(baseline.values or [])
        if not self.per_gpu or not values or values[0] <= 0:
            return None
        goodput = per_gpu_metric(baseline, "goodput")
        return min(goodput, values[0]) if goodput is not None and goodput > 0 else values[0]

    def cross_check_rate(self, winner_values: list[float], gpus: int) -> float | None:
        return self.absolute(winner_values, gpus)[0] if winner_values and winner_values[0] > 0 else None

    def value_label(self) -> str:
        pct = self.slo.percentile
        per = " per GPU" if self.per_gpu else ""
        return f"Capacity{per}: highest steady rate meeting the {f'p{pct:g} ' if pct is not None else ''}SLO (req/s{per})"

    def title(self) -> str:
        return "capacity per GPU" if self.per_gpu else "capacity"

    def describe(self, load: str, slo: str) -> str:
        if self.step_s is None:
            return (f"capacity: the highest Poisson request rate whose {slo} holds ({self.num_requests}-request "
                    f"steps, before steady-state windows)")
        per = ", per GPU" if self.per_gpu else ""
        return (f"capacity{per}: the highest Poisson request rate the server sustains in steady state "
                f"({self.step_s:g} s windows, completions >= {self.steady_fraction:g} x offered, no growing queue) "
                f"with its {slo}, bracketed to {self.precision:.0%}")


@dataclass
class FixedLoadObjective(Objective):
    """One load step at the objective's fixed load (concurrency or Poisson rate), subject to the SLOs."""

    needs_fixed_load: ClassVar[bool] = True

    def measure(self, steps: LoadSteps, incumbent: list[float] | None = None, must_beat: bool = False
                ) -> Measurement:
        # per GPU: the load is per GPU, so each GPU of every candidate sees the same offered load
        scale = steps.gpus if self.per_gpu else 1
        load: dict[str, Any] = ({"concurrency": self.concurrency * scale} if self.concurrency else
                                {"rate": self.rate * scale, "burstiness": self.burstiness})
        record = steps.run(**load, num_requests=self.num_requests * scale, duration_s=self.duration_s)
        if record.metrics is None:
            return Measurement(values=self.worst_values(), constraints=[1.0], record=record)
        return Measurement(values=self.ranked(self.values(record), steps.gpus),
                           constraints=slo_violations(record, self.slo), record=record,
                           client_reasons=client_reasons(record), values_invalid=bool(client_reasons(record)))

    def values(self, record: RunRecord) -> list[float]:
        """The values of one measured run (which has metrics)."""
        raise NotImplementedError

    def load_words(self) -> str:
        return " per GPU of the candidate" if self.per_gpu else ""


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
        per = self.per_gpu_words()
        return f"Goodput{per}: requests meeting every SLO (req/s{per})"

    def title(self) -> str:
        return "goodput" + self.per_gpu_words()

    def describe(self, load: str, slo: str) -> str:
        return f"goodput{self.per_gpu_words()} at {load}{self.load_words()}: requests/s meeting {slo}"


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
        per = self.per_gpu_words()
        return f"Output throughput{per} (tok/s{per})"

    def title(self) -> str:
        return "output throughput" + self.per_gpu_words()

    def describe(self, load: str, slo: str) -> str:
        return f"output tokens/s{self.per_gpu_words()} at {load}{self.load_words()}, subject to {slo}"


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
        return (f"output tokens/s{self.per_gpu_words()} vs {self.latency_metric} at {load}{self.load_words()} "
                f"(NSGA-II), subject to {slo}")


WINDOW_KEYS = ("step_s", "warmup_s", "drain_s", "steady_fraction", "precision")
# How a search moves between rates: a trial's cost, not what it measures (a bracket to `precision`), so a study
# resumes across a change of them; not part of its identity.
SEARCH_KEYS = ("growth",)

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
    kwargs.setdefault("per_gpu", False)  # stored before values were per GPU: absolute
    if cls.windowed:
        kwargs.setdefault("step_s", None)  # stored before steps were time windows: request-count steps
    slo = data.get("slo") or {}
    return cls(slo=SLO(**{k: v for k, v in slo.items() if k in {f.name for f in fields(SLO)}}), **kwargs)
