"""CLI: build random-weight models locally (no hub needed)."""

from __future__ import annotations

import argparse
import sys

from harness.errors import main_guard
from harness.models.build import KNOWN_ARCHS, build_from_config, build_tiny, resolve_config


@main_guard
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m harness.models", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    tiny = sub.add_parser("tiny", help="the tiny random Llama for CPU demos and tests (seconds)")
    tiny.add_argument("dir")
    arch = sub.add_parser("arch", help="a random-weight model of a real architecture")
    arch.add_argument("name", help=f"one of {', '.join(sorted(KNOWN_ARCHS))}, or a path to a config.json")
    arch.add_argument("dir")
    for p in (tiny, arch):
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default=None, help="where weights are generated (default: cuda if available)")
    ns = ap.parse_args(argv)
    if ns.cmd == "tiny":
        built = build_tiny(ns.dir, seed=ns.seed, device=ns.device)
    else:
        built = build_from_config(resolve_config(ns.name), ns.dir, seed=ns.seed, device=ns.device)
    print(
        f"{built.path}: {built.architecture}, {built.num_params / 1e6:.1f}M params {built.dtype}, "
        f"vocab {built.vocab_size}, built on {built.device} in {built.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
