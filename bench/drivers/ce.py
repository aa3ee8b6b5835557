"""Celery on Redis (broker only, results ignored): one worker process, `--pool solo`
(BENCH_CELERY_POOL=prefork for its default pool, concurrency 2). Batch path: `group(...)()`."""

from __future__ import annotations

import os
import sys

import celery
from common import REDIS_URL, incr_body, latency_body, main, mark_body, nothing_body

POOL = os.environ.get("BENCH_CELERY_POOL", "solo")
app = celery.Celery("ce", broker=REDIS_URL)
app.conf.task_ignore_result = True
app.conf.worker_hijack_root_logger = False
app.conf.broker_connection_retry_on_startup = True


@app.task
def incr() -> None:
    incr_body()


@app.task
def noop() -> None:
    nothing_body()


@app.task
def mark() -> None:
    mark_body()


@app.task
def lat(sent: float) -> None:
    latency_body(sent)


def _worker() -> None:
    # a node name of its own (celery's docs: one -n per worker on a host), for the 4-worker run
    os.execv(sys.executable, [sys.executable, "-m", "celery", "-A", "ce", "worker", "--pool",
                              POOL, "--loglevel", "WARNING", "--without-heartbeat",
                              "--without-gossip", "--without-mingle",
                              "--hostname", f"w{os.getpid()}@%h"])  # fmt: skip


def cli() -> None:
    main(
        version=lambda: celery.__version__,
        enqueue_one=lambda _i: incr.delay(),
        enqueue_batch=lambda size: celery.group(incr.s() for _ in range(size))(),
        send_latency=lambda sent: lat.delay(sent),
        run_worker=_worker,
        enqueue_noops=lambda size: celery.group(noop.s() for _ in range(size))(),
        enqueue_mark=lambda: mark.delay(),
    )
