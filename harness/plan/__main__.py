"""python -m harness.plan: lint a user config, plan one candidate, or count a search space's feasible candidates.

    python -m harness.plan configs/config.yaml --gpu L40S --num-gpus 4      # lint the user's format
    python -m harness.plan --model mistralai/Mistral-7B-Instruct-v0.2 --space l40s-4x --gpu L40S --num-gpus 4
    python -m harness.plan --model meta-llama/Llama-2-70b-chat-hf --set tensor_parallel_size=4 --gpu L40S --num-gpus 4

Without --gpu, the GPUs NVML sees are planned for (the CPU host when there are none).
Exit status: 0 when nothing is an error, 1 when the config (or the candidate) has errors, 2 for bad input
(missing file, malformed YAML, unknown GPU or model).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from typing import Any, Sequence


from harness.errors import UserError, main_guard
from harness.yamlfile import parse_scalars
from harness.plan import Plan, detect_hardware, load_model_facts, plan_candidate
from harness.plan.checks import Finding
from harness.plan.hardware import GPU_CATALOG, Hardware
from harness.plan.lint import LintReport, SpaceReport, lint_config, space_feasibility


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m harness.plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="GPUs: " + ", ".join(sorted(GPU_CATALOG)) + ", CPU. Exit: 0 ok, 1 errors found, "
                                       "2 bad input.")
    p.add_argument("config", nargs="?", help="a config in the user's format (vllm: block and/or vllm_instances:)")
    p.add_argument("--model", help="model (local dir, cached hub name or shipped name) for --space / --set")
    p.add_argument("--space", help="search space file or shipped name: how much of it is feasible")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="plan one candidate with these settings (YAML values), repeatable")
    p.add_argument("--gpu", help="plan for this GPU model instead of the detected one (e.g. L40S, H100, CPU)")
    p.add_argument("--num-gpus", type=int, help="plan for this many GPUs")
    p.add_argument("--samples", type=int, default=20000, help="--space: candidates planned when the grid is larger")
    p.add_argument("--no-user-defaults", action="store_true",
                   help="lint: do not fill absent keys with the user's VLLMConfig defaults (DialoGPT-medium, TP 4, ...)")
    p.add_argument("--no-key-check", action="store_true",
                   help="skip checking keys against the installed vLLM's parser")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return p


@main_guard
def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.num_gpus is not None and args.num_gpus < 1:
        raise UserError(f"must be at least 1, got {args.num_gpus}", key="--num-gpus")
    modes = sum(bool(x) for x in (args.config, args.space, args.set))
    if modes != 1:
        raise UserError("give exactly one of: a config file, --space (with --model), or --set (with --model)")
    if (args.space or args.set) and not args.model:
        raise UserError("--space and --set need --model")
    hw = detect_hardware(args.gpu, args.num_gpus)
    out = sys.stdout
    if args.config:
        argspec = None if args.no_key_check else _argspec(out)
        report = lint_config(args.config, hw, argspec=argspec, user_defaults=not args.no_user_defaults)
        if args.json:
            print(json.dumps(_report_json(report), indent=2), file=out)
        else:
            print_lint(report, out)
        return 1 if report.errors else 0
    facts = load_model_facts(args.model)
    if args.space:
        from harness.space import load_space

        space = load_space(args.space)
        rep = space_feasibility(space, facts, hw, max_candidates=args.samples)
        if args.json:
            print(json.dumps(rep.__dict__ | {"feasible_fraction": rep.feasible_fraction}, indent=2, default=str),
                  file=out)
        else:
            print_space(rep, out)
        return 0
    settings = {"model_name": args.model}
    settings.update(parse_scalars(args.set, "--set"))
    argspec = None if args.no_key_check else _argspec(out)
    plan = plan_candidate(facts, hw, settings, argspec=argspec, source="--set")
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2), file=out)
    else:
        print(f"{facts.name} on {plan.hardware}", file=out)
        print_findings(plan.findings, out)
        print_estimates([("candidate", plan)], out)
    return 0 if plan.feasible else 1


def _argspec(out: Any) -> Any:
    """The installed vLLM's parser (harness.launch.vllm_args); None with a note when there is no vLLM here."""
    try:
        from harness.launch.vllm_args import load_argspec
    except ImportError:
        print("note: harness.launch.vllm_args is not available; keys are not checked against vLLM", file=sys.stderr)
        return None
    try:
        return load_argspec()
    except UserError as exc:
        print(f"note: keys not checked against vLLM ({exc})", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------- tables


def _table(rows: list[list[str]], widths: list[int], out: Any) -> None:
    """Plain-text table; cells wrap at their column width."""
    for row in rows:
        cells = [textwrap.wrap(str(c), w) or [""] for c, w in zip(row, widths)]
        height = max(len(c) for c in cells)
        for i in range(height):
            line = "  ".join((c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths))
            print(line.rstrip(), file=out)


def print_findings(findings: list[Finding], out: Any) -> None:
    if not findings:
        print("  no findings", file=out)
        return
    rows = [["SEVERITY", "KEY", "FINDING (WHY)", "FIX"], ["--------", "---", "-------------", "---"]]
    rows += [[f.severity, f.key, f.message, f.fix] for f in findings]
    _table(rows, [8, 22, 62, 44], out)


def print_estimates(items: list[tuple[str, Plan]], out: Any) -> None:
    rows = [["SERVER", "GPUS", "WEIGHTS/GPU", "KV BUDGET/GPU", "KV TOKENS", "BLOCKS", "MAX CONC", "DECODE ROOFLINE"],
            ["------", "----", "-----------", "-------------", "---------", "------", "--------", "---------------"]]
    for label, p in items:
        rows.append([label, str(p.gpus_needed),
                     _f(p.weights_gib_per_gpu, "{:.2f} GiB"), _f(p.kv_budget_gib_per_gpu, "{:.2f} GiB"),
                     _f(p.kv_cache_tokens, "{:,}"), _f(p.kv_cache_blocks, "{:,}"),
                     _f(p.max_concurrency_at_max_len, "{:.1f}x"), _f(p.decode_roofline_tok_s, "{:,.0f} tok/s")])
    _table(rows, [20, 4, 11, 13, 11, 8, 8, 16], out)


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else fmt.format(v)


def print_lint(report: LintReport, out: Any) -> None:
    hw = report.hardware
    print(f"{report.source}: planned for {_hw_line(hw)}", file=out)
    for r in report.results:
        model = r.target.settings.get("model_name", "?")
        print(f"\n[{r.target.label}] {model}", file=out)
        print_findings(r.findings, out)
    if report.node_findings:
        print("\n[node]", file=out)
        print_findings(report.node_findings, out)
    plans = [(r.target.label, r.plan) for r in report.results if r.plan is not None]
    if plans:
        print("\nEstimates (per server; KV tokens as vLLM will log them; roofline = upper bound, all replicas):",
              file=out)
        print_estimates(plans, out)
    n_err = report.errors
    n_warn = sum(f.severity == "warning" for r in report.results for f in r.findings) + sum(
        f.severity == "warning" for f in report.node_findings)
    print(f"\n{n_err} error(s), {n_warn} warning(s)", file=out)


def _hw_line(hw: Hardware) -> str:
    if hw.is_cpu:
        kv = (f"VLLM_CPU_KVCACHE_SPACE={hw.cpu_kv_cache_space_gib:g} GiB" if hw.cpu_kv_cache_space_gib is not None
              else "KV cache = gpu_memory_utilization x node memory - worker RSS")
        return f"the CPU host (memory node {hw.memory_gib:.2f} GiB; {kv})"
    src = "detected" if hw.detected else "catalog"
    return (f"{hw.count}x {hw.name} ({hw.memory_gib:.2f} GiB, {hw.bandwidth_gbps or '?'} GB/s each, "
            f"{hw.interconnect}; {src})")


def print_space(rep: SpaceReport, out: Any) -> None:
    how = f"{rep.evaluated:,} sampled of {rep.grid_size:,}" if rep.sampled else f"all {rep.grid_size:,}"
    print(f"space {rep.space} for {rep.model} on {rep.hardware}: {how} candidates planned", file=out)
    print(f"  feasible             {rep.feasible:,} ({100 * rep.feasible_fraction:.1f}%)", file=out)
    print(f"  pruned by planner    {rep.infeasible:,}", file=out)
    print(f"  break a condition    {rep.violating_conditions:,}", file=out)
    if rep.reasons:
        print("\nWhy candidates are pruned (first error of each):", file=out)
        _table([["COUNT", "REASON"], ["-----", "------"]] + [[f"{n:,}", r] for r, n in rep.reasons[:12]],
               [8, 100], out)
    print("\nFeasible share by knob value:", file=out)
    rows = [["KNOB", "VALUE", "FEASIBLE"], ["----", "-----", "--------"]]
    for knob, cells in rep.by_knob.items():
        if len(cells) > 12:
            continue  # continuous knobs: too many values to list
        for value, ok, n in cells:
            rows.append([knob, str(value), f"{ok:,}/{n:,} ({100 * ok / n:.0f}%)" if n else "-"])
    _table(rows, [24, 12, 24], out)


def _report_json(report: LintReport) -> dict[str, Any]:
    return {
        "source": report.source,
        "hardware": report.hardware.to_dict(),
        "errors": report.errors,
        "servers": [{"label": r.target.label, "settings": r.target.settings, "gpu_devices": r.target.gpu_devices,
                     "findings": [f.to_dict() for f in r.findings],
                     "plan": r.plan.to_dict() if r.plan else None} for r in report.results],
        "node_findings": [f.to_dict() for f in report.node_findings],
    }


if __name__ == "__main__":
    sys.exit(main())
