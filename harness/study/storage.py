"""Where studies are stored: storage URLs, the Optuna storage itself, and the locks around creating it.

Optuna's RDB storage (SQLite on one node, PostgreSQL across nodes) keeps every study. This module opens it the
same way for the sweep, the report and the notebook:

- `make_storage()`: RDB storage with heartbeats and the retry of a dead worker's trial; a bad URL, an unreachable
  host or a wrong password is a one-line UserError at once. `redact()` hides the password wherever a URL is shown.
- `storage_url()`: a plain `postgresql://` URL is given to the PostgreSQL driver that is installed (SQLAlchemy 2.1
  defaults to psycopg 3, the test extra installs psycopg2), and a connect timeout so an unreachable host fails fast.
- `schema_lock()`: workers started together on an empty database create Optuna's tables one at a time.
- `study_lock()`: one short critical section per study (create-or-load, identity check, queueing the baselines),
  so two workers starting together neither queue the baselines twice nor stamp two identities. PostgreSQL: an
  advisory lock (released by the server if the worker dies); SQLite (one node): a file lock in the temp dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import re
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import optuna

from harness.errors import UserError

# A worker silent for GRACE_S is presumed dead; its trial is failed and retried (env vars: for tests and slow disks).
HEARTBEAT_S = int(os.environ.get("VLLM_TUNE_HEARTBEAT_S", "20"))
GRACE_S = int(os.environ.get("VLLM_TUNE_GRACE_S", "60"))
MAX_RETRY = 2


def default_storage(results_dir: str | Path) -> str:
    path = Path(results_dir).resolve() / "studies.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def rdb(storage: Any) -> Any:
    """The RDBStorage itself: a study holds it wrapped in Optuna's cache layer (`_CachedStorage._backend`)."""
    return getattr(storage, "_backend", storage)


def make_storage(url: str) -> optuna.storages.BaseStorage:
    """RDB storage with heartbeats, so a killed worker's trial is failed and retried rather than left RUNNING.

    Connects at once: a bad URL, an unreachable host or a wrong password is a one-line UserError here, before any
    study is touched."""
    try:
        sa_url, engine_kwargs = storage_url(url)
        with schema_lock(sa_url, engine_kwargs), warnings.catch_warnings():  # nodes started together on an empty db
            # heartbeats and the retry callback are marked experimental; they are what multi-node resilience rests on
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                sa_url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))
    except Exception as exc:  # sqlalchemy raises many types for a bad URL, host or password
        raise UserError(f"cannot open the study storage: {_first_line(exc)}", source=redact(url),
                        key="storage") from None


def _first_line(exc: BaseException) -> str:
    """The driver's reason without SQLAlchemy's '(psycopg2.OperationalError)' prefix and background links."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = " ".join(lines[:2]) if lines and lines[0].endswith("failed:") else (lines[0] if lines else "")
    line = re.sub(r"^\([\w.]+\)\s*", "", line)
    return line or type(exc).__name__


def redact(url: str) -> str:
    """Hide a password in a storage URL before it is printed or written into a report."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


# ---------------------------------------------------------------------------------------------- storage URL


def storage_url(url: str) -> tuple[str, dict[str, Any]]:
    """(URL for SQLAlchemy, engine kwargs). Raises ValueError with a one-line reason for an unusable URL."""
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite"):
        engine_kwargs["connect_args"] = {"timeout": 60}
        return url, engine_kwargs
    engine_kwargs["pool_pre_ping"] = True
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("postgresql", "postgres", "postgresql+psycopg2", "postgresql+psycopg"):
        driver = scheme.partition("+")[2]
        if not driver:
            driver = _installed("psycopg2", "psycopg")
            if driver is None:
                raise ValueError("no PostgreSQL driver installed: pip install psycopg2-binary")
            url = f"postgresql+{driver}://" + url.split("://", 1)[1]
        elif _installed(driver) is None:
            raise ValueError(f"the URL asks for the {driver} driver, which is not installed: pip install "
                             f"{'psycopg2-binary' if driver == 'psycopg2' else 'psycopg[binary]'}")
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    return url, engine_kwargs


def _installed(*modules: str) -> str | None:
    for name in modules:
        if importlib.util.find_spec(name) is not None:
            return name
    return None


# ---------------------------------------------------------------------------------------------- lock


@contextlib.contextmanager
def study_lock(storage: optuna.storages.BaseStorage, name: str, timeout_s: float = 300.0) -> Iterator[None]:
    """Mutual exclusion among every worker of study `name` for a few storage calls (never around a trial)."""
    engine = getattr(rdb(storage), "engine", None)
    dialect = getattr(getattr(engine, "dialect", None), "name", "")
    if dialect == "postgresql":
        import sqlalchemy

        with engine.connect() as conn:  # its own session: the lock dies with the worker's connection
            conn.execute(sqlalchemy.text(f"SET lock_timeout = {int(timeout_s * 1000)}"))
            with _advisory_lock(conn, f"vllm-tune:{name}"):
                yield
        return
    path = _sqlite_path(str(getattr(engine, "url", ""))) if dialect == "sqlite" else None
    if path is None:  # in-memory SQLite or another database: one process only
        with _LOCAL_LOCK:
            yield
        return
    with _LOCAL_LOCK, _file_lock(_lock_path(path, "study"), timeout_s):
        yield


def _lock_path(db_path: str, what: str) -> str:
    """A lock file per SQLite database in the temp dir (SQLite is one machine), not beside the results."""
    d = Path(tempfile.gettempdir()) / "vllm-tune-locks"
    d.mkdir(exist_ok=True)
    key = hashlib.sha256(str(Path(db_path).resolve()).encode()).hexdigest()[:16]
    return str(d / f"{key}.{what}.lock")


@contextlib.contextmanager
def _file_lock(path: str, timeout_s: float) -> Iterator[None]:
    """SQLite is one node: an flock next to the database file serializes its local workers."""
    with open(path, "a+") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"lock {path} held for more than {timeout_s:g} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


_LOCAL_LOCK = threading.RLock()


@contextlib.contextmanager
def schema_lock(url: str, engine_kwargs: dict[str, Any]) -> Iterator[None]:
    """Serialize Optuna's table creation: workers creating the schema of an empty database at the same moment
    collide (PostgreSQL: 'duplicate key value violates unique constraint pg_type_typname_nsp_index'; SQLite:
    'UNIQUE constraint failed: alembic_version.version_num')."""
    if url.startswith("sqlite"):
        path = _sqlite_path(url)
        if path is None:
            yield
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(_lock_path(path, "schema"), 300.0):
            yield
        return
    if not url.startswith(("postgresql", "postgres")):
        yield
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool,
                                      connect_args=engine_kwargs.get("connect_args", {}))
    try:
        with engine.connect() as conn, _advisory_lock(conn, "vllm-tune:optuna-schema"):
            yield
    finally:
        engine.dispose()


@contextlib.contextmanager
def _advisory_lock(conn: Any, name: str) -> Iterator[None]:
    """A PostgreSQL session-level advisory lock keyed by `name` (released by the server if the session dies)."""
    import sqlalchemy

    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
    conn.commit()
    try:
        yield
    finally:
        conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        conn.commit()


def _sqlite_path(url: str) -> str | None:
    rest = url.split(":///", 1)[1] if ":///" in url else ""
    rest = rest.split("?", 1)[0]
    return rest if rest and rest != ":memory:" else None
