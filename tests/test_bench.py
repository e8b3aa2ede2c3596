"""`python -m harness.bench`: a launch the planner knows would fail is refused or sized before any server starts."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harness import bench
from harness.plan import detect_hardware
from harness.plan.hardware import Hardware


def _cpu(total_gib: float, available_gib: float) -> Hardware:
    return replace(detect_hardware("CPU"), memory_gib=total_gib, available_memory_gib=available_gib,
                   cpu_kv_cache_space_gib=None)


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Fail the test if the bench starts a server; record what it would have launched instead."""
    launched: list[dict[str, Any]] = []

    def deploy(model: str, settings: dict[str, Any], **kwargs: Any) -> Any:
        launched.append({"settings": settings, **kwargs})
        raise AssertionError("the bench started a server")

    monkeypatch.setattr(bench, "deploy", deploy)
    return launched


def test_bench_refuses_an_infeasible_cpu_launch_without_starting_a_server(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_server: list[dict[str, Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    # the machine: 13.71 of 15.34 GiB available on the node; the user asks for 0.92 of it
    monkeypatch.setattr(bench, "detect_hardware", lambda *a: _cpu(15.34, 13.71))
    rc = bench.main(["--model", str(tiny_model), "--set", "enforce_eager=true", "--set", "max_model_len=512",
                     "--set", "gpu_memory_utilization=0.92", "--workload", "tiny-cpu",
                     "--results-dir", str(tmp_path / "results")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and no_server == []
    assert len(err) == 1 and err[0].startswith("error: --set: gpu_memory_utilization: ")  # one line: the key ...
    assert "vLLM refuses to start" in err[0] and "fix: " in err[0] and "gpu_memory_utilization" in err[0].split(
        "fix: ")[1]  # ... and the fix
    assert not (tmp_path / "results").exists()


def test_bench_sizes_vllms_default_utilization_to_what_fits_and_says_so(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_server: list[dict[str, Any]],
        capsys: pytest.CaptureFixture[str]) -> None:
    """The README's example on the issue's machine: vLLM's default 0.92 would be refused; the bench lowers it."""
    monkeypatch.setattr(bench, "detect_hardware", lambda *a: _cpu(15.34, 13.71))
    with pytest.raises(AssertionError, match="started a server"):
        bench.main(["--model", str(tiny_model), "--set", "enforce_eager=true", "--set", "max_model_len=512",
                    "--workload", "tiny-cpu", "--results-dir", str(tmp_path / "results")])
    (launch,) = no_server
    util = launch["settings"]["gpu_memory_utilization"]
    assert 0 < util < 0.92 and util * 15.34 <= 13.71 - 1.0 + 0.01
    err = capsys.readouterr().err
    assert f"planner: gpu_memory_utilization {util:g}" in err and "refuses to start" in err
    # on a CPU host the server gets the cores the load client leaves (the client keeps one to itself)
    assert launch["slot"].gpu_ids == ()


def test_bench_refuses_when_nothing_fits(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         no_server: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(bench, "detect_hardware", lambda *a: _cpu(15.34, 0.5))
    rc = bench.main(["--model", str(tiny_model), "--set", "max_model_len=512", "--workload", "tiny-cpu",
                     "--results-dir", str(tmp_path / "results")])
    assert rc == 2 and no_server == []
    assert "error: --set: gpu_memory_utilization: " in capsys.readouterr().err


def test_a_cpu_trial_whose_memory_no_longer_fits_is_pruned_not_launched(
        tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweep re-reads the CPU host's memory right before each launch: planned when it fitted, pruned when the
    node's available memory has since dropped below the candidate's request."""
    from harness.launch.placement import SlotPool
    from harness.plan import load_model_facts
    from harness.space.spec import parse_space
    from harness.study import evaluate as evaluate_mod
    from harness.study.objectives import CapacityObjective

    monkeypatch.setattr(evaluate_mod, "deploy", lambda *a, **k: pytest.fail("a server was started"))
    monkeypatch.setattr(evaluate_mod, "detect_hardware", lambda *a: _cpu(15.34, 5.0))  # now: 5 GiB available
    space = parse_space({"name": "t", "fixed": {"max_model_len": 512}, "knobs": {}}, "test")
    ctx = evaluate_mod.StudyContext(
        model=str(tiny_model), model_name="tiny", slug="tiny", facts=load_model_facts(str(tiny_model)),
        hardware=_cpu(15.34, 13.71), space=space, workload=SimpleNamespace(max_total_tokens=lambda: 96),
        objective=CapacityObjective(), requests_for=lambda step: [], study_dir=tmp_path, start_timeout_s=10,
        slots=SlotPool(cpu_sets=[()]))
    ev = evaluate_mod.evaluate(ctx, {"max_model_len": 512, "gpu_memory_utilization": 0.5}, "trial000")
    assert ev.values is None and ev.pruned_reason and ev.pruned_reason.startswith("gpu_memory_utilization:")
    assert "5.00 GiB is available" in ev.pruned_reason
