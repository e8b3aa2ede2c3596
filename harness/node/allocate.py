"""Split a node's GPUs between models: disjoint GPU sets and one candidate per model, by exact search.

Pure: capacity tables in, assignment out (no I/O), so it is tested on synthetic tables with known optima.

The rule (RULE below, also written into every plan):
1. Priority first, up to the target: for each priority level from the highest down, the headrooms
   (capacity / target) of that level's models, each capped at 1, compared smallest first (leximin).
   A higher-priority model reaches its target before a lower one gets any GPU it would need.
2. Then the smallest headroom over all models, uncapped; ties go to the next smallest, and so on (leximin).
3. Then the spare capacity: the sum of the headrooms (each model's capacity in units of its own target).
4. Then fewer GPUs; then a fixed order: the plan giving the earlier models (in sweep order) more GPUs, and
   lower TP before higher.
With one priority level, 1 and 2 together maximize the smallest headroom, as asked of a node plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from harness.node.topology import Topology

RULE = ("maximize, in this order: (1) per priority level from the highest, the headrooms capped at 1, smallest "
        "first; (2) the smallest headroom over all models, then the next smallest; (3) the spare capacity (sum of "
        "headrooms); (4) fewer GPUs; remaining ties give earlier models (sweep order) more GPUs, lower TP first")
_DIGITS = 9  # headrooms equal to this many decimals are a tie, so float noise cannot pick a plan


@dataclass(frozen=True)
class Candidate:
    """One server configuration of a model and what one such server sustains at the model's SLO."""

    label: str  # shown in tables: "TP2", "TP1 fp8"
    gpus: int  # GPUs per server (tensor x pipeline parallel)
    capacity_rps: float  # one server, at the model's SLO, on the model's workload
    source: str  # "measured" | "estimated"
    ref: Any = None  # what the caller needs to emit it (settings, study and trial); opaque here


@dataclass(frozen=True)
class Demand:
    """One model: its target, its priority, and its candidates (one per GPU count is typical)."""

    name: str
    target_rps: float
    candidates: tuple[Candidate, ...]
    priority: int = 0


@dataclass(frozen=True)
class Assignment:
    demand: Demand
    candidate: Candidate | None
    servers: tuple[tuple[int, ...], ...] = ()  # one GPU set per server

    @property
    def replicas(self) -> int:
        return len(self.servers)

    @property
    def gpus(self) -> int:
        return sum(len(s) for s in self.servers)

    @property
    def capacity_rps(self) -> float:
        """Replicas scale capacity linearly (an assumption of the plan; the confirmation measures it)."""
        return self.replicas * self.candidate.capacity_rps if self.candidate else 0.0

    @property
    def headroom(self) -> float:
        return self.capacity_rps / self.demand.target_rps


@dataclass(frozen=True)
class Shortfall:
    """A model whose target the plan does not meet, and what it would take."""

    name: str
    target_rps: float
    capacity_rps: float
    gpus_given: int
    need_gpus: int | None  # GPUs of its best per-GPU candidate that would meet the target; None: none can
    need_candidate: Candidate | None
    need_replicas: int
    fits_node: bool

    def describe(self, node_gpus: int) -> str:
        have = (f"gets {self.gpus_given} GPU(s), {self.capacity_rps:.3g} of {self.target_rps:.3g} req/s"
                if self.gpus_given else f"gets no GPU ({self.target_rps:.3g} req/s wanted)")
        if self.need_candidate is None:
            return f"{self.name}: {have}; no candidate of it runs on this node at its SLO"
        need = (f"needs {self.need_gpus} GPU(s): {self.need_replicas} x {self.need_candidate.label} "
                f"({self.need_candidate.capacity_rps:.3g} req/s each, {self.need_candidate.source})")
        if not self.fits_node:
            need += f", more than the node's {node_gpus}"
        elif self.gpus_given < self.need_gpus:
            need += "; the other models' targets took the GPUs (a higher priority places it first)"
        return f"{self.name}: {have}; {need}"


@dataclass
class Allocation:
    assignments: list[Assignment]  # in demand order
    shortfalls: list[Shortfall]
    combinations: int  # option combinations scored
    topology: Topology
    rule: str = RULE
    unused_gpus: tuple[int, ...] = field(default_factory=tuple)

    @property
    def min_headroom(self) -> float:
        return min((a.headroom for a in self.assignments), default=0.0)


# ---------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class _Option:
    candidate: Candidate | None
    replicas: int

    @property
    def gpus(self) -> int:
        return self.replicas * self.candidate.gpus if self.candidate else 0

    @property
    def capacity(self) -> float:
        return self.replicas * self.candidate.capacity_rps if self.candidate else 0.0


def options_for(demand: Demand, node_gpus: int, topology_known: bool) -> list[_Option]:
    """(candidate, replicas) choices within the node, plus none; dominated ones dropped.

    An option is dominated by another of the same GPU total with at least its capacity whose servers are at most
    as large and always as easy to place: any placement works when the topology is unknown, and single-GPU
    servers fit anywhere.
    """
    raw = [_Option(None, 0)]
    for c in demand.candidates:
        if c.capacity_rps <= 0 or c.gpus < 1:
            continue
        raw += [_Option(c, n) for n in range(1, node_gpus // c.gpus + 1)]
    # more GPUs first, so that on a tie the earlier model (in sweep order) has the larger share; lower TP first
    raw.sort(key=lambda o: (-o.gpus, o.candidate.gpus if o.candidate else 0, -o.capacity))
    kept: list[_Option] = []
    for o in raw:
        dominated = any(
            k.gpus == o.gpus and k.capacity >= o.capacity and k.candidate is not None and o.candidate is not None
            and k.candidate.gpus <= o.candidate.gpus and (not topology_known or k.candidate.gpus == 1)
            for k in kept)
        if not dominated:
            kept.append(o)
    return kept


def allocate(demands: list[Demand], topology: Topology) -> Allocation:
    """The best plan by RULE over every combination of options that fits the node, placed on `topology`."""
    active = [d for d in demands if d.target_rps > 0]
    node = topology.count
    opts = [options_for(d, node, topology.known) for d in active]
    levels = sorted({d.priority for d in active}, reverse=True)
    best_key: tuple[Any, ...] | None = None
    best: tuple[list[_Option], list[tuple[int, ...]]] | None = None
    placements: dict[tuple[int, ...], list[tuple[int, ...]] | None] = {}
    scored = 0
    chosen: list[_Option] = []

    def key_of(choice: list[_Option]) -> tuple[Any, ...]:
        heads = [round(o.capacity / d.target_rps, _DIGITS) for o, d in zip(choice, active)]
        stage1 = tuple(tuple(sorted(min(h, 1.0) for h, d in zip(heads, active) if d.priority == lvl))
                       for lvl in levels)
        return (stage1, tuple(sorted(heads)), round(sum(heads), _DIGITS), -sum(o.gpus for o in choice))

    def visit(i: int, free: int) -> None:
        nonlocal best_key, best, scored
        if i == len(active):
            scored += 1
            key = key_of(chosen)
            if best_key is not None and key <= best_key:
                return  # not better (an equal key keeps the earlier plan: the deterministic order)
            sizes = tuple(sorted((o.candidate.gpus for o in chosen if o.candidate for _ in range(o.replicas)),
                                 reverse=True))
            if sizes not in placements:
                placements[sizes] = place(list(sizes), topology)
            if placements[sizes] is None:
                return
            best_key, best = key, (list(chosen), placements[sizes])  # type: ignore[assignment]
            return
        for o in opts[i]:
            if o.gpus <= free:
                chosen.append(o)
                visit(i + 1, free - o.gpus)
                chosen.pop()

    visit(0, node)
    assert best is not None  # "no GPU for anyone" always fits
    choice, sets = best
    assignments = _assign(active, choice, sets)
    by_name = {a.demand.name: a for a in assignments}
    ordered = [by_name.get(d.name, Assignment(d, None)) for d in demands]
    used = {g for a in assignments for s in a.servers for g in s}
    shortfalls = [shortfall(a, node) for a in ordered if a.demand.target_rps > 0 and a.headroom < 1 - 1e-9]
    return Allocation(ordered, shortfalls, scored, topology,
                      unused_gpus=tuple(g for g in range(node) if g not in used))


def _assign(active: list[Demand], choice: list[_Option], sets: list[tuple[int, ...]]) -> list[Assignment]:
    """Hand the placed GPU sets (largest servers first, as `place` returns them) to the models' servers."""
    pool: dict[int, list[tuple[int, ...]]] = {}
    for s in sets:
        pool.setdefault(len(s), []).append(s)
    out = []
    for d, o in zip(active, choice):
        servers: list[tuple[int, ...]] = []
        if o.candidate is not None:
            for _ in range(o.replicas):
                servers.append(pool[o.candidate.gpus].pop(0))
        out.append(Assignment(d, o.candidate, tuple(sorted(servers))))
    return out


def shortfall(a: Assignment, node_gpus: int) -> Shortfall:
    d = a.demand
    best: tuple[int, float, Candidate, int] | None = None
    for c in d.candidates:
        if c.capacity_rps <= 0:
            continue
        n = max(1, math.ceil(d.target_rps / c.capacity_rps - 1e-9))
        item = (n * c.gpus, -c.capacity_rps, c, n)
        if best is None or item[:2] < best[:2]:
            best = item
    if best is None:
        return Shortfall(d.name, d.target_rps, a.capacity_rps, a.gpus, None, None, 0, False)
    return Shortfall(d.name, d.target_rps, a.capacity_rps, a.gpus, best[0], best[2], best[3], best[0] <= node_gpus)


# ---------------------------------------------------------------------------------------------- placement


def place(sizes: list[int], topology: Topology) -> list[tuple[int, ...]] | None:
    """GPU sets for servers of these sizes (largest first), or None when the topology cannot hold them.

    Unknown topology: consecutive indices, largest first (so power-of-two groups stay aligned). Known groups: a
    server lies inside one group, or (larger than every group) is a union of whole free groups. Groups in the same
    state (free GPUs, size) are interchangeable, so each state is tried once: the symmetric assignments are pruned.
    """
    sizes = sorted(sizes, reverse=True)
    if sum(sizes) > topology.count:
        return None
    if topology.groups is None:
        out, nxt = [], 0
        for s in sizes:
            out.append(tuple(range(nxt, nxt + s)))
            nxt += s
        return out
    groups = [list(g) for g in topology.groups]
    free = [list(g) for g in groups]
    largest = max(len(g) for g in groups)
    out: list[tuple[int, ...]] = []

    def fill(i: int) -> bool:
        if i == len(sizes):
            return True
        s = sizes[i]
        if s <= largest:
            tried: set[tuple[int, int]] = set()
            for gi, f in enumerate(free):
                state = (len(f), len(groups[gi]))
                if len(f) < s or state in tried:
                    continue
                tried.add(state)
                taken, free[gi] = f[:s], f[s:]
                out.append(tuple(taken))
                if fill(i + 1):
                    return True
                out.pop()
                free[gi] = taken + free[gi]
            return False
        whole = [gi for gi, f in enumerate(free) if len(f) == len(groups[gi]) and f]
        for combo in _subsets_summing(whole, [len(groups[gi]) for gi in whole], s):
            saved = {gi: free[gi] for gi in combo}
            out.append(tuple(sorted(g for gi in combo for g in free[gi])))
            for gi in combo:
                free[gi] = []
            if fill(i + 1):
                return True
            out.pop()
            for gi, gpus in saved.items():
                free[gi] = gpus
        return False

    return out if fill(0) else None


def _subsets_summing(items: list[int], sizes: list[int], target: int) -> list[tuple[int, ...]]:
    """Subsets of `items` whose sizes add up to `target`, lowest indices first (few groups: a small search)."""
    found: list[tuple[int, ...]] = []

    def rec(k: int, left: int, acc: tuple[int, ...]) -> None:
        if left == 0:
            found.append(acc)
            return
        for j in range(k, len(items)):
            if sizes[j] <= left:
                rec(j + 1, left - sizes[j], acc + (items[j],))

    rec(0, target, ())
    return found
