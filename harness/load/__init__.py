"""Load generation: workload YAML -> exact-length prompts -> arrival schedule -> async streaming client."""

from harness.load.arrival import Arrival
from harness.load.client import LoadProgress, LoadResult, Target, run_load, run_load_sync
from harness.load.prompts import RequestSpec, build_requests
from harness.load.spread import WorkerFailed
from harness.load.workload import Workload, load_workload

__all__ = [
    "Arrival",
    "LoadProgress",
    "LoadResult",
    "RequestSpec",
    "Target",
    "WorkerFailed",
    "Workload",
    "build_requests",
    "load_workload",
    "run_load",
    "run_load_sync",
]
