"""Live progress of a load step: one line rewritten on a terminal, a line every interval otherwise."""

from __future__ import annotations

import io

from harness.load.client import LoadProgress
from harness.load.progress import StepDisplay, progress_line

P = LoadProgress(elapsed_s=12.4, total_s=70.0, sent=250, completed=240, failed=0, in_flight=10, p50_ttft_ms=81.2,
                 p50_tpot_ms=12.34)


def test_progress_line_has_elapsed_total_counts_and_medians() -> None:
    assert progress_line(P) == ("12/70 s: sent 250, completed 240, in flight 10, p50 TTFT 81 ms, "
                                "p50 TPOT 12.3 ms")
    none = LoadProgress(0.0, None, 0, 0, 1, 0, None, None)
    assert progress_line(none) == "0 s: sent 0, completed 0, 1 failed, in flight 0, p50 TTFT - ms, p50 TPOT - ms"


def test_tty_rewrites_one_line_and_a_log_gets_a_line_per_interval() -> None:
    out = io.StringIO()
    tty = StepDisplay("step 1: ", out=out, tty=True)
    tty(P)
    tty(P)
    tty.finish()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.endswith("\n") and text.count("\n") == 1
    log = io.StringIO()
    plain = StepDisplay("step 1: ", out=log, interval_s=3600)  # StringIO is not a TTY
    for _ in range(5):
        plain(P)
    plain.finish()
    assert log.getvalue().count("\n") == 1 and "\r" not in log.getvalue() and plain.shown == 1
