"""Optuna studies: one per (model, hardware, workload, objective), with baselines, constraints and confirmation."""
