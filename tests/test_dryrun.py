"""`python -m harness.sweep SWEEP --dry-run`: each model's plan, before any GPU time; nothing started or written."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import sweep as sweep_cli
from harness.study.objectives import CapacityObjective, GoodputObjective

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def nothing_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server start, a model build, a study or a tokenizer load fails the test."""
    from harness.launch import server
    from harness.models import build as model_build
    from harness.study import runner, tune

    def fail(*a: Any, **k: Any) -> Any:
        raise AssertionError("the dry run started something")

    monkeypatch.setattr(server.Server, "start", fail)
    monkeypatch.setattr(model_build, "build_tiny", fail)
    monkeypatch.setattr(model_build, "build_from_config", fail)
    monkeypatch.setattr(tune, "tune_model", fail)
    monkeypatch.setattr(runner, "open_study", fail)
    monkeypatch.setattr(tune, "load_tokenizer", fail)


def _tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def test_l40s_sweep_dry_run_plans_all_four_models(nothing_starts: None, capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the sweep's configs/ and results/ are relative to the project, as a user runs it
    before = _tree(ROOT / "results"), _tree(ROOT / "configs")
    rc = sweep_cli.main(["sweeps/l40s.yaml", "--dry-run", "--gpu", "L40S", "--num-gpus", "4"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (_tree(ROOT / "results"), _tree(ROOT / "configs")) == before  # nothing written
    assert "4 x L40S (planned for, not detected)" in out
    blocks = out.split("\n== ")[1:-1]
    assert [b.split()[0] for b in blocks] == ["dialogpt-medium", "mistral-7b-instruct-v0.2",
                                              "codellama-13b-instruct-hf", "llama-2-70b-chat-hf"]
    for block in blocks:
        share = float(block.split("candidates (")[1].split("%")[0])
        assert share > 0, block
        if share < 100:
            assert "pruned " in block and "(fix: " in block  # the reasons, counted, with their fixes
        assert "vLLM defaults" in block and "sampled example" in block
        assert "--api-key=<random>" in block and "--host=127.0.0.1" in block and "CUDA_VISIBLE_DEVICES=" in block
        assert "slots: GPUs [0, 1, 2, 3] of 4 x L40S; parallel 4" in block
        assert "GPU-hours (L40S)" in block and "assumes: a start-up of" in block
    mistral = blocks[1]
    assert "committed config" in mistral  # configs/mistral-7b-instruct-v0.2.yaml is queued as the second baseline
    committed = yaml.safe_load((ROOT / "configs" / "mistral-7b-instruct-v0.2.yaml").read_text())["vllm"]
    assert f"--tensor-parallel-size={committed['tensor_parallel_size']}" in mistral
    assert "max_model_len=1024" in blocks[0]  # DialoGPT's fixed model_max
    assert "pruned before launch: tensor_parallel_size" in blocks[3]  # vLLM's defaults cannot hold 70B on one L40S
    assert "== total estimate:" in out


def test_one_model_of_the_sweep(nothing_starts: None, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    rc = sweep_cli.main(["sweeps/l40s.yaml", "--dry-run", "--model", "dialogpt-medium"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("\n== ") == 2 and "dialogpt-medium" in out  # the model and the total


def test_demo_dry_run_builds_nothing(nothing_starts: None, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The demo from a fresh directory: the model is not built, only planned from the architecture it would be."""
    monkeypatch.chdir(tmp_path)
    rc = sweep_cli.main(["--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert os.listdir(tmp_path) == []  # no models/, results/ or configs/
    assert "not built yet: the sweep builds 'tiny'" in out and "(100.0%)" in out
    model = str(tmp_path / "models" / "tiny-llama")
    assert f"--model={model}" in out and "--kv-cache-memory-bytes=134217728" in out
    assert "CPU-host hours" in out


def test_a_model_without_feasible_candidates_exits_non_zero(nothing_starts: None, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's case: DialoGPT (1,024 positions) held to a longer max_model_len: no candidate can start."""
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"models": [{"model": "microsoft/DialoGPT-medium",
                                                "fixed": {"max_model_len": 4096}}], "space": "l40s-4x",
                                    "workload": "chat-short", "objective": {"kind": "capacity",
                                                                            "slo": {"ttft_ms": 1000}},
                                    "results_dir": str(tmp_path / "results")}))
    rc = sweep_cli.main([str(path), "--dry-run", "--gpu", "L40S", "--num-gpus", "4"])
    out = capsys.readouterr().out
    assert rc == 1
    error = out.strip().splitlines()[-1]
    assert error.startswith(f"error: {path}: models[dialogpt-medium]: no feasible candidate")
    assert "max_model_len" in error and "model_max" in error and "models[].fixed" in error  # reason and fix
    assert not (tmp_path / "results").exists()


def test_expected_step_duration_is_the_objectives() -> None:
    cap = CapacityObjective(start_rate=4.0, step_s=60.0, warmup_s=10.0)
    # a window step: warm-up (max(10 s, 3 x 2 s)), the 60 s window, a tail of one request's time, the last request
    assert cap.expected_step_s(2.0) == pytest.approx(10.0 + 60.0 + 2.0 + 2.0) and cap.expected_steps() == cap.max_steps
    assert GoodputObjective(rate=10.0, num_requests=100).expected_step_s(1.0) == pytest.approx(11.0)
    assert GoodputObjective(concurrency=8, num_requests=64).expected_step_s(3.0) == pytest.approx(8 * 3.0)
    assert GoodputObjective(rate=10.0, duration_s=60.0).expected_step_s(1.0) == 60.0
    assert GoodputObjective(rate=1.0).expected_steps() == 1
