"""Per model, what one server sustains at the model's SLO for each GPU count it can use: measured or estimated.

One row per tensor-parallel size (1, 2, 4, 8 within the node): the model's study's best trial with that many GPUs
per server when there is one (`measured`), else the planner's estimate (`estimated`) for settings chosen here:
the sweep's fixed settings, gpu_memory_utilization 0.9 (the user's guide), max_model_len the smallest power of two
that holds the workload's longest request, clipped to the model's context (so a 1,024-position model gets 1,024),
and, only where the unquantized model does not fit or misses the SLO even when idle, the quantization values the
sweep's space allows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from harness.node.estimate import Estimate, Shape, estimate_capacity
from harness.node.inputs import Measured
from harness.plan import Hardware, ModelFacts
from harness.records import SLO
from harness.space.spec import MODEL_MAX

TP_CHOICES = (1, 2, 4, 8)
ESTIMATE_GPU_MEMORY_UTILIZATION = 0.9  # the user's guide's value for L40S


@dataclass(frozen=True)
class CapacityRow:
    model: str  # the models[] entry's name
    gpus: int  # per server
    label: str  # "TP2", "TP1 fp8"
    capacity_rps: float  # one server at the model's SLO (0: none)
    source: str  # "measured" | "estimated"
    settings: dict[str, Any] = field(default_factory=dict)  # user keys of one server (no replicas)
    detail: dict[str, Any] = field(default_factory=dict)  # the estimate's operating point, or study and trial
    reason: str = ""  # why the capacity is 0


def shape_of(workload: Any) -> Shape | None:
    """The workload's mean and longest lengths; None for a dataset whose lengths only a tokenizer knows."""
    mi, mo = workload.input_len.mean_value(), workload.output_len.mean_value()
    xi, xo = workload.max_input_tokens(), workload.max_output_tokens()
    if None in (mi, mo, xi, xo):
        return None
    return Shape(workload.name, float(mi), float(mo), int(xi), int(xo))


def max_model_len_for(facts: ModelFacts, shape: Shape) -> int:
    need = 1 << max(0, (shape.max_total - 1).bit_length())
    return min(need, facts.max_context)


def estimate_settings(facts: ModelFacts, shape: Shape, tp: int, fixed: dict[str, Any]) -> dict[str, Any]:
    # one server per GPU set: the arithmetic models a GPU's bandwidth and compute, not the one-server API process
    # that servers sharing a GPU relieve (a measured study's row keeps its servers_per_gpu)
    settings = {k: v for k, v in fixed.items() if k not in ("replicas", "servers_per_gpu")}
    settings["tensor_parallel_size"] = tp
    settings.setdefault("gpu_memory_utilization", ESTIMATE_GPU_MEMORY_UTILIZATION)
    if settings.get("max_model_len") == MODEL_MAX:  # the space's word for the model's longest context
        settings["max_model_len"] = facts.max_context
    if int(settings.get("max_model_len") or 0) <= 0 or settings["max_model_len"] > facts.max_context:
        settings["max_model_len"] = max_model_len_for(facts, shape)
    return settings


def capacity_rows(name: str, facts: ModelFacts, hw: Hardware, shape: Shape | None, slo: SLO,
                  fixed: dict[str, Any], quantizations: list[Any], measured: list[Measured]) -> list[CapacityRow]:
    """One row per TP size that fits the node, measured where the study has it, else estimated."""
    by_gpus = {m.gpus: m for m in measured}
    rows = []
    for tp in TP_CHOICES:
        if tp > hw.count:
            break
        if tp in by_gpus:
            m = by_gpus[tp]
            rows.append(CapacityRow(name, tp, _label(m.settings), m.capacity_rps, "measured", dict(m.settings),
                                    {"study": m.study, "trial": m.trial, "replicas_measured": m.replicas_measured}))
            continue
        if facts.num_attention_heads % tp:
            rows.append(CapacityRow(name, tp, f"TP{tp}", 0.0, "estimated",
                                    reason=f"TP {tp} does not divide the {facts.num_attention_heads} attention heads"))
            continue
        if shape is None:
            rows.append(CapacityRow(name, tp, f"TP{tp}", 0.0, "estimated",
                                    reason="the workload's lengths are known only after tokenizing; no estimate"))
            continue
        model_shape = shape.clipped(facts.max_context)
        base = estimate_settings(facts, model_shape, tp, fixed)
        est = estimate_capacity(facts, hw, base, model_shape, slo)
        chosen, chosen_settings = est, base
        if est.capacity_rps <= 0 and "quantization" not in fixed:
            for q in quantizations:
                if q in (None, "", "none"):
                    continue
                trial = {**base, "quantization": q}
                alt = estimate_capacity(facts, hw, trial, model_shape, slo)
                if alt.capacity_rps > chosen.capacity_rps:
                    chosen, chosen_settings = alt, trial
        rows.append(_estimated_row(name, tp, chosen, chosen_settings, model_shape, est))
    return rows


def _estimated_row(name: str, tp: int, est: Estimate, settings: dict[str, Any], shape: Shape,
                   unquantized: Estimate) -> CapacityRow:
    detail = {**est.to_dict(), "workload": shape.name}
    if est is not unquantized:
        detail["unquantized"] = unquantized.note or f"{unquantized.capacity_rps:.3g} req/s"
    reason = "" if est.capacity_rps > 0 else (est.note or f"limited by {est.limit}")
    return CapacityRow(name, tp, _label(settings), est.capacity_rps, "estimated", dict(settings), detail, reason)


def _label(settings: dict[str, Any]) -> str:
    tp = int(settings.get("tensor_parallel_size", 1) or 1)
    pp = int(settings.get("pipeline_parallel_size", 1) or 1)
    label = f"TP{tp}" + (f" PP{pp}" if pp > 1 else "")
    q = settings.get("quantization")
    return f"{label} {q}" if q not in (None, "", "none") else label
