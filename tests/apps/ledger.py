"""A test app whose jobs record every execution in a ledger (a SQLite table, or a Redis hash when
LEDGER_URL is a redis:// URL), so tests can prove each job ran exactly once, or explain why not."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path

import backroom

app = backroom.App(source="api")


def _ledger_path() -> str:
    return os.environ.get("LEDGER_DB") or str(Path(os.environ.get("TMPDIR", "/tmp")) / "ledger.db")


def init_ledger(path: str) -> None:
    """Create the ledger in WAL mode, so many job threads and processes append without
    blocking each other's readers (a rollback journal stalls under 16 concurrent writers)."""
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS runs (n INTEGER, pid INTEGER, at REAL)")
    finally:
        db.close()


def ledger_counts(path: str) -> dict[int, int]:
    """n -> how many times `record(n)` ran."""
    with sqlite3.connect(path, timeout=30) as db:
        db.execute("CREATE TABLE IF NOT EXISTS runs (n INTEGER, pid INTEGER, at REAL)")
        return dict(db.execute("SELECT n, COUNT(*) FROM runs GROUP BY n").fetchall())


@app.job(retries=3, retry_backoff=0.05)
def record(ctx: backroom.Context, n: int) -> int:
    """Write one ledger row per execution."""
    # autocommit: each statement is its own write transaction, so writers queue on the busy
    # timeout instead of deadlocking as readers upgrading to writers
    db = sqlite3.connect(_ledger_path(), timeout=60, isolation_level=None)
    try:
        db.execute("CREATE TABLE IF NOT EXISTS runs (n INTEGER, pid INTEGER, at REAL)")
        db.execute("INSERT INTO runs VALUES (?, ?, ?)", (n, os.getpid(), time.time()))
    finally:
        db.close()
    return n


@app.job(retries=1, retry_backoff=0.05)
def block_until(ctx: backroom.Context, path: str, started: str = "") -> str:
    """Signal that it started (touch `started`), then wait until `path` exists."""
    if started:
        Path(started).write_text(f"{os.getpid()} {ctx.attempt}")
    deadline = time.monotonic() + 60
    while not Path(path).exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)  # test fixture job polling for a file the test creates
    return f"done on attempt {ctx.attempt}"


@app.job()
def add(ctx: backroom.Context, a: int, b: int) -> int:
    return a + b


@app.job()
async def greet(ctx: backroom.Context, name: str) -> str:
    await asyncio.sleep(0)
    return f"hello {name}"


@app.job(retries=2, retry_backoff=0.01)
def always_fails(ctx: backroom.Context, message: str) -> None:
    raise RuntimeError(message)


@app.job(sources={"scheduler"})
def send_invoices(ctx: backroom.Context, month: str) -> dict[str, int]:
    return {"sent": 3}
