"""Measurement: per-request timings -> metrics (stats), resource samplers, vLLM's own metrics and log."""
