"""Which GPUs of the node belong together: a tensor-parallel group should stay on one PCIe switch / NUMA node.

Read from NVML when this machine has the GPUs (`nvmlDeviceGetTopologyCommonAncestor`: GPUs whose common ancestor
is at most the NUMA node form a group; NVLink joins all of them), given as `--topology "0,1;2,3"`, or unknown
(`--gpu L40S --num-gpus 4` plans for a node that is not here, so any GPUs may form a group).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import UserError

# nvmlGpuTopologyLevel_t: INTERNAL 0, SINGLE 10, MULTIPLE 20, HOSTBRIDGE 30, NODE 40 (same NUMA node), SYSTEM 50
NVML_TOPOLOGY_NODE = 40


@dataclass(frozen=True)
class Topology:
    """`groups`: disjoint GPU index groups covering the node; None when the topology is not known."""

    count: int
    groups: tuple[tuple[int, ...], ...] | None = None
    source: str = "unknown"  # "nvml" | "given" | "unknown"

    @property
    def known(self) -> bool:
        return self.groups is not None

    def describe(self) -> str:
        if self.groups is None:
            return f"{self.count} GPUs, topology unknown (any GPUs may form a tensor-parallel group)"
        shown = "; ".join(",".join(map(str, g)) for g in self.groups)
        return f"{self.count} GPUs in groups {shown} ({self.source})"

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "groups": [list(g) for g in self.groups] if self.groups else None,
                "source": self.source}


def parse_topology(text: str, count: int, key: str = "--topology") -> Topology:
    """`"0,1;2,3"` -> groups (0,1) and (2,3). Every GPU of the node in exactly one group."""
    groups: list[tuple[int, ...]] = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        try:
            groups.append(tuple(int(x) for x in part.split(",") if x.strip()))
        except ValueError:
            raise UserError(f"expected GPU groups like '0,1;2,3', got {text!r}", key=key) from None
    return _checked(groups, count, "given", key)


def _checked(groups: list[tuple[int, ...]], count: int, source: str, key: str) -> Topology:
    flat = sorted(i for g in groups for i in g)
    if flat != list(range(count)):
        raise UserError(f"the groups must list each GPU 0-{count - 1} exactly once, got "
                        f"{';'.join(','.join(map(str, g)) for g in groups) or 'none'}", key=key)
    return Topology(count, tuple(tuple(sorted(g)) for g in sorted(groups)), source)


def groups_from_levels(levels: dict[tuple[int, int], int], count: int, joined_at: int = NVML_TOPOLOGY_NODE
                       ) -> tuple[tuple[int, ...], ...]:
    """GPUs linked (transitively) by a common ancestor at most `joined_at` form one group."""
    parent = list(range(count))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for (a, b), level in levels.items():
        if level <= joined_at:
            parent[find(a)] = find(b)
    out: dict[int, list[int]] = {}
    for i in range(count):
        out.setdefault(find(i), []).append(i)
    return tuple(sorted(tuple(g) for g in out.values()))


def detect_topology(count: int, pynvml: Any = None) -> Topology:
    """The node's GPU groups from NVML; unknown when NVML is missing, sees another count, or refuses a query."""
    if pynvml is None:
        try:
            import pynvml  # type: ignore[no-redef]
        except ImportError:
            return Topology(count)
    try:
        pynvml.nvmlInit()
    except Exception:
        return Topology(count)
    try:
        if pynvml.nvmlDeviceGetCount() != count:
            return Topology(count)
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        levels = {(a, b): int(pynvml.nvmlDeviceGetTopologyCommonAncestor(handles[a], handles[b]))
                  for a in range(count) for b in range(a + 1, count)}
    except Exception:
        return Topology(count)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return Topology(count, groups_from_levels(levels, count), "nvml")
