"""Load generation: workload YAML -> exact-length prompts -> arrival schedule (or a time-window step) -> async
streaming client."""

from harness.load.arrival import Arrival
from harness.load.client import LoadProgress, LoadResult, Target, run_load, run_load_sync
from harness.load.prompts import RequestSpec, build_requests
from harness.load.spread import WorkerFailed
from harness.load.tokenizer import load_tokenizer
from harness.load.window import WindowPlan, WindowSpec, mark_window
from harness.load.workload import Workload, load_workload

__all__ = [
    "Arrival",
    "LoadProgress",
    "LoadResult",
    "RequestSpec",
    "Target",
    "WindowPlan",
    "WindowSpec",
    "WorkerFailed",
    "Workload",
    "build_requests",
    "load_tokenizer",
    "load_workload",
    "mark_window",
    "run_load",
    "run_load_sync",
]
