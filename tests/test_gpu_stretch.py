"""scripts/gpu-stretch.sh: what runs in which order inside a stretch's budget (the sweep and the evidence units
replaced by stubs that record their arguments), so a stretch spends its GPU time the way its header says."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu-stretch.sh"

STUB = """#!/usr/bin/env python3
import sys
with open({log!r}, "a") as f:
    f.write("{name} " + " ".join(sys.argv[1:]) + "\\n")
"""

pytestmark = pytest.mark.skipif(shutil.which("awk") is None or shutil.which("setsid") is None,
                                reason="needs awk and setsid")


def _tree(tmp_path: Path) -> tuple[Path, Path]:
    """A project tree whose sweep and evidence scripts only log how they were called."""
    tree, log = tmp_path / "repo", tmp_path / "calls.log"
    (tree / "scripts").mkdir(parents=True)
    (tree / "scripts" / "gpu_steady_evidence.py").write_text(STUB.format(log=str(log), name="evidence"))
    (tree / "scripts" / "offline-gpu-sweep.sh").write_text(
        f'#!/usr/bin/env bash\necho "sweep $*" >> {log}\n')
    (tree / "results").mkdir()
    (tree / "configs").mkdir()
    shutil.copy(SCRIPT, tree / "scripts" / "gpu-stretch.sh")
    return tree, log


def _run(tree: Path, tmp_path: Path, env_extra: dict[str, str], *args: str) -> list[list[str]]:
    env = {**os.environ, "GPU_STRETCH_DIR": str(tmp_path / "w"), **env_extra}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3 = this interpreter
    subprocess.run(["bash", "scripts/gpu-stretch.sh", "start", *args], cwd=tree, env=env, check=True,
                   capture_output=True, text=True, timeout=60)
    out = subprocess.run(["bash", "scripts/gpu-stretch.sh", "collect", str(tmp_path / "out"), "60"], cwd=tree,
                         env=env, check=True, capture_output=True, text=True, timeout=120)
    assert "stretch done" in out.stdout
    assert (tmp_path / "out" / "stretch.tgz").is_file()
    return [line.split() for line in (tmp_path / "calls.log").read_text().splitlines()]


def test_units_run_before_the_sweep_and_leave_it_fractional_minutes(tmp_path: Path) -> None:
    tree, _ = _tree(tmp_path)
    calls = _run(tree, tmp_path, {}, "1000", "sweeps/x.yaml", "build,unit-a", "100")
    assert [c[0] for c in calls] == ["evidence", "sweep"]
    assert (tmp_path / "w" / "tree" / "models").resolve() == (tree / "models").resolve()  # builds outlive the copy
    evidence, sweep = calls
    assert evidence[evidence.index("--only") + 1] == "build,unit-a"
    assert 880 <= float(evidence[evidence.index("--deadline-s") + 1]) <= 900  # budget - trial_s, less time spent
    minutes, hard = float(sweep[2]), int(sweep[3])
    assert sweep[1] == "sweeps/x.yaml"
    assert 14.8 <= minutes <= 15.0  # (1000 - 100) / 60, less the seconds the units took
    assert 960 <= hard <= 980  # 20 s before the budget ends


def test_units_after_the_sweep_fill_what_it_leaves(tmp_path: Path) -> None:
    tree, _ = _tree(tmp_path)
    calls = _run(tree, tmp_path, {"EVIDENCE_AFTER": "1"}, "1000", "sweeps/x.yaml", "unit-b", "100")
    assert [c[0] for c in calls] == ["sweep", "evidence"]
    sweep, evidence = calls
    assert 14.5 <= float(sweep[2]) <= 15.0
    assert 960 <= float(evidence[evidence.index("--deadline-s") + 1]) <= 980  # until 20 s before the end


def test_no_units_only_the_sweep(tmp_path: Path) -> None:
    tree, _ = _tree(tmp_path)
    calls = _run(tree, tmp_path, {"EVIDENCE_AFTER": "1"}, "400", "sweeps/x.yaml", "", "180")
    assert [c[0] for c in calls] == ["sweep"]
    assert 3.6 <= float(calls[0][2]) <= 3.67  # (400 - 180) / 60 = 3.67, not 3


def test_several_sweeps_run_in_turn_each_with_what_the_last_left(tmp_path: Path) -> None:
    # a study that is done (or refused a confirmation it had no time for) hands the rest of the stretch on
    tree, _ = _tree(tmp_path)
    # each sweep takes 2 s and leaves a results pack in its output folder (which collect must not bring back)
    (tree / "scripts" / "offline-gpu-sweep.sh").write_text(
        f'#!/usr/bin/env bash\necho "sweep $*" >> {tmp_path / "calls.log"}\nmkdir -p "$4"\n'
        'echo log > "$4/sweep.log"; echo pack > "$4/results.tgz"; sleep 2\n')
    calls = _run(tree, tmp_path, {}, "1000", "sweeps/a.yaml,sweeps/b.yaml", "", "100")
    assert [(c[0], c[1]) for c in calls] == [("sweep", "sweeps/a.yaml"), ("sweep", "sweeps/b.yaml")]
    (_, _, m1, h1, out1), (_, _, m2, h2, out2) = calls
    assert int(h1) - int(h2) >= 2 and float(m1) - float(m2) >= 0.025  # the second gets what the first left
    assert out1.endswith("/sweep-out") and out2.endswith("/sweep-out-1")  # one output folder per sweep file
    names = subprocess.run(["tar", "-tzf", str(tmp_path / "out" / "stretch.tgz")], capture_output=True, text=True,
                           check=True).stdout.split()
    assert "./sweep-out-1/sweep.log" in names and not any(n.endswith("results.tgz") for n in names)


def test_a_stop_before_the_next_sweep_starts_it_not(tmp_path: Path) -> None:
    tree, _ = _tree(tmp_path)
    (tmp_path / "w").mkdir()
    # the first sweep's stub plays `stop`: it interrupts that sweep, and the next one must not start
    (tree / "scripts" / "offline-gpu-sweep.sh").write_text(
        f'#!/usr/bin/env bash\necho "sweep $*" >> {tmp_path / "calls.log"}\ntouch {tmp_path / "w" / "stopping"}\n')
    calls = _run(tree, tmp_path, {}, "1000", "sweeps/a.yaml,sweeps/b.yaml", "", "100")
    assert [(c[0], c[1]) for c in calls] == [("sweep", "sweeps/a.yaml")]
