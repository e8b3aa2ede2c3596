"""harness.report: loading studies, figures, report, CLI and bad input, on synthetic studies built through the
Optuna API exactly as `harness.study` stores them (baselines enqueued first, sampled trials, a planner-pruned trial,
a failed:oom launch, an SLO-violating trial, an interrupted one, curves, metrics, a confirmation).

`build_results(root)` is also used by the notebook and dashboard tests; `review_results` prefers the real sweep
(`sweep_results` from conftest, when it exists) and falls back to the synthetic results.
"""

from __future__ import annotations

import re

import json
import math
import random
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any, Callable

import optuna
import pytest

from harness.records import SLO
from harness.study import naming
from harness.study.confirm import Confirmation, Spread
from harness.study.objectives import CapacityObjective, Objective, ParetoObjective
from harness.study.runner import enqueue_baselines, make_sampler, open_study
from harness.study.storage import default_storage
from harness.study.trials import StudyAttr, best_feasible
from harness.study.table import write_table

ROOT = Path(__file__).resolve().parents[1]

CPU_STUDY = "tiny-llama@cpu@tiny-cpu@capacity"
GPU_STUDY = "llama-3-8b@l40sx4@chat-short@capacity"
PARETO_STUDY = "llama-3-8b@l40sx4@chat-short@pareto"
FAILED_STUDY = "mistral-7b@l40sx4@chat-short@capacity"
ALL_STUDIES = sorted([CPU_STUDY, GPU_STUDY, PARETO_STUDY, FAILED_STUDY])

CPU_HW = {"name": "cpu", "count": 0, "memory_gib": 15.6, "arch": "cpu"}
L40S_HW = {"name": "NVIDIA L40S", "count": 4, "memory_gib": 44.5, "arch": "ada"}
TINY_CPU = {"name": "tiny-cpu", "api": "completions", "input_len": {"dist": "uniform", "min": 32, "max": 64},
            "output_len": {"dist": "uniform", "min": 16, "max": 32}, "shared_prefix_len": 0, "ignore_eos": True,
            "seed": 0, "warmup_requests": 2}
CHAT_SHORT = {"name": "chat-short", "api": "chat", "input_len": {"dist": "uniform", "min": 128, "max": 512},
              "output_len": {"dist": "uniform", "min": 64, "max": 256}, "shared_prefix_len": 0, "ignore_eos": True,
              "seed": 0, "warmup_requests": 8}


# ================================================================================================ builder


def _latency(name: str, p50: float, p99: float) -> dict[str, float]:
    return {f"mean_{name}": p50 * 1.1, f"p50_{name}": p50, f"p90_{name}": p50 + 0.7 * (p99 - p50),
            f"p99_{name}": p99}


def _step_metrics(rate: float, cap: float, slo: SLO, io: tuple[float, float], n: int) -> dict[str, Any]:
    """What `Evaluation.summary()` stores for one load step at `rate` on a server whose capacity is `cap`."""
    u = rate / max(cap, 0.1)
    ttft99 = (slo.ttft_ms or 2000.0) * (0.25 + 0.75 * u ** 3)
    tpot99 = (slo.tpot_ms or 100.0) * (0.35 + 0.65 * u ** 2)
    served = min(rate, cap * 1.05) if cap > 0 else rate * 0.6
    out = {"request_throughput": served, "output_throughput": served * io[1],
           "total_token_throughput": served * (io[0] + io[1]), "goodput": served * (0.97 if u <= 1 else 0.4),
           "completed": n, "failed": 0}
    out.update(_latency("ttft_ms", 0.4 * ttft99, ttft99))
    out.update(_latency("tpot_ms", 0.6 * tpot99, tpot99))
    out.update(_latency("itl_ms", 0.55 * tpot99, 1.3 * tpot99))
    out.update(_latency("e2e_ms", 0.4 * ttft99 + io[1] * 0.6 * tpot99, ttft99 + io[1] * tpot99))
    return out


def _capacity_search(cap: float, start: float, steps: int, slo: SLO, io: tuple[float, float],
                     n: int) -> tuple[float, list[dict[str, Any]], dict[str, Any]]:
    """Double, halve, bisect like `harness.study.scoring.capacity_search`; (capacity, curve, metrics at it)."""
    lo = hi = None
    rate = start
    curve = []
    for _ in range(steps):
        ok = rate <= cap
        m = _step_metrics(rate, cap, slo, io, n)
        curve.append({"rate": rate, "ok": ok, **{k: m[k] for k in (
            "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "p50_e2e_ms", "p99_e2e_ms",
            "output_throughput", "goodput")}, "achieved": m["request_throughput"]})
        if ok:
            lo = rate
        else:
            hi = rate
        rate = rate * 2 if hi is None else rate / 2 if lo is None else (lo + hi) / 2
    curve.sort(key=lambda c: c["rate"])
    capacity = lo or 0.0
    at = _step_metrics(capacity or curve[0]["rate"], cap, slo, io, n)
    return capacity, curve, at


class Synth:
    """A deterministic stand-in for `harness.study.evaluate`: settings -> what `record_trial` stores."""

    def __init__(self, name: str, results: Path, objective: Objective, hardware: dict[str, Any],
                 perf: Callable[[dict[str, Any]], float], memory: Callable[[dict[str, Any]], dict[str, Any]],
                 io: tuple[float, float], forced: dict[int, str], prune: Callable[[dict[str, Any]], str | None],
                 prune_reason: str = ""):
        self.name, self.objective, self.hardware = name, objective, hardware
        self.sdir = naming.study_dir(results, name)
        self.perf, self.memory, self.io, self.forced, self.prune = perf, memory, io, forced, prune
        self.prune_reason = prune_reason
        self.rng = random.Random(zlib.crc32(name.encode()))

    def attrs(self, number: int, settings: dict[str, Any]) -> tuple[list[float] | None, dict[str, Any]]:
        obj, label = self.objective, f"trial{number:03d}"
        mem = self.memory(settings)
        gpus = mem["plan"]["gpus_needed"]
        plan = dict(mem["plan"])
        forced = self.forced.get(number)
        reason = self.prune(settings) if forced is None else None
        if forced == "pruned" or reason:
            reason = reason or self.prune_reason
            plan.update(feasible=False, findings=[reason])
            return None, {"constraints": [1.0], "metrics": {"planned_kv_cache_tokens": plan["kv_cache_tokens"]},
                          "records": [], "device_seconds": 0.0, "plan": plan, "outcome": "pruned",
                          "reason": reason}
        if forced and forced.startswith("failed:"):
            kind = forced.split(":", 1)[1]
            message = {
                "oom": "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                       "capacity of 44.52 GiB of which 1.21 GiB is free (gpu_memory_utilization 0.95 leaves no "
                       "room for activations at max_num_seqs 512)",
                "kv_too_small": "ValueError: To serve at least one request with the models's max seq len (8192), "
                                "1.00 GiB KV cache is needed, which is larger than the available KV cache memory "
                                "(0.62 GiB). The estimated maximum model length is 5072.",
                "start_timeout": "the server did not answer /health within 600 s",
            }.get(kind, "the server exited with code 1 during start-up")
            values = [0.0] if len(obj.directions) == 1 else [0.0, math.inf]
            attrs = {"constraints": [1.0], "metrics": {"planned_kv_cache_tokens": plan["kv_cache_tokens"]},
                     "records": [str(self.sdir / "runs" / f"{label}-failure.json")],
                     "device_seconds": round(95.0 * max(gpus, 1), 1), "plan": plan, "outcome": forced,
                     "reason": message}
            if kind == "kv_too_small":
                attrs["max_fitting_len"] = 5072
            return values, attrs
        cap = 0.0 if forced == "slo_violated" and obj.kind == "capacity" else self.perf(settings)
        noise = 1 + self.rng.uniform(-0.03, 0.03)
        measured = {k: v for k, v in mem.items() if k != "plan"}
        measured["kv_cache_tokens"] = int(plan["kv_cache_tokens"] * self.rng.uniform(0.9, 1.02))
        measured["startup_s"] = round(self.rng.uniform(35, 60) if gpus == 0 else self.rng.uniform(60, 140), 1)
        measured["planned_kv_cache_tokens"] = plan["kv_cache_tokens"]
        if obj.kind == "capacity":
            capacity, curve, m = _capacity_search(cap * noise, obj.start_rate, obj.max_steps, obj.slo, self.io,
                                                  obj.num_requests)
            metrics = {**m, **measured, "capacity_rps": capacity, "peak_kv_usage": min(0.99, 0.3 + 0.2 * capacity),
                       "preemptions": 0}
            ok = capacity > 0
            values = [capacity]
            constraints = [0.0 if ok else 1.0]
            attrs: dict[str, Any] = {"curve": curve}
            steps = len(curve)
        else:  # pareto at a fixed concurrency: throughput up with batch size, TPOT up too
            metrics = {**_step_metrics(cap * 0.8, cap, obj.slo, self.io, obj.num_requests), **measured,
                       "peak_kv_usage": 0.7, "preemptions": 0}
            mns = settings.get("max_num_seqs", 256)
            metrics["output_throughput"] = cap * self.io[1] * noise
            metrics["p99_tpot_ms"] = 18 + 0.16 * mns / max(settings.get("tensor_parallel_size", 1), 1) * noise
            if forced == "slo_violated":
                metrics["p99_tpot_ms"] = obj.slo.tpot_ms * 1.6
            constraints = [(metrics["p99_tpot_ms"] - obj.slo.tpot_ms) / obj.slo.tpot_ms]
            ok = constraints[0] <= 0
            values = [metrics["output_throughput"], metrics[obj.latency_metric]]
            attrs = {}
            steps = 1
        attrs.update({"constraints": constraints, "metrics": metrics,
                      "records": [str(self.sdir / "runs" / f"{label}-step{k + 1}.json") for k in range(steps)],
                      "device_seconds": round((measured["startup_s"] + 25.0 * steps) * max(gpus, 1), 1),
                      "plan": plan, "outcome": "ok" if ok else "slo_violated"})
        if not ok:
            attrs["reason"] = "SLO not met: violations " + ", ".join(f"{c:+.2f}" for c in constraints)
        return values, attrs


def _cpu_perf(s: dict[str, Any]) -> float:
    mns = s.get("max_num_seqs", 256)
    mnbt = s.get("max_num_batched_tokens", 2048)
    return (1.1 * min(mns, 24) ** 0.35 * (1.12 if s.get("enable_prefix_caching") else 1.0)
            * {256: 0.8, 512: 1.0, 1024: 1.1, 2048: 1.05}.get(mnbt, 1.0)
            * {32: 1.0, 64: 0.97, 128: 0.9}.get(s.get("block_size", 16), 1.0))


def _cpu_memory(s: dict[str, Any]) -> dict[str, Any]:
    kv = 2_097_152
    return {"rss_peak_mib": 1400 + 9 * s.get("max_num_seqs", 64) + 0.15 * s.get("max_num_batched_tokens", 2048),
            "plan": {"feasible": True, "kv_cache_tokens": kv, "gpus_needed": 0, "weights_gib_per_gpu": 0.03,
                     "decode_roofline_tok_s": None, "findings": []}}


def _gpu_perf(s: dict[str, Any]) -> float:
    tp, reps = s.get("tensor_parallel_size", 1), s.get("replicas", 1)
    mns = s.get("max_num_seqs", 256)
    return (5.0 * reps * tp ** 0.7 * min(mns, 160) ** 0.25 / 160 ** 0.25
            * (1.15 if s.get("kv_cache_dtype") == "fp8" else 1.0)
            * (1.08 if s.get("enable_chunked_prefill", True) else 0.9)
            * {2048: 0.85, 4096: 0.95, 8192: 1.0, 16384: 1.02, 32768: 1.0}.get(s.get("max_num_batched_tokens"), 1.0)
            * (1.25 if s.get("quantization") == "fp8" else 1.0))


def _gpu_memory(s: dict[str, Any]) -> dict[str, Any]:
    tp, reps = s.get("tensor_parallel_size", 1), s.get("replicas", 1)
    gmu = s.get("gpu_memory_utilization", 0.9)
    weights = 15.0 / tp * (0.5 if s.get("quantization") == "fp8" else 1.0)
    per_token = 131072 / tp * (0.5 if s.get("kv_cache_dtype") == "fp8" else 1.0)
    kv = int((gmu * 44.5 - weights - 1.8) * 2 ** 30 / per_token) * reps
    return {"peak_gpu_memory_mib": (gmu * 44.5 + 0.35) * 1024,
            "plan": {"feasible": True, "kv_cache_tokens": kv, "gpus_needed": tp * reps,
                     "weights_gib_per_gpu": round(weights, 2), "decode_roofline_tok_s": 1400.0 * tp * reps,
                     "findings": []}}


def _gpu_prune(s: dict[str, Any]) -> str | None:
    tp, reps = s.get("tensor_parallel_size", 1), s.get("replicas", 1)
    if tp * reps > 4:
        return (f"needs {tp * reps} GPUs (tensor_parallel_size {tp} x replicas {reps}); "
                f"the node has 4")
    return None


def _record(trial: optuna.Trial, attrs: dict[str, Any]) -> None:
    """Like `harness.study.runner.record_trial`: constraints through Optuna (and repeated as a user attribute for
    the dashboard), everything else as user attributes."""
    for i, value in enumerate(attrs["constraints"]):
        trial.set_constraint(f"c{i}", value)
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _run_study(results: Path, storage: optuna.storages.BaseStorage, synth: Synth, space_name: str,
               identity: dict[str, Any], n_trials: int, interrupt: set[int], confirm: str | None,
               baselines: dict[str, dict[str, Any]] | None = None) -> optuna.Study:
    from harness.space import load_space

    space = load_space(space_name).for_model(8192)  # Meta-Llama-3-8B and Mistral-7B-v0.2 plan at 8,192 here
    obj = synth.objective
    study = open_study(synth.name, storage, obj.directions, make_sampler("auto", obj, space, 0, n_trials),
                       identity)
    enqueue_baselines(study, baselines or {"vllm-defaults": dict(space.fixed)})

    def objective(trial: optuna.Trial) -> Any:
        if trial.user_attrs.get("baseline"):
            settings = dict(trial.user_attrs["settings"])
        else:
            settings = space.suggest(trial)
            trial.set_user_attr("settings", settings)
        if trial.number in interrupt:
            raise RuntimeError("worker lost its connection to the storage")  # -> FAIL, like a harness error
        values, attrs = synth.attrs(trial.number, settings)
        _record(trial, attrs)
        if values is None:
            raise optuna.TrialPruned(attrs["reason"])
        return values if len(values) > 1 else values[0]

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study.optimize(objective, n_trials=n_trials, catch=(RuntimeError,))
    winner = best_feasible(study.get_trials())
    if confirm and winner is not None:  # like harness.study.confirm + tune.study_confirmation
        base = next(t for t in study.trials if t.user_attrs.get("baseline") == "vllm-defaults")
        rng = random.Random(7)
        keep = confirm == "kept"
        wv = winner.values[0]
        if obj.kind == "capacity":  # both served the winner's capacity as a fixed Poisson load, scored by goodput
            metric = f"goodput_rps_at_{wv:.3g}_rps"

            def repeat(t: Any) -> dict[str, Any]:
                cap = synth.perf(t.user_attrs["settings"]) * rng.uniform(0.95, 1.05) * (0.7 if keep else 1.0)
                m = _step_metrics(wv, cap, obj.slo, synth.io, obj.num_requests)
                return {**m, "goodput": m["goodput"] * rng.uniform(0.97, 1.0)}

            score = "goodput"
        else:
            metric = "output_throughput"

            def repeat(t: Any) -> dict[str, Any]:
                m = dict(t.user_attrs["metrics"])
                level = base.user_attrs["metrics"]["output_throughput"] if keep else m["output_throughput"]
                m["output_throughput"] = level * rng.uniform(0.95, 1.05)  # kept: the win was noise
                m["p99_tpot_ms"] *= rng.uniform(0.97, 1.03)
                return m

            score = "output_throughput"
        w_metrics, b_metrics = [], []
        for _ in range(3):  # interleaved
            w_metrics.append(repeat(winner))
            b_metrics.append(repeat(base))
        w_runs = [m[score] for m in w_metrics]
        b_runs = [m[score] for m in b_metrics]
        rec = winner.number if min(w_runs) > max(b_runs) and sum(w_runs) > sum(b_runs) else base.number
        verdict = (f"trial #{winner.number} beats the baseline in every repeat ({sum(w_runs) / 3:.4g} vs "
                   f"{sum(b_runs) / 3:.4g} {metric})" if rec == winner.number else
                   f"trial #{winner.number} does not beat the baseline beyond the run-to-run spread; "
                   f"the baseline is kept")
        conf = Confirmation(metric=metric, winner_trial=winner.number, baseline_trial=base.number,
                            winner=Spread(w_runs), baseline=Spread(b_runs), recommended_trial=rec, verdict=verdict,
                            winner_metrics=w_metrics, baseline_metrics=b_metrics)
        assert (rec == base.number) == keep, "synthetic confirmation came out the other way"
        study.set_user_attr(f"confirm:{winner.number}:{base.number}:3", conf.to_dict())
        study.set_user_attr("confirm", conf.to_dict())
        synth.sdir.mkdir(parents=True, exist_ok=True)
        (synth.sdir / "confirm.json").write_text(json.dumps(conf.to_dict(), indent=2))
    write_table(study, synth.sdir)
    return study


def _fast_storage(url: str) -> optuna.storages.RDBStorage:
    """The sweep's kind of storage, without an fsync per attribute (test data only)."""
    from sqlalchemy import event

    storage = optuna.storages.RDBStorage(url)
    storage.engine.dispose()
    event.listen(storage.engine, "connect", lambda conn, _rec: conn.execute("PRAGMA synchronous=OFF"))
    return storage


def build_results(root: Path) -> Path:
    """A results folder with four studies in one studies.db, as `python -m harness.sweep` leaves it."""
    from harness.space import load_space

    results = root / "results"
    storage = _fast_storage(default_storage(results))

    def identity(model: str, space: str, workload: dict[str, Any], obj: Objective, hw: dict[str, Any]) -> dict:
        return {"model": model, "space": load_space(space).to_dict(), "workload": workload,
                "objective": obj.to_dict(), "hardware": hw}

    cpu_obj = CapacityObjective(slo=SLO(ttft_ms=2000, tpot_ms=250, percentile=90), num_requests=24,
                        start_rate=2.0, max_steps=4)
    cpu = Synth(CPU_STUDY, results, cpu_obj, CPU_HW, _cpu_perf, _cpu_memory, (48, 24),
                {3: "pruned", 5: "failed:crash", 7: "slo_violated"}, lambda s: None,
                "the planner's estimate of host memory (weights + 4 GiB KV cache + activations for "
                "max_num_batched_tokens 2048) exceeds the 15.6 GiB this host has")
    _run_study(results, storage, cpu, "cpu-demo", identity("models/tiny-llama", "cpu-demo", TINY_CPU, cpu_obj,
                                                           CPU_HW), 10, {8}, "beats")

    gpu_obj = CapacityObjective(slo=SLO(ttft_ms=2000, tpot_ms=100, percentile=99), num_requests=200,
                        start_rate=2.0, max_steps=5)
    gpu = Synth(GPU_STUDY, results, gpu_obj, L40S_HW, _gpu_perf, _gpu_memory, (320, 160),
                {4: "failed:oom", 6: "slo_violated", 9: "pruned"}, _gpu_prune,
                "KV cache too small: the planner estimates 3,808 tokens per replica at gpu_memory_utilization 0.80, "
                "below max_model_len 8192")
    _run_study(results, storage, gpu, "l40s-4x", identity("meta-llama/Meta-Llama-3-8B-Instruct", "l40s-4x",
                                                          CHAT_SHORT, gpu_obj, L40S_HW), 16, set(), "beats")

    par_obj = ParetoObjective(slo=SLO(tpot_ms=60, percentile=99), concurrency=32, num_requests=200,
                        latency_metric="p99_tpot_ms")
    par = Synth(PARETO_STUDY, results, par_obj, L40S_HW, _gpu_perf, _gpu_memory, (320, 160),
                {5: "failed:oom", 7: "slo_violated", 9: "pruned"}, _gpu_prune)
    _run_study(results, storage, par, "l40s-4x", identity("meta-llama/Meta-Llama-3-8B-Instruct", "l40s-4x",
                                                          CHAT_SHORT, par_obj, L40S_HW), 12, set(), "kept")

    bad_obj = CapacityObjective(slo=SLO(ttft_ms=2000, tpot_ms=100, percentile=99), num_requests=200)
    bad = Synth(FAILED_STUDY, results, bad_obj, L40S_HW, _gpu_perf, _gpu_memory, (320, 160),
                {0: "failed:oom", 1: "pruned", 2: "failed:kv_too_small"}, lambda s: None,
                "weights need 14.5 GiB per GPU at tensor_parallel_size 1, more than gpu_memory_utilization 0.80 of "
                "44.5 GiB leaves after activations")
    _run_study(results, storage, bad, "l40s-4x", identity("mistralai/Mistral-7B-Instruct-v0.2", "l40s-4x",
                                                          CHAT_SHORT, bad_obj, L40S_HW), 4, {3}, None)
    storage.engine.dispose()
    return results


def build_no_trials(root: Path) -> Path:
    """A results folder whose only study was created but never ran a trial (a sweep killed at once)."""
    results = root / "results-empty-study"
    storage = optuna.storages.RDBStorage(default_storage(results))
    optuna.create_study(study_name="tiny-llama@cpu@tiny-cpu@capacity", storage=storage, direction="maximize")
    storage.engine.dispose()
    return results


def build_live(root: Path) -> Path:
    """A study in the middle of a sweep: the baseline finished, the next trial still RUNNING."""
    results = root / "results-live"
    storage = _fast_storage(default_storage(results))
    obj = CapacityObjective(slo=SLO(ttft_ms=2000, tpot_ms=250, percentile=90), num_requests=24,
                    start_rate=2.0, max_steps=4)
    synth = Synth(CPU_STUDY, results, obj, CPU_HW, _cpu_perf, _cpu_memory, (48, 24), {}, lambda s: None)
    from harness.space import load_space

    space = load_space("cpu-demo")
    ident = {"model": "models/tiny-llama", "space": space.to_dict(), "workload": TINY_CPU, "objective": obj.to_dict(),
             "hardware": CPU_HW}
    study = open_study(CPU_STUDY, storage, obj.directions, make_sampler("auto", obj, space, 0, 6), ident)
    enqueue_baselines(study, {"vllm-defaults": dict(space.fixed)})
    trial = study.ask()
    settings = dict(trial.user_attrs["settings"])
    values, attrs = synth.attrs(trial.number, settings)
    _record(trial, attrs)
    study.tell(trial, values[0])
    running = study.ask()
    running.set_user_attr("settings", space.suggest(running))
    storage.engine.dispose()
    return results


# ================================================================================================ fixtures


@pytest.fixture(scope="session")
def synthetic_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_results(tmp_path_factory.mktemp("report"))


def results_for(request: pytest.FixtureRequest, source: str) -> Path:
    """`synthetic`: the studies built here; `sweep`: the real 3-trial CPU sweep from conftest's `sweep_results`
    (skipped until that fixture exists)."""
    if source == "synthetic":
        return request.getfixturevalue("synthetic_results")
    try:
        return Path(request.getfixturevalue("sweep_results"))
    except pytest.FixtureLookupError:
        pytest.skip("conftest provides no `sweep_results` fixture (a real sweep) yet")


@pytest.fixture(params=["synthetic", "sweep"])
def review_results(request: pytest.FixtureRequest) -> Path:
    return results_for(request, request.param)


@pytest.fixture(scope="session")
def studies(synthetic_results: Path) -> dict[str, Any]:
    from harness.report import load_studies

    return {s.name: s for s in load_studies(synthetic_results)}


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harness.report", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"})


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from harness.report.__main__ import main

    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ================================================================================================ loading


def test_load_studies_reads_every_study_and_its_contract(studies: dict[str, Any], synthetic_results: Path) -> None:
    assert sorted(studies) == ALL_STUDIES
    cpu = studies[CPU_STUDY]
    assert cpu.dir == naming.study_dir(synthetic_results.resolve(), CPU_STUDY)
    assert cpu.identity["hardware"]["arch"] == "cpu" and cpu.objective_kind == "capacity"
    assert cpu.confirm is not None and cpu.confirm["recommended_trial"] == cpu.recommended_trial.number
    assert cpu.baseline_trial.number == 0 and cpu.baseline_trial.user_attrs["baseline"] == "vllm-defaults"
    assert {"number", "state", "outcome", "value", "feasible", "reason", "set.max_num_seqs",
            "p99_tpot_ms", "kv_cache_tokens"} <= set(cpu.table.columns)
    c = cpu.counts()
    assert (c["trials"], c["pruned"], c["failed"], c["failed:crash"], c["slo_violated"], c["interrupted"]) == \
        (10, 1, 1, 1, 1, 1)
    assert c["measured"] == c["ok"] + c["slo_violated"]
    imp = cpu.improvement()
    assert imp["winner_n"] == 3 and imp["relative"] == pytest.approx(cpu.confirm["improvement"])
    failures = cpu.failures()
    assert set(failures["outcome"]) == {"pruned", "failed:crash", "slo_violated", "interrupted"}
    assert all(failures["reason"].str.len() > 0)
    curve = cpu.curve(cpu.recommended_trial)
    assert list(curve["rate"]) == sorted(curve["rate"]) and "p99_ttft_ms" in curve
    settings = cpu.settings_table()
    assert settings.set_index("setting").loc["max_num_seqs", "changed"]


def test_load_by_study_dir_db_file_url_and_name(synthetic_results: Path) -> None:
    from harness.report import load_studies, load_study

    one = load_studies(naming.study_dir(synthetic_results, GPU_STUDY))
    assert [s.name for s in one] == [GPU_STUDY]
    assert len(load_studies(synthetic_results / "studies.db")) == len(ALL_STUDIES)
    by_url = load_study(f"sqlite:///{(synthetic_results / 'studies.db').resolve()}", GPU_STUDY)
    assert by_url.dir is None and by_url.name == GPU_STUDY
    assert load_study(synthetic_results, GPU_STUDY.replace("@", "__")).name == GPU_STUDY


@pytest.mark.parametrize("case", ["missing", "empty", "not-results", "ambiguous", "unknown-study", "bad-latency",
                                  "bad-url"])
def test_bad_input_is_one_clear_user_error(case: str, tmp_path: Path, synthetic_results: Path) -> None:
    from harness.errors import UserError
    from harness.report import load_studies, load_study

    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    calls = {
        "missing": (lambda: load_studies(tmp_path / "nope"), "no such file or folder"),
        "empty": (lambda: load_studies(tmp_path / "empty"), "empty"),
        "not-results": (lambda: load_studies(tmp_path / "other"), "no studies.db"),
        "ambiguous": (lambda: load_study(synthetic_results), "name one of"),
        "unknown-study": (lambda: load_study(synthetic_results, "nope@cpu@x@capacity"), "no study"),
        "bad-latency": (lambda: load_study(synthetic_results, CPU_STUDY).plot_pareto(latency="p95_tpot_ms"),
                        "unknown latency metric"),
        "bad-url": (lambda: load_studies("postgresql://u:secret@127.0.0.1:1/nodb"), "cannot open the study storage"),
    }
    call, text = calls[case]
    with pytest.raises(UserError, match=text) as info:
        call()
    assert "\n" not in str(info.value) and "secret" not in str(info.value)


def test_cli_bad_input_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    for args in ([str(tmp_path / "missing")], [str(tmp_path / "empty")], [str(build_no_trials(tmp_path))]):
        code, out, err = _main(capsys, *args)
        assert code == 2, (args, out, err)
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert "has any trial yet" in err


# ================================================================================================ figures


def _text_of(fig: Any) -> str:
    texts = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        texts += [ax.get_title(), ax.get_title(loc="left"), ax.get_xlabel(), ax.get_ylabel()]
        texts += [t.get_text() for t in ax.texts]
        leg = ax.get_legend()
        if leg is not None:
            texts += [t.get_text() for t in leg.get_texts()]
    for leg in fig.legends:
        texts += [t.get_text() for t in leg.get_texts()]
    return "\n".join(texts)


@pytest.mark.parametrize("name", ALL_STUDIES)
def test_every_figure_is_titled_and_its_axes_labelled_with_units(name: str, studies: dict[str, Any]) -> None:
    from matplotlib.figure import Figure

    figs = studies[name].figures()
    assert list(figs) == ["history", "pareto", "importances", "slices", "latency_vs_load", "memory"]
    for fig_name, fig in figs.items():
        assert isinstance(fig, Figure)
        assert fig.texts and fig.texts[0].get_text().strip(), f"{fig_name}: no title"
        if getattr(fig, "harness_note", None):
            assert len(fig.harness_note) > 20  # says why it is empty
            continue
        plotted = [ax for ax in fig.axes if ax.axison and ax.has_data() and not hasattr(ax, "_colorbar")]
        assert plotted, fig_name
        for ax in plotted:  # a label on the axis or on the one it shares (stacked panels, slice panels)
            xs = ax.get_shared_x_axes().get_siblings(ax)
            ys = ax.get_shared_y_axes().get_siblings(ax)
            assert any(a.get_xlabel().strip() for a in xs), f"{fig_name}: unlabelled x axis"
            assert any(a.get_ylabel().strip() for a in ys), f"{fig_name}: unlabelled y axis"
        assert any("(" in ax.get_ylabel() and ")" in ax.get_ylabel() for ax in plotted) or fig_name == \
            "importances", f"{fig_name}: no unit on a y axis"


def test_history_marks_baseline_recommended_failed_and_pruned(studies: dict[str, Any]) -> None:
    s = studies[GPU_STUDY]
    text = _text_of(s.plot_history())
    assert "baseline #0 (vLLM defaults): 5 req/s" in text  # its sweep capacity: the confirmation measured goodput
    assert f"recommended #{s.recommended_trial.number}" in text
    assert "failed to run (oom)" in text and "pruned before launch" in text and "SLO not met" in text
    assert "req/s" in text


def test_pareto_shows_front_baseline_and_lists_failures_with_reasons(studies: dict[str, Any]) -> None:
    s = studies[PARETO_STUDY]
    fig = s.plot_pareto()
    text = _text_of(fig)
    assert "p99 TPOT (ms)" in text and "Output throughput (tok/s)" in text
    assert "Pareto-optimal" in text and "baseline #0" in text and "recommended #0" in text
    assert "SLO not met" in text and "SLO: p99 TPOT <= 60 ms" in text
    assert "failed:oom" in text and "CUDA out of memory" in text and "pruned" in text
    other = _text_of(s.plot_pareto(latency="p99_ttft_ms", throughput="goodput"))
    assert "p99 TTFT (ms)" in other and "Goodput (req/s)" in other


def test_importances_and_slices_use_optuna_and_say_why_when_too_small(studies: dict[str, Any]) -> None:
    from harness.report.figures import importances

    gpu = studies[GPU_STUDY]
    ranks = importances(gpu)
    assert ranks and set(ranks) <= set(gpu.knobs) and sum(ranks.values()) == pytest.approx(1.0)
    slices = gpu.plot_slices(top=2)
    panels = [ax for ax in slices.axes if not hasattr(ax, "_colorbar") and ax.has_data()]
    assert len(panels) == 2 and {ax.get_xlabel().split()[0] for ax in panels} <= set(ranks)
    small = studies[FAILED_STUDY]
    for fig in (small.plot_importances(), small.plot_slices()):
        assert "at least 3 measured trials" in fig.harness_note


def test_latency_vs_load_compares_baseline_and_recommended(studies: dict[str, Any]) -> None:
    cap = _text_of(studies[CPU_STUDY].plot_latency_vs_load())
    assert "baseline #0 (vLLM defaults): p99" in cap and "recommended #" in cap and "SLO limit 250 ms" in cap
    assert "confirmation repeats at" in cap
    assert "request rate (req/s)" in cap
    fixed = _text_of(studies[PARETO_STUDY].plot_latency_vs_load())
    assert "concurrency 32" in fixed and "mean of 3 repeats" in fixed


def test_memory_shows_planned_vs_measured_and_failures(studies: dict[str, Any]) -> None:
    gpu = _text_of(studies[GPU_STUDY].plot_memory())
    assert "Peak memory, busiest GPU (GiB)" in gpu and "memory per GPU: 44.5 GiB" in gpu
    assert "planned by the harness" in gpu and "measured by vLLM" in gpu and "oom" in gpu
    cpu = _text_of(studies[CPU_STUDY].plot_memory())
    assert "Server RSS peak (GiB)" in cpu and "crash" in cpu


def test_live_study_with_a_running_trial(tmp_path: Path) -> None:
    from harness.report import load_study

    s = load_study(build_live(tmp_path))
    assert s.counts()["running"] == 1 and not s.confirmed
    assert s.recommended_trial.number == 0 and s.outcome() == "not confirmed"
    figs = s.figures()
    assert "importances" in figs and figs["importances"].harness_note  # one measured trial: nothing to rank
    path = s.write_report(tmp_path / "out")
    assert "best so far, not confirmed" in path.read_text()
    assert f"writes the recommended settings to `configs/{s.parts['model']}.yaml`" in path.read_text()
    s.study.set_user_attr(StudyAttr.CONFIG, "configs/h200x1/m.yaml")  # the sweep file's configs_dir, as emitted
    assert "writes the recommended settings to `configs/h200x1/m.yaml`" in s.refresh().write_report(
        tmp_path / "out2").read_text()


# ================================================================================================ report


def test_report_files_and_content(studies: dict[str, Any], tmp_path: Path) -> None:
    s = studies[GPU_STUDY]
    md_path = s.write_report(tmp_path / "rep")
    assert md_path == tmp_path / "rep" / "report.md"
    files = {p.name for p in (tmp_path / "rep").iterdir()}
    assert {"report.md", "report.html", "history.png", "pareto.png", "importances.png", "slices.png",
            "latency_vs_load.png", "memory.png"} <= files
    md = md_path.read_text()
    for png in ("history.png", "pareto.png", "memory.png"):
        assert f"]({png})" in md
    assert "beats the baseline in every repeat" in md and "mean ± sd of 3 runs" in md
    assert re.search(r"Goodput at [0-9.]+ req/s offered \(req/s\)", md)
    assert "Poisson load at the best trial's capacity" in md
    assert re.search(r"\| ceiling: the highest throughput any load step served \(SLO or not\) \| [0-9.]+ req/s per GPU "
                     r"\(trial #\d+ on \d GPUs?, at [0-9.]+ req/s per GPU offered: (held|did not hold)", md)
    # a study of absolute values whose winner took 4 GPUs and the baseline 1: said so, with the gain per GPU
    assert "| GPUs on each side | winner on 4 GPUs vs baseline on 1 GPU |" in md
    assert "| improvement over the baseline (unequal GPUs) | +" in md and "worst to best pairing" in md
    assert re.search(r"\| improvement per GPU \| [+-][0-9.]+% \|", md)
    assert "GPU-hours" in md and "16 trials" in md and "pruned before launch" in md
    assert "| `max_num_seqs` |" in md and "**changed**" in md
    assert "CUDA out of memory" in md and "`logs/trial004/`" in md
    assert "optuna-dashboard sqlite:///" in md
    html = (tmp_path / "rep" / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and "<table>" in html


def test_failed_only_study_gets_a_report_that_explains(studies: dict[str, Any], tmp_path: Path) -> None:
    md = studies[FAILED_STUDY].write_report(tmp_path).read_text()
    assert "No trial produced a measurement" in md
    assert md.index("## Failed, pruned") < md.index("## What the tuner tried")
    assert "**oom**" in md and "lower gpu_memory_utilization" in md and "**kv_too_small**" in md
    assert "The estimated maximum model length is 5072" in md and "**interrupted**" in md
    assert "**No figure:**" in md and not (tmp_path / "history.png").exists()


def test_cli_runs_as_a_module_and_honours_latency(synthetic_results: Path, tmp_path: Path) -> None:
    proc = _run_cli(str(synthetic_results), "--study", FAILED_STUDY, "--out", str(tmp_path), "--latency",
                    "p90_ttft_ms")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"{FAILED_STUDY}: {tmp_path / 'report.md'}")
    assert "no trial produced a measurement: the report lists why" in proc.stdout
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    bad = _run_cli(str(synthetic_results), "--latency", "p95_tpot_ms")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr and "Traceback" not in bad.stderr


def test_make_report_writes_one_folder_per_study(synthetic_results: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _err = _main(capsys, str(synthetic_results), "--out", str(tmp_path), "--latency", "p90_ttft_ms")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == len(ALL_STUDIES) and all("report.md" in line for line in lines)
    assert "no trial produced a measurement" in next(line for line in lines if FAILED_STUDY in line)
    md = (tmp_path / CPU_STUDY.replace("@", "__") / "report.md").read_text()
    assert "p90 TTFT (ms)" in md


def test_cli_default_output_goes_into_the_study_dir(synthetic_results: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, _err = _main(capsys, str(naming.study_dir(synthetic_results, CPU_STUDY)))
    assert code == 0
    assert (naming.study_dir(synthetic_results, CPU_STUDY) / "report" / "report.md").exists()
    assert out.startswith(CPU_STUDY)


def test_comparison_table_and_figure(studies: dict[str, Any]) -> None:
    from harness.report import comparison_table, plot_comparison

    chosen = [studies[CPU_STUDY], studies[GPU_STUDY], studies[FAILED_STUDY]]
    df = comparison_table(chosen)
    assert list(df["study"]) == [CPU_STUDY, GPU_STUDY, FAILED_STUDY]
    assert list(df["outcome"]) == ["confirmed win", "confirmed win", "no feasible trial"]
    assert df.loc[0, "improvement"] > 0 and df.loc[1, "device_hours"] > 0
    text = _text_of(plot_comparison(chosen))
    assert "confirmed win" in text and "no feasible trial" in text and "device-h" in text


def test_real_or_synthetic_results_review(review_results: Path, tmp_path: Path) -> None:
    """The API end to end on whatever results are available (the real sweep when conftest provides it)."""
    from harness.report import load_studies, make_report, outcome_of

    found = load_studies(review_results)
    assert found
    for s in found:
        assert len(s.table) == len(s.trials) and s.identity.get("objective") and s.identity.get("space")
        assert all(outcome_of(t) for t in s.trials)
    best = max(found, key=lambda s: s.counts()["measured"])
    paths = make_report(review_results, study=best.name, out=tmp_path)
    assert paths == [tmp_path / "report.md"] and "## Summary" in paths[0].read_text()


if __name__ == "__main__":  # build once by hand: python tests/test_report.py /tmp/somewhere
    print(build_results(Path(sys.argv[1])))


def test_client_limited_repeats_are_marked_invalid_and_left_out_everywhere(synthetic_results: Path,
                                                                           tmp_path: Path) -> None:
    """A confirmation repeat the client limited: the report, the figures and the numbers they draw name it
    'client-limited (invalid)' and leave it out of mean, sd and range."""
    import copy

    from harness.report import load_study
    from harness.report.figures import latency_vs_load

    r = load_study(synthetic_results, GPU_STUDY)
    conf = copy.deepcopy(r.confirm)
    runs = conf["winner"]["runs"]
    conf["winner_metrics"][0]["client_valid"] = False
    w = Spread(runs, [False] + [True] * (len(runs) - 1))
    conf["winner"] = w.to_dict()
    r.confirm = conf
    imp = r.improvement()
    assert imp["winner_invalid"] == [runs[0]] and imp["winner_n"] == len(runs) - 1
    assert imp["winner_mean"] == pytest.approx(sum(runs[1:]) / (len(runs) - 1))
    md = r.write_report(tmp_path / "rep").read_text()
    line = next(ln for ln in md.splitlines() if ln.startswith(f"| best trial #{conf['winner_trial']}"))
    assert "mean ± sd of 2 valid runs" in line and "1 client-limited (invalid) run left out" in line
    assert f"{imp['winner_mean']:.3g}" in line
    text = _text_of(latency_vs_load(r))
    assert "p99 over 2 confirmation repeats" in text and "1 client-limited (invalid) repeat left out" in text
    # every repeat invalid: no number is shown as a server number
    conf["winner"] = Spread(runs, [False] * len(runs)).to_dict()
    for m in conf["winner_metrics"]:
        m["client_valid"] = False
    line = next(ln for ln in r.write_report(tmp_path / "rep2").read_text().splitlines()
                if ln.startswith(f"| best trial #{conf['winner_trial']}"))
    assert "no valid run: 3 client-limited (invalid)" in line and "±" not in line


def test_trials_table_marks_a_client_limited_trial(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from harness.records import ClientCheck
    from harness.study.table import trials_table
    from harness.study.trials import Evaluation, record_trial

    study = optuna.create_study(direction="maximize")
    for valid in (True, False):
        trial = study.ask()
        client = ClientCheck(requested_rate=8.0, achieved_rate=7.0 if not valid else 8.0, dispatch_lag_p99_ms=40.0,
                             client_cpu_percent=20.0, valid=valid,
                             reasons=[] if valid else ["dispatch lag mean 40.0 ms > 14.3 ms"])
        record = SimpleNamespace(metrics=None, memory=None, server=None, startup_s=None, client=client, failure=None)
        ev = Evaluation(settings={"max_num_seqs": 4}, values=[3.0], constraints=[1.0 if not valid else 0.0],
                        record=record, client_reasons=list(client.reasons), values_invalid=not valid)  # type: ignore[arg-type]
        record_trial(trial, ev)
        study.tell(trial, 3.0)
    df = trials_table(study)
    assert list(df["client"]) == ["valid", "client-limited (invalid): dispatch lag mean 40.0 ms > 14.3 ms"]
    assert list(df["outcome"]) == ["ok", "client_limited"]
    assert df["reason"][1].startswith("client-limited (invalid)")


def test_the_cross_check_rows_name_both_tools_and_each_tools_gain() -> None:
    from harness.report.document import _cross_check_rows

    row = {"goodput": 5.0, "ttft_p99": 120.0, "tpot_mean": 8.5}
    cc = {"winner": {"ours": row, "vllm": {**row, "goodput": 4.9}, "rate": 20.0, "requests": 600, "gpus": 1},
          "baseline": {"skipped": "2 servers: vllm bench serve drives one URL"},
          "goodput_gain_per_gpu": {"ours": 0.25, "vllm": None}}
    rows = _cross_check_rows(cc)
    assert rows[0][0] == "vllm bench serve cross-check, winner (600 requests at 20 req/s, 1 GPU(s))"
    assert rows[0][1].startswith("goodput 5 ours / 4.9 vLLM's req/s; p99 TTFT 120 / 120 ms")
    assert rows[1] == ["vllm bench serve cross-check, baseline", "2 servers: vllm bench serve drives one URL"]
    assert rows[2] == ["goodput gain per GPU, by each tool", "+25.0% ours / - vLLM's"]
    assert _cross_check_rows(None) == []
    work = {"ours": {"prompt_tokens": 527631, "output_tokens": 143749},
            "vllm": {"prompt_tokens": 547611, "output_tokens": 142411}}
    other = _cross_check_rows({"winner": {**cc["winner"], "work": work, "same_lengths": False}})[0][1]
    assert other.endswith("; prompt / output tokens 527,631 / 143,749 ours, 547,611 / 142,411 vLLM's "
                          "(other request lengths: not the same work)")
    assert _cross_check_rows({"winner": {**cc["winner"], "work": work, "same_lengths": True}})[0][1].endswith(
        "vLLM's")


def test_settings_rows_show_vllms_defaults_and_mark_only_real_changes() -> None:
    from harness.report.results import settings_rows

    rec = ({"max_num_seqs": 194, "block_size": 16, "enable_prefix_caching": False},
           {"max_num_batched_tokens": 8192, "max_model_len": 32768})
    base = ({}, {"max_num_seqs": 1024, "block_size": 16, "enable_prefix_caching": True,
                 "max_num_batched_tokens": 8192, "max_model_len": 32768})
    rows = {r["setting"]: r for r in settings_rows(rec, base, ["max_num_seqs", "block_size", "enable_prefix_caching",
                                                                "max_num_batched_tokens", "kv_cache_dtype"])}
    assert rows["max_num_seqs"]["baseline"] == "(vLLM default: 1024)" and rows["max_num_seqs"]["changed"]
    assert rows["block_size"]["recommended"] == 16 and not rows["block_size"]["changed"]  # vLLM's own default
    assert rows["enable_prefix_caching"]["baseline"] == "(vLLM default: true)" and rows["enable_prefix_caching"]["changed"]
    assert rows["max_num_batched_tokens"]["recommended"] == "(vLLM default: 8192)"
    assert not rows["max_num_batched_tokens"]["changed"]
    assert rows["kv_cache_dtype"]["baseline"] == "(vLLM default)" and not rows["kv_cache_dtype"]["changed"]
    assert "max_model_len" not in rows  # neither side set it and it is not a knob
    assert settings_rows(None, base, ["max_num_seqs"])[0]["recommended"] is None


def test_a_study_with_settings_fixed_in_every_trial_says_so_and_what_quantized_weights_mean() -> None:
    """The FP8 study's baseline is "vLLM defaults" with FP8 weights: the report's header says what every trial ran
    with and that it changes the model's numerics, not only its settings table."""
    from harness.report.document import _fixed_rows

    rows = dict((k, v) for k, v in _fixed_rows({"quantization": "fp8"}))
    assert "`quantization=fp8`" in rows["fixed in every trial"] and "baselines too" in rows["fixed in every trial"]
    assert "weights quantized (fp8)" in rows["numerics"] and "numerics" in rows["numerics"]
    assert list(dict(_fixed_rows({"kv_cache_dtype": "fp8"}))) == ["fixed in every trial"]
    assert _fixed_rows({}) == []
