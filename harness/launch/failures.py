"""Why a vLLM server did not start (or died): its exit code and log -> a classified `Failure`.

The study treats kinds differently: `oom` and `kv_too_small` are facts about the configuration on this hardware
(prune, and `max_fitting_len` tells the planner what would fit), `bad_arg` is a mistake in the search space
(stop and tell the user), `start_timeout` and `crash` are suspicious and kept with the log tail for a human.

vLLM's engine core runs in a child process: when it fails, the API server process logs the root cause from the
child and then raises its own "Engine core initialization failed. See root cause above." So the classifier
looks for the most specific cause anywhere in the log, not just at the last exception.
"""

from __future__ import annotations

import re

from harness.records import Failure

LOG_TAIL_LINES = 60

# vLLM 0.32 v1/core/kv_cache_utils.py: "To serve at least one request with the model's max seq len (N), (X GiB KV
# cache is needed, which is larger than the available KV cache memory (Y GiB). Based on the available memory,
# the estimated maximum model length is M. ..."; older versions: "The model's max seq len (N) is larger than the
# maximum number of tokens that can be stored in KV cache (K). Try increasing ..."
_KV_TOO_SMALL = [
    re.compile(r"KV\s+cache is needed, which is larger than the available KV cache memory"),
    re.compile(r"is larger than the maximum number of tokens that can be stored in KV cache"),
    re.compile(r"max seq len \(\d+\) is larger than the maximum number of tokens"),
]
_ESTIMATED_LEN = re.compile(r"estimated maximum model length is (\d+)")
_KV_MAX_TOKENS = re.compile(r"maximum number of tokens that can be stored in KV cache \((\d+)\)")

_OOM = [
    re.compile(r"CUDA out of memory"),
    re.compile(r"torch\.(?:cuda\.)?OutOfMemoryError"),
    re.compile(r"\bOutOfMemoryError\b"),
    re.compile(r"No available memory for the cache blocks"),
    re.compile(r"[Cc]annot allocate memory"),
    re.compile(r"\bMemoryError\b"),
    re.compile(r"Failed to load model - not enough GPU memory"),
    re.compile(r"is less than desired (?:GPU|CPU) memory utilization"),
    re.compile(r"is less than the engine's budget"),
    re.compile(r"HIP out of memory|XPU out of memory"),
    re.compile(r"out of memory occurred when warming up"),
    re.compile(r"Insufficient memory|not enough memory", re.IGNORECASE),
]

_BAD_ARG = [
    re.compile(r"error: argument [^\n]*"),
    re.compile(r"error: unrecognized arguments:[^\n]*"),
    re.compile(r"error: the following arguments are required:[^\n]*"),
    re.compile(r"error: ambiguous option:[^\n]*"),
    re.compile(r"pydantic_core\._pydantic_core\.ValidationError[^\n]*"),
    re.compile(r"\bValidationError: \d+ validation errors? for \w+"),
]

# Python exception lines: "ValueError: ...", "torch.OutOfMemoryError: ...", "vllm.x.SomeError: ..."
_EXC_LINE = re.compile(r"^(?:[\w.]+\.)?(\w*(?:Error|Exception|Exit|Interrupt))(?::\s*(.*))?$")
# Strip vLLM's log prefix: "(EngineCore pid=123) ERROR 11-27 22:31:02 [core.py:1510] " and plain "ERROR ... ]"
_LOG_PREFIX = re.compile(r"^(?:\(\w+(?:_\w+)?(?: pid=\d+)?\)\s+)?(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\S+\s+\S+\s+\[[^\]]*\]\s+)?")
# Wrapper errors that say "see the root cause above": never the message when something better exists.
_WRAPPERS = (
    "Engine core initialization failed",
    "Frontend process failed during engine core initialization",
    "EngineCore failed to start",
    "Engine process failed to start",
)


def _strip(line: str) -> str:
    return _LOG_PREFIX.sub("", line.rstrip())


def _tail(lines: list[str], n: int = LOG_TAIL_LINES) -> str:
    return "\n".join(lines[-n:])


def exception_lines(log_text: str) -> list[tuple[str, str]]:
    """Every `SomeError: message` line in the log, in order, as (exception name, full stripped line)."""
    out = []
    for raw in log_text.splitlines():
        line = _strip(raw).strip()
        m = _EXC_LINE.match(line)
        if m and not line.startswith(("Traceback", "During handling", "The above exception")):
            out.append((m.group(1), line))
    return out


def _first_match(patterns: list[re.Pattern[str]], lines: list[str]) -> str | None:
    for pat in patterns:
        for line in reversed(lines):
            if pat.search(line):
                return line.strip()
    return None


def _config_value_error(excs: list[tuple[str, str]]) -> str | None:
    """A ValueError / TypeError raised while vLLM validated its configuration (before any memory was touched)."""
    for name, line in reversed(excs):
        if name in ("ValidationError",):
            return line
        if name in ("ValueError", "TypeError", "NotImplementedError") and not any(w in line for w in _WRAPPERS):
            return line
    return None


def classify(log_text: str, exit_code: int | None, timed_out: bool) -> Failure:
    """Exit code + server log -> Failure(kind in oom | kv_too_small | bad_arg | start_timeout | crash).

    Order matters: a KV-cache-too-small error is also phrased in terms of memory, and an OOM is often followed
    by wrapper errors, so the specific causes are looked for first, anywhere in the log.
    """
    raw_lines = log_text.splitlines()
    lines = [_strip(raw) for raw in raw_lines]
    tail = _tail(raw_lines)
    # Only error lines count for memory causes: a warning that mentions memory is not why a server died.
    err_lines = [line for raw, line in zip(raw_lines, lines) if _is_error_line(raw, line)]

    kv_line = _first_match(_KV_TOO_SMALL, err_lines)
    if kv_line is not None:
        m = _ESTIMATED_LEN.search(log_text)
        max_len = int(m.group(1)) if m else None
        if max_len is None:
            m2 = _KV_MAX_TOKENS.search(log_text)
            max_len = int(m2.group(1)) if m2 else None
        return Failure("kv_too_small", _shorten(kv_line), tail, max_fitting_len=max_len, exit_code=exit_code)

    oom_line = _first_match(_OOM, err_lines)
    if oom_line is not None:
        return Failure("oom", _shorten(oom_line), tail, exit_code=exit_code)

    excs = exception_lines(log_text)
    bad_line = _first_match(_BAD_ARG, lines)
    if bad_line is not None:
        # pydantic prints the offending field and message on the following lines: include them.
        if "ValidationError" in bad_line:
            detail = _validation_detail(lines, bad_line)
            bad_line = f"{bad_line} {detail}".strip()
        return Failure("bad_arg", _shorten(bad_line), tail, exit_code=exit_code)

    if timed_out:
        last = excs[-1][1] if excs else "server did not answer /health in time"
        return Failure("start_timeout", _shorten(last), tail, exit_code=exit_code)

    config_error = _config_value_error(excs) if _looks_like_config_phase(log_text) else None
    if config_error is not None:
        return Failure("bad_arg", _shorten(config_error), tail, exit_code=exit_code)

    root = next((line for _, line in reversed(excs) if not any(w in line for w in _WRAPPERS)), None)
    message = root or (excs[-1][1] if excs else f"server exited with code {exit_code}")
    return Failure("crash", _shorten(message), tail, exit_code=exit_code)


def _is_error_line(raw: str, stripped: str) -> bool:
    """An exception line (`ValueError: ...`) or a line vLLM logged at ERROR/CRITICAL level."""
    if _EXC_LINE.match(stripped.strip()):
        return True
    return bool(re.search(r"\b(?:ERROR|CRITICAL)\b \d\d-\d\d ", raw))


def _looks_like_config_phase(log_text: str) -> bool:
    """True when the server died before loading weights: a ValueError then is vLLM rejecting its arguments.

    Markers of later phases (weights loading, KV cache sizing) mean a ValueError is a runtime problem, a crash.
    """
    later = ("Loading weights took", "Model loading took", "Loading safetensors checkpoint shards", "KV cache size")
    return not any(marker in log_text for marker in later)


def _validation_detail(lines: list[str], header: str) -> str:
    """The 'field / Value error, ...' lines that follow a pydantic ValidationError header."""
    try:
        i = max(idx for idx, line in enumerate(lines) if line.strip() == header)
    except ValueError:
        return ""
    detail = []
    for line in lines[i + 1 : i + 6]:
        text = line.strip()
        if not text or text.startswith("For further information"):
            break
        detail.append(text)
    return " | ".join(detail)


def _shorten(text: str, limit: int = 500) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
