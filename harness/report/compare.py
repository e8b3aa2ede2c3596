"""Several studies side by side (two models, two hardware targets, two workloads): one table, one figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

import harness.report.figures as F
from harness.report.results import StudyResults

COLUMNS = ["study", "model", "hardware", "workload", "objective", "metric", "label", "unit", "baseline", "baseline_std",
           "winner", "winner_std", "improvement", "outcome", "recommended", "recommended_trial", "winner_trial",
           "confirmed", "trials", "measured", "slo_violated", "failed", "pruned", "interrupted", "device_hours"]


def comparison_table(studies: list[StudyResults]) -> pd.DataFrame:
    """One row per study: baseline vs best value (mean and sd over the confirmation repeats when they ran), the
    relative improvement, trial outcomes and device hours."""
    return pd.DataFrame([s.summary() for s in studies], columns=COLUMNS)


def plot_comparison(studies: list[StudyResults]) -> Figure:
    """Left: baseline vs best trial per study (absolute when every study has the same unit, else relative to its
    own baseline). Right: what the trials of each study came to (measured / SLO missed / failed / pruned)."""
    title = "Studies compared: baseline vs best trial, and what the trials came to"
    if not studies:
        return F.note_figure(title, "No studies to compare.")
    df = comparison_table(studies)
    names = [f"{r.model_short}\n{r.hw} / {r.wl} / {r.obj}" for r in _labels(studies)]
    units = set(df["unit"])
    with F.figure_style():
        fig, (ax1, ax2) = F.plt.subplots(1, 2, figsize=(15, 2.6 + 0.9 * len(studies)),
                                         gridspec_kw={"width_ratios": [1.3, 1]})
        y = np.arange(len(studies))
        if len(units) == 1:
            unit = units.pop()
            ax1.barh(y + 0.2, df["baseline"].fillna(0), 0.38, xerr=df["baseline_std"].fillna(0),
                     color=F.BASELINE_COLOR, alpha=0.8, label="baseline (vLLM defaults)", capsize=3)
            ax1.barh(y - 0.2, df["winner"].fillna(0), 0.38, xerr=df["winner_std"].fillna(0), color=F.COLORS["ok"],
                     label="best trial (confirmation mean ± sd when it ran)", capsize=3)
            labels = set(df["label"])
            ax1.set_xlabel(labels.pop() if len(labels) == 1 else f"Objective, as each study measured it ({unit})")
            ends = df["winner"].fillna(0).to_numpy(dtype=float)
            ax1.set_xlim(0, max(float(np.nanmax(np.r_[ends, df["baseline"].fillna(0)])) * 1.45, 1e-9))
        else:
            imp = df["improvement"].astype(float).fillna(0.0) * 100
            ax1.barh(y, imp, 0.5, color=[F.COLORS["ok"] if v >= 0 else F.COLORS["failed"] for v in imp],
                     label="best trial vs its own baseline")
            ax1.axvline(0, color=F.BASELINE_COLOR, linewidth=1)
            ax1.set_xlabel("Best trial vs its own baseline (%)")
            ends = imp.clip(lower=0).to_numpy(dtype=float)
            ax1.set_xlim(min(0.0, float(imp.min()) * 1.2), max(float(imp.max()) * 1.6, 10.0))
        for yi, (imp_v, verdict) in enumerate(zip(df["improvement"], df["outcome"])):
            text = (f"{imp_v:+.0%}, " if imp_v == imp_v and imp_v is not None else "") + str(verdict)
            ax1.annotate(text, (ends[yi], yi - (0.2 if len(units) == 1 else 0)), textcoords="offset points",
                         xytext=(6, -3), fontsize=9)
        ax1.set_yticks(y, names)
        ax1.invert_yaxis()
        ax1.set_title("Objective: baseline vs best trial", loc="left", fontsize=12)
        legends = [(ax1, 0.01, "lower left", 2)]
        left = np.zeros(len(studies))
        for col, label, color in (("measured", "measured", F.COLORS["ok"]),
                                  ("slo_violated", "of which SLO missed", F.COLORS["slo_violated"]),
                                  ("failed", "failed to run", F.COLORS["failed"]),
                                  ("pruned", "pruned before launch", F.COLORS["pruned"]),
                                  ("interrupted", "interrupted", F.COLORS["interrupted"])):
            vals = df[col].fillna(0).to_numpy(dtype=float)
            if col == "measured":
                vals = vals - df["slo_violated"].fillna(0).to_numpy(dtype=float)
                label = "measured, feasible"
            elif col == "slo_violated":
                label = "measured, SLO missed"
            ax2.barh(y, vals, 0.5, left=left, color=color, label=label)
            left += vals
        for yi, hours in enumerate(df["device_hours"]):
            ax2.annotate(f"{hours:.2f} device-h", (left[yi], yi), textcoords="offset points", xytext=(6, -3),
                         fontsize=9)
        ax2.set_yticks(y, ["" for _ in names])
        ax2.invert_yaxis()
        ax2.set_xlabel("Trials (count)")
        ax2.set_xlim(0, max(left.max() * 1.35, 1))
        ax2.set_title("Trial outcomes", loc="left", fontsize=12)
        legends.append((ax2, 0.99, "lower right", 3))
        for ax, x, loc, ncol in legends:  # below the panels, where they hide no bar
            handles, labels = ax.get_legend_handles_labels()
            fig.legend(handles, labels, loc=loc, bbox_to_anchor=(x, 0.0), ncol=ncol, framealpha=0.9,
                       fontsize=F.RC["legend.fontsize"])
        top = F.header(fig, title, "Device hours: sweep trials only (GPU-hours on GPUs, server-hours on CPU "
                        "hosts). Error bars: sd over the confirmation repeats.")
        fig.tight_layout(rect=(0, 0.85 / fig.get_size_inches()[1], 1, top))
    return F.finish(fig)


class _Label:
    def __init__(self, r: StudyResults) -> None:
        self.model_short = r.parts["model"]
        self.hw, self.wl, self.obj = r.parts["hardware"], r.parts["workload"], r.parts["objective"]


def _labels(studies: list[StudyResults]) -> list[_Label]:
    return [_Label(s) for s in studies]
