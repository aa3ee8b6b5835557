"""taskiq with taskiq-redis's ListQueueBroker (LPUSH/BRPOP, no result backend): one worker
process (`taskiq worker --workers 1`, which also runs a small supervisor process).
Batch path: asyncio.gather over `.kiq()`."""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

from common import REDIS_URL, incr_body, latency_body, main, mark_body, nothing_body
from taskiq_redis import ListQueueBroker

broker = ListQueueBroker(REDIS_URL)


@broker.task
async def incr() -> None:
    incr_body()


@broker.task
async def noop() -> None:
    nothing_body()


@broker.task
async def mark() -> None:
    mark_body()


@broker.task
async def lat(sent: float) -> None:
    latency_body(sent)


async def _batch(size: int, task: Any = incr) -> None:
    await asyncio.gather(*(task.kiq() for _ in range(size)))


def _worker() -> None:
    os.execv(sys.executable, [sys.executable, "-m", "taskiq", "worker", "tq:broker",
                              "--workers", "1", "--log-level", "WARNING"])  # fmt: skip


def _version() -> str:
    from importlib.metadata import version

    return f"{version('taskiq')} + taskiq-redis {version('taskiq-redis')}"


def cli() -> None:
    main(
        version=_version,
        setup=broker.startup,
        teardown=broker.shutdown,
        enqueue_one=lambda _i: incr.kiq(),
        enqueue_batch=_batch,
        send_latency=lambda sent: lat.kiq(sent),
        run_worker=_worker,
        enqueue_noops=lambda size: _batch(size, noop),
        enqueue_mark=lambda: mark.kiq(),
    )
