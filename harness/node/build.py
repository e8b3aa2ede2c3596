"""Make a node plan: inputs -> capacity table per model -> allocation. The one function the CLI calls."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from harness.node.allocate import Allocation, Candidate, Demand, allocate
from harness.node.capacity import CapacityRow, capacity_rows, shape_of
from harness.node.estimate import ASSUMPTIONS
from harness.node.inputs import NodeInputs, measured_candidates, storage_for
from harness.node.topology import Topology
from harness.node.traffic import ModelTraffic
from harness.plan import Hardware


@dataclass
class NodePlan:
    inputs: NodeInputs
    hardware: Hardware
    topology: Topology
    tables: dict[str, list[CapacityRow]]  # model name -> one row per GPU count
    allocation: Allocation
    studies: dict[str, str]  # model name -> what was read ("study NAME", "no study ...")
    assumptions: list[str] = field(default_factory=list)

    def traffic(self, name: str) -> ModelTraffic:
        return next(t for t in self.inputs.traffic if t.name == name)

    @property
    def sources(self) -> set[str]:
        a = self.allocation
        return {x.candidate.source for x in a.assignments if x.candidate is not None}


def build_plan(inputs: NodeInputs, hardware: Hardware, topology: Topology, *, storage: str | None = None,
               out: Any = sys.stderr) -> NodePlan:
    from harness.load.workload import load_workload
    from harness.models import ensure_model
    from harness.plan import load_model_facts
    from harness.space import load_space
    from harness.study import naming

    sweep = inputs.sweep
    space = load_space(sweep.space)
    quantizations = list(space.knobs["quantization"].values()) if "quantization" in space.knobs else []
    storage_url = storage_for(sweep.results_dir, storage or sweep.storage)
    hw_tag = naming.hardware_tag(hardware.name, hardware.count)
    tables: dict[str, list[CapacityRow]] = {}
    studies: dict[str, str] = {}
    demands: list[Demand] = []
    for t in inputs.traffic:
        entry = inputs.entry(t.name)
        print(f"capacity table: {t.name} ...", file=out, flush=True)
        workload = load_workload(t.workload)
        study_name = naming.study_name(entry.name, hw_tag, workload.name, sweep.objective.kind)
        measured, note = measured_candidates(storage_url, study_name, t.slo, sweep.results_dir)
        studies[t.name] = note
        facts = load_model_facts(ensure_model(entry.model, entry.build))  # a `build:` model is made here
        rows = capacity_rows(t.name, facts, hardware, shape_of(workload), t.slo, {**space.fixed, **entry.fixed},
                             quantizations, measured)
        tables[t.name] = rows
        cands = tuple(Candidate(r.label, r.gpus, r.capacity_rps, r.source, r) for r in rows if r.capacity_rps > 0)
        demands.append(Demand(t.name, t.target_rps, cands, t.priority))
    print(f"allocating {hardware.count} GPU(s) between {len(demands)} model(s) ...", file=out, flush=True)
    allocation = allocate(demands, topology)
    plan = NodePlan(inputs, hardware, topology, tables, allocation, studies)
    plan.assumptions = assumptions_for(plan)
    return plan


def assumptions_for(plan: NodePlan) -> list[str]:
    out = []
    kinds = plan.sources
    if "estimated" in kinds:
        out.append("estimated capacities come from the planner alone (no server was run): " + "; ".join(ASSUMPTIONS))
    if "measured" in kinds:
        out.append("measured capacities are the best feasible trial per GPU count of each model's capacity study, "
                   "one server measured; replicas scale it linearly")
    if kinds == {"measured", "estimated"}:
        out.append("this plan mixes measured and estimated capacities")
    for t in plan.inputs.traffic:
        if t.share is not None:
            out.append(f"{t.name}: target {t.target_rps:.3g} req/s is its share {t.share:g} of traffic.total_rps")
    if not plan.topology.known:
        out.append("GPU topology unknown: any GPUs may form a tensor-parallel group; on the node, pass --topology "
                   "or run there so NVML reports it")
    return out
