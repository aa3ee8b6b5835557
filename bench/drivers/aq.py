"""arq: one worker process, max_jobs 10 (its default), poll_delay 10 ms (its default is 0.5 s,
which caps drain near 0.2k/s; BENCH_ARQ_POLL overrides). Batch path: asyncio.gather over
`enqueue_job`."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import arq
from arq.connections import RedisSettings
from common import REDIS_URL, incr_body, latency_body, main, mark_body, nothing_body

POLL = float(os.environ.get("BENCH_ARQ_POLL", "0.01"))
pool: Any = None


async def incr(ctx: Any) -> None:
    incr_body()


async def noop(ctx: Any) -> None:
    nothing_body()


async def mark(ctx: Any) -> None:
    mark_body()


async def lat(ctx: Any, sent: float) -> None:
    latency_body(sent)


class WorkerSettings:
    functions = (incr, noop, mark, lat)
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    poll_delay = POLL
    keep_result = 0  # peers store no result for a job that returns None


async def _setup() -> None:
    global pool
    pool = await arq.create_pool(RedisSettings.from_dsn(REDIS_URL))


async def _teardown() -> None:
    await pool.aclose()


async def _batch(size: int, name: str = "incr") -> None:
    await asyncio.gather(*(pool.enqueue_job(name) for _ in range(size)))


def _worker() -> None:
    arq.run_worker(WorkerSettings)  # type: ignore[arg-type]


def _version() -> str:
    from importlib.metadata import version

    return version("arq")


def cli() -> None:
    main(
        version=_version,
        setup=_setup,
        teardown=_teardown,
        enqueue_one=lambda _i: pool.enqueue_job("incr"),
        enqueue_batch=_batch,
        send_latency=lambda sent: pool.enqueue_job("lat", sent),
        run_worker=_worker,
        enqueue_noops=lambda size: _batch(size, "noop"),
        enqueue_mark=lambda: pool.enqueue_job("mark"),
    )
