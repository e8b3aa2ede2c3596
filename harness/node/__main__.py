"""python -m harness.node: split a node's GPUs between the models of a sweep file for their expected traffic.

    python -m harness.node sweeps/l40s.yaml                           # the GPUs here (NVML), else the sweep's hardware
    python -m harness.node sweeps/l40s.yaml --gpu L40S --num-gpus 4   # plan for a node that is not this machine
    python -m harness.node sweeps/l40s.yaml --topology "0,1;2,3" --out configs/node.yaml
    python -m harness.node sweeps/l40s.yaml --confirm --user-config their.yaml   # measure it here, and theirs

Prints each model's capacity table and the plan, and writes the plan in the user's `vllm_instances:` format.
With --confirm every instance starts at once on this machine (GPUs, or core sets on vLLM's CPU build) under every
model's target traffic; a plan that misses a model's SLO there is written as NODE.not-recommended.yaml instead.
Exit status: 0 when every model meets its target (and, with --confirm, its SLO), 1 when some cannot (the plan is
still written), 2 for bad input.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path
from typing import Any, Sequence

from harness.errors import UserError, main_guard


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.node", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", help="sweep file with models and traffic")
    p.add_argument("--gpu", help="plan for this GPU model (e.g. L40S) instead of the GPUs detected here")
    p.add_argument("--num-gpus", type=int, help="plan for this many GPUs")
    p.add_argument("--topology", help="GPU groups that share a PCIe switch / NUMA node, e.g. '0,1;2,3' "
                                      "(default: NVML on this machine, unknown with --gpu)")
    p.add_argument("--out", default="configs/node.yaml", help="where to write the plan (default: %(default)s)")
    p.add_argument("--results-dir", help="where the studies are (default: the sweep's results_dir)")
    p.add_argument("--storage", help="Optuna storage URL of the studies (default: RESULTS_DIR/studies.db)")
    p.add_argument("--confirm", action="store_true",
                   help="start every instance of the plan together and measure it under the mixed traffic")
    p.add_argument("--user-config", metavar="PATH",
                   help="with --confirm: the user's own layout (vllm_instances: model_name, settings, gpu_devices), "
                        "measured the same way on the same node, side by side")
    p.add_argument("--window", type=float, default=300.0, metavar="S",
                   help="with --confirm: the measured window in seconds (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=60.0, metavar="S",
                   help="with --confirm: warm-up before the window in seconds (default: %(default)s)")
    p.add_argument("--start-timeout", type=float, metavar="S",
                   help="with --confirm: seconds a server may take to start (default: the sweep's start_timeout_s)")
    return p


@main_guard
def main(argv: Sequence[str] | None = None) -> int:
    from harness.node.build import build_plan
    from harness.node.emit import write_node_config
    from harness.node.inputs import load_inputs

    args = _parser().parse_args(argv)
    if args.user_config and not args.confirm:
        raise UserError("compares the user's layout with the plan under --confirm; add --confirm", key="--user-config")
    for key, value in (("--window", args.window), ("--warmup", args.warmup), ("--start-timeout", args.start_timeout)):
        if value is not None and not value > 0 and not (key == "--warmup" and value == 0):
            raise UserError(f"must be a number of seconds > 0, got {value}", key=key)
    inputs = load_inputs(args.sweep)
    if args.results_dir:
        inputs.sweep.results_dir = args.results_dir
    hw = _hardware(args, inputs.sweep.hardware, args.sweep)
    topology = _topology(args, hw)
    plan = build_plan(inputs, hw, topology, storage=args.storage)
    print_plan(plan, sys.stdout)
    argspec = _argspec()
    conf = None
    out = Path(args.out)
    if args.confirm:
        from harness.node.confirm import confirm_plan, print_confirmation
        from harness.node.emit import not_recommended_path

        conf = confirm_plan(plan, results_dir=Path(inputs.sweep.results_dir),
                            user_config=Path(args.user_config) if args.user_config else None,
                            duration_s=args.window, warmup_s=args.warmup,
                            start_timeout_s=args.start_timeout or inputs.sweep.start_timeout_s)
        print_confirmation(conf, sys.stdout)
        if not conf.recommended:
            out = not_recommended_path(out)
    path = write_node_config(out, plan, argspec=argspec, sweep_label=args.sweep, confirmation=conf)
    what = "plan" if conf is None else ("confirmed plan" if conf.recommended else
                                        f"plan NOT recommended (missed its confirmation; {args.out} left as it was)")
    print(f"\n{what} written to {path} (lint it: python -m harness.plan {path} --gpu {hw.name} --num-gpus {hw.count})")
    return 1 if plan.allocation.shortfalls or (conf is not None and not conf.recommended) else 0


def _hardware(args: argparse.Namespace, sweep_hw: dict[str, Any], source: str) -> Any:
    from harness.plan import detect_hardware

    if args.num_gpus is not None and args.num_gpus < 1:
        raise UserError(f"must be at least 1, got {args.num_gpus}", key="--num-gpus")
    gpu = args.gpu
    count = args.num_gpus
    if gpu is None:
        hw = detect_hardware(None, count)
        if not hw.is_cpu:
            return hw
        gpu, count = sweep_hw.get("gpu"), count or sweep_hw.get("num_gpus")
        if gpu is None:
            raise UserError("no GPU here and the sweep names no hardware: give --gpu NAME --num-gpus N",
                            source=source, key="hardware")
    hw = detect_hardware(str(gpu), int(count or 1))
    if hw.is_cpu:
        raise UserError("a node plan splits GPUs; the CPU build's core sets come with --confirm", key="--gpu")
    return hw


def _topology(args: argparse.Namespace, hw: Any) -> Any:
    from harness.node.topology import Topology, detect_topology, parse_topology

    if args.topology:
        return parse_topology(args.topology, hw.count)
    if hw.interconnect == "nvlink":
        return Topology(hw.count, (tuple(range(hw.count)),), "nvlink")
    return detect_topology(hw.count) if hw.detected else Topology(hw.count)


def _argspec() -> Any:
    try:
        from harness.launch.vllm_args import load_argspec

        return load_argspec()
    except (ImportError, UserError) as exc:
        print(f"note: serve commands use vLLM's flag naming, not checked against an installed vLLM ({exc})",
              file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------- tables


def _table(rows: list[list[str]], out: Any, widths: list[int] | None = None) -> None:
    widths = widths or [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [textwrap.wrap(str(c), w) or [""] for c, w in zip(row, widths)]
        for i in range(max(len(c) for c in cells)):
            print("  ".join((c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths)).rstrip(), file=out)


def print_plan(plan: Any, out: Any) -> None:
    hw = plan.hardware
    print(f"node: {hw.count}x {hw.name} ({hw.memory_gib:.2f} GiB each, {hw.interconnect}); "
          f"{plan.topology.describe()}", file=out)
    for name, rows in plan.tables.items():
        t = plan.traffic(name)
        print(f"\n{name}: target {t.target_rps:.3g} req/s, SLO {_slo(t.slo)}, workload {t.workload}; "
              f"{plan.studies[name]}", file=out)
        table = [["GPUS/SERVER", "CANDIDATE", "CAPACITY/SERVER", "SOURCE", "NOTE"]]
        for r in rows:
            note = r.reason or (f"limited by {r.detail.get('limited_by')}" if r.source == "estimated" else
                                f"trial #{r.detail.get('trial')}")
            table.append([f"{r.gpus} {hw.name}", r.label, f"{r.capacity_rps:.3g} req/s", r.source, note])
        _table(table, out, [11, 12, 15, 9, 70])
    print(f"\nplan ({plan.allocation.combinations:,} combinations scored; rule: {plan.allocation.rule}):", file=out)
    table = [["MODEL", "GPUS", "CANDIDATE", "CAPACITY", "TARGET", "HEADROOM", "SOURCE"]]
    for a in plan.allocation.assignments:
        gpus = ("; ".join(",".join(map(str, s)) for s in a.servers) or "-")
        cand = f"{a.replicas} x {a.candidate.label}" if a.candidate else "-"
        table.append([a.demand.name, gpus, cand, f"{a.capacity_rps:.3g} req/s", f"{a.demand.target_rps:.3g} req/s",
                      f"{a.headroom:.2f}", a.candidate.source if a.candidate else "-"])
    _table(table, out)
    if plan.allocation.unused_gpus:
        print(f"unused GPUs: {list(plan.allocation.unused_gpus)}", file=out)
    for s in plan.allocation.shortfalls:
        print(f"cannot meet target: {s.describe(hw.count)}", file=out)
    print("\nassumptions:", file=out)
    for a in plan.assumptions:
        print(textwrap.fill(a, 116, initial_indent="  - ", subsequent_indent="    "), file=out)


def _slo(slo: Any) -> str:
    parts = [f"{n} {getattr(slo, n + '_ms'):g} ms" for n in ("ttft", "tpot", "e2e") if getattr(slo, n + "_ms")]
    return f"p{slo.percentile:g} " + ", ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
