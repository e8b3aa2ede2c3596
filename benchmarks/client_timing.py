"""Where each client's TTFT comes from, against a server that records the truth.

    .venv/bin/python benchmarks/client_timing.py [--rounds 3] [--requests 200]

The fake server (`tests/fakeserver.py`, its own process) stamps, on the clock both clients use
(`perf_counter`, CLOCK_MONOTONIC: one clock for every process on Linux), when each request arrived and when it
wrote each chunk, and waits a known delay before the first chunk. For each client (ours, and `vllm bench serve`'s
request function driven as `vllm bench serve` drives it) and each load shape this prints, per request:

- way in: client send stamp -> server receipt (the client's send path: connection acquisition, serialization);
- way out: server's first chunk write -> the client's first-token stamp (the client's read path);
- TTFT bias: measured TTFT - the server's own receipt -> first write (= way in + way out), i.e. what the
  client adds to the server's TTFT.

Rounds alternate the clients; ours runs in one process and spread over 2 worker processes
(`run_load(processes=2)`), whose timestamps must stay as exact. Load shapes: a closed loop at fixed concurrency (connections warm) and a
Poisson open loop with many requests in flight (new connections opened during the run).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fakeserver import FakeConfig, FakeServer  # noqa: E402
from vllm_client import drive, request_module  # noqa: E402

from harness.load.arrival import Arrival  # noqa: E402
from harness.load.client import Target, run_load_sync  # noqa: E402
from harness.load.prompts import RequestSpec  # noqa: E402

OUTPUT_TOKENS = 16


def _specs(n: int) -> list[RequestSpec]:
    # request i has i + 1 prompt words: the server's log entry is matched by its prompt length
    return [RequestSpec(" ".join(["w"] * (i + 1)), None, i + 1, OUTPUT_TOKENS) for i in range(n)]


def _ours(srv: FakeServer, specs: list[RequestSpec], arrival: Arrival, processes: int = 1) -> list[tuple[int, float, float]]:
    """(prompt words, send stamp s, TTFT s) per request."""
    res = run_load_sync([Target(srv.url)], specs, arrival, model="fake", api="completions", warmup=0, timeout_s=60,
                        processes=processes)
    assert res.client.processes == processes
    assert all(r.ok for r in res.results), [r.error for r in res.results if not r.ok][:3]
    return [(r.prompt_tokens, res.t0_perf_ns / 1e9 + r.send_s, r.ttft_s) for r in res.results]


def _vllm(srv: FakeServer, specs: list[RequestSpec], arrival: Arrival) -> list[tuple[int, float, float]]:
    mod = request_module()
    inputs = [mod.RequestFuncInput(prompt=s.prompt, api_url=srv.url + "/v1/completions", prompt_len=s.prompt_tokens,
                                   output_len=OUTPUT_TOKENS, model="fake", ignore_eos=True) for s in specs]
    offsets = arrival.schedule(len(specs)).tolist() if arrival.open_loop else None
    outs = asyncio.run(drive(inputs, offsets_s=offsets, max_concurrency=arrival.max_concurrency))
    assert all(o.success for o in outs), [o.error for o in outs if not o.success][:3]
    return [(s.prompt_tokens, o.start_time, o.ttft) for s, o in zip(specs, outs)]


def _measure(srv: FakeServer, client: Any, specs: list[RequestSpec], arrival: Arrival) -> dict[str, list[float]]:
    srv.reset()
    rows = client(srv, specs, arrival)
    log = {e["prompt_tokens"]: e for e in srv.log()}
    out: dict[str, list[float]] = {"way_in": [], "way_out": [], "bias": [], "ttft": []}
    for words, send_s, ttft in rows:
        e = log[words]
        recv, first = e["recv_ns"] / 1e9, e["writes_ns"][0] / 1e9
        out["way_in"].append((recv - send_s) * 1e3)
        out["way_out"].append((send_s + ttft - first) * 1e3)
        out["bias"].append((ttft - (first - recv)) * 1e3)
        out["ttft"].append(ttft * 1e3)
    return out


def _p(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--first-token-ms", type=float, default=20.0)
    p.add_argument("--chunk-ms", type=float, default=5.0)
    p.add_argument("--rate", type=float, default=100.0, help="open-loop rate, req/s")
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    config = FakeConfig(first_token_delay_s=args.first_token_ms / 1e3, chunk_delay_s=args.chunk_ms / 1e3)
    shapes = {
        f"closed loop x{args.concurrency}": Arrival(mode="concurrency", max_concurrency=args.concurrency),
        f"poisson {args.rate:g} req/s": Arrival(mode="poisson", rate=args.rate, seed=1),
    }
    clients = {"vllm-tune": _ours, "vllm-tune, 2 processes": functools.partial(_ours, processes=2),
               "vllm bench serve": _vllm}
    specs = _specs(args.requests)
    acc: dict[tuple[str, str], dict[str, list[float]]] = {}
    with FakeServer(config, process=True) as srv:
        for shape, arrival in shapes.items():
            for r in range(args.rounds):
                order = list(clients) if r % 2 == 0 else list(clients)[::-1]
                for name in order:
                    got = _measure(srv, clients[name], specs, arrival)
                    slot = acc.setdefault((shape, name), {k: [] for k in got})
                    for k, v in got.items():
                        slot[k].extend(v)
    print(f"fake server: first chunk {args.first_token_ms:g} ms after receipt, then every {args.chunk_ms:g} ms, "
          f"{OUTPUT_TOKENS} tokens; {args.requests} requests x {args.rounds} rounds per row; ms")
    head = ["load", "client", "way in p50", "way in p99", "way out p50", "way out p99", "bias mean", "bias p50",
            "bias p99", "TTFT mean"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for (shape, name), v in acc.items():
        cells = [shape, name, _p(v["way_in"], 0.5), _p(v["way_in"], 0.99), _p(v["way_out"], 0.5),
                 _p(v["way_out"], 0.99), statistics.fmean(v["bias"]), _p(v["bias"], 0.5), _p(v["bias"], 0.99),
                 statistics.fmean(v["ttft"])]
        print("| " + " | ".join(c if isinstance(c, str) else f"{c:.2f}" for c in cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
