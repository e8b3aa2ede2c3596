"""One exception type for mistakes a user can fix, so every entry point prints one line and exits non-zero."""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the file, the key and the allowed values."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        where = ": ".join(part for part in (source, key) if part)
        super().__init__(f"{where}: {message}" if where else message)
        self.source = source
        self.key = key


class HostError(UserError):
    """The host, not the candidate, cannot run trials (a GPU another process holds): every next trial would fail
    alike, so a study stops at the first one instead of failing them all."""


def main_guard(func):  # type: ignore[no-untyped-def]
    """Decorate a CLI main(): UserError becomes 'error: ...' on stderr and exit code 2, not a traceback."""
    import functools
    import sys

    @functools.wraps(func)
    def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
        try:
            return func(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper
