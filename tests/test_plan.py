"""harness.plan arithmetic against hand-computed values for the user's four models, and every check's verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.errors import UserError
from harness.plan import Finding, Hardware, Plan, detect_hardware, gpu_spec, load_model_facts, plan_candidate
from harness.plan.defaults import cudagraph_capture_sizes, defaults_for
from harness.plan.modelfacts import facts_from_config

GIB = 1024**3

DIALOGPT = "microsoft/DialoGPT-medium"
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.2"
CODELLAMA = "codellama/CodeLlama-13b-Instruct-hf"
LLAMA70 = "meta-llama/Llama-2-70b-chat-hf"


@pytest.fixture(scope="module")
def l40s() -> Hardware:
    return detect_hardware("L40S", 4)


def errors(plan: Plan) -> list[Finding]:
    return [f for f in plan.findings if f.severity == "error"]


def keys(plan: Plan, severity: str = "error") -> set[str]:
    return {f.key for f in plan.findings if f.severity == severity}


# ---------------------------------------------------------------------------------------------- model facts


def test_dialogpt_medium_is_gpt2_medium() -> None:
    f = load_model_facts(DIALOGPT)
    # GPT-2 medium by hand: wte 50257*1024 + wpe 1024*1024 + 24 layers * (12*1024^2 weights + 7168 column biases
    # + 2048 row biases + 4096 layer-norm) + final layer norm 2048 = 354,823,168 (tied LM head)
    assert f.params_total == 50257 * 1024 + 1024 * 1024 + 24 * (12 * 1024**2 + 3072 + 1024 + 4096 + 1024 + 4096) + 2048
    assert f.params_total == 354_823_168
    assert (f.num_layers, f.hidden_size, f.num_attention_heads, f.num_kv_heads, f.head_dim) == (24, 1024, 16, 16, 64)
    assert f.max_context == 1024 and f.max_context_key == "n_positions"
    assert f.config_dtype == "float32"  # no torch_dtype in its config.json: vLLM assumes float32 ...
    assert f.dtype_for("auto") == "bfloat16"  # ... and downcasts it to bfloat16
    # weights in bf16, vocabulary padded to a multiple of 64 (50257 -> 50304) for the embedding
    assert f.weight_bytes("auto") == 2 * (354_823_168 + (50304 - 50257) * 1024)
    assert f.kv_bytes_per_token(tp=1) == 2 * 24 * 16 * 64 * 2 == 98_304
    assert f.kv_bytes_per_token(tp=4) == 2 * 24 * 4 * 64 * 2 == 24_576


def test_mistral_7b() -> None:
    f = load_model_facts(MISTRAL)
    # embed + lm_head 2*32000*4096; per layer q,o 4096^2 each, k,v 4096*1024 each, MLP 3*4096*14336, 2 norms
    per_layer = 2 * 4096**2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    assert f.params_total == 2 * 32000 * 4096 + 32 * per_layer + 4096 == 7_241_732_096
    assert f.config_dtype == "bfloat16"
    assert f.weight_bytes() == 2 * 7_241_732_096  # 32000 is already a multiple of 64
    assert f.kv_bytes_per_token(tp=1) == 2 * 32 * 8 * 128 * 2 == 131_072
    assert f.kv_bytes_per_token(tp=2) == 65_536
    assert f.max_context == 32768 and f.sliding_window is None


def test_codellama_13b() -> None:
    f = load_model_facts(CODELLAMA)
    per_layer = 4 * 5120**2 + 3 * 5120 * 13824 + 2 * 5120
    assert f.params_total == 2 * 32016 * 5120 + 40 * per_layer + 5120 == 13_016_028_160
    assert f.num_kv_heads == 40  # multi-head attention, no GQA
    assert f.kv_bytes_per_token(tp=1) == 2 * 40 * 40 * 128 * 2 == 819_200
    assert f.kv_bytes_per_token(tp=2) == 409_600
    assert f.weight_bytes() == 2 * (13_016_028_160 + 2 * (32064 - 32016) * 5120)
    assert f.max_context == 16384


def test_llama2_70b() -> None:
    f = load_model_facts(LLAMA70)
    per_layer = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert f.params_total == 2 * 32000 * 8192 + 80 * per_layer + 8192 == 68_976_648_192
    assert f.config_dtype == "float16"
    assert f.weight_bytes() == 2 * 68_976_648_192  # 128.5 GiB in fp16
    assert f.weight_bytes() / GIB == pytest.approx(128.48, abs=0.01)
    # TP 4: everything but the norms (80*2*8192 + 8192) is split four ways
    norms = 80 * 2 * 8192 + 8192
    assert f.weight_bytes(tp=4) == 2 * ((68_976_648_192 - norms) / 4 + norms)
    assert f.kv_bytes_per_token(tp=4) == 2 * 80 * (8 // 4) * 128 * 2 == 81_920
    assert f.kv_bytes_per_token(tp=8) == 40_960
    assert f.kv_bytes_per_token(tp=16) == 40_960  # KV heads replicated once TP exceeds them
    assert f.max_context == 4096


def test_quantized_weight_bytes() -> None:
    f = load_model_facts(MISTRAL)
    # online FP8: decoder matmuls at 1 byte, embeddings and LM head stay bf16
    embed = 2 * 32000 * 4096
    assert f.weight_bytes(quantization="fp8") == pytest.approx(f.params_linear * 1 + (f.params_total - f.params_linear) * 2)
    assert f.weight_bytes(quantization="fp8") < 0.55 * f.weight_bytes()
    # an AWQ checkpoint: 4-bit weights + fp16 scale and 4-bit zero per 128 weights
    cfg = json.loads((Path(__file__).resolve().parents[1] / "harness/data/models/mistral-7b.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True}
    awq = facts_from_config(cfg, "mistral-awq", "test")
    assert awq.quant is not None and awq.quant.method == "awq"
    per_weight = 0.5 + (2 + 0.5) / 128
    assert awq.weight_bytes() == pytest.approx(awq.params_linear * per_weight + embed * 2 + (
        awq.params_total - awq.params_linear - embed) * 2)


def test_rope_scaling_and_sliding_window_parsed_like_vllm() -> None:
    base = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
            "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000,
            "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}
    linear = facts_from_config({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}, "x", "t")
    assert linear.max_context == 8192 and linear.rope_scaling_factor == 2.0
    yarn = facts_from_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "x", "t")
    assert yarn.max_context == 4096  # YaRN's max_position_embeddings is already the scaled length
    sw = facts_from_config({**base, "model_type": "mistral", "sliding_window": 1024}, "x", "t")
    assert sw.sliding_window == 1024


def test_load_model_facts_sources(tmp_path: Path) -> None:
    # shipped facts by hub name, by slug and by the user's ./models/<org>/<name> path
    assert load_model_facts(LLAMA70).source.startswith("shipped:")
    assert load_model_facts("llama-2-70b").name == LLAMA70
    assert load_model_facts("./models/meta-llama/Llama-2-70b-chat-hf").name == LLAMA70
    # a local directory wins and is read as is
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
        "max_position_embeddings": 2048, "torch_dtype": "bfloat16"}))
    f = load_model_facts(str(d))
    assert f.source == str(d / "config.json") and f.kv_bytes_per_token() == 2 * 4 * 2 * 64 * 2
    with pytest.raises(UserError, match="shipped models .*meta-llama/Llama-2-70b-chat-hf"):
        load_model_facts("nobody/no-such-model")


# ---------------------------------------------------------------------------------------------- hardware


def test_gpu_catalog_and_names() -> None:
    assert gpu_spec("l40s").bandwidth_gbps == 864 and gpu_spec("L40S").interconnect == "pcie"
    assert gpu_spec("h100").name == "H100-SXM" and gpu_spec("H100-PCIe").bandwidth_gbps == 2000
    for name in ("H200", "A100-40GB", "A100-80GB", "L4", "A10G"):
        assert gpu_spec(name).name == name
    assert gpu_spec("A100-40GB").fp8_tflops is None
    with pytest.raises(UserError, match="known: .*L40S"):
        gpu_spec("RTX-9999")
    hw = detect_hardware("L40S", 4)
    assert (hw.count, hw.arch, hw.interconnect, hw.detected) == (4, "ada", "pcie", False)
    assert hw.memory_gib == pytest.approx(44.40)


def test_cpu_host_kv_space_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    hw = detect_hardware("CPU")
    assert hw.is_cpu and hw.cpu_kv_cache_space_gib == 2.0 and hw.memory_gib > 0
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "lots")
    with pytest.raises(UserError, match="whole number"):
        detect_hardware("CPU")


# ---------------------------------------------------------------------------------------------- vLLM defaults


def test_defaults_follow_vllm_source(l40s: Hardware) -> None:
    d = defaults_for("0.32.0")
    assert d.gpu_memory_utilization == 0.92 and d.gpu_block_size == 16 and d.cpu_block_size == 128
    assert d.batch_defaults(44.4, "L40S", 1, False) == (2048, 256)
    assert d.batch_defaults(79.18, "H100-SXM", 1, False) == (8192, 1024)
    assert d.batch_defaults(79.25, "A100-80GB", 1, False) == (2048, 256)  # A100 excluded from the big defaults
    assert d.batch_defaults(139.8, "H200", 1, False) == (8192, 1024)
    assert d.batch_defaults(8, "CPU", 2, True) == (4096, 256)
    assert defaults_for("0.10.2").gpu_memory_utilization == 0.9
    assert cudagraph_capture_sizes(1024, 8192, d)[-1] == 512 and len(cudagraph_capture_sizes(1024, 8192, d)) == 51
    plan = plan_candidate(load_model_facts(MISTRAL), l40s, {"max_model_len": 8192})
    r = plan.resolved
    assert (r["gpu_memory_utilization"], r["block_size"], r["max_num_batched_tokens"], r["max_num_seqs"]) == (
        0.92, 16, 2048, 256)
    # chunked prefill off: vLLM raises the default token budget to max_model_len
    off = plan_candidate(load_model_facts(MISTRAL), l40s, {"max_model_len": 8192, "enable_chunked_prefill": False})
    assert off.resolved["max_num_batched_tokens"] == 8192 and off.feasible


# ---------------------------------------------------------------------------------------------- checks


def test_tp_must_divide_heads(l40s: Hardware) -> None:
    plan = plan_candidate(load_model_facts(LLAMA70), detect_hardware("L40S", 8), {"tensor_parallel_size": 3})
    assert not plan.feasible and "tensor_parallel_size" in keys(plan)
    assert "does not divide the model's 64 attention heads" in plan.reason()
    assert plan.kv_cache_tokens is None  # no memory arithmetic for an impossible split


def test_replicas_times_tp_within_gpus(l40s: Hardware) -> None:
    plan = plan_candidate(load_model_facts(MISTRAL), l40s, {"tensor_parallel_size": 2, "replicas": 4})
    assert not plan.feasible and "8 GPUs, but the node has 4 L40S" in plan.reason()
    ok = plan_candidate(load_model_facts(MISTRAL), l40s, {"tensor_parallel_size": 1, "replicas": 4,
                                                          "max_model_len": 8192})
    assert ok.feasible and ok.gpus_needed == 4


def test_llama70b_on_one_l40s_does_not_fit() -> None:
    plan = plan_candidate(load_model_facts(LLAMA70), detect_hardware("L40S", 1), {"gpu_memory_utilization": 0.9})
    assert not plan.feasible
    assert plan.weights_gib_per_gpu == pytest.approx(128.48, abs=0.01)
    assert "CUDA out of memory" in plan.reason()


def test_llama70b_tp4_on_l40s_fits_with_small_kv(l40s: Hardware) -> None:
    # the user's guide's "large model" config
    settings = {"model_name": LLAMA70, "tensor_parallel_size": 4, "gpu_memory_utilization": 0.85,
                "max_model_len": 4096, "max_num_batched_tokens": 16384, "block_size": 32}
    plan = plan_candidate(load_model_facts(LLAMA70), l40s, settings)
    assert plan.feasible, plan.reason()
    assert plan.weights_gib_per_gpu == pytest.approx(32.12, abs=0.01)
    assert plan.kv_bytes_per_token == 81_920
    # 0.85 x 44.40 GiB = 37.74 GiB; minus 32.12 GiB weights leaves 5.6 GiB before vLLM's runtime reserve
    assert 0.5 < plan.kv_budget_gib_per_gpu < 5.6
    assert plan.kv_cache_tokens == plan.kv_cache_blocks * 32


def test_mistral_on_one_l40s(l40s: Hardware) -> None:
    plan = plan_candidate(load_model_facts(MISTRAL), detect_hardware("L40S", 1),
                          {"gpu_memory_utilization": 0.9, "max_model_len": 8192})
    assert plan.feasible, plan.reason()
    # 0.9 x 44.40 = 39.96 GiB - 13.49 GiB weights - ~1 GiB reserve
    assert 24.5 < plan.kv_budget_gib_per_gpu < 26.5
    assert plan.kv_cache_tokens == plan.kv_cache_blocks * 16
    assert plan.kv_cache_tokens == pytest.approx(plan.kv_budget_gib_per_gpu * GIB / 131_072, rel=1e-3)
    assert plan.max_concurrency_at_max_len == pytest.approx(plan.kv_cache_tokens / 8192, rel=1e-6)
    # roofline: at most bandwidth / weights tokens/s per sequence, times the batch
    assert 0 < plan.decode_roofline_tok_s < 864e9 / (13.49 * GIB) * 256


def test_max_model_len_beyond_model_context(l40s: Hardware) -> None:
    plan = plan_candidate(load_model_facts(DIALOGPT), l40s, {"max_model_len": 2048})
    assert not plan.feasible and keys(plan) == {"max_model_len"}
    assert "longest context microsoft/DialoGPT-medium allows: 1024" in plan.reason()


def test_kv_too_small_for_one_request_gives_the_fitting_length() -> None:
    # vLLM 0.26 on an H100 refused this exact start with "the estimated maximum model length is 9744"
    hw = detect_hardware("H100", 1)
    plan = plan_candidate(load_model_facts(MISTRAL), hw, {"max_model_len": 32768, "gpu_memory_utilization": 0.2},
                          defaults=defaults_for("0.26.0"))
    assert not plan.feasible and "cannot hold one 32768-token request" in plan.reason()
    assert plan.max_fitting_len == 9744


def test_scheduler_rules(l40s: Hardware) -> None:
    f = load_model_facts(MISTRAL)
    plan = plan_candidate(f, l40s, {"max_num_seqs": 512, "max_num_batched_tokens": 256, "max_model_len": 4096})
    assert "max_num_seqs" in keys(plan)
    plan = plan_candidate(f, l40s, {"enable_chunked_prefill": False, "max_num_batched_tokens": 2048,
                                    "max_model_len": 8192})
    assert "max_num_batched_tokens" in keys(plan) and "chunked prefill off" in plan.reason()
    plan = plan_candidate(f, l40s, {"enable_chunked_prefill": True, "max_num_batched_tokens": 2048,
                                    "max_model_len": 8192})
    assert plan.feasible


def test_block_size_and_quantization(l40s: Hardware) -> None:
    f = load_model_facts(MISTRAL)
    assert "block_size" in keys(plan_candidate(f, l40s, {"block_size": 24, "max_model_len": 4096}))
    assert plan_candidate(f, l40s, {"block_size": 32, "max_model_len": 4096}).feasible
    # AWQ / GPTQ need such a checkpoint
    awq = plan_candidate(f, l40s, {"quantization": "awq", "max_model_len": 4096})
    assert not awq.feasible and "needs a checkpoint quantized with AWQ" in awq.reason()
    # FP8 quantizes while loading on Ada; weight-only on Ampere (warning); not on CPU
    fp8 = plan_candidate(f, l40s, {"quantization": "fp8", "max_model_len": 4096})
    assert fp8.feasible and fp8.weights_gib_per_gpu < 7.5
    a100 = plan_candidate(f, detect_hardware("A100-80GB", 1), {"quantization": "fp8", "max_model_len": 4096})
    assert a100.feasible and "quantization" in keys(a100, "warning")
    # quantization methods the installed vLLM lacks (SqueezeLLM was removed)
    spec = _argspec()
    sq = plan_candidate(f, l40s, {"quantization": "squeezellm", "max_model_len": 4096}, argspec=spec)
    assert not sq.feasible and "SqueezeLLM support was removed" in sq.reason()
    # fp8 KV cache halves bytes per token
    kv8 = plan_candidate(f, l40s, {"kv_cache_dtype": "fp8", "max_model_len": 4096})
    assert kv8.kv_bytes_per_token == 65_536


def test_tp_over_pcie_for_a_small_model_suggests_replicas(l40s: Hardware) -> None:
    plan = plan_candidate(load_model_facts(DIALOGPT), l40s, {"tensor_parallel_size": 4, "max_model_len": 1024})
    assert plan.feasible
    warn = [f for f in plan.findings if f.severity == "warning" and f.key == "tensor_parallel_size"]
    assert warn and "replicas 4" in warn[0].fix
    # not on NVLink
    h100 = plan_candidate(load_model_facts(DIALOGPT), detect_hardware("H100", 4),
                          {"tensor_parallel_size": 4, "max_model_len": 1024})
    assert "tensor_parallel_size" not in keys(h100, "warning")


def test_bad_values_are_error_findings(l40s: Hardware) -> None:
    f = load_model_facts(MISTRAL)
    assert "gpu_memory_utilization" in keys(plan_candidate(f, l40s, {"gpu_memory_utilization": 1.5}))
    assert "max_num_seqs" in keys(plan_candidate(f, l40s, {"max_num_seqs": "many"}))


def _argspec():  # type: ignore[no-untyped-def]
    """A small ArgSpec with a few of vLLM 0.32's server arguments (no vLLM import, no subprocess)."""
    from harness.launch.vllm_args import ArgInfo, ArgSpec

    def value(dest: str, type_: str = "int") -> ArgInfo:
        return ArgInfo(dest=dest, flags=["--" + dest.replace("_", "-")], kind="value", type=type_)

    args = {a.dest: a for a in [
        value("tensor_parallel_size"), value("gpu_memory_utilization", "float"), value("max_model_len"),
        value("block_size"), value("max_num_batched_tokens"), value("max_num_seqs"), value("quantization", "str"),
        value("kv_cache_dtype", "str"), value("kv_offloading_size", "float"),
        ArgInfo(dest="enable_prefix_caching", flags=["--enable-prefix-caching", "--no-enable-prefix-caching"],
                kind="bool"),
        ArgInfo(dest="enable_chunked_prefill", flags=["--enable-chunked-prefill", "--no-enable-chunked-prefill"],
                kind="bool"),
    ]}
    return ArgSpec(vllm_version="0.32.0", args=args, quantization_methods=["awq", "gptq", "fp8", "awq_marlin",
                                                                           "gptq_marlin", "compressed-tensors"])


def test_unknown_keys_get_the_closest_valid_key(l40s: Hardware) -> None:
    settings = {"model_name": DIALOGPT, "max_model_len": 1024, "swap_space": 4, "use_v2_block_manager": True,
                "max_chunked_prefill_tokens": 1024, "max_num_seq": 64, "replicas": 1}
    plan = plan_candidate(load_model_facts(DIALOGPT), l40s, settings, argspec=_argspec(), source="cfg.yaml")
    by_key = {f.key: f for f in plan.findings if f.severity == "error"}
    assert {"swap_space", "use_v2_block_manager", "max_chunked_prefill_tokens", "max_num_seq"} <= set(by_key)
    assert "model_name" not in by_key and "replicas" not in by_key  # harness keys
    assert "'max_num_seqs'" in by_key["max_num_seq"].message  # closest valid key
    assert "max_num_batched_tokens" in by_key["max_chunked_prefill_tokens"].fix
    assert "V1 engine" in by_key["swap_space"].fix and "kv_offloading_size" in by_key["swap_space"].fix


def test_plan_to_dict_and_reason(l40s: Hardware) -> None:
    plan = plan_candidate(load_model_facts(MISTRAL), l40s, {"tensor_parallel_size": 3})
    d = plan.to_dict()
    json.dumps(d)
    assert d["feasible"] is False and d["findings"][0]["severity"] == "error"
    assert plan.reason().startswith("tensor_parallel_size: ")
    ok = plan_candidate(load_model_facts(MISTRAL), l40s, {"max_model_len": 4096})
    assert ok.reason() == "" and set(Plan.__dataclass_fields__) >= {
        "feasible", "findings", "kv_cache_tokens", "kv_cache_blocks", "kv_bytes_per_token", "weights_gib_per_gpu",
        "kv_budget_gib_per_gpu", "max_concurrency_at_max_len", "decode_roofline_tok_s", "gpus_needed"}


def test_planning_is_fast(l40s: Hardware) -> None:
    import time

    f = load_model_facts(MISTRAL)
    t = time.perf_counter()
    for i in range(500):
        plan_candidate(f, l40s, {"tensor_parallel_size": 1 + i % 2, "max_num_seqs": 64 + i, "max_model_len": 4096})
    assert (time.perf_counter() - t) / 500 < 0.002  # well under 2 ms a candidate


def test_utilization_too_close_to_the_whole_card() -> None:
    f = load_model_facts(MISTRAL)
    hw = detect_hardware("L40S", 1)
    # the CUDA context and NCCL (1.12 GiB measured) live outside vLLM's budget
    assert "gpu_memory_utilization" in keys(plan_candidate(f, hw, {"gpu_memory_utilization": 0.99,
                                                                   "max_model_len": 4096}), "warning")
    assert "gpu_memory_utilization" not in keys(plan_candidate(f, hw, {"gpu_memory_utilization": 0.95,
                                                                       "max_model_len": 4096}), "warning")
    # vLLM 0.26 captured CUDA graphs outside the budget too: the safe ceiling is lower there
    old = plan_candidate(f, hw, {"gpu_memory_utilization": 0.97, "max_model_len": 4096},
                         defaults=defaults_for("0.26.0"))
    assert "gpu_memory_utilization" in keys(old, "warning")


def test_explicit_kv_cache_memory_bytes() -> None:
    f = load_model_facts(MISTRAL)
    hw = detect_hardware("L40S", 1)
    ok = plan_candidate(f, hw, {"kv_cache_memory_bytes": "8Gi", "max_model_len": 4096})
    assert ok.feasible and ok.kv_budget_gib_per_gpu == pytest.approx(8.0) and ok.memory_mode == "explicit"
    assert ok.kv_cache_tokens == 8 * GIB // (16 * 131_072) * 16
    too_big = plan_candidate(f, hw, {"kv_cache_memory_bytes": "40Gi", "max_model_len": 4096})
    assert "kv_cache_memory_bytes" in keys(too_big)


def test_nvml_detection_uses_cuda_visible_total(monkeypatch: pytest.MonkeyPatch) -> None:
    """NVML as seen on this project's H100 host: 81559 MiB total, 480 MiB reserved -> CUDA's 81079 MiB."""
    import sys
    import types

    mem = types.SimpleNamespace(total=81559 * 2**20, reserved=480 * 2**20, free=81079 * 2**20, used=0)
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: b"NVIDIA H100 80GB HBM3",
        nvmlMemory_v2=2, nvmlDeviceGetMemoryInfo=lambda h, version=None: mem,
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0), nvmlDeviceGetNvLinkState=lambda h, link: 1,
        NVML_NVLINK_MAX_LINKS=18)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    hw = detect_hardware()
    assert (hw.name, hw.count, hw.arch, hw.interconnect, hw.detected) == ("H100-SXM", 2, "hopper", "nvlink", True)
    assert hw.memory_gib * 1024 == pytest.approx(81079)
    assert hw.free_memory_gib == (81079 / 1024, 81079 / 1024)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert detect_hardware().count == 1
    assert detect_hardware(None, 4).count == 4  # --num-gpus overrides the count, keeps the detected model
