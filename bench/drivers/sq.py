"""saq on Redis: one worker process, concurrency 10 (its default). Batch path: asyncio.gather
over `queue.enqueue` (saq's own `map` waits for the results)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import saq
from common import REDIS_URL, incr_body, latency_body, main, mark_body, nothing_body

CONCURRENCY = int(os.environ.get("BENCH_SAQ_CONCURRENCY", "10"))
queue = saq.Queue.from_url(REDIS_URL)


async def incr(ctx: Any) -> None:
    incr_body()


async def noop(ctx: Any) -> None:
    nothing_body()


async def mark(ctx: Any) -> None:
    mark_body()


async def lat(ctx: Any, *, sent: float) -> None:
    latency_body(sent)


settings = {"queue": queue, "functions": [incr, noop, mark, lat], "concurrency": CONCURRENCY}


async def _setup() -> None:
    await queue.connect()


async def _batch(size: int, name: str = "incr") -> None:
    await asyncio.gather(*(queue.enqueue(name) for _ in range(size)))


def _worker() -> None:
    from saq.worker import start

    start("sq.settings")


def _version() -> str:
    from importlib.metadata import version

    return version("saq")


def cli() -> None:
    main(
        version=_version,
        setup=_setup,
        teardown=queue.disconnect,
        enqueue_one=lambda _i: queue.enqueue("incr"),
        enqueue_batch=_batch,
        send_latency=lambda sent: queue.enqueue("lat", sent=sent),
        run_worker=_worker,
        enqueue_noops=lambda size: _batch(size, "noop"),
        enqueue_mark=lambda: queue.enqueue("mark"),
    )
