"""Where a server's start-up went: vLLM's start-up log -> `StartupPhases`.

GPU start-ups take minutes (weights, torch.compile, CUDA graph capture, KV-cache profiling), which is most of what a
trial costs; this says which part, and whether vLLM's compile cache was hit. The messages parsed are the same in
vLLM 0.26 (GPU) and 0.32 (CPU build); where their wording differs both forms are accepted, and every line is
optional: a phase the log does not state stays None.

Durations vLLM prints are taken as printed. Each worker (TP/PP rank) prints its own; within one process the lines
add up (several compiled modules), across processes the slowest counts (they run side by side). Two phases come
from the log's timestamps (`MM-DD HH:MM:SS`, local time, one-second resolution) and the launch time.
"""

from __future__ import annotations

import datetime as _dt
import re
from collections import defaultdict

from harness.records import STARTUP_PHASES, StartupPhases

# "(EngineCore_DP0 pid=2482) INFO 12-01 10:13:02 [core.py:133] ..." (the process prefix is absent in the API
# server's own lines of some versions)
_LINE = re.compile(r"^(?:\((?P<proc>[^)]*)\)\s+)?(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+"
                   r"(?P<ts>\d\d-\d\d \d\d:\d\d:\d\d)\s+(?P<msg>.*)$")
_ENGINE_START = re.compile(r"Initializing an? (?:V1 )?LLM engine")
# v1/worker/gpu_model_runner.py "Model loading took %s GiB memory and %.6f seconds" (v1/worker/gpu/model_runner.py
# in 0.26: "... GiB and %.6f seconds"); model_loader/default_loader.py "Loading weights took %.2f seconds" (the
# only one the CPU build prints)
_MODEL_LOADING = re.compile(r"Model loading took [\d.]+ GiB(?: memory)? and ([\d.]+) seconds")
_WEIGHTS = re.compile(r"Loading weights took ([\d.]+) seconds")
# compilation/monitor.py "torch.compile took %.2f s in total" (older releases: "takes"; without AOT compilation:
# "torch.compile and initial profiling/warmup run together took"), with a "[backbone] " tag in 0.32
_COMPILE = re.compile(r"torch\.compile (?:and initial profiling/warmup run together )?(?:took|takes) ([\d.]+) s "
                      r"in total")
_DYNAMO = re.compile(r"Dynamo bytecode transform time: ([\d.]+) s")
# the CPU build's runner brackets its compilation warm-up (v1/worker/cpu_model_runner.py)
_CPU_WARMUP_START = re.compile(r"Warming up model for the compilation")
_CPU_WARMUP_DONE = re.compile(r"Warming up done")
_GRAPHS = re.compile(r"Graph capturing finished in ([\d.]+) secs")
# v1/engine/core.py "init engine (profile, create kv cache, warmup model) took %.2f s[ (compilation: ...)]"
# (older releases: "%.2f seconds")
_ENGINE_INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([\d.]+) (?:s|seconds)\b")
# compile cache (compilation/backends.py, compilation/decorators.py)
_CACHE_LOADED = re.compile(r"Directly load the compiled graph\(s\) for|Directly load AOT compilation from")
_CACHE_COMPILED = re.compile(r"Compiling a graph for (?:compile range|dynamic shape)|saved AOT compiled function")
_CACHE_LOAD_FAILED = re.compile(r"Compiling model again due to a load failure")
_CACHE_OFF = re.compile(r"torch\.compile cache is disabled")
# the hash directory: torch_aot_compile/<sha256> (AOT compilation, named on a hit and on a miss alike), else the
# backend's torch_compile_cache/<10 hex> ("Using cache directory: ..."; not printed on an AOT hit)
_AOT_KEY = re.compile(r"torch_compile_cache/torch_aot_compile/([0-9a-f]{16,64})")
_BACKEND_KEY = re.compile(r"torch_compile_cache/([0-9a-f]{10})/")
KEY_CHARS = 16  # enough to tell two keys apart in a table


def _epoch(stamp: str, launched_at: float) -> float:
    """`MM-DD HH:MM:SS` (local time, no year) -> epoch seconds, the year taken from the launch (New Year safe)."""
    launch = _dt.datetime.fromtimestamp(launched_at)
    when = _dt.datetime.strptime(f"{launch.year}-{stamp}", "%Y-%m-%d %H:%M:%S")
    if when < launch - _dt.timedelta(days=180):
        when = when.replace(year=launch.year + 1)
    return when.timestamp()


def _slowest_process(found: dict[str, float]) -> float | None:
    return round(max(found.values()), 3) if found else None


def startup_phases(log_text: str, *, launched_at: float | None = None, total_s: float | None = None) -> StartupPhases:
    """Parse one server's log. `launched_at`: epoch seconds of the launch (`Server.launched_at`); `total_s`: the
    harness's start-up seconds (launch -> /health 200). Without them the timestamp phases stay None."""
    per_proc: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    warmup_start: dict[str, str] = {}
    engine_start = engine_done = None
    loaded = compiled = load_failed = 0
    cache_off = False
    aot_key = backend_key = None
    for line in log_text.splitlines():
        m = _LINE.match(line.strip())
        if m is None:
            continue
        proc, stamp, msg = m.group("proc") or "", m.group("ts"), m.group("msg")
        for name, pattern in (("model_loading", _MODEL_LOADING), ("weights", _WEIGHTS), ("compile", _COMPILE),
                              ("dynamo", _DYNAMO), ("graphs", _GRAPHS), ("engine_init", _ENGINE_INIT)):
            found = pattern.search(msg)
            if found:
                per_proc[name][proc] += float(found.group(1))
                if name == "engine_init":
                    engine_done = stamp
        if _CPU_WARMUP_START.search(msg):
            warmup_start[proc] = stamp
        elif _CPU_WARMUP_DONE.search(msg) and proc in warmup_start and launched_at is not None:
            seconds = _epoch(stamp, launched_at) - _epoch(warmup_start.pop(proc), launched_at)
            per_proc["cpu_warmup"][proc] += max(seconds, 0.0)
        if engine_start is None and _ENGINE_START.search(msg):
            engine_start = stamp
        loaded += bool(_CACHE_LOADED.search(msg))
        compiled += bool(_CACHE_COMPILED.search(msg))
        load_failed += bool(_CACHE_LOAD_FAILED.search(msg))
        cache_off = cache_off or bool(_CACHE_OFF.search(msg))
        aot_key = aot_key or ((k := _AOT_KEY.search(msg)) and k.group(1)[:KEY_CHARS])
        backend_key = backend_key or ((k := _BACKEND_KEY.search(msg)) and k.group(1))

    ph = StartupPhases(total_s=round(total_s, 3) if total_s is not None else None)
    ph.weights_s = _slowest_process(per_proc["model_loading"]) or _slowest_process(per_proc["weights"])
    ph.compile_s = _slowest_process(per_proc["compile"])
    if ph.compile_s is None:
        ph.compile_s = _slowest_process(per_proc["cpu_warmup"])
    ph.dynamo_s = _slowest_process(per_proc["dynamo"])
    ph.cuda_graphs_s = _slowest_process(per_proc["graphs"])
    ph.engine_init_s = _slowest_process(per_proc["engine_init"])
    if ph.engine_init_s is not None:
        ph.kv_profile_s = round(max(ph.engine_init_s - (ph.compile_s or 0.0) - (ph.cuda_graphs_s or 0.0), 0.0), 3)
    if launched_at is not None and engine_start is not None:
        ph.python_s = round(max(_epoch(engine_start, launched_at) - launched_at, 0.0), 1)
    if launched_at is not None and total_s is not None and engine_done is not None:
        ph.api_s = round(max(launched_at + total_s - _epoch(engine_done, launched_at), 0.0), 1)
    if total_s is not None:
        known = sum(getattr(ph, name) or 0.0 for name in STARTUP_PHASES if name != "other_s")
        ph.other_s = round(max(total_s - known, 0.0), 1)
    ph.compile_cache = _cache_state(loaded, compiled, load_failed, cache_off)
    ph.compile_cache_key = aot_key or backend_key or None
    return ph


def _cache_state(loaded: int, compiled: int, load_failed: int, off: bool) -> str | None:
    if off:
        return "off"
    if load_failed:
        return "load_failed"  # an entry was there but could not be loaded: compiled again, a miss in time
    if loaded and compiled:
        return "partial"
    if loaded:
        return "hit"
    if compiled:
        return "miss"
    return None
