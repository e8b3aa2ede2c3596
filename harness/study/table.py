"""The per-study table: one row per trial with its settings, outcome, metrics and plan, for pandas and people."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from harness.study.trials import (Attr, baseline_of, capacity_of, client_of, gpus_of, is_feasible, outcome_of,
                                  reason_of, settings_of, startup_of, steady_of)


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """Columns: number, state, outcome, baseline, value(s) (the first per GPU in studies that rank per GPU), feasible,
    reason, client ('valid' or 'client-limited (invalid): why': whether the load client, not the server, set the
    value), gpus (what every `*_per_gpu` column divides by), the capacity bracket and search steps, the steady
    verdict, `set.<key>` per setting, metric columns (throughputs and their per-GPU values, latency percentiles in
    ms, memory), planned vs measured KV tokens, timing: device-seconds, vLLM's start-up phases (`startup.<phase>`,
    seconds) and its compile cache (`compile_cache`: hit / miss / ...)."""
    rows: list[dict[str, Any]] = []
    n_values = len(study.directions)
    for t in study.get_trials(deepcopy=False):
        ua = t.user_attrs
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "outcome": outcome_of(t),
            "baseline": baseline_of(t) or "",
        }
        values = t.values if t.state == TrialState.COMPLETE and t.values else [None] * n_values
        for i, v in enumerate(values):
            row["value" if n_values == 1 else f"value{i}"] = None if v is None or math.isinf(v) else v
        row["feasible"] = is_feasible(t)
        row["reason"] = reason_of(t)
        row["client"] = client_of(t)
        row["gpus"] = gpus_of(t)
        cap = capacity_of(t)
        if cap:
            row["capacity_lo"], row["capacity_hi"] = cap.get("capacity_lo"), cap.get("capacity_hi")
            row["capacity_converged"], row["capacity_stopped"] = cap.get("converged"), cap.get("stopped")
            row["limited_by_client"] = cap.get("limited_by_client")
            row["search_steps"] = " ".join(f"{s['offered']:.3g}:{'ok' if s['holds'] else 'no'}"
                                           for s in cap.get("steps") or [])
        steady = steady_of(t)
        if steady:
            row["steady_holds"] = steady.get("holds")
            row["steady_reason"] = "; ".join(steady.get("reasons") or [])
        for key, value in settings_of(t).items():
            row[f"set.{key}"] = value
        for key, value in (ua.get(Attr.METRICS) or {}).items():
            row[key] = value
        plan = ua.get(Attr.PLAN) or {}
        for key in ("kv_cache_tokens", "gpus_needed", "weights_gib_per_gpu", "decode_roofline_tok_s"):
            if key in plan:
                row[f"plan.{key}"] = plan[key]
        row["device_seconds"] = ua.get(Attr.DEVICE_SECONDS)
        phases = startup_of(t)
        if phases is not None:  # vLLM's start-up phases (seconds) and whether its compile cache was hit
            for f in dataclasses.fields(phases):
                if f.name != "total_s":  # the metrics' startup_s
                    key = f.name if f.name.startswith("compile_cache") else f"startup.{f.name}"
                    row[key] = getattr(phases, f.name)
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
