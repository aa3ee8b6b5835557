"""What every driver shares: the job bodies (one Redis INCR; none; the marker; the latency
probe), the timed enqueue loops and the command line that bench/run.py calls. Standard library
plus redis-py only, since it runs inside each peer's own virtual environment.

A driver module defines a few functions (see `main`); `python drivers/X.py COMMAND ...` then
prints one JSON line on stdout, or, for `worker`, runs the library's worker until SIGTERM."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import redis

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SQLITE_DIR = os.environ.get("BENCH_SQLITE_DIR", "/tmp")
COUNTER = "bench:count"  # INCR'd by every job of the INCR body
LATENCIES = "bench:lat"  # the latency probe pushes (job start - enqueue) in seconds
RAN = "bench:ran"  # the pid of every process that ran an INCR job (once per process)
MARKS = "bench:marks"  # the marker job pushes its clock reading (the no-op drain's two ends)

_client: redis.Redis | None = None
_ran = False


def client() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(REDIS_URL)
    return _client


def incr_body() -> None:
    """The job body of the drain and enqueue scenarios: one Redis INCR. A process's first job
    also adds its pid to RAN, so the runner knows when each of several workers is running."""
    global _ran
    client().incr(COUNTER)
    if not _ran:
        _ran = True
        client().sadd(RAN, os.getpid())


def nothing_body() -> None:
    """The job body of the no-op drain: nothing, so the figure is what the queue costs."""


def mark_body() -> None:
    """The marker job, queued before and after the no-op jobs: its clock reading (system-wide,
    as in the latency probe) tells the runner when the worker got there."""
    client().rpush(MARKS, time.monotonic())


def latency_body(sent: float) -> None:
    """The latency probe: its first line reads the clock (CLOCK_MONOTONIC is system-wide on
    Linux, so the producer's and the worker's readings compare)."""
    started = time.monotonic()
    client().rpush(LATENCIES, started - sent)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _timed(call: Callable[[int], Any], per_call: int, n: int, cap_s: float) -> dict[str, Any]:
    """Call `call(i)` (each call enqueues `per_call` jobs) until n jobs or cap_s seconds."""
    await _maybe_await(call(0))  # warm-up: connect, load scripts; enqueued but not timed
    warm = per_call
    done = 0
    start = time.perf_counter()
    deadline = start + cap_s
    i = 1
    while done < n:
        await _maybe_await(call(i))
        done += per_call
        i += 1
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - start
    return {"jobs": done, "seconds": elapsed, "queued": done + warm}


async def _bracketed(
    mark: Callable[[], Any], noops: Callable[[int], Any], n: int, cap_s: float, size: int
) -> dict[str, Any]:
    """Queue one marker job, up to n no-op jobs (`noops(k)` queues k of them; calls until n
    jobs or cap_s seconds), then one marker job. Not timed: it sets up the no-op drain."""
    await _maybe_await(mark())
    # a few ms on each side, for libraries that order by enqueue time at a millisecond's
    # resolution with ties in random order (arq): the markers stay first and last
    await asyncio.sleep(0.005)
    done = 0
    deadline = time.perf_counter() + cap_s
    while done < n and (not done or time.perf_counter() < deadline):
        k = min(size, n - done)
        await _maybe_await(noops(k))
        done += k
    await asyncio.sleep(0.005)
    await _maybe_await(mark())
    return {"jobs": done}


def main(
    *,
    version: Callable[[], str],
    enqueue_one: Callable[[int], Any],
    enqueue_batch: Callable[[int], Any] | None,
    send_latency: Callable[[float], Any],
    run_worker: Callable[[], Any],
    enqueue_noops: Callable[[int], Any],
    enqueue_mark: Callable[[], Any],
    setup: Callable[[], Any] | None = None,
    teardown: Callable[[], Any] | None = None,
    queued_bytes: Callable[[], int] | None = None,
) -> None:
    """Commands: version | enqueue N CAP | batch N CAP SIZE | noop N CAP SIZE | latency K GAP |
    worker | size.

    `enqueue_batch(size)` enqueues `size` jobs through the library's batch path;
    `enqueue_noops(size)` enqueues `size` no-op jobs, in order, by the library's fastest path
    that keeps their order (the batch path where there is one); `enqueue_mark()` one marker
    job; `queued_bytes` is for file-backed stores (bytes used on disk); Redis memory is read by
    the runner."""
    command, *args = sys.argv[1:]

    async def go() -> Any:
        if setup is not None:
            await _maybe_await(setup())
        try:
            if command == "enqueue":
                n, cap = int(args[0]), float(args[1])
                return await _timed(enqueue_one, 1, n, cap)
            if command == "batch":
                if enqueue_batch is None:
                    return None
                n, cap, size = int(args[0]), float(args[1]), int(args[2])
                return await _timed(lambda _i: enqueue_batch(size), size, n, cap)
            if command == "noop":
                n, cap, size = int(args[0]), float(args[1]), int(args[2])
                return await _bracketed(enqueue_mark, enqueue_noops, n, cap, size)
            if command == "latency":
                count, gap = int(args[0]), float(args[1])
                # one probe first, not counted: this producer's first call pays for connecting
                # and lazy imports, which is not the worker's start latency
                await _maybe_await(send_latency(time.monotonic()))
                deadline = time.monotonic() + 30
                while not client().llen(LATENCIES) and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
                client().delete(LATENCIES)
                next_at = time.monotonic()
                for _ in range(count):
                    while (pause := next_at - time.monotonic()) > 0:
                        await asyncio.sleep(pause)
                    await _maybe_await(send_latency(time.monotonic()))
                    next_at += gap
                return {"sent": count}
            if command == "size":
                return {"bytes": queued_bytes() if queued_bytes else None}
            raise SystemExit(f"unknown command {command!r}")
        finally:
            if teardown is not None:
                await _maybe_await(teardown())

    if command == "version":
        print(json.dumps({"version": version()}))
        return
    if command == "worker":
        run_worker()
        return
    print(json.dumps(asyncio.run(go())), flush=True)
