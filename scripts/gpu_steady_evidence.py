#!/usr/bin/env python3
"""Steady-state evidence on one GPU, resumable across short commands: vLLM's defaults vs the user's setting for
Mistral-7B (capacity at SLO, ceiling, `vllm bench serve` cross-check) and one vs two DialoGPT servers per GPU.

    python scripts/gpu_steady_evidence.py [--state-dir results/gpu-h200x1] [--deadline-s S] [--only U1,U2]
        [--restore gpu-state.tgz] [--step-s 30] [--print-plan] [--cpu-smoke]

Units, in order (units that share a configuration share one server start within a command):
  build                       random-weight models (harness.models arch mistral-7b / dialogpt-medium) if missing
  mistral-defaults-compare    our client vs `vllm bench serve` on vLLM's defaults (benchmarks/compare_vllm_bench.py)
  mistral-defaults-capacity   steady capacity at SLO of vLLM's defaults (same server as the comparison)
  mistral-user-capacity       the user's setting on one GPU (gpu_memory_utilization 0.9, max_model_len 8192,
                              max_num_batched_tokens 32768)
  dialogpt-1server            one server, gpu_memory_utilization 0.9, max_model_len 1024, chat-short
  dialogpt-2servers           two servers sharing GPU 0 (0.45 each), load round-robin over both

State: every finished unit is written at once (`<state>/<unit>/unit.json`, with capacity.json or compare.json /
compare.md beside it) and skipped on a rerun; a failed unit (classified server failure) is kept as failed and
skipped too, unless `--retry-failed`. A capacity search also saves every step as it finishes
(`<state>/<unit>/steps.json`), so a search cut by the deadline resumes at its next step on a fresh server (the
search is deterministic given its steps' results). `--deadline-s S` starts no unit, server start or load step that
cannot finish before S seconds from the script's start (per-item estimates; `--print-plan` lists them). Every
command ends (also on the deadline, an error, Ctrl-C or SIGTERM) with every server torn down, `<state>/summary.md`
written and, when $OUT is set, `$OUT/gpu-state.tgz` (the state dir; server logs over 1 MB kept as their last 256 KB)
and `$OUT/summary.md`. `--restore TGZ` unpacks an earlier command's tarball into the state dir first.

`--cpu-smoke` maps every unit to the tiny local model on vLLM's CPU build (tiny-cpu workload, enforce_eager, short
steps, low rates, the two servers on separate CPU cores), to run every code path on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.paths import portable  # noqa: E402
from harness.records import SLO  # noqa: E402

UNITS = ("build", "mistral-defaults-compare", "mistral-defaults-capacity", "mistral-user-capacity",
         "dialogpt-1server", "dialogpt-2servers")
LOG_KEEP_BYTES = 1 << 20  # server logs above this travel as their tail
LOG_TAIL_BYTES = 256 << 10
TEARDOWN_S = 30.0  # stopping servers and waiting for the GPU memory to be released
IDLE_WAIT_S = 5.0


def say(msg: str) -> None:
    print(f"[gpu-evidence {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- what runs


@dataclass(frozen=True)
class ModelBuild:
    arch: str  # `python -m harness.models arch NAME` (or "tiny")
    path: str  # relative to the project
    estimate_s: float


@dataclass(frozen=True)
class ServerConfig:
    """One configuration: its servers (one deployment each; several may share a GPU) and the workload."""

    name: str
    label: str  # for the summary
    model: str  # model dir, relative to the project
    workload: str
    deployments: tuple[dict[str, Any], ...]
    slots: tuple[Any, ...]  # harness.launch.placement.Slot or None, one per deployment
    startup_estimate_s: float


@dataclass(frozen=True)
class CompareSpec:
    rates: tuple[float, ...]
    requests: tuple[int, ...]  # per round and client, one per rate
    rounds: int
    input_len: str
    output_len: str
    vllm_client_overhead_s: float  # `vllm bench serve` process start (imports) per round
    clients: tuple[str, ...] = ("ours", "vllm")  # benchmarks/compare_vllm_bench.py --clients

    def rate_estimate_s(self, rate: float, requests: int, drain_s: float) -> float:
        """One rate: every round sends through both clients, then `vllm bench serve`'s process starts again."""
        return self.rounds * (len(self.clients) * (requests / rate + drain_s) + self.vllm_client_overhead_s) + 10.0

    def estimate_s(self, drain_s: float) -> float:
        return sum(self.rate_estimate_s(r, n, drain_s) for r, n in zip(self.rates, self.requests))


@dataclass(frozen=True)
class CapacitySpec:
    start_rate: float
    slo: SLO
    precision: float
    max_steps: int
    expected_e2e_s: float  # a guess for the time estimate only (the search uses measured E2E)


@dataclass(frozen=True)
class Unit:
    name: str
    kind: str  # build | compare | capacity
    config: str | None = None
    compare: CompareSpec | None = None
    capacity: CapacitySpec | None = None


@dataclass(frozen=True)
class Profile:
    """Everything the units need, for the GPU host or for the CPU smoke run."""

    hardware_label: str
    builds: tuple[ModelBuild, ...]
    configs: dict[str, ServerConfig]
    units: tuple[Unit, ...]
    window: Any  # harness.load.window.WindowSpec
    start_timeout_s: float
    drain_guess_s: float = 10.0  # the last requests' E2E after a comparison run's schedule ends
    models_dir: Path = ROOT / "models"

    def model_path(self, name: str) -> Path:
        return self.models_dir / name

    def missing(self, names: set[str] | None = None) -> list[ModelBuild]:
        """Models not built yet (the working tree, or a /tmp that did not survive, may be fresh each command)."""
        return [b for b in self.builds if (names is None or b.path in names)
                and not (self.model_path(b.path) / "config.json").exists()]

    def first_item_s(self, unit: Unit) -> float:
        """What must fit before a unit's server starts: the start and the unit's first resumable item (a
        comparison rate, a capacity step); the rest resumes in a later command."""
        start = self.configs[unit.config].startup_estimate_s + TEARDOWN_S  # type: ignore[index]
        return start + self.item_estimate_s(unit)

    def item_estimate_s(self, unit: Unit) -> float:
        if unit.compare is not None:
            c = unit.compare
            return c.rate_estimate_s(c.rates[0], c.requests[0], self.drain_guess_s)
        assert unit.capacity is not None
        c = unit.capacity
        return self.step_estimate_s(self.window.plan(c.start_rate, c.expected_e2e_s), c.expected_e2e_s)

    def unit(self, name: str) -> Unit:
        return next(u for u in self.units if u.name == name)

    def step_estimate_s(self, plan: Any, expected_e2e_s: float) -> float:
        """One step: idle wait, the schedule, the drain of the last requests (bounded by drain_s)."""
        return IDLE_WAIT_S + plan.send_s + min(plan.drain_s, max(10.0, 2.0 * expected_e2e_s)) + 5.0

    def unit_estimate_s(self, unit: Unit, with_start: bool = True, steps_done: int = 0) -> float:
        """A unit's time at most; `steps_done`: capacity steps a previous command saved (replayed, not measured)."""
        if unit.kind == "build":
            return sum(b.estimate_s for b in self.missing()) or 1.0
        start = (self.configs[unit.config].startup_estimate_s + TEARDOWN_S) if with_start else 0.0  # type: ignore[index]
        if unit.kind == "compare":
            assert unit.compare is not None
            return start + unit.compare.estimate_s(self.drain_guess_s)
        assert unit.capacity is not None
        e2e = unit.capacity.expected_e2e_s
        plan = self.window.plan(unit.capacity.start_rate, e2e)
        steps = max(unit.capacity.max_steps - steps_done, 0)
        return start + steps * self.step_estimate_s(plan, e2e) + 10.0


def make_units(compare: CompareSpec, mistral: CapacitySpec, dialogpt: CapacitySpec,
               dialogpt2: CapacitySpec | None = None) -> tuple[Unit, ...]:
    """The units in their order (UNITS), each with its configuration (`dialogpt2`: the two-server unit's search,
    default `dialogpt`'s)."""
    return (
        Unit("build", "build"),
        Unit("mistral-defaults-compare", "compare", "mistral-compare", compare=compare),
        Unit("mistral-defaults-capacity", "capacity", "mistral-defaults", capacity=mistral),
        Unit("mistral-user-capacity", "capacity", "mistral-user", capacity=mistral),
        Unit("dialogpt-1server", "capacity", "dialogpt-1", capacity=dialogpt),
        Unit("dialogpt-2servers", "capacity", "dialogpt-2", capacity=dialogpt2 or dialogpt),
    )


def gpu_profile(step_s: float) -> Profile:
    from harness.launch.placement import Slot
    from harness.load.window import WindowSpec

    gpu0 = Slot(gpu_ids=(0,))
    slo = SLO(ttft_ms=1000.0, tpot_ms=50.0)
    mistral, dialogpt = "mistral-7b", "dialogpt-medium"
    configs = {
        "mistral-defaults": ServerConfig("mistral-defaults", "vLLM defaults", mistral, "chat-mix", ({},), (gpu0,),
                                         180.0),
        # the comparison sends the same prompts in every round: with the prefix cache on, every run after the
        # first is measured on a warm cache (seen on the H200: the first run's mean TTFT 96 ms, later runs 35-44)
        "mistral-compare": ServerConfig("mistral-compare", "vLLM defaults, prefix caching off", mistral, "chat-mix",
                                        ({"enable_prefix_caching": False},), (gpu0,), 180.0),
        "mistral-user": ServerConfig(
            "mistral-user", "user's setting (one GPU)", mistral, "chat-mix",
            ({"gpu_memory_utilization": 0.9, "max_model_len": 8192, "max_num_batched_tokens": 32768},), (gpu0,), 180.0),
        "dialogpt-1": ServerConfig("dialogpt-1", "1 server, gpu_memory_utilization 0.9", dialogpt, "chat-short",
                                   ({"gpu_memory_utilization": 0.9, "max_model_len": 1024},), (gpu0,), 120.0),
        # servers sharing a GPU start one after another (harness.deploy.deploy_together): two start-ups
        "dialogpt-2": ServerConfig("dialogpt-2", "2 servers on GPU 0, gpu_memory_utilization 0.45 each", dialogpt,
                                   "chat-short", ({"gpu_memory_utilization": 0.45, "max_model_len": 1024},) * 2,
                                   (gpu0, gpu0), 220.0),
    }
    # one rate below the defaults' measured capacity (14.0 req/s at the SLO); the per-chunk-usage body (client
    # `ours-usage`) was measured in the first one-GPU stretch (docs/gpu-results.md) and is left out to save GPU time
    compare = CompareSpec(rates=(12.0,), requests=(150,), rounds=3, input_len="128:2048", output_len="64:512",
                          vllm_client_overhead_s=15.0)
    mcap = CapacitySpec(start_rate=16.0, slo=slo, precision=0.05, max_steps=5, expected_e2e_s=8.0)
    # DialoGPT: the first stretch's brackets stayed open after 4 steps from 32 req/s (one server [69, 135), two
    # [133, 271)); a rerun into a fresh --state-dir starts each near what it held, with 6 steps to close them
    dcap = CapacitySpec(start_rate=64.0, slo=slo, precision=0.05, max_steps=6, expected_e2e_s=2.0)
    dcap2 = CapacitySpec(start_rate=128.0, slo=slo, precision=0.05, max_steps=6, expected_e2e_s=2.0)
    units = make_units(compare, mcap, dcap, dcap2)
    builds = (ModelBuild("mistral-7b", mistral, 60.0), ModelBuild("dialogpt-medium", dialogpt, 30.0))
    return Profile("1x H200", builds, configs, units, WindowSpec(step_s=step_s, warmup_s=10.0, drain_s=60.0),
                   start_timeout_s=600.0)


def cpu_profile(step_s: float) -> Profile:
    """Every unit on the tiny model and vLLM's CPU build: the same code paths, minutes instead of an hour."""
    from harness.launch.placement import Slot
    from harness.load.window import WindowSpec

    tiny = "tiny-llama"
    base = {"enforce_eager": True, "max_model_len": 512}
    slo = SLO(ttft_ms=3000.0, tpot_ms=300.0)
    cores = sorted(os.sched_getaffinity(0))
    halves = (Slot(cpu_cores=tuple(cores[: max(1, len(cores) // 2)])),
              Slot(cpu_cores=tuple(cores[len(cores) // 2:] or cores)))
    configs = {
        "mistral-defaults": ServerConfig("mistral-defaults", "defaults (tiny, CPU)", tiny, "tiny-cpu",
                                         ({"enforce_eager": True, "gpu_memory_utilization": 0.1},), (None,), 90.0),
        "mistral-compare": ServerConfig("mistral-compare", "defaults, prefix caching off (tiny, CPU)", tiny,
                                        "tiny-cpu", ({"enforce_eager": True, "gpu_memory_utilization": 0.1,
                                                      "enable_prefix_caching": False},), (None,), 90.0),
        "mistral-user": ServerConfig("mistral-user", "user-like (tiny, CPU)", tiny, "tiny-cpu",
                                     ({**base, "gpu_memory_utilization": 0.1, "max_num_batched_tokens": 2048},),
                                     (None,), 90.0),
        "dialogpt-1": ServerConfig("dialogpt-1", "1 server (tiny, CPU)", tiny, "tiny-cpu",
                                   ({**base, "gpu_memory_utilization": 0.1},), (None,), 90.0),
        "dialogpt-2": ServerConfig("dialogpt-2", "2 servers, one per half of the cores (tiny, CPU)", tiny,
                                   "tiny-cpu", ({**base, "gpu_memory_utilization": 0.05},) * 2, halves, 120.0),
    }
    compare = CompareSpec(rates=(2.0, 4.0), requests=(8, 16), rounds=1, input_len="32:64", output_len="16:32",
                          vllm_client_overhead_s=40.0)
    cap = CapacitySpec(start_rate=2.0, slo=slo, precision=0.25, max_steps=2, expected_e2e_s=1.0)
    units = make_units(compare, cap, cap)
    return Profile("CPU (vLLM CPU build)", (ModelBuild("tiny", tiny, 30.0),), configs, units,
                   WindowSpec(step_s=step_s, warmup_s=2.0, drain_s=60.0), start_timeout_s=600.0,
                   drain_guess_s=5.0)


# ---------------------------------------------------------------------------------------------- state, deadline


class DeadlineReached(Exception):
    """The next item (server start, unit, load step) would not finish before the deadline."""


@dataclass
class Deadline:
    budget_s: float | None
    t0: float = field(default_factory=time.monotonic)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()

    def require(self, estimate_s: float, what: str) -> None:
        if estimate_s > self.left():
            raise DeadlineReached(f"{what}: needs ~{estimate_s:.0f} s, {max(self.left(), 0):.0f} s left")


@dataclass
class State:
    """The state dir: one folder per unit, `unit.json` written last (atomically) marks it finished."""

    root: Path
    retry_failed: bool = False

    def unit_dir(self, unit: str) -> Path:
        d = self.root / unit
        d.mkdir(parents=True, exist_ok=True)
        return d

    def result(self, unit: str) -> dict[str, Any] | None:
        path = self.root / unit / "unit.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return None

    def steps_path(self, unit: str) -> Path:
        """Where a capacity search keeps its finished steps until the unit is done."""
        return self.root / unit / "steps.json"

    def saved_steps(self, unit: str) -> list[dict[str, Any]]:
        """The capacity steps of an unfinished search, as the last command left them (`steps_path`)."""
        try:
            return json.loads(self.steps_path(unit).read_text())["steps"]
        except (OSError, ValueError, KeyError):
            return []

    def done(self, unit: str) -> bool:
        res = self.result(unit)
        return res is not None and (res.get("status") == "ok" or not self.retry_failed)

    def write_json(self, path: Path, data: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(portable(data), indent=1, default=str))  # no machine paths
        tmp.replace(path)

    def finish(self, unit: str, data: dict[str, Any]) -> None:
        self.write_json(self.unit_dir(unit) / "unit.json", data)


def pack_state(state_dir: Path, out_tgz: Path) -> list[str]:
    """The state dir as a tarball; a log over LOG_KEEP_BYTES travels as its last LOG_TAIL_BYTES (`NAME.tail`),
    the prompt files the comparison writes (rebuilt from their seed) stay behind. Returns what was cut."""
    cut: list[str] = []
    tmp = out_tgz.with_name(out_tgz.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for path in sorted(state_dir.rglob("*")):
            if not path.is_file() or path.name.endswith(".tmp"):
                continue
            rel = path.relative_to(state_dir).as_posix()
            if path.name == "requests.jsonl":
                cut.append(rel)
                continue
            size = path.stat().st_size
            if path.suffix == ".log" and size > LOG_KEEP_BYTES:
                with path.open("rb") as fh:
                    fh.seek(size - LOG_TAIL_BYTES)
                    data = fh.read()
                info = tarfile.TarInfo(rel + ".tail")
                info.size, info.mtime = len(data), int(path.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
                cut.append(rel)
            else:
                tar.add(path, arcname=rel, recursive=False)
    tmp.replace(out_tgz)
    return cut


def restore_state(tgz: Path, state_dir: Path) -> int:
    """Unpack an earlier command's tarball into the state dir (files already there are replaced)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz, "r:gz") as tar:
        members = tar.getmembers()
        tar.extractall(state_dir, filter="data")
    return len(members)


# ---------------------------------------------------------------------------------------------- units


def run_build(profile: Profile, deadline: Deadline, names: set[str] | None = None) -> dict[str, Any]:
    """Build the missing models (all, or `names`); a model already there is kept."""
    built = []
    todo = profile.missing(names)
    for b in profile.builds:
        if b not in todo:
            if names is None or b.path in names:
                built.append({"model": b.path, "built": False})
            continue
        deadline.require(b.estimate_s, f"build {b.path}")
        dest = str(profile.model_path(b.path))
        argv = ([sys.executable, "-m", "harness.models", "tiny", dest] if b.arch == "tiny"
                else [sys.executable, "-m", "harness.models", "arch", b.arch, dest])
        say(f"build: {' '.join(argv[1:])}")
        t0 = time.monotonic()
        proc = subprocess.run(argv, cwd=ROOT, env=_child_env(), capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {b.path} failed: {proc.stderr.strip()[-2000:]}")
        built.append({"model": b.path, "built": True, "seconds": round(time.monotonic() - t0, 1),
                      "output": proc.stdout.strip()})
        say(f"build: {proc.stdout.strip()}")
    return {"status": "ok", "models": built}


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run_compare(unit: Unit, deps: list[Any], state: State, deadline: Deadline, drain_s: float,
                started: str) -> dict[str, Any]:
    """benchmarks/compare_vllm_bench.py against the live server, once per rate; one combined table."""
    spec = unit.compare
    assert spec is not None
    dep = deps[0]
    url, key = dep.group.targets[0]
    udir = state.unit_dir(unit.name)
    per_rate: dict[str, Any] = {}
    md = []
    for rate, n in zip(spec.rates, spec.requests):
        out = udir / f"rate{rate:g}"
        if (out / "done.json").exists():  # finished in an earlier command: the rates resume one by one
            say(f"{unit.name}: rate {rate:g} done earlier, kept")
            per_rate[f"{rate:g}"] = json.loads((out / "compare.json").read_text())
            md += [f"### Poisson {rate:g} req/s", "", (out / "compare.md").read_text().strip(), ""]
            continue
        deadline.require(spec.rate_estimate_s(rate, n, drain_s), f"{unit.name} at {rate:g} req/s")
        argv = [sys.executable, str(ROOT / "benchmarks" / "compare_vllm_bench.py"), "--url", url, "--model", dep.model,
                "--tokenizer", dep.model, "--out", str(out), "--rounds", str(spec.rounds), "--requests", str(n),
                "--rate", str(rate), "--input-len", spec.input_len, "--output-len", spec.output_len, "--seed", "0",
                "--clients", ",".join(spec.clients)]
        env = {**_child_env(), "OPENAI_API_KEY": key}
        say(f"{unit.name}: rate {rate:g} req/s, {n} requests x {spec.rounds} rounds x {len(spec.clients)} clients "
            f"(elapsed {deadline.elapsed():.0f} s)")
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        tail: list[str] = []
        for line in proc.stdout:
            tail = (tail + [line.rstrip()])[-40:]
            if line.startswith("round "):
                say(f"{unit.name}: rate {rate:g}: {line.strip()}")
        if proc.wait() != 0:
            raise RuntimeError(f"compare_vllm_bench.py at rate {rate:g} failed: " + " | ".join(tail[-8:]))
        data = json.loads((out / "compare.json").read_text())
        data["args"].pop("api_key", None)  # a random key of a server that is gone; not worth keeping
        data["args"]["url"] = "(the live server)"
        state.write_json(out / "compare.json", data)
        state.write_json(out / "done.json", {"rate": rate, "requests": n, "rounds": spec.rounds,
                                             "server_started": started})
        per_rate[f"{rate:g}"] = data
        md += [f"### Poisson {rate:g} req/s", "", (out / "compare.md").read_text().strip(), ""]
    state.write_json(udir / "compare.json", {"rates": per_rate})
    (udir / "compare.md").write_text("\n".join(md) + "\n")
    return {"status": "ok", "rates": list(per_rate), "table": "compare.md", "startup_s": [dep.startup_s]}


def _plan_kv(profile: Profile, cfg: ServerConfig, settings: dict[str, Any], workload: Any) -> dict[str, Any]:
    """What harness.plan predicts for one server of the configuration."""
    try:
        from harness.plan import detect_hardware, load_model_facts, plan_candidate

        hw = detect_hardware(None, None)
        plan = plan_candidate(load_model_facts(str(profile.model_path(cfg.model))), hw, settings,
                              longest_request=workload.max_total_tokens())
        return plan.to_dict()
    except Exception as exc:  # noqa: BLE001 - the plan is a comparison figure; a failing planner is reported
        return {"error": f"{type(exc).__name__}: {exc}"}


def _step_summary(s: Any) -> dict[str, Any]:
    from harness.records import to_dict

    m = s.record.metrics
    return {
        "rate": s.rate, "offered_rate": s.offered_rate, "holds": s.holds, "client_limited": s.client_limited,
        "achieved_rate": s.steady.achieved_rate,
        "output_tok_s": m.output_throughput if m is not None else None,
        "p99_ttft_ms": m.ttft_ms.p99 if m is not None and m.ttft_ms else None,
        "p99_tpot_ms": m.tpot_ms.p99 if m is not None and m.tpot_ms else None,
        "completed": m.completed if m is not None else None, "failed": m.failed if m is not None else None,
        "reasons": list(s.steady.reasons), "steady": to_dict(s.steady),
        "metrics": to_dict(m), "server": to_dict(s.record.server), "client": to_dict(s.record.client),
    }


def run_capacity(unit: Unit, deps: list[Any], profile: Profile, state: State, deadline: Deadline,
                 startup: dict[str, Any]) -> dict[str, Any]:
    from harness.load.prompts import build_requests
    from harness.load.tokenizer import load_tokenizer
    from harness.load.workload import load_workload
    from harness.records import RunRecord, from_dict, to_dict
    from harness.study.capacity import search_capacity
    from harness.study.steadysearch import ServerDied, live_measure

    spec = unit.capacity
    assert spec is not None
    cfg = profile.configs[unit.config]  # type: ignore[index]
    udir = state.unit_dir(unit.name)
    steps_path = state.steps_path(unit.name)
    saved = state.saved_steps(unit.name)
    workload = load_workload(cfg.workload)
    tokenizer = load_tokenizer(deps[0].model)

    def requests_for(k: int, n: int) -> list[Any]:
        return build_requests(workload, tokenizer, n, seed=workload.seed + 1000 * (k + 1))

    def before_step(k: int, plan: Any) -> None:
        est = profile.step_estimate_s(plan, spec.expected_e2e_s)
        deadline.require(est, f"{unit.name} step {k + 1}")
        say(f"{unit.name}: step {k + 1} at {plan.rate:.2f} req/s ({plan.requests_needed()} requests, "
            f"~{est:.0f} s; elapsed {deadline.elapsed():.0f} s)")

    def progress(k: int, p: Any) -> None:
        if int(p.elapsed_s) % 10 == 0:
            say(f"{unit.name}: step {k + 1}: sent {p.sent}, completed {p.completed}, failed {p.failed}, "
                f"in flight {p.in_flight}, {p.elapsed_s:.0f}/{p.total_s or 0:.0f} s")

    replay = list(saved)
    last_e2e = None
    for s in replay:
        last_e2e = (s["record"].get("steady") or {}).get("batch_fill_s") or last_e2e
    live = live_measure(deps, workload, requests_for, profile.window, spec.slo, before_step=before_step,
                        first_step=len(replay), expected_e2e_s=last_e2e, progress=progress)
    k = [0]

    def measure(rate: float) -> tuple[Any, Any]:
        i = k[0]
        k[0] += 1
        if i < len(saved) and math.isclose(saved[i]["rate"], rate, rel_tol=1e-9):
            rec = from_dict(RunRecord, saved[i]["record"])
            say(f"{unit.name}: step {i + 1} at {rate:.2f} req/s replayed from {steps_path.name}")
            return rec, rec.steady
        del saved[i:]
        rec, steady = live(rate)
        saved.append({"rate": rate, "record": to_dict(rec), "server_start": startup.get("started")})
        state.write_json(steps_path, {"steps": saved})
        m = rec.metrics
        say(f"{unit.name}: step {i + 1} at {rate:.2f} req/s: {'holds' if steady.holds else 'fails'} "
            f"(offered {steady.offered_rate:.2f}, achieved {steady.achieved_rate:.2f} req/s, "
            f"p99 TTFT {m.ttft_ms.p99 if m and m.ttft_ms else float('nan'):.0f} ms, "
            f"p99 TPOT {m.tpot_ms.p99 if m and m.tpot_ms else float('nan'):.1f} ms"
            + (f"; {'; '.join(steady.reasons)}" if steady.reasons else "") + ")")
        return rec, steady

    try:
        bracket = search_capacity(measure, start_rate=spec.start_rate, precision=spec.precision,
                                  max_steps=spec.max_steps)
    except ServerDied as exc:
        failure = exc.record.failure
        return {"status": "failed", "failure": to_dict(failure), "steps_done": len(saved), **startup}
    steps = [_step_summary(s) for s in bracket.steps]
    ceiling = max(steps, key=lambda s: s["achieved_rate"] or 0.0) if steps else None
    best = next((s for s in steps if s["holds"] and min(s["offered_rate"], s["achieved_rate"]) == bracket.capacity_lo),
                None)
    plan = _plan_kv(profile, cfg, cfg.deployments[0], workload)
    reported = [s["server"].get("kv_cache_tokens") for s in steps if s["server"]]
    n_gpus = len({g for slot in cfg.slots if slot is not None for g in slot.gpu_ids})
    result = {
        "status": "ok", "config": cfg.label, "settings": list(cfg.deployments), "servers": len(cfg.deployments),
        "model": cfg.model, "workload": cfg.workload, "hardware": profile.hardware_label, "gpus": n_gpus,
        "slo": to_dict(spec.slo), "window": to_dict(profile.window),
        "bracket": {"capacity_lo": bracket.capacity_lo, "capacity_hi": bracket.capacity_hi,
                    "converged": bracket.converged, "stopped": bracket.stopped,
                    "limited_by_client": bracket.limited_by_client, "precision": bracket.precision},
        "capacity_per_gpu": bracket.capacity_lo / n_gpus if n_gpus else None,
        "ceiling": {"req_s": ceiling["achieved_rate"], "output_tok_s": ceiling["output_tok_s"],
                    "at_rate": ceiling["offered_rate"]} if ceiling else None,
        "at_capacity": {"p99_ttft_ms": best["p99_ttft_ms"], "p99_tpot_ms": best["p99_tpot_ms"],
                        "output_tok_s": best["output_tok_s"]} if best else None,
        "kv_tokens": {"planned_per_server": plan.get("kv_cache_tokens"),
                      "reported_per_server": reported[-1] if reported else None},
        "plan": plan, "steps": steps, **startup,
    }
    state.write_json(udir / "capacity.json", result)
    return result


# ---------------------------------------------------------------------------------------------- the command


def server_groups(profile: Profile, names: list[str]) -> list[tuple[str | None, list[Unit]]]:
    """Consecutive selected units that share a configuration: one server start each."""
    groups: list[tuple[str | None, list[Unit]]] = []
    for unit in profile.units:
        if unit.name not in names:
            continue
        if groups and unit.config is not None and groups[-1][0] == unit.config:
            groups[-1][1].append(unit)
        else:
            groups.append((unit.config, [unit]))
    return groups


def run_group(profile: Profile, state: State, deadline: Deadline, config: str | None, units: list[Unit]) -> None:
    from harness.deploy import DeployJob, deploy_together
    from harness.launch.server import ServerStartError
    from harness.records import to_dict

    if config is None:  # build: idempotent and cheap when the models are there, so it always runs
        for u in units:
            deadline.require(profile.unit_estimate_s(u), u.name)
            t0 = time.monotonic()
            res = run_build(profile, deadline)
            state.finish(u.name, {**res, "unit": u.name, "seconds": round(time.monotonic() - t0, 1)})
        return
    pending = [u for u in units if not state.done(u.name)]
    for u in units:
        if u not in pending:
            say(f"{u.name}: done earlier ({state.result(u.name).get('status')}), skipped")  # type: ignore[union-attr]
    if not pending:
        return
    cfg = profile.configs[config]
    first = pending[0]
    build_s = sum(b.estimate_s for b in profile.missing({cfg.model}))
    deadline.require(build_s + profile.first_item_s(first), f"start {config} for {first.name}")
    if build_s:  # the model is gone (a fresh host): build it again first
        run_build(profile, deadline, {cfg.model})
    log_root = state.root / "logs" / config / time.strftime("%Y%m%dT%H%M%S")
    model = str(profile.model_path(cfg.model))
    jobs = [DeployJob(model, dict(s), slot, log_root / f"deployment{i}")
            for i, (s, slot) in enumerate(zip(cfg.deployments, cfg.slots))]
    say(f"{config}: starting {len(jobs)} server(s) for {', '.join(u.name for u in pending)} "
        f"(~{cfg.startup_estimate_s:.0f} s; elapsed {deadline.elapsed():.0f} s)")
    t0 = time.monotonic()
    started = time.strftime("%Y-%m-%dT%H:%M:%S")
    try:
        with deploy_together(jobs, start_timeout_s=profile.start_timeout_s) as deps:
            wall = time.monotonic() - t0
            startup = {"startup_s": [round(d.startup_s or 0.0, 1) for d in deps], "startup_wall_s": round(wall, 1),
                       "started": started, "log_dir": log_root.relative_to(state.root).as_posix()}
            say(f"{config}: ready in {wall:.0f} s")
            for u in pending:
                deadline.require(profile.item_estimate_s(u), u.name)  # resumable: its first item must fit
                t1 = time.monotonic()
                try:
                    res = (run_compare(u, deps, state, deadline, profile.drain_guess_s, started) if u.kind == "compare"
                           else run_capacity(u, deps, profile, state, deadline, startup))
                except DeadlineReached:
                    raise
                except Exception as exc:  # noqa: BLE001 - one unit's error must not cost the others
                    dead = next((f for f in (d.dead_server_failure() for d in deps) if f is not None), None)
                    res = {"status": "failed", "error": f"{type(exc).__name__}: {exc}",
                           "failure": to_dict(dead) if dead else None, **startup}
                res.setdefault("startup_s", startup["startup_s"])
                state.finish(u.name, {**res, "unit": u.name, "config": cfg.label, "hardware": profile.hardware_label,
                                      "seconds": round(time.monotonic() - t1, 1)})
                say(f"{u.name}: {res['status']} in {time.monotonic() - t1:.0f} s")
                if res["status"] != "ok" and any(d.dead_server_failure() for d in deps):
                    say(f"{config}: a server died; the configuration's other units are recorded as failed")
                    for rest in pending[pending.index(u) + 1:]:
                        state.finish(rest.name, {**res, "unit": rest.name, "seconds": 0.0})
                    break
    except ServerStartError as exc:
        say(f"{config}: start failed: {exc}")
        for u in pending:
            if not state.done(u.name):
                state.finish(u.name, {"status": "failed", "unit": u.name, "config": cfg.label,
                                      "hardware": profile.hardware_label, "failure": to_dict(exc.failure),
                                      "server_index": exc.index,
                                      "startup_wall_s": round(time.monotonic() - t0, 1)})


# ---------------------------------------------------------------------------------------------- summary


def _fmt(x: Any, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def bracket_verdict(new: dict[str, Any], old: dict[str, Any]) -> str:
    """Compare two capacity brackets [lo, hi) without claiming more than they show: a gain is only a gain when
    one bracket lies wholly above the other, and then it is given as the range the brackets allow."""
    lo_n, hi_n, lo_o, hi_o = (b.get(k) for b in (new, old) for k in ("capacity_lo", "capacity_hi"))
    if not lo_n or not lo_o:
        return f"no comparison (capacity {_fmt(lo_n)} vs {_fmt(lo_o)} req/s)"
    brackets = f"[{_fmt(lo_n)}, {_fmt(hi_n)}) vs [{_fmt(lo_o)}, {_fmt(hi_o)}) req/s at the SLO"
    if hi_o and lo_n >= hi_o:
        top = f"{hi_n / lo_o - 1:+.0%}" if hi_n else "open"
        return f"higher: {brackets}, a gain of at least {lo_n / hi_o - 1:+.0%} and at most {top}"
    if hi_n and hi_n <= lo_o:
        return f"lower: {brackets}"
    return f"no verdict: the brackets overlap ({brackets}; held {lo_n / lo_o - 1:+.0%} higher rate)"


def write_summary(profile: Profile, state: State, names: list[str], notes: list[str]) -> str:
    lines = [f"# Steady-state evidence: {profile.hardware_label}", "",
             "Every number below used one device: " + profile.hardware_label + " (capacities are per GPU: the "
             "servers of a configuration share it). Capacity = the highest steady rate at the SLO (p99 TTFT and "
             "p99 TPOT), bracketed [lo, hi); ceiling = the highest throughput any step sustained, SLO or not.", ""]
    head = ("| unit | config | GPUs | status | capacity lo / hi (req/s) | ceiling req/s / output tok/s | "
            "p99 TTFT / TPOT at capacity (ms) | KV tokens planned / reported (per server) | start-up s | steps |")
    lines += [head, "|---" * 10 + "|"]
    caps: dict[str, dict[str, Any]] = {}
    for unit in profile.units:
        res = state.result(unit.name)
        if unit.kind != "capacity":
            continue
        if res is None:
            saved = len(state.saved_steps(unit.name))
            status = (f"in progress: {saved} of at most {unit.capacity.max_steps} steps saved, resumes at the next"  # type: ignore[union-attr]
                      if saved else "not run") + ("" if unit.name in names else " (not selected)")
            lines.append(f"| {unit.name} | {profile.configs[unit.config].label} | {profile.hardware_label} | "  # type: ignore[index]
                         f"{status} | | | | | | |")
            continue
        caps[unit.name] = res
        b, c, a, kv = res.get("bracket") or {}, res.get("ceiling") or {}, res.get("at_capacity") or {}, res.get(
            "kv_tokens") or {}
        status = res.get("status", "?")
        if status != "ok":
            f = res.get("failure") or {}
            status = f"failed: {f.get('kind', '')} {f.get('message', res.get('error', ''))}".strip()[:160]
        startup = res.get("startup_s")
        startup_txt = " + ".join(_fmt(s, ".0f") for s in startup) if isinstance(startup, list) else _fmt(startup, ".0f")
        lines.append(
            f"| {unit.name} | {res.get('config', '')} | {profile.hardware_label} | {status} | "
            f"{_fmt(b.get('capacity_lo'))} / {_fmt(b.get('capacity_hi'))}"
            f"{'' if b.get('converged', True) else ' (not converged)'} | "
            f"{_fmt(c.get('req_s'))} / {_fmt(c.get('output_tok_s'), '.0f')} | "
            f"{_fmt(a.get('p99_ttft_ms'), '.0f')} / {_fmt(a.get('p99_tpot_ms'), '.1f')} | "
            f"{_fmt(kv.get('planned_per_server'), ',d')} / {_fmt(kv.get('reported_per_server'), ',d')} | "
            f"{startup_txt} | {len(res.get('steps') or [])} |")
    one, two = caps.get("dialogpt-1server"), caps.get("dialogpt-2servers")
    if one and two and one.get("status") == two.get("status") == "ok" and one.get("bracket") and two.get("bracket"):
        lines += ["", "Two servers per GPU vs one: " + bracket_verdict(two["bracket"], one["bracket"])
                  + f" (ceilings {_fmt((two.get('ceiling') or {}).get('req_s'))} vs "
                    f"{_fmt((one.get('ceiling') or {}).get('req_s'))} req/s), {profile.hardware_label} on both sides."]
    d, u = caps.get("mistral-defaults-capacity"), caps.get("mistral-user-capacity")
    if d and u and d.get("status") == u.get("status") == "ok" and d.get("bracket") and u.get("bracket"):
        lines += ["", "User's setting vs vLLM's defaults (Mistral-7B architecture): "
                  + bracket_verdict(u["bracket"], d["bracket"]) + f", {profile.hardware_label} on both sides."]
    comp = state.root / "mistral-defaults-compare" / "compare.md"
    res = state.result("mistral-defaults-compare")
    lines += ["", "## Our client vs `vllm bench serve` (identical requests, live vLLM defaults server, "
                  f"{profile.hardware_label})", ""]
    if comp.exists():
        lines.append(comp.read_text().strip())
    elif res is not None:
        lines.append(f"failed: {res.get('error') or (res.get('failure') or {}).get('message', '')}")
    else:
        lines.append("not run")
    if notes:
        lines += ["", "## This command", ""] + [f"- {n}" for n in notes]
    text = "\n".join(lines) + "\n"
    state.root.mkdir(parents=True, exist_ok=True)
    (state.root / "summary.md").write_text(text)
    return text


def print_plan(profile: Profile, state: State, names: list[str]) -> None:
    from harness.launch.server import Server, ServerSpec
    from harness.launch.placement import replica_placement

    total = 0.0
    print(f"hardware: {profile.hardware_label}; window {profile.window}")
    for config, units in server_groups(profile, names):
        if config is not None:
            cfg = profile.configs[config]
            print(f"\n== configuration {config}: {cfg.label}; model {cfg.model}; workload {cfg.workload}; "
                  f"start ~{cfg.startup_estimate_s:.0f} s")
            for i, (settings, slot) in enumerate(zip(cfg.deployments, cfg.slots)):
                for p in replica_placement(settings, slot):
                    argv = Server(ServerSpec(model=str(profile.model_path(cfg.model)), settings=settings, gpus=p.gpus, env=p.env,
                                             port=8000 + i)).build_argv()
                    argv = [a if not a.startswith("--api-key=") else "--api-key=<random>" for a in argv]
                    env = ({"CUDA_VISIBLE_DEVICES": ",".join(map(str, p.gpus))} if p.gpus is not None else {}) | p.env
                    print(f"   server {i}: env {env}\n     {' '.join(portable(argv[1:]))}")
        for i, u in enumerate(units):
            saved = len(state.saved_steps(u.name))
            est = profile.unit_estimate_s(u, with_start=(i == 0 and config is not None), steps_done=saved)
            done = state.result(u.name)
            total += 0 if done else est
            extra = ""
            if u.capacity is not None:
                c = u.capacity
                extra = (f"start {c.start_rate:g} req/s, SLO p99 TTFT <= {c.slo.ttft_ms:g} ms, p99 TPOT <= "
                         f"{c.slo.tpot_ms:g} ms, precision {c.precision:g}, max {c.max_steps} steps, one step "
                         f"~{profile.step_estimate_s(profile.window.plan(c.start_rate, c.expected_e2e_s), c.expected_e2e_s):.0f} s")
            if u.compare is not None:
                c = u.compare
                extra = (f"rates {c.rates}, requests per round {c.requests}, {c.rounds} rounds, input {c.input_len}, "
                         f"output {c.output_len}")
            print(f"  {u.name}: ~{est:.0f} s{' (server start included)' if i == 0 and config else ''}"
                  f"{' [done: ' + done.get('status', '?') + ']' if done else ''}"
                  f"{f' [{saved} steps saved: resumes at step {saved + 1}]' if saved and not done else ''}  {extra}")
    print(f"\nestimated time of what is left: ~{total:.0f} s ({total / 60:.1f} min)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state-dir", default=None, help="default: results/gpu-h200x1 (CPU smoke: results/runs/gpu-smoke)")
    ap.add_argument("--deadline-s", type=float, default=None, help="start nothing that cannot end by then")
    ap.add_argument("--only", default=None, help=f"comma list of: {', '.join(UNITS)}")
    ap.add_argument("--restore", type=Path, default=None, help="an earlier command's gpu-state.tgz")
    ap.add_argument("--step-s", type=float, default=None, help="measured window per step (GPU 30, CPU smoke 4)")
    ap.add_argument("--models-dir", type=Path, default=None,
                    help="where the random-weight models are built (default: models/ in the project)")
    ap.add_argument("--retry-failed", action="store_true", help="run units recorded as failed again")
    ap.add_argument("--print-plan", action="store_true", help="print each unit's settings and time; start nothing")
    ap.add_argument("--cpu-smoke", action="store_true", help="every unit on the tiny model and vLLM's CPU build")
    args = ap.parse_args(argv)
    names = list(UNITS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    bad = [n for n in names if n not in UNITS]
    if bad:
        ap.error(f"--only: unknown unit {bad[0]!r}; allowed: {', '.join(UNITS)}")
    if args.deadline_s is not None and not args.deadline_s > 0:
        ap.error(f"--deadline-s: got {args.deadline_s!r}; must be seconds > 0")
    deadline = Deadline(args.deadline_s)
    profile = (cpu_profile(args.step_s or 4.0) if args.cpu_smoke else gpu_profile(args.step_s or 30.0))
    if args.models_dir is not None:
        profile = dataclasses.replace(profile, models_dir=args.models_dir.resolve())
    state_dir = Path(args.state_dir or ("results/runs/gpu-smoke" if args.cpu_smoke else "results/gpu-h200x1"))
    if not state_dir.is_absolute():
        state_dir = ROOT / state_dir
    state = State(state_dir, retry_failed=args.retry_failed)
    if args.restore is not None:
        say(f"restored {restore_state(args.restore, state_dir)} entries from {args.restore}")
    state_dir.mkdir(parents=True, exist_ok=True)
    if args.print_plan:
        print_plan(profile, state, names)
        return 0
    from harness.launch.server import stop_all

    try:
        return run_all(profile, state, deadline, names)
    finally:
        stop_all()  # whatever a unit left behind (it also runs at interpreter exit)


def run_all(profile: Profile, state: State, deadline: Deadline, names: list[str],
            run_group_fn: Callable[..., None] = run_group) -> int:
    """Every selected unit in order until the deadline; then summary and pack, whatever happened (the
    deployments' context managers tear their servers down on every way out, SIGTERM included)."""

    def on_term(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = signal.signal(signal.SIGTERM, on_term)
    notes: list[str] = []
    rc = 0
    try:
        for config, units in server_groups(profile, names):
            run_group_fn(profile, state, deadline, config, units)
        notes.append(f"all selected units handled in {deadline.elapsed():.0f} s")
    except DeadlineReached as exc:
        notes.append(f"stopped at the deadline after {deadline.elapsed():.0f} s: {exc}")
        say(notes[-1])
    except KeyboardInterrupt as exc:
        notes.append(f"interrupted after {deadline.elapsed():.0f} s ({exc or 'Ctrl-C'})")
        say(notes[-1])
        rc = 130
    except Exception as exc:  # noqa: BLE001 - the summary and the tarball must still be written
        notes.append(f"error after {deadline.elapsed():.0f} s: {type(exc).__name__}: {exc}")
        say(notes[-1])
        rc = 1
    finally:
        signal.signal(signal.SIGTERM, old)
        left = [n for n in names if not state.done(n)]
        notes.append("left to run: " + (", ".join(left) if left else "nothing"))
        text = write_summary(profile, state, names, notes)
        out = os.environ.get("OUT")
        if out:
            out_dir = Path(out)
            out_dir.mkdir(parents=True, exist_ok=True)
            cut = pack_state(state.root, out_dir / "gpu-state.tgz")
            (out_dir / "summary.md").write_text(text)
            say(f"packed {state.root} into {out_dir / 'gpu-state.tgz'}" + (f" ({len(cut)} files cut)" if cut else ""))
        print(text)
    return rc


if __name__ == "__main__":
    sys.exit(main())
