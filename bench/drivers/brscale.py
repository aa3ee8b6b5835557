"""backroom at scale (bench/run.py's scenario 5): enqueue and reserve cost with a growing backlog.

    python drive.py brscale SIZES ROUNDS PER_ROUND CLAIM_LIMIT

On the store that BENCH_BACKROOM names (as drivers/br.py), for each backlog size in SIZES
(comma-separated, increasing), in one process and one store:

1. top up, untimed: finished jobs to SIZE (enqueue_many, then broker.claim and broker.ack in
   batches of FILL_BATCH: real `succeeded` records, written the way a worker writes them), then
   queued jobs to SIZE (enqueue_many in batches of FILL_BATCH);
2. ROUNDS rounds, each: PER_ROUND jobs enqueued one `app.enqueue` call per job (timed), then
   PER_ROUND jobs reserved and acknowledged (timed) as a worker with that many free slots does:
   `broker.claim(queues, worker_id, lease, CLAIM_LIMIT)` then `broker.ack` of that batch. So
   the backlog stays between SIZE and SIZE + PER_ROUND while it is measured.
3. the store's size: Redis `used_memory`, or the SQLite file with its WAL.
The warm-up (one round on an empty store) comes first: a cold first point would flatter the
ratio.

A figure is the median of its rounds' rates (jobs per second): a burst of load from elsewhere
spoils a round, not the point. Each round's CPU per job is kept too (this process, plus
redis-server's for Redis): steadier than a rate when the machine's other load changes between
sizes. The store's own counters (broker.stats) give the queued and finished counts reported
with each point. Prints one JSON line: {"points": [...]}; progress goes to stderr."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from typing import Any

from br import DB, KIND, app  # sets sys.path to the backroom source tree under test
from common import client

# jobs per enqueue_many, claim and ack while topping up (untimed). Below 8,000: the Redis
# broker's claim fails with limit >= 8,000 on a queue that long (claim.lua unpacks the popped
# ids into one HMGET: "too many results to unpack").
FILL_BATCH = 5_000
LEASE_S = 60.0  # the worker's default
WORKER_ID = "bench-scale"


def _store_bytes() -> int:
    """What the store takes: Redis `used_memory`, or the SQLite file and its WAL."""
    if KIND == "redis":
        return int(client().info("memory")["used_memory"])
    return sum(os.path.getsize(DB + end) for end in ("", "-wal") if os.path.exists(DB + end))


def _counts() -> tuple[int, int]:
    """(queued, succeeded) as the store counts them."""
    stats = app.broker.stats()
    counts = stats.jobs["incr"].counts if "incr" in stats.jobs else {}
    return counts.get("queued", 0), counts.get("succeeded", 0)


def _enqueue_many(n: int) -> None:
    while n > 0:
        size = min(n, FILL_BATCH)
        app.enqueue_many("incr", [{}] * size)
        n -= size


def _finish(n: int, queues: list[str]) -> None:
    """n queued jobs -> succeeded, in large batches, through the worker's own broker calls."""
    broker = app.broker
    while n > 0:
        claims = broker.claim(queues, WORKER_ID, LEASE_S, min(n, FILL_BATCH))
        if not claims:
            raise RuntimeError("nothing left to claim while filling finished jobs")
        done = broker.ack([(claim, None) for claim in claims])
        if not all(done):
            raise RuntimeError("an ack lost its lease while filling finished jobs")
        n -= len(claims)


def _top_up(size: int, queues: list[str]) -> dict[str, float]:
    """Returns how long the top-up spent in enqueue_many and in claim + ack (batch costs:
    how they grow with the store shows in the JSON, not in the table)."""
    clock = time.perf_counter
    spent = {"fill_enqueue_s": 0.0, "fill_finish_s": 0.0}
    queued, finished = _counts()
    if finished < size:  # enqueued, then claimed and acknowledged: the queued count is kept
        start = clock()
        _enqueue_many(size - finished)
        middle = clock()
        _finish(size - finished, queues)
        spent["fill_enqueue_s"] += middle - start
        spent["fill_finish_s"] += clock() - middle
    queued, _ = _counts()
    start = clock()
    _enqueue_many(size - queued)
    spent["fill_enqueue_s"] += clock() - start
    return spent


def _cpu_s() -> tuple[float, float]:
    """CPU seconds spent so far on this scenario's work: (this process, every thread, user and
    system; redis-server's own, 0 for SQLite: only this process uses it meanwhile). Steadier
    than rates when other load on the machine comes and goes between backlog sizes."""
    if KIND != "redis":
        return time.process_time(), 0.0
    info = client().info("cpu")
    return time.process_time(), float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _measure(rounds: int, per_round: int, limit: int, queues: list[str]) -> dict[str, Any]:
    broker = app.broker
    clock = time.perf_counter
    figures: dict[str, list[float]] = {
        "enqueue": [], "claim": [], "enqueue_cpu": [], "claim_cpu": [],
        "enqueue_server_cpu": [], "claim_server_cpu": [],  # redis-server's part of the CPU
    }  # fmt: skip

    def spent(key: str, cpu: tuple[float, float], start: float) -> None:
        now, (mine, server) = clock(), _cpu_s()
        figures[key].append(per_round / (now - start))
        figures[f"{key}_cpu"].append((mine - cpu[0] + server - cpu[1]) / per_round * 1e6)
        figures[f"{key}_server_cpu"].append((server - cpu[1]) / per_round * 1e6)

    for _ in range(rounds):
        cpu, start = _cpu_s(), clock()
        for _ in range(per_round):
            app.enqueue("incr")
        spent("enqueue", cpu, start)
        left = per_round
        cpu, start = _cpu_s(), clock()
        while left > 0:
            claims = broker.claim(queues, WORKER_ID, LEASE_S, min(limit, left))
            if not claims:
                raise RuntimeError("the backlog ran dry while measuring claims")
            broker.ack([(claim, None) for claim in claims])
            left -= len(claims)
        spent("claim", cpu, start)
    # the median of the rounds per figure (rates in jobs/s, CPU in microseconds per job)
    point: dict[str, Any] = {key: statistics.median(values) for key, values in figures.items()}
    point.update({f"{key}_rounds": values for key, values in figures.items()})
    return point


def cli() -> None:
    command, *args = sys.argv[1:]
    if command != "scale":
        raise SystemExit(f"brscale: unknown command {command!r} (only: scale)")
    sizes = [int(x) for x in args[0].split(",")]
    rounds, per_round, limit = int(args[1]), int(args[2]), int(args[3])
    queues = [app.envelope("incr").queue]
    app.broker.purge()
    # warm-up, the measured calls on an empty store: connect, load the scripts, prepare the
    # statements (a cold first point would flatter the ratio); then nothing is left behind
    _enqueue_many(1)
    _finish(1, queues)
    _measure(1, per_round, limit, queues)
    app.broker.purge()
    points = []
    for size in sizes:
        started = time.perf_counter()
        fill = _top_up(size, queues)
        fill_s = time.perf_counter() - started
        queued, finished = _counts()
        started = time.perf_counter()
        point = _measure(rounds, per_round, limit, queues)
        point.update(fill)
        measure_s = time.perf_counter() - started
        point.update(size=size, queued=queued, finished=finished, fill_s=fill_s,
                     measure_s=measure_s, store_bytes=_store_bytes())  # fmt: skip
        points.append(point)
        print(f"brscale {KIND} {size:>9,}: queued {queued:,} finished {finished:,}, "
              f"top-up {fill_s:.1f} s; enqueue {point['enqueue']:,.0f}/s "
              f"claim+ack {point['claim']:,.0f}/s", file=sys.stderr, flush=True)  # fmt: skip
    app.close()  # the runner empties the store (FLUSHALL, or removes the SQLite folder)
    print(json.dumps({"points": points}), flush=True)
