"""scripts/gpu_steady_evidence.py without a server: resume, deadline, packing, restore, the summary, the plan;
and deploy_together's one-after-another start of servers that share a GPU."""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("gpu_steady_evidence", ROOT / "scripts" / "gpu_steady_evidence.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_steady_evidence"] = mod
    spec.loader.exec_module(mod)
    return mod


def fake_group(ev, calls, seconds=None):
    """run_group stand-in: each unit takes its estimate (recorded, not slept) and is finished, as the real one."""

    def run_group(profile, state, deadline, config, units):
        for u in units:
            if state.done(u.name):
                continue
            deadline.require(seconds if seconds is not None else 1.0, u.name)
            calls.append(u.name)
            cap = {"dialogpt-1server": 20.0, "dialogpt-2servers": 30.0}.get(u.name, 10.0)
            state.finish(u.name, {"status": "ok", "unit": u.name, "config": u.config,
                                  "bracket": {"capacity_lo": cap, "capacity_hi": cap * 1.04, "converged": True,
                                              "precision": 0.05},
                                  "ceiling": {"req_s": cap * 1.2, "output_tok_s": cap * 300},
                                  "at_capacity": {"p99_ttft_ms": 800.0, "p99_tpot_ms": 40.0},
                                  "kv_tokens": {"planned_per_server": 1000, "reported_per_server": 990},
                                  "startup_s": [100.0], "steps": [{}] * 4})

    return run_group


def test_finished_units_are_skipped_on_rerun(ev, tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    profile = ev.gpu_profile(30.0)
    state = ev.State(tmp_path / "state")
    calls: list[str] = []
    assert ev.run_all(profile, state, ev.Deadline(None), list(ev.UNITS), fake_group(ev, calls)) == 0
    assert calls == list(ev.UNITS)
    calls.clear()
    assert ev.run_all(profile, ev.State(tmp_path / "state"), ev.Deadline(None), list(ev.UNITS),
                      fake_group(ev, calls)) == 0
    assert calls == []
    text = (tmp_path / "state" / "summary.md").read_text()
    assert "left to run: nothing" in text
    assert "| dialogpt-2servers | dialogpt-2 | 1x H200 | ok | 30.00 / 31.20 | 36.00 / 9000 | 800 / 40.0 | " \
           "1,000 / 990 | 100 | 4 |" in text
    assert "Two servers per GPU vs one: higher: [30.00, 31.20) vs [20.00, 20.80) req/s at the SLO, a gain of at least +44% and at most +56%" in text


def test_failed_unit_is_kept_unless_retried(ev, tmp_path):
    state = ev.State(tmp_path)
    state.finish("dialogpt-1server", {"status": "failed", "failure": {"kind": "oom", "message": "CUDA OOM"}})
    assert state.done("dialogpt-1server")
    assert not ev.State(tmp_path, retry_failed=True).done("dialogpt-1server")


def test_deadline_stops_before_a_unit_that_cannot_finish(ev, tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    profile = ev.gpu_profile(30.0)
    state = ev.State(tmp_path / "state")
    calls: list[str] = []
    deadline = ev.Deadline(100.0, t0=time.monotonic() - 60.0)  # 40 s left
    rc = ev.run_all(profile, state, deadline, ["build", "mistral-user-capacity"], fake_group(ev, calls, 50.0))
    assert rc == 0 and calls == []
    text = (tmp_path / "state" / "summary.md").read_text()
    assert "stopped at the deadline" in text and "left to run: build, mistral-user-capacity" in text


def test_deadline_require(ev):
    d = ev.Deadline(10.0)
    d.require(5.0, "fits")
    with pytest.raises(ev.DeadlineReached, match="needs ~20 s"):
        d.require(20.0, "too long")
    ev.Deadline(None).require(1e9, "no deadline")


def test_error_and_sigterm_still_write_summary_and_pack(ev, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    state = ev.State(tmp_path / "state")
    state.finish("build", {"status": "ok"})

    def boom(profile, state, deadline, config, units):
        if config is not None:
            raise RuntimeError("host on fire")

    assert ev.run_all(ev.gpu_profile(30.0), state, ev.Deadline(None), list(ev.UNITS), boom) == 1
    assert "RuntimeError: host on fire" in (out / "summary.md").read_text()
    assert (out / "gpu-state.tgz").exists()
    assert sorted(p.name for p in out.iterdir()) == ["gpu-state.tgz", "summary.md"]

    def term(profile, state, deadline, config, units):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

    assert ev.run_all(ev.gpu_profile(30.0), state, ev.Deadline(None), list(ev.UNITS), term) == 130
    assert "interrupted" in (out / "summary.md").read_text()


def test_pack_cuts_big_logs_to_their_tail_and_restore_round_trips(ev, tmp_path):
    state_dir = tmp_path / "state"
    state = ev.State(state_dir)
    state.finish("build", {"status": "ok"})
    state.write_json(state_dir / "mistral-user-capacity" / "steps.json", {"steps": [{"rate": 16.0}]})
    logs = state_dir / "logs" / "mistral-user" / "t" / "deployment0"
    logs.mkdir(parents=True)
    big = logs / "server0.log"
    big.write_bytes(b"x" * (ev.LOG_KEEP_BYTES + 10) + b"\nKV cache size: 1,234 tokens\n")
    (logs / "server1.log").write_text("small log\n")
    (state_dir / "mistral-defaults-compare" / "rate8").mkdir(parents=True)
    (state_dir / "mistral-defaults-compare" / "rate8" / "requests.jsonl").write_text("{}\n")
    cut = ev.pack_state(state_dir, tmp_path / "gpu-state.tgz")
    assert sorted(cut) == ["logs/mistral-user/t/deployment0/server0.log",
                           "mistral-defaults-compare/rate8/requests.jsonl"]
    with tarfile.open(tmp_path / "gpu-state.tgz") as tar:
        names = set(tar.getnames())
        tail = tar.extractfile("logs/mistral-user/t/deployment0/server0.log.tail").read()
    assert "logs/mistral-user/t/deployment0/server1.log" in names and "build/unit.json" in names
    assert len(tail) == ev.LOG_TAIL_BYTES and tail.endswith(b"KV cache size: 1,234 tokens\n")
    fresh = ev.State(tmp_path / "fresh")
    ev.restore_state(tmp_path / "gpu-state.tgz", fresh.root)
    assert fresh.done("build") and not fresh.done("mistral-user-capacity")
    assert json.loads((fresh.root / "mistral-user-capacity" / "steps.json").read_text()) == {"steps": [{"rate": 16.0}]}


def test_units_sharing_a_configuration_share_a_server_start(ev):
    groups = ev.server_groups(ev.gpu_profile(30.0), list(ev.UNITS))
    assert [(c, [u.name for u in us]) for c, us in groups] == [
        (None, ["build"]),
        ("mistral-compare", ["mistral-defaults-compare"]),  # prefix caching off: the same prompts every round
        ("mistral-defaults", ["mistral-defaults-capacity"]),
        ("mistral-user", ["mistral-user-capacity"]),
        ("dialogpt-1", ["dialogpt-1server"]),
        ("dialogpt-2", ["dialogpt-2servers"]),
    ]
    only = ev.server_groups(ev.gpu_profile(30.0), ["mistral-defaults-capacity"])
    assert [(c, [u.name for u in us]) for c, us in only] == [("mistral-defaults", ["mistral-defaults-capacity"])]


def test_gpu_profile_is_the_asked_for_run(ev):
    p = ev.gpu_profile(30.0)
    two = p.configs["dialogpt-2"]
    assert [s["gpu_memory_utilization"] for s in two.deployments] == [0.45, 0.45]
    assert [slot.gpu_ids for slot in two.slots] == [(0,), (0,)]
    assert p.configs["mistral-defaults"].deployments == ({},)
    assert p.configs["mistral-user"].deployments[0] == {"gpu_memory_utilization": 0.9, "max_model_len": 8192,
                                                        "max_num_batched_tokens": 32768}
    cap = p.unit("mistral-user-capacity").capacity
    assert (cap.start_rate, cap.slo.ttft_ms, cap.slo.tpot_ms, cap.precision, cap.max_steps) == (16.0, 1000.0, 50.0,
                                                                                                0.05, 5)
    assert (p.unit("dialogpt-1server").capacity.start_rate, p.unit("dialogpt-2servers").capacity.start_rate) == (64.0,
                                                                                                             128.0)
    # every resumable item fits a 9-minute command with its server start
    for u in p.units[1:]:
        assert p.first_item_s(u) < 9 * 60 - 60


def test_servers_sharing_a_gpu_start_one_after_another(monkeypatch, tmp_path):
    import harness.deploy as deploy_mod
    from harness.launch.placement import Slot

    events: list[str] = []

    class FakeServer:
        def __init__(self, name, spec):
            self.name, self.gpus = name, list(spec.gpus or [])

        def start(self):
            events.append(f"start {self.name}")

    class Group:
        n = 0

        def __init__(self, specs):
            self.name = f"g{Group.n}"
            Group.n += 1
            self.servers = [FakeServer(f"{self.name}.{i}", spec) for i, spec in enumerate(specs)]
            self.startup_s = 1.0
            self.argv = []
            self.targets = []

        def stop(self):
            events.append(f"stop {self.name}")

    monkeypatch.setattr(deploy_mod, "ServerGroup", Group)
    monkeypatch.setattr(deploy_mod, "wait_all_ready", lambda groups, gpus=None: events.append(
        "ready " + ",".join(g.name for g in groups) + (f" on {sorted(gpus)}" if gpus else "")))
    jobs = [deploy_mod.DeployJob("m", {}, Slot(gpu_ids=(0,)), tmp_path / "a"),
            deploy_mod.DeployJob("m", {}, Slot(gpu_ids=(0,)), tmp_path / "b"),
            deploy_mod.DeployJob("m", {}, Slot(gpu_ids=(1,)), tmp_path / "c")]
    with deploy_mod.deploy_together(jobs) as deps:
        assert len(deps) == 3
    # b shares GPU 0 with a: it starts once a is ready; c (GPU 1) does not wait for b
    assert events[:5] == ["start g0.0", "ready g0,g1 on [0]", "start g1.0", "start g2.0", "ready g0,g1,g2"]
    # servers_per_gpu 2 of one configuration on GPU 0, another configuration on GPU 1: the second server on GPU 0
    # waits for the first; the one on GPU 1 starts without waiting
    events.clear()
    jobs = [deploy_mod.DeployJob("m", {"servers_per_gpu": 2}, Slot(gpu_ids=(0,)), tmp_path / "d"),
            deploy_mod.DeployJob("m", {}, Slot(gpu_ids=(1,)), tmp_path / "e")]
    with deploy_mod.deploy_together(jobs) as deps:
        assert [d.gpu_ids for d in deps] == [[0], [1]]
    assert events[:5] == ["start g3.0", "ready g3 on [0]", "start g3.1", "start g4.0", "ready g3,g4"]
    # 2 replicas x 2 servers per GPU: both GPUs' first servers start together, and each GPU's second waits for that
    # GPU's first only (waiting for every started server made them 4 start-ups in turn)
    events.clear()
    with deploy_mod.deploy_together([deploy_mod.DeployJob("m", {"servers_per_gpu": 2, "replicas": 2},
                                                          Slot(gpu_ids=(0, 1)), tmp_path / "f")]):
        pass
    assert events[:6] == ["start g5.0", "start g5.2", "ready g5 on [0]", "start g5.1", "ready g5 on [1]",
                          "start g5.3"]


def test_a_search_cut_by_the_deadline_is_estimated_by_its_steps_left(ev, tmp_path):
    profile = ev.gpu_profile(30.0)
    unit = profile.unit("dialogpt-1server")
    state = ev.State(tmp_path / "state")
    assert state.saved_steps(unit.name) == []
    (state.unit_dir(unit.name) / "steps.json").write_text(json.dumps({"steps": [{"rate": 64.0}] * 5}))
    assert len(state.saved_steps(unit.name)) == 5
    full = profile.unit_estimate_s(unit, with_start=False)
    one_left = profile.unit_estimate_s(unit, with_start=False, steps_done=5)
    assert one_left == pytest.approx(10.0 + (full - 10.0) / unit.capacity.max_steps)  # 6 steps at most, 5 done
    text = ev.write_summary(profile, state, [unit.name], [])
    assert "| dialogpt-1server |" in text and "in progress: 5 of at most 6 steps saved" in text
