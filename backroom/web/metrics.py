"""Prometheus exposition: a collector that reads the broker's counters at scrape time, so the
numbers cover every worker on every host. Labels are job name, queue, state and reason, never a
job id: the number of series stays bounded however many jobs run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from backroom.brokers.base import BUCKET_BOUNDS, Histogram
from backroom.reporting import STATE_ORDER

if TYPE_CHECKING:
    from backroom.app import App

# Every 4th bound of the broker's histogram (50 µs ... about a day, x2.44 apart): exact
# cumulative counts at each, and few enough series per job name.
EXPORT_EVERY = 4


def prometheus_buckets(hist: Histogram) -> list[tuple[str, float]]:
    """The broker's fixed buckets as Prometheus cumulative `le` buckets (the last is +Inf)."""
    cumulative, result, seen = 0, [], 0
    indices = sorted(hist.buckets)
    for bound_index, bound in enumerate(BUCKET_BOUNDS):
        while seen < len(indices) and indices[seen] <= bound_index:
            cumulative += hist.buckets[indices[seen]]
            seen += 1
        if bound_index % EXPORT_EVERY == 0:
            result.append((f"{bound:.6g}", float(cumulative)))
    result.append(("+Inf", float(hist.count)))
    return result


class BrokerCollector(Collector):
    """Reads `broker.stats()`, the workers and the paused queues on each scrape."""

    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        stats = self.app.broker.stats()
        queue_of = {spec.name: spec.queue for spec in self.app.registry}
        jobs = GaugeMetricFamily(
            "backroom_jobs",
            "Jobs by job name, queue (the one each job was enqueued on) and state: live states "
            "are current counts, final states totals since the last purge",
            labels=["job", "queue", "state"],
        )
        retries = CounterMetricFamily(
            "backroom_job_retries", "Failed attempts that were retried", labels=["job"]
        )
        recoveries = CounterMetricFamily(
            "backroom_job_lease_recoveries",
            "Jobs requeued because their worker stopped heartbeating",
            labels=["job"],
        )
        rejections = CounterMetricFamily(
            "backroom_job_rejections", "Envelopes rejected by workers", labels=["job", "reason"]
        )
        run = HistogramMetricFamily(
            "backroom_job_run_seconds", "Run time of finished attempts", labels=["job"]
        )
        wait = HistogramMetricFamily(
            "backroom_job_wait_seconds", "Time from queued to started", labels=["job"]
        )
        names = sorted(set(self.app.registry.names()) | set(stats.jobs))
        for name in names:
            entry = stats.jobs.get(name)
            # the broker's counts per (job, queue, state); a registered job's own queue is
            # always listed, so its series exist (at 0) before its first job
            by_queue = dict(entry.by_queue) if entry else {}
            if name in queue_of:
                by_queue.setdefault(queue_of[name], {})
            for queue, counts in sorted(by_queue.items()):
                for state in STATE_ORDER:
                    jobs.add_metric([name, queue, state], float(counts.get(state, 0)))
            if entry is None:
                continue
            retries.add_metric([name], float(entry.retries))
            recoveries.add_metric([name], float(entry.recoveries))
            for reason, count in sorted(entry.rejections.items()):
                rejections.add_metric([name, reason], float(count))
            run.add_metric(
                [name], prometheus_buckets(entry.run_time), sum_value=entry.run_time.total
            )
            wait.add_metric(
                [name], prometheus_buckets(entry.wait_time), sum_value=entry.wait_time.total
            )
        yield from (jobs, retries, recoveries, rejections, run, wait)

        paused = self.app.broker.paused()
        depth = GaugeMetricFamily("backroom_queue_depth", "Queued jobs per queue", labels=["queue"])
        paused_metric = GaugeMetricFamily(
            "backroom_queue_paused",
            "1 while reservation from the queue is paused",
            labels=["queue"],
        )
        for queue in sorted(set(stats.queues) | paused | set(queue_of.values())):
            depth.add_metric([queue], float(stats.queues.get(queue, 0)))
            paused_metric.add_metric([queue], 1.0 if queue in paused else 0.0)
        yield depth
        yield paused_metric

        workers = self.app.broker.workers()
        yield GaugeMetricFamily("backroom_workers", "Live workers", value=float(len(workers)))
        yield GaugeMetricFamily(
            "backroom_worker_running_jobs",
            "Jobs the live workers run now",
            value=float(sum(len(w.current) for w in workers)),
        )
        now = time.time()
        last = GaugeMetricFamily(
            "backroom_schedule_last_run_timestamp_seconds",
            "When each cron schedule last fired",
            labels=["schedule", "job"],
        )
        following = GaugeMetricFamily(
            "backroom_schedule_next_run_timestamp_seconds",
            "When each cron schedule fires next",
            labels=["schedule", "job"],
        )
        for schedule in self.app.schedules.values():
            fired = self.app.broker.last_fired(schedule.name)
            if fired is not None:
                last.add_metric([schedule.name, schedule.job], fired)
            following.add_metric([schedule.name, schedule.job], schedule.next_after(now))
        yield last
        yield following


def metrics_registry(app: App) -> CollectorRegistry:
    """A registry of its own (not the process-global one), holding only backroom's collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BrokerCollector(app))
    return registry


def exposition(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
