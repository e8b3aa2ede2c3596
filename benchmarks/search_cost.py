"""What a trial's capacity search costs, before and after the two savings, against a known-capacity fake.

    python benchmarks/search_cost.py [--step-s 5] [--truth 40] [--incumbents 0.9,1.1,1.6]

A study's trial starts its search at the incumbent (the best capacity so far). Two rules set what that costs:
- `growth`: the next rate after a step that held. x2 from an incumbent near the ceiling overloads the server so
  far that the step measures a backlog, and the backlog takes long to drain;
- `must_beat` (a sampled trial): the search ends once it has shown the candidate below the incumbent, instead of
  closing a bracket that ranks nothing.

For each incumbent (as a multiple of the fake's true capacity) the study's own capacity objective
(`CapacityObjective.measure` on the study's load steps over `harness.deploy.attach`) runs twice on one fresh fake:
`before` (growth 2, every bracket closed: how trials searched until now) and `after` (growth 1.25, a sampled trial
stopping below the incumbent). Columns: steps, seconds of load, the capacity found, and whether the verdict
against the incumbent (better or not) matches the truth. One run on a shared machine; the verdicts use actual
send times, the seconds move with machine load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from capacity_fake import CapacityConfig, CapacityFake, fake_load_steps  # noqa: E402

from harness.study.sweepfile import parse_objective  # noqa: E402

OUTPUT_TOKENS = 8
RULES = {"before": {"growth": 2.0, "must_beat": False}, "after": {"growth": 1.25, "must_beat": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-s", type=float, default=5.0, help="measured window of each step, seconds")
    parser.add_argument("--truth", type=float, default=40.0, help="the fake's true capacity, req/s (multiple of 5)")
    parser.add_argument("--incumbents", default="0.9,1.1,1.6", help="incumbent capacities as multiples of the truth")
    args = parser.parse_args()
    config = CapacityConfig(slots=round(args.truth * 0.2), prefill_s=0.025, token_s=0.025, tokens_per_chunk=4)
    mu = config.capacity(4, OUTPUT_TOKENS)
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; true capacity {mu:.1f} req/s",
          flush=True)
    rows = []
    for ratio in (float(r) for r in args.incumbents.split(",")):
        incumbent = ratio * mu
        for name, rule in RULES.items():
            objective = parse_objective({"kind": "capacity", "slo": {"ttft_ms": 1000, "tpot_ms": 50, "percentile": 99},
                                         "step_s": args.step_s, "warmup_s": 1.0, "precision": 0.05,
                                         "start_rate": incumbent, "max_steps": 6, "growth": rule["growth"]},
                                        "search_cost")
            with CapacityFake(config) as fake:
                t = time.monotonic()
                got = objective.measure(fake_load_steps(fake, OUTPUT_TOKENS, objective.slo), incumbent=[incumbent],
                                        must_beat=bool(rule["must_beat"]))
                secs = time.monotonic() - t
            bracket = got.capacity or {}
            lo, hi = bracket.get("capacity_lo", 0.0), bracket.get("capacity_hi")
            better = lo > incumbent  # the study ranks by capacity_lo
            right = better == (mu > incumbent)
            rows.append((ratio, incumbent, name, len(bracket.get("steps", [])), secs, lo, hi,
                         bracket.get("stopped", ""), "better" if better else "not better", right))
            print(rows[-1], flush=True)
    print()
    print(f"True capacity {mu:.1f} req/s; {args.step_s:g} s windows; one fake server (CPU host, no GPU).")
    print()
    print("| incumbent (x truth) | rules | steps | search s | capacity lo / hi (req/s) | stopped | vs incumbent | "
          "verdict right |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for ratio, inc, name, steps, secs, lo, hi, stopped, verdict, right in rows:
        hi_s = f"{hi:.1f}" if hi is not None else "-"
        print(f"| {ratio:g} ({inc:.1f} req/s) | {name} | {steps} | {secs:.0f} | {lo:.1f} / {hi_s} | {stopped} | "
              f"{verdict} | {'yes' if right else 'no'} |")


if __name__ == "__main__":
    main()
