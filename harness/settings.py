"""The harness's own setting keys, next to vLLM's: one place that says which user keys are not vLLM flags.

Settings everywhere (sweep files, search spaces, records, emitted configs) use vLLM's argparse `dest` names
(`max_num_seqs`), which are also the user's `VLLMConfig` names. Two keys differ: `model_name` is vLLM's
`--model` under the user's name, and `replicas` is the harness's own data parallelism (several server copies on
disjoint GPU sets, each a full vLLM server), which vLLM never sees.
"""

from __future__ import annotations

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
}

# Keys of older vLLM releases that users still carry in their configs, with what to do instead.
REMOVED_KEYS: dict[str, str] = {
    "use_v2_block_manager": "delete it: the V1 engine has a single block manager (the flag was removed)",
    "swap_space": "delete it: vLLM's V1 engine recomputes preempted requests instead of swapping KV to CPU; "
                  "for CPU offload see kv_offloading_size",
    "max_chunked_prefill_tokens": "use max_num_batched_tokens (the per-step token budget, which is the chunk size "
                                  "with enable_chunked_prefill)",
}


# vLLM dests the harness sets itself for every server; a user setting for them would fight the launcher.
LAUNCHER_OWNED_DESTS: frozenset[str] = frozenset({"host", "port", "api_key", "model", "model_tag", "uds"})


def split_settings(settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """User settings -> (vLLM settings by dest, harness-only settings).

    `model_name` becomes vLLM's `model`; `replicas` goes to the harness side. Every other key is passed through
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
    replicas = harness.get("replicas")
    if replicas is not None and (isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1):
        raise UserError(f"must be a positive integer, got {replicas!r}", key="replicas")
    return vllm, harness


@dataclass(frozen=True)
class Topology:
    """How many devices one configuration occupies: `replicas` copies of a server, each on
    tensor_parallel_size x pipeline_parallel_size GPUs. The one place that multiplies them."""

    replicas: int = 1
    tp: int = 1
    pp: int = 1
    dp: int = 1  # vLLM's data_parallel_size: engine copies inside one server, each on its own TP x PP group

    @classmethod
    def of(cls, settings: dict[str, Any]) -> Topology:
        """From user settings (absent or null keys: 1)."""
        return cls(replicas=int(settings.get("replicas", 1) or 1),
                   tp=int(settings.get("tensor_parallel_size", 1) or 1),
                   pp=int(settings.get("pipeline_parallel_size", 1) or 1),
                   dp=int(settings.get("data_parallel_size", 1) or 1))

    @property
    def per_replica(self) -> int:
        """GPUs of one server (its DP x TP x PP ranks)."""
        return self.dp * self.tp * self.pp

    @property
    def gpus(self) -> int:
        """GPUs of the whole configuration: replicas x DP x TP x PP."""
        return self.replicas * self.per_replica
