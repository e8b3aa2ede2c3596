"""`python -m harness.plan`: lint the user's configs (their guide's snippets), plan one candidate, count a space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.plan.__main__ import main
from harness.plan.lint import lint_config, read_user_config, space_feasibility
from harness.plan import detect_hardware, load_model_facts

L40S = ["--gpu", "L40S", "--num-gpus", "4"]

# The user's guide (configs/config.yaml and its tuning snippets), verbatim apart from comments.
SEED_MAIN = """
model:
  num_experts: 8
  top_k_experts: 2
  hidden_size: 768
  max_sequence_length: 2048
vllm:
  model_name: "microsoft/DialoGPT-medium"
  tensor_parallel_size: 4
  gpu_memory_utilization: 0.9
  max_model_len: 2048
  block_size: 16
  swap_space: 4
  max_num_batched_tokens: 8192
  enable_prefix_caching: true
  quantization: null
"""
SEED_70B = """
vllm:
  model_name: "meta-llama/Llama-2-70b-chat-hf"
  tensor_parallel_size: 4
  gpu_memory_utilization: 0.85
  max_model_len: 4096
  max_num_batched_tokens: 16384
  block_size: 32
  swap_space: 8
"""
SEED_MISTRAL = """
vllm:
  model_name: "mistralai/Mistral-7B-Instruct-v0.2"
  tensor_parallel_size: 2
  gpu_memory_utilization: 0.9
  max_model_len: 8192
  max_num_batched_tokens: 32768
"""
SEED_MULTI = """
vllm_instances:
  - model_name: "codellama/CodeLlama-13b-Instruct-hf"
    tensor_parallel_size: 2
    gpu_devices: [0, 1]
  - model_name: "mistralai/Mistral-7B-Instruct-v0.2"
    tensor_parallel_size: 2
    gpu_devices: [2, 3]
"""
SEED_TUNING = """
vllm:
  gpu_memory_utilization: 0.85
  enable_prefix_caching: true
  use_v2_block_manager: true
  enable_chunked_prefill: true
  max_chunked_prefill_tokens: 1024
  quantization: "squeezellm"
"""


def _write(tmp_path: Path, name: str, text: str) -> str:
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _argspec():  # type: ignore[no-untyped-def]
    from tests.test_plan import _argspec as spec

    return spec()


def _findings(out: str) -> list[dict]:
    return [f for s in json.loads(out)["servers"] for f in s["findings"]]


def test_lint_main_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "config.yaml", SEED_MAIN)
    code = main([path, *L40S, "--no-key-check"])
    out = capsys.readouterr().out
    assert code == 1  # errors found
    assert "SEVERITY" in out and "FINDING (WHY)" in out and "FIX" in out and "KV TOKENS" in out
    assert "1 error(s), 1 warning(s)" in out
    assert main([path, *L40S, "--no-key-check", "--json"]) == 1
    found = {f["key"]: f for f in _findings(capsys.readouterr().out)}
    assert "exceeds the longest context microsoft/DialoGPT-medium allows: 1024" in found["max_model_len"]["message"]
    assert found["max_model_len"]["fix"] == "set max_model_len <= 1024"
    assert "replicas 4" in found["tensor_parallel_size"]["fix"]  # TP 4 over PCIe for a 355M model


def test_lint_flags_invalid_keys_with_fixes(tmp_path: Path) -> None:
    report = lint_config(_write(tmp_path, "c.yaml", SEED_MAIN + SEED_TUNING.replace("vllm:", "vllm_extra:")),
                         detect_hardware("L40S", 4), argspec=_argspec())
    found = {f.key: f for r in report.results for f in r.findings if f.severity == "error"}
    assert "swap_space" in found and "V1 engine" in found["swap_space"].fix
    tuning = lint_config(_write(tmp_path, "t.yaml", SEED_TUNING), detect_hardware("L40S", 4), argspec=_argspec())
    found = {f.key: f for r in tuning.results for f in r.findings if f.severity == "error"}
    assert {"use_v2_block_manager", "max_chunked_prefill_tokens", "quantization"} <= set(found)
    assert "max_num_batched_tokens" in found["max_chunked_prefill_tokens"].fix
    assert "SqueezeLLM" in found["quantization"].message
    # keys the snippet leaves out come from the user's VLLMConfig dataclass (DialoGPT-medium, TP 4, 2048 tokens)
    infos = [f for r in tuning.results for f in r.findings if f.severity == "info"]
    assert any("VLLMConfig defaults" in f.message for f in infos)


def test_lint_70b_config_runs_tight(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "big.yaml", SEED_70B.replace("  swap_space: 8\n", ""))
    assert main([path, *L40S, "--no-key-check"]) == 0
    out = capsys.readouterr().out
    assert "32.12 GiB" in out  # weights per GPU with TP 4
    assert "0 error(s)" in out


def test_lint_mistral_tp2_and_instances(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([_write(tmp_path, "m.yaml", SEED_MISTRAL), *L40S, "--no-key-check", "--json"]) == 0
    assert any("replicas 2" in f["fix"] for f in _findings(capsys.readouterr().out))
    report = lint_config(_write(tmp_path, "multi.yaml", SEED_MULTI), detect_hardware("L40S", 4))
    assert report.errors == 0
    assert [r.target.gpu_devices for r in report.results] == [[0, 1], [2, 3]]
    assert all(r.plan is not None and r.plan.gpus_needed == 2 for r in report.results)


def test_lint_instances_sharing_or_missing_gpus(tmp_path: Path) -> None:
    bad = """
vllm_instances:
  - model_name: "mistralai/Mistral-7B-Instruct-v0.2"
    tensor_parallel_size: 2
    gpu_memory_utilization: 0.9
    max_model_len: 8192
    gpu_devices: [0, 1]
  - model_name: "mistralai/Mistral-7B-Instruct-v0.2"
    tensor_parallel_size: 2
    gpu_memory_utilization: 0.9
    max_model_len: 8192
    gpu_devices: [1, 4]
  - model_name: "mistralai/Mistral-7B-Instruct-v0.2"
    tensor_parallel_size: 2
    max_model_len: 8192
    gpu_devices: [3]
"""
    report = lint_config(_write(tmp_path, "bad.yaml", bad), detect_hardware("L40S", 4))
    node = " ".join(f.message for f in report.node_findings if f.severity == "error")
    assert "GPU 1 is shared by vllm_instances[1], vllm_instances[2]" in node
    assert "GPU 4 does not exist" in node
    third = report.results[2].findings
    assert any(f.key == "gpu_devices" and f.severity == "error" for f in third)  # 1 device for TP 2


def test_set_mode_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--model", "meta-llama/Llama-2-70b-chat-hf", "--set", "tensor_parallel_size=3", *L40S,
                 "--no-key-check", "--json"])
    assert code == 1
    d = json.loads(capsys.readouterr().out)
    assert d["feasible"] is False and "attention heads" in d["findings"][0]["message"]
    assert main(["--model", "mistral-7b", "--set", "max_model_len=8192", *L40S, "--no-key-check"]) == 0


def test_space_feasibility(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = _write(tmp_path, "space.yaml", """
name: mini
knobs:
  tensor_parallel_size: {type: categorical, choices: [1, 2, 3, 4]}
  max_model_len: {type: categorical, choices: [4096, 8192]}
""")
    code = main(["--model", "meta-llama/Llama-2-70b-chat-hf", "--space", space, *L40S])
    out = capsys.readouterr().out
    assert code == 0
    assert "all 8 candidates planned" in out
    # only TP 4 holds 70B fp16 on 4x L40S, and only at 4096 tokens (the model's limit): 1 of 8
    assert "feasible             1 (12.5%)" in out
    assert "attention heads" in out
    from harness.space import load_space

    rep = space_feasibility(load_space(space), load_model_facts("mistralai/Mistral-7B-Instruct-v0.2"),
                            detect_hardware("L40S", 4))
    # TP 3 never divides 32 heads; everything else fits
    assert rep.feasible == 2 * 3 and rep.grid_size == 8
    # replicas are a deployment decision: a space that searches them is refused, naming the file and key
    bad = _write(tmp_path, "bad.yaml", "name: bad\nknobs:\n  replicas: {type: categorical, choices: [1, 2]}\n")
    assert main(["--model", "meta-llama/Llama-2-70b-chat-hf", "--space", bad, *L40S]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: knobs.replicas: replicas are a deployment decision, not a search dimension" in err


def test_space_sampling_for_large_grids(tmp_path: Path) -> None:
    from harness.space import load_space

    shipped = Path(__file__).resolve().parents[1] / "search_spaces" / "l40s-4x.yaml"
    if not shipped.exists():
        pytest.skip("shipped L40S space not present")
    rep = space_feasibility(load_space(shipped), load_model_facts("mistralai/Mistral-7B-Instruct-v0.2"),
                            detect_hardware("L40S", 4), max_candidates=500)
    assert rep.sampled and rep.evaluated == 500
    assert 0 < rep.feasible < 500


def test_bad_input_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "missing.yaml"), *L40S]) == 2
    assert "no such config file" in capsys.readouterr().err
    broken = _write(tmp_path, "broken.yaml", "vllm:\n  model_name: [unclosed\n")
    assert main([broken, *L40S]) == 2
    err = capsys.readouterr().err
    assert "broken.yaml" in err and "malformed YAML" in err
    assert main([_write(tmp_path, "ok.yaml", SEED_MISTRAL), "--gpu", "V100"]) == 2
    assert "unknown GPU 'V100'" in capsys.readouterr().err
    assert main(["--model", "nobody/nothing", "--set", "max_model_len=1024", *L40S]) == 2
    assert main([_write(tmp_path, "empty.yaml", "model: {}\n"), *L40S]) == 2
    assert "no 'vllm:' block" in capsys.readouterr().err


def test_read_user_config_rejects_bad_devices(tmp_path: Path) -> None:
    from harness.errors import UserError

    p = _write(tmp_path, "d.yaml", "vllm_instances:\n  - model_name: mistral-7b\n    gpu_devices: 0\n")
    with pytest.raises(UserError, match="gpu_devices must be a list"):
        read_user_config(p)


L40S_MODELS = ["microsoft/DialoGPT-medium", "mistralai/Mistral-7B-Instruct-v0.2", "codellama/CodeLlama-13b-Instruct-hf",
               "meta-llama/Llama-2-70b-chat-hf"]


@pytest.mark.parametrize("model", L40S_MODELS)
def test_shipped_l40s_space_fits_every_model_of_the_l40s_sweep(model: str) -> None:
    """The user's node: each model of sweeps/l40s.yaml has feasible candidates (DialoGPT-medium, 1,024 positions,
    had none when every max_model_len choice was longer than its context)."""
    from harness.space import load_space

    rep = space_feasibility(load_space("l40s-4x"), load_model_facts(model), detect_hardware("L40S", 4),
                            max_candidates=400)
    assert rep.feasible > 0, rep.reasons[:3]


def test_require_feasible_names_the_reason_and_the_fix(tmp_path: Path) -> None:
    from harness.errors import UserError
    from harness.plan.lint import require_feasible
    from harness.space import load_space

    space = load_space(_write(tmp_path, "s.yaml", "knobs:\n  max_model_len: [2048, 4096]\n"))
    facts = load_model_facts("microsoft/DialoGPT-medium")
    with pytest.raises(UserError) as exc:
        require_feasible(space, facts, detect_hardware("L40S", 4), source="sweep.yaml", key="models[dialogpt]")
    msg = str(exc.value)
    assert msg.startswith("sweep.yaml: models[dialogpt]: no feasible candidate: space s for microsoft/DialoGPT-medium")
    assert "0 of all 2 candidates feasible (0.0%)" in msg and "max_model_len: max_model_len N exceeds" in msg
    assert "fix: set max_model_len <= 1024" in msg and "'model_max'" in msg and "models[].fixed" in msg
    # the workload's longest request is a limit too: 2,048 tokens cannot hold chat-mix's 2,560
    rep = require_feasible(load_space(_write(tmp_path, "t.yaml", "knobs:\n  max_model_len: [2048, model_max]\n")),
                           load_model_facts("mistralai/Mistral-7B-Instruct-v0.2"), detect_hardware("L40S", 4),
                           longest_request=2560)
    assert rep.feasible == 1 and "shorter than the workload's longest request" in rep.reasons[0][0]
