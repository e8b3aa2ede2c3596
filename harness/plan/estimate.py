"""The arithmetic vLLM does at start-up, done first: memory budget, KV-cache blocks and tokens, concurrency, roofline.

vLLM (0.26-0.32, vllm/v1/worker/gpu_worker.py `determine_available_memory`, vllm/utils/mem_utils.py
`memory_profiling`) gives the KV cache what is left of `ceil(total x gpu_memory_utilization)` after everything the
instance allocated since its start-up snapshot (taken after the CUDA context and NCCL are up):

    KV budget = ceil(total x util) - weights - non-torch growth - activation peak of the profiling pass
                - CUDA-graph memory estimate (since v0.21, VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1)

then `num_blocks = budget // (block_size x KV bytes per token x layers...)`, and it logs
"KV cache size: int(num_blocks / cdiv(max_model_len, block_size) x max_model_len) tokens". It refuses to start when
`budget - one block` cannot hold one request of max_model_len (vllm/v1/core/kv_cache_utils.py
`check_enough_kv_cache_memory`; one block is BlockPool's null block).

The reserve terms (non-torch, activations, CUDA graphs) are modelled from what they consist of and calibrated on
measured vLLM start-ups (CALIBRATION below); weights and KV arithmetic are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from harness.plan.defaults import VllmDefaults, as_bool, cudagraph_graph_count
from harness.plan.hardware import GIB, Hardware
from harness.plan.modelfacts import DTYPE_BYTES, GPT2_LIKE, ModelFacts
from harness.settings import Topology

# ---------------------------------------------------------------------------------------------- calibration
#
# The reserve terms were measured with vLLM 0.26 on one H100 80GB (CUDA total 79.18 GiB), random-weight models
# of the real architectures, reading the KV tokens each start-up logged (reserve = ceil(total x util) - weights -
# KV tokens x bytes per token); tests/test_plan_calibration.py replays every run:
#
#   model (hidden, intermediate, layers)   max_num_batched_tokens -> reserve GiB          eager
#   886M Llama (2048, 5632, 16)            2048: 0.396  8192: 0.659  32768: 1.714         8192: 0.611
#   Mistral-7B (4096, 14336, 32)           2048: 0.524  8192: 1.157  16384: 2.000         8192: 1.108
#   CodeLlama-13B (5120, 13824, 40)        2048: 0.617  8192: 1.224
#   DialoGPT-medium / GPT-2 (1024, 4096, 24)            8192: 0.418
#
# The reserve is linear in max_num_batched_tokens (the profiling forward pass) with a near-constant intercept:
# 46,080 B/token = 2 x (3 x 2048 + 3 x 5632) for the 886M model and 110,592 = 2 x (3 x 4096 + 3 x 14336) for
# Mistral, i.e. three hidden-size and three intermediate-size activations per token; GPT-2's ungated MLP fits
# 3 x hidden + 1 x intermediate. max_num_seqs (64 vs 1024) did not move it: the sampler pass never was the peak.

# Fixed part: non-torch growth (cuBLAS / attention workspaces: vLLM logged 0.22 GiB for every model) plus allocator
# slack; 0.05 GiB more with torch.compile than with --enforce-eager (886M: 0.308 vs 0.259, Mistral: 0.313 vs 0.264).
BASE_GIB = 0.31
BASE_EAGER_GIB = 0.26
# Live activations per token at the profiling pass's peak, in model-dtype elements: 3 x hidden + 3 x intermediate/tp
# (gated SiLU MLP: gate_up output 2I and its product I), or 3 x hidden + 1 x intermediate/tp (GPT-2's GELU MLP).
ACT_HIDDEN = 3.0
ACT_INTER_GATED = 3.0
ACT_INTER_UNGATED = 1.0
# The dummy sampler pass: fp32 logits for max_num_seqs rows plus one temporary of that size. An upper bound the data
# allows (at 1024 rows x 32000 it stayed below the 886M model's 0.35 GiB forward peak, so <= 2.8 copies); it only
# decides for large vocabularies with small max_num_batched_tokens.
SAMPLER_COPIES = 2.0
# With TP > 1, NCCL allocates its channel buffers lazily at the first collective (during profiling, so inside the
# budget), plus vLLM's custom all-reduce buffers on NVLink. Not measured here (one-GPU hosts); NCCL's default
# 4 MiB buffers over a handful of channels and peers come to ~0.1-0.3 GiB: 0.2 is the planning figure.
TP_EXTRA_GIB = 0.2
# CUDA-graph memory per captured graph and decoder layer (vLLM >= 0.27 subtracts its profiled estimate from the KV
# budget). From "Graph capturing finished ... took X GiB" over 102 graphs: 886M 0.42 GiB (0.26 MiB per layer-graph),
# Mistral 0.98 (0.30), CodeLlama-13B 1.20 (0.29), GPT-2 medium 0.39 (0.16): 0.10 + 0.08 x hidden/1024, at most 0.30.
# Runs with max_num_batched_tokens 2048 took 0.2 GiB less than this predicts for the 7B/13B models.
CUDAGRAPH_MIB_PER_LAYER_GRAPH_BASE = 0.10
CUDAGRAPH_MIB_PER_LAYER_GRAPH_PER_1K_HIDDEN = 0.08
CUDAGRAPH_MIB_PER_LAYER_GRAPH_MAX = 0.30
# CPU worker RSS besides weights and activations: Python, torch, vLLM and oneDNN. vLLM 0.32's CPU build sizes the KV
# cache as ceil(node total x util) - the worker's RSS (vllm/v1/worker/cpu_worker.py determine_available_memory:
# `psutil.Process(os.getpid()).memory_info().rss`), read after `warming_up_model()`, which with --enforce-eager
# (CompilationMode.NONE) returns at once (vllm/v1/worker/cpu_model_runner.py warming_up_model: `if mode ==
# CompilationMode.NONE: return`): no forward pass has run, so the RSS holds no activations and does not depend on
# max_num_seqs, max_num_batched_tokens, block_size or prefix caching. Measured on the tiny Llama of `python -m
# harness.models tiny` (4.5M parameters, 8.9 MB of weights), max_model_len 512, util 0.25 and 0.2, nodes of 11.59 to
# 13.59 GiB: every start-up (14, defaults and max_num_seqs 5-128 x max_num_batched_tokens 256-2048 x block 32-128,
# prefix caching on and off) logged "0.63 GiB memory was consumed by non-kv usages"; from the KV tokens on the
# 13.59 GiB node the RSS is 0.6306-0.6311 GiB, i.e. 0.622 GiB besides the weights.
CPU_RSS_BASE_GIB = 0.622
# Without --enforce-eager the CPU worker compiles (CompilationMode.DYNAMO_TRACE_ONCE, inductor; vllm/platforms/cpu.py
# check_and_update_config) and warming_up_model runs profile_run (a forward over max_num_batched_tokens) before the
# RSS is read. Same tiny model and 13.59 GiB node, defaults, util 0.25: "0.69 GiB memory was consumed by non-kv
# usages", 1,420,160 tokens (RSS 0.688 GiB) vs 1,450,112 (0.631) eager: 0.057 GiB more, of which the activation term
# explains 0.009; the rest is Dynamo / Inductor and the compiled code. One start-up: the model-size dependence of
# this term is not measured.
CPU_COMPILE_RSS_GIB = 0.048
# Allocated before vLLM's start-up snapshot, so outside gpu_memory_utilization: the CUDA context, NCCL and gloo
# set-up. vLLM 0.26 on the H100 logged "worker init memory snapshot: ... non_torch_memory=1.12GiB" for every model.
CUDA_CONTEXT_GIB = 1.12


@dataclass
class Resolved:
    """A candidate's settings with vLLM's defaults filled in: the values vLLM will actually run with."""

    tp: int
    pp: int
    replicas: int
    max_model_len: int
    max_model_len_auto: bool  # max_model_len -1: vLLM fits it to memory
    block_size: int
    max_num_batched_tokens: int
    max_num_seqs: int
    gpu_memory_utilization: float
    enable_chunked_prefill: bool
    enable_prefix_caching: bool
    dtype: str  # the dtype the weights run in
    kv_cache_dtype: str
    cache_dtype_bytes: float
    quantization: str | None
    enforce_eager: bool
    kv_cache_memory_bytes: int | None
    explicit: frozenset[str] = field(default_factory=frozenset)
    servers_per_gpu: int = 1  # gpu_memory_utilization above is the configuration's; each server plans its share

    @property
    def topology(self) -> Topology:
        return Topology(replicas=self.replicas, tp=self.tp, pp=self.pp, servers_per_gpu=self.servers_per_gpu)

    @property
    def server_utilization(self) -> float:
        """The gpu_memory_utilization each server runs with (the configuration's, split by servers_per_gpu)."""
        return self.topology.server_utilization(self.gpu_memory_utilization)

    @property
    def world_size(self) -> int:
        return self.topology.per_replica

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "explicit"}
        d["server_gpu_memory_utilization"] = self.server_utilization
        return d


class SettingError(ValueError):
    """A setting value the planner cannot compute with (wrong type, out of range): becomes an error finding."""

    def __init__(self, key: str, message: str, fix: str) -> None:
        super().__init__(message)
        self.key, self.message, self.fix = key, message, fix


def _int(settings: dict[str, Any], key: str, default: int, minimum: int = 1) -> int:
    v = settings.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise SettingError(key, f"{key} must be an integer, got {v!r}", f"set {key} to a whole number")
    try:
        iv = int(str(v).strip()) if isinstance(v, str) else int(v)
    except ValueError:
        raise SettingError(key, f"{key} must be an integer, got {v!r}", f"set {key} to a whole number") from None
    if iv != v and not isinstance(v, str):
        raise SettingError(key, f"{key} must be an integer, got {v!r}", f"set {key} to a whole number")
    if iv < minimum and not (key == "max_model_len" and iv == -1):
        raise SettingError(key, f"{key} must be at least {minimum}, got {iv}", f"set {key} >= {minimum}")
    return iv


def resolve(facts: ModelFacts, hw: Hardware, settings: dict[str, Any], defaults: VllmDefaults) -> Resolved:
    """Fill in vLLM's defaults exactly as vLLM 0.32's EngineArgs does (see harness.plan.defaults)."""
    tp = _int(settings, "tensor_parallel_size", 1)
    pp = _int(settings, "pipeline_parallel_size", 1)
    replicas = _int(settings, "replicas", 1)
    servers_per_gpu = _int(settings, "servers_per_gpu", 1)
    raw_len = settings.get("max_model_len")
    max_len = _int(settings, "max_model_len", facts.max_context, minimum=1)
    auto_len = raw_len is not None and max_len == -1
    if auto_len:
        max_len = facts.max_context

    util_raw = settings.get("gpu_memory_utilization")
    if util_raw is None:
        util = defaults.gpu_memory_utilization
    else:
        try:
            util = float(util_raw)
        except (TypeError, ValueError):
            raise SettingError("gpu_memory_utilization", f"gpu_memory_utilization must be a number, got {util_raw!r}",
                               "set a fraction such as 0.9") from None
        if isinstance(util_raw, bool) or not 0 < util <= 1:
            raise SettingError("gpu_memory_utilization",
                               f"gpu_memory_utilization must be in (0, 1], got {util_raw!r} (vLLM rejects it)",
                               "set a fraction such as 0.9")

    chunked = as_bool(settings.get("enable_chunked_prefill"))
    chunked = defaults.enable_chunked_prefill if chunked is None else chunked
    prefix = as_bool(settings.get("enable_prefix_caching"))
    prefix = defaults.enable_prefix_caching if prefix is None else prefix

    block_default = defaults.cpu_block_size if hw.is_cpu else defaults.gpu_block_size
    block = _int(settings, "block_size", block_default)

    mnbt_default, mns_default = defaults.batch_defaults(hw.memory_gib, hw.name, tp * pp, hw.is_cpu)
    mns_given = settings.get("max_num_seqs") is not None
    mnbt_given = settings.get("max_num_batched_tokens") is not None
    mns = _int(settings, "max_num_seqs", mns_default)
    mnbt = _int(settings, "max_num_batched_tokens", mnbt_default)
    if not mnbt_given:  # vllm/engine/arg_utils.py _set_default_max_num_seqs_and_batched_tokens_args
        if not chunked:
            mnbt = max(max_len, mnbt)
        mnbt = min(mns * max_len, mnbt)
    if not mns_given:
        mns = min(mns, mnbt)

    dtype_raw = settings.get("dtype")
    try:
        dtype = facts.dtype_for(None if dtype_raw is None else str(dtype_raw))
        DTYPE_BYTES[dtype]
    except KeyError:
        raise SettingError("dtype", f"unknown dtype {dtype_raw!r}",
                           "use auto, bfloat16, float16 or float32") from None
    kv_dtype = str(settings.get("kv_cache_dtype") or "auto")
    if kv_dtype == "auto":
        cache_bytes = DTYPE_BYTES[dtype]
    elif kv_dtype in DTYPE_BYTES:
        cache_bytes = DTYPE_BYTES[kv_dtype]
    elif kv_dtype.startswith("fp8"):
        cache_bytes = 1
    else:
        raise SettingError("kv_cache_dtype", f"the planner does not model kv_cache_dtype {kv_dtype!r}",
                           "use auto, bfloat16, float16 or fp8")
    quant = settings.get("quantization")
    quant = None if quant in (None, "", "none", "None") else str(quant)
    kv_mem = settings.get("kv_cache_memory_bytes")
    kv_mem_bytes = None
    if kv_mem is not None:
        kv_mem_bytes = _parse_bytes(kv_mem)
    explicit = frozenset(k for k, v in settings.items() if v is not None)
    return Resolved(tp=tp, pp=pp, replicas=replicas, max_model_len=max_len, max_model_len_auto=auto_len,
                    block_size=block, max_num_batched_tokens=mnbt, max_num_seqs=mns, gpu_memory_utilization=util,
                    enable_chunked_prefill=bool(chunked), enable_prefix_caching=bool(prefix), dtype=dtype,
                    kv_cache_dtype=kv_dtype, cache_dtype_bytes=cache_bytes, quantization=quant,
                    enforce_eager=bool(as_bool(settings.get("enforce_eager"))), kv_cache_memory_bytes=kv_mem_bytes,
                    explicit=explicit, servers_per_gpu=servers_per_gpu)


def _parse_bytes(v: Any) -> int:
    """vLLM's human-readable ints: 8589934592, '8G' (1e9), '8Gi' (2**30)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return int(v)
    s = str(v).strip()
    units = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    for suffix in sorted(units, key=len, reverse=True):
        if s.lower().endswith(suffix):
            try:
                return int(float(s[: -len(suffix)]) * units[suffix])
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise SettingError("kv_cache_memory_bytes", f"kv_cache_memory_bytes must be a byte count, got {v!r}",
                           "write bytes, or with a unit: 8Gi") from None


# ---------------------------------------------------------------------------------------------- memory


@dataclass
class Memory:
    """One server's memory on its GPU (or the CPU node), in bytes, split the way vLLM's profiler splits it. With
    servers_per_gpu N, each of the N servers on a GPU has this (weights and reserve once per server, its share of
    the utilization); `total` is still the whole device's."""

    total: int
    requested: int  # ceil(total x util) on GPU; on CPU the same request, or the explicit KV size
    weights: float
    nontorch: float
    activation: float
    cudagraph: float
    kv_budget: float
    mode: str  # "gpu" | "cpu-auto" | "cpu-explicit" | "explicit" (kv_cache_memory_bytes)
    outside_budget: float = 0.0  # GPU memory the instance uses beyond `requested`: CUDA context, NCCL, graphs

    @property
    def reserve(self) -> float:
        return self.nontorch + self.activation + self.cudagraph


def activation_peak_bytes(facts: ModelFacts, r: Resolved) -> float:
    """Transient peak of vLLM's profiling pass: a forward over max_num_batched_tokens, then a dummy sampler run."""
    act_bytes = DTYPE_BYTES[r.dtype]
    inter = ACT_INTER_UNGATED if facts.model_type in GPT2_LIKE else ACT_INTER_GATED
    per_token = act_bytes * (ACT_HIDDEN * facts.hidden_size + inter * facts.intermediate_size / r.tp)
    forward = r.max_num_batched_tokens * per_token
    sampler = min(r.max_num_seqs, r.max_num_batched_tokens) * facts.vocab_size * 4 * SAMPLER_COPIES
    return max(forward, sampler)


def cudagraph_bytes(facts: ModelFacts, r: Resolved, defaults: VllmDefaults, *, captured: bool = False) -> float:
    """The CUDA-graph memory vLLM subtracts from the KV budget (0 with enforce_eager, or in vLLM 0.26);
    `captured=True`: what the graphs take when captured, whether or not the budget accounted for it."""
    if r.enforce_eager or not (captured or defaults.subtracts_cudagraph_estimate):
        return 0.0
    graphs = cudagraph_graph_count(r.max_num_seqs, r.max_num_batched_tokens, defaults)
    per = min(CUDAGRAPH_MIB_PER_LAYER_GRAPH_MAX, CUDAGRAPH_MIB_PER_LAYER_GRAPH_BASE
              + CUDAGRAPH_MIB_PER_LAYER_GRAPH_PER_1K_HIDDEN * facts.hidden_size / 1024)
    return graphs * facts.num_layers / r.pp * per * 2**20


def memory(facts: ModelFacts, hw: Hardware, r: Resolved, defaults: VllmDefaults) -> Memory:
    weights = facts.weight_bytes(r.dtype, r.quantization, r.tp) / r.pp
    if hw.is_cpu:
        # The CPU worker's warm-up runs the profiling forward pass only when it compiles (cpu_model_runner.py
        # warming_up_model); with enforce_eager the RSS that vLLM subtracts holds no activations.
        activation = 0.0 if r.enforce_eager else activation_peak_bytes(facts, r)
        total = hw.memory_bytes
        requested = math.ceil(total * r.server_utilization)
        if r.kv_cache_memory_bytes is not None:
            return Memory(total, r.kv_cache_memory_bytes, weights, 0, activation, 0, r.kv_cache_memory_bytes,
                          "explicit")
        if hw.cpu_kv_cache_space_gib is not None:
            kv = int(hw.cpu_kv_cache_space_gib * GIB)
            return Memory(total, kv, weights, 0, activation, 0, kv, "cpu-explicit")
        nontorch = (CPU_RSS_BASE_GIB + (0.0 if r.enforce_eager else CPU_COMPILE_RSS_GIB)) * GIB
        rss = nontorch + weights + activation
        return Memory(total, requested, weights, nontorch, activation, 0.0, requested - rss, "cpu-auto")
    total = hw.memory_bytes
    requested = math.ceil(total * r.server_utilization)
    base = BASE_EAGER_GIB if r.enforce_eager else BASE_GIB
    nontorch = base * GIB + (TP_EXTRA_GIB * GIB if r.tp > 1 else 0)
    activation = activation_peak_bytes(facts, r)
    graphs = cudagraph_bytes(facts, r, defaults)
    outside = CUDA_CONTEXT_GIB * GIB + cudagraph_bytes(facts, r, defaults, captured=True) - graphs
    if r.kv_cache_memory_bytes is not None:
        used = weights + nontorch + activation + graphs + r.kv_cache_memory_bytes
        return Memory(total, int(used), weights, nontorch, activation, graphs, r.kv_cache_memory_bytes, "explicit",
                      outside)
    kv = requested - weights - nontorch - activation - graphs
    return Memory(total, requested, weights, nontorch, activation, graphs, kv, "gpu", outside)


# ---------------------------------------------------------------------------------------------- KV capacity


@dataclass
class Capacity:
    bytes_per_token: int  # per GPU (per TP shard)
    bytes_per_block: int
    num_blocks: int
    blocks_per_request: int
    tokens: int  # vLLM's logged "KV cache size: N tokens"
    max_concurrency: float  # requests of max_model_len that fit at once
    fits_one_request: bool
    max_fitting_len: int  # the longest max_model_len one request could have with this budget


def blocks_per_request(facts: ModelFacts, r: Resolved, max_len: int | None = None) -> int:
    """Blocks one request of max_model_len holds: all of them, or a sliding window's worth plus one."""
    length = r.max_model_len if max_len is None else max_len
    if facts.sliding_window:
        # vllm/v1/kv_cache_interface.py SlidingWindowSpec: window - 1 + in-flight tokens, plus one block
        tokens = min(facts.sliding_window - 1 + r.max_num_batched_tokens, length)
        return math.ceil(tokens / r.block_size) + 1
    return math.ceil(length / r.block_size)


def capacity(facts: ModelFacts, r: Resolved, kv_budget: float) -> Capacity:
    per_token = facts.kv_bytes_per_token(r.tp, r.cache_dtype_bytes) // r.pp
    per_block = per_token * r.block_size
    blocks = max(0, int(kv_budget // per_block)) if per_block else 0
    per_req = blocks_per_request(facts, r)
    concurrency = blocks / per_req if per_req else 0.0
    tokens = int(concurrency * r.max_model_len)
    fits = blocks - 1 >= per_req
    usable = max(0, blocks - 1)
    if facts.sliding_window:
        max_fit = r.max_model_len if fits else max(0, (usable - 1) * r.block_size)
    else:
        max_fit = usable * r.block_size
    return Capacity(per_token, per_block, blocks, per_req, tokens, concurrency, fits, max_fit)


# ---------------------------------------------------------------------------------------------- roofline


@dataclass
class Roofline:
    """Upper bound on decode throughput: each step reads the weights once and every running sequence's KV."""

    batch: int
    context_len: int
    step_s: float
    tok_s_per_replica: float
    tok_s_total: float
    comm_s: float  # all-reduce time per step over the GPU link (TP > 1)


def decode_roofline(facts: ModelFacts, hw: Hardware, r: Resolved, mem: Memory, cap: Capacity,
                    context_len: int | None = None) -> Roofline | None:
    """tokens/s <= batch x bandwidth / (weights per GPU + batch x context x KV bytes per token per GPU).

    Batch is what the scheduler can run at `context_len` (default: half of max_model_len, the average over a
    sequence that grows to max_model_len): min(max_num_seqs, KV tokens / context). With TP > 1, each layer
    all-reduces twice per step; that traffic over the GPU link is added (no overlap in vLLM's decode step).
    """
    if hw.bandwidth_gbps is None or cap.num_blocks <= 0:
        return None
    ctx = max(1, context_len or r.max_model_len // 2)
    fit = int((cap.num_blocks * r.block_size) // max(1, math.ceil(ctx / r.block_size) * r.block_size))
    batch = max(0, min(r.max_num_seqs, fit))
    if batch == 0:
        return None
    bw = hw.bandwidth_gbps * 1e9
    read = mem.weights + batch * ctx * cap.bytes_per_token
    step = read / bw
    comm = 0.0
    if r.tp > 1 and hw.link_gbps:
        # ring all-reduce moves 2 (tp-1)/tp of the message per GPU each way; link figure is bidirectional
        message = batch * facts.hidden_size * DTYPE_BYTES[r.dtype]
        per_step = 2 * facts.num_layers * message * 2 * (r.tp - 1) / r.tp
        comm = per_step / (hw.link_gbps * 1e9 / 2)
    # servers sharing a GPU share its bandwidth: N of them each reading their weights and KV give the same bound as
    # one, so the total stays per GPU set x replicas
    per_replica = batch / (step + comm)
    return Roofline(batch, ctx, step + comm, per_replica, per_replica * r.replicas, comm)


# ---------------------------------------------------------------------------------------------- start-up time

# Seconds from launch to ready without loading the weights, per kind of device (Hardware.arch). Measured: Hopper,
# Mistral-7B with torch.compile and CUDA graphs on H100 / H200, 114-160 s (docs/gpu-results.md), ~7 s of it the
# weights; the CPU build, the tiny model with enforce_eager on 2 cores, 40-84 s. Not measured: Ada (L40S, L4) and
# Ampere, taken as Hopper's. An estimate for planning GPU time, not a prediction of one start-up.
STARTUP_BASE_S = {"hopper": 125.0, "ada": 125.0, "ampere": 125.0, "cpu": 50.0}
STARTUP_EAGER_FRACTION = 0.5  # assumed: enforce_eager skips torch.compile and graph capture, about half the base
WEIGHTS_LOAD_GIB_S = 2.0  # assumed: safetensors from the page cache or a local NVMe; each GPU loads its own shard


def startup_estimate_s(hw: Hardware, weights_gib_per_gpu: float | None, *, enforce_eager: bool = False) -> float:
    """Expected seconds from launching a server to its first request, for a dry run's GPU-time estimate."""
    base = STARTUP_BASE_S.get(hw.arch, STARTUP_BASE_S["hopper"])
    if enforce_eager and not hw.is_cpu:
        base *= STARTUP_EAGER_FRACTION
    return base + (weights_gib_per_gpu or 0.0) / WEIGHTS_LOAD_GIB_S
