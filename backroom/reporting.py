"""Reporting: the per-job-name summary every view shares (CLI stats, the demo, the HTTP API,
Prometheus), built from the broker's counters, so it covers every worker on every host."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from backroom.brokers.base import Histogram, JobQuery, JobRecord, JobStats, Stats
from backroom.envelope import State

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


# -- views built from bounded, indexed reads of recent jobs -------------------------------------
# The broker keeps counters per job name, not per tag or per minute. These views read the newest
# jobs page by page (JobQuery is served by an index) and stop at a fixed cap, so they cost the
# same with a thousand jobs or a million; each says how much it saw ("sampled", "complete").

TAG_BUDGET = 1500  # jobs read for the per-tag view, shared out between job names
TAG_MIN_PER_JOB = 20
MAX_TAGS = 50
FAILURE_SAMPLE = 500  # dead and retrying jobs read for the failure groups
ACTIVITY_BUDGET = 6000  # jobs read for the last-hour charts, shared out between job names
ACTIVITY_PER_JOB = 2000  # ... at most this many per name
ACTIVITY_MIN_PER_JOB = 100  # ... and at least this many
ACTIVITY_PAGE = 500
MAX_NAMES = 200  # job names the sampled views read (registered names first)


def quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank q-quantile of the values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def _run_time(record: JobRecord) -> float | None:
    if record.started_at and record.finished_at and record.state in (State.SUCCEEDED, State.DEAD):
        return max(0.0, record.finished_at - record.started_at)
    return None


def job_names(app: App, stats: Stats | None = None) -> list[str]:
    """Registered names, then any other name the broker has counted, at most MAX_NAMES."""
    seen = (stats or app.broker.stats()).jobs
    registered = list(app.registry.names())
    others = sorted(set(seen) - set(registered))
    return (registered + others)[:MAX_NAMES]


def tag_summaries(
    app: App, budget: int = TAG_BUDGET, limit: int = MAX_TAGS
) -> list[dict[str, Any]]:
    """Per tag: counts by state, run-time p50/p95/max and failure rate, over the newest jobs of
    every job name (the budget shared out between names: one read per name on the broker's
    job-name index, so a busy job never hides the tags of a quiet one). `sampled` says how
    many jobs with the tag were seen; `complete` is True when that was every one of them (the
    counts are then exact). Tags the registry or schedules declare are listed even unseen."""
    names = job_names(app)
    per_job = max(TAG_MIN_PER_JOB, budget // max(1, len(names)))
    seen: dict[str, dict[str, Any]] = {}

    def entry(tag: str) -> dict[str, Any]:
        return seen.setdefault(
            tag,
            {
                "counts": dict.fromkeys(STATE_ORDER, 0),
                "runs": [],
                "jobs": set(),
                "sampled": 0,
                "complete": True,
            },
        )

    for spec in app.registry:
        for tag in spec.tags:
            entry(tag)
    for schedule in app.schedules.values():
        for tag in schedule.tags:
            entry(tag)
    for name in names:
        records = app.broker.jobs(JobQuery(job=name, limit=per_job))
        truncated = len(records) == per_job
        for record in records:
            run = _run_time(record)
            for tag in record.envelope.tags:
                e = entry(tag)
                e["counts"][str(record.state)] = e["counts"].get(str(record.state), 0) + 1
                e["jobs"].add(record.job)
                e["sampled"] += 1
                e["complete"] = e["complete"] and not truncated
                if run is not None:
                    e["runs"].append(run)
    busiest = sorted(seen, key=lambda tag: (-seen[tag]["sampled"], tag))[:limit]
    result = []
    for tag in sorted(busiest):
        e = seen[tag]
        counts, runs = e["counts"], e["runs"]
        finished = counts["succeeded"] + counts["dead"]
        result.append(
            {
                "tag": tag,
                "counts": counts,
                "sampled": e["sampled"],
                "complete": e["complete"],
                "run_time": {
                    "p50": quantile(runs, 0.5),
                    "p95": quantile(runs, 0.95),
                    "max": max(runs) if runs else None,
                },
                "failure_rate": counts["dead"] / finished if finished else 0.0,
                "jobs": sorted(e["jobs"]),
            }
        )
    return result


def failure_groups(app: App, sample: int = FAILURE_SAMPLE) -> dict[str, Any]:
    """Failures grouped by job name and exception type, from the newest `sample` dead and
    `sample` retrying jobs: a count per state, and the latest occurrence with its traceback.
    `dead_total` per job name is exact (the broker's counters); rejections come by reason."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for state in (State.DEAD, State.RETRYING):
        for record in app.broker.jobs(JobQuery(state=state, limit=sample)):  # newest first
            error_type = record.error.type if record.error else "(no error recorded)"
            group = groups.get((record.job, error_type))
            if group is None:
                group = groups[(record.job, error_type)] = {
                    "job": record.job, "type": error_type, "dead": 0, "retrying": 0,
                    "latest": None,
                }  # fmt: skip
            group[str(state)] += 1
            moment = record.finished_at or record.started_at or record.created_at
            if group["latest"] is None or moment > group["latest"]["at"]:
                group["latest"] = {
                    "id": record.id,
                    "at": moment,
                    "state": str(state),
                    "message": record.error.message if record.error else record.reason,
                    "traceback": record.error.traceback if record.error else "",
                }
    stats = app.broker.stats()
    ordered = sorted(groups.values(), key=lambda g: (-(g["dead"] + g["retrying"]), g["job"]))
    return {
        "groups": ordered,
        "sample": sample,
        "dead_total": {
            name: s.counts.get("dead", 0) for name, s in stats.jobs.items() if s.counts.get("dead")
        },
        "rejections": {name: dict(s.rejections) for name, s in stats.jobs.items() if s.rejections},
    }


def activity(
    app: App,
    now: float | None = None,
    window_s: float = 3600.0,
    bucket_s: float = 60.0,
    per_job: int | None = None,
) -> dict[str, Any]:
    """Per job name and time bucket over the last `window_s`: jobs that succeeded, jobs that
    failed (dead or rejected), and the p95 run time of those that finished in the bucket.

    Read from the newest jobs of each name, at most `per_job` (by default ACTIVITY_BUDGET shared
    out between the names, within ACTIVITY_MIN_PER_JOB..ACTIVITY_PER_JOB), stopping at jobs
    created before the window. `covered_since` says how far back that reached: when the cap
    stops the read early, older buckets are incomplete and the dashboard says so."""
    now = time.time() if now is None else now
    start = now - window_s
    size = max(1, math.ceil(window_s / bucket_s))
    names = job_names(app)
    if per_job is None:
        per_job = min(
            ACTIVITY_PER_JOB, max(ACTIVITY_MIN_PER_JOB, ACTIVITY_BUDGET // len(names or [0]))
        )
    series = []
    for name in names:
        succeeded, failed = [0] * size, [0] * size
        runs: list[list[float]] = [[] for _ in range(size)]
        covered_since, read, cursor = start, 0, None
        while True:
            want = min(ACTIVITY_PAGE, per_job - read)
            page = app.broker.jobs(JobQuery(job=name, limit=want, before=cursor))
            for record in page:
                _place(record, start, bucket_s, size, succeeded, failed, runs)
            read += len(page)
            if len(page) < want or page[-1].created_at < start:
                break  # every job created in the window was read
            if read >= per_job:
                covered_since = max(start, page[-1].created_at)  # the cap stopped the read
                break
            cursor = page[-1].id
        series.append({
            "job": name, "succeeded": succeeded, "failed": failed,
            "p95": [quantile(bucket, 0.95) for bucket in runs],
            "covered_since": covered_since, "sampled": read,
        })  # fmt: skip
    return {"now": now, "start": start, "bucket_s": bucket_s, "jobs": series}


def _place(
    record: JobRecord,
    start: float,
    bucket_s: float,
    size: int,
    succeeded: list[int],
    failed: list[int],
    runs: list[list[float]],
) -> None:
    if record.finished_at is None or record.finished_at < start:
        return
    index = min(size - 1, int((record.finished_at - start) // bucket_s))
    if record.state == State.SUCCEEDED:
        succeeded[index] += 1
    elif record.state in (State.DEAD, State.REJECTED):
        failed[index] += 1
    run = _run_time(record)
    if run is not None:
        runs[index].append(run)
