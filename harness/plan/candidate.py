"""One candidate planned: run every check and estimate, and say whether it can start and what it will give."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import harness.plan.checks as checks
import harness.plan.estimate as estimate
from harness.plan.checks import Finding
from harness.plan.defaults import VllmDefaults, defaults_for
from harness.plan.hardware import GIB, Hardware
from harness.plan.modelfacts import ModelFacts


@dataclass
class Plan:
    """What the planner predicts for one candidate: can it start, and with how much KV cache and speed."""

    feasible: bool
    findings: list[Finding]
    kv_cache_tokens: int | None = None  # vLLM's "KV cache size: N tokens" (per server)
    kv_cache_blocks: int | None = None
    kv_bytes_per_token: int | None = None  # per GPU (per TP shard)
    weights_gib_per_gpu: float | None = None
    kv_budget_gib_per_gpu: float | None = None
    max_concurrency_at_max_len: float | None = None
    decode_roofline_tok_s: float | None = None  # all replicas together, upper bound
    gpus_needed: int = 0  # replicas x TP x PP (0 on the CPU host)
    servers_per_gpu: int = 1  # servers on each GPU; the memory figures are each server's
    server_gpu_memory_utilization: float | None = None  # the share of the GPU each server runs with
    reserve_gib_per_gpu: float | None = None  # activations + non-torch + CUDA graphs
    max_fitting_len: int | None = None  # longest max_model_len the KV budget could hold
    resolved: dict[str, Any] = field(default_factory=dict)  # settings with vLLM's defaults filled in
    hardware: str = ""
    model: str = ""
    memory_mode: str = ""
    # the device (CPU: NUMA node) total the plan multiplied by gpu_memory_utilization; on the CPU build vLLM reads
    # the node's total again at its own start-up, so compare with the "Auto set (X/TOTAL) GiB" line it logs
    memory_gib: float | None = None

    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def reason(self) -> str:
        """One line joining the error findings: why the candidate was pruned ('' when feasible)."""
        return "; ".join(f"{f.key}: {f.message}" for f in self.errors())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; stored on the trial and on the run record, to compare with what vLLM reports."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "findings"}
        out["findings"] = [f.to_dict() for f in self.findings]
        for k, v in list(out.items()):
            if isinstance(v, float):
                out[k] = round(v, 4)
        return out


def plan_candidate(facts: ModelFacts, hw: Hardware, settings: dict[str, Any], *, argspec: Any = None,
                   defaults: VllmDefaults | None = None, context_len: int | None = None,
                   source: str | None = None, longest_request: int | None = None) -> Plan:
    """Plan one candidate (settings by the user's key names) on `hw`. Fast: pure arithmetic, no I/O.

    `argspec` (harness.launch.vllm_args.ArgSpec) adds the unknown-key check and the installed vLLM's quantization
    methods; the sweep leaves it out because the space was checked once. `defaults` picks vLLM's defaults of
    another version (default: the installed vLLM's). `context_len` is the average context the decode roofline
    assumes (default: half of max_model_len). `longest_request` (the workload's longest prompt + output, tokens)
    prunes a max_model_len that would make vLLM reject some of the workload's requests.
    """
    defaults = defaults or defaults_for(getattr(argspec, "vllm_version", None))
    findings: list[Finding] = []
    if argspec is not None:
        findings += checks.check_keys(settings, argspec, source)
    try:
        r = estimate.resolve(facts, hw, settings, defaults)
    except estimate.SettingError as exc:
        findings.append(Finding("error", exc.key, exc.message, exc.fix))
        return Plan(False, findings, hardware=hw.name, model=facts.name)

    findings += checks.check_parallel(facts, hw, r)
    findings += checks.check_context(facts, r, longest_request)
    findings += checks.check_scheduler(r)
    quant_methods = getattr(argspec, "quantization_methods", None) or None
    platform = checks.check_platform(facts, hw, r, quant_methods)
    if any(f.severity == "error" and f.key == "quantization" for f in platform):
        # the planner's own quantization finding says more than the parser's "invalid value"
        findings = [f for f in findings if f.key != "quantization"]
    findings += platform

    parallel_ok = not any(f.severity == "error" and f.key == "tensor_parallel_size" and "divide" in f.message
                          for f in findings)
    mem = cap = None
    roof = None
    if parallel_ok and not any(f.severity == "error" and f.key in ("quantization",) for f in findings):
        mem = estimate.memory(facts, hw, r, defaults)
        cap = estimate.capacity(facts, r, mem.kv_budget)
        if r.max_model_len_auto:
            findings.append(Finding("info", "max_model_len",
                                    f"max_model_len -1: vLLM fits it to memory; planned as {cap.max_fitting_len} "
                                    f"tokens (capped at the model's {facts.max_context})"))
        findings += checks.check_memory(facts, hw, r, mem, cap)
        if r.tp > 1 and not hw.is_cpu:
            r1 = estimate.Resolved(**{**r.__dict__, "tp": 1})
            mem1 = estimate.memory(facts, hw, r1, defaults)
            cap1 = estimate.capacity(facts, r1, mem1.kv_budget)
            findings += checks.check_tp_over_pcie(facts, hw, r, cap, mem1, cap1)
        roof = estimate.decode_roofline(facts, hw, r, mem, cap, context_len)
    if not facts.exact:
        findings.append(Finding("warning", "model_name",
                                f"{facts.architecture} is not modelled exactly; parameters use the Llama formula",
                                "plan a local directory with the checkpoint to compare"))
    for note in hw.notes:
        findings.append(Finding("info", "hardware", note))

    feasible = not any(f.severity == "error" for f in findings)
    plan = Plan(
        feasible=feasible,
        findings=_ordered(findings),
        gpus_needed=0 if hw.is_cpu else r.topology.gpus,
        resolved=r.to_dict(),
        servers_per_gpu=r.servers_per_gpu,
        server_gpu_memory_utilization=r.server_utilization,
        hardware=f"{hw.count}x {hw.name}" if not hw.is_cpu else "CPU",
        model=facts.name,
    )
    if mem is not None and cap is not None:
        plan.kv_cache_tokens = cap.tokens
        plan.kv_cache_blocks = cap.num_blocks
        plan.kv_bytes_per_token = cap.bytes_per_token
        plan.weights_gib_per_gpu = mem.weights / GIB
        plan.kv_budget_gib_per_gpu = mem.kv_budget / GIB
        plan.reserve_gib_per_gpu = mem.reserve / GIB
        plan.max_concurrency_at_max_len = cap.max_concurrency
        plan.max_fitting_len = min(cap.max_fitting_len, facts.max_context)
        plan.memory_mode = mem.mode
        plan.memory_gib = hw.memory_gib
    if roof is not None:
        plan.decode_roofline_tok_s = roof.tok_s_total
    return plan


def _ordered(findings: list[Finding]) -> list[Finding]:
    rank = {s: i for i, s in enumerate(checks.SEVERITIES)}
    seen: set[tuple[str, str]] = set()
    out = []
    for f in sorted(findings, key=lambda f: rank.get(f.severity, 9)):
        if (f.key, f.message) not in seen:
            seen.add((f.key, f.message))
            out.append(f)
    return out
