"""A sweep file: which models, which space, which workload, which objective, how many trials.

The embedded default (`DEMO_SWEEP`) is what `python -m harness.sweep` runs with no argument: the tiny local
model on whatever vLLM is installed, small enough for a 2-core laptop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.emit import model_slug
from harness.errors import UserError
from harness.records import parse_slo
from harness.settings import check_harness_values
from harness.study.capacity import check_growth, validate_steady_keys
from harness.study.objectives import OBJECTIVES, WINDOW_KEYS, Objective
from harness.study.trials import BASELINE_COMMITTED, BASELINE_DEFAULTS
from harness.yamlfile import check_keys, positive, read_yaml

SWEEP_KEYS = ("models", "space", "workload", "objective", "trials", "confirm", "hardware", "storage", "results_dir",
              "configs_dir", "start_timeout_s", "parallel", "sampler", "seed",
              "traffic")  # traffic: the node plan's expected load per model (harness.node.traffic)
MODEL_KEYS = ("name", "model", "model_name", "build", "fixed", "trials", "workload", "baselines")
OBJECTIVE_KEYS = ("kind", "slo", "concurrency", "rate", "arrival", "burstiness", "num_requests", "duration_s",
                  "start_rate", "max_steps", "growth", "latency_metric", "min_rate", *WINDOW_KEYS)


@dataclass
class ModelEntry:
    name: str  # slug: configs/<name>.yaml
    model: str  # hub name or local path
    build: str | None = None  # "tiny" or an architecture name: build a random-weight model there if missing
    model_name: str | None = None  # what the emitted config names (e.g. the hub name a local stand-in copies)
    fixed: dict[str, Any] = field(default_factory=dict)  # per-model settings on top of the space's fixed ones
    trials: int | None = None
    workload: str | None = None  # this model's workload instead of the sweep's (a model of short context)
    # named baselines measured first, beside vLLM's defaults and the committed config (e.g. the user's setting)
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Sweep:
    source: str
    models: list[ModelEntry]
    space: str
    workload: str
    objective: Objective
    trials: int = 12
    confirm_repeats: int = 3
    confirm_cross_check: bool = False  # confirm.cross_check: both sides once more through `vllm bench serve`
    hardware: dict[str, Any] = field(default_factory=dict)  # {gpu: L40S, num_gpus: 4} to plan for another node
    storage: str | None = None
    results_dir: str = "results"
    configs_dir: str = "configs"
    start_timeout_s: float = 600.0
    parallel: str | int = 1
    sampler: str = "auto"  # auto (TPE, NSGA-II for pareto) | tpe | nsga2 | grid | random
    seed: int = 0


DEMO_SWEEP: dict[str, Any] = {
    "models": [{"name": "tiny-llama", "model": "models/tiny-llama", "build": "tiny"}],
    "space": "cpu-demo",
    "workload": "tiny-cpu",
    # Sized for 2 cores: the server runs on core 1 and the load client on core 0 (harness.launch.placement). There
    # vLLM's defaults served the tiny model at 64 req/s within the SLO (p90 TTFT 98 ms; 128 req/s broke it) with the
    # client's dispatch lag under 1 ms. 10 s windows (a GPU study uses 60 s): with warm-up and tail a step lasts
    # ~15 s on 2 cores, so a search of up to 5 steps to 10% stays near a minute and a quarter.
    "objective": {"kind": "capacity", "slo": {"ttft_ms": 250, "tpot_ms": 40, "percentile": 90},
                  "step_s": 10, "warmup_s": 2, "precision": 0.1, "start_rate": 8.0, "max_steps": 5},
    "trials": 6,
    "confirm": {"repeats": 3},
}


def parse_objective(data: Any, source: str) -> Objective:
    if data is None:
        data = {}
    if isinstance(data, str):
        data = {"kind": data}
    if not isinstance(data, dict):
        raise UserError(f"must be a mapping with 'kind' (one of {list(OBJECTIVES)})", source=source, key="objective")
    check_keys(data, OBJECTIVE_KEYS, source, "objective")
    kind = data.get("kind", "capacity")
    if kind not in OBJECTIVES:
        raise UserError(f"kind {kind!r} is not one of {list(OBJECTIVES)}", source=source, key="objective.kind")
    cls = OBJECTIVES[kind]
    defaults = cls()
    window_given = [k for k in WINDOW_KEYS if k in data]
    if cls.windowed:
        if "num_requests" in data:
            raise UserError("capacity steps are time windows now: the request count follows from rate x step_s; "
                            "remove num_requests and set step_s (seconds, default 60)", source=source,
                            key="objective.num_requests")
        try:
            validate_steady_keys({k: data[k] for k in window_given})
        except UserError as exc:
            raise UserError(str(exc).split(": ", 1)[-1], source=source, key=f"objective.{exc.key}") from None
    elif window_given:
        raise UserError(f"{window_given[0]} shapes time-window steps, which only the capacity objective measures "
                        f"(kind {kind!r} measures one request-count load)", source=source,
                        key=f"objective.{window_given[0]}")
    window = {k: data.get(k, getattr(defaults, k)) for k in WINDOW_KEYS}
    obj = cls(**window,
        slo=parse_slo(data.get("slo"), source),
        concurrency=positive(data.get("concurrency"), source, "objective.concurrency", integer=True),
        rate=positive(data.get("rate"), source, "objective.rate"),
        burstiness=positive(data.get("burstiness", 1.0), source, "objective.burstiness"),
        num_requests=positive(data.get("num_requests", defaults.num_requests), source, "objective.num_requests",
                              integer=True),
        duration_s=positive(data.get("duration_s"), source, "objective.duration_s"),
        start_rate=positive(data.get("start_rate", defaults.start_rate), source, "objective.start_rate"),
        min_rate=positive(data.get("min_rate", defaults.min_rate), source, "objective.min_rate"),
        max_steps=positive(data.get("max_steps", defaults.max_steps), source, "objective.max_steps", integer=True),
        growth=_growth(data.get("growth", defaults.growth), source),
        latency_metric=str(data.get("latency_metric", defaults.latency_metric)))
    obj.check(source)
    return obj


def _growth(value: Any, source: str) -> float:
    try:
        check_growth(value)
    except UserError as exc:
        raise UserError(str(exc).split(": ", 1)[-1], source=source, key="objective.growth") from None
    return float(value)


RESERVED_BASELINES = (BASELINE_DEFAULTS, BASELINE_COMMITTED)  # queued by every study


def parse_baselines(data: Any, source: str, key: str) -> dict[str, dict[str, Any]]:
    """`baselines: {label: {setting: value, ...}}`: settings a study measures first, labelled in every table."""
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(v, dict) and v for v in data.values()):
        raise UserError("must be a mapping of label -> settings, like {user-setting: {max_model_len: 8192}}",
                        source=source, key=key)
    for label in data:
        if not isinstance(label, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", label) \
                or label in RESERVED_BASELINES:
            raise UserError(f"label {label!r} must be lower-case letters, digits, '.', '_' or '-', and not one of "
                            f"{list(RESERVED_BASELINES)} (those are queued already)", source=source, key=key)
        check_harness_values(data[label], source, f"{key}.{label}")
    return {str(k): dict(v) for k, v in data.items()}


def parse_sweep(data: Any, source: str) -> Sweep:
    if not isinstance(data, dict):
        raise UserError(f"a sweep file is a mapping with keys {list(SWEEP_KEYS)}", source=source)
    check_keys(data, SWEEP_KEYS, source, None)
    models_data = data.get("models")
    if not isinstance(models_data, list) or not models_data:
        raise UserError("must be a non-empty list of models (hub names, local paths, or mappings with 'model')",
                        source=source, key="models")
    models = []
    for i, entry in enumerate(models_data):
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise UserError("each model is a hub name, a path, or a mapping with 'model'", source=source,
                            key=f"models[{i}]")
        check_keys(entry, MODEL_KEYS, source, f"models[{i}]")
        if isinstance(entry.get("fixed"), dict):
            check_harness_values(entry["fixed"], source, f"models[{i}].fixed")
        models.append(ModelEntry(name=str(entry.get("name") or model_slug(str(entry["model"]))),
                                 model=str(entry["model"]), build=entry.get("build"),
                                 model_name=entry.get("model_name"),
                                 fixed=dict(entry.get("fixed") or {}),
                                 trials=positive(entry.get("trials"), source, f"models[{i}].trials", integer=True),
                                 workload=entry.get("workload"),
                                 baselines=parse_baselines(entry.get("baselines"), source, f"models[{i}].baselines")))
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise UserError(f"model names repeat: {names}", source=source, key="models")
    for key in ("space", "workload"):
        if not isinstance(data.get(key), str):
            raise UserError(f"'{key}' is required: a shipped name or a file path", source=source, key=key)
    confirm = data.get("confirm") or {}
    if not isinstance(confirm, dict):
        raise UserError("must be a mapping like {repeats: 3}", source=source, key="confirm")
    check_keys(confirm, ("repeats", "cross_check"), source, "confirm")
    repeats = confirm.get("repeats", 3)
    if not isinstance(repeats, int) or repeats < 0:
        raise UserError(f"repeats must be an integer >= 0, got {repeats!r}", source=source, key="confirm.repeats")
    cross_check = confirm.get("cross_check", False)
    if not isinstance(cross_check, bool):
        raise UserError(f"got {cross_check!r}; must be true or false", source=source, key="confirm.cross_check")
    hardware = data.get("hardware") or {}
    if not isinstance(hardware, dict):
        raise UserError("must be a mapping like {gpu: L40S, num_gpus: 4}", source=source, key="hardware")
    check_keys(hardware, ("gpu", "num_gpus"), source, "hardware")
    sampler = data.get("sampler", "auto")
    if sampler not in ("auto", "tpe", "nsga2", "grid", "random"):
        raise UserError(f"sampler {sampler!r} is not one of ['auto', 'tpe', 'nsga2', 'grid', 'random']",
                        source=source, key="sampler")
    parallel = data.get("parallel", 1)
    if parallel != "auto" and not (isinstance(parallel, int) and parallel >= 1):
        raise UserError(f"parallel must be 'auto' or an integer >= 1, got {parallel!r}", source=source,
                        key="parallel")
    return Sweep(source=source, models=models, space=data["space"], workload=data["workload"],
                 objective=parse_objective(data.get("objective"), source),
                 trials=positive(data.get("trials", 12), source, "trials", integer=True),
                 confirm_repeats=repeats, confirm_cross_check=cross_check, hardware=hardware, storage=data.get("storage"),
                 results_dir=str(data.get("results_dir", "results")),
                 configs_dir=str(data.get("configs_dir", "configs")),
                 start_timeout_s=positive(data.get("start_timeout_s", 600.0), source, "start_timeout_s"),
                 parallel=parallel, sampler=sampler, seed=int(data.get("seed", 0)))


def load_sweep(path: str | Path | None) -> Sweep:
    """Read a sweep file, or the embedded demo when `path` is None."""
    if path is None:
        return parse_sweep(DEMO_SWEEP, "<embedded demo sweep>")
    return parse_sweep(read_yaml(path, "sweep"), str(path))
