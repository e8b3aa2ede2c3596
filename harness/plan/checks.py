"""Each check says, before any GPU time, whether vLLM will accept a candidate, and why not in words a person reads.

A check returns Findings: `error` (vLLM refuses to start or the node cannot hold it: the sweep prunes it),
`warning` (it runs, but wastes hardware or surprises), `info` (context).
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from harness.settings import REMOVED_KEYS
from harness.plan.estimate import CUDA_CONTEXT_GIB as CUDA_CTX_GIB
from harness.plan.estimate import Capacity, Memory, Resolved
from harness.plan.hardware import CPU_LAUNCH_MARGIN_GIB, GIB, Hardware, cpu_utilization_that_fits
from harness.plan.modelfacts import (
    CHECKPOINT_METHODS,
    ONLINE_METHODS,
    ModelFacts,
    _same_family,
    quant_family,
)

SEVERITIES = ("error", "warning", "info")
HARNESS_ONLY_KEYS = ("model_name", "replicas", "servers_per_gpu")


@dataclass(frozen=True)
class Finding:
    """One thing the planner found: how bad, which key, why (with the numbers), and what to change."""

    severity: str  # "error" | "warning" | "info"
    key: str
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB"


# ---------------------------------------------------------------------------------------------- parallelism


def check_parallel(facts: ModelFacts, hw: Hardware, r: Resolved) -> list[Finding]:
    out: list[Finding] = []
    heads, kv = facts.num_attention_heads, facts.num_kv_heads
    if heads % r.tp:
        ok = [t for t in range(1, min(heads, 8 * max(1, hw.count)) + 1) if heads % t == 0 and t <= max(hw.count, 1)]
        out.append(Finding("error", "tensor_parallel_size",
                           f"tensor_parallel_size {r.tp} does not divide the model's {heads} attention heads "
                           f"(vLLM splits whole heads across GPUs and refuses to start)",
                           f"use a divisor of {heads}: {', '.join(map(str, ok)) or '1'}"))
    elif (kv >= r.tp and kv % r.tp) or (kv < r.tp and r.tp % kv):
        out.append(Finding("error", "tensor_parallel_size",
                           f"tensor_parallel_size {r.tp} and the model's {kv} KV heads: neither divides the other, "
                           f"so vLLM cannot split or replicate the KV heads evenly",
                           f"use a TP that divides {kv} or a multiple of it"))
    if r.servers_per_gpu > 1 and r.tp * r.pp > 1:
        out.append(Finding("error", "servers_per_gpu",
                           f"servers_per_gpu {r.servers_per_gpu} runs several single-GPU servers on each GPU, but "
                           f"tensor_parallel_size {r.tp} x pipeline_parallel_size {r.pp} spreads one server over "
                           f"{r.tp * r.pp} GPUs",
                           "use servers_per_gpu 1 with TP x PP > 1, or tensor_parallel_size 1 and "
                           "pipeline_parallel_size 1"))
    if hw.is_cpu:
        if r.topology.gpus > 1:
            out.append(Finding("info", "tensor_parallel_size",
                               f"CPU host: {r.replicas} replica(s) x TP {r.tp} x PP {r.pp} processes share one "
                               f"memory node; the plan treats the node as one device"))
        return out
    need = r.topology.gpus
    if need > hw.count:
        out.append(Finding("error", "replicas" if r.replicas > 1 else "tensor_parallel_size",
                           f"replicas {r.replicas} x tensor_parallel_size {r.tp}"
                           + (f" x pipeline_parallel_size {r.pp}" if r.pp > 1 else "")
                           + f" = {need} GPUs, but the node has {hw.count} {hw.name}",
                           f"make replicas x TP x PP <= {hw.count}"))
    return out


def check_tp_over_pcie(facts: ModelFacts, hw: Hardware, r: Resolved, cap: Capacity | None, mem_tp1: Memory | None,
                       cap_tp1: Capacity | None) -> list[Finding]:
    """TP across PCIe for a model that fits one GPU: replicas give the same memory without per-layer all-reduces."""
    if hw.is_cpu or r.tp <= 1 or hw.interconnect == "nvlink" or mem_tp1 is None or cap_tp1 is None:
        return []
    if not cap_tp1.fits_one_request:
        return []
    params_m = facts.params_total / 1e6
    size = f"{params_m / 1000:.1f}B" if params_m >= 1000 else f"{params_m:.0f}M"
    copies = r.tp * r.replicas
    conc_tp = f"{cap.max_concurrency * r.replicas:.1f}" if cap is not None else "?"
    return [Finding(
        "warning", "tensor_parallel_size",
        f"TP {r.tp} over PCIe for a {size}-parameter model that fits on one {hw.name} "
        f"({_gib(mem_tp1.weights)} of weights): every layer all-reduces twice per decode step across PCIe "
        f"({hw.link_gbps:.0f} GB/s, no NVLink). {copies} single-GPU replicas hold "
        f"{cap_tp1.max_concurrency * copies:.1f} requests of max_model_len {r.max_model_len} in KV cache "
        f"(this layout: {conc_tp}) and need no all-reduce",
        f"try tensor_parallel_size 1 with replicas {copies}; keep TP only if one request needs more KV cache than one "
        f"GPU holds ({cap_tp1.max_fitting_len:,} tokens)")]


# ---------------------------------------------------------------------------------------------- context


def check_context(facts: ModelFacts, r: Resolved, longest_request: int | None = None) -> list[Finding]:
    """max_model_len against the model's longest context and (when known) the workload's longest request."""
    if longest_request and longest_request > facts.max_context:
        return [Finding("error", "max_model_len",
                        f"the workload's longest request ({longest_request} tokens, prompt + output) exceeds the "
                        f"longest context {facts.name} allows ({facts.max_context}): vLLM rejects those requests",
                        f"use a workload of requests up to {facts.max_context} tokens (in a sweep: models[].workload)")]
    if longest_request and not r.max_model_len_auto and r.max_model_len < longest_request:
        return [Finding("error", "max_model_len",
                        f"max_model_len {r.max_model_len} is shorter than the workload's longest request "
                        f"({longest_request} tokens, prompt + output): vLLM rejects those requests",
                        f"set max_model_len >= {longest_request}, or use a workload of shorter requests")]
    if r.max_model_len > facts.max_context:
        scaled = f" x RoPE factor {facts.rope_scaling_factor:g}" if facts.rope_scaling_factor != 1 else ""
        return [Finding("error", "max_model_len",
                        f"max_model_len {r.max_model_len} exceeds the longest context {facts.name} allows: "
                        f"{facts.max_context} ({facts.max_context_key}={facts.max_position_embeddings}{scaled}); "
                        f"vLLM refuses to start",
                        f"set max_model_len <= {facts.max_context}")]
    return []


# ---------------------------------------------------------------------------------------------- memory


def _util(r: Resolved) -> str:
    """'gpu_memory_utilization 0.9', or with servers sharing a GPU the share each one runs with."""
    if r.servers_per_gpu == 1:
        return f"gpu_memory_utilization {r.gpu_memory_utilization:g}"
    return (f"gpu_memory_utilization {r.gpu_memory_utilization:g} / servers_per_gpu {r.servers_per_gpu} = "
            f"{r.server_utilization:g} per server")


def check_memory(facts: ModelFacts, hw: Hardware, r: Resolved, mem: Memory, cap: Capacity) -> list[Finding]:
    """Memory of one server (`estimate.memory`: with servers_per_gpu N, each server's share of its GPU)."""
    out: list[Finding] = []
    where = "the CPU node" if hw.is_cpu else f"each {hw.name}"
    if r.servers_per_gpu > 1:
        where = f"each of the {r.servers_per_gpu} servers sharing " + ("the CPU node" if hw.is_cpu else
                                                                      f"one {hw.name}")
    if hw.is_cpu:
        out += _cpu_memory(hw, r, mem, cap)
    else:
        budget = mem.requested
        if mem.weights + mem.reserve >= budget and mem.mode == "gpu":
            more_tp = _next_tp(facts, hw, r)
            fix = []
            if more_tp:
                fix.append(f"tensor_parallel_size {more_tp}")
            if r.quantization is None and facts.quant is None and hw.arch in ("ada", "hopper"):
                fix.append("quantization fp8 (halves the weights)")
            if r.servers_per_gpu > 1:
                fix = [f"servers_per_gpu {r.servers_per_gpu - 1}" if r.servers_per_gpu > 2 else "servers_per_gpu 1"]
            if r.gpu_memory_utilization < 0.95:
                fix.append("a higher gpu_memory_utilization")
            oom = r.servers_per_gpu * (mem.weights + mem.outside_budget) > mem.total
            key = ("servers_per_gpu" if r.servers_per_gpu > 1 else
                   "tensor_parallel_size" if r.tp < hw.count else "gpu_memory_utilization")
            out.append(Finding(
                "error", key,
                f"weights need {_gib(mem.weights)} per {'server' if r.servers_per_gpu > 1 else 'GPU'} and vLLM's "
                f"runtime reserve ~{_gib(mem.reserve)}, more than {_util(r)} x {hw.memory_gib:.2f} GiB = "
                f"{_gib(budget)} on {where}: "
                + ("loading fails with CUDA out of memory" if oom else
                   "nothing is left for the KV cache and vLLM refuses to start"),
                "use " + " or ".join(fix) if fix else "use a larger GPU or a smaller model"))
            return out
        if mem.mode == "explicit" and mem.requested + mem.outside_budget > mem.total:
            out.append(Finding(
                "error", "kv_cache_memory_bytes",
                f"kv_cache_memory_bytes {_gib(mem.kv_budget)} plus weights {_gib(mem.weights)}, vLLM's runtime "
                f"reserve ~{_gib(mem.reserve)} and the CUDA context/graphs ~{_gib(mem.outside_budget)} exceed "
                f"the {hw.memory_gib:.2f} GiB of each {hw.name}: CUDA out of memory at start-up",
                f"set kv_cache_memory_bytes <= "
                f"{max(0.0, (mem.total - mem.outside_budget - mem.weights - mem.reserve) / GIB):.1f}Gi"))
        if hw.free_memory_gib and r.kv_cache_memory_bytes is None:
            free = min(hw.free_memory_gib[: max(1, r.tp * r.replicas)])
            if free * GIB < r.servers_per_gpu * mem.requested:
                out.append(Finding(
                    "error", "gpu_memory_utilization",
                    f"only {free:.2f} GiB is free on a GPU now (other processes hold memory), less than "
                    f"gpu_memory_utilization {r.gpu_memory_utilization:g} x {hw.memory_gib:.2f} GiB = "
                    f"{_gib(r.servers_per_gpu * mem.requested)}: vLLM refuses to start",
                    f"lower gpu_memory_utilization to <= {free / hw.memory_gib - 0.02:.2f} or free the GPU"))
        n = r.servers_per_gpu  # every server on the GPU takes its budget and its context/graphs outside it
        if mem.mode == "gpu" and n * (mem.requested + mem.outside_budget) > mem.total:
            headroom = mem.total - n * mem.requested
            out.append(Finding(
                "warning", "gpu_memory_utilization",
                f"gpu_memory_utilization {r.gpu_memory_utilization:g} leaves {_gib(headroom)} of the "
                f"{hw.memory_gib:.2f} GiB outside vLLM's budget, but the CUDA context and NCCL (~{CUDA_CTX_GIB:.2f} "
                f"GiB, taken before the budget)"
                + (" and the CUDA graphs (captured after the KV cache, outside the budget in this vLLM)"
                   if mem.outside_budget > CUDA_CTX_GIB * GIB + 1 else "")
                + f" need ~{_gib(n * mem.outside_budget)}"
                + (f" for the {n} servers" if n > 1 else "")
                + ": start-up may fail on free memory or CUDA out of memory",
                f"keep gpu_memory_utilization <= {max(0.5, (mem.total - mem.outside_budget) / mem.total - 0.005):.2f}"))
    if mem.kv_budget <= 0 or not cap.fits_one_request:
        need = cap.blocks_per_request * cap.bytes_per_block
        fix = (f"set max_model_len <= {cap.max_fitting_len}" if cap.max_fitting_len > 0
               else "free memory for the KV cache (more TP, quantization, or higher gpu_memory_utilization)")
        if r.servers_per_gpu > 1:
            fix += f", or fewer servers_per_gpu than {r.servers_per_gpu}"
        if not hw.is_cpu and r.gpu_memory_utilization < 0.95:
            fix += f", or raise gpu_memory_utilization above {r.gpu_memory_utilization:g}"
        out.append(Finding(
            "error", "servers_per_gpu" if r.servers_per_gpu > 1 else "max_model_len",
            (f"{_util(r)}: " if r.servers_per_gpu > 1 else "") +
            f"the KV cache left on {where} ({_gib(max(mem.kv_budget, 0))}, {cap.num_blocks} blocks of "
            f"{r.block_size}) cannot hold one {r.max_model_len}-token request ({_gib(need)} + one reserved block): "
            f"vLLM refuses to start", fix))
    elif cap.max_concurrency < 1.5 and not r.max_model_len_auto:
        out.append(Finding(
            "warning", "max_model_len",
            f"the KV cache holds only {cap.max_concurrency:.2f} requests of max_model_len {r.max_model_len} "
            f"({cap.tokens:,} tokens): long requests will queue or be preempted",
            "lower max_model_len, or free memory for the KV cache"))
    return out


def _cpu_memory(hw: Hardware, r: Resolved, mem: Memory, cap: Capacity) -> list[Finding]:
    out: list[Finding] = []
    avail = hw.available_memory_gib
    requested = r.servers_per_gpu * mem.requested  # every server on the node claims its share
    if mem.mode == "cpu-auto":
        if avail is not None and requested > avail * GIB:
            out.append(Finding(
                "error", "gpu_memory_utilization",
                f"on the CPU build, gpu_memory_utilization is the share of the memory node vLLM claims: "
                f"{r.gpu_memory_utilization:g} x {hw.memory_gib:.2f} GiB = {_gib(requested)}, but only "
                f"{avail:.2f} GiB is available: vLLM refuses to start",
                _cpu_fix(hw)))
        elif avail is not None and requested > (avail - CPU_LAUNCH_MARGIN_GIB) * GIB:
            out.append(Finding(
                "warning", "gpu_memory_utilization",
                f"{r.gpu_memory_utilization:g} x {hw.memory_gib:.2f} GiB = {_gib(requested)} leaves less than "
                f"{CPU_LAUNCH_MARGIN_GIB:g} GiB of the {avail:.2f} GiB available for vLLM's own processes, which start "
                f"before its memory check: the start-up may be refused", _cpu_fix(hw, CPU_LAUNCH_MARGIN_GIB)))
    elif avail is not None and mem.kv_budget > avail * GIB:
        out.append(Finding(
            "error", "VLLM_CPU_KVCACHE_SPACE",
            f"the fixed KV cache ({_gib(mem.kv_budget)}) is more than the {avail:.2f} GiB available on the memory "
            f"node: vLLM refuses to start",
            f"set VLLM_CPU_KVCACHE_SPACE <= {int(avail)}"))
    return out


def _cpu_fix(hw: Hardware, margin_gib: float = 0.0) -> str:
    util = cpu_utilization_that_fits(hw, margin_gib)
    if util <= 0:
        return "free memory on the node, or set VLLM_CPU_KVCACHE_SPACE (GiB) for a fixed KV cache"
    return (f"lower gpu_memory_utilization to <= {util:.2f} (the highest that fits the memory available now), or set "
            f"VLLM_CPU_KVCACHE_SPACE (GiB) for a fixed KV cache")


def _next_tp(facts: ModelFacts, hw: Hardware, r: Resolved) -> int | None:
    for t in (2, 4, 8, 16):
        if t > r.tp and t * r.replicas * r.pp <= hw.count and facts.num_attention_heads % t == 0:
            return t
    return None


# ---------------------------------------------------------------------------------------------- scheduler


def check_scheduler(r: Resolved) -> list[Finding]:
    out: list[Finding] = []
    if r.max_num_batched_tokens < r.max_num_seqs:
        out.append(Finding("error", "max_num_seqs",
                           f"max_num_seqs {r.max_num_seqs} > max_num_batched_tokens {r.max_num_batched_tokens}: "
                           f"vLLM requires max_num_batched_tokens >= max_num_seqs (every running sequence needs at "
                           f"least one token per step) and refuses to start",
                           f"set max_num_seqs <= {r.max_num_batched_tokens} or raise max_num_batched_tokens"))
    if not r.enable_chunked_prefill and r.max_num_batched_tokens < r.max_model_len:
        out.append(Finding("error", "max_num_batched_tokens",
                           f"with chunked prefill off, a prompt is prefilled in one step, so max_num_batched_tokens "
                           f"{r.max_num_batched_tokens} must be >= max_model_len {r.max_model_len}; vLLM refuses to "
                           f"start",
                           f"set max_num_batched_tokens >= {r.max_model_len}, or enable_chunked_prefill: true"))
    if r.max_num_batched_tokens > r.max_num_seqs * r.max_model_len:
        out.append(Finding("warning", "max_num_batched_tokens",
                           f"max_num_batched_tokens {r.max_num_batched_tokens} exceeds max_num_seqs x max_model_len "
                           f"= {r.max_num_seqs * r.max_model_len}: the surplus can never be scheduled, but vLLM still "
                           f"reserves activation memory for it",
                           f"set max_num_batched_tokens <= {r.max_num_seqs * r.max_model_len}"))
    return out


# ---------------------------------------------------------------------------------------------- platform


def check_platform(facts: ModelFacts, hw: Hardware, r: Resolved, quant_methods: Iterable[str] | None) -> list[Finding]:
    out: list[Finding] = []
    # Block size: FlashAttention / Triton attention on CUDA take multiples of 16; the CPU attention kernel
    # multiples of 32 (vllm/v1/attention/backends/*: get_supported_kernel_block_sizes).
    if hw.is_cpu:
        if r.block_size % 32:
            out.append(Finding("warning", "block_size",
                               f"block_size {r.block_size} is not a multiple of 32: vLLM's CPU attention kernel works "
                               f"in 32-token blocks and warns that this is slow",
                               "use 32, 64 or 128 (the CPU default)"))
    elif r.block_size % 16:
        out.append(Finding("error", "block_size",
                           f"block_size {r.block_size} is not a multiple of 16, which the CUDA attention backends "
                           f"(FlashAttention, Triton) require",
                           "use 16 (the default) or 32"))
    out += _check_quantization(facts, hw, r, quant_methods)
    out += _check_kv_dtype(hw, r)
    if facts.dtype_for("auto") == "float16" and r.dtype == "bfloat16" and "dtype" in r.explicit:
        out.append(Finding("info", "dtype", "the checkpoint is float16; running it in bfloat16 changes numerics"))
    return out


def _check_quantization(facts: ModelFacts, hw: Hardware, r: Resolved,
                        quant_methods: Iterable[str] | None) -> list[Finding]:
    out: list[Finding] = []
    q = r.quantization
    ckpt = facts.quant
    if q is None:
        return out
    ql = q.lower()
    known = list(quant_methods) if quant_methods is not None else None
    if known is not None and ql not in {m.lower() for m in known}:
        close = difflib.get_close_matches(ql, known, n=3, cutoff=0.5)
        hint = "; closest: " + ", ".join(close) if close else ""
        dropped = " (SqueezeLLM support was removed from vLLM)" if ql == "squeezellm" else ""
        out.append(Finding("error", "quantization",
                           f"quantization '{q}' does not exist in the installed vLLM{dropped}{hint}",
                           "use null (unquantized), fp8 on Ada/Hopper, or awq/gptq with such a checkpoint"))
        return out
    if ckpt is not None:
        if not _same_family(ckpt.method, ql):
            out.append(Finding("error", "quantization",
                               f"the checkpoint is quantized with {ckpt.method}, but quantization is '{q}': vLLM "
                               f"refuses a method that does not match the checkpoint's",
                               f"set quantization: null (vLLM reads {ckpt.method} from the checkpoint)"))
            return out
    elif ql in CHECKPOINT_METHODS or (ql not in ONLINE_METHODS and quant_family(ql) in ("awq", "gptq")):
        out.append(Finding("error", "quantization",
                           f"quantization '{q}' needs a checkpoint quantized with {quant_family(ql).upper()} (packed "
                           f"weights and scales); {facts.name} is an unquantized {facts.config_dtype} checkpoint, so "
                           f"vLLM fails to load it",
                           "use an AWQ/GPTQ checkpoint of this model, or quantization: fp8 (quantizes while loading, "
                           "Ada/Hopper)"))
        return out
    fam = quant_family(ql)
    if fam == "fp8":
        if hw.is_cpu:
            out.append(Finding("error", "quantization",
                               "FP8 quantization needs an NVIDIA GPU (Ada or Hopper FP8 tensor cores, or Ampere's "
                               "weight-only FP8 Marlin kernels); the CPU build does not run it",
                               "set quantization: null on CPU"))
        elif hw.arch == "ampere":
            out.append(Finding("warning", "quantization",
                               f"{hw.name} (Ampere) has no FP8 tensor cores: vLLM runs FP8 as weight-only (W8A16 "
                               f"Marlin), halving weight memory but not computing in FP8",
                               "fine for memory; for FP8 speed use Ada (L40S, L4) or Hopper (H100, H200)"))
        elif hw.arch not in ("ada", "hopper"):
            out.append(Finding("error", "quantization",
                               f"FP8 needs compute capability >= 8.0 (Ampere weight-only) or 8.9 (Ada/Hopper FP8); "
                               f"{hw.name} is {hw.compute_capability}",
                               "set quantization: null"))
    elif fam in ("awq", "gptq") and hw.is_cpu:
        out.append(Finding("warning", "quantization",
                           f"{fam.upper()} on the CPU build runs through its CPU kernels; the planner's memory figures "
                           f"assume the GPU layout", ""))
    return out


def _check_kv_dtype(hw: Hardware, r: Resolved) -> list[Finding]:
    if not r.kv_cache_dtype.startswith("fp8"):
        return []
    if hw.is_cpu:
        return [Finding("warning", "kv_cache_dtype",
                        "an FP8 KV cache on the CPU build is not a tuned path; expect it to be slower than auto",
                        "use kv_cache_dtype: auto on CPU")]
    if hw.arch == "ampere":
        return [Finding("warning", "kv_cache_dtype",
                        f"{hw.name} (Ampere) lacks FP8 hardware: an FP8 KV cache halves its memory but is converted "
                        f"on every read, and FlashAttention does not take it there (vLLM picks a slower backend)",
                        "prefer kv_cache_dtype: auto on Ampere unless KV memory is the limit")]
    return [Finding("info", "kv_cache_dtype",
                    "FP8 KV cache: twice the tokens per GiB; without calibrated scales (k_scale/v_scale) vLLM uses "
                    "1.0, which can cost accuracy")]


# ---------------------------------------------------------------------------------------------- keys


def check_keys(settings: dict[str, Any], argspec: Any, source: str | None = None) -> list[Finding]:
    """Keys the installed vLLM does not accept, each with the closest valid key (via ArgSpec.check, one at a time)."""
    from harness.errors import UserError

    out: list[Finding] = []
    if argspec is None:
        return out
    for key, value in settings.items():
        if key in HARNESS_ONLY_KEYS:
            continue
        try:
            argspec.check({key: value}, source)
        except UserError as exc:
            msg = str(exc)
            prefix = ": ".join(p for p in (source, key) if p)
            if prefix and msg.startswith(prefix + ": "):
                msg = msg[len(prefix) + 2:]
            out.append(Finding("error", key, msg, _key_fix(key, msg, argspec)))
    return out


_KEY_ADVICE = REMOVED_KEYS


def _key_fix(key: str, message: str, argspec: Any) -> str:
    if key in _KEY_ADVICE:
        advice = _KEY_ADVICE[key]
        if "kv_offloading_size" in advice and "kv_offloading_size" not in getattr(argspec, "args", {}):
            advice = advice.split("; for CPU offload")[0]
        return advice
    if "closest" in message:
        return "rename it to the closest valid key named above"
    return "remove it, or check `vllm serve --help` for the current name"
