"""Trials per hour, sequential vs packed: the same small space swept with `--parallel 1`, then `--parallel N`.

    .venv/bin/python benchmarks/packing.py [--trials 4] [--parallel 2] [--keep DIR]

Each run is a fresh study of the tiny random-weight model (harness.models) on this host's CPU slots: the same space
(max_num_seqs 4 / 8 / 16, enforce_eager, max_model_len 512, a 64 MiB KV cache so vLLM skips its CPU warm-up), the
tiny-cpu workload, a capacity objective of one 8-request load step per trial, no confirmation. Each run is timed
from the first trial's start to the last trial's end (the study's own timestamps), and the whole command as well
(model load, tokenizer, argspec, study set-up). Printed as a table:

- trials/hour: finished trials / study wall time;
- start-up s: mean vLLM server start-up per trial (what packing overlaps);
- capacity: mean measured capacity (req/s) per trial; a packed trial gets fewer cores, so this is what packing
  costs in per-trial speed on a CPU host (and what it does not cost on GPUs, where slots do not share devices).

A measurement, not a test: it starts 2 x trials real vLLM servers (about 1-2 minutes each on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import yaml

STUDY = "tiny@cpu@tiny-cpu@capacity"


def write_sweep(root: Path, model: Path, trials: int) -> Path:
    (root / "space.yaml").write_text(yaml.safe_dump({
        "name": "packing",
        "fixed": {"enforce_eager": True, "max_model_len": 512, "kv_cache_memory_bytes": 64 * 2**20},
        "knobs": {"max_num_seqs": {"type": "categorical", "choices": [4, 8, 16]}}}))
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "models": [{"name": "tiny", "model": str(model)}], "space": str(root / "space.yaml"),
        "workload": "tiny-cpu", "trials": trials, "confirm": {"repeats": 0}, "sampler": "random", "seed": 11,
        "objective": {"kind": "capacity", "slo": {"ttft_ms": 8000, "tpot_ms": 1000, "percentile": 90},
                      "num_requests": 8, "start_rate": 2.0, "max_steps": 1},
        "results_dir": str(root / "results"), "configs_dir": str(root / "configs"), "start_timeout_s": 900}))
    return path


def run(root: Path, model: Path, trials: int, parallel: int) -> dict[str, float]:
    root.mkdir(parents=True, exist_ok=True)
    sweep = write_sweep(root, model, trials)
    load0 = os.getloadavg()[0]
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "harness.sweep", str(sweep), "--parallel", str(parallel)],
                          cwd=root, text=True, capture_output=True)
    command_s = time.monotonic() - t0
    if proc.returncode != 0:
        sys.exit(f"--parallel {parallel} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    study = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{root / 'results' / 'studies.db'}")
    done = [t for t in study.get_trials() if t.state.is_finished() and t.datetime_complete]
    start = min(t.datetime_start for t in done)
    end = max(t.datetime_complete for t in done)
    wall = (end - start).total_seconds()
    metrics = [t.user_attrs.get("metrics", {}) for t in done]
    peak = 0
    for t in done:  # most trials running at one moment
        peak = max(peak, sum(1 for u in done if u.datetime_start <= t.datetime_start < u.datetime_complete))
    return {
        "parallel": parallel, "trials": len(done), "study_s": wall, "command_s": command_s,
        "trials_per_hour": len(done) / wall * 3600, "trials_per_hour_cmd": len(done) / command_s * 3600,
        "startup_s": statistics.mean(m.get("startup_s", float("nan")) for m in metrics),
        "capacity": statistics.mean(t.values[0] for t in done if t.values),
        "peak_concurrent": peak, "load_before": load0, "load_after": os.getloadavg()[0],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=2, help="the packed run's --parallel")
    ap.add_argument("--keep", help="keep the studies under this dir (default: a temp dir, removed)")
    args = ap.parse_args()
    from harness.models import cached_tiny

    model = Path(cached_tiny())
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="vllm-tune-packing-"))
    rows = []
    for parallel in (1, args.parallel):
        print(f"running {args.trials} trials with --parallel {parallel} ...", file=sys.stderr, flush=True)
        rows.append(run(base / f"p{parallel}", model, args.trials, parallel))
    print(f"\n{os.cpu_count()} CPUs (affinity {len(os.sched_getaffinity(0))}), tiny model, {args.trials} trials each\n")
    head = ("--parallel", "trials", "study wall s", "trials/hour", "command s", "trials/hour (cmd)",
            "start-up s", "capacity req/s", "peak concurrent", "load avg before/after")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print(f"| {r['parallel']} | {r['trials']} | {r['study_s']:.0f} | {r['trials_per_hour']:.0f} | "
              f"{r['command_s']:.0f} | {r['trials_per_hour_cmd']:.0f} | {r['startup_s']:.1f} | {r['capacity']:.2f} | "
              f"{r['peak_concurrent']} | {r['load_before']:.1f} / {r['load_after']:.1f} |")
    print(f"\npacked / sequential trials per hour: {rows[1]['trials_per_hour'] / rows[0]['trials_per_hour']:.2f}x "
          f"(study wall), {rows[1]['trials_per_hour_cmd'] / rows[0]['trials_per_hour_cmd']:.2f}x (whole command)")
    if not args.keep:
        import shutil

        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
