"""Launching vLLM servers: argv from settings (checked against the installed vLLM's parser), the server process,
its failures and its teardown. Importing this package imports nothing heavy (no vllm, no torch)."""
