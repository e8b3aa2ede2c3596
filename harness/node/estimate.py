"""The planner's capacity estimate at an SLO: requests/s one server sustains, from arithmetic alone.

Inputs are harness.plan's (weights per GPU, KV bytes per token, KV cache tokens, datasheet bandwidth and BF16/FP8
TFLOPS) and the workload's mean lengths. A mean-value model of vLLM's continuous batching with chunked prefill:

    decode step (B sequences)   s(B) = W / (eta_bw BW) + 2 layers t_ar + B (c K / (eta_bw BW) + 2 P / (t eta_f F) + A)
    prefill of one prompt       T_pf = 2 P L_in / (t eta_f F)
    at a rate lam, per second   k s(B) + lam T_pf = 1 step-seconds, and B = lam L_out TPOT (Little's law)
    =>  TPOT = a / (1 - lam T_pf - lam L_out b)   with a the batch-independent term, b the per-sequence one

W weights per GPU, K KV bytes per token per GPU, c = L_in + L_out / 2 the mean context a decoding sequence holds,
P parameters, t the tensor-parallel size, t_ar one all-reduce's fixed cost (TP > 1), F the GPU's dense TFLOPS
(FP8 when the weights are FP8), A the all-reduce bytes per sequence and step over the GPU link.
The capacity is the largest lam with TPOT <= the TPOT limit,
TTFT ~ T_pf(longest prompt) / (1 - lam T_pf) + one step <= the TTFT limit, E2E ~ TTFT + longest output x TPOT <=
the E2E limit, and B <= min(max_num_seqs, KV cache tokens / c); TPOT and TTFT are means scaled to the SLO's
percentile (PERCENTILE_FACTORS). ASSUMPTIONS says what this leaves out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from harness.plan import Hardware, ModelFacts, Plan, plan_candidate
from harness.plan.modelfacts import DTYPE_BYTES
from harness.records import SLO

# Calibration: vLLM 0.26, Mistral-7B-Instruct-v0.2, workload chat-mix, 10 measured runs on one to four H100 SXM /
# H200 GPUs at fixed Poisson rates (results/h100x4, results/h200x4; TP 1, 2 and 4, max_num_batched_tokens 4096 to
# 32768). A grid fit of the mean TPOT (log error) gave 90% of the datasheet bandwidth, 50% of the dense tensor peak
# and 150 us per all-reduce (2 per layer and step; it absorbs NCCL launch and synchronisation), RMS error about a
# factor 1.6. Not yet measured on L40S, whose PCIe all-reduces are likely slower than NVLink's.
BANDWIDTH_EFFICIENCY = 0.9
COMPUTE_EFFICIENCY = 0.5
ALLREDUCE_S = 150e-6
# The model predicts means; an SLO holds a percentile. Percentile / predicted mean in the same runs (medians):
# TPOT p90 1.35, p99 1.49 (10 runs); TTFT p90 2.1-2.6, p99 3.0-3.9 (the 3 runs whose queue did not grow).
PERCENTILE_FACTORS: dict[float, tuple[float, float]] = {50.0: (1.0, 1.0), 90.0: (1.35, 2.2), 95.0: (1.42, 2.8),
                                                        99.0: (1.5, 3.5)}  # percentile -> (TPOT, TTFT)

ASSUMPTIONS = (
    f"decode streams weights and KV cache at {BANDWIDTH_EFFICIENCY:.0%} of the datasheet memory bandwidth and "
    f"computes at {COMPUTE_EFFICIENCY:.0%} of the dense BF16 (FP8 for FP8 weights) tensor peak, memory and compute "
    f"time added (no overlap); each tensor-parallel all-reduce costs {ALLREDUCE_S * 1e6:.0f} us plus its bytes over "
    "the GPU link at half its bidirectional datasheet bandwidth (fit on H100/H200 NVLink runs of Mistral-7B, "
    "not on this GPU)",
    "chunked prefill: prompts are prefilled inside decode steps and lengthen them (2 x parameters FLOPs per token, "
    "attention FLOPs left out); no prefix-cache hits",
    "Poisson arrivals reduced to their means (TPOT: the mean step time; TTFT: the longest prompt's prefill with "
    "the other prompts' prefill competing), then scaled to the SLO percentile by the percentile/mean ratios "
    "measured on H100/H200 (p99: TPOT x1.5, TTFT x3.5)",
    "a decoding request holds KV for its prompt plus half its output on average; the batch is capped by "
    "max_num_seqs and by the KV cache the planner predicts",
    "replicas scale capacity linearly (one server estimated, N deployed); the confirmation measures the scaling",
)


@dataclass(frozen=True)
class Shape:
    """The workload's lengths the estimate needs (tokens as the server counts them)."""

    name: str
    mean_input: float
    mean_output: float
    max_input: int
    max_output: int

    @property
    def max_total(self) -> int:
        return self.max_input + self.max_output

    def clipped(self, context: int) -> Shape:
        """The same mix on a model whose context is shorter than the longest request (the rest vLLM rejects)."""
        if self.max_total <= context:
            return self
        scale = context / self.max_total
        return Shape(f"{self.name} (clipped to {context} tokens)", self.mean_input * scale, self.mean_output * scale,
                     int(self.max_input * scale), int(self.max_output * scale))


@dataclass(frozen=True)
class Estimate:
    """One server's capacity at the SLO, and the operating point the model predicts there."""

    capacity_rps: float
    limit: str  # what bounds it: tpot | ttft | e2e | kv_cache | max_num_seqs | busy | infeasible
    tpot_ms: float | None  # at the capacity
    ttft_ms: float | None
    batch: float | None  # sequences decoding at once at the capacity
    max_batch: float  # min(max_num_seqs, KV cache / mean context)
    plan: Plan
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"capacity_rps": round(self.capacity_rps, 4), "limited_by": self.limit,
                "tpot_ms": _r(self.tpot_ms), "ttft_ms": _r(self.ttft_ms), "batch": _r(self.batch),
                "max_batch": _r(self.max_batch), "kv_cache_tokens": self.plan.kv_cache_tokens,
                "weights_gib_per_gpu": _r(self.plan.weights_gib_per_gpu), **({"note": self.note} if self.note else {})}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


@dataclass(frozen=True)
class _Model:
    a: float  # s per step, independent of batch
    b: float  # s per step per decoding sequence
    t_pf_mean: float  # s of prefill per mean prompt
    t_pf_max: float  # s of prefill of the longest prompt
    max_batch: float
    tpot_factor: float = 1.0  # SLO percentile / mean
    ttft_factor: float = 1.0


def percentile_factors(percentile: float) -> tuple[float, float]:
    """(TPOT, TTFT) percentile / mean factors; between the tabled percentiles, the next higher one's."""
    for p in sorted(PERCENTILE_FACTORS):
        if percentile <= p:
            return PERCENTILE_FACTORS[p]
    return PERCENTILE_FACTORS[max(PERCENTILE_FACTORS)]


def estimate_capacity(facts: ModelFacts, hw: Hardware, settings: dict[str, Any], shape: Shape, slo: SLO) -> Estimate:
    """Plan `settings` (one server) on `hw` and estimate its capacity at `slo` on `shape`'s requests."""
    context = shape.mean_input + shape.mean_output / 2
    plan = plan_candidate(facts, hw, settings, context_len=max(1, int(context)))
    if not plan.feasible or plan.kv_cache_tokens is None or hw.bandwidth_gbps is None:
        why = plan.reason() or "no memory bandwidth figure for this GPU"
        return Estimate(0.0, "infeasible", None, None, None, 0.0, plan, why)
    r = plan.resolved
    tp = int(r["tp"]) * int(r["pp"])
    bw = hw.bandwidth_gbps * 1e9 * BANDWIDTH_EFFICIENCY
    fp8 = str(r.get("quantization") or "").startswith("fp8") and hw.fp8_tflops
    flops = (hw.fp8_tflops if fp8 else hw.bf16_tflops or 0.0) * 1e12 * COMPUTE_EFFICIENCY
    per_token_s = 2 * facts.params_total / (tp * flops) if flops else 0.0
    comm = fixed = 0.0
    if int(r["tp"]) > 1:
        fixed = 2 * facts.num_layers * ALLREDUCE_S
        if hw.link_gbps:
            msg = facts.hidden_size * DTYPE_BYTES[str(r["dtype"])]
            comm = 2 * facts.num_layers * msg * 2 * (r["tp"] - 1) / r["tp"] / (hw.link_gbps * 1e9 / 2)
    tpot_f, ttft_f = percentile_factors(slo.percentile)
    m = _Model(
        a=plan.weights_gib_per_gpu * 2**30 / bw + fixed,
        b=context * plan.kv_bytes_per_token / bw + per_token_s + comm,
        t_pf_mean=shape.mean_input * per_token_s,
        t_pf_max=shape.max_input * per_token_s,
        max_batch=min(float(r["max_num_seqs"]), plan.kv_cache_tokens / context),
        tpot_factor=tpot_f,
        ttft_factor=ttft_f,
    )
    return _solve(m, shape, slo, plan)


def _point(m: _Model, lam: float, shape: Shape) -> tuple[float, float, float] | None:
    """(TPOT s, TTFT s, batch) at rate `lam`, or None past saturation; TPOT and TTFT at the SLO's percentile."""
    denom = 1 - lam * m.t_pf_mean - lam * shape.mean_output * m.b
    if denom <= 0:
        return None
    tpot = m.a / denom
    ttft = m.t_pf_max / max(1e-9, 1 - lam * m.t_pf_mean) + tpot
    return tpot * m.tpot_factor, ttft * m.ttft_factor, lam * shape.mean_output * tpot


def _violation(m: _Model, lam: float, shape: Shape, slo: SLO) -> str | None:
    p = _point(m, lam, shape)
    if p is None:
        return "busy"
    tpot, ttft, batch = p
    if slo.tpot_ms is not None and tpot * 1e3 > slo.tpot_ms:
        return "tpot"
    if slo.ttft_ms is not None and ttft * 1e3 > slo.ttft_ms:
        return "ttft"
    if slo.e2e_ms is not None and (ttft + shape.max_output * tpot) * 1e3 > slo.e2e_ms:
        return "e2e"
    if batch > m.max_batch:
        return "max_batch"
    return None


def _solve(m: _Model, shape: Shape, slo: SLO, plan: Plan) -> Estimate:
    sup = 1 / (m.t_pf_mean + shape.mean_output * m.b)
    first = _violation(m, sup * 1e-9, shape, slo)
    if first is not None:
        p = _point(m, 0.0, shape)
        tpot, ttft = (p[0] * 1e3, p[1] * 1e3) if p else (None, None)
        return Estimate(0.0, first, tpot, ttft, 0.0, m.max_batch, plan,
                        f"misses the {first} limit even when idle (TPOT {tpot:.1f} ms, TTFT {ttft:.0f} ms)")
    lo, hi = 0.0, sup
    for _ in range(60):
        mid = (lo + hi) / 2
        if _violation(m, mid, shape, slo) is None:
            lo = mid
        else:
            hi = mid
    limit = _violation(m, min(sup, lo * 1.001 + 1e-12), shape, slo) or "busy"
    if limit == "max_batch":
        limit = "max_num_seqs" if m.max_batch >= plan.resolved["max_num_seqs"] else "kv_cache"
    tpot, ttft, batch = _point(m, lo, shape) or (math.nan, math.nan, math.nan)
    return Estimate(lo, limit, tpot * 1e3, ttft * 1e3, batch, m.max_batch, plan)
