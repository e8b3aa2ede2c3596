"""The expected traffic per model: the sweep file's `traffic:` block, checked, as one target rate per model.

```yaml
traffic:
  total_rps: 20                      # optional: the node's expected total, which `share` entries split
  models:                            # keyed by a models[] entry's name (its slug) or its model
    mistral-7b-instruct-v0.2: {share: 0.5}
    microsoft/DialoGPT-medium: {rps: 6, workload: chat-short, priority: 2}
    meta-llama/Llama-2-70b-chat-hf: {rps: 0.5, slo: {ttft_ms: 3000, tpot_ms: 100, percentile: 99}}
```

Each model gives exactly one of `rps` (req/s, >= 0; 0 leaves it off the node) or `share` (a fraction of
`total_rps`). Every model of the sweep needs an entry, so no model is silently left out. Optional per model:
`slo` (replaces the sweep objective's SLO), `priority` (an integer, higher first; default 0) and `workload` (the
request mix this model sees; default: the sweep's workload).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from harness.errors import UserError
from harness.records import SLO

TRAFFIC_KEYS = ("total_rps", "models")
MODEL_TRAFFIC_KEYS = ("rps", "share", "slo", "priority", "workload")
SHARE_TOLERANCE = 0.01  # shares that all split the total must add up to 1 within this


@dataclass(frozen=True)
class ModelTraffic:
    """One model's target on the node: the rate it must sustain, at which SLO, and how much it matters."""

    name: str  # the models[] entry's name (slug)
    model: str  # hub name or path, as in the sweep
    target_rps: float
    slo: SLO
    priority: int = 0
    workload: str = ""
    share: float | None = None  # when the target came from a share of total_rps


def parse_traffic(raw: Any, models: list[tuple[str, str]], default_slo: SLO, default_workload: str,
                  source: str) -> list[ModelTraffic]:
    """`raw`: the sweep's `traffic:` value; `models`: (name, model) of each models[] entry, in sweep order.

    UserError (naming the file and key) for unknown keys or models, negative or missing rates, shares that do
    not add up, a bad SLO or priority.
    """
    from harness.records import parse_slo

    if raw is None:
        raise UserError("a node plan needs the expected traffic per model: add 'traffic: {models: {NAME: {rps: R}}}'"
                        " (see docs/node-plan.md)", source=source, key="traffic")
    if not isinstance(raw, dict):
        raise UserError("must be a mapping with 'models' (and optionally 'total_rps')", source=source, key="traffic")
    _only(raw, TRAFFIC_KEYS, source, "traffic")
    total = raw.get("total_rps")
    if total is not None and not _number(total, positive=True):
        raise UserError(f"must be a positive number of requests/s, got {total!r}", source=source,
                        key="traffic.total_rps")
    entries = raw.get("models")
    if not isinstance(entries, dict) or not entries:
        raise UserError("must map each model (its name or model id) to {rps: R} or {share: S}", source=source,
                        key="traffic.models")
    by_key: dict[str, tuple[str, str]] = {}
    for name, model in models:
        by_key[name] = (name, model)
        by_key.setdefault(model, (name, model))
    given: dict[str, tuple[str, dict[str, Any]]] = {}
    for key, spec in entries.items():
        where = f"traffic.models.{key}"
        if str(key) not in by_key:
            known = ", ".join(n for n, _ in models)
            raise UserError(f"'{key}' is not a model of this sweep (models: {known})", source=source, key=where)
        name, _ = by_key[str(key)]
        if name in given:
            raise UserError(f"traffic for '{name}' is given twice (as '{given[name][0]}' and '{key}')",
                            source=source, key=where)
        if not isinstance(spec, dict):
            raise UserError(f"must be a mapping like {{rps: 5}} or {{share: 0.5}}, got {spec!r}", source=source,
                            key=where)
        _only(spec, MODEL_TRAFFIC_KEYS, source, where)
        given[name] = (str(key), spec)
    missing = [n for n, _ in models if n not in given]
    if missing:
        raise UserError(f"no traffic for {', '.join(missing)}: give each model rps or share (rps: 0 leaves a "
                        f"model off the node)", source=source, key="traffic.models")

    out: list[ModelTraffic] = []
    shares: list[float] = []
    fixed_rps = 0.0
    for name, model in models:
        key, spec = given[name]
        where = f"traffic.models.{key}"
        has_rps, has_share = "rps" in spec, "share" in spec
        if has_rps == has_share:
            raise UserError("give exactly one of rps (requests/s) or share (a fraction of traffic.total_rps)",
                            source=source, key=where)
        share = None
        if has_rps:
            rps = spec["rps"]
            if not _number(rps, positive=False):
                raise UserError(f"must be a number of requests/s >= 0, got {rps!r}", source=source, key=f"{where}.rps")
            rate = float(rps)
            fixed_rps += rate
        else:
            share = spec["share"]
            if not _number(share, positive=False) or share > 1:
                raise UserError(f"must be a fraction between 0 and 1, got {share!r}", source=source,
                                key=f"{where}.share")
            if total is None:
                raise UserError("a share needs traffic.total_rps (the node's total it is a share of)",
                                source=source, key=f"{where}.share")
            share = float(share)
            shares.append(share)
            rate = share * float(total)
        priority = spec.get("priority", 0)
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise UserError(f"must be an integer (higher is served first), got {priority!r}", source=source,
                            key=f"{where}.priority")
        slo = parse_slo(spec["slo"], source, f"{where}.slo") if "slo" in spec else default_slo
        if slo.ttft_ms is None and slo.tpot_ms is None and slo.e2e_ms is None:
            raise UserError("capacity at SLO needs at least one limit (ttft_ms, tpot_ms or e2e_ms)", source=source,
                            key=f"{where}.slo")
        workload = spec.get("workload", default_workload)
        if not isinstance(workload, str) or not workload:
            raise UserError(f"must be a shipped workload name or a file path, got {workload!r}", source=source,
                            key=f"{where}.workload")
        out.append(ModelTraffic(name=name, model=model, target_rps=rate, slo=slo, priority=priority,
                                workload=workload, share=share))
    if shares:
        share_sum = sum(shares)
        if len(shares) == len(models) and abs(share_sum - 1) > SHARE_TOLERANCE:
            raise UserError(f"the shares add up to {share_sum:g}; when every model is given a share they must add "
                            f"up to 1", source=source, key="traffic.models")
        if share_sum > 1 + SHARE_TOLERANCE:
            raise UserError(f"the shares add up to {share_sum:g}, more than the whole of traffic.total_rps",
                            source=source, key="traffic.models")
        if total is not None and fixed_rps + share_sum * float(total) > float(total) * (1 + SHARE_TOLERANCE):
            raise UserError(f"the rps entries ({fixed_rps:g}) plus the shares ({share_sum:g} x {float(total):g}) "
                            f"exceed traffic.total_rps {float(total):g}", source=source, key="traffic.models")
    elif total is not None and abs(fixed_rps - float(total)) > float(total) * SHARE_TOLERANCE:
        raise UserError(f"the models' rps add up to {fixed_rps:g}, not traffic.total_rps {float(total):g}; drop "
                        f"total_rps or make them agree", source=source, key="traffic.total_rps")
    if not any(t.target_rps > 0 for t in out):
        raise UserError("every model's target is 0 requests/s: nothing to plan", source=source, key="traffic.models")
    return out


def _only(data: dict[str, Any], allowed: tuple[str, ...], source: str, key: str) -> None:
    unknown = sorted(str(k) for k in set(data) - set(allowed))
    if unknown:
        raise UserError(f"unknown key(s) {unknown}; allowed: {list(allowed)}", source=source, key=key)


def _number(value: Any, *, positive: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return False
    return value > 0 if positive else value >= 0
