"""The per-study table: one row per trial with its settings, outcome, metrics and plan, for pandas and people."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Columns: number, state, outcome, baseline, value(s), feasible, reason, `set.<key>` per setting, metric
    columns (throughputs, latency percentiles in ms, memory), planned vs measured KV tokens, timing."""
    rows: list[dict[str, Any]] = []
    n_values = len(study.directions)
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "outcome": ua.get("outcome", t.state.name.lower()),
            "baseline": ua.get("baseline") or "",
        }
        values = t.values if t.state == TrialState.COMPLETE and t.values else [None] * n_values
        for i, v in enumerate(values):
            row["value" if n_values == 1 else f"value{i}"] = None if v is None or math.isinf(v) else v
        constraints = list(t.constraints.values())
        row["feasible"] = bool(constraints) and all(c <= 0 for c in constraints) and t.state == TrialState.COMPLETE
        row["reason"] = ua.get("reason", "")
        for key, value in (ua.get("settings") or {}).items():
            row[f"set.{key}"] = value
        for key, value in (ua.get("metrics") or {}).items():
            row[key] = value
        plan = ua.get("plan") or {}
        for key in ("kv_cache_tokens", "gpus_needed", "weights_gib_per_gpu", "decode_roofline_tok_s"):
            if key in plan:
                row[f"plan.{key}"] = plan[key]
        row["device_seconds"] = ua.get("device_seconds")
        row["datetime_start"] = t.datetime_start.isoformat() if t.datetime_start else None
        row["duration_s"] = t.duration.total_seconds() if t.duration else None
        rows.append(row)
    return pd.DataFrame(rows)


def write_table(study: optuna.Study, directory: Path) -> Path:
    """CSV, so `pandas.read_csv` opens it with no extra dependency."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "trials.csv"
    trials_table(study).to_csv(path, index=False)
    return path
