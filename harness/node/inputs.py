"""Everything a node plan reads: the sweep file (with its `traffic:`) and the per-model studies already measured.

All study reading is here, behind `measured_candidates`, so the attribute names of today's trials (settings,
outcome, capacity value, replicas) live in one place next to the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.node.traffic import ModelTraffic, parse_traffic
from harness.records import SLO, to_dict
from harness.study.sweepfile import ModelEntry, Sweep, parse_sweep
from harness.yamlfile import read_yaml


@dataclass
class NodeInputs:
    sweep: Sweep
    traffic: list[ModelTraffic]  # in sweep order

    def entry(self, name: str) -> ModelEntry:
        return next(m for m in self.sweep.models if m.name == name)


def load_inputs(path: str | Path) -> NodeInputs:
    """The sweep file and its traffic block; one-line UserErrors for either."""
    raw = read_yaml(path, "sweep")
    sweep = parse_sweep(raw, str(path))
    traffic = parse_traffic(raw.get("traffic"), [(m.name, m.model) for m in sweep.models], sweep.objective.slo,
                            sweep.workload, str(path))
    return NodeInputs(sweep, traffic)


@dataclass(frozen=True)
class Measured:
    """A study's best feasible trial for one GPU count per server."""

    study: str
    trial: int
    gpus: int  # per server: tensor x pipeline parallel
    capacity_rps: float  # per server: the trial's capacity divided by its replicas (with servers_per_gpu N, of the N
    #                      servers sharing the GPU set together: what the trial measured on that GPU set)
    replicas_measured: int
    settings: dict[str, Any]  # the trial's settings without `replicas` (`servers_per_gpu` kept: instances repeat it)


def storage_for(results_dir: str | Path, storage: str | None) -> str | None:
    """The study storage to read: the given URL, or results_dir/studies.db when that file exists (never created)."""
    if storage:
        return storage
    path = Path(results_dir) / "studies.db"
    return f"sqlite:///{path.resolve()}" if path.is_file() else None


def measured_candidates(storage: str | None, study_name: str, slo: SLO, results_dir: str | Path = "results"
                        ) -> tuple[list[Measured], str]:
    """Best measured candidate per GPU count from the capacity study `study_name`, and a note on what was used.

    Used only when the study scored capacity at the same SLO as this model's target: a capacity at another SLO is
    another number.
    """
    if storage is None:
        return [], f"no measured study (no {Path(results_dir) / 'studies.db'})"
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:
        return [], f"no study {study_name}"
    except Exception as exc:  # an unreachable or unreadable storage: say so, plan from the estimate
        raise UserError(f"cannot read the study storage: {str(exc).splitlines()[0]}", key="--storage") from None
    objective = study.user_attrs.get("objective") or {}
    if objective.get("kind") != "capacity":
        return [], f"study {study_name} scored {objective.get('kind', '?')}, not capacity at SLO"
    if _slo_dict(objective.get("slo")) != _slo_dict(to_dict(slo)):
        return [], f"study {study_name} measured capacity at another SLO ({objective.get('slo')})"
    best: dict[int, Measured] = {}
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        ua = t.user_attrs
        if ua.get("outcome") != "ok" or not t.values or t.values[0] <= 0:
            continue
        settings = dict(ua.get("settings") or {})
        replicas = int(settings.pop("replicas", 1) or 1)
        gpus = int(settings.get("tensor_parallel_size", 1) or 1) * int(settings.get("pipeline_parallel_size", 1) or 1)
        # the absolute capacity of what was measured (trial values are per GPU since studies rank per GPU)
        absolute = (ua.get("metrics") or {}).get("capacity_rps")
        absolute = float(absolute) if isinstance(absolute, (int, float)) and absolute > 0 else float(t.values[0])
        m = Measured(study_name, t.number, gpus, absolute / replicas, replicas, settings)
        if gpus not in best or m.capacity_rps > best[gpus].capacity_rps:
            best[gpus] = m
    if not best:
        return [], f"study {study_name} has no feasible trial yet"
    return [best[g] for g in sorted(best)], f"study {study_name}"


def _slo_dict(d: Any) -> dict[str, Any]:
    d = dict(d or {})
    return {k: (float(v) if v is not None else None) for k, v in sorted(d.items())}
