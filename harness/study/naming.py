"""Study names and where a study's files live: derived, never typed, so a rerun finds the same study."""

from __future__ import annotations

import re
from pathlib import Path


def hardware_tag(name: str, count: int) -> str:
    """`NVIDIA L40S` x4 -> `l40sx4`; a CPU host -> `cpu`."""
    if count <= 0 or name.lower().startswith("cpu"):
        return "cpu"
    short = re.sub(r"^(nvidia|amd)\s+", "", name.strip(), flags=re.I)
    short = re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-")
    return f"{short}x{count}"


def study_name(model_slug: str, hw_tag: str, workload: str, objective: str) -> str:
    return f"{model_slug}@{hw_tag}@{workload}@{objective}"


def study_dir(results_dir: str | Path, name: str) -> Path:
    return Path(results_dir) / name.replace("@", "__")
