"""Review what a sweep found: load studies, draw the review figures, write one report per study.

Public API (what the notebooks use; nothing here parses result files by hand, everything comes from the Optuna
storage the sweep wrote):

    from harness.report import load_studies, load_study, comparison_table, plot_comparison
    studies = load_studies("results")            # a results folder, a study folder, or a storage URL
    s = load_study("results", "tiny-llama@cpu@tiny-cpu@capacity")
    s.table                                      # pandas DataFrame, one row per trial (harness.study.table)
    s.settings_table(), s.failures(), s.summary(), s.curve(trial)
    s.plot_history(), s.plot_pareto(latency="p99_ttft_ms"), s.plot_importances(), s.plot_slices(),
    s.plot_latency_vs_load(), s.plot_memory()    # matplotlib Figures
    s.write_report()                             # <study dir>/report/report.md, report.html and the PNGs
    make_report("results")                       # what `python -m harness.report results` does
"""

from __future__ import annotations

from pathlib import Path

from harness.report.compare import comparison_table, plot_comparison
from harness.report.document import write_report
from harness.report.results import LATENCY_METRICS, THROUGHPUT_METRICS, StudyResults, load_studies, load_study
from harness.study.trials import outcome_of


def make_report(path_or_url: str | Path = "results", *, storage: str | None = None, study: str | None = None,
                out: str | Path | None = None, latency: str | None = None,
                throughput: str | None = None) -> list[Path]:
    """A report for every study with trials (`report.md` paths); studies with no trial yet are skipped."""
    studies = load_studies(path_or_url, storage=storage, study=study)
    paths = []
    for s in studies:
        if not s.trials:
            continue
        target = None if out is None else (Path(out) / s.name.replace("@", "__") if len(studies) > 1 else Path(out))
        paths.append(s.write_report(target, latency=latency, throughput=throughput))
    return paths


__all__ = ["LATENCY_METRICS", "THROUGHPUT_METRICS", "StudyResults", "comparison_table", "load_studies",
           "load_study", "make_report", "outcome_of", "plot_comparison", "write_report"]
