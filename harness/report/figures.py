"""The review figures, one function per figure; each takes a `StudyResults` and returns a matplotlib Figure.

Optuna's own matplotlib plots draw the history, the Pareto front, the importances and the slices (on a derived
in-memory study that keeps the trial numbers, so baseline trials, which carry no sampled parameters, and failed
launches, which carry the worst value instead of a measurement, do not distort them); this module only adds what a
serving review needs on top: the baseline level, the recommended trial, failed and pruned trials with their reasons,
units on every axis. A figure that has nothing to show says why instead of failing.
"""

from __future__ import annotations

import math
import os
import sys
import textwrap
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import matplotlib

if "matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND"):
    matplotlib.use("Agg")  # files, not windows; notebooks set MPLBACKEND to their inline backend

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter  # noqa: E402
from optuna.trial import FrozenTrial, TrialState, create_trial  # noqa: E402

from harness.report.results import (LATENCY_KINDS, THROUGHPUT_METRICS, StudyResults,  # noqa: E402
                                    check_latency, check_throughput, latency_label, register_view)
from harness.study.trials import (CLIENT_LIMITED_LABEL, MEASURED, Attr, category_of, constraints_of,  # noqa: E402
                                  is_measured, label_of, metric_of, outcome_of, reason_of)

COLORS = {"ok": "#1f77b4", "slo_violated": "#ff7f0e", "failed": "#d62728", "pruned": "#7f7f7f",
          "interrupted": "#9467bd", "running": "#bcbd22", "waiting": "#bcbd22", "client_limited": "#8c564b"}
BASELINE_COLOR = "#222222"
RECOMMENDED_COLOR = "#ffbf00"
WINNER_COLOR = "#2ca02c"
RC = {"figure.figsize": (11, 6), "figure.dpi": 100, "savefig.dpi": 120, "font.size": 11, "axes.titlesize": 13,
      "axes.labelsize": 11.5, "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 9.5,
      "figure.titlesize": 14, "axes.titleweight": "bold", "axes.titlepad": 10}
OUTCOME_LABELS = {"ok": "measured, meets SLO", "slo_violated": "measured, SLO not met",
                  "failed": "failed to run", "pruned": "pruned before launch",
                  "interrupted": "interrupted", "running": "running",
                  "client_limited": "client-limited (invalid), not a server number"}
FIGURES = ("history", "pareto", "importances", "slices", "latency_vs_load", "memory")


# ----------------------------------------------------------------------------------------------- helpers


@contextmanager
def _quiet() -> Iterator[None]:
    """No Optuna info lines ("A new study created in memory") or experimental/deprecation warnings."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*(too small to compute|quantiles select the same|"
                                "importances of params to achieve low).*")
        level = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            yield
        finally:
            optuna.logging.set_verbosity(level)


@contextmanager
def figure_style() -> Iterator[None]:
    """ggplot (what Optuna's plots use) with larger type; restores the caller's rcParams afterwards."""
    with _quiet(), plt.style.context("ggplot"), plt.rc_context(RC):
        yield


def _restyle(fig: Figure) -> None:
    """Optuna's plots reset the ggplot sizes inside their own call: put ours back on every axes."""
    for ax in fig.axes:
        ax.title.set_fontsize(RC["axes.titlesize"])
        ax.xaxis.label.set_fontsize(RC["axes.labelsize"])
        ax.yaxis.label.set_fontsize(RC["axes.labelsize"])
        ax.tick_params(labelsize=RC["xtick.labelsize"])


def finish(fig: Figure) -> Figure:
    """Detach from pyplot (no leak over many figures, no double display in notebooks) and return."""
    plt.close(fig)
    return fig


_OPTUNA_TITLE = __import__("re").compile(r"^(Optimization History|Pareto-front|Hyperparameter Importances|Slice)")


def header(fig: Figure, title: str, subtitle: str | None = None) -> float:
    """Figure-level title (bold) and subtitle (what the study is, wrapped to the figure's width); returns the top
    of the area left for the axes, as a figure fraction."""
    for ax in fig.axes:  # Optuna's own titles ("Optimization History Plot", ...); our panel titles stay
        ax.set_title("")
        if _OPTUNA_TITLE.match(ax.get_title(loc="left")):
            ax.set_title("", loc="left")
    if fig._suptitle is not None:  # Optuna's slice plot ("Slice Plot")
        fig._suptitle.remove()
        fig._suptitle = None
    width, height = fig.get_size_inches()
    fig.text(0.01, 1 - 0.12 / height, title, fontsize=RC["axes.titlesize"] + 1, fontweight="bold", va="top",
             ha="left")
    used = 0.45
    if subtitle:
        lines = textwrap.wrap(subtitle, max(40, int(width * 15)), break_on_hyphens=False)
        fig.text(0.01, 1 - 0.45 / height, "\n".join(lines), fontsize=9.5, color="#444444", va="top", ha="left",
                 linespacing=1.3)
        used += 0.19 * len(lines)
    return 1 - (used + 0.25) / height


def _layout(fig: Figure, title: str, subtitle: str | None = None) -> None:
    top = header(fig, title, subtitle)
    fig.tight_layout(rect=(0, 0, 1, top))


def _annotate(ax: Any, points: list[tuple[float, float, int]]) -> None:
    """`#n` beside each point; points that overlap on screen share one label (`#5,#12`)."""
    if not points or len(points) > 40:
        return
    pix = ax.transData.transform([(x, y) for x, y, _ in points])
    clusters: list[list[Any]] = []
    for (x, y, n), (px, py) in zip(points, pix):
        for c in clusters:
            if abs(c[0] - px) < 45 and abs(c[1] - py) < 12:
                c[2].append(n)
                break
        else:
            clusters.append([px, py, [n], (x, y)])
    for _px, _py, numbers, xy in clusters:
        ax.annotate(",".join(f"#{n}" for n in sorted(numbers)), xy, textcoords="offset points", xytext=(7, 5),
                    fontsize=8.5, color="#333333", zorder=7)


def _wrap(text: str, width: int, lines: int = 2) -> str:
    wrapped = textwrap.wrap(" ".join(str(text).split()), width) or [""]
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        wrapped[-1] = wrapped[-1][: max(width - 1, 1)].rstrip() + "…"
    return "\n".join(wrapped)


def note_figure(title: str, message: str, subtitle: str | None = None) -> Figure:
    """A figure that says why there is nothing to plot, so a report never has a hole without a reason."""
    body = "\n".join(_wrap(line, 120, 4) for line in message.split("\n"))
    with figure_style():
        fig = plt.figure(figsize=(12, 1.3 + 0.24 * (body.count("\n") + 1)))
        top = header(fig, title, subtitle)
        fig.text(0.01, top, body, fontsize=11, va="top", ha="left", color="#333333", linespacing=1.35)
    fig.harness_note = message  # type: ignore[attr-defined]  # the report prints this instead of the image
    return finish(fig)


def _derived_study(r: StudyResults, directions: list[str], values: Callable[[FrozenTrial], list[float] | None],
                   *, params: bool = True) -> optuna.Study:
    """In-memory copy with the same trial numbers: trials `values` skips become FAIL placeholders, the rest keep
    their (sampled) params and the harness's constraints, so Optuna's plots show what was measured."""
    with _quiet():
        derived = optuna.create_study(directions=directions, sampler=optuna.samplers.RandomSampler(seed=0))
    for t in r.trials:
        vals = values(t)
        if vals is None:
            derived.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"number": t.number}))
            continue
        derived.add_trial(create_trial(
            state=TrialState.COMPLETE, values=vals, params=dict(t.params) if params else {},
            distributions=dict(t.distributions) if params else {}, user_attrs={"number": t.number},
            system_attrs={"constraints": constraints_of(t)}))
    return derived


def _baseline_level(r: StudyResults) -> tuple[float | None, float | None, str]:
    """(mean, std, label) of the baseline's objective value: the confirmation's repeats when it ran."""
    base = r.baseline_trial
    if base is None:
        return None, None, ""
    unit = r.objective_unit
    conf = r.confirm or {}
    b = conf.get("baseline") or {}
    if r.confirm_comparable and conf.get("baseline_trial") == base.number and b.get("n"):
        return (float(b["mean"]), float(b.get("std") or 0.0),
                f"baseline {label_of(base)}: {b['mean']:.3g} ± {b.get('std') or 0:.2g} {unit} "
                f"(mean ± sd of {b['n']} repeats{_left_out(conf, base)})")
    value = r.objective_value(base)
    if value is None:
        return None, None, f"baseline {label_of(base)}: {outcome_of(base)}"
    return value, None, f"baseline {label_of(base)}: {value:.3g} {unit}"


def _legend(ax: Any, rename: dict[str, str] | None = None, extra: list[tuple[Any, str]] | None = None,
            **kwargs: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels):
        lab = (rename or {}).get(lab, lab)
        if lab and not lab.startswith("_") and lab not in seen:
            seen[lab] = h
    for h, lab in extra or []:
        seen.setdefault(lab, h)
    if seen:
        opts = {"loc": "best", "framealpha": 0.9, "fontsize": RC["legend.fontsize"]}
        opts.update(kwargs)
        ax.legend(list(seen.values()), list(seen.keys()), **opts)


def _fig_legend(fig: Figure, axes: list[Any], ncol: int) -> None:
    """One legend for all panels, below them, where it covers no data."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab and not lab.startswith("_"):
                seen.setdefault(lab, h)
    if seen:
        fig.legend(list(seen.values()), list(seen), loc="lower center", ncol=min(ncol, len(seen)), framealpha=0.9,
                   fontsize=RC["legend.fontsize"])


def _short_objective(r: StudyResults) -> str:
    return r.objective_spec.title()


def _subtitle(r: StudyResults) -> str:
    per = "values per GPU of each trial" if r.per_gpu else "values of each trial's whole deployment (not per GPU)"
    return (f"{r.name}  |  {r.hardware_label}  |  workload {r.workload.get('name', r.parts['workload'])}  |  "
            f"SLO {r.slo_text()}  |  {per}")


def _num(x: float) -> str:
    """1234.5 -> 1,234; 22.21 -> 22.2; 0.0123 -> 0.0123."""
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _tokens(x: float, _pos: Any = None) -> str:
    if abs(x) >= 1e6:
        return f"{x / 1e6:g}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:g}k"
    return f"{x:g}"


def _failure_lines(r: StudyResults, trials: list[FrozenTrial], width: int = 52, limit: int = 12) -> str:
    lines = []
    for t in trials[:limit]:
        reason = reason_of(t) or "-"
        lines.append(f"{label_of(t)}  {outcome_of(t)}\n" + textwrap.indent(_wrap(reason, width, 2), "   "))
    if len(trials) > limit:
        lines.append(f"… and {len(trials) - limit} more (see the report's trial table)")
    return "\n".join(lines)


def _failure_note(r: StudyResults) -> str:
    """Counts and reasons, for figures of a study with nothing measured."""
    c = r.counts()
    if not c["trials"]:
        return "The study has no trials yet."
    head = (f"{c['trials']} trials: {c['measured']} measured, {c['failed']} failed to run, {c['pruned']} pruned "
            f"before launch, {c['interrupted']} interrupted, {c['running']} running.")
    bad = [t for t in r.trials if not is_measured(t)]
    return head + "\n" + "\n".join(f"{label_of(t)}: {outcome_of(t)}: {reason_of(t) or '-'}" for t in bad[:8])


# ----------------------------------------------------------------------------------------------- history


def optimization_history(r: StudyResults) -> Figure:
    """Objective value per trial (Optuna's history plot) with the best-so-far line, the baseline level (and its
    spread from the confirmation), the recommended trial, failed trials at zero and pruned trials on the axis."""
    title = f"What the tuner tried: {_short_objective(r)} of each trial"
    measured = [t for t in r.trials if is_measured(t)]
    if not measured:
        return note_figure(title, "Nothing to plot: no trial produced a measurement.\n" + _failure_note(r),
                           _subtitle(r))
    direction = r.study.directions[0].name.lower()
    derived = _derived_study(r, [direction], lambda t: [float(t.values[0])] if is_measured(t) else None,
                             params=False)
    ylabel = r.objective_label
    with figure_style():
        ax = optuna.visualization.matplotlib.plot_optimization_history(derived, target_name=ylabel)
        fig = ax.figure
        fig.set_size_inches(12, 6)
        _restyle(fig)
        ax.set_xlabel("Trial number (0 = vLLM defaults baseline)")
        ax.set_ylabel(ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        slo_bad = [t for t in measured if category_of(t) == "slo_violated"]
        if slo_bad:
            ax.scatter([t.number for t in slo_bad], [t.values[0] for t in slo_bad], color=COLORS["slo_violated"],
                       zorder=3, label=OUTCOME_LABELS["slo_violated"])
        failed = [t for t in r.trials if category_of(t) == "failed"]
        if failed:
            ax.scatter([t.number for t in failed], [0.0] * len(failed), marker="X", s=90, color=COLORS["failed"],
                       zorder=4, clip_on=False, label="failed to run (" + ", ".join(sorted({outcome_of(t).split(':', 1)[-1]
                                                                            for t in failed})) + ")")
        for cat, marker in (("pruned", "v"), ("interrupted", "s")):
            ts = [t for t in r.trials if category_of(t) == cat]
            if ts:
                ax.scatter([t.number for t in ts], [0.035] * len(ts), transform=ax.get_xaxis_transform(),
                           marker=marker, s=55, color=COLORS[cat], zorder=4, clip_on=False,
                           label=f"{OUTCOME_LABELS[cat]} (no value)")
        level, std, blabel = _baseline_level(r)
        if level is not None:
            ax.axhline(level, color=BASELINE_COLOR, linestyle="--", linewidth=1.4, label=blabel, zorder=2)
            if std:
                ax.axhspan(level - std, level + std, color=BASELINE_COLOR, alpha=0.10, zorder=1)
        rec = r.recommended_trial
        if rec is not None and r.objective_value(rec) is not None:
            ax.scatter([rec.number], [rec.values[0]], marker="*", s=420, color=RECOMMENDED_COLOR,
                       edgecolors="black", linewidths=1.0, zorder=5,
                       label=f"recommended {label_of(rec)}: {rec.values[0]:.3g} {r.objective_unit}")
        lo, hi = ax.get_ylim()
        if direction == "maximize":
            ax.set_ylim(-0.03 * hi, hi * 1.08 if hi > 0 else 1)  # failed trials sit visibly on zero
        ax.set_xlim(-0.8, max(t.number for t in r.trials) + 0.8)
        _legend(ax, {ylabel: OUTCOME_LABELS["ok"], "Best Value": "best feasible so far"},
                loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        _layout(fig, title, _subtitle(r))
        _annotate(ax, [(t.number, float(t.values[0]), t.number) for t in measured])
    return finish(fig)


# ----------------------------------------------------------------------------------------------- Pareto


def pareto_front(r: StudyResults, latency: str | None = None, throughput: str | None = None) -> Figure:
    """Throughput (or goodput / capacity) against a latency percentile for every measured trial, Optuna's Pareto
    plot on (latency, throughput); baseline and recommended marked; trials without a measurement listed with
    their reasons beside the plot."""
    latency = check_latency(latency or r.latency_metric)
    throughput = check_throughput(throughput or r.objective_metric)
    tlabel, tunit = THROUGHPUT_METRICS[throughput]
    xlabel = latency_label(latency)
    ylabel = f"{tlabel} ({tunit})"
    title = f"Throughput vs latency: {tlabel[0].lower() + tlabel[1:]} against {xlabel[:-5]}"

    def point(t: FrozenTrial) -> list[float] | None:
        if t.state != TrialState.COMPLETE or category_of(t) not in MEASURED:
            return None
        x, y = metric_of(t, latency), metric_of(t, throughput)
        return None if x is None or y is None else [x, y]

    plotted = [t for t in r.trials if point(t) is not None]
    missing = [t for t in r.trials if point(t) is None and category_of(t) not in ("running", "waiting")]
    if not plotted:
        return note_figure(title, f"Nothing to plot: no trial has both {latency} and {throughput} measured.\n"
                           + _failure_note(r), _subtitle(r))
    derived = _derived_study(r, ["minimize", "maximize"], point, params=False)
    with figure_style():
        ax = optuna.visualization.matplotlib.plot_pareto_front(derived, target_names=[xlabel, ylabel])
        fig = ax.figure
        fig.set_size_inches(15, 7.2)
        _restyle(fig)
        for coll in ax.collections:
            coll.set_sizes([60])
            coll.set_zorder(3)
            if coll.get_label() == "Infeasible Trial":
                coll.set_facecolor(COLORS["slo_violated"])  # the colour every figure uses for "SLO not met"
        ax.set_xlabel(f"{xlabel}, lower is better")
        ax.set_ylabel(f"{ylabel}, higher is better")
        base, rec = r.baseline_trial, r.recommended_trial
        if base is not None and point(base) is not None:
            x, y = point(base)  # type: ignore[misc]
            ax.scatter([x], [y], marker="D", s=130, facecolors="none", edgecolors=BASELINE_COLOR, linewidths=2.0,
                       zorder=5, label=f"baseline {label_of(base)}")
        if rec is not None and point(rec) is not None:
            x, y = point(rec)  # type: ignore[misc]
            ax.scatter([x], [y], marker="*", s=420, color=RECOMMENDED_COLOR, edgecolors="black", linewidths=1.0,
                       zorder=6, label=f"recommended {label_of(rec)}")
        kind = latency.split("_")[1]
        limit = r.slo.get(f"{kind}_ms")
        if limit is not None:
            pct = r.slo.get("percentile", 99)
            ax.axvline(float(limit), color=COLORS["failed"], linestyle=":", linewidth=1.6,
                       label=f"SLO: p{pct:g} {LATENCY_KINDS[kind]} <= {limit:g} ms")
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(0, lo), hi * 1.05 if hi > 0 else 1)
        _legend(ax, {"Best Trial": "Pareto-optimal (feasible)", "Feasible Trial": "feasible, dominated",
                     "Trial": "feasible, dominated", "Infeasible Trial": "SLO not met (infeasible)"},
                loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3)
        top = header(fig, title, _subtitle(r))
        fig.subplots_adjust(left=0.06, right=0.64, top=top, bottom=0.21)
        _annotate(ax, [(*point(t), t.number) for t in plotted])  # type: ignore[misc]
        side = fig.add_axes((0.67, 0.05, 0.32, top - 0.05))
        side.axis("off")
        if missing:
            side.text(0.0, 1.0, f"Not on the plot: {len(missing)} trial(s) without a measurement",
                      fontsize=11, fontweight="bold", va="top", transform=side.transAxes)
            side.text(0.0, 0.94, _failure_lines(r, missing, width=50), fontsize=8.5, va="top",
                      family="monospace", transform=side.transAxes, color="#333333", linespacing=1.25)
        else:
            side.text(0.0, 1.0, "Every finished trial is on the plot\n(no failed or pruned trials).", fontsize=11,
                      va="top", transform=side.transAxes)
    return finish(fig)


# ----------------------------------------------------------------------------------------------- importances


def _importance_inputs(r: StudyResults) -> tuple[optuna.Study | None, list[str], str]:
    """(derived study of measured, sampled trials; params that varied; why not, when None)."""
    used = [t for t in r.trials if is_measured(t) and t.params]
    varied = [p for p in r.knobs if len({repr(t.params.get(p)) for t in used if p in t.params}) > 1]
    if len(used) < 3 or not varied:
        return None, varied, (
            f"Parameter importances need at least 3 measured trials with sampled settings that differ; this study "
            f"has {len(used)} (baselines carry no sampled parameters; failed and pruned trials carry no "
            f"measurement). Run more trials (`trials:` in the sweep file) and re-run the report.")
    ids = {t.number for t in used}
    directions = [d.name.lower() for d in r.study.directions]
    derived = _derived_study(r, directions, lambda t: [float(v) for v in t.values] if t.number in ids else None)
    return derived, varied, ""


def _evaluator(n: int) -> Any:
    try:
        import sklearn  # noqa: F401

        return (optuna.importance.FanovaImportanceEvaluator(seed=0), "fANOVA",
                "fANOVA: the share of the variance in {what} each knob explains")
    except ImportError:  # PED-ANOVA needs no scikit-learn; widen the top quantile so small studies have >= 3 in it
        q = min(0.5, max(0.1, 3.0 / max(n, 1)))
        return (optuna.importance.PedAnovaImportanceEvaluator(target_quantile=q), "PED-ANOVA",
                f"PED-ANOVA: how much each knob's value decides reaching the top {q:.0%} of trials by {{what}}")


def importances(r: StudyResults) -> dict[str, float]:
    """Knob -> importance for the (first) objective; empty when the study is too small to tell."""
    derived, _varied, _why = _importance_inputs(r)
    if derived is None:
        return {}
    evaluator, _name, _how = _evaluator(len(derived.trials))
    target = _importance_target(r)
    with figure_style():
        try:
            return dict(optuna.importance.get_param_importances(derived, evaluator=evaluator, target=target))
        except Exception:  # too few distinct values for the evaluator: say "unknown", not crash
            return {}


def _importance_target(r: StudyResults) -> Callable[[FrozenTrial], float]:
    """PED-ANOVA treats lower as better; fANOVA does not care. Maximized values are negated."""
    sign = -1.0 if r.study.directions[0].name == "MAXIMIZE" else 1.0
    return lambda t: sign * t.values[0]


def param_importances(r: StudyResults) -> Figure:
    """Optuna's parameter-importance bars for the objective, over measured sampled trials."""
    title = f"Which settings mattered: importance for {_short_objective(r)}"
    derived, _varied, why = _importance_inputs(r)
    if derived is None:
        return note_figure(title, why, _subtitle(r))
    evaluator, ev_name, how = _evaluator(len(derived.trials))
    with figure_style():
        try:
            ax = optuna.visualization.matplotlib.plot_param_importances(
                derived, evaluator=evaluator, target=_importance_target(r), target_name=r.objective_label)
        except Exception as exc:  # evaluator-specific limits (e.g. one distinct value): explain instead
            return note_figure(title, f"Optuna could not compute importances: {exc}", _subtitle(r))
        fig = ax.figure
        fig.set_size_inches(11, max(4.0, 1.6 + 0.45 * len(ax.patches)))
        _restyle(fig)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
        ax.set_xlabel(f"Importance ({ev_name}; the bars sum to 1)")
        ax.set_ylabel("Knob")
        n = sum(1 for t in derived.trials if t.state == TrialState.COMPLETE)
        _layout(fig, title, f"{how.format(what=_short_objective(r))}; over {n} measured sampled trials (baselines, "
                f"failed and pruned trials excluded)  |  {r.name}")
    return finish(fig)


def slices(r: StudyResults, params: list[str] | None = None, top: int = 3) -> Figure:
    """Optuna's slice plots (objective vs each knob's value) for the `top` most important knobs, with the
    baseline level and the recommended trial marked."""
    title = f"How {_short_objective(r)} varies with the most important knobs"
    derived, varied, why = _importance_inputs(r)
    if derived is None:
        return note_figure(title, why.replace("Parameter importances", "Slice plots"), _subtitle(r))
    if params is None:
        ranked = [p for p in importances(r) if p in varied]
        params = (ranked or varied)[:top]
    unknown = [p for p in params if p not in varied]
    if unknown:
        return note_figure(title, f"Knob(s) {unknown} did not vary among the measured trials; varied knobs: "
                           f"{varied}", _subtitle(r))
    ylabel = r.objective_label
    with figure_style():
        out = optuna.visualization.matplotlib.plot_slice(derived, params=params, target=lambda t: t.values[0],
                                                         target_name=ylabel)
        axes = list(np.atleast_1d(out).ravel())
        fig = axes[0].figure
        mappable = next((c for ax in axes for c in ax.collections if c.get_array() is not None), None)
        for extra in [a for a in fig.axes if a not in axes]:
            extra.remove()  # Optuna's colour bar: re-added below where it does not cover a panel
        fig.set_size_inches(max(11.0, 4.4 * len(axes) + 1.5), 6.2)
        _restyle(fig)
        level, _std, blabel = _baseline_level(r)
        rec = r.recommended_trial
        for i, ax in enumerate(axes):
            param = ax.get_xlabel()  # Optuna orders the panels itself
            if ax.get_xscale() == "log":
                ax.xaxis.set_major_locator(LogLocator(base=2))
                ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(param + ("  (log scale)" if ax.get_xscale() == "log" else ""))
            ax.set_ylabel(ylabel if i == 0 else "")
            if level is not None:
                ax.axhline(level, color=BASELINE_COLOR, linestyle="--", linewidth=1.3, label=blabel)
            if rec is not None and param in rec.params and r.objective_value(rec) is not None:
                x = rec.params[param]
                if isinstance(rec.distributions.get(param), optuna.distributions.CategoricalDistribution):
                    x = repr(x)  # Optuna's categorical axis labels
                ax.scatter([x], [rec.values[0]], marker="*", s=380, color=RECOMMENDED_COLOR, edgecolors="black",
                           zorder=5, label=f"recommended {label_of(rec)}")
            lo, hi = ax.get_ylim()
            ax.set_ylim(min(0, lo), hi * 1.05 if hi > 0 else 1)
        numbers = [t.number for t in derived.trials if t.state == TrialState.COMPLETE]
        norm = matplotlib.colors.Normalize(vmin=min(numbers), vmax=max(numbers))
        for ax in axes:
            for coll in ax.collections:
                if coll.get_array() is not None:  # one colour scale for every panel (Optuna's is per panel)
                    coll.set_cmap("viridis")
                    coll.set_norm(norm)
                elif coll.get_label() == "Infeasible Trial":
                    coll.set_facecolor(COLORS["slo_violated"])
        extra = [(h, lab) for a in axes[1:] for h, lab in zip(*a.get_legend_handles_labels())]
        rename = {"Infeasible Trial": OUTCOME_LABELS["slo_violated"]}
        _legend(axes[0], rename, extra=[(h, rename.get(lab, lab)) for h, lab in extra])
        leg = axes[0].get_legend()
        if leg is not None:
            handles, labels = leg.legend_handles, [t.get_text() for t in leg.get_texts()]
            leg.remove()
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), framealpha=0.9,
                       fontsize=RC["legend.fontsize"])
        top = header(fig, title, "Each point is one measured sampled trial, coloured by trial number; "
                      f"the star is the recommended configuration.  |  {r.name}")
        fig.subplots_adjust(left=0.07, right=0.9, top=top, bottom=0.22, wspace=0.08)
        if mappable is not None:
            cax = fig.add_axes((0.915, 0.22, 0.012, top - 0.22))
            fig.colorbar(mappable, cax=cax).set_label("Trial number")
    return finish(fig)


# ----------------------------------------------------------------------------------------------- latency vs load


def _key_trials(r: StudyResults) -> list[tuple[str, FrozenTrial, str]]:
    """(role, trial, colour) for baseline, recommended and (if different) the winner."""
    out: list[tuple[str, FrozenTrial, str]] = []
    base, rec, win = r.baseline_trial, r.recommended_trial, r.winner_trial
    if base is not None:
        out.append(("baseline", base, BASELINE_COLOR))
    if rec is not None and (base is None or rec.number != base.number):
        out.append(("recommended", rec, COLORS["ok"]))
    if win is not None and all(win.number != t.number for _, t, _ in out):
        out.append(("best trial (not recommended)", win, WINNER_COLOR))
    if rec is not None and base is not None and rec.number == base.number:
        out[0] = ("baseline = recommended", base, BASELINE_COLOR)
    return out


def _on(r: StudyResults, t: FrozenTrial) -> str:
    """` on 2 GPUs`: every number says which GPUs it used."""
    return f" on {r.gpu_words(r.gpus(t))}"


def _all_repeats(conf: dict[str, Any], t: FrozenTrial) -> list[dict[str, Any]]:
    """The confirmation's per-repeat metrics of this trial (winner or baseline), client-limited ones included."""
    if conf.get("winner_trial") == t.number:
        return list(conf.get("winner_metrics") or [])
    if conf.get("baseline_trial") == t.number:
        return list(conf.get("baseline_metrics") or [])
    return []


def _repeats(conf: dict[str, Any], t: FrozenTrial) -> list[dict[str, Any]]:
    """The confirmation's per-repeat metrics of this trial (winner or baseline) that are server numbers: a repeat
    the client limited (client-limited (invalid)) is left out of every figure."""
    return [m for m in _all_repeats(conf, t) if m.get("client_valid", True)]


def _left_out(conf: dict[str, Any], t: FrozenTrial) -> str:
    """'; 2 client-limited (invalid) repeats left out' for a legend, '' when none were."""
    n = sum(not m.get("client_valid", True) for m in _all_repeats(conf, t))
    return f"; {n} {CLIENT_LIMITED_LABEL} repeat{'s' if n > 1 else ''} left out" if n else ""


def latency_vs_load(r: StudyResults) -> Figure:
    """TTFT and TPOT percentiles against offered load for the baseline and the recommended config (capacity
    objective: each trial's load steps); at the objective's fixed load otherwise."""
    if not r.objective_spec.load_curve:
        return _latency_at_load(r)
    title = "Latency vs offered load: baseline vs recommended"
    trials = [(role, t, c) for role, t, c in _key_trials(r) if t.user_attrs.get(Attr.CURVE)]
    if not trials:
        return note_figure(title, "No latency-vs-load curve to draw: neither the baseline nor the recommended "
                           "trial completed a load step.\n" + _failure_note(r), _subtitle(r))
    conf = r.confirm or {}
    with figure_style():
        fig, axes = plt.subplots(1, 2, figsize=(14, 6.2))
        for ax, kind in zip(axes, ("ttft", "tpot")):
            ys: list[float] = []
            for role, t, color in trials:
                df = r.curve(t)
                for q, style in (("p99", "-"), ("p50", "--")):
                    col = f"{q}_{kind}_ms"
                    if col not in df:
                        continue
                    ok = df["ok"].astype(bool) if "ok" in df else np.ones(len(df), bool)
                    ax.plot(df["rate"], df[col], style, color=color, linewidth=2 if q == "p99" else 1.3,
                            label=f"{role} {label_of(t)}: {q}{_on(r, t)}")
                    ax.scatter(df["rate"][ok], df[col][ok], color=color, s=45, zorder=3)
                    ax.scatter(df["rate"][~ok], df[col][~ok], facecolors="white", edgecolors=color, s=45,
                               linewidths=1.6, zorder=3)
                    ys += [float(v) for v in df[col].dropna()]
                cap = metric_of(t, "capacity_rps")
                if cap is None and r.objective_value(t) is not None:
                    cap = r.objective_value(t)
                if cap:
                    ax.axvline(cap, color=color, linestyle=":", linewidth=1.4,
                               label=f"{role} capacity {cap:.3g} req/s")
                    spread = (conf.get("winner") if conf.get("winner_trial") == t.number else
                              conf.get("baseline") if conf.get("baseline_trial") == t.number else None)
                    if r.confirm_comparable and spread and spread.get("n", 0) > 1:
                        ax.axvspan(spread["min"], spread["max"], color=color, alpha=0.08)
                repeats = _repeats(conf, t)
                col = f"p99_{kind}_ms"
                runs = [float(m[col]) for m in repeats if isinstance(m.get(col), (int, float))]
                if r.confirm_rate and runs:  # the confirmation's repeats at the winner's claimed capacity
                    mean = float(np.mean(runs))
                    ax.errorbar([r.confirm_rate], [mean], yerr=[[mean - min(runs)], [max(runs) - mean]], fmt="D",
                                color=color, markersize=8, capsize=5, markeredgecolor="white", zorder=5,
                                label=f"{role}: p99 over {len(runs)} confirmation repeats at "
                                      f"{r.confirm_rate:g} req/s (mean, min-max{_left_out(conf, t)})")
                    ys += runs
            limit = r.slo.get(f"{kind}_ms")
            if limit is not None:
                ax.axhline(float(limit), color=COLORS["failed"], linestyle="-.", linewidth=1.4,
                           label=f"SLO limit {limit:g} ms (at p{r.slo.get('percentile', 99):g})")
                ys.append(float(limit))
            positive = [y for y in ys if y > 0]
            if positive and max(positive) / min(positive) > 30:
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
                ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("Offered load: Poisson request rate (req/s)")
            ax.set_ylabel(f"{'TTFT: time to first token' if kind == 'ttft' else 'TPOT: time per output token'}"
                          " (ms)")
            ax.set_title(f"{'TTFT' if kind == 'ttft' else 'TPOT'} percentiles vs request rate", loc="left",
                         fontsize=12)
        _fig_legend(fig, axes, ncol=3)
        top = header(fig, title, "Solid: p99, dashed: p50 (the capacity search's load steps); filled points met the SLO at "
                "that rate, hollow did not; dotted verticals: each configuration's capacity; diamonds: the "
                "confirmation repeats.  |  " + r.name)
        rows = math.ceil(len(fig.legends[0].get_texts()) / 3) if fig.legends else 0
        fig.tight_layout(rect=(0, (0.35 + 0.22 * rows) / fig.get_size_inches()[1], 1, top))
    return finish(fig)


def _latency_at_load(r: StudyResults) -> Figure:
    """Fixed-load objectives measure one load point per trial: percentiles side by side, with the spread over
    confirmation repeats as error bars when the confirmation ran."""
    title = f"Latency at {r.load_label}: baseline vs recommended"
    trials = [(role, t, c) for role, t, c in _key_trials(r) if is_measured(t)]
    if not trials:
        return note_figure(title, "No latency to compare: neither the baseline nor the recommended trial was "
                           "measured.\n" + _failure_note(r), _subtitle(r))
    conf = r.confirm or {}
    stats = ("p50", "p90", "p99")
    width = 0.8 / len(trials)
    with figure_style():
        fig, axes = plt.subplots(1, 2, figsize=(13, 5.8))
        for ax, kind in zip(axes, ("ttft", "tpot")):
            for i, (role, t, color) in enumerate(trials):
                repeats = _repeats(conf, t)
                heights, lows, highs = [], [], []
                for s in stats:
                    runs = [m.get(f"{s}_{kind}_ms") for m in repeats if m.get(f"{s}_{kind}_ms") is not None]
                    v = float(np.mean(runs)) if runs else (metric_of(t, f"{s}_{kind}_ms") or 0.0)
                    heights.append(v)
                    lows.append(max(v - min(runs), 0.0) if runs else 0.0)
                    highs.append(max(max(runs) - v, 0.0) if runs else 0.0)
                xs = np.arange(len(stats)) + (i - (len(trials) - 1) / 2) * width
                n = (f", mean of {len(repeats)} repeats" if repeats else "") + _left_out(conf, t)
                ax.bar(xs, heights, width * 0.95, color=color, alpha=0.85, label=f"{role} {label_of(t)}{_on(r, t)}{n}",
                       yerr=[lows, highs] if repeats else None, capsize=4)
                for x, h, up in zip(xs, heights, highs):
                    ax.annotate(_num(h), (x, h + up), textcoords="offset points", xytext=(0, 3), ha="center",
                                fontsize=8.5, color="#333333")
            limit = r.slo.get(f"{kind}_ms")
            if limit is not None:
                ax.axhline(float(limit), color=COLORS["failed"], linestyle="-.", linewidth=1.4,
                           label=f"SLO limit {limit:g} ms (at p{r.slo.get('percentile', 99):g})")
            ax.set_xticks(range(len(stats)), stats)
            ax.set_xlabel("Percentile over the run's requests")
            ax.set_ylabel(f"{'TTFT: time to first token' if kind == 'ttft' else 'TPOT: time per output token'}"
                          " (ms)")
            ax.set_title(f"{'TTFT' if kind == 'ttft' else 'TPOT'} percentiles", loc="left", fontsize=12)
        _fig_legend(fig, axes, ncol=3)
        top = header(fig, title, f"The {r.objective_kind} objective measures one load point per trial (latency-vs-load "
                f"curves come from the capacity objective). Error bars: min-max over the confirmation repeats."
                f"  |  {r.name}")
        fig.tight_layout(rect=(0, 0.08, 1, top))
    return finish(fig)


# ----------------------------------------------------------------------------------------------- memory


def _planned_kv(t: FrozenTrial) -> float | None:
    plan = t.user_attrs.get(Attr.PLAN) or {}
    value = plan.get("kv_cache_tokens")
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    return metric_of(t, "planned_kv_cache_tokens")


def memory(r: StudyResults) -> Figure:
    """Per trial: peak GPU memory (host RSS on the CPU backend) against the device's memory, and the KV-cache
    capacity vLLM reported next to what the planner predicted."""
    title = f"Memory per trial: peak {'server RSS' if r.on_cpu else 'GPU memory'} and KV-cache capacity"
    key = "rss_peak_mib" if r.on_cpu else "peak_gpu_memory_mib"
    trials = [t for t in r.trials if category_of(t) not in ("running", "waiting")]
    has_mem = any(metric_of(t, key) is not None for t in trials)
    has_kv = any(metric_of(t, "kv_cache_tokens") is not None or _planned_kv(t) is not None for t in trials)
    if not trials or not (has_mem or has_kv):
        return note_figure(title, "No memory measurements and no planner estimates in this study.\n"
                           + _failure_note(r), _subtitle(r))
    with figure_style():
        fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(13, 8.5), sharex=True)
        numbers = [t.number for t in trials]
        # peak memory
        for t in trials:
            mem = metric_of(t, key)
            cat = category_of(t)
            if mem is not None:
                ax1.bar(t.number, mem / 1024.0, 0.7, color=COLORS.get(cat, "#999999"), label=OUTCOME_LABELS[cat])
            else:
                marker = "X" if cat == "failed" else "v"
                ax1.scatter([t.number], [0.03], transform=ax1.get_xaxis_transform(), marker=marker, s=80,
                            color=COLORS.get(cat, "#999999"), zorder=4, clip_on=False,
                            label=f"{OUTCOME_LABELS.get(cat, cat)} (not measured)")
                short = outcome_of(t).split(":", 1)[-1]
                ax1.annotate(short, (t.number, 0.07), xycoords=("data", "axes fraction"), ha="center",
                             fontsize=8, rotation=90, va="bottom", color=COLORS.get(cat, "#999999"))
        total = r.hardware.get("memory_gib")
        if total:
            what = "host memory" if r.on_cpu else "memory per GPU"
            ax1.axhline(float(total), color=COLORS["failed"], linestyle="--", linewidth=1.3,
                        label=f"{what}: {float(total):g} GiB")
        ax1.set_ylim(0, max(ax1.get_ylim()[1], float(total or 0) * 1.08, 1.0))
        ax1.set_ylabel("Server RSS peak (GiB)" if r.on_cpu else "Peak memory, busiest GPU (GiB)")
        ax1.set_title(("Peak resident memory of the vLLM server process tree (CPU backend: KV cache lives in "
                       "host memory)") if r.on_cpu else "Peak GPU memory during the run (NVML, highest single GPU)",
                      loc="left", fontsize=11.5)
        _legend(ax1, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        # KV cache: measured bars, planned markers
        for t in trials:
            measured, planned = metric_of(t, "kv_cache_tokens"), _planned_kv(t)
            cat = category_of(t)
            if measured is not None:
                ax2.bar(t.number, measured, 0.7, color=COLORS.get(cat, "#999999"), alpha=0.9,
                        label="measured by vLLM (bar, coloured by outcome)")
            if planned is not None:
                launched = cat not in ("pruned",)
                ax2.scatter([t.number], [planned], marker="_", s=900, linewidths=3, zorder=4,
                            color="black" if launched else COLORS["pruned"],
                            label="planned by the harness" if launched else "planned (trial pruned, not launched)")
            if measured is None and planned is None:
                ax2.scatter([t.number], [0.03], transform=ax2.get_xaxis_transform(), marker="v", s=60,
                            color=COLORS.get(cat, "#999999"), clip_on=False, label="no plan, not measured")
        kv = [v for t in trials for v in (metric_of(t, "kv_cache_tokens"), _planned_kv(t)) if v]
        if kv and max(kv) / min(kv) > 8:
            ax2.set_yscale("log")
            ax2.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax2.yaxis.set_minor_formatter(NullFormatter())
        ax2.yaxis.set_major_formatter(FuncFormatter(_tokens))
        ax2.set_ylabel("KV-cache capacity (tokens)" + (", log scale" if ax2.get_yscale() == "log" else ""))
        ax2.set_xlabel("Trial number")
        ax2.set_title("KV-cache capacity: vLLM's reported size vs the planner's estimate", loc="left",
                      fontsize=11.5)
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlim(min(numbers) - 0.7, max(numbers) + 0.7)
        _legend(ax2, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        _layout(fig, title, _subtitle(r))
    return finish(fig)


# ----------------------------------------------------------------------------------------------- all


def all_figures(r: StudyResults, latency: str | None = None, throughput: str | None = None) -> dict[str, Figure]:
    """Every review figure of one study, keyed by file stem (history, pareto, importances, slices,
    latency_vs_load, memory)."""
    makers: dict[str, Callable[[], Figure]] = {
        "history": lambda: optimization_history(r),
        "pareto": lambda: pareto_front(r, latency=latency, throughput=throughput),
        "importances": lambda: param_importances(r),
        "slices": lambda: slices(r),
        "latency_vs_load": lambda: latency_vs_load(r),
        "memory": lambda: memory(r),
    }
    return {name: make() for name, make in makers.items()}


for _name, _view in (("history", optimization_history), ("pareto", pareto_front), ("importances", param_importances),
                     ("slices", slices), ("latency_vs_load", latency_vs_load), ("memory", memory),
                     ("figures", all_figures)):
    register_view(_name, _view)

__all__ = ["FIGURES", "all_figures", "importances", "latency_vs_load", "memory", "note_figure",
           "optimization_history", "param_importances", "pareto_front", "slices"]
