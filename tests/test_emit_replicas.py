"""The emitter fills the node's GPUs with replicas of the measured server, and its provenance says where the
replica count comes from (derived from the per-GPU value, or measured by the confirmation's scaling run)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import optuna
import yaml

from harness.emit import read_config
from harness.study.confirm import Confirmation, Spread
from harness.study.objectives import CapacityObjective
from harness.study.trials import Attr
from harness.study.tune import deployment_provenance, emit

H100X4 = SimpleNamespace(name="H100", count=4, arch="hopper", memory_gib=80.0)
CPU = SimpleNamespace(name="cpu", count=1, arch="cpu", memory_gib=16.0)


def _study_with(settings: dict[str, Any]) -> tuple[optuna.Study, Any]:
    study = optuna.create_study(study_name="m@h100x4@chat@capacity", direction="maximize")
    trial = study.ask()
    trial.set_user_attr(Attr.SETTINGS, settings)
    trial.set_user_attr(Attr.METRICS, {"capacity_rps": 40.0, "capacity_rps_per_gpu": 20.0})
    trial.set_user_attr(Attr.CURVE, [{"rate": 40.0, "ok": True, "achieved": 40.0},
                                     {"rate": 60.0, "ok": False, "achieved": 50.0, "p99_tpot_ms": 80.0}])
    study.tell(trial, 20.0)
    return study, study.trials[0]


def _conf(scaling: dict[str, Any] | None) -> Confirmation:
    return Confirmation(metric="goodput_per_gpu_at_20_rps_per_gpu", winner_trial=0, baseline_trial=1,
                        winner=Spread([20.0, 20.1]), baseline=Spread([10.0, 10.2]), recommended_trial=0,
                        verdict="trial #0 beats the baseline", winner_gpus=2, baseline_gpus=2,
                        pairing="winner TP 2 on 2 GPUs vs baseline 2 x TP 1 on 2 GPUs (equal GPUs)", per_gpu=True,
                        scaling=scaling)


def test_tp2_winner_fills_a_4_gpu_node_with_2_replicas(tmp_path: Path) -> None:
    study, trial = _study_with({"tensor_parallel_size": 2, "max_num_seqs": 128})
    ctx = SimpleNamespace(workload=SimpleNamespace(to_dict=lambda: {"name": "chat"}), objective=CapacityObjective(),
                          model_name="org/model")
    path = emit(tmp_path / "m.yaml", study, ctx, trial, None, _conf(None), H100X4)  # type: ignore[arg-type]
    doc = yaml.safe_load(path.read_text())
    assert [i["gpu_devices"] for i in doc["vllm_instances"]] == [[0, 1], [2, 3]]
    assert doc["vllm"]["tensor_parallel_size"] == 2 and "replicas" not in doc["vllm"]
    dep = doc["provenance"]["deployment"]
    assert dep["replicas"] == 2 and dep["gpus"] == 4 and dep["gpus_per_replica"] == 2
    assert "not measured" in dep["replica_count"]
    imp = doc["provenance"]["improvement"]
    assert imp["winner_gpus"] == imp["baseline_gpus"] == 2 and imp["per_gpu"] is True
    assert read_config(path).settings["replicas"] == 2
    # the ceiling: what the overloaded step served, per GPU of the trial, and the capacity's share of it
    ceiling = doc["provenance"]["ceiling"]
    assert ceiling["req_s_per_gpu"] == 25.0 and ceiling["held"] is False and ceiling["gpus"] == 2
    assert ceiling["capacity_share"] == 0.8 and ceiling["trial"] == 0


def test_replica_count_measured_by_the_confirmation_says_so() -> None:
    scaling = {"replicas": 4, "gpus": 4, "value_per_gpu": 19.0, "one_server_per_gpu": 20.0, "efficiency": 0.95}
    dep = deployment_provenance({"max_num_seqs": 64}, _conf(scaling), H100X4)
    assert dep["replicas"] == 4 and "measured by the confirmation" in dep["replica_count"] and "95%" in dep["replica_count"]
    other = deployment_provenance({"max_num_seqs": 64}, _conf({**scaling, "replicas": 2}), H100X4)
    assert "not measured" in other["replica_count"]  # the confirmation ran another count
    cpu = deployment_provenance({"max_num_seqs": 64, "replicas": 3}, None, CPU)
    assert cpu["replicas"] == 1 and "CPU host" in cpu["replica_count"]
