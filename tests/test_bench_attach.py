"""`python -m harness.bench --url`: measuring a server the harness did not start.

Fast tests drive the known-capacity fake (`tests/capacity_fake.py`: /v1/models, /metrics with the queue, KV usage and
cache_config_info) and the streaming fake (`tests/fakeserver.py`: no /metrics) through `harness.bench.main`, and
check the one-line errors; the slow test starts a real vLLM CPU server and runs the CLI against it as a user would.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from capacity_fake import CapacityConfig, CapacityFake
from fakeserver import FakeConfig, FakeServer
from harness.bench import _print_table, main
from harness.deploy import ATTACHED_NOTE, attach
from harness.errors import UserError
from harness.launch.external import base_url, is_local
from harness.launch.server import free_port
from harness.load.prompts import build_requests
from harness.load.workload import load_workload
from harness.measure.vllm_metrics import parse_prometheus, settings_from_cache_info
from harness.records import load_record

REPO = Path(__file__).resolve().parents[1]
KEY = "-k3y"  # a key beginning with `-`, as a random one may
# 8 slots, one token per chunk: a request of n output tokens takes 0.02 + 0.01 x (n - 1) s however loaded the box is
CONFIG = CapacityConfig(slots=8, prefill_s=0.02, token_s=0.01, api_key=KEY, model="served-tiny", max_model_len=512,
                        block_size=16, num_gpu_blocks=1000, gpu_memory_utilization=0.85)


@pytest.fixture(scope="module")
def fake():  # type: ignore[no-untyped-def]
    with CapacityFake(CONFIG) as server:
        yield server


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_tokenizer, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("tok")
    tiny_tokenizer.save_pretrained(out)
    return out


def _only_record(results: Path) -> Path:
    (path,) = results.glob("bench/*/record.json")
    return path


def _error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err
    return err


# ---------------------------------------------------------------------------------------------- the record


def test_attached_record_has_metrics_and_says_what_it_lacks(
        fake: CapacityFake, tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--url", fake.url + "/v1/", f"--api-key={KEY}", "--model", "served-tiny", "--tokenizer",
                 str(tokenizer_dir), "--workload", "tiny-cpu", "--num-requests", "12", "--concurrency", "4",
                 "--results-dir", str(tmp_path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    rec = load_record(_only_record(tmp_path))
    m = rec.metrics
    assert m is not None and m.completed == 12 and m.failed == 0
    # the workload's own requests (after its 2 warm-up ones), each given exactly its output length (ignore_eos)
    wl = load_workload("tiny-cpu")
    specs = build_requests(wl, AutoTokenizer.from_pretrained(tokenizer_dir), 12 + wl.warmup_requests, seed=wl.seed)
    assert m.total_output_tokens == sum(r.max_tokens for r in specs[wl.warmup_requests:])
    # no less than the fake's 20 ms prefill and 10 ms per token (timers may fire a fraction of a ms early)
    assert m.ttft_ms is not None and m.ttft_ms.p50 >= 19.0
    assert m.tpot_ms is not None and m.tpot_ms.p50 >= 9.5
    assert rec.client is not None and rec.client.valid, rec.client
    # what needs the process is absent, and the record says so
    side = rec.server_side
    assert side is not None and side.note == ATTACHED_NOTE and side.note.startswith("attached: no process figures")
    assert side.urls == [fake.url] and side.metrics_endpoint
    assert rec.argv is None and rec.startup_s is None and rec.log_paths == []
    assert rec.memory is not None and rec.memory.rss_peak_mib is None
    if side.gpu_memory is None:  # no NVML here: no GPU figure at all
        assert rec.memory.gpus == [] and rec.memory.peak_gpu_memory_mib is None
    # settings are what the server reported, each marked with its source
    assert rec.settings == {"max_model_len": 512, "block_size": 16, "gpu_memory_utilization": 0.85,
                            "cache_dtype": "auto", "enable_prefix_caching": True, "prefix_caching_hash_algo": "sha256"}
    assert side.observed["max_model_len"] == "/v1/models"
    assert side.observed["block_size"] == "/metrics vllm:cache_config_info"
    assert set(side.observed) == set(rec.settings)
    # /metrics was scraped: capacity from cache_config_info, KV usage (at most 4 of 8 slots run at concurrency 4)
    s = rec.server
    assert s is not None and s.kv_cache_blocks == 1000 and s.kv_cache_tokens == 16000
    assert s.peak_kv_usage is not None and 0 < s.peak_kv_usage <= 4 / 8
    assert s.preemptions == 0
    table = io.StringIO()
    _print_table(rec, table)
    assert "attached: no process figures" in table.getvalue() and "server: " + fake.url in out.err
    raw = json.loads(_only_record(tmp_path).read_text())
    assert raw["server_side"]["note"] == ATTACHED_NOTE and raw["argv"] is None


def test_attached_open_loop_for_a_duration(fake: CapacityFake, tokenizer_dir: Path, tmp_path: Path) -> None:
    """--rate and --duration drive the same steady-state window step as on a started server (well below
    capacity): a warm-up, the measured window, the verdict."""
    assert main(["--url", fake.url, f"--api-key={KEY}", "--model", "served-tiny", "--tokenizer", str(tokenizer_dir),
                 "--workload", "tiny-cpu", "--rate", "8", "--duration", "3", "--warmup", "1",
                 "--results-dir", str(tmp_path)]) == 0
    rec = load_record(_only_record(tmp_path))
    assert rec.arrival["mode"] == "poisson" and rec.arrival["rate"] == 8 and rec.arrival["window"]["step_s"] == 3
    assert rec.steady is not None and rec.steady.window_s == 3 and rec.steady.requests > 0
    assert rec.metrics is not None and rec.metrics.completed >= 5 and rec.metrics.failed == 0
    assert rec.client is not None and rec.client.requested_rate == 8
    assert rec.server is not None and rec.server.peak_kv_usage is not None


def test_server_without_metrics_is_still_measured(tokenizer_dir: Path, tmp_path: Path) -> None:
    with FakeServer(FakeConfig(model="plain", max_model_len=None, record=False)) as server:
        dep = attach(server.url, None, "plain")
        assert dep.settings == {} and dep.server_side is not None and not dep.server_side.metrics_endpoint
        assert "/metrics did not answer" in dep.server_side.note
        assert main(["--url", server.url, "--model", "plain", "--tokenizer", str(tokenizer_dir), "--workload",
                     "tiny-cpu", "--num-requests", "4", "--results-dir", str(tmp_path)]) == 0
    rec = load_record(_only_record(tmp_path))
    assert rec.metrics is not None and rec.metrics.completed == 4
    assert rec.server is not None and rec.server.peak_kv_usage is None and rec.server.kv_cache_tokens is None


# ---------------------------------------------------------------------------------------------- errors


def test_unreachable_url(capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    err = _error(capsys, ["--url", url, "--model", "m", "--tokenizer", str(tokenizer_dir)])
    assert err.startswith(f"error: --url: cannot reach {url}")


def test_wrong_or_missing_key(fake: CapacityFake, capsys: pytest.CaptureFixture[str], tokenizer_dir: Path) -> None:
    err = _error(capsys, ["--url", fake.url, "--api-key", "wrong", "--model", "served-tiny",
                          "--tokenizer", str(tokenizer_dir)])
    assert "--api-key" in err and fake.url in err and "401" in err
    err = _error(capsys, ["--url", fake.url, "--model", "served-tiny", "--tokenizer", str(tokenizer_dir)])
    assert "no key (give --api-key)" in err


def test_model_not_served_lists_the_served_names(fake: CapacityFake, capsys: pytest.CaptureFixture[str],
                                                 tokenizer_dir: Path) -> None:
    err = _error(capsys, ["--url", fake.url, f"--api-key={KEY}", "--model", "other", "--tokenizer",
                          str(tokenizer_dir)])
    assert err == f"error: --model: {fake.url} does not serve 'other'; it serves: served-tiny"


@pytest.mark.parametrize("extra", [["--set", "max_num_seqs=8"], ["--config", "configs/x.yaml"], ["--gpus", "0"],
                                   ["--start-timeout", "10"]])
def test_launch_options_are_refused_with_url(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["--url", "http://127.0.0.1:1", "--model", "m", *extra])
    assert err.startswith(f"error: {extra[0]}: ") and "--url" in err


def test_tokenizer_needed_when_the_model_is_not_a_directory(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["--url", "http://127.0.0.1:1", "--model", "org/name"])
    assert err.startswith("error: --tokenizer: 'org/name' is not a local directory; give --tokenizer")
    err = _error(capsys, ["--url", "http://127.0.0.1:1", "--model", "m", "--tokenizer", "/no/such/dir"])
    assert "--tokenizer" in err and "/no/such/dir" in err


def test_attach_options_need_url(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["--model", "m", "--api-key", "k"])
    assert err.startswith("error: --api-key: only applies with --url")


def test_bad_url() -> None:
    with pytest.raises(UserError, match="--url: got 'ftp://x'"):
        base_url("ftp://x")
    assert base_url("127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    assert base_url("https://h.example/prefix/v1") == "https://h.example/prefix"


# ---------------------------------------------------------------------------------------------- units


def test_observed_cache_settings_from_real_labels() -> None:
    """vLLM 0.32's labels (one line of a real CPU server's /metrics): settings typed, computed fields left out."""
    text = ('vllm:cache_config_info{block_size="128",cache_dtype="auto",calculate_kv_scales="False",'
            'cpu_kvcache_space_bytes="1073741824",enable_prefix_caching="True",engine="0",'
            'gpu_memory_utilization="0.92",'
            'kv_cache_max_concurrency="1024.0",kv_cache_memory_bytes="None",kv_cache_size_tokens="524288",'
            'kv_cache_dtype_skip_layers="[]",num_cpu_blocks="None",num_gpu_blocks="4096",'
            'prefix_caching_hash_algo="sha256",user_specified_block_size="False"} 1.0')
    assert settings_from_cache_info(parse_prometheus(text)) == {
        "block_size": 128, "cache_dtype": "auto", "calculate_kv_scales": False,
        "cpu_kvcache_space_bytes": 1073741824, "enable_prefix_caching": True, "gpu_memory_utilization": 0.92,
        "prefix_caching_hash_algo": "sha256"}
    assert settings_from_cache_info(parse_prometheus("vllm:num_requests_waiting 0")) == {}


def test_is_local() -> None:
    assert is_local("http://127.0.0.1:8000") and is_local("http://localhost:8000")
    assert not is_local("http://192.0.2.1:8000")  # TEST-NET-1: never this host
    assert not is_local("http://no-such-host.invalid:8000")


# ---------------------------------------------------------------------------------------------- slow (real vLLM CPU)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_server_measured_from_outside(tiny_model: Path, tmp_path: Path) -> None:
    """A real vLLM CPU server started separately (as a user would by hand), measured with the CLI as a subprocess."""
    from harness.launch.server import Server, ServerSpec
    from harness.measure.vllm_metrics import kv_capacity_from_log

    spec = ServerSpec(model=str(tiny_model), settings={"enforce_eager": True, "max_model_len": 512},
                      env={"VLLM_CPU_KVCACHE_SPACE": "1"}, log_path=tmp_path / "vllm.log", served_model_name="tiny")
    with Server(spec) as server:
        cmd = [sys.executable, "-m", "harness.bench", "--url", server.base_url, f"--api-key={server.api_key}",
               "--model", "tiny", "--tokenizer", str(tiny_model), "--workload", "tiny-cpu", "--num-requests", "8",
               "--concurrency", "2", "--results-dir", str(tmp_path / "results")]
        out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
        assert out.returncode == 0, out.stderr
        bad = subprocess.run([*cmd[:5], "--api-key=wrong", *cmd[6:]], cwd=REPO, capture_output=True, text=True,
                             timeout=120, check=False)
        log = server.read_log()
    assert bad.returncode == 2 and "--api-key" in bad.stderr and "401" in bad.stderr
    rec = load_record(_only_record(tmp_path / "results"))
    assert rec.model == "tiny" and rec.metrics is not None and rec.metrics.completed == 8 and rec.metrics.failed == 0
    assert rec.metrics.ttft_ms is not None and rec.metrics.tpot_ms is not None
    assert rec.client is not None and rec.client.valid, rec.client
    assert rec.server_side is not None and rec.server_side.note == ATTACHED_NOTE
    assert rec.argv is None and rec.startup_s is None and rec.log_paths == []
    assert rec.memory is not None and rec.memory.rss_peak_mib is None
    # observed settings: max_model_len from /v1/models, the cache settings from /metrics
    assert rec.settings["max_model_len"] == 512 and rec.server_side.observed["max_model_len"] == "/v1/models"
    assert isinstance(rec.settings.get("block_size"), int) and "gpu_memory_utilization" in rec.settings
    # capacity from /metrics equals what the start-up log says (the record never saw the log)
    cap = kv_capacity_from_log(log)
    assert rec.server is not None and rec.server.kv_cache_tokens == cap.kv_cache_tokens
    assert rec.server.peak_kv_usage is not None and rec.server.preemptions == 0
    # the server the launcher started reports prefix-cache hits in usage; the attached client reads them
    assert rec.metrics.prefix_cached_fraction is not None
    assert "server: " + server.base_url in out.stderr
