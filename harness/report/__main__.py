"""`python -m harness.report [PATH] [--study NAME] [--latency p99_tpot_ms] [--storage URL] [--out DIR]`

Writes, for every study of a results folder (or one study), the review figures as PNG and one report
(`report.md` with relative image links, `report.html` with the images embedded) into `<study dir>/report/`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from harness.errors import UserError, main_guard


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from harness.report.results import LATENCY_METRICS, THROUGHPUT_METRICS

    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", nargs="?", default=None,
                   help="a results folder (every study in its studies.db), one study's folder inside it, or a "
                        "storage URL; default: results")
    p.add_argument("--study", help="only this study (model@hw@workload@objective, or its folder name)")
    p.add_argument("--storage", help="read studies from this storage URL (sqlite:///... or postgresql://...) "
                                     "instead of PATH/studies.db; reports still go under PATH (or --out)")
    p.add_argument("--out", help="write the report here instead of <study dir>/report/ (one sub-folder per "
                                 "study when there are several)")
    p.add_argument("--latency", choices=LATENCY_METRICS, default=None, metavar="METRIC",
                   help="latency axis of the throughput-vs-latency figure, e.g. p99_tpot_ms (default), "
                        "p90_ttft_ms, p99_e2e_ms")
    p.add_argument("--throughput", choices=list(THROUGHPUT_METRICS), default=None, metavar="METRIC",
                   help="throughput axis of that figure (default: the objective's metric): "
                        + ", ".join(THROUGHPUT_METRICS))
    return p.parse_args(argv)


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from harness.report.results import load_studies

    path = args.path if args.path is not None else ("" if args.storage else "results")
    if args.storage and args.path is None and args.out is None:
        raise UserError("with --storage, give a results folder (PATH) or --out DIR for the reports", key="--out")
    studies = load_studies(path, storage=args.storage, study=args.study)
    empty = [s.name for s in studies if not s.trials]
    if len(empty) == len(studies):
        what = f"study {empty[0]} has" if len(empty) == 1 else f"none of the {len(empty)} studies has"
        raise UserError(f"{what} any trial yet; nothing to report (is the sweep still starting?)",
                        source=str(args.storage or path))
    for s in studies:
        c = s.counts()
        if not c["trials"]:
            print(f"{s.name}: no trials yet; nothing to report", file=sys.stderr)
            continue
        out = None
        if args.out:
            out = Path(args.out) / s.name.replace("@", "__") if len(studies) > 1 else Path(args.out)
        report = s.write_report(out, latency=args.latency, throughput=args.throughput)
        note = "" if c["measured"] else "  (no trial produced a measurement: the report lists why)"
        print(f"{s.name}: {report}  [{c['trials']} trials: {c['measured']} measured, {c['failed']} failed, "
              f"{c['pruned']} pruned]{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
