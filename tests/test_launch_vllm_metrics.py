"""vLLM's start-up log and /metrics text -> ServerStats (formats captured from vLLM 0.32 CPU)."""

from __future__ import annotations

import http.server
import threading
import time

from harness.measure.vllm_metrics import (
    MetricsScraper,
    kv_capacity_from_log,
    merge_stats,
    parse_prometheus,
    server_stats_from_log,
    stats_from_snapshot,
)

LOG_032_CPU = (
    "(Worker pid=7857) INFO 11-27 22:32:03 [cpu_worker.py:260] Explicitly set (1.0/11.09) GiB for KV cache on node 0.\n"
    "(EngineCore pid=7420) INFO 11-27 22:32:03 [kv_cache_utils.py:2327] CPU KV cache size: 524,288 tokens, "
    "Maximum concurrency for 512 tokens per request: 1024.00x\n"
)
LOG_OLDER_GPU = (
    "INFO 06-01 10:00:00 [kv_cache_utils.py:634] GPU KV cache size: 1,214,560 tokens\n"
    "INFO 06-01 10:00:00 [kv_cache_utils.py:637] Maximum concurrency for 32,768 tokens per request: 37.07x\n"
    "DEBUG 06-01 10:00:00 [loggers.py:120] Engine 000: vllm cache_config_info with initialization after "
    "num_gpu_blocks is: 75910\n"
)

CACHE_INFO = (
    'vllm:cache_config_info{block_size="128",cache_dtype="auto",enable_prefix_caching="True",engine="0",'
    'gpu_memory_utilization="0.92",kv_cache_max_concurrency="1024.0",kv_cache_memory_bytes="1073741824",'
    'kv_cache_size_tokens="524288",num_cpu_blocks="None",num_gpu_blocks="4096"} 1.0'
)


def metrics_text(usage: float, preempt: float, hits: float, queries: float) -> str:
    return "\n".join(
        [
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f'vllm:kv_cache_usage_perc{{engine="0",model_name="/tmp/tiny"}} {usage}',
            f'vllm:num_preemptions_total{{engine="0",model_name="/tmp/tiny"}} {preempt}',
            'vllm:num_preemptions_created{engine="0",model_name="/tmp/tiny"} 1.7958187299974742e+09',
            f'vllm:prefix_cache_queries_total{{engine="0",model_name="/tmp/tiny"}} {queries}',
            f'vllm:prefix_cache_hits_total{{engine="0",model_name="/tmp/tiny"}} {hits}',
            'vllm:request_num_preemptions_bucket{engine="0",le="+Inf",model_name="/tmp/tiny"} 2.0',
            CACHE_INFO,
            "",
        ]
    )


def test_capacity_from_log() -> None:
    cap = kv_capacity_from_log(LOG_032_CPU)
    assert (cap.kv_cache_tokens, cap.max_concurrency, cap.max_concurrency_len, cap.device) == (524288, 1024.0, 512, "CPU")
    cap = kv_capacity_from_log(LOG_OLDER_GPU)
    assert (cap.kv_cache_tokens, cap.max_concurrency, cap.kv_cache_blocks, cap.device) == (1214560, 37.07, 75910, "GPU")
    stats = server_stats_from_log(LOG_032_CPU)
    assert stats.kv_cache_tokens == 524288 and stats.max_concurrency == 1024.0
    assert kv_capacity_from_log("nothing here").kv_cache_tokens is None


def test_parse_and_stats() -> None:
    before = parse_prometheus(metrics_text(0.0, 1, 10, 100))
    after = parse_prometheus(metrics_text(0.25, 4, 40, 200))
    assert after.total("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc") == 0.25
    assert after.labels("vllm:cache_config_info")["num_gpu_blocks"] == "4096"
    s = stats_from_snapshot(after, since=before)
    assert s.preemptions == 3 and s.prefix_cache_hit_rate == 0.3 and s.peak_kv_usage == 0.25
    assert s.kv_cache_blocks == 4096 and s.kv_cache_tokens == 524288 and s.max_concurrency == 1024.0
    # Older names (vllm:gpu_cache_usage_perc) are found too.
    old = parse_prometheus('vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n')
    assert stats_from_snapshot(old).peak_kv_usage == 0.5
    merged = merge_stats(server_stats_from_log(LOG_032_CPU), s)
    assert merged.kv_cache_tokens == 524288 and merged.preemptions == 3


class _Metrics(http.server.BaseHTTPRequestHandler):
    calls = 0

    def do_GET(self) -> None:  # noqa: N802
        type(self).calls += 1
        n = type(self).calls
        usage = 0.8 if n == 3 else 0.1  # one short spike the scraper must catch
        body = metrics_text(usage, n, 2 * n, 4 * n).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_scraper_keeps_peak_and_deltas() -> None:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        scraper = MetricsScraper([(url, "key")], period_s=0.05).start()
        time.sleep(0.5)
        stats = scraper.stop()
    finally:
        httpd.shutdown()
    n = _Metrics.calls
    assert n >= 4 and scraper.errors == 0
    assert stats.peak_kv_usage == 0.8
    assert stats.preemptions == n - 1  # last - first scrape
    assert stats.prefix_cache_hit_rate == 0.5
    assert stats.kv_cache_tokens == 524288
