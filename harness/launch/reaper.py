"""A tiny watchdog process: kills the harness's vLLM servers when the harness dies, however it dies.

PR_SET_PDEATHSIG only reaches the server's direct child process, while vLLM spawns its engine core and workers
as further children in the same process group; and no handler runs when the harness is SIGKILLed. So the
harness starts one reaper per process and keeps the write end of a pipe to the reaper's stdin. It tells the
reaper each server's process group (`add PGID`, `del PGID`). When the pipe closes (EOF: the harness exited,
crashed or was SIGKILLed), the reaper sends SIGTERM to every registered group, waits `--grace` seconds, sends
SIGKILL to what is left, and exits.

Run as `python -m harness.launch.reaper [--grace S]`; it only imports the standard library and psutil.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time


def group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is in process group `pgid`."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a harness dependency
        return True
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return False


def kill_groups(pgids: set[int], grace_s: float) -> None:
    """SIGTERM every group, wait up to `grace_s` for them to exit, then SIGKILL the rest and wait briefly."""
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace_s
    alive = set(pgids)
    while alive and time.monotonic() < deadline:
        alive = {g for g in alive if group_alive(g)}
        if alive:
            time.sleep(0.1)
    for pgid in alive:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 10.0
    while alive and time.monotonic() < deadline:
        alive = {g for g in alive if group_alive(g)}
        if alive:
            time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="kill registered process groups when stdin closes")
    ap.add_argument("--grace", type=float, default=3.0, help="seconds between SIGTERM and SIGKILL")
    ns = ap.parse_args(argv)
    # Ctrl-C in the harness's terminal is the harness's to handle; the reaper acts only on EOF.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    stdin = sys.stdin.buffer
    while True:
        line = stdin.readline()
        if not line:
            break
        parts = line.decode("ascii", "replace").split()
        if len(parts) == 2 and parts[1].isdigit():
            pgid = int(parts[1])
            if parts[0] == "add" and pgid > 1 and pgid != os.getpgrp():
                groups.add(pgid)
            elif parts[0] == "del":
                groups.discard(pgid)
    if groups:
        kill_groups(groups, ns.grace)
    return 0


if __name__ == "__main__":
    sys.exit(main())
