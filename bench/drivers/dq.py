"""dramatiq with its RedisBroker: one worker process (`dramatiq --processes 1`) with 8 threads
(its default). No batch enqueue path (a group sends one message per call)."""

from __future__ import annotations

import os
import sys

import dramatiq
from common import REDIS_URL, incr_body, latency_body, main, mark_body, nothing_body
from dramatiq.brokers.redis import RedisBroker

THREADS = os.environ.get("BENCH_DRAMATIQ_THREADS", "8")
broker = RedisBroker(url=REDIS_URL)
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0)
def incr() -> None:
    incr_body()


@dramatiq.actor(max_retries=0)
def noop() -> None:
    nothing_body()


@dramatiq.actor(max_retries=0)
def mark() -> None:
    mark_body()


@dramatiq.actor(max_retries=0)
def lat(sent: float) -> None:
    latency_body(sent)


def _noops(size: int) -> None:
    for _ in range(size):  # no batch path
        noop.send()


def _worker() -> None:
    os.execv(sys.executable, [sys.executable, "-m", "dramatiq", "dq", "--processes", "1",
                              "--threads", THREADS])  # fmt: skip


def cli() -> None:
    main(
        version=lambda: dramatiq.__version__,
        enqueue_one=lambda _i: incr.send(),
        enqueue_batch=None,
        send_latency=lambda sent: lat.send(sent),
        run_worker=_worker,
        enqueue_noops=_noops,
        enqueue_mark=lambda: mark.send(),
    )
