"""Optuna studies: one per (model, hardware, workload, objective), with baselines, constraints and confirmation.

`tune_model` runs one model of a sweep file end to end; the objective classes say what a trial measures; the trial
schema (`trials`) is how a trial is written and read back; `storage` opens the Optuna storage.
"""

from harness.study.confirm import Confirmation
from harness.study.evaluate import StudyContext
from harness.study.objectives import (OBJECTIVES, CapacityObjective, GoodputObjective, LoadSteps, Measurement,
                                      Objective, ParetoObjective, ThroughputObjective, objective_from_dict)
from harness.study.runner import configure_optuna_logging, open_study, run_trials
from harness.study.storage import make_storage, redact
from harness.study.sweepfile import Sweep, load_sweep
from harness.study.table import trials_table, write_table
from harness.study.trials import BASELINE_COMMITTED, BASELINE_DEFAULTS, Attr, Evaluation, Outcome, StudyAttr
from harness.study.tune import ModelOutcome, tune_model

__all__ = ["BASELINE_COMMITTED", "BASELINE_DEFAULTS", "OBJECTIVES", "Attr", "CapacityObjective", "Confirmation",
           "Evaluation", "GoodputObjective", "LoadSteps", "Measurement", "ModelOutcome", "Objective", "Outcome",
           "ParetoObjective", "StudyAttr", "StudyContext", "Sweep", "ThroughputObjective", "configure_optuna_logging",
           "load_sweep", "make_storage", "objective_from_dict", "open_study", "redact",
           "run_trials", "trials_table", "tune_model", "write_table"]
# (the functions `confirm` and `evaluate` are not re-exported: they would hide the modules of the same name)
