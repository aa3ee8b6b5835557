"""Reporting: the per-job-name summary every view shares (CLI stats, the demo, the HTTP API,
Prometheus), built from the broker's counters, so it covers every worker on every host."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from backroom.brokers.base import Histogram, JobStats

if TYPE_CHECKING:
    from backroom.app import App

STATE_ORDER = ("scheduled", "queued", "running", "retrying", "succeeded", "dead", "cancelled",
               "rejected")  # fmt: skip


def histogram_summary(hist: Histogram) -> dict[str, float | int | None]:
    """count, mean, p50/p95/p99 and max of a histogram, in seconds."""
    return {
        "count": hist.count,
        "mean": hist.total / hist.count if hist.count else None,
        "p50": hist.quantile(0.50),
        "p95": hist.quantile(0.95),
        "p99": hist.quantile(0.99),
        "max": hist.max if hist.count else None,
    }


def job_summary(stats: JobStats) -> dict[str, Any]:
    counts = {state: stats.counts.get(state, 0) for state in STATE_ORDER}
    finished = counts["succeeded"] + counts["dead"]
    return {
        "job": stats.job,
        "counts": counts,
        "total": sum(counts.values()),
        "run_time": histogram_summary(stats.run_time),
        "wait_time": histogram_summary(stats.wait_time),
        "retries": stats.retries,
        "recoveries": stats.recoveries,
        "rejections": dict(stats.rejections),
        "failure_rate": counts["dead"] / finished if finished else 0.0,
    }


def stats_summary(app: App) -> dict[str, Any]:
    """Per job name (every registered job, and any other name the broker has seen), queue
    depths, paused queues and schedules with their next run."""
    stats = app.broker.stats()
    names = sorted(set(app.registry.names()) | set(stats.jobs))
    jobs = [job_summary(stats.jobs.get(name) or JobStats(job=name)) for name in names]
    now = time.time()
    return {
        "jobs": jobs,
        "queues": dict(stats.queues),
        "paused": sorted(app.broker.paused()),
        "schedules": [
            s.describe(app.broker.last_fired(s.name), now) for s in app.schedules.values()
        ],
    }
