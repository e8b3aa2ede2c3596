"""Live progress of one load step on a terminal: a step lasts a minute or more, so the user sees it move.

`StepDisplay` is a `run_load(progress=...)` callback. On a TTY it rewrites one line with `\\r` (about once a
second, as the client reports); otherwise (a log file, CI) it writes a full line every `interval_s` (10 s), so a
log stays readable. `finish()` ends the line.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from harness.load.client import LoadProgress

LOG_INTERVAL_S = 10.0


def progress_line(p: LoadProgress) -> str:
    """`elapsed/total s, sent, completed, in flight, p50 TTFT / TPOT` in one short line."""
    total = f"/{p.total_s:.0f}" if p.total_s else ""
    ttft = "-" if p.p50_ttft_ms is None else f"{p.p50_ttft_ms:.0f}"
    tpot = "-" if p.p50_tpot_ms is None else f"{p.p50_tpot_ms:.1f}"
    failed = f", {p.failed} failed" if p.failed else ""
    return (f"{p.elapsed_s:.0f}{total} s: sent {p.sent}, completed {p.completed}{failed}, in flight {p.in_flight}, "
            f"p50 TTFT {ttft} ms, p50 TPOT {tpot} ms")


class StepDisplay:
    """Prints `prefix` + the progress line: rewritten in place on a TTY, every `interval_s` otherwise."""

    def __init__(self, prefix: str = "", out: TextIO | Any = None, interval_s: float = LOG_INTERVAL_S,
                 tty: bool | None = None) -> None:
        self.out = out if out is not None else sys.stderr
        self.prefix = prefix
        self.interval_s = interval_s
        isatty = getattr(self.out, "isatty", None)
        self.tty = bool(isatty()) if tty is None and callable(isatty) else bool(tty)
        self._last = -float("inf")
        self._width = 0
        self.shown = 0

    def __call__(self, p: LoadProgress) -> None:
        line = self.prefix + progress_line(p)
        if self.tty:
            pad = max(self._width - len(line), 0)
            self._width = len(line)
            self.out.write("\r" + line + " " * pad)
            self.out.flush()
            self.shown += 1
            return
        now = time.monotonic()
        if now - self._last >= self.interval_s:
            self._last = now
            print(line, file=self.out, flush=True)
            self.shown += 1

    def finish(self) -> None:
        if self.tty and self._width:
            self.out.write("\n")
            self.out.flush()
            self._width = 0
