"""rq: one SimpleWorker (runs jobs in its own process; the default Worker forks per job).
Batch path: `Queue.enqueue_many` (one pipeline). BENCH_RQ_WORKER=fork uses the forking Worker."""

from __future__ import annotations

import os
from typing import Any

import rq
from common import client, incr_body, latency_body, main, mark_body, nothing_body

KIND = os.environ.get("BENCH_RQ_WORKER", "simple")


def incr() -> None:
    incr_body()


def noop() -> None:
    nothing_body()


def mark() -> None:
    mark_body()


def lat(sent: float) -> None:
    latency_body(sent)


def _queue() -> rq.Queue:
    return rq.Queue("default", connection=client())


_q: rq.Queue | None = None


def _setup() -> None:
    global _q
    _q = _queue()


def _batch(size: int, func: Any = incr) -> None:
    assert _q is not None
    _q.enqueue_many([rq.Queue.prepare_data(func) for _ in range(size)])


def _worker() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    cls = rq.SimpleWorker if KIND == "simple" else rq.Worker
    cls([_queue()], connection=client()).work(logging_level="WARNING")


def cli() -> None:
    main(
        version=lambda: rq.__version__,
        setup=_setup,
        enqueue_one=lambda _i: _q.enqueue(incr),  # type: ignore[union-attr]
        enqueue_batch=_batch,
        send_latency=lambda sent: _q.enqueue(lat, sent),  # type: ignore[union-attr]
        run_worker=_worker,
        enqueue_noops=lambda size: _batch(size, noop),
        enqueue_mark=lambda: _q.enqueue(mark),  # type: ignore[union-attr]
    )
