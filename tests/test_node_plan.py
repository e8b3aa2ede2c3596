"""The node plan end to end without a server: the estimate on the shipped model facts, measured studies read
through Optuna, the emitted `vllm_instances:` linted by `python -m harness.plan`, and the CLI."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
import yaml

from harness.node.build import build_plan
from harness.node.capacity import capacity_rows
from harness.node.emit import serve_argv, write_node_config
from harness.node.estimate import Shape, estimate_capacity
from harness.node.inputs import load_inputs
from harness.node.topology import Topology, detect_topology
from harness.plan import detect_hardware, load_model_facts
from harness.plan.lint import lint_config
from harness.records import SLO, to_dict

ROOT = Path(__file__).resolve().parents[1]
L40S = detect_hardware("L40S", 4)
CHAT_MIX = Shape("chat-mix", 1088, 288, 2048, 512)
SLO_ = SLO(ttft_ms=1000, tpot_ms=50, percentile=99)


def _argspec():
    from harness.launch.vllm_args import load_argspec

    return load_argspec()


# ---------------------------------------------------------------------------------------------- estimate


def test_estimate_is_bounded_by_the_slo_it_is_given():
    facts = load_model_facts("mistralai/Mistral-7B-Instruct-v0.2")
    settings = {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "max_model_len": 4096}
    est = estimate_capacity(facts, L40S, settings, CHAT_MIX, SLO_)
    assert est.plan.feasible and est.capacity_rps > 0 and est.limit == "tpot"
    assert est.tpot_ms == pytest.approx(50, rel=1e-3)  # the operating point sits on the limit it names
    looser = estimate_capacity(facts, L40S, settings, CHAT_MIX, SLO(ttft_ms=1000, tpot_ms=100))
    p50 = estimate_capacity(facts, L40S, settings, CHAT_MIX, SLO(ttft_ms=1000, tpot_ms=50, percentile=50))
    assert looser.capacity_rps > est.capacity_rps and p50.capacity_rps > est.capacity_rps
    # the weights alone take ~16 ms per step on one L40S: a 10 ms TPOT cannot hold even when idle
    tight = estimate_capacity(facts, L40S, settings, CHAT_MIX, SLO(tpot_ms=10))
    assert tight.capacity_rps == 0 and tight.limit == "tpot" and "even when idle" in tight.note
    # more GPUs per server: weights per GPU halve, so the capacity rises
    tp2 = estimate_capacity(facts, L40S, {**settings, "tensor_parallel_size": 2}, CHAT_MIX, SLO_)
    assert tp2.capacity_rps > est.capacity_rps
    # the KV cache caps the batch: a tiny gpu_memory_utilization leaves room for few sequences
    small_kv = estimate_capacity(facts, L40S, {**settings, "gpu_memory_utilization": 0.36}, CHAT_MIX,
                                 SLO(tpot_ms=500))
    assert small_kv.limit == "kv_cache" and small_kv.batch == pytest.approx(small_kv.max_batch, rel=1e-3)


def test_capacity_rows_on_the_shipped_models_of_the_users_node():
    def rows(model, shape=CHAT_MIX, slo=SLO_):
        return {r.gpus: r for r in capacity_rows("m", load_model_facts(model), L40S, shape, slo, {}, [None, "fp8"],
                                                 [])}

    # DialoGPT-medium has 1,024 positions: max_model_len is clipped to them whatever the workload asks
    dialo = rows("microsoft/DialoGPT-medium")
    assert all(r.settings["max_model_len"] == 1024 and r.capacity_rps > 0 for r in dialo.values())
    assert "clipped to 1024" in dialo[1].detail["workload"]
    # Llama-2-70B: 128 GiB of weights do not fit one or two L40S; quantization comes in only where it must
    llama = rows("meta-llama/Llama-2-70b-chat-hf", slo=SLO(ttft_ms=3000, tpot_ms=100))
    assert llama[1].capacity_rps == 0 and "weights need" in llama[1].reason
    assert llama[4].settings.get("quantization") == "fp8" and llama[4].capacity_rps > 0
    assert "unquantized" in llama[4].detail
    mistral = rows("mistralai/Mistral-7B-Instruct-v0.2")
    assert "quantization" not in mistral[1].settings and mistral[1].source == "estimated"
    assert sorted(mistral) == [1, 2, 4]  # TP 8 is beyond the node


def test_measured_study_replaces_the_estimate_for_its_gpu_count(tmp_path):
    sweep = _sweep(tmp_path, traffic="{models: {mistral-7b-instruct-v0.2: {rps: 3}}}",
                   models="[mistralai/Mistral-7B-Instruct-v0.2]")
    storage = f"sqlite:///{tmp_path / 'results' / 'studies.db'}"
    (tmp_path / "results").mkdir()
    study = optuna.create_study(study_name="mistral-7b-instruct-v0.2@l40sx4@chat-mix@capacity", storage=storage,
                                direction="maximize")
    study.set_user_attr("objective", {"kind": "capacity", "slo": to_dict(SLO_)})
    tp1 = {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.92, "max_model_len": 4096, "replicas": 2}
    for value, settings, outcome in ((9.0, tp1, "ok"), (3.0, {**tp1, "replicas": 1}, "ok"),
                                     (50.0, {**tp1, "max_num_seqs": 8}, "slo_violated")):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={"settings": settings, "outcome": outcome}))
    inputs = load_inputs(sweep)
    plan = build_plan(inputs, L40S, Topology(4), out=open("/dev/null", "w"))
    rows = {r.gpus: r for r in plan.tables["mistral-7b-instruct-v0.2"]}
    assert rows[1].source == "measured" and rows[1].capacity_rps == 4.5  # 9 req/s over 2 replicas, trial 0
    assert rows[1].detail == {"study": study.study_name, "trial": 0, "replicas_measured": 2}
    assert "replicas" not in rows[1].settings
    assert rows[2].source == "estimated"
    doc = yaml.safe_load(write_node_config(tmp_path / "node.yaml", plan).read_text())
    model = doc["provenance"]["models"][0]
    assert model["source"] == "measured" and model["basis"]["trial"] == 0
    assert doc["vllm_instances"][0]["gpu_memory_utilization"] == 0.92  # the measured settings, as measured
    # a study at another SLO is not this model's capacity
    inputs.traffic[0] = inputs.traffic[0].__class__(**{**inputs.traffic[0].__dict__, "slo": SLO(tpot_ms=80)})
    other = build_plan(inputs, L40S, Topology(4), out=open("/dev/null", "w"))
    assert "another SLO" in other.studies["mistral-7b-instruct-v0.2"]
    assert all(r.source == "estimated" for r in other.tables["mistral-7b-instruct-v0.2"])


# ---------------------------------------------------------------------------------------------- emitted YAML


def test_emitted_plan_lints_clean_and_round_trips(tmp_path):
    inputs = load_inputs(ROOT / "sweeps" / "l40s.yaml")
    inputs.sweep.results_dir = str(tmp_path)  # no studies: the planner alone
    plan = build_plan(inputs, L40S, Topology(4), out=open("/dev/null", "w"))
    argspec = _argspec()
    path = write_node_config(tmp_path / "node.yaml", plan, argspec=argspec)
    report = lint_config(path, L40S, argspec=argspec)
    findings = [f for r in report.results for f in r.findings] + report.node_findings
    assert report.errors == 0 and not [f for f in findings if f.severity == "warning"], findings
    doc = yaml.safe_load(path.read_text())
    placed = [(a, s) for a in plan.allocation.assignments for s in a.servers]
    assert [i["gpu_devices"] for i in doc["vllm_instances"]] == [list(s) for _, s in placed]
    assert [r.target.gpu_devices for r in report.results] == [list(s) for _, s in placed]
    used = [g for i in doc["vllm_instances"] for g in i["gpu_devices"]]
    assert len(used) == len(set(used)) and max(used) < 4
    for inst, cmd in zip(doc["vllm_instances"], doc["serve_commands"]):
        assert cmd["gpu_devices"] == inst["gpu_devices"]
        assert cmd["command"].startswith(f"CUDA_VISIBLE_DEVICES={','.join(map(str, inst['gpu_devices']))} vllm serve "
                                         f"{inst['model_name']} --tensor-parallel-size={inst['tensor_parallel_size']}")
    prov = doc["provenance"]
    assert prov["capacity_sources"] == ["estimated"] and prov["hardware"]["num_gpus"] == 4
    assert any("90% of the datasheet memory bandwidth" in a for a in prov["assumptions"])
    assert {m["name"] for m in prov["models"]} == {t.name for t in inputs.traffic}


def test_serve_argv_keeps_values_that_start_with_a_dash():
    argv = serve_argv("org/m", {"model_name": "org/m", "tensor_parallel_size": 1, "enable_prefix_caching": False,
                                "served_model_name": "-odd"}, 8003, _argspec())
    assert argv[:3] == ["vllm", "serve", "org/m"]
    assert "--tensor-parallel-size=1" in argv and "--no-enable-prefix-caching" in argv
    assert any(a.endswith("=-odd") for a in argv) and argv[-2:] == ["--host=127.0.0.1", "--port=8003"]
    # the installed vLLM's parser by default
    assert serve_argv("m", {"max_model_len": 1024, "enforce_eager": True}, 8000)[3:5] == ["--max-model-len=1024",
                                                                                         "--enforce-eager"]


def test_committed_node_plan_is_what_the_command_writes_and_lints_clean(tmp_path, capsys):
    from harness.node.__main__ import main
    from harness.plan.__main__ import main as lint_main

    out = tmp_path / "node.yaml"
    rc = main([str(ROOT / "sweeps" / "l40s.yaml"), "--gpu", "L40S", "--num-gpus", "4", "--out", str(out),
               "--results-dir", str(tmp_path)])
    printed = capsys.readouterr().out
    assert rc == 1  # Llama-2-70B cannot meet its target next to the others: said, and the plan is still written
    assert "cannot meet target: llama-2-70b-chat-hf" in printed and "HEADROOM" in printed
    committed = (ROOT / "configs" / "node.yaml").read_text()

    def stable(text: str) -> str:
        text = re.sub(r"\d{4}-\d{2}-\d{2}", "DATE", text).replace(str(tmp_path), "results")
        return text.replace(str(ROOT / "sweeps" / "l40s.yaml"), "sweeps/l40s.yaml")

    assert stable(out.read_text()) == stable(committed)
    assert lint_main([str(ROOT / "configs" / "node.yaml"), "--gpu", "L40S", "--num-gpus", "4"]) == 0
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out


def test_cli_bad_input_and_confirm(tmp_path, capsys, monkeypatch):
    from harness.node import confirm as confirm_mod
    from harness.node.__main__ import main

    sweep = _sweep(tmp_path, traffic="{models: {ghost: {rps: 1}}}")
    assert main([str(sweep), "--gpu", "L40S", "--num-gpus", "4"]) == 2
    err = capsys.readouterr().err
    assert "traffic.models.ghost" in err and str(sweep) in err
    sweep = _sweep(tmp_path, traffic="{models: {tiny: {rps: 1}}}",
                   models="[{name: tiny, model: microsoft/DialoGPT-medium}]")
    # a 4-GPU plan on a CPU host with one core: refused before anything starts, nothing written
    monkeypatch.setattr(confirm_mod, "detect_hardware", lambda *a: detect_hardware("CPU"))
    monkeypatch.setattr(confirm_mod, "cpu_slots", lambda n: [(0,)])
    assert main([str(sweep), "--gpu", "L40S", "--num-gpus", "4", "--confirm", "--out",
                 str(tmp_path / "n.yaml")]) == 2
    err = capsys.readouterr().err
    assert "--confirm" in err and "4 devices" in err and not (tmp_path / "n.yaml").exists()
    assert main([str(sweep), "--gpu", "L40S", "--num-gpus", "4", "--confirm", "--window", "0"]) == 2
    assert "--window" in capsys.readouterr().err
    assert main([str(sweep), "--gpu", "L40S", "--num-gpus", "4", "--topology", "0,1;2"]) == 2
    assert "exactly once" in capsys.readouterr().err


def test_topology_from_nvml(monkeypatch):
    levels = {(0, 1): 20, (2, 3): 20}
    fake = SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 4,
                           nvmlDeviceGetHandleByIndex=lambda i: i,
                           nvmlDeviceGetTopologyCommonAncestor=lambda a, b: levels.get((a, b), 50))
    topo = detect_topology(4, fake)
    assert topo.groups == ((0, 1), (2, 3)) and topo.source == "nvml"
    assert not detect_topology(8, fake).known  # NVML sees another node than the one planned


def _sweep(tmp_path: Path, *, traffic: str, models: str = "[{name: tiny, model: org/Tiny}]") -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(f"models: {models}\nspace: l40s-4x\nworkload: chat-mix\nresults_dir: {tmp_path / 'results'}\n"
                    f"objective: {{kind: capacity, slo: {{ttft_ms: 1000, tpot_ms: 50, percentile: 99}}}}\n"
                    f"traffic: {traffic}\n")
    return path
