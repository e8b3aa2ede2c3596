"""classify(): log snippets in the exact formats vLLM 0.32 (CPU build, captured from real runs) and torch print."""

from __future__ import annotations

from harness.launch.failures import LOG_TAIL_LINES, classify
from harness.records import FAILURE_KINDS

ENGINE = "(EngineCore pid=10958) ERROR 11-27 22:40:14 [core.py:1510] "

# Captured from vLLM 0.32 CPU with the tiny model, --max-model-len 2048 --kv-cache-memory-bytes 1000000.
KV_TOO_SMALL_LOG = f"""\
(Worker pid=11166) INFO 11-27 22:40:13 [default_loader.py:501] Loading weights took 0.03 seconds
(EngineCore pid=10958) INFO 11-27 22:40:14 [utils.py:347] Using LBHNC KV cache layout.
(Worker pid=11166) INFO 11-27 22:40:14 [cpu_worker.py:260] Explicitly set (0.0/11.59) GiB for KV cache on node 0.
{ENGINE}EngineCore failed to start.
{ENGINE}Traceback (most recent call last):
{ENGINE}  File "/work/main/.venv/lib/python3.11/site-packages/vllm/v1/core/kv_cache_utils.py", line 1030, in _check_enough_kv_cache_memory
{ENGINE}    raise ValueError(
{ENGINE}ValueError: To serve at least one request with the model's max seq len (2048), (0.0 GiB KV cache is needed, which is larger than the available KV cache memory (0.0 GiB). Based on the available memory, the estimated maximum model length is 256. Try increasing `gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or decreasing `max_model_len` when initializing the engine. See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.
(EngineCore pid=10958) ERROR 11-27 22:40:19 [multiproc_executor.py:315] Worker proc VllmWorker-0 died unexpectedly (exit code: 0), shutting down executor.
Process EngineCore:
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/vllm/v1/core/kv_cache_utils.py", line 1030, in _check_enough_kv_cache_memory
    raise ValueError(
ValueError: To serve at least one request with the model's max seq len (2048), (0.0 GiB KV cache is needed, which is larger than the available KV cache memory (0.0 GiB). Based on the available memory, the estimated maximum model length is 256. Try increasing `gpu_memory_utilization` (which also controls CPU memory on the CPU backend) or decreasing `max_model_len` when initializing the engine. See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/vllm/v1/engine/utils.py", line 1431, in wait_for_engine_startup
    raise RuntimeError(
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {{}}
/root/.pyenv/versions/3.11.7/lib/python3.11/multiprocessing/resource_tracker.py:254: UserWarning: resource_tracker: There appear to be 1 leaked shared_memory objects to clean up at shutdown
  warnings.warn('resource_tracker: There appear to be %d '
"""

# Captured: --max-model-len 4096 on a model with max_position_embeddings 2048 (dies in the API process).
MAX_LEN_LOG = """\
(APIServer pid=9001) INFO 11-27 22:37:40 [model.py:733] Resolved architecture: LlamaForCausalLM
Traceback (most recent call last):
  File "/work/main/.venv/lib/python3.11/site-packages/vllm/engine/arg_utils.py", line 1955, in create_model_config
    return ModelConfig(
           ^^^^^^^^^^^^
  File "/work/main/.venv/lib/python3.11/site-packages/pydantic/_internal/_dataclasses.py", line 121, in __init__
    s.__pydantic_validator__.validate_python(ArgsKwargs(args, kwargs), self_instance=s)
pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig
  Value error, User-specified max_model_len (4096) is greater than the derived max_model_len (max_position_embeddings=2048.0 or model_max_length=None in model's config.json). To allow overriding this maximum, set the env var VLLM_ALLOW_LONG_MAX_MODEL_LEN=1. [type=value_error, input_value=ArgsKwargs((), {'model': '/tmp/tiny'}), input_type=ArgsKwargs]
    For further information visit https://errors.pydantic.dev/2.14/v/value_error
"""

# Captured: --kv-cache-dtype fp9 (argparse, exit code 2).
ARGPARSE_LOG = """\
                     [--enable-log-requests | --no-enable-log-requests]
                     [model_tag]
api_server.py: error: argument --kv-cache-dtype: invalid choice: 'fp9' (choose from 'auto', 'bfloat16', 'float16', 'fp8')
"""

# torch's CUDA OOM text inside vLLM's worker (GPU hosts), followed by the API process's wrapper error.
CUDA_OOM_LOG = """\
(Worker pid=4242) INFO 11-27 10:00:01 [gpu_model_runner.py:2000] Starting to load model mistralai/Mistral-7B-v0.1...
(Worker pid=4242) ERROR 11-27 10:00:09 [gpu_model_runner.py:5139] Failed to load model - not enough GPU memory. Try lowering --gpu-memory-utilization to free memory for weights, increasing --tensor-parallel-size, or using --quantization. See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more tips. (original error: CUDA out of memory. Tried to allocate 224.00 MiB. GPU 0 has a total capacity of 79.19 GiB of which 101.06 MiB is free.)
(EngineCore pid=4100) ERROR 11-27 10:00:09 [core.py:1510] torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 224.00 MiB. GPU 0 has a total capacity of 79.19 GiB of which 101.06 MiB is free. Including non-PyTorch memory, this process has 79.07 GiB memory in use.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore_DP0': 1}
"""

NO_CACHE_MEMORY_LOG = f"""\
(Worker pid=7) INFO 11-27 10:00:01 [default_loader.py:501] Loading weights took 3.10 seconds
{ENGINE}ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when initializing the engine (this flag also controls CPU memory reservation on the CPU backend, despite its name). See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more details.
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {{}}
"""

CPU_RESERVE_LOG = f"""\
{ENGINE}ValueError: Available memory on node 0 (3.2/15.5 GiB) on startup is less than desired CPU memory utilization (0.92, 14.3 GiB). On the CPU backend, the `--gpu-memory-utilization` flag controls the fraction of CPU memory reserved (despite its name).
"""

RUNTIME_CRASH_LOG = f"""\
(Worker pid=7) INFO 11-27 10:00:01 [default_loader.py:501] Loading weights took 3.10 seconds
(APIServer pid=5) WARNING 11-27 10:00:00 [system_utils.py:255] not enough memory for huge pages, continuing
{ENGINE}Traceback (most recent call last):
{ENGINE}  File "/x/vllm/attention/backends/cpu_attn.py", line 411, in forward
{ENGINE}NotImplementedError: fp8 KV cache is not supported by the CPU attention backend
RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {{}}
"""


def test_kv_too_small_keeps_estimated_length() -> None:
    f = classify(KV_TOO_SMALL_LOG, exit_code=1, timed_out=False)
    assert f.kind == "kv_too_small"
    assert f.max_fitting_len == 256
    assert f.message.startswith("ValueError: To serve at least one request with the model's max seq len (2048)")
    assert f.exit_code == 1
    assert "Engine core initialization failed" in f.log_tail


def test_kv_too_small_older_wording() -> None:
    log = (
        "ValueError: The model's max seq len (32768) is larger than the maximum number of tokens that can be stored "
        "in KV cache (21344). Try increasing `gpu_memory_utilization` or decreasing `max_model_len` when "
        "initializing the engine.\n"
    )
    f = classify(log, exit_code=1, timed_out=False)
    assert f.kind == "kv_too_small" and f.max_fitting_len == 21344


def test_bad_args() -> None:
    f = classify(MAX_LEN_LOG, exit_code=1, timed_out=False)
    assert f.kind == "bad_arg"
    assert "ValidationError: 1 validation error for ModelConfig" in f.message
    assert "User-specified max_model_len (4096) is greater than the derived max_model_len" in f.message
    f = classify(ARGPARSE_LOG, exit_code=2, timed_out=False)
    assert f.kind == "bad_arg"
    assert f.message.startswith("api_server.py: error: argument --kv-cache-dtype: invalid choice: 'fp9'")
    f = classify("usage: api_server.py [-h]\napi_server.py: error: unrecognized arguments: --swap-space 4\n", 2, False)
    assert f.kind == "bad_arg" and "--swap-space" in f.message
    # A ValueError before any weights were loaded is vLLM rejecting its configuration.
    f = classify("ValueError: Tensor parallel size (3) must divide the number of attention heads (32).\n", 1, False)
    assert f.kind == "bad_arg" and "Tensor parallel size" in f.message


def test_oom() -> None:
    f = classify(CUDA_OOM_LOG, exit_code=1, timed_out=False)
    assert f.kind == "oom"
    assert "out of memory" in f.message or "not enough GPU memory" in f.message
    for log in (NO_CACHE_MEMORY_LOG, CPU_RESERVE_LOG, "OSError: [Errno 12] Cannot allocate memory\n"):
        assert classify(log, exit_code=1, timed_out=False).kind == "oom", log


def test_crash_reports_root_cause_not_wrapper() -> None:
    f = classify(RUNTIME_CRASH_LOG, exit_code=1, timed_out=False)
    assert f.kind == "crash"  # the memory warning is not an error line, so not an OOM
    assert f.message == "NotImplementedError: fp8 KV cache is not supported by the CPU attention backend"
    f = classify("INFO starting\nKilled\n", exit_code=-9, timed_out=False)
    assert f.kind == "crash" and f.message == "server exited with code -9"


def test_timeout_and_tail() -> None:
    log = "\n".join(f"(APIServer pid=1) INFO 11-27 10:00:{i % 60:02d} [x.py:1] line {i}" for i in range(200))
    f = classify(log, exit_code=None, timed_out=True)
    assert f.kind == "start_timeout" and f.exit_code is None
    assert f.log_tail.splitlines() == log.splitlines()[-LOG_TAIL_LINES:]
    assert {classify(x, 1, False).kind for x in (KV_TOO_SMALL_LOG, MAX_LEN_LOG, CUDA_OOM_LOG, RUNTIME_CRASH_LOG)} <= set(
        FAILURE_KINDS
    )
