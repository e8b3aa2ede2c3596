"""The report's data layer: open the studies a sweep stored and give each one a `StudyResults` (the Optuna
study, its trials table, identity, objective and confirmation, and the numbers every figure and table uses).

Everything comes from the Optuna storage (what the dashboard reads too), read through the trial schema
(`harness.study.trials`); files in the results folder are only where reports are written, never parsed here.
Drawing is not done here: `figures` and `document` import this module and register their entry points as views
(`register_view`), which the notebook methods (`plot_history()`, `write_report()`, ...) call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

from harness.errors import UserError
from harness.paths import portable
from harness.study.naming import study_dir
from harness.study.objectives import Objective, objective_from_dict
from harness.study.storage import default_storage, make_storage, redact
from harness.study.table import trials_table
from harness.study.timing import TimeSpent, time_spent
from harness.study.trials import (BASELINE_COMMITTED, BASELINE_DEFAULTS, Attr, Ceiling, Spread, StudyAttr,
                                  baseline_of, best_feasible, category_of, default_settings_of, gpus_of, is_measured,
                                  outcome_of, reason_of, settings_of, study_ceiling)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Throughput-like metrics in a trial's `metrics` user attribute: (label, unit).
THROUGHPUT_METRICS: dict[str, tuple[str, str]] = {
    "capacity_rps": ("Capacity at the SLO", "req/s"),
    "goodput": ("Goodput", "req/s"),
    "output_throughput": ("Output throughput", "tok/s"),
    "total_token_throughput": ("Total token throughput", "tok/s"),
    "request_throughput": ("Request throughput", "req/s"),
}
LATENCY_STATS = ("mean", "p50", "p90", "p99")
LATENCY_KINDS = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "end-to-end latency"}
LATENCY_METRICS = tuple(f"{s}_{k}_ms" for k in LATENCY_KINDS for s in LATENCY_STATS)


def _invalid_runs(spread: dict[str, Any], metrics: list[dict[str, Any]] | None) -> list[float]:
    """A confirmation side's client-limited (invalid) runs, as the confirmation itself reads them."""
    return Spread.from_dict(spread, metrics).invalid_runs if spread.get("runs") is not None else []


def latency_label(name: str) -> str:
    """`p99_tpot_ms` -> `p99 TPOT (ms)`."""
    stat, kind, _ = name.split("_")
    return f"{stat} {LATENCY_KINDS.get(kind, kind)} (ms)"


def metric_label(metric: str, capacity_label: str = "Capacity at the SLO (req/s)") -> tuple[str, str]:
    """(axis label with unit, unit) of a confirmation metric: `capacity_rps`, `goodput_rps_at_7.5_rps` (capacity
    studies confirm goodput at the winner's capacity), `goodput_rps`, `output_throughput`, ..."""
    m = re.fullmatch(r"goodput_per_gpu_at_(.+)_rps_per_gpu", metric)
    if m:
        return f"Goodput per GPU at {m.group(1)} req/s per GPU offered (req/s per GPU)", "req/s per GPU"
    m = re.fullmatch(r"goodput_rps_at_(.+)_rps", metric)
    if m:
        return f"Goodput at {m.group(1)} req/s offered (req/s)", "req/s"
    if metric in ("goodput", "goodput_rps"):
        return "Goodput: requests meeting every SLO (req/s)", "req/s"
    if metric in ("output_throughput", "throughput", "pareto"):  # older studies stored the objective's kind
        return "Output throughput (tok/s)", "tok/s"
    if metric == "capacity_rps":
        return capacity_label, "req/s"
    label, unit = THROUGHPUT_METRICS.get(metric, (metric, ""))
    return (f"{label} ({unit})" if unit else label), unit


def check_latency(name: str) -> str:
    if name not in LATENCY_METRICS:
        raise UserError(f"unknown latency metric {name!r}; choose one of {list(LATENCY_METRICS)}", key="--latency")
    return name


def check_throughput(name: str) -> str:
    if name not in THROUGHPUT_METRICS:
        raise UserError(f"unknown throughput metric {name!r}; choose one of {list(THROUGHPUT_METRICS)}",
                        key="--throughput")
    return name


# ------------------------------------------------------------------------------------------------- views

# name -> function(StudyResults, **options): the figures and the report, registered by `figures` and `document`
VIEWS: dict[str, Callable[..., Any]] = {}


def register_view(name: str, view: Callable[..., Any]) -> None:
    VIEWS[name] = view


# ------------------------------------------------------------------------------------------------- storage


@dataclass
class _Location:
    storage_url: str
    results_dir: Path | None
    only: str | None = None  # a study dir was given: just that study


def _locate(path_or_url: str | Path, storage: str | None) -> _Location:
    text = str(path_or_url) if path_or_url is not None else ""
    if storage:
        results = Path(text) if text else None
        return _Location(storage, results.resolve() if results else None)
    if "://" in text:
        return _Location(text, None)
    path = Path(text)
    if not path.exists():
        raise UserError("no such file or folder; give a results folder (the sweep's results_dir), one study's "
                        "folder inside it, or --storage URL", source=text)
    if path.is_file():
        if path.suffix != ".db":
            raise UserError("not a results folder or a studies.db file", source=text)
        return _Location(f"sqlite:///{path.resolve()}", path.resolve().parent)
    if (path / "studies.db").is_file():
        return _Location(default_storage(path), path.resolve())
    if (path.parent / "studies.db").is_file() and "__" in path.name:
        return _Location(default_storage(path.parent), path.parent.resolve(), only=path.name.replace("__", "@"))
    if not any(path.iterdir()):
        raise UserError("the results folder is empty: no sweep has written here yet (run `python -m harness.sweep`, "
                        "or pass --storage URL if the sweep used another storage)", source=text)
    raise UserError("no studies.db here: not a results folder written by `python -m harness.sweep` (if the sweep "
                    "used a PostgreSQL storage, pass --storage URL)", source=text)


def _study_names(storage: optuna.storages.BaseStorage, label: str) -> list[str]:
    try:
        names = sorted(s.study_name for s in storage.get_all_studies())
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read the study storage: {first}", source=label) from None
    if not names:
        raise UserError("the storage holds no studies yet (is the sweep still starting?)", source=label)
    return names


def load_studies(path_or_url: str | Path = "results", *, storage: str | None = None,
                 study: str | None = None) -> list[StudyResults]:
    """Every study of a results folder (its studies.db), of one study's folder, or of a storage URL.

    `path_or_url`: a results folder, a `studies.db` file, a study folder (`results/<model>__<hw>__<wl>__<obj>`) or a
    storage URL (`sqlite:///...`, `postgresql://...`). `storage`: read this storage instead of `<folder>/studies.db`
    while reports still go under the folder. `study`: only this study (`@` or `__` form).
    """
    loc = _locate(path_or_url, storage)
    label = portable(redact(loc.storage_url))  # the report is committed: no machine path
    store = make_storage(loc.storage_url)
    names = _study_names(store, label)
    wanted = study.replace("__", "@") if study else loc.only
    if wanted is not None:
        if wanted not in names:
            raise UserError(f"no study {wanted!r}; the storage holds {names}", source=label, key="--study")
        names = [wanted]
    return [_load(store, name, loc.results_dir, label) for name in names]


def load_study(path_or_url: str | Path = "results", name: str | None = None, *,
               storage: str | None = None) -> StudyResults:
    """One study; `name` may be left out when the storage holds exactly one."""
    found = load_studies(path_or_url, storage=storage, study=name)
    if len(found) > 1:
        raise UserError(f"{len(found)} studies here; name one of {[s.name for s in found]}", key="name")
    return found[0]


def _load(store: optuna.storages.BaseStorage, name: str, results_dir: Path | None, label: str) -> StudyResults:
    study = optuna.load_study(study_name=name, storage=store)
    result = StudyResults(name=name, study=study, table=pd.DataFrame(), identity={}, confirm=None,
                          dir=study_dir(results_dir, name) if results_dir is not None else None,
                          storage=label)
    result.refresh()
    return result


# ------------------------------------------------------------------------------------------------- results


@dataclass
class StudyResults:
    """One study as the sweep stored it, plus the review figures. Methods return matplotlib Figures."""

    name: str  # model@hw@workload@objective
    study: optuna.Study
    table: pd.DataFrame  # harness.study.table.trials_table
    identity: dict[str, Any]  # model, space, workload, objective, hardware
    confirm: dict[str, Any] | None  # Confirmation.to_dict(), None before confirmation
    dir: Path | None  # <results_dir>/<model>__<hw>__<wl>__<obj>, None for a bare storage URL
    storage: str = ""  # the storage URL, password hidden
    # the recommendation against the committed config (Confirmation.to_dict()), when the study had one to replace
    confirm_committed: dict[str, Any] | None = None
    config_path: str = ""  # the emitted config the sweep wrote (refresh: its record, else configs/<model>.yaml)
    _trials: list[FrozenTrial] = field(default_factory=list, repr=False)

    def refresh(self) -> StudyResults:
        """Re-read trials, table and attributes (a sweep may still be adding trials)."""
        self._trials = sorted(self.study.get_trials(deepcopy=False), key=lambda t: t.number)
        self.table = trials_table(self.study)
        attrs = self.study.user_attrs
        self.identity = dict(attrs.get(StudyAttr.IDENTITY) or {})
        self.confirm = attrs.get(StudyAttr.CONFIRM)
        self.confirm_committed = attrs.get(StudyAttr.CONFIRM_COMMITTED)
        self.config_path = str(attrs.get(StudyAttr.CONFIG) or f"configs/{self.parts['model']}.yaml")
        return self

    # ------------------------------------------------------------------------------------------ identity

    @property
    def trials(self) -> list[FrozenTrial]:
        return self._trials

    def trial(self, number: int) -> FrozenTrial:
        for t in self._trials:
            if t.number == number:
                return t
        raise UserError(f"study {self.name} has no trial #{number}", key="trial")

    @property
    def parts(self) -> dict[str, str]:
        keys = ("model", "hardware", "workload", "objective")
        values = self.name.split("@")
        return dict(zip(keys, values + [""] * (4 - len(values))))

    @property
    def model(self) -> str:
        return str(self.identity.get("model") or self.parts["model"])

    @property
    def hardware(self) -> dict[str, Any]:
        return dict(self.identity.get("hardware") or {})

    @property
    def objective(self) -> dict[str, Any]:
        return dict(self.identity.get("objective") or {"kind": self.parts["objective"]})

    @property
    def objective_kind(self) -> str:
        return str(self.objective.get("kind") or self.parts["objective"] or "capacity")

    @property
    def objective_spec(self) -> Objective:
        """The study's objective as its class: what its values mean and how they are labelled."""
        return objective_from_dict({**self.objective, "kind": self.objective_kind})

    @property
    def slo(self) -> dict[str, Any]:
        return dict(self.objective.get("slo") or {})

    @property
    def workload(self) -> dict[str, Any]:
        return dict(self.identity.get("workload") or {"name": self.parts["workload"]})

    @property
    def space(self) -> dict[str, Any]:
        return dict(self.identity.get("space") or {})

    @property
    def knobs(self) -> list[str]:
        """The knobs the sampler varied (from the space; else every param any trial has)."""
        knobs = list((self.space.get("knobs") or {}).keys())
        if knobs:
            return knobs
        seen: dict[str, None] = {}
        for t in self._trials:
            seen.update(dict.fromkeys(t.params))
        return list(seen)

    @property
    def on_cpu(self) -> bool:
        hw = self.hardware
        return hw.get("arch") == "cpu" or not hw.get("count") or self.parts["hardware"] == "cpu"

    @property
    def hardware_label(self) -> str:
        hw = self.hardware
        if not hw:
            return self.parts["hardware"]
        if self.on_cpu:
            return f"{hw.get('name') or 'CPU'} (vLLM CPU backend)"
        mem = f", {hw['memory_gib']:g} GiB each" if hw.get("memory_gib") else ""
        return f"{hw.get('count')}x {hw.get('name')}{mem}"

    # ------------------------------------------------------------------------------------------ objective

    @property
    def objective_metric(self) -> str:
        """The metrics key holding the objective's value (the first one for pareto)."""
        return self.objective_spec.metric

    @property
    def objective_unit(self) -> str:
        return self.objective_spec.unit

    @property
    def objective_label(self) -> str:
        """Axis label for the objective, with its unit and SLO percentile where one applies."""
        return self.objective_spec.value_label()

    @property
    def latency_metric(self) -> str:
        """Default latency axis: the objective's own latency value (pareto), else p99 TPOT."""
        name = self.objective_spec.latency_value()
        return name if name in LATENCY_METRICS else "p99_tpot_ms"

    @property
    def load_label(self) -> str:
        """The offered load of a fixed-load objective, in words."""
        obj = self.objective
        if obj.get("concurrency"):
            return f"concurrency {obj['concurrency']} (closed loop)"
        if obj.get("rate"):
            return f"Poisson rate {obj['rate']:g} req/s"
        return "the objective's load"

    def slo_text(self) -> str:
        slo = self.slo
        parts = [f"{k.split('_')[0].upper()} <= {slo[k]:g} ms" for k in ("ttft_ms", "tpot_ms", "e2e_ms")
                 if slo.get(k) is not None]
        if not parts:
            return "no SLO"
        return f"p{slo.get('percentile', 99):g} " + ", ".join(parts)

    def objective_value(self, trial: FrozenTrial) -> float | None:
        """The first objective value of a measured trial; None for failed, pruned or unfinished ones."""
        return float(trial.values[0]) if is_measured(trial) else None

    # ------------------------------------------------------------------------------------------ key trials

    @property
    def baseline_trial(self) -> FrozenTrial | None:
        """vLLM defaults (else the committed config): the level every win is measured against."""
        for label in (BASELINE_DEFAULTS, BASELINE_COMMITTED):
            found = [t for t in self._trials if baseline_of(t) == label]
            done = [t for t in found if t.state == TrialState.COMPLETE]
            if done or found:
                return (done or found)[-1]
        return None

    @property
    def winner_trial(self) -> FrozenTrial | None:
        """The best feasible trial (the confirmation's winner once it ran)."""
        if self.confirm and self.confirm.get("winner_trial") is not None:
            return self._get(self.confirm["winner_trial"])
        return best_feasible(self._trials)

    @property
    def recommended_trial(self) -> FrozenTrial | None:
        """What configs/<model>.yaml holds: the confirmation's pick, else the best feasible trial so far."""
        if self.confirm and self.confirm.get("recommended_trial") is not None:
            return self._get(self.confirm["recommended_trial"])
        return self.winner_trial

    @property
    def confirmed(self) -> bool:
        return bool(self.confirm)

    @property
    def confirm_label(self) -> tuple[str, str]:
        """(label with unit, unit) of what the confirmation measured."""
        return metric_label(str((self.confirm or {}).get("metric") or self.objective_metric), self.objective_label)

    @property
    def confirm_comparable(self) -> bool:
        """Whether the confirmation's numbers are on the objective's scale (capacity studies confirm goodput at
        the winner's capacity instead, which is not a capacity)."""
        if not self.confirm:
            return False
        return self.objective_spec.confirms_on_own_scale(str(self.confirm.get("metric") or ""))

    @property
    def confirm_rate(self) -> float | None:
        """The fixed offered load (req/s) of a capacity study's confirmation on the winner's side, from its metric
        name (a per-GPU rate times the GPUs the winner's repeats used)."""
        metric = str((self.confirm or {}).get("metric") or "")
        per = re.fullmatch(r"goodput_per_gpu_at_(.+)_rps_per_gpu", metric)
        m = per or re.fullmatch(r"goodput_rps_at_(.+)_rps", metric)
        try:
            rate = float(m.group(1)) if m else None
        except ValueError:
            return None
        if rate is not None and per:
            win = self.winner_trial
            rate *= int((self.confirm or {}).get("winner_gpus") or (gpus_of(win) if win is not None else 1))
        return rate

    @property
    def per_gpu(self) -> bool:
        """Whether the study's values are per GPU (every study since values were; older ones are absolute)."""
        return self.objective_spec.per_gpu

    def gpus(self, trial: FrozenTrial | None) -> int | None:
        """GPUs the trial's measurement used (replicas x DP x TP x PP; 1 for a CPU server)."""
        return None if trial is None else max(gpus_of(trial), 1)

    def gpu_words(self, n: int | None) -> str:
        if n is None:
            return "?"
        if self.on_cpu:
            return "the CPU host"
        return f"{n} GPU{'s' if n != 1 else ''}"

    def _get(self, number: int) -> FrozenTrial | None:
        return next((t for t in self._trials if t.number == number), None)

    # ------------------------------------------------------------------------------------------ tables

    def counts(self) -> dict[str, int]:
        """trials, measured, ok, slo_violated, client_limited, failed, pruned, interrupted, running, and
        failed:<kind> each."""
        out = {"trials": len(self._trials), "measured": 0, "ok": 0, "slo_violated": 0, "client_limited": 0,
               "failed": 0, "pruned": 0, "interrupted": 0, "running": 0}
        for t in self._trials:
            cat = category_of(t)
            if cat == "waiting":
                cat = "running"
            out[cat] = out.get(cat, 0) + 1
            if cat == "failed":
                out[outcome_of(t)] = out.get(outcome_of(t), 0) + 1
            if is_measured(t):
                out["measured"] += 1
        return out

    @property
    def device_seconds(self) -> float:
        """Device time the trials held (seconds x devices), confirmation runs not included."""
        return float(sum(float(t.user_attrs.get(Attr.DEVICE_SECONDS) or 0.0) for t in self._trials))

    @property
    def device_unit(self) -> str:
        """What a device-second is of: "GPU", or "server" on a CPU host."""
        return "server" if self.on_cpu else "GPU"

    @property
    def ceiling(self) -> Ceiling | None:
        """The highest throughput any load step of the study served, SLO or not (capacity studies; else None)."""
        return study_ceiling(self._trials)

    def time_spent(self) -> TimeSpent:
        """Where the trials' device time went (start-up phases, load steps, failed starts, pruned at 0 s) and the
        finished trials per device-hour."""
        return time_spent(self._trials)

    def time_table(self) -> pd.DataFrame:
        """`time_spent()` as rows: where, device_seconds, share (of the finished trials' device time); which
        devices is `hardware_label` (also in the frame's `attrs`)."""
        df = pd.DataFrame(self.time_spent().rows(), columns=["where", "device_seconds", "share"])
        df.attrs["hardware"] = self.hardware_label
        return df

    def improvement(self) -> dict[str, Any] | None:
        """Recommended vs baseline: from the confirmation (mean, std, n of repeats) when it ran, else one trial each."""
        conf = self.confirm
        if conf:
            w, b = conf.get("winner") or {}, conf.get("baseline") or {}
            label, unit = self.confirm_label
            wt, bt = self._get(conf.get("winner_trial")), self._get(conf.get("baseline_trial"))
            wg = conf.get("winner_gpus") or self.gpus(wt)
            bg = conf.get("baseline_gpus") or (self.gpus(bt) if bt is not None else wg)
            mode = conf.get("mode") or ""  # interleaved, or one configuration at a time (confirm.MODE_*)
            return {"source": f"confirmation, {w.get('n', 0)} repeats each" + (f" ({mode})" if mode else ""),
                    "mode": mode, "metric": conf.get("metric"),
                    "label": label, "unit": unit, **self._sides(conf.get("improvement"), w.get("mean"), b.get("mean"),
                                                                 wg, bg, bool(conf.get("per_gpu")),
                                                                 conf.get("pairing") or ""),
                    "scaling": conf.get("scaling"), "cross_check": conf.get("cross_check"),
                    "winner_trial": conf.get("winner_trial"), "baseline_trial": conf.get("baseline_trial"),
                    "winner_mean": w.get("mean"), "winner_std": w.get("std"), "winner_n": w.get("n"),
                    "winner_min": w.get("min"), "winner_max": w.get("max"),
                    "baseline_mean": b.get("mean"), "baseline_std": b.get("std"), "baseline_n": b.get("n"),
                    "baseline_min": b.get("min"), "baseline_max": b.get("max"),
                    "winner_invalid": _invalid_runs(w, conf.get("winner_metrics")),
                    "baseline_invalid": _invalid_runs(b, conf.get("baseline_metrics")),
                    "relative": conf.get("improvement"), "gain_basis": conf.get("gain_basis") or "",
                    "verdict": conf.get("verdict", ""), "recommended_trial": conf.get("recommended_trial")}
        win, base = self.winner_trial, self.baseline_trial
        if win is None:
            return None
        wv = self.objective_value(win)
        bv = self.objective_value(base) if base is not None else None
        rel = (wv / bv - 1.0) if (wv is not None and bv) else None
        return {"source": "single sweep measurements (not confirmed)", "metric": self.objective_metric,
                "label": self.objective_label, "unit": self.objective_unit,
                **self._sides(rel, wv, bv, self.gpus(win), self.gpus(base), self.per_gpu, ""), "scaling": None,
                "winner_trial": win.number, "baseline_trial": base.number if base is not None else None,
                "winner_mean": wv, "winner_std": None, "winner_n": 1, "winner_min": wv, "winner_max": wv,
                "baseline_mean": bv, "baseline_std": None, "baseline_n": 1 if bv is not None else 0,
                "baseline_min": bv, "baseline_max": bv, "relative": rel,
                "verdict": f"trial #{win.number} is the best feasible trial so far (not confirmed)",
                "recommended_trial": win.number}

    def _sides(self, rel: float | None, w: float | None, b: float | None, wg: int | None, bg: int | None,
               per_gpu: bool, sides: str) -> dict[str, Any]:
        """The GPUs on each side and the gain per GPU (the same as `relative` when the values are per GPU or the
        GPU counts are equal; else the absolute values divided by each side's GPUs)."""
        if per_gpu or (wg is not None and wg == bg):
            gain = rel
        elif w is not None and b and wg and bg:
            gain = (w / wg) / (b / bg) - 1.0
        else:
            gain = None
        if not sides and wg is not None:
            sides = f"winner on {self.gpu_words(wg)} vs baseline on {self.gpu_words(bg)}"
        return {"winner_gpus": wg, "baseline_gpus": bg, "per_gpu": per_gpu, "gain_per_gpu": gain,
                "equal_gpus": wg is not None and wg == bg, "sides": sides}

    def settings_table(self) -> pd.DataFrame:
        """Every setting of the recommended trial next to the baseline's (`settings_rows`)."""
        rec, base = self.recommended_trial, self.baseline_trial
        sides = [None if t is None else (settings_of(t), default_settings_of(t)) for t in (rec, base)]
        return pd.DataFrame(settings_rows(sides[0], sides[1], self.knobs),
                            columns=["setting", "knob", "baseline", "recommended", "changed"])

    def failures(self) -> pd.DataFrame:
        """Trials without a clean measurement: number, state, outcome, reason, and their settings."""
        rows = []
        for t in self._trials:
            if category_of(t) == "ok":
                continue
            rows.append({"number": t.number, "state": t.state.name, "outcome": outcome_of(t),
                         "reason": reason_of(t), "settings": settings_of(t)})
        return pd.DataFrame(rows, columns=["number", "state", "outcome", "reason", "settings"])

    def curve(self, trial: FrozenTrial | int) -> pd.DataFrame:
        """Latency vs offered load of one capacity trial (one row per load step, by rate)."""
        t = self.trial(trial) if isinstance(trial, int) else trial
        df = pd.DataFrame(t.user_attrs.get(Attr.CURVE) or [])
        return df.sort_values("rate").reset_index(drop=True) if "rate" in df else df

    def outcome(self) -> str:
        """In two or three words: confirmed win | baseline kept | not confirmed | no feasible trial | no trials."""
        if not self._trials:
            return "no trials"
        win, rec = self.winner_trial, self.recommended_trial
        if win is None:
            return "no feasible trial"
        if not self.confirmed:
            return "not confirmed"
        return "confirmed win" if rec is not None and rec.number == win.number and (
            self.baseline_trial is None or rec.number != self.baseline_trial.number) else "baseline kept"

    def summary(self) -> dict[str, Any]:
        """One row for comparing studies: identity, baseline vs best trial (with spread), outcome, counts, time."""
        c = self.counts()
        imp = self.improvement() or {}
        spent = self.time_spent()
        rec = self.recommended_trial
        verdict = self.outcome()
        kept = verdict == "baseline kept"
        return {"study": self.name, "model": self.model, "hardware": self.parts["hardware"],
                "workload": self.workload.get("name", self.parts["workload"]), "objective": self.objective_kind,
                "metric": imp.get("metric", self.objective_metric), "unit": imp.get("unit", self.objective_unit),
                "label": imp.get("label", self.objective_label), "baseline": imp.get("baseline_mean"), "baseline_std": imp.get("baseline_std"),
                "winner": imp.get("winner_mean"), "winner_std": imp.get("winner_std"),
                "improvement": imp.get("relative"), "outcome": verdict,
                "recommended": imp.get("baseline_mean") if kept else imp.get("winner_mean"),
                "recommended_trial": rec.number if rec is not None else None,
                "winner_trial": imp.get("winner_trial"), "confirmed": self.confirmed, "trials": c["trials"],
                "measured": c["measured"], "slo_violated": c["slo_violated"], "failed": c["failed"],
                "pruned": c["pruned"], "interrupted": c["interrupted"], "device_hours": self.device_seconds / 3600.0,
                "trials_per_device_hour": spent.trials_per_device_hour, "startup_share": spent.share(spent.startup_s)}

    # ------------------------------------------------------------------------------------------ figures

    def _view(self, name: str, *args: Any, **kwargs: Any) -> Any:
        if name not in VIEWS:  # registered when harness.report is imported, which importing this module does
            raise RuntimeError(f"no report view {name!r}: import harness.report")
        return VIEWS[name](self, *args, **kwargs)

    def plot_history(self) -> Figure:
        return self._view("history")

    def plot_pareto(self, latency: str | None = None, throughput: str | None = None) -> Figure:
        return self._view("pareto", latency=latency, throughput=throughput)

    def plot_importances(self) -> Figure:
        return self._view("importances")

    def plot_slices(self, params: list[str] | None = None, top: int = 3) -> Figure:
        return self._view("slices", params=params, top=top)

    def plot_latency_vs_load(self) -> Figure:
        return self._view("latency_vs_load")

    def plot_memory(self) -> Figure:
        return self._view("memory")

    def figures(self, latency: str | None = None, throughput: str | None = None) -> dict[str, Figure]:
        """Every review figure, by file stem."""
        return self._view("figures", latency=latency, throughput=throughput)

    def write_report(self, out_dir: str | Path | None = None, latency: str | None = None,
                     throughput: str | None = None) -> Path:
        """Figures (PNG) + report.md + report.html into `out_dir` (default `<study dir>/report/`)."""
        return self._view("report", out_dir, latency=latency, throughput=throughput)

    def __repr__(self) -> str:
        c = self.counts()
        return (f"StudyResults({self.name!r}: {c['trials']} trials, {c['measured']} measured, {c['failed']} failed, "
                f"{c['pruned']} pruned)")


Side = tuple[dict[str, Any], dict[str, Any]]  # a trial's settings, and the defaults vLLM filled in for the others


def settings_rows(rec: Side | None, base: Side | None, knobs: list[str]) -> list[dict[str, Any]]:
    """The settings table's rows: a setting left out shows the value vLLM ran with (as the trial's plan resolved
    it), and a setting is changed only where the values vLLM ran with differ (setting a knob to vLLM's own
    default changes nothing); without a resolved default on both sides, where what the two sides show differs."""
    keys = list(dict.fromkeys([*(rec[0] if rec else {}), *knobs, *(base[0] if base else {})]))
    rows = []
    for key in keys:
        r, b = (None if side is None else _shown(key, *side) for side in (rec, base))
        runs = [None if side is None else side[0].get(key, side[1].get(key)) for side in (rec, base)]
        changed = rec is not None and base is not None and (
            str(runs[0]) != str(runs[1]) if None not in runs else str(r) != str(b))
        rows.append({"setting": key, "knob": key in knobs, "baseline": b, "recommended": r, "changed": changed})
    return rows


def _shown(key: str, given: dict[str, Any], defaults: dict[str, Any]) -> Any:
    """A setting as the settings table shows it: the value given, else vLLM's default with what it came to."""
    if key in given:
        return given[key]
    if key not in defaults:
        return "(vLLM default)"
    value = defaults[key]
    return f"(vLLM default: {str(value).lower() if isinstance(value, bool) else value})"
