"""Reporting: the summaries every view shares (CLI stats, the demo, the HTTP API, the dashboard):
per job name, per tag, per minute and per failure type, all built from the broker's counters, so
they cover every worker on every host, and cost the same with a thousand jobs or a million; and
the JSON form of the log lines. Nothing here changes a job."""

from __future__ import annotations

import logging
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import msgspec

from backroom.brokers.base import (
    MAX_FAILURE_GROUPS,
    MAX_TAGS,
    OUTCOME_KINDS,
    TIMELINE_STEP_S,
    Histogram,
    JobStats,
    TagStats,
    minute_of,
)

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


def failure_rate(counts: dict[str, int]) -> float:
    """Dead over finished (succeeded or dead), 0.0 before anything finished."""
    finished = counts["succeeded"] + counts["dead"]
    return counts["dead"] / finished if finished else 0.0


def job_summary(stats: JobStats) -> dict[str, Any]:
    counts = {state: stats.counts.get(state, 0) for state in STATE_ORDER}
    return {
        "job": stats.job,
        "counts": counts,
        "total": sum(counts.values()),
        "run_time": histogram_summary(stats.run_time),
        "wait_time": histogram_summary(stats.wait_time),
        "retries": stats.retries,
        "recoveries": stats.recoveries,
        "rejections": dict(stats.rejections),
        "failure_rate": failure_rate(counts),
    }


def stats_summary(app: App, now: float | None = None) -> dict[str, Any]:
    """Per job name (every registered job, and any other name the broker has seen) with its
    recent throughput, queue depths, paused queues, schedules with their next run, and the
    throughput of all jobs together (see `throughput`)."""
    now = time.time() if now is None else now
    stats = app.broker.stats()
    recent = throughput(app, now)
    names = sorted(set(app.registry.names()) | set(stats.jobs) | set(recent["jobs"]))
    jobs = []
    for name in names:
        row = job_summary(stats.jobs.get(name) or JobStats(job=name))
        row["throughput"] = recent["jobs"].get(name) or {"finished": 0, "per_minute": 0.0}
        jobs.append(row)
    return {
        "jobs": jobs,
        "queues": dict(stats.queues),
        "paused": sorted(app.broker.paused()),
        "schedules": schedule_views(app, now),
        "throughput": recent["all"],
    }


THROUGHPUT_MINUTES = 5  # the window of `throughput`: the current minute and the four before


def throughput(app: App, now: float | None = None, minutes: int = THROUGHPUT_MINUTES
               ) -> dict[str, Any]:  # fmt: skip
    """Jobs finished (succeeded, dead or rejected; not cancelled, and a retried attempt is not a
    finish) per minute over the broker's timeline, from the start of the minute `minutes - 1`
    before now's until now: whole minutes plus the current one as far as it has gone, so the
    rate is live and never counts a minute twice. `jobs` holds the job names that finished
    any; `all` every job name together, with the window (`since`, `window_s`). One timeline
    read of `minutes` minutes: no job is looked at."""
    now = time.time() if now is None else now
    since = float((minute_of(now) - max(1, minutes) + 1) * TIMELINE_STEP_S)
    window_s = max(now - since, 1.0)
    finished: dict[str, int] = {}
    for point in app.broker.timeline(since, now=now):
        done = point.succeeded + point.dead + point.rejected
        finished[point.job] = finished.get(point.job, 0) + done
    rate = 60.0 / window_s
    jobs = {job: {"finished": n, "per_minute": round(n * rate, 3)}
            for job, n in finished.items() if n}  # fmt: skip
    total = sum(finished.values())
    everything = {"since": since, "window_s": round(window_s, 3), "finished": total,
                  "per_minute": round(total * rate, 3)}  # fmt: skip
    return {"jobs": jobs, "all": everything}


def schedule_views(app: App, now: float) -> list[dict[str, Any]]:
    """The app's schedules with their next run, payloads redacted (a schedule may carry a
    secret-looking field as any enqueue may)."""
    views = []
    for schedule in app.schedules.values():
        view = schedule.describe(app.broker.last_fired(schedule.name), now)
        view["payload"] = app.redact(view["payload"])
        views.append(view)
    return views


# -- per tag, per minute, per failure type: the broker's own bounded numbers -------------------

TAG_ROWS = 100  # tags listed by tag_report, the busiest first
FAILURE_GROUPS = 50  # groups listed by failure_groups, the most failures first


def tag_summary(stats: TagStats) -> dict[str, Any]:
    counts = {kind: stats.counts.get(kind, 0) for kind in OUTCOME_KINDS}
    return {
        "tag": stats.tag,
        "counts": counts,
        "total": sum(counts.values()),
        "retries": stats.retries,
        "run_time": histogram_summary(stats.run_time),
        "wait_time": histogram_summary(stats.wait_time),
        "running": stats.running,
        "failure_rate": failure_rate(counts),
        "jobs": sorted(stats.jobs),
        "by_job": dict(stats.jobs),
    }


def tag_report(app: App, limit: int = TAG_ROWS) -> dict[str, Any]:
    """Per tag since the last purge: final outcomes, retries, run-time and wait-time p50/p95/max,
    failure rate and job names, and the jobs running now, from the broker's counters (every
    worker on every host). The `limit` busiest tags (outcomes, retries and running jobs) are
    listed, by name; tags the registry or schedules declare are listed (at 0)
    where there is room. `tags_kept` says how many tags the broker holds numbers for (at most
    `max_tags`); `other_tags` sums the tags past that cap, or is None."""
    stats = app.broker.stats(tags=True)
    busiest = sorted(
        stats.tags.values(),
        key=lambda t: (-(sum(t.counts.values()) + t.retries + max(t.running, 0)), t.tag),
    )[: max(0, limit)]
    rows = {t.tag: tag_summary(t) for t in busiest}
    declared = [tag for spec in app.registry for tag in spec.tags]
    declared += [tag for schedule in app.schedules.values() for tag in schedule.tags]
    for tag in declared:
        if len(rows) >= limit:
            break
        rows.setdefault(tag, tag_summary(stats.tags.get(tag) or TagStats(tag=tag)))
    return {
        "tags": [rows[tag] for tag in sorted(rows)],
        "tags_kept": len(stats.tags),
        "max_tags": MAX_TAGS,
        "other_tags": tag_summary(stats.other_tags) if stats.other_tags else None,
    }


def failure_groups(app: App, limit: int = FAILURE_GROUPS) -> dict[str, Any]:
    """Failed attempts grouped by job name and exception type since the last purge (the
    broker's counters): how many, how many were last attempts (dead), and the latest with its
    traceback, read from that job's record (empty once the record expired, or when the job
    failed differently since). `dead_total` per job name and rejections by reason are exact."""
    groups = app.broker.failure_groups(limit)
    records = app.broker.get_many([group.latest_id for group in groups])
    stats = app.broker.stats()
    found = []
    for group, record in zip(groups, records, strict=True):
        error = record.error if record is not None else None
        same = error is not None and error.type == group.type
        found.append({
            "job": group.job, "type": group.type, "failures": group.failures,
            "dead": group.dead, "retried": group.failures - group.dead,
            "latest": {
                "id": group.latest_id, "at": group.latest_at, "message": group.latest_message,
                "state": str(record.state) if record is not None else None,
                "traceback": error.traceback if error is not None and same else "",
            },
        })  # fmt: skip
    return {
        "groups": found,
        "max_groups": MAX_FAILURE_GROUPS,
        "dead_total": {
            name: s.counts.get("dead", 0) for name, s in stats.jobs.items() if s.counts.get("dead")
        },
        "rejections": {name: dict(s.rejections) for name, s in stats.jobs.items() if s.rejections},
    }


def activity(app: App, now: float | None = None, window_s: float = 3600.0) -> dict[str, Any]:
    """Per job name and minute over the last `window_s` (the broker's timeline; the minute
    holding `now` last): jobs that succeeded, attempts that failed or were rejected (dead,
    retried, rejected), and the p95 run time of the attempts that ended in the minute (None
    where none did). Every registered job name is listed, then any other the timeline holds."""
    now = time.time() if now is None else now
    size = max(1, math.ceil(window_s / TIMELINE_STEP_S))
    start = (minute_of(now) - size + 1) * TIMELINE_STEP_S
    series: dict[str, dict[str, list[Any]]] = {}

    def entry(job: str) -> dict[str, list[Any]]:
        return series.setdefault(
            job, {"succeeded": [0] * size, "failed": [0] * size, "p95": [None] * size}
        )

    for name in app.registry.names():
        entry(name)
    for point in app.broker.timeline(start, now=now):
        index = int((point.at - start) // TIMELINE_STEP_S)
        if not 0 <= index < size:
            continue
        e = entry(point.job)
        e["succeeded"][index] = point.succeeded
        e["failed"][index] = point.failures + point.rejected
        e["p95"][index] = point.run_time.quantile(0.95)
    registered = list(app.registry.names())
    names = registered + sorted(set(series) - set(registered))
    return {
        "now": now,
        "start": start,
        "bucket_s": TIMELINE_STEP_S,
        "jobs": [{"job": name, **series[name]} for name in names],
    }


# -- structured logs ---------------------------------------------------------------------------

LOG_FORMATS = ("text", "json")
LOG_FORMAT_ENV = "BACKROOM_LOG_FORMAT"
TEXT_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# What every LogRecord has: anything else on a record came from `extra=` and becomes a field.
_RECORD_ATTRIBUTES = frozenset(logging.makeLogRecord({}).__dict__) | {
    "message", "asctime", "taskName",
}  # fmt: skip
_JOB_LOGGER = "backroom.job."  # ctx.logger of a job is backroom.job.<name>


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: `time` (ISO 8601, UTC), `level`, `logger`, `message`, every
    field a record carries from `extra=` (the worker's lines about a job carry `job_id`, `job`,
    `source` and `tags`), `job` on a job's own `ctx.logger` lines, and `exc_info` (the
    traceback as text) when there is one. A field named like one of the first four is left
    out rather than overwrite it; a value JSON can't hold is written as its str()."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        extra = {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRIBUTES}
        for key, value in {**job_fields(record), **extra}.items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc_info"] = record.exc_text
        if record.stack_info:
            entry["stack_info"] = self.formatStack(record.stack_info)
        try:
            return msgspec.json.encode(entry, enc_hook=str).decode()
        except (TypeError, ValueError, OverflowError):  # e.g. a dict keyed by tuples
            return msgspec.json.encode({k: _plain(v) for k, v in entry.items()}).decode()


def job_fields(record: logging.LogRecord) -> dict[str, Any]:
    """`job` of a line a job logged through `ctx.logger` (lines the worker writes about a job
    carry `job_id`, `job`, `source` and `tags` as fields of their own)."""
    if record.name.startswith(_JOB_LOGGER):
        return {"job": record.name[len(_JOB_LOGGER) :]}
    return {}


def _plain(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | None) else str(value)
