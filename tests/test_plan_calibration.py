"""The planner's KV capacity against what vLLM itself reported, on an H100 (vLLM 0.26) and on the CPU build (0.32).

Every row is one measured vLLM start-up (random-weight models of the real architectures, built on the host; log
lines quoted). The issue asks for 10%; the table holds the planner to 1% where the numbers allow.

Non-slow tests replay the recorded numbers; `test_cpu_server_matches_plan` (slow) starts the CPU build of vLLM on
the tiny model and compares live.
"""

from __future__ import annotations

import math

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from harness.plan import detect_hardware, load_model_facts, plan_candidate
from harness.plan.defaults import defaults_for
from harness.plan.hardware import Hardware
from harness.plan.modelfacts import facts_from_config

# The 886M-parameter Llama of the GPU hosts' reference runs (shared/gpu/README.md): hidden 2048, 16 layers,
# 16 heads, 8 KV heads; intermediate 5632 and vocab 32000 give its 886,114,304 parameters.
M886 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}

# H100 80GB HBM3, driver 580.159.04, CUDA total 79.18 GiB, vLLM 0.26.0 (`vllm serve` defaults unless given),
# 2026-11-27. Last column: "GPU KV cache size: N tokens" from the log.
H100_RUNS = [
    ("m886", {"max_model_len": 2048}, 1_155_632),
    ("m886", {"max_model_len": 2048, "gpu_memory_utilization": 0.5, "max_num_seqs": 64, "block_size": 32}, 610_784),
    ("m886", {"max_model_len": 2048, "max_num_batched_tokens": 2048, "max_num_seqs": 256}, 1_159_952),
    ("m886", {"max_model_len": 2048, "max_num_batched_tokens": 32768}, 1_138_352),
    ("m886", {"max_model_len": 2048, "enforce_eager": True}, 1_156_432),
    ("mistral", {"max_model_len": 8192}, 476_768),
    ("mistral", {"max_model_len": 8192, "max_num_batched_tokens": 2048, "max_num_seqs": 256,
                 "gpu_memory_utilization": 0.9}, 468_976),
    ("mistral", {"max_model_len": 8192, "max_num_batched_tokens": 16384}, 469_856),
    ("mistral", {"max_model_len": 8192, "enforce_eager": True}, 477_168),
    ("dialogpt", {"max_model_len": 1024}, 783_872),
    ("codellama", {"max_model_len": 4096}, 62_096),
    ("codellama", {"max_model_len": 4096, "max_num_batched_tokens": 2048, "max_num_seqs": 256,
                   "gpu_memory_utilization": 0.9}, 60_816),
]


def _facts(key: str):  # type: ignore[no-untyped-def]
    if key == "m886":
        return facts_from_config(M886, "llama-886m", "calibration")
    return load_model_facts({"mistral": "mistral-7b", "dialogpt": "dialogpt-medium",
                             "codellama": "codellama-13b"}[key])


@pytest.mark.parametrize("key,settings,reported", H100_RUNS)
def test_h100_kv_tokens_within_one_percent(key: str, settings: dict, reported: int) -> None:
    hw = detect_hardware("H100", 1)
    assert hw.memory_gib == pytest.approx(79.18, abs=0.005)  # CUDA total vLLM logged on that host
    plan = plan_candidate(_facts(key), hw, settings, defaults=defaults_for("0.26.0"))
    assert plan.feasible, plan.reason()
    assert abs(plan.kv_cache_tokens - reported) / reported < 0.01, (plan.kv_cache_tokens, reported)


def test_issue_reference_numbers_within_ten_percent() -> None:
    """The brief's two runs: defaults -> 1,155,632 tokens; util 0.5, 64 seqs, block 32 -> 610,784 tokens."""
    hw = detect_hardware("H100", 1)
    f = _facts("m886")
    assert f.params_total == 886_114_304
    d = defaults_for("0.26.0")
    a = plan_candidate(f, hw, {"max_model_len": 2048}, defaults=d)
    b = plan_candidate(f, hw, {"max_model_len": 2048, "gpu_memory_utilization": 0.5, "max_num_seqs": 64,
                               "block_size": 32}, defaults=d)
    assert a.kv_cache_tokens == pytest.approx(1_155_632, rel=0.10)
    assert b.kv_cache_tokens == pytest.approx(610_784, rel=0.10)
    assert a.kv_budget_gib_per_gpu == pytest.approx(70.5, abs=0.1)
    assert b.kv_budget_gib_per_gpu == pytest.approx(37.3, abs=0.1)


def test_h100_refusal_predicted_with_vllms_estimated_length() -> None:
    # vLLM 0.26: "To serve at least one request with the model's max seq len (32768), (4.0 GiB KV cache is needed,
    # which is larger than the available KV cache memory (1.19 GiB). ... the estimated maximum model length is 9744."
    plan = plan_candidate(_facts("mistral"), detect_hardware("H100", 1),
                          {"max_model_len": 32768, "gpu_memory_utilization": 0.2}, defaults=defaults_for("0.26.0"))
    assert not plan.feasible
    assert plan.kv_budget_gib_per_gpu == pytest.approx(1.19, abs=0.02)
    assert plan.max_fitting_len == 9744


def test_vllm_032_subtracts_cuda_graphs() -> None:
    """0.32 takes its CUDA-graph estimate out of the KV budget (0.26 did not): same settings, fewer tokens."""
    hw = detect_hardware("H100", 1)
    old = plan_candidate(_facts("mistral"), hw, {"max_model_len": 8192}, defaults=defaults_for("0.26.0"))
    new = plan_candidate(_facts("mistral"), hw, {"max_model_len": 8192}, defaults=defaults_for("0.32.0"))
    graphs = (old.kv_budget_gib_per_gpu - new.kv_budget_gib_per_gpu)
    assert 0.5 < graphs < 1.2  # vLLM 0.26 logged "Graph capturing finished in 5 secs, took 0.98 GiB"
    eager = plan_candidate(_facts("mistral"), hw, {"max_model_len": 8192, "enforce_eager": True},
                           defaults=defaults_for("0.32.0"))
    assert eager.kv_budget_gib_per_gpu > old.kv_budget_gib_per_gpu - 0.1


# ---------------------------------------------------------------------------------------------- CPU build


def _cpu(total_gib: float, available_gib: float, kv_space: float | None = None) -> Hardware:
    hw = detect_hardware("CPU")
    return replace(hw, memory_gib=total_gib, available_memory_gib=available_gib, cpu_kv_cache_space_gib=kv_space)


TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": 4096, "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}


def test_cpu_auto_kv_matches_vllm_032() -> None:
    # vLLM 0.32 CPU build, `python -m harness.models tiny`, --enforce-eager --max-model-len 2048
    # --gpu-memory-utilization 0.4: "Auto set (4.0/11.59) GiB for KV cache on node 0, with 4.64 GiB requested memory
    # for the worker. 0.63 GiB memory was consumed by non-kv usages." / "CPU KV cache size: 2,097,280 tokens"
    f = facts_from_config(TINY, "tiny", "calibration")
    plan = plan_candidate(f, _cpu(11.59, 10.0), {"max_model_len": 2048, "gpu_memory_utilization": 0.4,
                                                 "enforce_eager": True}, defaults=defaults_for("0.32.0"))
    assert plan.feasible and plan.memory_mode == "cpu-auto"
    assert plan.resolved["block_size"] == 128
    assert abs(plan.kv_cache_tokens - 2_097_280) / 2_097_280 < 0.01


# vLLM 0.32 CPU build, `python -m harness.models tiny` (vocab 4096, KV 2048 B/token), --enforce-eager
# --max-model-len 512: every start-up logged "0.63 GiB memory was consumed by non-kv usages"; the KV tokens move
# only with the node total vLLM read at start-up ("Auto set (2.64/13.09) GiB for KV cache on node 0"), which grew on
# the VM between trials. Hand check, first row: ceil(0.25 x 11.59 GiB) - 0.631 GiB = 2.2665 GiB / 2048 B = 1,188,3xx
# tokens, vs 1,186,432 reported (the logged total is rounded to 0.01 GiB: +-650 tokens).
NODE_1359 = 14247712 / 2**20  # "Node 0 MemTotal: 14247712 kB" read just before the last two start-ups
CPU_EAGER_RUNS = [  # node total GiB, gpu_memory_utilization, settings, "CPU KV cache size: N tokens"
    (11.59, 0.25, {}, 1_186_432),
    (11.59, 0.25, {"max_num_seqs": 16}, 1_186_560),
    (12.84, 0.25, {"max_num_seqs": 12, "max_num_batched_tokens": 256, "block_size": 128,
                   "enable_prefix_caching": False}, 1_350_912),
    (12.84, 0.25, {"max_num_seqs": 13, "max_num_batched_tokens": 256, "block_size": 128,
                   "enable_prefix_caching": False}, 1_351_040),
    (13.09, 0.25, {"max_num_seqs": 5, "max_num_batched_tokens": 1024, "block_size": 32,
                   "enable_prefix_caching": False}, 1_383_456),
    (13.09, 0.25, {"max_num_seqs": 62, "max_num_batched_tokens": 256, "block_size": 64,
                   "enable_prefix_caching": True}, 1_383_488),
    (13.09, 0.25, {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "block_size": 64,
                   "enable_prefix_caching": True}, 1_383_040),
    (13.09, 0.25, {}, 1_383_168),
    (13.59, 0.2, {}, 1_093_760),
    (13.59, 0.2, {"max_num_seqs": 8}, 1_093_888),
    (NODE_1359, 0.25, {}, 1_450_112),
    (NODE_1359, 0.25, {"max_num_seqs": 5, "max_num_batched_tokens": 1024, "block_size": 32,
                       "enable_prefix_caching": False}, 1_450_336),
]


@pytest.mark.parametrize("total,util,settings,reported", CPU_EAGER_RUNS)
def test_cpu_eager_kv_matches_vllm_032_across_settings(total: float, util: float, settings: dict[str, Any],
                                                      reported: int) -> None:
    f = facts_from_config(TINY, "tiny", "calibration")
    plan = plan_candidate(f, _cpu(total, 10.0), {"max_model_len": 512, "gpu_memory_utilization": util,
                                                 "enforce_eager": True, **settings}, defaults=defaults_for("0.32.0"))
    assert plan.feasible and plan.memory_mode == "cpu-auto" and plan.memory_gib == total
    assert abs(plan.kv_cache_tokens - reported) / reported < 0.003
    # the worker RSS the plan subtracts: 0.63 GiB as logged, whatever the batch / block / caching settings
    assert 0.625 < plan.reserve_gib_per_gpu + plan.weights_gib_per_gpu < 0.635


def test_cpu_compiled_kv_matches_vllm_032() -> None:
    # Same model and node, defaults without --enforce-eager (inductor warm-up runs the profiling forward first):
    # "Auto set (2.71/13.59) GiB ... 0.69 GiB memory was consumed by non-kv usages" / "CPU KV cache size: 1,420,160"
    f = facts_from_config(TINY, "tiny", "calibration")
    plan = plan_candidate(f, _cpu(NODE_1359, 10.0), {"max_model_len": 512, "gpu_memory_utilization": 0.25},
                          defaults=defaults_for("0.32.0"))
    assert abs(plan.kv_cache_tokens - 1_420_160) / 1_420_160 < 0.003


def test_cpu_plan_at_a_stale_node_total_is_off_by_the_growth() -> None:
    # The same defaults planned at 11.59 GiB but launched after node 0 had grown to 13.09 GiB: vLLM gave 1,383,168
    # tokens, the stale plan says ~1,188,600 (-14%) = 0.25 x 1.5 GiB / 2048 B fewer; re-planned at 13.09 it is exact.
    f = facts_from_config(TINY, "tiny", "calibration")
    s = {"max_model_len": 512, "gpu_memory_utilization": 0.25, "enforce_eager": True}
    stale = plan_candidate(f, _cpu(11.59, 10.0), s, defaults=defaults_for("0.32.0"))
    fresh = plan_candidate(f, _cpu(13.09, 10.0), s, defaults=defaults_for("0.32.0"))
    assert fresh.kv_cache_tokens - stale.kv_cache_tokens == pytest.approx(0.25 * 1.5 * 2**30 / 2048, abs=256)
    assert abs(fresh.kv_cache_tokens - 1_383_168) / 1_383_168 < 0.003


def test_cpu_node_short_of_system_memory_is_noted(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.plan import hardware

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(hardware, "_numa_node_memory", lambda node=0: (int(13.59 * 2**30), int(10 * 2**30)))
    monkeypatch.setattr(hardware, "_system_memory_total", lambda: int(23.54 * 2**30))
    monkeypatch.setattr(hardware, "_numa_node_count", lambda: 1)
    monkeypatch.setattr(hardware, "_cgroup_memory", lambda: (None, None))
    hw = hardware.detect_cpu_host()
    assert len(hw.notes) == 1 and "13.59 GiB of the machine's 23.54 GiB" in hw.notes[0]
    monkeypatch.setattr(hardware, "_system_memory_total", lambda: int(13.8 * 2**30))
    assert hardware.detect_cpu_host().notes == ()


def test_cpu_explicit_kv_space_is_exact() -> None:
    # VLLM_CPU_KVCACHE_SPACE=1, tiny Llama (vocab 2048) --max-model-len 512: "CPU KV cache size: 524,288 tokens"
    f = facts_from_config({**TINY, "vocab_size": 2048, "max_position_embeddings": 1024}, "tiny", "calibration")
    plan = plan_candidate(f, _cpu(8.09, 6.0, kv_space=1.0), {"max_model_len": 512, "enforce_eager": True})
    assert plan.kv_cache_tokens == 524_288


def test_cpu_refusal_predicted() -> None:
    # default utilization 0.92 on a node with 11.59 GiB, 9.35 available: vLLM 0.32 refused with "Available memory
    # on node 0 (9.35/11.59 GiB) on startup is less than desired CPU memory utilization (0.92, 10.66 GiB)"
    f = facts_from_config(TINY, "tiny", "calibration")
    plan = plan_candidate(f, _cpu(11.59, 9.35), {"max_model_len": 2048})
    assert not plan.feasible and "10.66 GiB, but only 9.35 GiB is available" in plan.reason()


# ---------------------------------------------------------------------------------------------- live CPU check


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cpu_server_matches_plan(tmp_path: Path) -> None:
    """Start the CPU build of vLLM on the tiny model with VLLM_CPU_KVCACHE_SPACE and compare the KV line live."""
    pytest.importorskip("vllm")
    from harness.models import build_tiny

    model = build_tiny(tmp_path / "tiny", device="cpu").path
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    hw = _cpu(detect_hardware("CPU").memory_gib, 1e9, kv_space=1.0)
    plan = plan_candidate(load_model_facts(str(model)), hw, {"max_model_len": 1024, "enforce_eager": True})
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", f"--model={model}", "--host=127.0.0.1",
           f"--port={_free_port()}", "--enforce-eager", "--max-model-len=1024"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        reported = None
        while time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"KV cache size: ([\d,]+) tokens", log.read_text(errors="replace"))
            if m:
                reported = int(m.group(1).replace(",", ""))
                break
            time.sleep(1)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
    assert reported is not None, log.read_text(errors="replace")[-3000:]
    assert abs(plan.kv_cache_tokens - reported) / reported < 0.01, (plan.kv_cache_tokens, reported)


def test_cpu_startup_memory_check_is_vllms_own() -> None:
    """The README's bench example on the 2-core machine: vLLM 0.32 refused with "Available memory on node 0
    (13.71/15.34 GiB) on startup is less than desired CPU memory utilization (0.92, 14.11 GiB)"; the planner says
    so first, with the highest utilization that fits (vllm/v1/worker/cpu_worker.py: ceil(total x util) > available)."""
    from harness.plan.hardware import cpu_request_bytes, cpu_utilization_that_fits

    f = facts_from_config(TINY, "tiny", "calibration")
    hw = _cpu(15.34, 13.71)
    plan = plan_candidate(f, hw, {"max_model_len": 512, "enforce_eager": True}, defaults=defaults_for("0.32.0"))
    err = next(x for x in plan.errors() if x.key == "gpu_memory_utilization")
    assert "0.92 x 15.34 GiB = 14.11 GiB, but only 13.71 GiB is available: vLLM refuses to start" in err.message
    assert err.fix.startswith("lower gpu_memory_utilization to <= 0.89 ")  # 0.89 x 15.34 = 13.65 <= 13.71
    assert plan_candidate(f, hw, {"max_model_len": 512, "enforce_eager": True, "gpu_memory_utilization": 0.89},
                          defaults=defaults_for("0.32.0")).feasible
    # exactly at the boundary, as vLLM compares bytes: a request equal to the available memory starts
    edge = _cpu(10.0, 9.0)
    assert cpu_request_bytes(edge, 0.9) == 9 * 2**30 and cpu_utilization_that_fits(edge) == 0.9
    assert plan_candidate(f, edge, {"gpu_memory_utilization": 0.9, "enforce_eager": True}).feasible
    assert not plan_candidate(f, edge, {"gpu_memory_utilization": 0.91, "enforce_eager": True}).feasible
    # a fixed KV cache skips vLLM's start-up check (kv_cache_memory_bytes is set): no such error
    fixed = plan_candidate(f, _cpu(15.34, 13.71, kv_space=1.0), {"max_model_len": 512, "enforce_eager": True})
    assert not [x for x in fixed.errors() if x.key == "gpu_memory_utilization"]


def test_size_cpu_launch_lowers_only_vllms_default() -> None:
    from harness.plan.hardware import CPU_LAUNCH_MARGIN_GIB, size_cpu_launch

    hw = _cpu(15.34, 13.71)
    sized, note = size_cpu_launch({"max_model_len": 512}, hw, 0.92)
    util = sized["gpu_memory_utilization"]
    assert util == 0.82 and math.ceil(15.34 * 2**30 * util) <= (13.71 - CPU_LAUNCH_MARGIN_GIB) * 2**30
    assert "vLLM's default 0.92 x 15.34 GiB exceeds the 13.71 GiB available" in note
    f = facts_from_config(TINY, "tiny", "calibration")
    assert plan_candidate(f, hw, {**sized, "enforce_eager": True}).feasible
    assert size_cpu_launch({"gpu_memory_utilization": 0.95}, hw, 0.92) == ({"gpu_memory_utilization": 0.95}, "")
    assert size_cpu_launch({}, _cpu(15.34, 13.71, kv_space=1.0), 0.92) == ({}, "")  # fixed KV: no check
    assert size_cpu_launch({}, _cpu(64.0, 60.0), 0.92) == ({}, "")  # the default fits
    assert size_cpu_launch({}, detect_hardware("L40S", 4), 0.92) == ({}, "")
