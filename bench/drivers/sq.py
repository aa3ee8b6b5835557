"""saq on Redis: one worker process, concurrency 10 (its default). Batch path: asyncio.gather
over `queue.enqueue` (saq's own `map` waits for the results)."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import saq
from common import REDIS_URL, incr_body, latency_body, main

CONCURRENCY = int(os.environ.get("BENCH_SAQ_CONCURRENCY", "10"))
queue = saq.Queue.from_url(REDIS_URL)


async def incr(ctx: Any) -> None:
    incr_body()


async def lat(ctx: Any, *, sent: float) -> None:
    latency_body(sent)


settings = {"queue": queue, "functions": [incr, lat], "concurrency": CONCURRENCY}


async def _setup() -> None:
    await queue.connect()


async def _batch(size: int) -> None:
    await asyncio.gather(*(queue.enqueue("incr") for _ in range(size)))


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
    )
