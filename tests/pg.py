"""A throwaway PostgreSQL server for tests: initdb into a temp dir, start on a free 127.0.0.1 port, stop, remove.

Uses Debian's `postgresql` package (`setup.sh --test` installs it). PostgreSQL refuses to run as root, so as root
the cluster is created and run as the `postgres` system user (runuser); otherwise as the current user. Host
connections need a password (scram-sha-256), so a wrong password is really refused; the unix socket (in the
temp dir, nowhere else) is trusted and only used to create the test role and database.

    with throwaway_postgres() as pg:
        pg.url            # postgresql://tuner:<password>@127.0.0.1:<port>/vllm_tune
        pg.psql("SELECT 1")
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


def bin_dir() -> Path | None:
    """The newest installed PostgreSQL server's bin dir (Debian layout), or the one `initdb` on PATH lives in."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if
                   p.split("/")[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(os.path.realpath(on_path)).parent if on_path else None


def unavailable_reason() -> str | None:
    """None when a server can be started here; else why not (binaries absent, or root without a postgres user)."""
    if bin_dir() is None:
        return "PostgreSQL server binaries not found (install Debian's 'postgresql' package: setup.sh --test)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run the server as"
        if shutil.which("runuser") is None:
            return "running as root and 'runuser' is missing"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    bindir: Path
    root: Path  # data dir, socket and log live under it
    port: int
    user: str
    password: str
    database: str
    run_as: str | None  # system user that owns the cluster (root: 'postgres')

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def url_with(self, *, password: str | None = None, port: int | None = None, database: str | None = None) -> str:
        return (f"postgresql://{self.user}:{password if password is not None else self.password}@127.0.0.1:"
                f"{port if port is not None else self.port}/{database or self.database}")

    def _cmd(self, argv: list[str]) -> list[str]:
        return (["runuser", "-u", self.run_as, "--"] + argv) if self.run_as else argv

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess[str]:  # type: ignore[no-untyped-def]
        return subprocess.run(self._cmd(argv), cwd=self.root, text=True, capture_output=True, **kw)

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL as the cluster's superuser over the unix socket; returns the unaligned output."""
        proc = self.run([str(self.bindir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                         "-h", str(self.root), "-p", str(self.port), "-U", "postgres", "-d", database, "-c", sql],
                        timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"psql failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout.strip()

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"


@contextlib.contextmanager
def throwaway_postgres(user: str = "tuner", database: str = "vllm_tune") -> Iterator[Postgres]:
    """Start a fresh cluster; yield it; stop it and delete every file, also when the test fails."""
    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    bindir = bin_dir()
    assert bindir is not None
    run_as = "postgres" if os.geteuid() == 0 else None
    # Not under pytest's tmp dir: that is 0700 root, which the postgres user cannot enter.
    root = Path(tempfile.mkdtemp(prefix="vllm-tune-pg-"))
    if run_as:
        ent = pwd.getpwnam(run_as)
        os.chown(root, ent.pw_uid, ent.pw_gid)
    pg = Postgres(bindir=bindir, root=root, port=_free_port(), user=user, password=secrets.token_hex(8),
                  database=database, run_as=run_as)
    started = False
    watchdog: subprocess.Popen[bytes] | None = None
    try:
        init = pg.run([str(bindir / "initdb"), "-D", str(pg.data), "-U", "postgres", "--auth-local=trust",
                       "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync"], timeout=120)
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()[-2000:]}")
        for attempt in range(3):  # the free port may be taken between the check and the bind
            opts = (f"-p {pg.port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
                    f"-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
            start = pg.run([str(bindir / "pg_ctl"), "-D", str(pg.data), "-l", str(pg.log), "-o", opts, "-w",
                            "-t", "60", "start"], timeout=120)
            if start.returncode == 0:
                started = True
                break
            if attempt == 2 or "could not bind" not in _read(pg.log):
                raise RuntimeError(f"pg_ctl start failed: {start.stderr.strip()} {_read(pg.log)[-2000:]}")
            pg.port = _free_port()
        # If this process dies without its finally (SIGKILL, a CI timeout), a watchdog stops and removes the
        # cluster when our end of its stdin pipe closes.
        watchdog = subprocess.Popen(
            ["sh", "-c", 'read _; "$@" >/dev/null 2>&1; rm -rf "$0"', str(root)]
            + pg._cmd([str(bindir / "pg_ctl"), "-D", str(pg.data), "-m", "immediate", "-w", "stop"]),
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root,
            start_new_session=True)
        pg.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{pg.password}'")
        pg.psql(f"CREATE DATABASE {database} OWNER {user}")
        yield pg
    finally:
        if started:
            pg.run([str(bindir / "pg_ctl"), "-D", str(pg.data), "-m", "immediate", "-w", "stop"], timeout=120)
        shutil.rmtree(root, ignore_errors=True)
        if watchdog is not None:
            watchdog.stdin.close()  # type: ignore[union-attr]
            watchdog.wait(timeout=60)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
