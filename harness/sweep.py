"""`python -m harness.sweep [SWEEP.yaml]`: tune every model of a sweep file and commit the winners as configs.

With no argument it runs the embedded demo (tiny local model, CPU-sized space). Rerunning the same command
resumes each study where it stopped; Ctrl-C tears the running server down first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from harness.errors import UserError, main_guard


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", nargs="?", help="sweep file (YAML); omitted: the embedded demo")
    p.add_argument("--storage", help="Optuna storage URL (default: sqlite file under the results dir); "
                                     "postgresql://user:pass@host/db lets several machines share one study")
    p.add_argument("--trials", type=int, help="trials per model (overrides the sweep file)")
    p.add_argument("--parallel", default=None,
                   help="concurrent trials: 'auto' (all GPUs, or 2 CPU slots) or a number (default 1)")
    p.add_argument("--gpu", help="plan for this GPU model instead of the detected one (e.g. L40S)")
    p.add_argument("--num-gpus", type=int, help="plan for this many GPUs")
    p.add_argument("--results-dir", help="where studies, tables and run records go (default results/)")
    p.add_argument("--configs-dir", help="where recommended configs go (default configs/)")
    p.add_argument("--confirm", type=int, help="confirmation repeats for winner and baseline (default 3)")
    p.add_argument("--model", action="append", help="only these models of the sweep file (by name)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each model's plan (feasible share, pruning reasons, baselines, GPU slots, estimated "
                        "GPU time, the exact launch commands) and exit; nothing is started, built or written")
    p.add_argument("--max-minutes", type=float,
                   help="start no new trial after this many minutes (running ones finish), and no confirmation "
                        "that the study's measured start-ups and steps say would end after them; rerun to continue")
    return p.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.plan import detect_hardware
    from harness.study.runner import configure_optuna_logging
    from harness.study.storage import make_storage
    from harness.study.sweepfile import load_sweep
    from harness.study.tune import refuse_infeasible, tune_model

    configure_optuna_logging()

    sweep = load_sweep(args.sweep)
    if args.trials is not None:
        if args.trials < 1:
            raise UserError(f"must be >= 1, got {args.trials}", key="--trials")
        sweep.trials = args.trials
        for m in sweep.models:
            m.trials = None
    if args.results_dir:
        sweep.results_dir = args.results_dir
    if args.configs_dir:
        sweep.configs_dir = args.configs_dir
    if args.confirm is not None:
        sweep.confirm_repeats = args.confirm
    hw = sweep.hardware
    hardware = detect_hardware(args.gpu or hw.get("gpu"), args.num_gpus or hw.get("num_gpus"))
    parallel = _parallel(args.parallel if args.parallel is not None else sweep.parallel, hardware)
    storage = args.storage or sweep.storage or os.environ.get("VLLM_TUNE_STORAGE")
    models = [m for m in sweep.models if not args.model or m.name in args.model]
    if not models:
        raise UserError(f"no model named {args.model}; the sweep has {[m.name for m in sweep.models]}",
                        source=sweep.source, key="--model")
    if args.dry_run:
        from harness.study.dryrun import dry_run

        return dry_run(sweep, models, hardware, parallel, sys.stdout)
    if storage:  # a bad URL, an unreachable host or a wrong password: one line, before anything else
        make_storage(storage).engine.dispose()
    print(f"vllm-tune: {len(models)} model(s) on {hardware.count} x {hardware.name}, parallel {parallel}",
          file=sys.stderr, flush=True)
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise UserError(f"must be > 0, got {args.max_minutes}", key="--max-minutes")
    deadline = None if args.max_minutes is None else time.monotonic() + args.max_minutes * 60
    for entry in models:  # a model no candidate of its space can run on this node stops the sweep before it starts
        refuse_infeasible(sweep, entry, hardware)
    failures = 0
    _stop_servers_on_signals()
    try:
        for entry in models:
            outcome = tune_model(sweep, entry, hardware=hardware, storage_url=storage, parallel=parallel,
                                 deadline=deadline)
            failures += outcome.config_path is None
    except KeyboardInterrupt:
        print("\ninterrupted: servers torn down; run the same command again to resume", file=sys.stderr)
        return 130
    return 1 if failures else 0


def _stop_servers_on_signals() -> None:
    """Ctrl-C or SIGTERM: mark running trials interrupted, stop every server at once (so trials in worker
    threads end in seconds), then unwind the main thread with KeyboardInterrupt. A second signal is ignored."""
    import signal
    import threading

    from harness.launch.server import stop_all
    from harness.study.runner import INTERRUPTED

    def handler(signum: int, frame: object) -> None:
        if INTERRUPTED.is_set():
            return
        INTERRUPTED.set()
        threading.Thread(target=stop_all, name="stop-servers", daemon=True).start()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _parallel(value: str | int, hardware: object) -> int:
    if value in (None, 1, "1"):
        return 1
    count = int(getattr(hardware, "count", 0) or 0)
    is_cpu = getattr(hardware, "arch", "") == "cpu"
    if value == "auto":
        return max(1, count) if not is_cpu else max(1, min(2, (os.cpu_count() or 1)))
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"must be 'auto' or a positive integer, got {value!r}", key="--parallel") from None
    if n < 1:
        raise UserError(f"must be 'auto' or a positive integer, got {value!r}", key="--parallel")
    return n


if __name__ == "__main__":
    sys.exit(main())
