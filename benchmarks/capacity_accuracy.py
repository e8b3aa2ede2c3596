"""Capacity error vs truth: today's request-count steps next to steady-state windows, against a known-capacity fake.

    python benchmarks/capacity_accuracy.py [--step-s 5] [--capacities 20,40,60]

The fake (`tests/capacity_fake.py`, its own process) has `slots` slots serving 8-token requests in 0.2 s each, so
its sustainable rate is slots / 0.2 s. For each true capacity, three searches run on one fresh fake, each from
the same start rate (half the truth, as a study's first guess might be):

- `count-64`, `count-300`: the request-count steps of the capacity objective before time windows (64 and 300
  Poisson requests per step, every request measured) with the SLO-only verdict (p99 TTFT <= 1000 ms, p99 TPOT
  <= 50 ms, <= 1% failed), run through the same bracketing search at 10% precision (the old search's rel_tol):
  a step "holds" when its percentiles hold, whatever the server sustained.
- `study objective`: the capacity objective a study runs (`CapacityObjective.measure` on the study's load steps
  over `harness.deploy.attach`, the client self-check included) with `step_s`-second windows after a warm-up,
  the steady verdict (completion ratio, in-flight and server-queue trends) and the same SLO, precision 5%.

Columns: the reported capacity, its error vs the closed-form truth, the steps and the seconds of load the search
took. A single run; the numbers move a little with machine load (the verdicts use actual send times).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from capacity_fake import CapacityConfig, CapacityFake, count_measure, fake_load_steps  # noqa: E402

from harness.records import SLO  # noqa: E402
from harness.records import Steady  # noqa: E402
from harness.study.capacity import search_capacity  # noqa: E402
from harness.study.scoring import slo_holds  # noqa: E402
from harness.study.sweepfile import parse_objective  # noqa: E402

OUTPUT_TOKENS = 8


def slo_only(measure):  # type: ignore[no-untyped-def]
    """measure(rate) -> (record, verdict) for request-count steps judged as before windows: the SLO alone, and the
    rate counted as served (no completion or queue test)."""

    def step(rate: float):  # type: ignore[no-untyped-def]
        record = measure(rate)
        ok = slo_holds(record, SLO_LIMITS)
        n = record.metrics.completed if record.metrics else 0
        return record, Steady(holds=ok, kept_up=True, slo_ok=ok, offered_rate=rate, achieved_rate=rate, requests=n,
                              completed=n, completion_ratio=1.0)

    return step
SLO_LIMITS = SLO(ttft_ms=1000.0, tpot_ms=50.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-s", type=float, default=5.0, help="measured window of the new steps, seconds")
    parser.add_argument("--capacities", default="20,40,60", help="true capacities, req/s (multiples of 5)")
    args = parser.parse_args()
    rows = []
    print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    for truth in (float(c) for c in args.capacities.split(",")):
        config = CapacityConfig(slots=round(truth * 0.2), prefill_s=0.025, token_s=0.025, tokens_per_chunk=4)
        mu = config.capacity(4, OUTPUT_TOKENS)
        start = mu / 2
        with CapacityFake(config) as fake:
            for n in (64, 300):
                t = time.monotonic()
                old = search_capacity(slo_only(count_measure(fake, n, OUTPUT_TOKENS, SLO_LIMITS)), start_rate=start,
                                      precision=0.1, max_steps=8)
                rows.append((mu, f"count-{n} (before windows)", old.capacity, None, len(old.steps), time.monotonic() - t))
                print(rows[-1], flush=True)
            t = time.monotonic()
            # the study's capacity objective itself, on the study's load steps (client check included)
            objective = parse_objective({"kind": "capacity", "slo": {"ttft_ms": SLO_LIMITS.ttft_ms,
                                                                     "tpot_ms": SLO_LIMITS.tpot_ms, "percentile": 99},
                                         "step_s": args.step_s, "warmup_s": 1.0, "precision": 0.05,
                                         "start_rate": start, "max_steps": 8}, "capacity_accuracy")
            got = objective.measure(fake_load_steps(fake, OUTPUT_TOKENS, objective.slo))
            bracket = got.capacity or {}
            limited = " (client-limited step)" if got.client_reasons else ""
            rows.append((mu, f"study objective, {args.step_s:g} s windows{limited}", bracket.get("capacity_lo", 0.0),
                         bracket.get("capacity_hi"), len(bracket.get("steps", [])), time.monotonic() - t))
            print(rows[-1], flush=True)
    print()
    print("| true capacity (req/s) | method | reported (req/s) | bracket hi | error vs truth | steps | search s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mu, method, cap, hi, steps, secs in rows:
        hi_s = f"{hi:.1f}" if hi is not None else "-"
        print(f"| {mu:.0f} | {method} | {cap:.1f} | {hi_s} | {cap / mu - 1:+.0%} ({cap / mu:.2f}x) | {steps} | {secs:.0f} |")


if __name__ == "__main__":
    main()
