"""One vLLM OpenAI-compatible server as a child process: start, wait until ready, classify failures, tear down.

Every server runs in its own process group (vLLM's engine core and workers are further children in that group),
binds 127.0.0.1 on a free port and requires a random API key. Three layers make sure no server outlives the
harness: `stop()` (context manager exit, and an atexit hook), PR_SET_PDEATHSIG=SIGKILL on the direct child, and
the reaper process (`harness.launch.reaper`) that kills every registered process group when the harness dies,
even by SIGKILL.

The argv is built as a list from the settings through the installed vLLM's own parser (`vllm_args`); it is
never a shell string.
"""

from __future__ import annotations

import atexit
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import psutil

from harness.errors import UserError
from harness.launch.failures import classify
from harness.launch.vllm_args import ArgSpec, load_argspec, option
from harness.nvml import nvml
from harness.records import Failure

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"  # works on vLLM 0.26 (GPU) and 0.32 (CPU build)
POLL_S = 0.5
_HARNESS_ROOT = Path(__file__).resolve().parents[2]


MEASUREMENT_SWITCH = "enable_prompt_tokens_details"


class ServerStartError(Exception):
    """The server did not become ready; `failure` says why (kind, message, log tail)."""

    def __init__(self, failure: Failure, log_path: Path | None = None, index: int | None = None) -> None:
        where = f"server {index}: " if index is not None else ""
        super().__init__(f"{where}{failure.kind}: {failure.message}")
        self.failure = failure
        self.log_path = log_path
        self.index = index


@dataclass
class ServerSpec:
    """Everything needed to start one server; `settings` uses the user's key names (vLLM dests + harness keys)."""

    model: str  # local directory or hub name, passed to vLLM as-is
    settings: dict[str, Any] = field(default_factory=dict)
    python: str = sys.executable  # the python whose vLLM serves (may be another venv)
    host: str = "127.0.0.1"
    port: int | None = None  # None: a free port
    env: dict[str, str | None] = field(default_factory=dict)  # overrides; None removes a variable
    gpus: list[int] | None = None  # sets CUDA_VISIBLE_DEVICES (and the GPUs watched for memory release)
    cpu_cores: tuple[int, ...] = ()  # CPU host: pin the server's processes to these cores (empty: not pinned)
    log_path: Path | None = None  # None: a file under the temp dir
    start_timeout_s: float = 900.0
    stop_timeout_s: float = 30.0  # SIGTERM -> SIGKILL
    gpu_release_timeout_s: float = 60.0
    served_model_name: str | None = None
    extra_args: list[str] = field(default_factory=list)  # flags the harness fixes; checked against the parser
    source: str | None = None  # where the settings came from, for error messages


# ---------------------------------------------------------------------------------------------- reaper


class _Reaper:
    """The per-harness-process watchdog (see harness.launch.reaper): started lazily, restarted if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None

    def _ensure(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_HARNESS_ROOT), env.get("PYTHONPATH", "")) if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "harness.launch.reaper"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # Ctrl-C and group signals to the harness do not reach it
            close_fds=True,
        )
        return self._proc

    def _send(self, line: str) -> None:
        with self._lock:
            for _ in range(2):
                proc = self._ensure()
                try:
                    assert proc.stdin is not None
                    proc.stdin.write(line.encode() + b"\n")
                    proc.stdin.flush()
                    return
                except (BrokenPipeError, OSError):
                    self._proc = None

    def add(self, pgid: int) -> None:
        self._send(f"add {pgid}")

    def remove(self, pgid: int) -> None:
        self._send(f"del {pgid}")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


REAPER = _Reaper()
_LIVE: weakref.WeakSet[Server] = weakref.WeakSet()


# Set by stop_all: no server starts after it in this process (a trial thread that was waiting for GPUs when Ctrl-C
# came would otherwise start one once the others' GPUs are freed, and keep the process alive for its start-up).
_STOPPED = threading.Event()
_START_LOCK = threading.Lock()


@atexit.register
def stop_all() -> None:
    """Stop every server this process started, in parallel (Ctrl-C, SIGTERM, interpreter exit); start no more."""
    with _START_LOCK:
        _STOPPED.set()
        live = list(_LIVE)
    if not live:
        return

    def stop(server: Server) -> None:
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort on the way out; the reaper covers the rest
            pass

    with ThreadPoolExecutor(max_workers=len(live)) as pool:
        list(pool.map(stop, live))


# ---------------------------------------------------------------------------------------------- helpers

_PORTS_HANDED_OUT: set[int] = set()
_PORT_LOCK = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A port that is free now and not handed out before by this process (replicas start side by side)."""
    with _PORT_LOCK:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
            if port not in _PORTS_HANDED_OUT:
                _PORTS_HANDED_OUT.add(port)
                return port
    raise RuntimeError("no free port found")


# Runs in the child between fork and vLLM: set PR_SET_PDEATHSIG=SIGKILL (Linux), check the harness did not die
# in between, then exec vLLM in the same process. A separate tiny python instead of Popen's preexec_fn, which is
# unsafe in a threaded harness. PDEATHSIG survives exec and fires when the launching *thread* exits.
# argv[3]: the cores to pin the server to ('' for none, else '1,2'); the affinity is inherited by every process vLLM
# starts (API server, engine core, CPU worker).
_EXEC_WRAPPER = (
    "import os, signal, sys\n"
    "if sys.argv[1] == '1' and sys.platform.startswith('linux'):\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)\n"
    "    if os.getppid() != int(sys.argv[2]):\n"
    "        os._exit(70)\n"
    "if sys.argv[3]:\n"
    "    os.sched_setaffinity(0, [int(c) for c in sys.argv[3].split(',')])\n"
    "os.execv(sys.argv[4], sys.argv[4:])\n"
)


def group_pids(pgid: int) -> set[int]:
    """Live (non-zombie) processes in process group `pgid`."""
    pids = set()
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getpgid(proc.pid) == pgid:
                pids.add(proc.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return pids


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.add(pid)
        except psutil.Error:
            continue
    return out


# ---------------------------------------------------------------------------------------------- server


class _Running:
    """`with X(...) as x:` starts, waits until ready, and stops on exit or on a failed start (Server, ServerGroup)."""

    def start(self) -> Any:
        raise NotImplementedError

    def wait_ready(self) -> Any:
        raise NotImplementedError

    def stop(self) -> Any:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Server(_Running):
    """One vLLM server process (context manager: start + wait_ready on enter, stop on exit)."""

    def __init__(self, spec: ServerSpec, argspec: ArgSpec | None = None) -> None:
        self.spec = spec
        self._argspec = argspec
        self.api_key = secrets.token_urlsafe(24)
        self.port: int | None = spec.port
        self.proc: subprocess.Popen[bytes] | None = None
        self.pgid: int | None = None
        self.startup_s: float | None = None
        self.launched_at: float | None = None  # epoch seconds of the launch: vLLM's log timestamps are wall clock
        self.stop_s: float | None = None
        self.ready = False
        self.failure: Failure | None = None
        self._argv: list[str] = []
        self._t_start: float | None = None
        self._log_fh: Any = None
        self._stopped = False
        self._gpu_baseline: dict[int, float] = {}
        self._seen_pids: set[int] = set()
        self._port_retries = 2
        self.log_path = Path(spec.log_path) if spec.log_path else self._default_log_path()

    # ---- properties

    @property
    def argspec(self) -> ArgSpec:
        if self._argspec is None:
            self._argspec = load_argspec(self.spec.python)
        return self._argspec

    @property
    def base_url(self) -> str:
        return f"http://{self.spec.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    @property
    def argv(self) -> list[str]:
        """The argv the server was started with, API key redacted (for records)."""
        out = list(self._argv)
        for i, arg in enumerate(out):
            if arg.startswith("--api-key="):
                out[i] = "--api-key=<redacted>"
        return out

    @property
    def gpus(self) -> list[int]:
        return list(self.spec.gpus or [])

    def _default_log_path(self) -> Path:
        d = Path(tempfile.gettempdir()) / "vllm-tune-logs"
        d.mkdir(parents=True, exist_ok=True)
        return d / f"server-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}.log"

    # ---- argv / env

    def build_argv(self) -> list[str]:
        """[python, -m, api_server, --model=M, --host=, --port=, --api-key=, ...settings]; settings checked first."""
        spec = self.spec
        settings = dict(spec.settings)
        model_name = settings.pop("model_name", None)
        if model_name is not None and str(model_name) != str(spec.model):
            raise UserError(f"model_name '{model_name}' differs from the server's model '{spec.model}'",
                            source=spec.source, key="model_name")  # fmt: skip
        self.argspec.check(settings, source=spec.source)
        settings = self.argspec.server_settings(settings)  # servers_per_gpu: this server's share of the GPU
        for arg in spec.extra_args:
            if arg.startswith("-") and self.argspec.dest_for_flag(arg) is None:
                raise UserError(f"extra argument '{arg}' is not accepted by vLLM {self.argspec.vllm_version}")
        if self.port is None:
            self.port = free_port(spec.host)
        argv = [spec.python, "-m", API_SERVER_MODULE, option("--model", spec.model), option("--host", spec.host),
                option("--port", self.port), option("--api-key", self.api_key)]  # fmt: skip
        if spec.served_model_name and "served_model_name" not in settings:
            argv.append(option("--served-model-name", spec.served_model_name))
        argv += self.argspec.to_argv(settings)
        # a measurement switch, not a tuning one: each response's usage then says how many prompt tokens came from
        # the prefix cache (RequestResult.cached_tokens); it changes nothing in scheduling or memory
        if MEASUREMENT_SWITCH in self.argspec.args and MEASUREMENT_SWITCH not in settings:
            argv.append(self.argspec.args[MEASUREMENT_SWITCH].flag)
        argv += list(spec.extra_args)
        return argv

    def build_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
        if Path(self.spec.model).is_dir():
            env.setdefault("HF_HUB_OFFLINE", "1")  # a local model needs no hub; do not wait on network timeouts
        if self.spec.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.spec.gpus)
            env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA indices = NVML indices
        for key, value in self.spec.env.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = str(value)
        return env

    # ---- lifecycle

    def start(self) -> Server:
        """Launch the process (returns at once; `wait_ready` waits). Call it from a thread that outlives the
        server: PR_SET_PDEATHSIG fires when the launching *thread* exits, so it is set only from the main thread
        (the reaper covers every case)."""
        if self.proc is not None:
            raise RuntimeError("server already started")
        self._argv = self.build_argv()
        self._gpu_baseline = _nvml_memory_used(self.gpus)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        pdeathsig = threading.current_thread() is threading.main_thread()
        wrapper = [sys.executable, "-I", "-S", "-c", _EXEC_WRAPPER, "1" if pdeathsig else "0", str(os.getpid()),
                   ",".join(str(c) for c in self.spec.cpu_cores)]
        with _START_LOCK:  # stop_all either sees this server or this start sees stop_all's flag
            if _STOPPED.is_set():
                raise ServerStartError(Failure("interrupted", "not started: this process is stopping its servers"))
            self._log_fh = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
            self._t_start = time.monotonic()
            self.launched_at = time.time()
            self.proc = subprocess.Popen(
                wrapper + self._argv,
                stdin=subprocess.DEVNULL,
                stdout=self._log_fh,
                stderr=subprocess.STDOUT,
                env=self.build_env(),
                cwd=str(self.log_path.parent),
                start_new_session=True,  # own session and process group: pgid == pid
                close_fds=True,
            )
            self.pgid = self.proc.pid
            REAPER.add(self.pgid)
            _LIVE.add(self)
        return self

    def check_ready(self) -> bool:
        """One poll: True when /health answers 200; raises ServerStartError (after teardown) if the process
        exited or the start timeout passed."""
        if self.ready:
            return True
        if self.proc is None or self._t_start is None:
            raise RuntimeError("server not started")
        code = self.proc.poll()
        if code is not None:
            if self._port_retries > 0 and self.spec.port is None and "address already in use" in self.read_log().lower():
                self._port_retries -= 1  # another process took the free port between our check and vLLM's bind
                self._relaunch()
                return False
            self._fail(code, timed_out=False)
        if self._health_ok():
            self.ready = True
            self.startup_s = time.monotonic() - self._t_start
            return True
        if time.monotonic() - self._t_start > self.spec.start_timeout_s:
            self._fail(None, timed_out=True)
        return False

    def wait_ready(self) -> float:
        """Block until /health is 200 (returns startup seconds); polls the process too, so a failed start is
        reported within a second of the process exiting, classified from its log."""
        while not self.check_ready():
            time.sleep(POLL_S)
        assert self.startup_s is not None
        return self.startup_s

    def _relaunch(self) -> None:
        self.stop()
        self.proc, self.pgid, self._stopped, self.port, self.stop_s = None, None, False, None, None
        self.start()

    def _health_ok(self) -> bool:
        try:
            with urllib.request.urlopen(self.base_url + "/health", timeout=2.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError, TimeoutError):
            return False

    def _fail(self, exit_code: int | None, timed_out: bool) -> None:
        self.stop()
        self.failure = classify(self.read_log(), None if timed_out else exit_code, timed_out)
        if self.failure.kind == "start_timeout":
            self.failure.message = f"not ready after {self.spec.start_timeout_s:g} s ({self.failure.message})"
        raise ServerStartError(self.failure, self.log_path)

    def stop(self) -> float:
        """SIGTERM the process group, SIGKILL after `stop_timeout_s`, wait until no process of the group (or
        descendant) remains and, on GPUs, until NVML shows the memory released. Returns the seconds it took."""
        if self.proc is None or self._stopped:
            return self.stop_s or 0.0
        self._stopped = True
        t0 = time.monotonic()
        pgid = self.pgid
        assert pgid is not None
        pids = self._tree_pids()
        self._signal(pgid, pids, signal.SIGTERM)
        deadline = t0 + self.spec.stop_timeout_s
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        pids |= self._tree_pids()
        while _alive(pids) | group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _alive(pids) | group_pids(pgid)
        if left:
            self._signal(pgid, left, signal.SIGKILL)
            hard = time.monotonic() + 15.0
            while (_alive(left) | group_pids(pgid)) and time.monotonic() < hard:
                time.sleep(0.1)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILLed above
            pass
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None
        REAPER.remove(pgid)
        _LIVE.discard(self)
        if self.gpus:
            _wait_gpu_release(self.gpus, pids | self._seen_pids, self._gpu_baseline, self.spec.gpu_release_timeout_s)
        self.stop_s = time.monotonic() - t0
        return self.stop_s

    def _tree_pids(self) -> set[int]:
        """The server, its descendants (even if they left the group) and everything in its group."""
        pids: set[int] = set()
        if self.proc is not None:
            try:
                root = psutil.Process(self.proc.pid)
                pids.add(root.pid)
                pids |= {c.pid for c in root.children(recursive=True)}
            except psutil.Error:
                pass
        if self.pgid is not None:
            pids |= group_pids(self.pgid)
        self._seen_pids |= pids
        return pids

    @staticmethod
    def _signal(pgid: int, pids: set[int], sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in pids:
            try:
                if os.getpgid(pid) != pgid:  # a descendant that moved to its own group
                    os.kill(pid, sig)
            except (ProcessLookupError, PermissionError, OSError):
                continue

    def process_pids(self) -> list[int]:
        """The server process and all its descendants now (for RSS sampling)."""
        return sorted(self._tree_pids())

    # ---- log

    def read_log(self, tail_lines: int | None = None) -> str:
        """The server's combined stdout/stderr so far (optionally the last `tail_lines` lines)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        if tail_lines is not None:
            text = "\n".join(text.splitlines()[-tail_lines:])
        return text

    def __repr__(self) -> str:
        return f"Server(model={self.spec.model!r}, url={self.base_url}, pid={self.pid}, ready={self.ready})"


class ServerGroup(_Running):
    """N servers (replicas, and servers sharing a GPU) started side by side, each on its own port, stopped together
    (`harness.deploy.deploy_together` starts servers that share a GPU one after another)."""

    def __init__(self, specs: list[ServerSpec], argspec: ArgSpec | None = None) -> None:
        if not specs:
            raise ValueError("ServerGroup needs at least one ServerSpec")
        argspec = argspec or load_argspec(specs[0].python)
        self.servers = [Server(spec, argspec if spec.python == specs[0].python else None) for spec in specs]
        self.startup_s: float | None = None

    def start(self) -> ServerGroup:
        """Launch all (from this thread: see Server.start); on any launch error stop the ones started."""
        try:
            for server in self.servers:
                server.start()
        except BaseException:
            self.stop()
            raise
        return self

    def wall_startup_s(self) -> float:
        """From the first server's launch until the last one was ready: the slowest server's start-up for servers
        launched together, the whole sequence for servers sharing a GPU, which start one after another (each
        server's own start-up counts from its launch; three DialoGPT servers of at most 85 s each took 242 s together).
        Servers not started or not ready yet are left out (0 when none is)."""
        done = [(s._t_start, s._t_start + s.startup_s) for s in self.servers
                if s._t_start is not None and s.startup_s is not None]
        return max(end for _, end in done) - min(start for start, _ in done) if done else 0.0

    def wait_ready(self) -> float:
        """Until every server is ready (returns the group's start-up, `wall_startup_s`); the first failure stops
        all and raises ServerStartError with that server's index."""
        wait_all_ready([self])
        return self.startup_s or 0.0

    def stop(self) -> float:
        """Stop all servers in parallel; returns the wall seconds."""
        t0 = time.monotonic()
        started = [s for s in self.servers if s.proc is not None]
        if started:
            with ThreadPoolExecutor(max_workers=len(started)) as pool:
                list(pool.map(lambda s: s.stop(), started))
        return time.monotonic() - t0

    @property
    def targets(self) -> list[tuple[str, str]]:
        """(base_url, api_key) per replica, for the load client and the metrics scraper."""
        return [(s.base_url, s.api_key) for s in self.servers]

    @property
    def argv(self) -> list[list[str]]:
        return [s.argv for s in self.servers]


def wait_all_ready(groups: list[ServerGroup], gpus: set[int] | None = None) -> None:
    """Until every started server of the groups is ready (with `gpus`: those on any of them), so that their
    start-ups overlap; the first failure stops every group and raises ServerStartError with that server's index
    in its group."""
    pending = [(g, i) for g in groups for i in range(len(g.servers)) if g.servers[i].proc is not None
               and (gpus is None or gpus & set(g.servers[i].gpus or []))]
    while pending:
        for g, i in list(pending):
            try:
                if g.servers[i].check_ready():
                    pending.remove((g, i))
            except ServerStartError as exc:
                stop_groups(groups)
                raise ServerStartError(exc.failure, exc.log_path, index=i) from exc
        if pending:
            time.sleep(POLL_S)
    for g in groups:
        g.startup_s = g.wall_startup_s()


def stop_groups(groups: list[ServerGroup]) -> None:
    """Stop several groups at once: each teardown waits for its GPUs' memory to be released."""
    if len(groups) == 1:
        groups[0].stop()
    elif groups:
        with ThreadPoolExecutor(max_workers=len(groups)) as pool:
            list(pool.map(lambda g: g.stop(), groups))


# ---------------------------------------------------------------------------------------------- NVML


def _nvml_memory_used(gpus: list[int]) -> dict[int, float]:
    """MiB used per GPU index now; empty without NVML."""
    if not gpus:
        return {}
    nv = nvml()
    if nv is None:
        return {}
    out = {}
    for idx in gpus:
        try:
            out[idx] = nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(idx)).used / 2**20
        except Exception:  # noqa: BLE001
            continue
    return out


def _wait_gpu_release(gpus: list[int], pids: set[int], baseline: dict[int, float], timeout_s: float) -> bool:
    """Wait until no server pid holds a context on `gpus` and memory is back near the pre-start level.

    The next configuration's server must not start while the driver still holds this one's memory, or it
    would see less free memory and size its KV cache differently. Bounded; returns whether it was released.
    """
    nv = nvml()
    if nv is None:
        return True
    deadline = time.monotonic() + timeout_s
    slack_mib = 512.0
    while True:
        busy = False
        for idx in gpus:
            try:
                handle = nv.nvmlDeviceGetHandleByIndex(idx)
                procs = nv.nvmlDeviceGetComputeRunningProcesses(handle)
                if any(p.pid in pids for p in procs):
                    busy = True
                used = nv.nvmlDeviceGetMemoryInfo(handle).used / 2**20
                if idx in baseline and used > baseline[idx] + slack_mib:
                    busy = True
            except Exception:  # noqa: BLE001
                continue
        if not busy:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.25)
