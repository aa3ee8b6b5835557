"""The fault-injection suite's app: every job first writes one ledger row per execution (a SQLite
table in $FAULTS_LEDGER: job, n, pid, attempt), then misbehaves as its name says, so a test can
prove each accepted job ran, and explain every execution beyond the first by a fault."""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import NamedTuple

import backroom

app = backroom.App(source="api")

SCHEMA = "CREATE TABLE IF NOT EXISTS runs (job TEXT, n INTEGER, pid INT, attempt INT, at REAL)"
_leak: list[bytes] = []  # what hog_memory keeps, as a leaking job would


class Execution(NamedTuple):
    job: str
    n: int
    pid: int
    attempt: int
    at: float


def create_ledger(path: str | Path) -> None:
    """Make the ledger file in WAL mode before any worker starts. Switching the journal mode
    needs the file to itself and fails at once ("database is locked", no busy wait) when a
    worker holds it: a job doing it would fail now and then, and count an extra attempt."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(SCHEMA)
    finally:
        db.close()


def _connect(path: str) -> sqlite3.Connection:
    if not Path(path).exists():
        raise RuntimeError(f"no ledger at {path}: the test creates it with create_ledger()")
    db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous = NORMAL")
    return db


_local = threading.local()


def _ledger(ctx: backroom.Context, n: int) -> None:
    """One row, committed before the job goes on (autocommit): a kill after this line leaves
    an execution the broker may not know finished."""
    db = getattr(_local, "db", None)
    if db is None:
        db = _local.db = _connect(os.environ["FAULTS_LEDGER"])
    db.execute(
        "INSERT INTO runs VALUES (?, ?, ?, ?, ?)",
        (ctx.job, n, os.getpid(), ctx.attempt, time.time()),
    )


def executions(path: str | Path, job: str | None = None) -> list[Execution]:
    """Every execution the ledger saw (of one job, or all), oldest first."""
    db = _connect(str(path))
    try:
        rows = db.execute("SELECT job, n, pid, attempt, at FROM runs ORDER BY rowid").fetchall()
    finally:
        db.close()
    return [Execution(*row) for row in rows if job is None or row[0] == job]


def _wait_for(ctx: backroom.Context, path: str, cooperative: bool) -> bool:
    """Poll for `path` (the test creates it); True when it appeared, False when cancelled."""
    while not Path(path).exists():
        if cooperative and ctx.cancelled:
            return False
        time.sleep(0.01)  # a job polling for a file the test creates
    return True


@app.job(retries=3, retry_backoff=0.05)
def record(ctx: backroom.Context, n: int) -> int:
    """A short job: one ledger row."""
    _ledger(ctx, n)
    return n


@app.job(retries=1, retry_backoff=0.05)
def wait_for_file(ctx: backroom.Context, n: int, path: str) -> int:
    """A long job: runs until `path` exists; stops early (cooperatively) when cancelled."""
    _ledger(ctx, n)
    return n if _wait_for(ctx, path, cooperative=True) else -1


@app.job(retries=0)
def ignore_cancel(ctx: backroom.Context, n: int, path: str) -> int:
    """A long job that never looks at ctx.cancelled."""
    _ledger(ctx, n)
    _wait_for(ctx, path, cooperative=False)
    return n


@app.job(retries=0)
async def async_wait_for_file(ctx: backroom.Context, n: int, path: str) -> int:
    """An async long job: cancelled by task cancellation."""
    _ledger(ctx, n)
    while not Path(path).exists():
        await asyncio.sleep(0.01)
    return n


@app.job(retries=1, retry_backoff=0.05, timeout=2)
def spin(ctx: backroom.Context, n: int) -> None:
    """Never returns (the GIL is released between bytecodes, so the worker can record it)."""
    _ledger(ctx, n)
    while True:
        pass


@app.job(retries=0, timeout=1)
def hold_the_gil(ctx: backroom.Context, n: int) -> bool:
    """Never returns and never lets go of the GIL (catastrophic regex backtracking in C): the
    worker's own event loop freezes, so only the supervisor can stop it."""
    _ledger(ctx, n)
    return re.match(r"(a+)+$", "a" * 64 + "b") is not None


@app.job(retries=1, retry_backoff=0.05)
def exit_hard(ctx: backroom.Context, n: int) -> None:
    """Ends its process at once, as a misbehaving library might."""
    _ledger(ctx, n)
    os._exit(1)


@app.job(retries=1, retry_backoff=0.05)
def segfault(ctx: backroom.Context, n: int) -> None:
    """Reads address 0: SIGSEGV, as a crashing C extension would."""
    _ledger(ctx, n)
    ctypes.string_at(0)


@app.job(retries=0)
def hog_memory(ctx: backroom.Context, n: int, mb: int) -> int:
    """Allocates `mb` megabytes and keeps them (a leak)."""
    _ledger(ctx, n)
    _leak.append(b"x" * (mb * 1_000_000))
    return os.getpid()


@app.job(retries=0)
def whoami(ctx: backroom.Context, n: int) -> int:
    """Returns the pid of the process that ran it."""
    _ledger(ctx, n)
    return os.getpid()
