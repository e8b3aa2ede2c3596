"""What the planner plans for: a GPU catalog with datasheet figures, NVML detection, and the CPU host.

Memory is the figure vLLM itself multiplies by `gpu_memory_utilization`: the total that the driver reports
(`torch.cuda.mem_get_info()[1]`, the same number as NVML's `memory.total` and nvidia-smi's "MiB" column), which
is less than the datasheet's decimal gigabytes (ECC and reserved memory). Bandwidth and tensor throughput are
vendor datasheet figures (dense, i.e. without 2:4 sparsity); they feed the decode roofline only.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from harness.errors import UserError
from harness.nvml import nvml_session

MIB = 1024**2
GIB = 1024**3


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model as its datasheet and its driver describe it."""

    name: str  # catalog key, e.g. "L40S"
    full_name: str
    memory_mib: int  # total as NVML / nvidia-smi report it
    cuda_total_gib: float  # total as CUDA reports it (NVML total minus the driver's reservation): what vLLM sees
    memory_gb_datasheet: float
    bandwidth_gbps: float  # GB/s (decimal), datasheet
    bf16_tflops: float  # dense BF16 tensor TFLOPS, datasheet
    fp8_tflops: float | None  # dense FP8 tensor TFLOPS, datasheet; None: no FP8 tensor cores
    interconnect: str  # "nvlink" or "pcie": how several of these talk in the usual server
    link_gbps: float  # GPU-to-GPU bandwidth, GB/s bidirectional, datasheet
    arch: str  # "ada" | "hopper" | "ampere"
    compute_capability: tuple[int, int]
    nvml_names: tuple[str, ...] = ()  # NVML's device names for this model (matched whole, case-insensitive)
    aliases: tuple[str, ...] = ()


# Sources:
#  [L40S]  NVIDIA L40S datasheet: 48 GB GDDR6 with ECC, 864 GB/s, BF16 tensor 362.05 TFLOPS dense (733 with
#          sparsity), FP8 733 dense (1,466 sparse), PCIe Gen4 x16 64 GB/s bidirectional, no NVLink.
#  [H100]  NVIDIA H100 Tensor Core GPU datasheet: SXM 80 GB HBM3, 3.35 TB/s, BF16 989 TFLOPS dense (1,979 sparse),
#          FP8 1,979 dense, NVLink 900 GB/s; PCIe (H100 PCIe): 80 GB HBM2e, 2.0 TB/s, BF16 756 dense (1,513 sparse),
#          FP8 1,513 dense, PCIe Gen5 128 GB/s (NVLink bridge for pairs: 600 GB/s).
#  [H200]  NVIDIA H200 Tensor Core GPU datasheet (SXM): 141 GB HBM3e, 4.8 TB/s, BF16 989 dense, FP8 1,979 dense,
#          NVLink 900 GB/s.
#  [A100]  NVIDIA A100 Tensor Core GPU datasheet (SXM4): 40 GB HBM2 1,555 GB/s; 80 GB HBM2e 2,039 GB/s; BF16
#          312 TFLOPS dense (624 sparse); no FP8; NVLink 600 GB/s.
#  [L4]    NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, BF16 121 TFLOPS dense (242 sparse), FP8 242 dense
#          (485 sparse), PCIe Gen4 x16 64 GB/s.
#  [A10G]  AWS's variant of the A10; NVIDIA publishes no A10G datasheet. 24 GB GDDR6 and 600 GB/s as the A10
#          datasheet; tensor BF16 70 TFLOPS dense as compiled by Baseten, "NVIDIA A10 vs A10G for ML model
#          inference" (A10: 125). PCIe Gen4 x16 64 GB/s.
#  [NVML]  totals in MiB as nvidia-smi reports them: H100 81559 (also seen on this project's H100 hosts), A100 80GB
#          81920, A100 40GB 40960, L40S 46068, L4 23034, A10/A10G 23028 (modal-labs/modal-client PR #2797 lists
#          them all; A10G in NVIDIA/DCGM issue #232), H200 143771 (seen on this project's H200 hosts).
#  [CUDA]  what cudaMemGetInfo / torch report as total, which is what vLLM multiplies by gpu_memory_utilization:
#          NVML total minus the driver's "Reserved" (nvidia-smi -q). H100 SXM: 81079 MiB = 79.18 GiB measured on
#          this project's H100 (driver 580.159.04: 81559 total, 480 reserved). Others from torch's "GPU 0 has a
#          total capacity of X GiB" in published out-of-memory messages: L40 (same 48 GB board and 46068 MiB as
#          the L40S) 44.40, H200 139.80, A100 80GB 79.25, A100 40GB 39.39, A10G 22.06, L4 22.03. H100 PCIe is
#          assumed equal to H100 SXM. Present GPUs are read from NVML instead (total - reserved).
GPU_CATALOG: dict[str, GpuSpec] = {
    spec.name: spec
    for spec in (
        GpuSpec("L40S", "NVIDIA L40S", 46068, 44.40, 48, 864, 362.05, 733, "pcie", 64, "ada", (8, 9),
                ("NVIDIA L40S",), ("l40s",)),
        GpuSpec("H100-SXM", "NVIDIA H100 80GB HBM3 (SXM)", 81559, 81079 / 1024, 80, 3350, 989, 1979, "nvlink", 900,
                "hopper", (9, 0), ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB"),
                ("h100", "h100-sxm", "h100sxm", "h100-80gb")),
        GpuSpec("H100-PCIe", "NVIDIA H100 PCIe", 81559, 81079 / 1024, 80, 2000, 756, 1513, "pcie", 128, "hopper",
                (9, 0), ("NVIDIA H100 PCIe",), ("h100-pcie", "h100pcie")),
        GpuSpec("H200", "NVIDIA H200 (SXM)", 143771, 139.80, 141, 4800, 989, 1979, "nvlink", 900, "hopper", (9, 0),
                ("NVIDIA H200",), ("h200", "h200-sxm")),
        GpuSpec("A100-40GB", "NVIDIA A100-SXM4-40GB", 40960, 39.39, 40, 1555, 312, None, "nvlink", 600, "ampere",
                (8, 0), ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"), ("a100-40gb", "a100-40g", "a100_40gb")),
        GpuSpec("A100-80GB", "NVIDIA A100-SXM4-80GB", 81920, 79.25, 80, 2039, 312, None, "nvlink", 600, "ampere",
                (8, 0), ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "NVIDIA A100-PCIE-80GB"),
                ("a100-80gb", "a100-80g", "a100_80gb")),
        GpuSpec("L4", "NVIDIA L4", 23034, 22.03, 24, 300, 121, 242, "pcie", 64, "ada", (8, 9), ("NVIDIA L4",),
                ("l4",)),
        GpuSpec("A10G", "NVIDIA A10G", 23028, 22.06, 24, 600, 70, None, "pcie", 64, "ampere", (8, 6),
                ("NVIDIA A10G",), ("a10g",)),
    )
}


@dataclass(frozen=True)
class Hardware:
    """The node a plan is for: `count` identical devices (GPUs), or the CPU host vLLM's CPU build runs on."""

    name: str  # catalog key ("L40S") or "CPU"
    count: int
    memory_gib: float  # per device: the CUDA-visible total vLLM multiplies by gpu_memory_utilization
    bandwidth_gbps: float | None  # memory bandwidth per device, GB/s; None where unknown (CPU host)
    bf16_tflops: float | None
    fp8_tflops: float | None
    interconnect: str  # "nvlink" | "pcie" | "none" (one device / CPU)
    arch: str  # "ada" | "hopper" | "ampere" | "cpu" | "unknown"
    compute_capability: tuple[int, int] | None = None
    link_gbps: float | None = None
    detected: bool = False  # True: read from this machine (NVML / /sys), False: from the catalog
    free_memory_gib: tuple[float, ...] | None = None  # per device at detection (NVML), to spot other tenants
    # CPU host only: the KV cache size fixed by VLLM_CPU_KVCACHE_SPACE (GiB), None when the variable is unset and
    # vLLM sizes the cache as gpu_memory_utilization x node memory - worker RSS; and the node's available memory.
    cpu_kv_cache_space_gib: float | None = None
    available_memory_gib: float | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def is_cpu(self) -> bool:
        return self.arch == "cpu"

    @property
    def memory_bytes(self) -> int:
        return int(round(self.memory_gib * GIB))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["compute_capability"] = list(self.compute_capability) if self.compute_capability else None
        d["free_memory_gib"] = list(self.free_memory_gib) if self.free_memory_gib else None
        d["notes"] = list(self.notes)
        return d

    def with_count(self, count: int) -> Hardware:
        return replace(self, count=count)


def gpu_names() -> list[str]:
    return sorted(GPU_CATALOG)


def gpu_spec(name: str) -> GpuSpec:
    """Catalog entry by name or alias, case-insensitive ("L40S", "h100", "a100-40gb"); UserError lists the names."""
    key = name.strip().lower().replace(" ", "-").removeprefix("nvidia-")
    for spec in GPU_CATALOG.values():
        if key == spec.name.lower() or key in spec.aliases:
            return spec
    raise UserError(f"unknown GPU '{name}' (known: {', '.join(gpu_names())}, or CPU)", key="gpu")


def hardware_from_spec(spec: GpuSpec, count: int, *, detected: bool = False,
                       free_memory_gib: tuple[float, ...] | None = None,
                       cuda_total_gib: float | None = None) -> Hardware:
    return Hardware(
        name=spec.name,
        count=count,
        memory_gib=cuda_total_gib if cuda_total_gib is not None else spec.cuda_total_gib,
        bandwidth_gbps=spec.bandwidth_gbps,
        bf16_tflops=spec.bf16_tflops,
        fp8_tflops=spec.fp8_tflops,
        interconnect=spec.interconnect if count > 1 else "none",
        arch=spec.arch,
        compute_capability=spec.compute_capability,
        link_gbps=spec.link_gbps,
        detected=detected,
        free_memory_gib=free_memory_gib,
    )


def detect_hardware(gpu: str | None = None, num_gpus: int | None = None) -> Hardware:
    """The node to plan for: `--gpu NAME --num-gpus N` from the catalog, else the GPUs NVML sees, else the CPU host.

    With `gpu` given nothing is probed, so a laptop can plan for a 4x L40S node. `gpu="CPU"` plans for this host's
    CPU build of vLLM.
    """
    if num_gpus is not None and num_gpus < 1:
        raise UserError(f"must be at least 1, got {num_gpus}", key="num_gpus")
    if gpu is not None and gpu.strip().lower() != "cpu":
        return hardware_from_spec(gpu_spec(gpu), num_gpus or 1)
    if gpu is None:
        found = _detect_nvml()
        if found is not None:
            return found.with_count(num_gpus) if num_gpus else found
    return detect_cpu_host()


def _detect_nvml() -> Hardware | None:
    """NVML's view of this machine's GPUs; None when there is no driver or no GPU."""
    with nvml_session() as pynvml:
        if pynvml is None:  # no driver / no GPU
            return None
        n = pynvml.nvmlDeviceGetCount()
        if n == 0:
            return None
        visible = _visible_indices(n)
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in visible]
        names = [_decode(pynvml.nvmlDeviceGetName(h)) for h in handles]
        mems = [_memory_info(pynvml, h) for h in handles]
        cc = pynvml.nvmlDeviceGetCudaComputeCapability(handles[0])
        nvlink = _has_nvlink(pynvml, handles[0])
    name = names[0]
    total_mib = mems[0][0] / MIB  # NVML total, what nvidia-smi shows
    cuda_total_gib = (mems[0][0] - mems[0][1]) / GIB  # minus the driver's reservation: what CUDA and vLLM see
    free = tuple(m[2] / GIB for m in mems)
    spec = _spec_for_nvml_name(name, total_mib)
    notes: list[str] = []
    if len(set(names)) > 1:
        notes.append(f"mixed GPU models {sorted(set(names))}: planning with the first, {name}")
    if spec is not None:
        hw = hardware_from_spec(spec, len(handles), detected=True, free_memory_gib=free,
                                cuda_total_gib=cuda_total_gib)
        if len(handles) > 1:
            hw = replace(hw, interconnect="nvlink" if nvlink else "pcie")
        return replace(hw, notes=tuple(notes))
    notes.append(f"'{name}' is not in the GPU catalog: no bandwidth or TFLOPS figures, so no decode roofline")
    return Hardware(name=name, count=len(handles), memory_gib=cuda_total_gib, bandwidth_gbps=None,
                    bf16_tflops=None, fp8_tflops=None,
                    interconnect=("nvlink" if nvlink else "pcie") if len(handles) > 1 else "none",
                    arch=_arch_for_cc(tuple(cc)), compute_capability=(int(cc[0]), int(cc[1])), detected=True,
                    free_memory_gib=free, notes=tuple(notes))


def _memory_info(pynvml: Any, handle: Any) -> tuple[int, int, int]:
    """(total, reserved, free) bytes; NVML's v2 query reports the driver's reservation, v1 leaves it at 0."""
    try:
        m = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        return int(m.total), int(getattr(m, "reserved", 0)), int(m.free)
    except Exception:
        m = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return int(m.total), 0, int(m.free)


def _visible_indices(n: int) -> list[int]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or env.strip() == "":
        return list(range(n))
    out = []
    for part in env.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < n:
            out.append(int(part))
    return out or list(range(n))


def _decode(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _has_nvlink(pynvml: Any, handle: Any) -> bool:
    try:
        for link in range(getattr(pynvml, "NVML_NVLINK_MAX_LINKS", 18)):
            if pynvml.nvmlDeviceGetNvLinkState(handle, link):
                return True
    except Exception:
        return False
    return False


def _spec_for_nvml_name(name: str, total_mib: float) -> GpuSpec | None:
    upper = name.strip().upper()
    matches = [s for s in GPU_CATALOG.values() if any(n.upper() == upper for n in s.nvml_names)]
    if not matches:
        return None
    # Should two entries ever share a name, prefer the one whose memory is closest to what the driver reports.
    return min(matches, key=lambda s: abs(s.memory_mib - total_mib))


def _arch_for_cc(cc: tuple[int, ...]) -> str:
    major, minor = int(cc[0]), int(cc[1])
    if major == 9:
        return "hopper"
    if major == 8 and minor == 9:
        return "ada"
    if major == 8:
        return "ampere"
    return "unknown"


# ---------------------------------------------------------------------------------------------- CPU host

# Memory vLLM's own processes take between the planner's read of the node and the CPU worker's start-up check: the
# API server and the engine core import torch before the worker compares the node's available memory with its
# request. A launch sized this much below the available memory still starts when the node's free memory moves a
# little (other processes, a growing VM node); the planner's error itself is vLLM's exact check, with no margin.
CPU_LAUNCH_MARGIN_GIB = 1.0


def cpu_request_bytes(hw: Hardware, utilization: float) -> int:
    """What vLLM's CPU worker requests at start-up: ceil(node total x gpu_memory_utilization)
    (vllm/v1/worker/cpu_worker.py, the "desired CPU memory utilization" check)."""
    return math.ceil(hw.memory_bytes * utilization)


def cpu_utilization_that_fits(hw: Hardware, margin_gib: float = 0.0) -> float:
    """The highest gpu_memory_utilization (two decimals) whose request the CPU worker accepts with the node's memory
    as it is now, `margin_gib` kept free; 0.0 when none does. vLLM refuses when the request exceeds the available
    memory (MemFree + file pages + SReclaimable of the node, clamped by the cgroup)."""
    if hw.available_memory_gib is None or not hw.memory_bytes:
        return 0.0
    room = int(round((hw.available_memory_gib - margin_gib) * GIB))
    util = math.floor(100 * room / hw.memory_bytes) / 100
    while util > 0 and cpu_request_bytes(hw, util) > room:
        util = round(util - 0.01, 2)
    return max(0.0, min(util, 1.0))


def size_cpu_launch(settings: dict[str, Any], hw: Hardware,
                    default_utilization: float | None = None) -> tuple[dict[str, Any], str]:
    """On the CPU host, settings whose start-up request fits the node now: when the user left gpu_memory_utilization
    to vLLM's default and that does not fit, the highest utilization that fits (less CPU_LAUNCH_MARGIN_GIB). Returns
    the settings and a note ('' when nothing changed). A fixed KV cache (kv_cache_memory_bytes,
    VLLM_CPU_KVCACHE_SPACE) skips vLLM's check, and a value the user chose is theirs: the planner reports it."""
    fixed_kv = settings.get("kv_cache_memory_bytes") is not None or hw.cpu_kv_cache_space_gib is not None
    if not hw.is_cpu or fixed_kv or settings.get("gpu_memory_utilization") is not None:
        return settings, ""
    if default_utilization is None:
        from harness.plan.defaults import defaults_for

        default_utilization = defaults_for(None).gpu_memory_utilization  # the installed vLLM's
    if cpu_request_bytes(hw, default_utilization) <= (hw.available_memory_gib or 0) * GIB - CPU_LAUNCH_MARGIN_GIB * GIB:
        return settings, ""
    util = cpu_utilization_that_fits(hw, CPU_LAUNCH_MARGIN_GIB)
    if util <= 0:
        return settings, ""  # nothing fits: the planner's error says so
    note = (f"gpu_memory_utilization {util:g}: vLLM's default {default_utilization:g} x {hw.memory_gib:.2f} GiB "
            f"exceeds the {hw.available_memory_gib:.2f} GiB available on the memory node now (vLLM's CPU build "
            f"refuses to start then); {util:g} leaves {CPU_LAUNCH_MARGIN_GIB:g} GiB for vLLM's own processes")
    return {**settings, "gpu_memory_utilization": util}, note


def detect_cpu_host(kv_cache_space_gib: float | None = None) -> Hardware:
    """This machine as vLLM's CPU build sees it: one device whose memory is NUMA node 0 (clamped by the cgroup).

    vLLM 0.32 (vllm/v1/worker/cpu_worker.py, vllm/utils/cpu_resource_utils.py) sizes the CPU KV cache as
    VLLM_CPU_KVCACHE_SPACE GiB when that variable is set (vllm/platforms/cpu.py turns it into
    kv_cache_memory_bytes), else as ceil(node total x gpu_memory_utilization) minus the worker's RSS; and it refuses
    to start when that request exceeds the node's available memory.
    """
    total, available = _numa_node_memory()
    if kv_cache_space_gib is None:
        raw = os.environ.get("VLLM_CPU_KVCACHE_SPACE", "")
        if raw.strip():
            try:
                kv_cache_space_gib = float(int(raw))  # vLLM parses it with int(): whole GiB only
            except ValueError:
                raise UserError(f"must be a whole number of GiB, got {raw!r}", key="VLLM_CPU_KVCACHE_SPACE") from None
    notes = []
    system = _system_memory_total()
    limit = _cgroup_memory()[0]
    clamped = limit is not None and limit <= total  # a container limit, not a growing node
    if system is not None and not clamped and total < 0.97 * system and _numa_node_count() == 1:
        notes.append(
            f"NUMA node 0 reports {total / GIB:.2f} GiB of the machine's {system / GIB:.2f} GiB (memory still being "
            f"brought online, e.g. a VM's deferred page init or hot-plug): vLLM reads the node total at its own "
            f"start-up, so a CPU KV cache can come out up to gpu_memory_utilization x "
            f"{(system - total) / GIB:.2f} GiB larger than planned; plan right before launching")
    return Hardware(name="CPU", count=1, memory_gib=total / GIB, bandwidth_gbps=None, bf16_tflops=None,
                    fp8_tflops=None, interconnect="none", arch="cpu", compute_capability=None, detected=True,
                    cpu_kv_cache_space_gib=kv_cache_space_gib, available_memory_gib=available / GIB,
                    notes=tuple(notes))


# On the Firecracker VMs this project's CPU sweeps ran on (kernel command line `deferred_init=lazy`), node 0's
# MemTotal grows as memory is first used, towards /proc/meminfo's MemTotal: vLLM 0.32 logged node totals of 9.71,
# 11.59, 12.84, 13.09 and 13.59 GiB ("Auto set (2.64/13.09) GiB for KV cache on node 0") over one evening while
# /proc/meminfo said 23.54 GiB. A sweep planned once at 11.59 GiB then under-predicted later trials by up to 18%
# although the worker's RSS never moved from 0.63 GiB.
def _system_memory_total() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _numa_node_count() -> int:
    try:
        return len([p for p in Path("/sys/devices/system/node").glob("node[0-9]*")])
    except OSError:
        return 0


def _numa_node_memory(node: int = 0) -> tuple[int, int]:
    """(total, available) bytes exactly as vLLM's get_memory_node_info computes them."""
    path = Path(f"/sys/devices/system/node/node{node}/meminfo")
    if path.exists():
        info: dict[str, int] = {}
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4:
                info[parts[2].rstrip(":")] = int(parts[3]) * 1024
        total = info["MemTotal"]
        available = info["MemFree"] + info.get("Active(file)", 0) + info.get("Inactive(file)", 0) + info.get(
            "SReclaimable", 0)
    else:
        import psutil

        vm = psutil.virtual_memory()
        total, available = vm.total, vm.available
    limit, usage = _cgroup_memory()
    if limit is not None and limit < total:
        total = limit
        available = max(0, min(available, limit - (usage or 0)))
    return total, available


def _cgroup_memory() -> tuple[int | None, int | None]:
    for max_path, cur_path in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                               ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(max_path).read_text().strip()
        except OSError:
            continue
        if raw == "max" or not raw.isdigit() or int(raw) >= 1 << 60:
            return None, None
        try:
            usage = int(Path(cur_path).read_text().strip())
        except (OSError, ValueError):
            usage = None
        return int(raw), usage
    return None, None
