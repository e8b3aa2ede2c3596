"""Lint a config in the user's format: a `vllm:` block (one server) and/or a `vllm_instances:` list (servers pinned to
`gpu_devices`), each planned on the node, plus the checks that span instances (shared or missing GPUs).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from harness.errors import UserError
from harness.yamlfile import read_yaml
from harness.plan.candidate import Plan, plan_candidate
from harness.plan.checks import Finding
from harness.plan.hardware import Hardware
from harness.plan.modelfacts import ModelFacts, load_model_facts

# The user's VLLMConfig dataclass (src/core/inference/vllm_engine.py in their guide) fills these when the YAML
# leaves them out; their tooling, not vLLM, supplies them, so a lint must plan with them too.
USER_VLLMCONFIG_DEFAULTS: dict[str, Any] = {
    "model_name": "microsoft/DialoGPT-medium",
    "tensor_parallel_size": 4,
    "gpu_memory_utilization": 0.9,
    "max_model_len": 2048,
}


@dataclass
class Target:
    """One vLLM server the config describes."""

    label: str  # "vllm" or "vllm_instances[1]"
    settings: dict[str, Any]
    gpu_devices: list[int] | None = None
    defaulted: list[str] = field(default_factory=list)  # keys taken from the user's VLLMConfig defaults


@dataclass
class TargetResult:
    target: Target
    plan: Plan | None
    findings: list[Finding]  # plan findings plus target-level ones (model not found, device list)


@dataclass
class LintReport:
    source: str
    hardware: Hardware
    results: list[TargetResult]
    node_findings: list[Finding]

    @property
    def errors(self) -> int:
        return sum(f.severity == "error" for r in self.results for f in r.findings) + sum(
            f.severity == "error" for f in self.node_findings)


def read_user_config(path: str | Path, *, user_defaults: bool = True) -> list[Target]:
    """The servers a user config describes. UserError for a missing file, bad YAML or no vllm section."""
    data = read_yaml(path, "config")
    if not isinstance(data, dict) or not ({"vllm", "vllm_instances"} & set(data)):
        raise UserError("no 'vllm:' block or 'vllm_instances:' list to lint", source=str(path))
    targets: list[Target] = []
    block = data.get("vllm")
    if block is not None:
        if not isinstance(block, dict):
            raise UserError("'vllm:' must be a mapping of setting -> value", source=str(path), key="vllm")
        targets.append(_target("vllm", dict(block), None, user_defaults))
    instances = data.get("vllm_instances")
    if instances is not None:
        if not isinstance(instances, list):
            raise UserError("'vllm_instances:' must be a list of servers", source=str(path), key="vllm_instances")
        for i, inst in enumerate(instances, 1):
            if not isinstance(inst, dict):
                raise UserError("each instance is a mapping of setting -> value", source=str(path),
                                key=f"vllm_instances[{i}]")
            settings = dict(inst)
            devices = settings.pop("gpu_devices", None)
            if devices is not None and (not isinstance(devices, list) or not all(
                    isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in devices)):
                raise UserError(f"gpu_devices must be a list of GPU indices, got {devices!r}", source=str(path),
                                key=f"vllm_instances[{i}].gpu_devices")
            targets.append(_target(f"vllm_instances[{i}]", settings, devices, user_defaults))
    return targets


def _target(label: str, settings: dict[str, Any], devices: list[int] | None, user_defaults: bool) -> Target:
    defaulted = []
    if user_defaults:
        for k, v in USER_VLLMCONFIG_DEFAULTS.items():
            if k not in settings:
                settings[k] = v
                defaulted.append(k)
    return Target(label, settings, devices, defaulted)


def lint_config(path: str | Path, hw: Hardware, *, argspec: Any = None, user_defaults: bool = True) -> LintReport:
    """Plan every server of a user config on `hw`, and check the device assignment across servers."""
    targets = read_user_config(path, user_defaults=user_defaults)
    results = [lint_target(t, hw, argspec=argspec, source=str(path)) for t in targets]
    return LintReport(str(path), hw, results, _node_checks(targets, hw))


def lint_target(t: Target, hw: Hardware, *, argspec: Any = None, source: str | None = None) -> TargetResult:
    findings: list[Finding] = []
    if t.defaulted:
        findings.append(Finding("info", ", ".join(t.defaulted),
                                "not set here; the user's VLLMConfig defaults apply: "
                                + ", ".join(f"{k}={t.settings[k]}" for k in t.defaulted)))
    model = t.settings.get("model_name")
    if not model:
        findings.append(Finding("error", "model_name", "no model_name: nothing to serve", "set model_name"))
        return TargetResult(t, None, findings)
    try:
        facts = load_model_facts(str(model))
    except UserError as exc:
        findings.append(Finding("error", "model_name", str(exc),
                                "use a local model directory, a cached hub model, or a shipped model"))
        return TargetResult(t, None, findings)
    if facts.source.startswith("shipped:") and str(model).startswith((".", "/", "~")):
        findings.append(Finding("info", "model_name",
                                f"{model} is not a model directory on this machine; planned with the shipped "
                                f"architecture facts of {facts.name} (the server needs the directory)"))
    node = hw
    if t.gpu_devices is not None and not hw.is_cpu:
        node = hw.with_count(max(1, len(t.gpu_devices)))
    plan = plan_candidate(facts, node, t.settings, argspec=argspec, source=source)
    findings += plan.findings
    if t.gpu_devices is not None and not hw.is_cpu:
        tp = int(plan.resolved.get("tp", 1) or 1)
        pp = int(plan.resolved.get("pp", 1) or 1)
        if len(t.gpu_devices) != tp * pp:
            findings.append(Finding(
                "error" if len(t.gpu_devices) < tp * pp else "warning", "gpu_devices",
                f"{len(t.gpu_devices)} GPU(s) {t.gpu_devices} for tensor_parallel_size {tp}"
                + (f" x pipeline_parallel_size {pp}" if pp > 1 else "")
                + ": vLLM uses exactly TP x PP GPUs" + (", so it cannot start" if len(t.gpu_devices) < tp * pp
                                                        else "; the rest sit idle"),
                f"list {tp * pp} device(s), or set tensor_parallel_size {len(t.gpu_devices)}"))
    return TargetResult(t, plan, _dedupe(findings))


def _node_checks(targets: list[Target], hw: Hardware) -> list[Finding]:
    out: list[Finding] = []
    pinned = [t for t in targets if t.gpu_devices is not None]
    if not pinned or hw.is_cpu:
        return out
    owners: dict[int, list[str]] = {}
    for t in pinned:
        for d in t.gpu_devices or []:
            owners.setdefault(d, []).append(t.label)
            if d >= hw.count:
                out.append(Finding("error", f"{t.label}.gpu_devices",
                                   f"GPU {d} does not exist: the node has {hw.count} {hw.name} (indices 0-"
                                   f"{hw.count - 1})", f"use indices below {hw.count}"))
    for d, labels in sorted(owners.items()):
        if len(labels) > 1:
            utils = [float(t.settings.get("gpu_memory_utilization") or 0.92) for t in pinned if t.label in labels]
            total = sum(utils)
            sev = "error" if total > 0.95 else "warning"
            out.append(Finding(sev, "gpu_devices",
                               f"GPU {d} is shared by {', '.join(labels)}; each claims its gpu_memory_utilization "
                               f"of the whole card (together {total:.2f})"
                               + (", so the later one finds too little free memory and refuses to start"
                                  if sev == "error" else ""),
                               "give each instance its own GPUs, or make their utilizations sum below 0.9"))
    used = len(owners)
    if used < hw.count and not any(f.severity == "error" for f in out):
        idle = sorted(set(range(hw.count)) - set(owners))
        out.append(Finding("info", "gpu_devices", f"GPU(s) {idle} are assigned to no instance"))
    return out


def _dedupe(findings: list[Finding]) -> list[Finding]:
    seen, out = set(), []
    for f in findings:
        if (f.severity, f.key, f.message) not in seen:
            seen.add((f.severity, f.key, f.message))
            out.append(f)
    rank = {"error": 0, "warning": 1, "info": 2}
    return sorted(out, key=lambda f: rank.get(f.severity, 9))


# ---------------------------------------------------------------------------------------------- spaces


@dataclass
class SpaceReport:
    """How much of a search space the planner lets through, before any GPU time."""

    space: str
    model: str
    hardware: str
    grid_size: int
    evaluated: int
    sampled: bool
    violating_conditions: int
    infeasible: int
    feasible: int
    reasons: list[tuple[str, int]]  # (key: first error's short reason, count)
    by_knob: dict[str, list[tuple[Any, int, int]]]  # knob -> [(value, feasible, evaluated)]
    fixes: dict[str, str] = field(default_factory=dict)  # reason -> the planner's fix for its first candidate

    @property
    def feasible_fraction(self) -> float:
        return self.feasible / self.evaluated if self.evaluated else 0.0

    def summary(self) -> str:
        """One line: the feasible share and the most common reason for pruning, with its fix."""
        how = f"{self.evaluated:,} sampled of {self.grid_size:,}" if self.sampled else f"all {self.grid_size:,}"
        line = (f"space {self.space} for {self.model} on {self.hardware}: {self.feasible:,} of {how} candidates "
                f"feasible ({100 * self.feasible_fraction:.1f}%)")
        if self.reasons:
            reason, count = self.reasons[0]
            fix = self.fixes.get(reason)
            line += f"; most pruned by {reason} ({count:,})" + (f"; fix: {fix}" if fix else "")
        if self.violating_conditions:
            line += f"; {self.violating_conditions:,} break a condition of the space"
        return line


def require_feasible(space: Any, facts: ModelFacts, hw: Hardware, *, source: str | None = None,
                     key: str | None = None, max_candidates: int = 20000,
                     longest_request: int | None = None) -> SpaceReport:
    """The space's feasibility report, or UserError when no candidate can run: a sweep calls it before it starts a
    model's study, so no trial budget is spent on candidates the planner prunes anyway."""
    report = space_feasibility(space, facts, hw, max_candidates=max_candidates, longest_request=longest_request)
    error = infeasible_error(report, source=source, key=key)
    if error is not None:
        raise error
    return report


def infeasible_error(report: SpaceReport, *, source: str | None = None, key: str | None = None) -> UserError | None:
    """The UserError (reason and fix) of a space with no feasible candidate; None when one can run."""
    if report.feasible:
        return None
    hint = ("; in a space, the max_model_len choice 'model_max' is each model's longest context"
            if report.reasons and report.reasons[0][0].startswith("max_model_len") else "")
    return UserError(f"no feasible candidate: {report.summary()}{hint}; or give this model its own values in the "
                     f"sweep file (models[].fixed replaces the space's knob, models[].workload the sweep's workload)",
                     source=source, key=key)


def space_feasibility(space: Any, facts: ModelFacts, hw: Hardware, *, max_candidates: int = 20000,
                      seed: int = 0, longest_request: int | None = None) -> SpaceReport:
    """Plan every candidate of `space` (its full grid, or `max_candidates` uniform samples of a larger one).

    `space` is a harness.space.SearchSpace: `.knobs` (name -> knob with `.values()`), `.fixed`, `.grid()`,
    `.grid_size()` and `.violations(settings)`; one not yet for a model is planned for `facts` (its `model_max`).
    """
    if space.model_max_len is None:
        space = space.for_model(facts.max_context)
    size = space.grid_size()
    sampled = size > max_candidates
    if sampled:
        rng = random.Random(seed)
        candidates = (space.sample(rng) for _ in range(max_candidates))
        n_eval = max_candidates
    else:
        candidates = space.grid()
        n_eval = size
    violating = infeasible = feasible = 0
    reasons: Counter[str] = Counter()
    fixes: dict[str, str] = {}
    by_knob: dict[str, dict[Any, list[int]]] = {n: {} for n in space.knobs}
    for settings in candidates:
        ok = False
        if space.violations(settings):
            violating += 1
        else:
            plan = plan_candidate(facts, hw, settings, longest_request=longest_request)
            if plan.feasible:
                feasible += 1
                ok = True
            else:
                infeasible += 1
                first = plan.errors()[0]
                reason = f"{first.key}: {_short(first.message)}"
                reasons[reason] += 1
                fixes.setdefault(reason, first.fix)
        for n in space.knobs:
            cell = by_knob[n].setdefault(_hashable(settings.get(n)), [0, 0])
            cell[0] += ok
            cell[1] += 1
    return SpaceReport(
        space=getattr(space, "name", "space"), model=facts.name,
        hardware=f"{hw.count}x {hw.name}" if not hw.is_cpu else "CPU", grid_size=size, evaluated=n_eval,
        sampled=sampled, violating_conditions=violating, infeasible=infeasible, feasible=feasible,
        reasons=reasons.most_common(), fixes=fixes,
        by_knob={n: [(v, c[0], c[1]) for v, c in sorted(cells.items(), key=lambda kv: _sort_key(kv[0]))]
                 for n, cells in by_knob.items()})


def _sort_key(v: Any) -> tuple[int, float, str]:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, float(v), "")
    return (0 if v is None else 2, 0.0, str(v))


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def _short(message: str) -> str:
    """The reason without its candidate-specific numbers, so equal causes count together."""
    import re

    text = message.split("; ")[0]
    text = re.sub(r"\b\d[\d,.]*\b( GiB)?", "N", text)
    if len(text) > 140:
        text = text[:140].rsplit(" ", 1)[0] + " ..."
    return text
