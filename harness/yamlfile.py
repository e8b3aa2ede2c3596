"""Reading the YAML files users write (sweeps, spaces, workloads, configs), with one-line errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from harness.errors import UserError


def read_yaml(path: str | Path, what: str) -> Any:
    """Parse `path`; a missing file or malformed YAML is a UserError naming the file (and the line)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no such {what} file", source=str(p))
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise UserError(f"malformed YAML{where}: {problem}", source=str(p)) from None


def parse_scalars(items: list[str], option: str) -> dict[str, Any]:
    """`KEY=VALUE` command-line items -> typed values read as YAML scalars (`64`, `true`, `null`, `0.9`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"expected KEY=VALUE, got {item!r}", key=option)
        try:
            out[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise UserError(f"cannot read the value of {item!r}", key=option) from None
    return out
