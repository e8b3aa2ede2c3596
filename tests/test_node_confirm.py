"""The node confirmation: the mixed load (each model's schedule at its own rate, routed only to its own servers,
one clock), the per-model verdict against servers of known capacity, the user's layout side by side, the
not-recommended path; and, on vLLM's CPU build, two tiny models served at once under one mixed load."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from capacity_fake import CapacityConfig, CapacityFake, requests_for  # noqa: E402
from fakeserver import FakeConfig, FakeServer  # noqa: E402

from harness.errors import UserError  # noqa: E402
from harness.launch.placement import Slot  # noqa: E402
from harness.load.window import WindowSpec, common_window  # noqa: E402
from harness.measure.step import WindowStream, run_mixed_window_step  # noqa: E402
from harness.node import confirm as confirm_mod  # noqa: E402
from harness.node.__main__ import main  # noqa: E402
from harness.node.emit import not_recommended_path  # noqa: E402
from harness.records import SLO  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LOOSE = SLO(ttft_ms=8000, tpot_ms=1000, percentile=90)


# ---------------------------------------------------------------------------------------------- the mixed load


def test_mixed_load_runs_every_model_at_its_rate_on_its_own_servers_on_one_clock() -> None:
    spec = WindowSpec(step_s=4.0, warmup_s=0.5, drain_s=30.0)
    plans = common_window([spec.plan(10.0), WindowSpec(step_s=4.0, warmup_s=1.0, drain_s=30.0, seed=1).plan(4.0)])
    assert plans[0].window == plans[1].window == (1.0, 5.0)  # the longer warm-up holds for both
    fast = FakeConfig(first_token_delay_s=0.01, chunk_delay_s=0.005, model="a")
    with FakeServer(fast) as a1, FakeServer(fast) as a2, FakeServer(FakeConfig(first_token_delay_s=0.01,
                                                                                chunk_delay_s=0.005)) as b:
        streams = [WindowStream("a", [(a1.url, None), (a2.url, None)], requests_for(plans[0].requests_needed(), 8),
                                plans[0], "served-a", "completions", LOOSE),
                   WindowStream("b", [(b.url, None)], requests_for(plans[1].requests_needed(), 8), plans[1],
                                "served-b", "completions", LOOSE)]
        steps = run_mixed_window_step(streams, scrape_period_s=None)
        logs = {"a1": a1.log(), "a2": a2.log(), "b": b.log()}
    # routing: each model's requests reached only its own servers, with the name those serve; round-robin at
    # equal load over model a's two servers
    assert {e["model"] for e in logs["a1"] + logs["a2"]} == {"served-a"}
    assert {e["model"] for e in logs["b"]} == {"served-b"}
    assert len(logs["a1"]) + len(logs["a2"]) == plans[0].requests_needed() == len(steps["a"].load.results)
    assert len(logs["b"]) == plans[1].requests_needed() == len(steps["b"].load.results)
    assert abs(len(logs["a1"]) - len(logs["a2"])) <= 0.3 * len(logs["a1"])
    # one clock: both schedules start together and span the same seconds, each at its own rate
    for name, plan in (("a", plans[0]), ("b", plans[1])):
        sends = [r.send_s for r in steps[name].load.results]
        assert min(sends) < 0.2 and plan.send_s - 1.0 < max(sends) <= plan.send_s + 0.5
        st = steps[name].steady
        assert st.kept_up and all(r.ok for r in steps[name].load.results)
        assert 0.4 * plan.rate < st.offered_rate < 1.8 * plan.rate  # Poisson over a 4 s window
        assert steps[name].metrics.slo_attainment == 1.0
    assert steps["a"].load.t0_perf_ns == steps["b"].load.t0_perf_ns
    assert len([r for r in steps["a"].results if not r.warmup]) > len([r for r in steps["b"].results if not r.warmup])


def test_mixed_step_refuses_streams_with_different_windows() -> None:
    a = WindowSpec(step_s=2.0, warmup_s=0.5).plan(2.0)
    b = WindowSpec(step_s=2.0, warmup_s=1.0).plan(2.0)
    s = [WindowStream("a", [("http://127.0.0.1:1", None)], requests_for(10, 4), a, "a", "completions"),
         WindowStream("b", [("http://127.0.0.1:1", None)], requests_for(10, 4), b, "b", "completions")]
    with pytest.raises(ValueError, match="common window"):
        run_mixed_window_step(s)


# ---------------------------------------------------------------------------------------------- confirm_plan


def _tiny_sweep(root: Path, model: Path, *, rps: tuple[float, float], seqs: tuple[int, int]) -> Path:
    """Two models (two names of one tiny model directory) on a 2-GPU node plan, a loose SLO."""
    space = {"name": "node-e2e", "knobs": {"max_num_seqs": {"type": "categorical", "choices": [1, 8]}},
             "fixed": {"enforce_eager": True, "max_model_len": 512, "kv_cache_memory_bytes": 64 * 2**20}}
    (root / "space.yaml").write_text(yaml.safe_dump(space))
    sweep = {"models": [{"name": n, "model": str(model), "model_name": n, "fixed": {"max_num_seqs": s}}
                        for n, s in zip(("tiny-a", "tiny-b"), seqs)],
             "space": str(root / "space.yaml"), "workload": "tiny-cpu", "start_timeout_s": 400,
             "objective": {"kind": "capacity", "slo": {"ttft_ms": 8000, "tpot_ms": 1000, "percentile": 90}},
             "hardware": {"gpu": "L40S", "num_gpus": 2}, "results_dir": str(root / "results"),
             "traffic": {"models": {"tiny-a": {"rps": rps[0]}, "tiny-b": {"rps": rps[1]}}}}
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def _fake_node(monkeypatch: pytest.MonkeyPatch, started: list[list[Any]]) -> None:
    """Each deployed server is a capacity fake whose decode slots are the instance's max_num_seqs (capacity
    slots / E[service]): a layout's known capacity. Two core slots, as on a 2-core CPU host."""

    @contextlib.contextmanager
    def deploy_together(jobs: list[Any], *, start_timeout_s: float) -> Iterator[list[Any]]:
        fakes = [CapacityFake(CapacityConfig(slots=int(j.settings["max_num_seqs"]), prefill_s=0.02, token_s=0.02))
                 for j in jobs]
        with contextlib.ExitStack() as stack:
            for f in fakes:
                stack.enter_context(f)
            started.append([(j.served_model_name, j.slot, j.model) for j in jobs])
            yield [SimpleNamespace(group=SimpleNamespace(targets=[(f.url, None)]), pids=[f._proc.pid], gpu_ids=[],
                                   served_name=j.served_model_name or j.model, log_paths=[],
                                   dead_server_failure=lambda: None) for f, j in zip(fakes, jobs)]

    monkeypatch.setattr(confirm_mod, "deploy_together", deploy_together)
    hw = SimpleNamespace(is_cpu=True, cpu_kv_cache_space_gib=None)
    monkeypatch.setattr(confirm_mod, "node_here", lambda n: confirm_mod.NodeHere(
        "fake node, 2 core sets", [Slot(cpu_cores=(0,)), Slot(cpu_cores=(1,))], True, hw))


def test_a_plan_that_misses_an_slo_is_not_recommended_and_the_users_layout_is_measured_beside_it(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # tiny-b: one decode slot, E[service] = 0.02 + 0.02 x 23 = 0.48 s -> capacity ~2.1 req/s, offered 6 req/s
    started: list[list[Any]] = []
    _fake_node(monkeypatch, started)
    sweep = _tiny_sweep(tmp_path, tiny_model, rps=(3.0, 6.0), seqs=(8, 1))
    user = tmp_path / "theirs.yaml"
    user.write_text(yaml.safe_dump({"vllm_instances": [
        {"model_name": name, "tensor_parallel_size": 1, "max_num_seqs": 8, "max_model_len": 512,
         "kv_cache_memory_bytes": 2**26, "gpu_devices": [gpu]} for name, gpu in (("tiny-b", 0), ("tiny-a", 1))]}))
    out = tmp_path / "configs" / "node.yaml"
    rc = main([str(sweep), "--confirm", "--user-config", str(user), "--window", "5", "--warmup", "1",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 1
    # both layouts: all their servers at once, named as served, on the cores of their devices
    assert [[(n, s.cpu_cores) for n, s, _ in call] for call in started] == [
        [("tiny-a", (0,)), ("tiny-b", (1,))], [("tiny-b", (0,)), ("tiny-a", (1,))]]
    assert all(Path(m).is_absolute() for call in started for _, _, m in call)  # the local model path
    record = json.loads(next((tmp_path / "results" / "node").glob("*/confirm.json")).read_text())
    for lay in ("plan", "user_layout"):  # every server of a layout took requests while the others did
        runs = record[lay]["servers"]
        assert max(s["first_sent_at"] for s in runs) < min(s["last_done_at"] for s in runs)
    by = {(m["layout"], m["name"]): m for lay in ("plan", "user_layout") for m in record[lay]["models"]}
    assert by[("plan", "tiny-a")]["meets_slo"] and by[("plan", "tiny-a")]["kept_up"]
    b = by[("plan", "tiny-b")]
    assert not b["meets_slo"] and not b["kept_up"] and b["achieved_rps"] < 0.6 * b["target_rps"]
    assert by[("user", "tiny-b")]["meets_slo"] and by[("user", "tiny-a")]["meets_slo"]
    assert record["recommended"] is False and any("tiny-b: not steady" in r for r in record["reasons"])
    for (lay, name), m in by.items():
        assert m["placed_on"] and m["rss_peak_mib"] and m["requests"] > 0
        assert m["goodput_rps"] <= m["offered_rps"] + 1e-9  # over the window's seconds, like the offered rate
        assert Path(m["record"]).is_file()
    # the table: both layouts per model, side by side; the verdict
    assert re.search(r"tiny-b\s+plan\s+cores 1\s+6/s", printed) and re.search(r"tiny-b\s+user\s+cores 0\s+6/s", printed)
    assert "NOT RECOMMENDED" in printed and "SLO ATTAIN" in printed
    # not written where the user's tooling deploys from; written beside it, saying why
    assert not out.exists()
    doc = yaml.safe_load(not_recommended_path(out).read_text())
    assert doc["recommended"] is False and any("tiny-b" in r for r in doc["not_recommended_because"])
    assert doc["provenance"]["confirmation"]["user_layout_meets_all"] is True
    assert not_recommended_path(out).read_text().splitlines()[2].startswith("# NOT RECOMMENDED")


def test_a_plan_that_meets_every_slo_is_written_as_recommended(
        tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    started: list[list[Any]] = []
    _fake_node(monkeypatch, started)
    sweep = _tiny_sweep(tmp_path, tiny_model, rps=(3.0, 2.0), seqs=(8, 8))
    out = tmp_path / "node.yaml"
    assert main([str(sweep), "--confirm", "--window", "4", "--warmup", "1", "--out", str(out)]) == 0
    assert "RECOMMENDED: every model met its SLO" in capsys.readouterr().out
    doc = yaml.safe_load(out.read_text())
    assert doc["recommended"] is True and "not_recommended_because" not in doc
    assert {m["name"] for m in doc["provenance"]["confirmation"]["models"]} == {"tiny-a", "tiny-b"}
    assert len(started) == 1  # no user layout given


def test_user_layout_bad_input_names_file_and_key(tmp_path: Path, tiny_model: Path) -> None:
    from harness.node.build import build_plan
    from harness.node.inputs import load_inputs
    from harness.node.topology import Topology
    from harness.plan import detect_hardware

    inputs = load_inputs(_tiny_sweep(tmp_path, tiny_model, rps=(1.0, 1.0), seqs=(8, 8)))
    plan = build_plan(inputs, detect_hardware("L40S", 2), Topology(2), out=open(os.devnull, "w"))
    user = tmp_path / "u.yaml"
    cases = [([{"model_name": "ghost", "tensor_parallel_size": 1, "gpu_devices": [0]}], "vllm_instances[1].model_name"),
             ([{"model_name": "tiny-a", "tensor_parallel_size": 1}], "vllm_instances[1].gpu_devices"),
             ([{"model_name": "tiny-a", "tensor_parallel_size": 2, "gpu_devices": [0]}], "vllm_instances[1].gpu_devices"),
             ([{"model_name": "tiny-a", "tensor_parallel_size": 1, "gpu_devices": [0]},
               {"model_name": "tiny-b", "tensor_parallel_size": 1, "gpu_devices": [0]}], "vllm_instances[2].gpu_devices"),
             ([{"model_name": "tiny-a", "tensor_parallel_size": 1, "gpu_devices": [2]}], "vllm_instances[1].gpu_devices")]
    for instances, key in cases:
        user.write_text(yaml.safe_dump({"vllm_instances": instances}))
        with pytest.raises(UserError) as err:
            confirm_mod.user_layout(user, plan)
        assert str(user) in str(err.value) and key in str(err.value), str(err.value)
    # the guide's defaults fill what an instance leaves out (their VLLMConfig: tensor_parallel_size 4)
    user.write_text(yaml.safe_dump({"vllm_instances": [{"model_name": "tiny-a", "gpu_devices": [0, 1]}]}))
    with pytest.raises(UserError, match="tensor_parallel_size x pipeline_parallel_size = 4"):
        confirm_mod.user_layout(user, plan)
    assert main([str(inputs.sweep.source), "--user-config", str(user)]) == 2  # --user-config needs --confirm


# ---------------------------------------------------------------------------------------------- vLLM CPU build


@pytest.mark.slow
def test_confirm_runs_two_tiny_models_at_once_on_two_core_slots(tmp_path: Path) -> None:
    """Two different tiny models (seeds 1 and 2), one core each, both servers up at once under one mixed load."""
    for name, seed in (("a", 1), ("b", 2)):
        subprocess.run([sys.executable, "-m", "harness.models", "tiny", str(tmp_path / f"tiny-{name}"), "--seed",
                        str(seed), "--device", "cpu"], check=True, cwd=ROOT, capture_output=True, timeout=600)
    sweep = _tiny_sweep(tmp_path, tmp_path / "tiny-a", rps=(2.0, 1.0), seqs=(8, 8))
    data = yaml.safe_load(sweep.read_text())
    data["models"][1]["model"] = str(tmp_path / "tiny-b")
    sweep.write_text(yaml.safe_dump(data))
    out = tmp_path / "node.yaml"
    proc = subprocess.run([sys.executable, "-m", "harness.node", str(sweep), "--confirm", "--window", "8",
                           "--warmup", "2", "--out", str(out)], cwd=ROOT, text=True, capture_output=True, timeout=1200)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(next((tmp_path / "results" / "node").glob("*/confirm.json")).read_text())
    servers = record["plan"]["servers"]
    assert [(s["name"], s["placed_on"], s["served_model_name"]) for s in servers] == [
        ("tiny-a", "cores 0", "tiny-a"), ("tiny-b", "cores 1", "tiny-b")]
    # both servers ran at the same time: each was ready before the other stopped, and alive after the load
    assert all(s["alive_after_load"] for s in servers)
    assert max(s["ready_at"] for s in servers) < min(s["stopped_at"] for s in servers)
    # and served at the same time: each took requests while the other did
    assert max(s["first_sent_at"] for s in servers) < min(s["last_done_at"] for s in servers)
    # each model's requests reached only its own server: the server's own access log counts them
    models = {m["name"]: m for m in record["plan"]["models"]}
    for s in servers:
        log = Path(s["log_paths"][0]).read_text()
        posts = len(re.findall(r'"POST /v1/completions HTTP/1.1" 200', log))
        assert posts == s["requests_sent"] > 0, (s["name"], posts, s["requests_sent"])
    for name, m in models.items():
        assert m["meets_slo"] and m["requests"] > 0 and m["slo_attainment"] >= 0.9 and m["rss_peak_mib"] > 0
        assert m["p99_ttft_ms"] and m["p99_tpot_ms"] and 0 < m["goodput_rps"] <= m["offered_rps"] + 1e-9
    assert "tiny-a" in proc.stdout and "tiny-b" in proc.stdout and "RECOMMENDED" in proc.stdout
    assert yaml.safe_load(out.read_text())["recommended"] is True


def test_cpu_build_shares_the_memory_node_between_instances_without_a_fixed_kv_cache() -> None:
    gib = 2**30
    hw = SimpleNamespace(is_cpu=True, cpu_kv_cache_space_gib=None, available_memory_gib=21.0, memory_bytes=24 * gib)
    here = confirm_mod.NodeHere("cpu", [Slot(cpu_cores=(0,)), Slot(cpu_cores=(1,))], True, hw)
    layout = confirm_mod.Layout("plan", "s.yaml", [
        confirm_mod.Instance("a", {"gpu_memory_utilization": 0.9}, (0,), "1"),
        confirm_mod.Instance("b", {"kv_cache_memory_bytes": 2**26}, (1,), "2")])
    sized = confirm_mod._cpu_memory_shares(layout, here)
    assert set(sized) == {0}  # a fixed KV cache is the user's
    share = sized[0]["gpu_memory_utilization"]
    assert 0 < share and 2 * share * 24 <= 21.0 - 1.0  # both servers' requests fit the node at once, with margin
    gpu = confirm_mod.NodeHere("gpu", [Slot(gpu_ids=(0,)), Slot(gpu_ids=(1,))], False, hw)
    assert confirm_mod._cpu_memory_shares(layout, gpu) == {}
    assert gpu.slot((0, 1)) == Slot(gpu_ids=(0, 1)) and here.describe(here.slot((1,))) == "cores 1"


def test_verdict_per_model() -> None:
    m = confirm_mod.ModelConfirmation("a", "plan", [[0]], ["GPU 0"], 2.0, SLO(tpot_ms=50, percentile=99),
                                      requests=100, slo_attainment=0.99, kept_up=True)
    assert m.meets_slo and m.miss_reason() is None
    low = dataclasses.replace(m, slo_attainment=0.985)
    assert not low.meets_slo and "SLO attainment 98.5% < 99%" in low.miss_reason()
    unsteady = dataclasses.replace(m, kept_up=False, steady_reasons=["completed 50 of 100"])
    assert "not steady (completed 50 of 100)" in unsteady.miss_reason()
    assert not dataclasses.replace(m, note="not served by this layout").meets_slo
