"""`vllm bench serve`, vLLM's own benchmark client, on a live server and on requests we built: the cross-check of
our numbers (an engineer trusts a tool once vLLM's client agrees with it on the same server).

What is identical between the two clients: the prompts, token-exact (exported as the JSONL `custom` dataset that
`vllm bench serve` replays with `--dataset-name custom --skip-chat-template --custom-output-len -1
--disable-shuffle`), the per-request output lengths (`ignore_eos` on both), and the arrival schedule: `vllm bench
serve --request-rate R --seed S` draws its gaps with numpy's legacy global generator (`vllm_schedule`), and our
client replays exactly those offsets (`ReplayArrival`) from its first send. Both tools' per-request figures go
through the same statistics (`harness.measure.stats.summarize`); vLLM's own summary is kept next to them.

One known difference of definition: vLLM's duration also covers the wait before its first request (the first
gap of its schedule), ours starts at the first send, so its throughput reads lower by that gap over the run.

`vllm bench serve` runs in a fresh process (`from vllm.benchmarks.serve import add_cli_args, main`, with
`vllm.utils.argparse_utils.FlexibleArgumentParser`, or `vllm.utils.FlexibleArgumentParser` on older vLLM).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from harness.load.arrival import Arrival
from harness.load.client import Target, run_load_sync
from harness.load.prompts import RequestSpec
from harness.measure.stats import summarize
from harness.records import SLO, RequestResult, RunMetrics

METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
VLLM_BENCH_START_S = 30.0  # `vllm bench serve`'s process start (imports): ~21 s on the H200 host (wall - duration)

VLLM_CODE = """
import json, sys
from vllm.benchmarks.serve import add_cli_args, main
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
p = FlexibleArgumentParser()
add_cli_args(p)
main(p.parse_args(json.loads(sys.argv[1])))
"""


class ReplayArrival(Arrival):
    """An open loop at given send offsets (seconds from the first request), e.g. another tool's schedule."""

    def __init__(self, offsets: np.ndarray, rate: float) -> None:
        super().__init__(mode="poisson", rate=rate, num_requests=len(offsets))
        self.offsets = np.asarray(offsets, dtype=float)

    def schedule(self, n: int) -> np.ndarray:
        return self.offsets[:n] - self.offsets[0]


def vllm_schedule(n: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """The send offsets `vllm bench serve --request-rate rate --burstiness b --seed seed` uses (its get_request)."""
    state = np.random.get_state()
    try:
        np.random.seed(seed)
        gaps = [np.random.gamma(shape=burstiness, scale=1.0 / (rate * burstiness)) for _ in range(n)]
    finally:
        np.random.set_state(state)
    delays = np.cumsum(gaps)
    return delays * ((n / rate) / delays[-1])


def write_dataset(requests: list[RequestSpec], path: Path) -> Path:
    """The requests as the `custom` JSONL dataset `vllm bench serve` replays (prompt and output length)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": q.prompt, "output_tokens": q.max_tokens}) + "\n" for q in requests))
    return path


@dataclass
class VllmBenchRun:
    """One `vllm bench serve` run: its per-request results (our records), its duration, and its own summary."""

    results: list[RequestResult]
    duration_s: float
    own: dict[str, Any] = field(default_factory=dict)


def run_vllm_bench(target: Target, model: str, tokenizer: str, dataset: Path, num_requests: int, out: Path, *,
                   rate: float | None, burstiness: float = 1.0, seed: int = 0,
                   concurrency: int | None = None) -> VllmBenchRun:
    """`vllm bench serve` on `dataset` against `target` (an open loop at `rate`, or unpaced under `concurrency`);
    `out`: its detailed result file. RuntimeError with the tail of its stderr when it fails."""
    argv = ["--backend", "openai", "--base-url", target.base_url.rstrip("/").removesuffix("/v1"),
            "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "custom", "--dataset-path", str(dataset), "--custom-output-len=-1",
            "--skip-chat-template", "--disable-shuffle", "--num-prompts", str(num_requests), "--ignore-eos",
            "--request-rate", str(rate) if rate else "inf", "--burstiness", str(burstiness),
            "--seed", str(seed), "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles",
            "50,99", "--save-result", "--save-detailed", "--result-dir", str(out.parent),
            "--result-filename", out.name, "--disable-tqdm"]
    if concurrency:
        argv += ["--max-concurrency", str(concurrency)]
    env = dict(os.environ)
    if target.api_key:
        env["OPENAI_API_KEY"] = target.api_key
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-c", VLLM_CODE, json.dumps(argv)], env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    data = json.loads(out.read_text())
    t0 = min(data["start_times"])
    results = []
    for i in range(len(data["ttfts"])):
        ok = not data["errors"][i]
        results.append(RequestResult(
            ok=ok, send_s=data["start_times"][i] - t0, prompt_tokens=int(data["input_lens"][i] or 0),
            output_tokens=int(data["output_lens"][i] or 0), ttft_s=data["ttfts"][i], e2e_s=_e2e(data, i),
            itl_s=list(data["itls"][i]), chunk_tokens=[1] * (len(data["itls"][i]) + 1) if ok else [],
            error=data["errors"][i] or None))
    own = {k: v for k, v in data.items() if not isinstance(v, list)}
    return VllmBenchRun(results, float(data["duration"]), own)


def _e2e(data: dict[str, Any], i: int) -> float:
    """vLLM 0.32 saves each request's latency; 0.26's detailed result has none, and vLLM itself then takes
    TTFT + the sum of the inter-token gaps (the last chunk's arrival), which is what we use there too."""
    if "latencies" in data:
        return data["latencies"][i]
    return (data["ttfts"][i] or 0.0) + sum(data["itls"][i] or [])


def run_ours(target: Target, model: str, requests: list[RequestSpec], arrival: Arrival,
             extra_body: dict[str, Any] | None = None) -> tuple[list[RequestResult], float]:
    """Our client on the same requests, after the same one warm-up request `vllm bench serve` sends."""
    load = run_load_sync([target], [requests[0]] + requests, arrival, model=model, api="completions", warmup=1,
                         timeout_s=600, extra_body=extra_body)
    return load.measured(), load.duration_s


def metrics_row(metrics: RunMetrics) -> dict[str, float]:
    """Throughput, goodput and the latency statistics of one run, flat (ms), for tables and JSON."""
    row = {"req_per_s": metrics.request_throughput, "out_tok_per_s": metrics.output_throughput,
           "goodput": metrics.goodput if metrics.goodput is not None else float("nan"),
           "completed": metrics.completed, "failed": metrics.failed}
    for name in METRICS:
        st = getattr(metrics, name)
        for stat in ("mean", "p50", "p99"):
            row[f"{name[:-3]}_{stat}"] = getattr(st, stat) if st is not None else float("nan")
    return row


def _lengths(requests: list[RequestSpec]) -> list[tuple[int, int]]:
    return [(q.prompt_tokens, q.max_tokens) for q in requests]


def served_tokens(results: list[RequestResult]) -> dict[str, int]:
    """The work a run's completed requests did (prompt and output tokens): two clients' latencies compare only
    when these agree."""
    done = [r for r in results if r.ok]
    return {"prompt_tokens": sum(r.prompt_tokens for r in done), "output_tokens": sum(r.output_tokens for r in done)}


def work_text(check: dict[str, Any]) -> str:
    """"; " and the tokens each tool's run served, to end a log line or a table cell; "" for a cross-check
    recorded before it counted them."""
    if not check.get("work"):
        return ""
    o, v = check["work"]["ours"], check["work"]["vllm"]
    same = "" if check.get("same_lengths", True) else " (other request lengths: not the same work)"
    return (f"; prompt / output tokens {o['prompt_tokens']:,} / {o['output_tokens']:,} ours, "
            f"{v['prompt_tokens']:,} / {v['output_tokens']:,} vLLM's{same}")


def cross_check(target: Target, model: str, tokenizer: str, requests: list[RequestSpec], rate: float, workdir: Path,
                *, slo: SLO | None = None, seed: int = 0, vllm_requests: list[RequestSpec] | None = None
                ) -> dict[str, Any]:
    """Our client on `requests`, then `vllm bench serve` on `vllm_requests` (default: the same ones), at `rate` on
    vLLM's schedule: both rows (goodput under `slo`), ours / vLLM per metric, and the tokens each run served.
    Give vLLM's client other prompts of the same lengths when the server may have prefix caching on: a second
    run of the same prompts would be served from the cache, and other lengths are other work."""
    theirs = requests if vllm_requests is None else vllm_requests
    dataset = write_dataset(theirs, workdir / "requests.jsonl")
    offsets = vllm_schedule(len(requests), rate, 1.0, seed)
    ours, ours_s = run_ours(target, model, requests, ReplayArrival(offsets, rate))
    vllm = run_vllm_bench(target, model, tokenizer, dataset, len(theirs), workdir / "vllm.json", rate=rate,
                          seed=seed)
    rows = {"ours": metrics_row(summarize(ours, ours_s, slo)),
            "vllm": metrics_row(summarize(vllm.results, vllm.duration_s, slo))}
    ratio = {k: rows["ours"][k] / v for k, v in rows["vllm"].items() if isinstance(v, float) and v}
    return {"rate": rate, "requests": len(requests), "seed": seed, "same_prompts": theirs is requests,
            "same_lengths": _lengths(theirs) == _lengths(requests),
            "work": {"ours": served_tokens(ours), "vllm": served_tokens(vllm.results)}, **rows,
            "ours_over_vllm": ratio,
            "vllm_own": {k: vllm.own.get(k) for k in ("request_throughput", "output_throughput", "mean_ttft_ms",
                                                      "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms")}}
