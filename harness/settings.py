"""The harness's own setting keys, next to vLLM's: one place that says which user keys are not vLLM flags.

Settings everywhere (sweep files, search spaces, records, emitted configs) use vLLM's argparse `dest` names
(`max_num_seqs`), which are also the user's `VLLMConfig` names. Three keys differ: `model_name` is vLLM's
`--model` under the user's name; `replicas` is the harness's own data parallelism (several server copies on
disjoint GPU sets, each a full vLLM server) and `servers_per_gpu` runs several servers of one configuration on each
of its GPUs; vLLM never sees either. `Topology` is the one home of what they multiply and split: GPUs, servers, and
each server's share of `gpu_memory_utilization`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from harness.errors import UserError


@dataclass(frozen=True)
class HarnessKey:
    """A user-format setting key that is not a vLLM `dest` as written."""

    name: str
    vllm_dest: str | None  # the vLLM dest it stands for, or None when vLLM never sees it
    help: str


HARNESS_KEYS: dict[str, HarnessKey] = {
    "model_name": HarnessKey("model_name", "model", "the model served: a local directory or a hub name (vLLM --model)"),
    "replicas": HarnessKey(
        "replicas",
        None,
        "copies of the server on disjoint GPU sets (harness-level data parallelism); each copy gets "
        "tensor_parallel_size * pipeline_parallel_size GPUs",
    ),
    "servers_per_gpu": HarnessKey(
        "servers_per_gpu",
        None,
        "servers of the configuration on each of its GPUs (single-GPU servers only); gpu_memory_utilization stays "
        "the configuration's share of each GPU and is split evenly between them",
    ),
}

# Harness keys whose value is a count: a positive integer.
COUNT_KEYS = ("replicas", "servers_per_gpu")

# Settings an emitted config states at vLLM's default (as the trial's plan resolved it) where the trial left them
# out: the vllm_instances of a servers_per_gpu config each need their share of gpu_memory_utilization. Read back,
# such a config is still the trial it came from (`harness.study.runner.same_settings`).
STATED_DEFAULT_KEYS = ("gpu_memory_utilization",)

# Keys of older vLLM releases that users still carry in their configs, with what to do instead.
REMOVED_KEYS: dict[str, str] = {
    "use_v2_block_manager": "delete it: the V1 engine has a single block manager (the flag was removed)",
    "swap_space": "delete it: vLLM's V1 engine recomputes preempted requests instead of swapping KV to CPU; "
                  "for CPU offload see kv_offloading_size",
    "max_chunked_prefill_tokens": "use max_num_batched_tokens (the per-step token budget, which is the chunk size "
                                  "with enable_chunked_prefill)",
}


# Settings vLLM's parser takes that the entry point the harness starts servers with
# (`python -m vllm.entrypoints.openai.api_server`) does not act on, only `vllm serve` does: refused unless they ask
# for what that entry point does anyway, so that no measured config claims a setting its servers ignored.
SERVE_ONLY_KEYS: dict[str, tuple[Any, str]] = {
    "api_server_count": (1, "only `vllm serve` runs several API server processes in front of one engine; each "
                            "server the harness starts runs one (several servers on one GPU: servers_per_gpu)"),
    "headless": (False, "only `vllm serve` runs an engine without its API server"),
}


# vLLM dests the harness sets itself for every server; a user setting for them would fight the launcher.
LAUNCHER_OWNED_DESTS: frozenset[str] = frozenset({"host", "port", "api_key", "model", "model_tag", "uds"})


def harness_value_problem(key: str, value: Any) -> str | None:
    """Why `value` is not valid for harness key `key` (None: valid, or not a count key); one home for the check that
    sweep files, spaces, configs and the launcher share."""
    if key in COUNT_KEYS and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        return f"must be a positive integer (1, 2, ...), got {value!r}"
    return None


def check_harness_values(settings: dict[str, Any], source: str | None, prefix: str) -> None:
    """A one-line UserError naming the file and `prefix.key` for the first invalid harness-key value."""
    for key, value in settings.items():
        problem = harness_value_problem(key, value) if key in HARNESS_KEYS else None
        if problem:
            raise UserError(problem, source=source, key=f"{prefix}.{key}" if prefix else key)


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """User settings -> (vLLM settings by dest, harness-only settings).

    `model_name` becomes vLLM's `model`; `replicas` and `servers_per_gpu` go to the harness side. Every other key is passed through
    unchanged (checking it against the installed vLLM is `harness.launch.vllm_args.ArgSpec.check`'s job).
    """
    vllm: dict[str, Any] = {}
    harness: dict[str, Any] = {}
    for key, value in settings.items():
        info = HARNESS_KEYS.get(key)
        if info is None:
            vllm[key] = value
        elif info.vllm_dest is not None:
            vllm[info.vllm_dest] = value
        else:
            harness[key] = value
    for key, value in harness.items():
        problem = harness_value_problem(key, value) if value is not None else None
        if problem:
            raise UserError(problem, key=key)
    return vllm, harness


@dataclass(frozen=True)
class Topology:
    """How many devices and servers one configuration occupies: `replicas` copies of a server, each on
    tensor_parallel_size x pipeline_parallel_size GPUs, and `servers_per_gpu` servers on each GPU of a single-GPU
    configuration. The one place that multiplies them, and that splits gpu_memory_utilization between servers."""

    replicas: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1  # vLLM's data_parallel_size: engine copies inside one server, each on its own TP x PP group
    servers_per_gpu: int = 1

    @classmethod
    def of(cls, settings: dict[str, Any]) -> Topology:
        """From user settings (absent or null keys: 1)."""
        return cls(replicas=int(settings.get("replicas", 1) or 1),
                   tp=int(settings.get("tensor_parallel_size", 1) or 1),
                   pp=int(settings.get("pipeline_parallel_size", 1) or 1),
                   dp=int(settings.get("data_parallel_size", 1) or 1),
                   servers_per_gpu=int(settings.get("servers_per_gpu", 1) or 1))

    @property
    def servers(self) -> int:
        """vLLM servers of the whole configuration: replicas x servers_per_gpu."""
        return self.replicas * self.servers_per_gpu

    def server_utilization(self, utilization: float) -> float:
        """One server's gpu_memory_utilization: the configuration's share of each GPU split evenly between the
        servers on it (0.9 with 2 servers per GPU: 0.45 each), rounded down to 4 decimals so the servers together
        never ask for more than the configuration's share."""
        if self.servers_per_gpu == 1:
            return utilization
        return math.floor(utilization / self.servers_per_gpu * 1e4 + 1e-6) / 1e4

    @property
    def per_replica(self) -> int:
        """GPUs of one server (its DP x TP x PP ranks)."""
        return self.dp * self.tp * self.pp

    @property
    def gpus(self) -> int:
        """GPUs of the whole configuration: replicas x DP x TP x PP (servers sharing a GPU count it once)."""
        return self.replicas * self.per_replica


def server_settings(settings: dict[str, Any], default_utilization: float) -> dict[str, Any]:
    """The settings one server of the configuration runs with: with servers_per_gpu > 1, gpu_memory_utilization
    (the configuration's, or `default_utilization`, vLLM's default, when unset) becomes the server's share
    (`Topology.server_utilization`); otherwise the settings unchanged. Harness keys stay (argv leaves them out)."""
    topo = Topology.of(settings)
    if topo.servers_per_gpu == 1:
        return dict(settings)
    util = settings.get("gpu_memory_utilization")
    return {**settings, "gpu_memory_utilization": topo.server_utilization(
        default_utilization if util is None else float(util))}
