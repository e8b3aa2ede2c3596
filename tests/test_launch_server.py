"""Server / ServerGroup: start, readiness, failure classification, teardown, and no server outliving the harness.

The fast tests run a fake "python" that behaves like a vLLM server (serves /health, spawns a child in its process
group, ignores SIGTERM, prints an OOM, hangs), so the process machinery is tested without vLLM's 40 s start.
The slow tests start the real vLLM CPU server with the tiny model (4 starts in all).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from harness.errors import UserError
from harness.launch.server import (
    REAPER,
    Server,
    ServerGroup,
    ServerSpec,
    ServerStartError,
    group_pids,
    wait_all_ready,
)
from harness.cachedir import vllm_cache_root
from harness.launch.placement import Slot, SlotPool, cpu_bind_sets, gpu_sets, replica_placement
from harness.launch.vllm_args import ArgSpec

REPO = Path(__file__).resolve().parents[1]

FAKE_SERVER = textwrap.dedent(
    """
    import http.server, os, signal, subprocess, sys, time
    argv = sys.argv[1:]
    opts = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    port = int(opts["--port"])
    mode = os.environ.get("FAKE_MODE", "serve")
    print("fake vLLM argv:", " ".join("--api-key=***" if a.startswith("--api-key=") else a for a in argv), flush=True)
    if mode == "oom":
        print("(EngineCore pid=1) ERROR 11-27 10:00:09 [core.py:1510] torch.OutOfMemoryError: CUDA out of memory. "
              "Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which 1.06 GiB is free.", flush=True)
        print("RuntimeError: Engine core initialization failed. See root cause above.", flush=True)
        sys.exit(1)
    # An "engine core" child in the same process group that ignores SIGTERM (only SIGKILL stops it).
    subprocess.Popen([sys.executable, "-c",
                      "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
    if mode == "hang":
        time.sleep(600)
    if os.environ.get("FAKE_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(float(os.environ.get("FAKE_DELAY", "0.5")))

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()
        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


@pytest.fixture()
def fake_python(tmp_path: Path) -> str:
    script = tmp_path / "fake_vllm_server.py"
    script.write_text(FAKE_SERVER)
    exe = tmp_path / "fake-python"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    exe.chmod(0o755)
    return str(exe)


def _gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_pids(pgid):
            return True
        time.sleep(0.1)
    return not group_pids(pgid)


# ---------------------------------------------------------------------------------------------- fast (fake server)


def test_ready_argv_and_teardown_with_sigkill_escalation(
    fake_python: str, vllm_argspec: ArgSpec, tmp_path: Path
) -> None:
    spec = ServerSpec(
        model="/models/tiny",
        settings={"max_num_seqs": 8, "enable_prefix_caching": False, "replicas": 1},
        python=fake_python,
        env={"FAKE_IGNORE_TERM": "1"},
        log_path=tmp_path / "server.log",
        stop_timeout_s=1.0,
        served_model_name="tiny",
    )
    server = Server(spec, vllm_argspec)
    with server:
        assert server.ready and server.startup_s is not None and server.startup_s < 10
        with urllib.request.urlopen(server.base_url + "/health", timeout=5) as resp:
            assert resp.status == 200
        assert server.base_url.startswith("http://127.0.0.1:")
        assert server.argv[1:] == [
            "-m", "vllm.entrypoints.openai.api_server", "--model=/models/tiny", "--host=127.0.0.1",
            f"--port={server.port}", "--api-key=<redacted>", "--served-model-name=tiny",
            "--max-num-seqs=8", "--no-enable-prefix-caching", "--enable-prompt-tokens-details",
        ]  # fmt: skip
        assert len(server.api_key) >= 20 and server.api_key not in json.dumps(server.argv)
        pgid = server.pgid
        assert pgid == server.pid and len(group_pids(pgid)) >= 2  # server + its child
        assert "fake vLLM argv" in server.read_log()
    # Both ignored SIGTERM: SIGKILL after stop_timeout_s, and nothing of the group is left.
    assert not group_pids(pgid)
    assert server.stop_s is not None and 1.0 <= server.stop_s < 10
    assert server.returncode == -signal.SIGKILL


def test_a_slots_compile_cache_root_reaches_the_server_process(
    fake_python: str, vllm_argspec: ArgSpec, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SlotPool -> Slot -> replica env -> the launched process's VLLM_CACHE_ROOT (read from /proc), and the
    results folder's default yields to a VLLM_CACHE_ROOT the user set."""
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    root = vllm_cache_root(tmp_path / "results")
    assert root == (tmp_path / "results" / "vllm-cache").resolve()
    pool = SlotPool(cpu_sets=[(), ()], vllm_cache_root=str(root))
    with pool.acquire(0) as slot:
        (replica,) = replica_placement({}, slot)
        spec = ServerSpec(model="/models/tiny", python=fake_python, env=replica.env, log_path=tmp_path / "s.log")
        with Server(spec, vllm_argspec) as server:
            environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
            assert f"VLLM_CACHE_ROOT={root}".encode() in environ
    assert pool.cpu_host_slot().vllm_cache_root == str(root)  # a CPU host's confirmation shares it
    assert "VLLM_CACHE_ROOT" not in replica_placement({}, Slot())[0].env  # no root: vLLM's own default
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "mine"))
    assert vllm_cache_root(tmp_path / "results") == tmp_path / "mine"


def test_argv_carries_dash_values_as_values(fake_python: str, vllm_argspec: ArgSpec) -> None:
    """A random API key (or model, name) that begins with `-` is one `--flag=value` item, and is redacted."""
    server = Server(ServerSpec(model="-m", python=fake_python, served_model_name="-tiny", port=8000), vllm_argspec)
    server.api_key = "-Abc"
    argv = server.build_argv()
    assert argv[3:8] == ["--model=-m", "--host=127.0.0.1", "--port=8000", "--api-key=-Abc", "--served-model-name=-tiny"]
    server._argv = argv
    assert "--api-key=<redacted>" in server.argv and "-Abc" not in " ".join(server.argv)


def test_start_failure_is_classified_within_seconds(fake_python: str, vllm_argspec: ArgSpec, tmp_path: Path) -> None:
    spec = ServerSpec(model="m", python=fake_python, env={"FAKE_MODE": "oom"}, log_path=tmp_path / "oom.log")
    server = Server(spec, vllm_argspec)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as exc:
        with server:
            pass
    assert time.monotonic() - t0 < 10
    failure = exc.value.failure
    assert failure.kind == "oom" and "CUDA out of memory" in failure.message and failure.exit_code == 1
    assert exc.value.log_path == tmp_path / "oom.log"


def test_start_timeout_kills_the_group(fake_python: str, vllm_argspec: ArgSpec, tmp_path: Path) -> None:
    spec = ServerSpec(model="m", python=fake_python, env={"FAKE_MODE": "hang"}, start_timeout_s=1.5,
                      stop_timeout_s=1.0, log_path=tmp_path / "hang.log")  # fmt: skip
    server = Server(spec, vllm_argspec).start()
    pgid = server.pgid
    assert pgid is not None
    with pytest.raises(ServerStartError) as exc:
        server.wait_ready()
    assert exc.value.failure.kind == "start_timeout" and "not ready after 1.5 s" in exc.value.failure.message
    assert not group_pids(pgid)


def test_settings_checked_before_start(fake_python: str, vllm_argspec: ArgSpec) -> None:
    spec = ServerSpec(model="m", settings={"swap_space": 4}, python=fake_python, source="sweep.yaml")
    with pytest.raises(UserError, match="sweep.yaml: swap_space: unknown setting"):
        Server(spec, vllm_argspec).start()
    spec = ServerSpec(model="m", python=fake_python, extra_args=["--no-such-flag"])
    with pytest.raises(UserError, match="not accepted"):
        Server(spec, vllm_argspec).start()


def test_group_of_replicas(fake_python: str, vllm_argspec: ArgSpec, tmp_path: Path) -> None:
    specs = [
        ServerSpec(model="m", python=fake_python, gpus=gpus, log_path=tmp_path / f"r{i}.log", stop_timeout_s=2)
        for i, gpus in enumerate(gpu_sets(total_gpus=4, tp=2, replicas=2))
    ]
    with ServerGroup(specs, vllm_argspec) as group:
        ports = {s.port for s in group.servers}
        assert len(ports) == 2 and len(group.targets) == 2 and len(group.argv) == 2
        pgids = [s.pgid for s in group.servers]
        envs = [psutil.Process(s.pid).environ().get("CUDA_VISIBLE_DEVICES") for s in group.servers]
        assert envs == ["0,1", "2,3"]
    assert all(not group_pids(p) for p in pgids if p)


def test_a_group_whose_servers_start_in_turn_reports_the_whole_sequence_as_its_start_up(
        fake_python: str, vllm_argspec: ArgSpec, tmp_path: Path) -> None:
    """Servers sharing a GPU start one after another (deploy_together): the deployment's start-up is the GPU time
    until all serve, not one server's (three DialoGPT servers of ~85 s each held the H200 ~245 s before the first
    load step, and the study counted 85)."""
    group = ServerGroup([ServerSpec(model="m", python=fake_python, env={"FAKE_DELAY": "1.0"},
                                    log_path=tmp_path / f"s{i}.log", stop_timeout_s=2) for i in range(2)],
                        vllm_argspec)
    try:
        for server in group.servers:
            server.start()
            wait_all_ready([group])  # the started ones: the next starts once this one serves
        each = [s.startup_s or 0.0 for s in group.servers]
        assert min(each) >= 1.0
        assert group.startup_s is not None and group.startup_s >= sum(each) > max(each)
    finally:
        group.stop()


def test_groups_start_together_and_a_failure_stops_every_group(fake_python: str, vllm_argspec: ArgSpec,
                                                               tmp_path: Path) -> None:
    def group(name: str, env: dict[str, str], n: int = 1) -> ServerGroup:
        return ServerGroup([ServerSpec(model="m", python=fake_python, env=env, log_path=tmp_path / f"{name}{i}.log",
                                       stop_timeout_s=2) for i in range(n)], vllm_argspec)

    a, b = group("a", {"FAKE_DELAY": "1.5"}, 2), group("b", {"FAKE_DELAY": "1.5"})
    try:
        for g in (a, b):
            g.start()
        wait_all_ready([a, b])
        ready = {id(s): s._t_start + s.startup_s for g in (a, b) for s in g.servers}  # type: ignore[operator]
        starts = [s._t_start for g in (a, b) for s in g.servers]
        assert max(starts) < min(ready.values())  # every start-up began before any server was ready: overlapped
        assert a.startup_s and b.startup_s and a.startup_s >= 1.5 and b.startup_s >= 1.5
    finally:
        a.stop(), b.stop()

    slow, bad = group("slow", {"FAKE_MODE": "hang"}, 2), group("bad", {"FAKE_MODE": "oom"})
    for g in (slow, bad):
        g.start()
    pgids = [s.pgid for g in (slow, bad) for s in g.servers]
    with pytest.raises(ServerStartError) as exc:
        wait_all_ready([slow, bad])
    assert exc.value.failure.kind == "oom" and exc.value.index == 0
    assert all(not group_pids(p) for p in pgids if p)  # the hanging group was stopped with the failed one


def test_gpu_and_cpu_sets() -> None:
    assert gpu_sets(8, tp=2, replicas=4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert gpu_sets(4, tp=1, replicas=2, pp=2) == [[0, 1], [2, 3]]
    with pytest.raises(UserError, match="need 6 GPUs, only 4"):
        gpu_sets(4, tp=2, replicas=3)
    assert cpu_bind_sets(list(range(16)), 2) == ["0-7", "8-15"]
    assert cpu_bind_sets([0, 1, 2, 4, 5, 6], 1) == ["0-2,4-6"]


HARNESS_SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    sys.path.insert(0, {repo!r})
    from harness.launch.server import REAPER, Server, ServerSpec
    from harness.launch.vllm_args import load_argspec
    spec = ServerSpec(**json.loads(sys.argv[1]))
    server = Server(spec, load_argspec())  # this python's vLLM (the fake python has none)
    server.start()
    server.wait_ready()
    print(json.dumps({{"pgid": server.pgid, "pids": server.process_pids(), "reaper": REAPER.pid,
                      "startup_s": server.startup_s}}), flush=True)
    time.sleep(3600)
    """
)


def _sigkill_harness_and_check(spec_kwargs: dict, timeout_s: float) -> dict:
    """Run a harness in a subprocess that starts a server and waits; SIGKILL it once the server is ready;
    return the server info after checking that the whole group is gone."""
    script = HARNESS_SCRIPT.format(repo=str(REPO))
    harness = subprocess.Popen(
        [sys.executable, "-c", script, json.dumps(spec_kwargs)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert harness.stdout is not None
        line = harness.stdout.readline()
        assert line, "harness exited before the server was ready"
        info = json.loads(line)
        assert group_pids(info["pgid"])
        os.kill(harness.pid, signal.SIGKILL)
        harness.wait()
        t0 = time.monotonic()
        assert _gone(info["pgid"], timeout_s), f"left behind: {group_pids(info['pgid'])}"
        info["cleanup_s"] = time.monotonic() - t0
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                       for p in info["pids"])  # fmt: skip
        assert _gone_pid(info["reaper"], 15)  # the reaper exits after its work
        return info
    finally:
        if harness.poll() is None:
            harness.kill()


def _gone_pid(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def test_sigkilled_harness_leaves_no_server_fake(fake_python: str, tmp_path: Path, vllm_argspec: ArgSpec) -> None:
    # The fake's child ignores SIGTERM: the reaper must escalate to SIGKILL.
    _sigkill_harness_and_check(
        {"model": "m", "python": fake_python, "log_path": str(tmp_path / "k.log")}, timeout_s=10
    )


def test_reaper_restarts_if_it_died() -> None:
    REAPER.add(999_999)  # a pgid that does not exist: harmless
    pid = REAPER.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    _gone_pid(pid, 5)
    REAPER.remove(999_999)  # the write fails, the reaper is restarted and gets the line
    assert REAPER.pid != pid and psutil.pid_exists(REAPER.pid)


# ---------------------------------------------------------------------------------------------- slow (real vLLM CPU)

CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}  # 1 GiB of KV cache: low memory, and ~524k tokens for the tiny model
BASE = {"enforce_eager": True, "max_model_len": 512}


def _post(server: Server, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        server.base_url + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_server_ready_capacity_metrics_and_stop(tiny_model: Path, tmp_path: Path) -> None:
    from harness.measure.sampler import ResourceSampler
    from harness.measure.vllm_metrics import MetricsScraper, kv_capacity_from_log

    # the served name and the random API key begin with `-`, as one key in ~64 from secrets.token_urlsafe does
    spec = ServerSpec(model=str(tiny_model), settings={**BASE, "max_num_seqs": 8}, env=CPU_ENV,
                      log_path=tmp_path / "vllm.log", served_model_name="-tiny")  # fmt: skip
    server = Server(spec)
    server.api_key = "-" + server.api_key
    with server:
        with urllib.request.urlopen(server.base_url + "/health", timeout=5) as resp:
            assert resp.status == 200
        with pytest.raises(urllib.error.HTTPError) as denied:  # the random key is required
            urllib.request.urlopen(server.base_url + "/v1/models", timeout=5)
        assert denied.value.code == 401

        cap = kv_capacity_from_log(server.read_log())
        assert cap.device == "CPU" and cap.kv_cache_tokens == 1024**3 // (4 * 2 * 2 * 64 * 2)  # 1 GiB / 2 KiB
        assert cap.max_concurrency_len == 512 and cap.max_concurrency == pytest.approx(cap.kv_cache_tokens / 512)

        with ResourceSampler([server.pid], period_s=0.2) as sampler, MetricsScraper(
            [(server.base_url, server.api_key)], period_s=0.2
        ) as scraper:
            chat = _post(server, "/v1/chat/completions",
                         {"model": "-tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8})  # fmt: skip
            assert chat["usage"]["completion_tokens"] == 8
            comp = _post(server, "/v1/completions", {"model": "-tiny", "prompt": "the model", "max_tokens": 8})
            assert comp["usage"]["prompt_tokens"] == 3  # BOS + 2 tokens
            # the launcher's measurement switch: usage says how many prompt tokens the prefix cache served
            long = {"model": "-tiny", "prompt": " ".join(["the model"] * 60), "max_tokens": 2}
            cached = [_post(server, "/v1/completions", long)["usage"]["prompt_tokens_details"]["cached_tokens"]
                      for _ in range(2)]
            assert isinstance(cached[0], int) and cached[1] >= cached[0]
        stats = scraper.result()
        usage = sampler.result()
        assert stats.kv_cache_tokens == cap.kv_cache_tokens and stats.kv_cache_blocks == 4096
        assert stats.preemptions == 0 and stats.peak_kv_usage is not None
        assert usage.rss_peak_mib is not None and usage.rss_peak_mib > 1024  # 1 GiB KV cache + 3 processes
        pgid = server.pgid
        assert pgid is not None and len(group_pids(pgid)) >= 2  # API server + engine core (+ worker)
    assert not group_pids(pgid)
    assert server.stop_s is not None and server.stop_s < spec.stop_timeout_s
    print(f"\nreal vLLM CPU: startup {server.startup_s:.1f} s, stop {server.stop_s:.1f} s, "
          f"rss peak {usage.rss_peak_mib:.0f} MiB")  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_bad_setting_fails_fast_as_bad_arg(tiny_model: Path, tmp_path: Path) -> None:
    # Passes the parser check (an int), rejected by vLLM's config validation: the model allows 2048.
    spec = ServerSpec(model=str(tiny_model), settings={**BASE, "max_model_len": 4096}, env=CPU_ENV,
                      log_path=tmp_path / "bad.log", start_timeout_s=600)  # fmt: skip
    server = Server(spec).start()
    pgid = server.pgid
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as exc:
        server.wait_ready()
    elapsed = time.monotonic() - t0
    failure = exc.value.failure
    assert failure.kind == "bad_arg", failure
    assert "User-specified max_model_len (4096) is greater than the derived max_model_len" in failure.message
    assert elapsed < 300  # as soon as the process exits (vLLM's import is most of it), not the 600 s timeout
    assert pgid is not None and not group_pids(pgid)
    print(f"\nbad_arg detected after {elapsed:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_kv_cache_too_small(tiny_model: Path, tmp_path: Path) -> None:
    # 1 MB of KV cache cannot hold one 2048-token sequence (2 KiB per token): vLLM says what would fit.
    settings = {"enforce_eager": True, "max_model_len": 2048, "kv_cache_memory_bytes": 1_000_000}
    spec = ServerSpec(model=str(tiny_model), settings=settings, log_path=tmp_path / "kv.log",
                      env={"VLLM_CPU_KVCACHE_SPACE": None})  # the env var would override the setting  # fmt: skip
    server = Server(spec).start()
    with pytest.raises(ServerStartError) as exc:
        server.wait_ready()
    failure = exc.value.failure
    assert failure.kind == "kv_too_small", failure
    assert failure.max_fitting_len is not None and 0 < failure.max_fitting_len < 2048
    assert server.pgid is not None and not group_pids(server.pgid)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_real_sigkilled_harness_leaves_no_vllm_process(tiny_model: Path, tmp_path: Path) -> None:
    info = _sigkill_harness_and_check(
        {"model": str(tiny_model), "settings": BASE, "env": CPU_ENV, "log_path": str(tmp_path / "orphan.log")},
        timeout_s=20,
    )
    assert len(info["pids"]) >= 2  # the API server and its engine core were both up
    print(f"\nafter SIGKILL of the harness, the vLLM group was gone in {info['cleanup_s']:.1f} s")
