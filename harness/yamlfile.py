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


def check_keys(data: dict[str, Any], allowed: tuple[str, ...], source: str, key: str | None) -> None:
    """An unknown key in a user mapping is a UserError listing the allowed ones."""
    unknown = set(data) - set(allowed)
    if unknown:
        raise UserError(f"unknown key(s) {sorted(unknown)}; allowed: {list(allowed)}", source=source, key=key)


def positive(value: Any, source: str, key: str, *, integer: bool = False, allow_none: bool = True) -> Any:
    """`value` as a positive int/float, else a UserError naming `key` (None passes when `allow_none`)."""
    if value is None and allow_none:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and int(value) == value
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise UserError(f"must be {kind}, got {value!r}", source=source, key=key)
    return int(value) if integer else float(value)
