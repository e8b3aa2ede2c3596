"""Write the node plan in the user's format: `vllm_instances:` (one server each, pinned to `gpu_devices`; servers
sharing a GPU, `servers_per_gpu`, are one instance each with the same `gpu_devices`), the `vllm serve` command of
each instance, and the provenance of every number.

The instances hold only settings and `gpu_devices`, as in the user's guide, so their tooling and
`python -m harness.plan` read them as they are; the commands sit beside them in `serve_commands:`.
"""

from __future__ import annotations

import datetime as _dt
import shlex
from pathlib import Path
from typing import Any

import yaml

from harness.emit import ordered_vllm_block
from harness.node.allocate import Assignment
from harness.node.build import NodePlan
from harness.records import to_dict
from harness.settings import Topology, server_settings, split_settings

BASE_PORT = 8000  # instance i listens on BASE_PORT + i


def instances(plan: NodePlan, default_utilization: float | None = None
              ) -> list[tuple[Assignment, dict[str, Any], tuple[int, ...]]]:
    """(assignment, user-format settings of one server, GPU set) per server, in model order: a candidate measured
    with servers_per_gpu N gives N servers on each of its GPU sets, each with its share of gpu_memory_utilization
    (`default_utilization`, vLLM's default, splits a configuration that leaves it out; default: the installed
    vLLM's)."""
    out = []
    for a in plan.allocation.assignments:
        if a.candidate is None:
            continue
        entry = plan.inputs.entry(a.demand.name)
        settings = dict(a.candidate.ref.settings)
        topo = Topology.of(settings)
        if topo.servers_per_gpu > 1 and settings.get("gpu_memory_utilization") is None and default_utilization is None:
            from harness.launch.vllm_args import load_argspec

            default_utilization = load_argspec().default_utilization
        block = ordered_vllm_block(entry.model_name or entry.model,
                                   server_settings(settings, default_utilization or 0.0))
        for gpus in a.servers:
            out += [(a, block, gpus)] * topo.servers_per_gpu
    return out


def serve_argv(model: str, settings: dict[str, Any], port: int, argspec: Any = None) -> list[str]:
    """`vllm serve MODEL --opt=value ...` with the installed vLLM's flags (`ArgSpec.to_argv`, the one home of how a
    setting becomes an argv item: `=` keeps a value that starts with '-' a value); `argspec` defaults to it."""
    if argspec is None:
        from harness.launch.vllm_args import load_argspec

        argspec = load_argspec()
    vllm_settings, _ = split_settings({k: v for k, v in settings.items() if k != "model_name"})
    return ["vllm", "serve", model, *argspec.to_argv(vllm_settings), "--host=127.0.0.1", f"--port={port}"]


def not_recommended_path(path: str | Path) -> Path:
    """Where a plan that failed its confirmation goes: beside `path`, so the file the user's tooling deploys keeps
    the last plan that passed (configs/node.yaml -> configs/node.not-recommended.yaml)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.not-recommended{path.suffix or '.yaml'}")


def confirmation_summary(conf: Any) -> dict[str, Any]:
    """The confirmation as the plan's provenance carries it: verdict, reasons, node, window, per model and layout."""
    layouts = [x for x in (conf.plan, conf.user_layout) if x is not None]
    keep = ("name", "layout", "placed_on", "target_rps", "offered_rps", "achieved_rps", "requests", "slo_attainment",
            "goodput_rps", "p99_ttft_ms", "p99_tpot_ms", "kept_up", "gpu_memory_mib", "rss_peak_mib", "note")
    models = []
    for lc in layouts:
        for m in lc.models:
            item = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in to_dict(m).items() if k in keep}
            models.append({**item, "meets_slo": m.meets_slo})
    return {"recommended": conf.recommended, "reasons": conf.reasons(), "measured_on": conf.node,
            "window_s": conf.window, "record": conf.path, "models": models,
            **({"user_layout": conf.user_layout.source, "user_layout_meets_all": conf.user_layout.meets_all}
               if conf.user_layout is not None else {})}


def node_document(plan: NodePlan, *, argspec: Any = None, sweep_label: str | None = None,
                  confirmation: Any = None) -> dict[str, Any]:
    hw = plan.hardware
    doc: dict[str, Any] = {}
    if confirmation is not None:
        doc["recommended"] = confirmation.recommended
        if not confirmation.recommended:
            doc["not_recommended_because"] = confirmation.reasons()
    doc.update({"vllm_instances": [], "serve_commands": []})
    for i, (a, block, gpus) in enumerate(instances(plan, getattr(argspec, "default_utilization", None))):
        doc["vllm_instances"].append({**block, "gpu_devices": list(gpus)})
        argv = serve_argv(block["model_name"], block, BASE_PORT + i, argspec)
        doc["serve_commands"].append({
            "instance": i + 1, "model_name": block["model_name"], "gpu_devices": list(gpus),
            "command": f"CUDA_VISIBLE_DEVICES={','.join(map(str, gpus))} {shlex.join(argv)}"})
    models = []
    for a in plan.allocation.assignments:
        t = plan.traffic(a.demand.name)
        row = a.candidate.ref if a.candidate else None
        item: dict[str, Any] = {
            "name": t.name, "model": t.model, "target_rps": round(t.target_rps, 4),
            "slo": {k: v for k, v in to_dict(t.slo).items() if v is not None}, "priority": t.priority,
            "workload": t.workload, "gpus": a.gpus, "servers": [list(s) for s in a.servers],
            "candidate": row.label if row else None,
            "capacity_rps_per_server": round(row.capacity_rps, 4) if row else None,
            "capacity_rps": round(a.capacity_rps, 4), "headroom": round(a.headroom, 3) if t.target_rps else None,
            "source": row.source if row else None, "study": plan.studies.get(t.name),
        }
        if row is not None:
            item["basis"] = row.detail
            shared = Topology.of(row.settings).servers_per_gpu
            if shared > 1:  # the capacity is of the GPU set's servers together, as the study measured them
                item["servers_per_gpu"] = shared
        item["capacity_table"] = [
            {"gpus_per_server": r.gpus, "candidate": r.label, "capacity_rps": round(r.capacity_rps, 4),
             "source": r.source, **({"why_none": r.reason} if r.reason else {})} for r in plan.tables[t.name]]
        models.append(item)
    n_servers = len(doc["vllm_instances"])
    doc["provenance"] = {
        "generated_by": "vllm-tune node plan (python -m harness.node)",
        "date": _dt.date.today().isoformat(),
        "sweep": sweep_label or plan.inputs.sweep.source,
        "hardware": {"gpu": hw.name, "num_gpus": hw.count, "memory_gib": round(hw.memory_gib, 2),
                     "source": "detected" if hw.detected else "catalog", "topology": plan.topology.to_dict()},
        "vllm_version": getattr(argspec, "vllm_version", None),
        "capacity_sources": sorted(plan.sources) or ["none"],
        "allocation_rule": plan.allocation.rule,
        "min_headroom": round(plan.allocation.min_headroom, 3),
        "models": models,
        "unmet": [s.describe(hw.count) for s in plan.allocation.shortfalls],
        "unused_gpus": list(plan.allocation.unused_gpus),
        "assumptions": plan.assumptions,
        "serve_commands": f"instance i (1-based) listens on 127.0.0.1:{BASE_PORT}+i-1; {n_servers} instance(s)",
    }
    if confirmation is not None:
        doc["provenance"]["confirmation"] = confirmation_summary(confirmation)
    return doc


def write_node_config(path: str | Path, plan: NodePlan, *, argspec: Any = None, sweep_label: str | None = None,
                      confirmation: Any = None) -> Path:
    """`confirmation` (a `harness.node.confirm.NodeConfirmation`): its verdict goes into the file (`recommended`,
    the reasons, the measured figures in provenance.confirmation); where to write a plan that failed it is the
    caller's choice (`not_recommended_path`)."""
    path = Path(path)
    doc = node_document(plan, argspec=argspec, sweep_label=sweep_label, confirmation=confirmation)
    hw = plan.hardware
    kinds = "+".join(sorted(plan.sources)) or "no"
    header = [f"generated by vllm-tune node plan: {sweep_label or plan.inputs.sweep.source} on {hw.count}x {hw.name}, "
              f"{_dt.date.today().isoformat()}",
              f"capacities: {kinds} ({'not measured: ' if 'measured' not in plan.sources else ''}see provenance."
              f"assumptions); smallest predicted headroom {plan.allocation.min_headroom:.2f}"]
    if plan.allocation.shortfalls:
        header.append("NOT every model meets its target on this node: see provenance.unmet")
    if confirmation is not None:
        header.append(f"confirmed on {confirmation.node}: every model met its SLO under the mixed load" if
                      confirmation.recommended else "NOT RECOMMENDED: its confirmation missed: " +
                      "; ".join(confirmation.reasons()))
    text = "".join(f"# {line}\n" for line in header)
    text += yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=116)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path
