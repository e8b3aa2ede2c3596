"""Launching vLLM servers: argv from settings (checked against the installed vLLM's parser), the server process,
its failures and its teardown, and where each server runs (GPU sets, CPU cores, slots). Importing this package
imports nothing heavy (no vllm, no torch)."""

from harness.launch.failures import classify
from harness.launch.placement import (Replica, Slot, SlotPool, client_cores, core_ranges, cpu_bind_sets, cpu_slots,
                                      gpu_sets, replica_placement, visible_gpus)
from harness.launch.server import Server, ServerGroup, ServerSpec, ServerStartError, stop_all
from harness.launch.vllm_args import ArgSpec, load_argspec

__all__ = ["ArgSpec", "Replica", "Server", "ServerGroup", "ServerSpec", "ServerStartError", "Slot", "SlotPool",
           "classify", "client_cores", "core_ranges", "cpu_bind_sets", "cpu_slots", "gpu_sets", "load_argspec", "replica_placement",
           "stop_all", "visible_gpus"]
