"""Identical requests through our client and through `vllm bench serve`, alternated on one server.

    # start a server itself (default: the tiny local model on vLLM's CPU build; --model DIR on a GPU host)
    .venv/bin/python benchmarks/compare_vllm_bench.py --out results/runs/compare [--rounds 3] [--requests 64]
        [--rate 4 | --concurrency 8] [--input-len 64:256] [--output-len 16:64] [--set max_num_seqs=16]
    # or a server that is already running
    .venv/bin/python benchmarks/compare_vllm_bench.py --url http://127.0.0.1:8000 --api-key KEY \\
        --model SERVED_NAME --tokenizer TOKENIZER_DIR --out results/runs/compare

What is identical, round by round:
- prompts, token-exact: built once with the served model's tokenizer (`harness.load.prompts`), exported as the
  JSONL `custom` dataset that `vllm bench serve` replays (`--dataset-name custom --skip-chat-template
  --custom-output-len -1 --disable-shuffle`), one `{"prompt", "output_tokens"}` line per request, so both clients
  send the same text to /v1/completions and the server tokenizes it the same way;
- per-request output lengths: `max_tokens` from the same file, `ignore_eos` on both;
- request bodies: our client sends vLLM's body (`stream_options: {include_usage: true}`, `repetition_penalty`
  1.0); with `--clients ours,vllm,ours-usage` a third row sends our default body, which adds
  `continuous_usage_stats` (per-chunk token counts) and shows what that costs the server;
- arrival schedule: `vllm bench serve --request-rate R --seed S` draws its gaps with numpy's legacy global
  generator (`np.random.seed(S)`, one gamma draw per request, scaled so the span is N/R); our client is given
  exactly those offsets (`ReplayArrival`), so both send at the same instants relative to their first request.
  `--concurrency C` without `--rate` is a closed loop at C in flight for both. Actual send times are compared
  (both tools stamp `perf_counter`, one system-wide monotonic clock);
- warm-up: `vllm bench serve` always sends request 0 once before measuring; ours sends the same one request.

`vllm bench serve` runs in a fresh process each round (`from vllm.benchmarks.serve import add_cli_args, main`,
with `vllm.utils.argparse_utils.FlexibleArgumentParser`, or `vllm.utils.FlexibleArgumentParser` on older vLLM),
with `--save-detailed`; both tools' per-request figures go through the same statistics code
(`harness.measure.stats.summarize`), and vLLM's own summary is kept next to ours as a check of that code.

Output in `--out`: compare.json (every round, both tools, per-request wire checks) and compare.md (the table).
The table gives each metric's mean over rounds with the round-to-round spread (min-max), and ours/vLLM per round.
When the script started the server it also reports the API server process's CPU seconds per 1,000 output tokens
for each client (the frontend's cost of what each client asks for).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from harness.load.arrival import Arrival
from harness.load.client import CONTINUOUS_USAGE, Target
from harness.load.prompts import RequestSpec, build_requests
from harness.load.workload import parse_workload
from harness.measure.stats import summarize
from harness.measure.vllm_bench import (METRICS, ReplayArrival, metrics_row, run_ours, run_vllm_bench, vllm_schedule,
                                        write_dataset)
from harness.records import RequestResult

VLLM_BODY = {"stream_options": {"include_usage": True}, "repetition_penalty": 1.0}
USAGE_BODY = {**VLLM_BODY, **CONTINUOUS_USAGE}  # the same body asking for per-chunk usage: what that costs
CLIENTS = {"ours": "vllm-tune", "vllm": "vllm bench serve", "ours-usage": "vllm-tune, continuous usage"}


# ---------------------------------------------------------------------------------------------- the server


class _Started:
    """A server this script started (ServerGroup of one), with the API server process's CPU time."""

    def __init__(self, model: str, settings: dict[str, Any], log_dir: Path) -> None:
        from harness.launch.server import ServerGroup, ServerSpec

        log_dir.mkdir(parents=True, exist_ok=True)
        self.group = ServerGroup([ServerSpec(model=model, settings=settings, log_path=log_dir / "server.log")])

    def __enter__(self) -> _Started:
        self.group.start()
        self.group.wait_ready()
        return self

    def __exit__(self, *exc: object) -> None:
        self.group.stop()

    @property
    def target(self) -> Target:
        return Target(*self.group.targets[0])

    def cpu_s(self) -> float | None:
        pid = self.group.servers[0].pid
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, TypeError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------------------- report


def _wire(results: list[RequestResult], requests: list[RequestSpec]) -> dict[str, Any]:
    """What the server reported back: prompt and output token counts vs what was built and asked for."""
    return {
        "prompt_tokens_received": sum(r.prompt_tokens for r in results),
        "prompt_tokens_built": sum(q.prompt_tokens for q in requests),
        "prompt_mismatches": sum(r.prompt_tokens != q.prompt_tokens for r, q in zip(results, requests)),
        "output_tokens_received": sum(r.output_tokens for r in results),
        "output_tokens_asked": sum(q.max_tokens for q in requests),
        "chunks_per_request": statistics.fmean(len(r.itl_s) + 1 for r in results if r.ok) if results else 0.0,
    }


def _schedule_gap(results: list[RequestResult], offsets: np.ndarray | None) -> dict[str, float] | None:
    """Actual send offsets vs the schedule (ms): how exactly each tool kept it."""
    if offsets is None:
        return None
    sends = np.array(sorted(r.send_s for r in results))
    sched = np.sort(offsets - offsets[0])[: len(sends)]
    lag = (sends - sched) * 1e3
    return {"mean_ms": float(np.mean(lag)), "p99_ms": float(np.percentile(lag, 99))}


def _table(rounds: list[dict[str, Any]], clients: list[str]) -> list[str]:
    keys = ["req_per_s", "out_tok_per_s"] + [f"{m[:-3]}_{s}" for m in METRICS for s in ("mean", "p50", "p99")]
    lines = ["| metric | " + " | ".join(f"{CLIENTS[c]} (mean, min-max)" for c in clients)
             + " | " + " | ".join(f"{CLIENTS[c]} / vLLM (mean, min-max)" for c in clients if c != "vllm") + " |",
             "|---" * (1 + len(clients) + len(clients) - 1) + "|"]
    for key in keys:
        cells = []
        for c in clients:
            xs = [r[c]["metrics"][key] for r in rounds]
            cells.append(f"{statistics.fmean(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})")
        for c in clients:
            if c == "vllm":
                continue
            ratios = [r[c]["metrics"][key] / r["vllm"]["metrics"][key] for r in rounds if r["vllm"]["metrics"][key]]
            cells.append(f"{statistics.fmean(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})" if ratios else "-")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------- main


def _lengths(text: str) -> dict[str, Any]:
    lo, _, hi = text.partition(":")
    if not hi or int(lo) == int(hi):
        return {"dist": "fixed", "value": int(lo)}
    return {"dist": "uniform", "min": int(lo), "max": int(hi)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="base URL of a running server (default: start one)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="its API key (or OPENAI_API_KEY)")
    p.add_argument("--model", help="model dir to start (default: the tiny local model), or the served name with --url")
    p.add_argument("--tokenizer", help="tokenizer dir or name (default: --model)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="server setting when starting one")
    p.add_argument("--out", required=True, help="directory for compare.json and compare.md")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, help="open loop at this many requests/s (vLLM's schedule, --seed)")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--concurrency", type=int, help="cap on requests in flight (a closed loop without --rate)")
    p.add_argument("--input-len", default="64:256", help="prompt tokens, N or MIN:MAX (uniform)")
    p.add_argument("--output-len", default="16:64", help="output tokens, N or MIN:MAX (uniform)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clients", default="ours,vllm", help="comma list of: " + ", ".join(CLIENTS))
    args = p.parse_args()
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    bad = sorted(set(clients) - set(CLIENTS))
    if bad or "vllm" not in clients:
        p.error(f"--clients: got {args.clients!r}; a comma list of {', '.join(CLIENTS)} including vllm")
    if not args.rate and not args.concurrency:
        args.concurrency = 8
    if args.url and not args.model:
        p.error("--url needs --model (the served model name)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from harness.yamlfile import parse_scalars

    if args.url:
        model = args.model
        settings: dict[str, Any] = {}
    else:
        from harness.models import cached_tiny

        model = args.model or str(cached_tiny())
        settings = ({"enforce_eager": True, "max_model_len": 1024, "gpu_memory_utilization": 0.2}
                    if not args.model else {})
        settings.update(parse_scalars(args.set, "--set"))
        # the same prompts every round and client: with the prefix cache on, only the first run would prefill
        settings.setdefault("enable_prefix_caching", False)
    tokenizer_path = args.tokenizer or model
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    workload = parse_workload({"name": "compare", "api": "completions", "ignore_eos": True,
                               "input_len": _lengths(args.input_len),
                               "output_len": _lengths(args.output_len)}, source="compare")
    requests = build_requests(workload, tokenizer, args.requests, seed=args.seed)
    dataset = write_dataset(requests, out / "requests.jsonl")
    offsets = vllm_schedule(args.requests, args.rate, args.burstiness, args.seed) if args.rate else None
    if offsets is not None:
        arrival: Arrival = ReplayArrival(offsets, args.rate)
        if args.concurrency:
            arrival.max_concurrency = args.concurrency
    else:
        arrival = Arrival(mode="concurrency", max_concurrency=args.concurrency)

    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = None if args.url else _Started(model, settings, out / "logs")
        try:
            if server is not None:
                server.__enter__()
                target = server.target
            else:
                target = Target(args.url, args.api_key)
            for k in range(args.rounds):
                order = clients if k % 2 == 0 else clients[::-1]
                entry: dict[str, Any] = {}
                for c in order:
                    cpu0 = server.cpu_s() if server is not None else None
                    t0 = time.perf_counter()
                    vllm_summary = None
                    if c == "vllm":
                        run = run_vllm_bench(target, model, tokenizer_path, dataset, args.requests,
                                             Path(tmp) / f"vllm-{k}.json", rate=args.rate,
                                             burstiness=args.burstiness, seed=args.seed,
                                             concurrency=args.concurrency)
                        results, duration, vllm_summary = run.results, run.duration_s, run.own
                    else:
                        results, duration = run_ours(target, model, requests, arrival,
                                                     VLLM_BODY if c == "ours" else USAGE_BODY)
                    cpu1 = server.cpu_s() if server is not None else None
                    m = summarize(results, duration)
                    rec: dict[str, Any] = {"metrics": metrics_row(m), "duration_s": duration,
                                           "wall_s": time.perf_counter() - t0, "wire": _wire(results, requests),
                                           "schedule": _schedule_gap(results, offsets)}
                    if cpu0 is not None and cpu1 is not None and m.total_output_tokens:
                        rec["api_server_cpu_s_per_1k_out_tok"] = (cpu1 - cpu0) / m.total_output_tokens * 1e3
                    if m.prefix_cached_fraction is not None:  # our client reads usage.prompt_tokens_details
                        rec["prefix_cached_fraction"] = m.prefix_cached_fraction
                    if vllm_summary is not None:
                        rec["vllm_own"] = {key: vllm_summary.get(key) for key in (
                            "request_throughput", "output_throughput", "mean_ttft_ms", "median_ttft_ms",
                            "p99_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms")}
                    entry[c] = rec
                    print(f"round {k + 1} {CLIENTS[c]:28s} TTFT mean {rec['metrics']['ttft_mean']:8.2f} ms  "
                          f"TPOT mean {rec['metrics']['tpot_mean']:7.2f} ms  {rec['metrics']['req_per_s']:.3f} req/s",
                          flush=True)
                rounds.append(entry)
                # every finished round is on disk at once: a command cut short keeps what it measured
                (out / "rounds.json").write_text(json.dumps({"args": vars(args), "rounds": rounds}, indent=1,
                                                            default=str))
        finally:
            if server is not None:
                server.__exit__(None, None, None)

    from harness.envinfo import environment

    load = (f"open loop, vLLM's schedule at {args.rate:g} req/s (burstiness {args.burstiness:g}, seed {args.seed})"
            if args.rate else f"closed loop at concurrency {args.concurrency}")
    if args.rate and args.concurrency:
        load += f", at most {args.concurrency} in flight"
    head = (f"{args.requests} identical requests per client and round, {args.rounds} rounds alternated; prompts "
            f"{args.input_len} tokens, outputs {args.output_len} tokens (ignore_eos); {load}; server "
            f"{args.url or 'started by the script'} ({model}). Latencies in ms.")
    cached = [r[c]["prefix_cached_fraction"] for r in rounds for c in clients if "prefix_cached_fraction" in r[c]]
    if cached and max(cached) > 0.01:
        # the same prompts every round: a server with prefix caching on prefills each prompt once, in the first
        # client run, and every later run is measured on a warm cache
        head += (f" Warning: the server's prefix cache served up to {max(cached):.0%} of our prompt tokens, so runs "
                 f"after the first are measured on a warm cache; start the server with enable_prefix_caching off.")
    lines = [head, ""] + _table(rounds, clients)
    lines += ["", "| client | prompt tokens received / built | prompt mismatches | output tokens received / asked "
              "| chunks per request | send vs schedule mean / p99 ms | API server CPU s per 1k output tokens |",
              "|---|---|---|---|---|---|---|"]
    for c in clients:
        w = rounds[-1][c]["wire"]
        s = rounds[-1][c]["schedule"]
        cpu = [r[c].get("api_server_cpu_s_per_1k_out_tok") for r in rounds]
        cpu_txt = (f"{statistics.fmean(cpu):.3f} ({min(cpu):.3f}-{max(cpu):.3f})"
                   if all(x is not None for x in cpu) else "-")
        lines.append(f"| {CLIENTS[c]} | {w['prompt_tokens_received']} / {w['prompt_tokens_built']} | "
                     f"{w['prompt_mismatches']} | {w['output_tokens_received']} / {w['output_tokens_asked']} | "
                     f"{w['chunks_per_request']:.2f} | "
                     + (f"{s['mean_ms']:.2f} / {s['p99_ms']:.2f}" if s else "-") + f" | {cpu_txt} |")
    env = environment()
    gpus = ", ".join(f"GPU {g['index']}: {g['name']}" for g in env["gpus"]) or "no GPU"
    lines += ["", f"Hardware: {gpus}; CPU {env['cpu']} ({env['cpu_count']} cores); vLLM {env['vllm_version']} "
              f"({env['vllm_distribution']}); both clients on the server's host."]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps({"args": vars(args), "model": model, "settings": settings,
                                                  "env": env, "rounds": rounds}, indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
