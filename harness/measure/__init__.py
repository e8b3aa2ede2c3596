"""Measurement: per-request timings -> metrics (stats), resource samplers, vLLM's own metrics and log."""

from harness.measure.sampler import ResourceSampler
from harness.measure.stats import latency_stats, stat_at, summarize
from harness.measure.vllm_metrics import MetricsScraper, kv_capacity_from_log, merge_stats, server_stats_from_log
from harness.measure.vllm_metrics import wait_idle

__all__ = ["MetricsScraper", "ResourceSampler", "kv_capacity_from_log", "latency_stats", "merge_stats",
           "server_stats_from_log", "stat_at", "summarize", "wait_idle"]
