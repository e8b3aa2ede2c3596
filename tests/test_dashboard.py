"""Live view: `optuna-dashboard <storage URL>` opens the study storage a sweep writes, and each trial's metrics,
outcome, failure reason and constraints are there as user attributes (docs/review.md)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from test_report import GPU_STUDY, synthetic_results  # noqa: F401  (the fixture)

DASHBOARD = Path(sys.executable).with_name("optuna-dashboard")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _poll_trial(base: str, study_id: int, number: int, state: str, timeout: float = 20.0) -> dict[str, Any]:
    """The dashboard caches a study's trials for a couple of seconds: wait for the new state to show."""
    deadline = time.monotonic() + timeout
    while True:
        trials = {t["number"]: t for t in _get(f"{base}/api/studies/{study_id}")["trials"]}
        if number in trials and trials[number]["state"] == state:
            return trials[number]
        if time.monotonic() > deadline:
            raise AssertionError(f"trial {number} not {state} in the dashboard: {trials.get(number)}")
        time.sleep(0.5)


@pytest.fixture
def dashboard(synthetic_results: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    exe = DASHBOARD if DASHBOARD.exists() else shutil.which("optuna-dashboard")
    if exe is None:
        pytest.skip("optuna-dashboard is not installed (pip install optuna-dashboard; see docs/review.md)")
    port = _free_port()
    db = tmp_path / "studies.db"  # a copy: the test adds a trial to it, as a running sweep would
    shutil.copyfile(synthetic_results / "studies.db", db)
    url = f"sqlite:///{db.resolve()}"
    log = (tmp_path / "dashboard.log").open("w")
    proc = subprocess.Popen([str(exe), url, "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"],
                            stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"optuna-dashboard exited ({proc.returncode}): {(tmp_path / 'dashboard.log').read_text()}")
            try:
                _get(f"{base}/api/meta")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("optuna-dashboard did not answer within 60 s")
                time.sleep(0.3)
        yield base, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_dashboard_shows_studies_metrics_and_failure_reasons(dashboard: tuple[str, str]) -> None:
    base, url = dashboard
    studies = _get(f"{base}/api/studies")["study_summaries"]
    by_name = {s["study_name"]: s for s in studies}
    assert GPU_STUDY in by_name
    study_id = by_name[GPU_STUDY]["study_id"]
    detail = _get(f"{base}/api/studies/{study_id}")
    study_attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
    assert {"identity", "confirm", "objective"} <= set(study_attrs)
    trials = {t["number"]: t for t in detail["trials"]}
    attrs = {n: {a["key"]: a["value"] for a in t["user_attrs"]} for n, t in trials.items()}

    oom = next(n for n, a in attrs.items() if a.get("outcome") == "failed:oom")
    assert trials[oom]["state"] == "Complete"
    assert attrs[oom]["reason"].startswith("torch.OutOfMemoryError: CUDA out of memory")
    assert json.loads(attrs[oom]["constraints"]) == [1.0]  # the dashboard reads constraints from user attributes

    pruned = next(n for n, a in attrs.items() if a.get("outcome") == "pruned")
    assert trials[pruned]["state"] == "Pruned"
    assert "the node has 4" in attrs[pruned]["reason"] or "KV cache too small" in attrs[pruned]["reason"]

    ok = next(n for n, a in attrs.items() if a.get("outcome") == "ok" and a.get("baseline") is None)
    metrics = json.loads(attrs[ok]["metrics"])  # whole, not cut at the dashboard's 1024-character limit
    assert {"output_throughput", "p99_ttft_ms", "p99_tpot_ms", "capacity_rps", "kv_cache_tokens"} <= set(metrics)
    assert {p["name"] for p in trials[ok]["params"]} >= {"max_num_seqs", "tensor_parallel_size"}
    assert "settings" in attrs[ok] and "device_seconds" in attrs[ok]
    baseline = next(n for n, a in attrs.items() if a.get("baseline") == "vllm-defaults")
    assert baseline == 0 and "metrics" in attrs[baseline]

    # during a sweep: a trial that starts and then finishes shows up without restarting the dashboard
    import optuna

    study = optuna.load_study(study_name=GPU_STUDY, storage=url)
    trial = study.ask()
    trial.set_user_attr("settings", {"max_num_seqs": 64})
    assert _poll_trial(base, study_id, trial.number, "Running")
    trial.set_user_attr("outcome", "failed:start_timeout")
    trial.set_user_attr("reason", "the server did not answer /health within 600 s")
    trial.set_constraint("c0", 1.0)
    study.tell(trial, 0.0)
    done = _poll_trial(base, study_id, trial.number, "Complete")
    seen = {a["key"]: a["value"] for a in done["user_attrs"]}
    assert seen["outcome"] == "failed:start_timeout"
    assert seen["reason"] == "the server did not answer /health within 600 s"
