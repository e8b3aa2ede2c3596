"""Paths as committed files write them: no machine paths in configs, run records or reports.

A committed file must read the same on every clone, so a path into the project is written relative to the project
root (`models/tiny-llama`, `.venv/bin/python`), a shipped preset by its name (`chat-mix`, which `--workload`
accepts as is), and a file elsewhere by its file name only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def portable_path(path: str | Path, *, presets: Path | None = None) -> str:
    """`path` as a committed file names it: a preset under `presets` by its stem, a project file relative to the
    project, any other absolute path by its file name; a relative path (already portable) as given."""
    text = str(path)
    if not text or not Path(text).is_absolute():
        return text
    p = Path(text).resolve()
    if presets is not None and p.parent == presets.resolve():
        return p.stem
    try:
        return p.relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return p.name


def portable(obj: Any) -> Any:
    """`obj` (JSON-like) with every absolute path into the project, whole or inside a string such as
    `--model=/root/proj/models/x`, rewritten relative to the project root."""
    prefix = str(PROJECT_ROOT) + "/"
    if isinstance(obj, str):
        return obj.replace(prefix, "") if prefix in obj else obj
    if isinstance(obj, dict):
        return {k: portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    return obj
