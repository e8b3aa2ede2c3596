"""Start-up phases and compile-cache state from vLLM's start-up log.

The vLLM 0.32 (CPU build) fixtures are trimmed logs of real servers of the tiny model; the vLLM 0.26 (GPU) ones are
written from the exact format strings of its source (their headers say so). Each header carries the launch time and
the harness's start-up seconds, as `Server.launched_at` / `startup_s` would give them.
"""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from harness.measure.startup import startup_phases
from harness.measure.vllm_metrics import merge_stats, server_stats_from_log
from harness.records import STARTUP_PHASES, RunRecord, ServerStats, StartupPhases, from_dict, to_dict

DATA = Path(__file__).parent / "data"
_HEADER = re.compile(r"# launched (\d\d-\d\d \d\d:\d\d:\d\d\.\d+) local time.*total_s=([\d.]+)")


def _fixture(name: str) -> tuple[str, float, float]:
    """(log text, launched_at as epoch seconds in local time, total_s)."""
    text = (DATA / name).read_text()
    m = _HEADER.search(text)
    assert m is not None, name
    launched = dt.datetime.strptime(f"2026-{m.group(1)}", "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return text, launched, float(m.group(2))


def _parse(name: str) -> StartupPhases:
    text, launched, total = _fixture(name)
    return startup_phases(text, launched_at=launched, total_s=total)


def _partitions(ph: StartupPhases) -> None:
    parts = sum(getattr(ph, name) or 0.0 for name in STARTUP_PHASES)
    assert ph.total_s is not None and parts == pytest.approx(ph.total_s, abs=0.2)
    assert all((getattr(ph, name) or 0.0) >= 0 for name in STARTUP_PHASES)


def test_cpu_compile_miss() -> None:
    ph = _parse("vllm-0.32-cpu-startup-miss.log")
    assert ph.compile_cache == "miss" and ph.compile_cache_key == "efa591569a335357"
    assert ph.weights_s == 0.01  # "Loading weights took 0.01 seconds" (the CPU build prints no "Model loading took")
    assert ph.compile_s == 41.0  # "Warming up model for the compilation..." 10:13:13 -> "Warming up done." 10:13:54
    assert ph.engine_init_s == 41.49 and ph.kv_profile_s == pytest.approx(0.49)
    assert ph.cuda_graphs_s is None  # no CUDA graphs on a CPU
    assert ph.python_s == pytest.approx(26.0, abs=1.0)  # launch 10:12:36 -> engine core start 10:13:02
    assert ph.api_s == pytest.approx(1.2, abs=1.0)  # init engine done 10:13:55 -> /health at launch + 80.12 s
    _partitions(ph)


def test_cpu_compile_cache_entry_that_fails_to_load_is_a_load_failure() -> None:
    ph = _parse("vllm-0.32-cpu-startup-load-failed.log")
    assert ph.compile_cache == "load_failed" and ph.compile_cache_key == "efa591569a335357"  # same key as the miss
    assert ph.compile_s == 13.0 and ph.engine_init_s == 13.26
    _partitions(ph)


def test_cpu_enforce_eager_compiles_nothing() -> None:
    ph = _parse("vllm-0.32-cpu-startup-eager.log")
    assert ph.compile_cache is None and ph.compile_cache_key is None and ph.compile_s is None
    assert ph.engine_init_s == 0.42 and ph.kv_profile_s == 0.42
    _partitions(ph)


def test_gpu_tensor_parallel_miss_takes_the_slowest_worker() -> None:
    ph = _parse("vllm-0.26-gpu-startup-miss-tp2.log")
    assert ph.weights_s == 8.867  # rounded to ms; "Model loading took ... seconds" wins over "Loading weights took"; TP1 slower
    assert ph.compile_s == 53.58 and ph.dynamo_s == 9.02
    assert ph.cuda_graphs_s == 26.0 and ph.engine_init_s == 84.61
    assert ph.kv_profile_s == pytest.approx(84.61 - 53.58 - 26.0)
    assert ph.compile_cache == "miss" and ph.compile_cache_key == "9b2e55d0c1a84f7e"  # the AOT key, as on a hit
    assert ph.python_s == pytest.approx(35.0, abs=1.0) and ph.api_s == pytest.approx(17.3, abs=1.0)
    _partitions(ph)


def test_gpu_hit_across_new_year() -> None:
    ph = _parse("vllm-0.26-gpu-startup-hit.log")
    assert ph.compile_cache == "hit" and ph.compile_cache_key == "5c4d3e2f1a0b9c8d"
    assert ph.compile_s == 7.95 and ph.cuda_graphs_s == 9.0 and ph.weights_s == 6.902
    assert ph.python_s == pytest.approx(28.0, abs=1.0)  # 12-31 23:59:50 -> 01-01 00:00:18: the year rolls over
    _partitions(ph)


@pytest.mark.parametrize("line, state", [
    ("(Worker pid=1) INFO 01-02 03:04:05 [backends.py:296] [backbone] Directly load the compiled graph(s) for "
     "compile range (1, 8192) from the cache, took 1.214 s", "hit"),
    ("(Worker pid=1) INFO 01-02 03:04:05 [backends.py:1102] [backbone] vLLM's torch.compile cache is disabled.", "off"),
    ("INFO 01-02 03:04:05 [backends.py:161] Compiling a graph for dynamic shape takes 38.21 s", "miss"),
])
def test_cache_messages_of_other_forms(line: str, state: str) -> None:
    assert startup_phases(line).compile_cache == state


def test_both_loaded_and_compiled_is_partial_and_older_wordings_parse() -> None:
    log = "\n".join([
        "INFO 01-02 03:04:05 [backends.py:296] Directly load the compiled graph(s) for compile range (1, 1) from the "
        "cache, took 0.5 s",
        "INFO 01-02 03:04:06 [backends.py:394] Compiling a graph for compile range (2, 8192) takes 20.00 s",
        "INFO 01-02 03:04:07 [monitor.py:53] torch.compile takes 31.50 s in total",
        "INFO 01-02 03:04:08 [core.py:348] init engine (profile, create kv cache, warmup model) took 60.00 seconds",
    ])
    ph = startup_phases(log)
    assert ph.compile_cache == "partial" and ph.compile_s == 31.5 and ph.engine_init_s == 60.0
    assert ph.python_s is None and ph.api_s is None and ph.other_s is None  # no launch time / start-up given


def test_an_empty_or_foreign_log_leaves_every_phase_unknown() -> None:
    ph = startup_phases("Traceback (most recent call last):\nOSError: boom\n", launched_at=1.0e9, total_s=5.0)
    assert ph.compile_cache is None and ph.weights_s is None and ph.python_s is None
    assert ph.other_s == 5.0  # nothing attributed: all of it is "other"


def test_phases_ride_on_the_run_record_and_survive_json() -> None:
    text, launched, total = _fixture("vllm-0.26-gpu-startup-miss-tp2.log")
    log_stats = server_stats_from_log(text, launched_at=launched, startup_s=total)
    assert log_stats.kv_cache_tokens == 1_916_496 and log_stats.startup is not None
    merged = merge_stats(log_stats, ServerStats(peak_kv_usage=0.5))
    assert merged.startup == log_stats.startup and merged.peak_kv_usage == 0.5
    rec = RunRecord(run_id="r", created="", model="m", settings={}, workload={}, arrival={}, slo=None, argv=[],
                    server=merged)
    back = from_dict(RunRecord, to_dict(rec))
    assert back.server.startup == merged.startup
    old = from_dict(RunRecord, {**to_dict(rec), "server": {"kv_cache_tokens": 5}})  # records written before
    assert old.server.startup is None
