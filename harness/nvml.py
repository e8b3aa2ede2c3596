"""NVIDIA's management library, opened the same way everywhere: `pynvml` initialised, or None without it.

A CPU host, a machine without the driver or without the `pynvml` package all read as "no NVML": callers then
measure or check nothing on GPUs instead of failing.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator


def nvml() -> Any | None:
    """The `pynvml` module after `nvmlInit()`, or None when NVML is not usable here."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # noqa: BLE001 - ImportError, NVMLError_LibraryNotFound, _DriverNotLoaded, ...
        return None


@contextlib.contextmanager
def nvml_session() -> Iterator[Any | None]:
    """`nvml()` for a few calls, shut down again on exit (NVML counts its inits)."""
    nv = nvml()
    try:
        yield nv
    finally:
        if nv is not None:
            try:
                nv.nvmlShutdown()
            except Exception:  # noqa: BLE001
                pass
