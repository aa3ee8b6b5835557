"""backroom, on Redis (BENCH_BACKROOM=redis, default) or SQLite (BENCH_BACKROOM=sqlite).
The jobs are plain sync functions (run on the worker's thread pool, the common case);
BENCH_BACKROOM_ASYNC=1 makes them `async def` (run on the worker's event loop)."""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# the repository's backroom, or another source tree's (BENCH_BACKROOM_SRC: A/B a prototype)
sys.path.insert(0, os.environ.get("BENCH_BACKROOM_SRC") or os.path.dirname(os.path.dirname(HERE)))

import backroom  # noqa: E402
from common import (  # noqa: E402
    REDIS_URL,
    SQLITE_DIR,
    incr_body,
    latency_body,
    main,
    mark_body,
    nothing_body,
)

KIND = os.environ.get("BENCH_BACKROOM", "redis")
DB = os.path.join(SQLITE_DIR, "backroom.db")
URL = REDIS_URL if KIND == "redis" else f"sqlite:///{DB}"
CONCURRENCY = os.environ.get("BENCH_BACKROOM_CONCURRENCY", "8")

app = backroom.App(URL, source="api")

if os.environ.get("BENCH_BACKROOM_ASYNC") == "1":

    @app.job()
    async def incr() -> None:
        incr_body()

    @app.job()
    async def noop() -> None:
        nothing_body()

    @app.job()
    async def mark() -> None:
        mark_body()

    @app.job()
    async def lat(sent: float) -> None:
        latency_body(sent)

else:

    @app.job()
    def incr() -> None:
        incr_body()

    @app.job()
    def noop() -> None:
        nothing_body()

    @app.job()
    def mark() -> None:
        mark_body()

    @app.job()
    def lat(sent: float) -> None:
        latency_body(sent)


def _version() -> str:
    from importlib.metadata import version

    return version("backroom")


def _worker() -> None:
    from backroom.cli import main as backroom_main

    sys.argv = ["backroom", "worker", "--app", "br:app", "--in-process",
                "--concurrency", CONCURRENCY]  # fmt: skip
    sys.exit(backroom_main())


def _file_bytes() -> int:
    import sqlite3

    app.broker  # noqa: B018 - creates the schema, so the baseline counts it
    with sqlite3.connect(DB) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(DB)


def cli() -> None:
    main(
        version=_version,
        enqueue_one=lambda _i: app.enqueue("incr"),
        enqueue_batch=lambda size: app.enqueue_many("incr", [{}] * size),
        send_latency=lambda sent: app.enqueue("lat", {"sent": sent}),
        run_worker=_worker,
        enqueue_noops=lambda size: app.enqueue_many("noop", [{}] * size),
        enqueue_mark=lambda: app.enqueue("mark"),
        queued_bytes=_file_bytes if KIND == "sqlite" else None,
    )
