"""GPU-host checks of the NVML paths (skipped where there is no NVIDIA GPU, e.g. the CPU CI machine).

They need torch with CUDA and nvidia-ml-py, not vLLM: a fake server allocates GPU memory the way vLLM's engine
core does (in a child of the server process, same process group).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from harness.launch.server import Server, ServerSpec, _nvml_memory_used, group_pids
from harness.launch.vllm_args import ArgSpec
from harness.measure.sampler import ResourceSampler


def _has_cuda() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:  # noqa: BLE001
        return False


pytestmark = pytest.mark.skipif(not _has_cuda(), reason="needs an NVIDIA GPU with NVML")

ALLOC = (
    "import sys, time, torch\n"
    "x = torch.empty(int(sys.argv[1]) * 2**20, dtype=torch.uint8, device='cuda')\n"
    "torch.cuda.synchronize(); print('allocated', flush=True)\n"
    "end = time.time() + float(sys.argv[2])\n"
    "a = torch.randn(4096, 4096, device='cuda')\n"
    "while time.time() < end:\n"
    "    a = (a @ a).clamp_(-1, 1)\n"
    "    torch.cuda.synchronize()\n"
)

FAKE_GPU_SERVER = textwrap.dedent(
    """
    import http.server, subprocess, sys
    argv = sys.argv[1:]
    port = int(next(a.split("=", 1)[1] for a in argv if a.startswith("--port=")))
    # the "engine core": holds 3 GiB of GPU memory in a child process of the same group
    core = subprocess.Popen([sys.executable, "-c", {alloc!r}, "3072", "600"], stdout=subprocess.PIPE, text=True)
    core.stdout.readline()

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
).format(alloc=ALLOC)


def test_sampler_sees_gpu_memory_util_and_power() -> None:
    before = _nvml_memory_used([0])[0]
    proc = subprocess.Popen([sys.executable, "-c", ALLOC, "4096", "4"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("allocated")
        with ResourceSampler([proc.pid], gpu_indices=[0], period_s=0.2) as sampler:
            time.sleep(2.5)
        usage = sampler.result()
    finally:
        proc.kill()
        proc.wait()
    (gpu,) = usage.gpus
    print(f"\n{gpu}")
    assert gpu.index == 0 and gpu.memory_total_mib > 40_000
    assert gpu.memory_peak_mib >= before + 4096 and usage.peak_gpu_memory_mib == gpu.memory_peak_mib
    assert gpu.util_mean_percent > 10 and gpu.power_mean_w > 50
    assert usage.rss_peak_mib is not None and usage.rss_peak_mib > 100


def test_stop_waits_until_gpu_memory_is_released(tmp_path: Path) -> None:
    script = tmp_path / "fake_gpu_server.py"
    script.write_text(FAKE_GPU_SERVER)
    exe = tmp_path / "fake-python"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    exe.chmod(0o755)
    spec = ServerSpec(model="m", python=str(exe), gpus=[0], log_path=tmp_path / "s.log", start_timeout_s=120)
    baseline = _nvml_memory_used([0])[0]
    server = Server(spec, ArgSpec(vllm_version="fake", args={}))
    with server:
        held = _nvml_memory_used([0])[0]
        assert held >= baseline + 3000, (baseline, held)
        pgid = server.pgid
    after = _nvml_memory_used([0])[0]
    print(f"\nGPU 0: {baseline:.0f} MiB before, {held:.0f} held, {after:.0f} right after stop() "
          f"({server.stop_s:.2f} s)")  # fmt: skip
    assert pgid is not None and not group_pids(pgid)
    assert after <= baseline + 512  # stop() returned only once the driver had freed the memory


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_build_mistral_7b_on_gpu(tmp_path: Path) -> None:
    """The real Mistral-7B architecture (7.24B params, 14.5 GB bf16) with random weights, built on the GPU."""
    from harness.models import build_from_config

    built = build_from_config("mistral-7b", tmp_path / "mistral-7b")
    print(f"\n{built}")
    assert built.device == "cuda" and built.num_params == 7_241_732_096 and built.vocab_size == 32000
    files = sorted(p.name for p in built.path.glob("*.safetensors"))
    assert len(files) == 4 and (built.path / "model.safetensors.index.json").is_file()
    size = sum(p.stat().st_size for p in built.path.glob("*.safetensors"))
    assert 14.4e9 < size < 14.6e9
