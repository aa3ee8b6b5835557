"""huey, on Redis (BENCH_HUEY=redis, default: RedisHuey, blocking BRPOP) or SQLite
(BENCH_HUEY=sqlite: SqliteHuey). One consumer process with its default single worker thread;
BENCH_HUEY_WORKERS raises the thread count. Batch path: `task.map` (one call per job inside)."""

from __future__ import annotations

import os

import huey
from common import REDIS_URL, SQLITE_DIR, incr_body, latency_body, main, mark_body, nothing_body

KIND = os.environ.get("BENCH_HUEY", "redis")
DB = os.path.join(SQLITE_DIR, "huey.db")
WORKERS = int(os.environ.get("BENCH_HUEY_WORKERS", "1"))

if KIND == "redis":
    queue = huey.RedisHuey("bench", url=REDIS_URL)
else:
    queue = huey.SqliteHuey("bench", filename=DB)


@queue.task()
def incr() -> None:
    incr_body()


@queue.task()
def noop() -> None:
    nothing_body()


@queue.task()
def mark() -> None:
    mark_body()


@queue.task()
def lat(sent: float) -> None:
    latency_body(sent)


def _worker() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    queue.create_consumer(workers=WORKERS, worker_type="thread").run()


def _file_bytes() -> int:
    import sqlite3

    with sqlite3.connect(DB) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(DB)


def cli() -> None:
    main(
        version=lambda: huey.__version__,
        enqueue_one=lambda _i: incr(),
        enqueue_batch=lambda size: incr.map([()] * size),
        send_latency=lambda sent: lat(sent),
        run_worker=_worker,
        enqueue_noops=lambda size: noop.map([()] * size),
        enqueue_mark=lambda: mark(),
        queued_bytes=_file_bytes if KIND == "sqlite" else None,
    )
