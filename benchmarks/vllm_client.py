"""`vllm bench serve`'s own client, driven the way `vllm bench serve` drives it, for side-by-side benchmarks.

The request function is vllm/benchmarks/lib/endpoint_request_func.py of the installed vllm, loaded by path:
importing the vllm package itself starts its whole engine import (~10 s) and is not needed for this one module
(it imports aiohttp, regex, tqdm). The driver copies `vllm.benchmarks.serve.benchmark()`: one aiohttp session
with its connector settings (`limit=max_concurrency or 0`), a semaphore of `max_concurrency`, one task per
request created at its arrival time, the default asyncio loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any


class VllmClientMissing(RuntimeError):
    """vllm (or its benchmark request function) is not installed."""


_MODULE: ModuleType | None = None


def request_module() -> ModuleType:
    """The installed vllm's endpoint_request_func module (loaded once)."""
    global _MODULE
    if _MODULE is not None:
        return _MODULE
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise VllmClientMissing("vllm is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "benchmarks" / "lib" / "endpoint_request_func.py"
    if not path.exists():
        raise VllmClientMissing(f"{path.name} not found in this vllm version")
    mod_spec = importlib.util.spec_from_file_location("vllm_endpoint_request_func", path)
    assert mod_spec is not None and mod_spec.loader is not None
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    _MODULE = module
    return module


async def drive(
    inputs: Sequence[Any], *, offsets_s: Sequence[float] | None = None, max_concurrency: int | None = None,
    chat: bool = False,
) -> list[Any]:
    """Send `inputs` (RequestFuncInput) as `vllm bench serve` does; `offsets_s` are arrival offsets (None: all
    at once, then the semaphore makes it a closed loop). Returns RequestFuncOutput in input order."""
    import aiohttp

    mod = request_module()
    func = mod.async_request_openai_chat_completions if chat else mod.async_request_openai_completions
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0, limit_per_host=max_concurrency or 0,
                                     ttl_dns_cache=300, use_dns_cache=True, keepalive_timeout=60,
                                     enable_cleanup_closed=True, force_close=False, ssl=False)
    session = aiohttp.ClientSession(connector=connector, trust_env=True, timeout=mod.AIOHTTP_TIMEOUT)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None

    async def limited(inp: Any) -> Any:
        if semaphore is None:
            return await func(request_func_input=inp, session=session, pbar=None)
        async with semaphore:
            return await func(request_func_input=inp, session=session, pbar=None)

    try:
        tasks = []
        t0 = time.perf_counter()
        for k, inp in enumerate(inputs):
            if offsets_s is not None:
                delay = t0 + offsets_s[k] - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(limited(inp)))
        return list(await asyncio.gather(*tasks))
    finally:
        await session.close()
