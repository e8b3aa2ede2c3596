"""How long the exact node allocator takes: models x GPUs x topology, as a table.

    .venv/bin/python benchmarks/node_allocate.py

Synthetic capacity tables (every model can use TP 1/2/4/8 with sublinear scaling, targets 1..N req/s), so the
search space is the largest the node allows. Columns: option combinations scored, wall time (best of 3).
A measurement, not a test.
"""

from __future__ import annotations

import time

from harness.node.allocate import Candidate, Demand, allocate
from harness.node.topology import Topology, parse_topology

CAPS = {1: 1.5, 2: 3.2, 4: 6.0, 8: 11.0}  # req/s per server by GPUs per server


def main() -> None:
    topologies = {"unknown": Topology(8), "2 groups of 4": parse_topology("0,1,2,3;4,5,6,7", 8),
                  "4 groups of 2": parse_topology("0,1;2,3;4,5;6,7", 8)}
    print(f"{'GPUS':>4}  {'MODELS':>6}  {'TOPOLOGY':<14}  {'COMBINATIONS':>12}  {'BEST OF 3':>9}")
    for gpus in (4, 8):
        for n in (2, 4, 6, 8):
            for label, topo in topologies.items():
                if gpus == 4:
                    if label != "unknown":
                        continue
                    topo = Topology(4)
                demands = [Demand(f"m{i}", 1 + i, tuple(Candidate(f"TP{g}", g, c, "estimated")
                                                        for g, c in CAPS.items() if g <= gpus)) for i in range(n)]
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    alloc = allocate(demands, topo)
                    times.append(time.perf_counter() - t0)
                print(f"{gpus:>4}  {n:>6}  {label:<14}  {alloc.combinations:>12,}  {min(times):>8.3f}s")


if __name__ == "__main__":
    main()
