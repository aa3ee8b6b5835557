"""The SQLite broker's per-tag, per-minute and per-failure-type numbers: their tables, the Tally
that gathers one transaction's changes and writes them as one upsert per distinct key, and the
reads. Used by sqlite.py only, inside its transactions; never reads the jobs table."""

from __future__ import annotations

import sqlite3
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import repeat

import msgspec

from backroom.brokers.base import (
    BUCKET_BOUNDS,
    FAILURE_MESSAGE_CHARS,
    MAX_FAILURE_GROUPS,
    MAX_KIND,
    MAX_KINDS,
    MAX_TAGS,
    RUNNING_KIND,
    TIMELINE_KEEP_MINUTES,
    TIMELINE_KINDS,
    Claim,
    FailureGroup,
    StatsBuilder,
    TimelinePoint,
    minute_of,
    timeline_minutes,
    timeline_points,
)

# Tables: tag_names (the tags with numbers of their own, at most MAX_TAGS), tag_counts (tag,
# kind -> n; tag "" sums the tags past the cap), timeline (minute number, job, kind -> n; the
# last TIMELINE_KEEP_MINUTES minutes), failure_groups (job, exception type -> counts and the
# latest). Kinds are base.py's: outcomes, "retry", "r:<bucket>", "rt", "rm", "j:<job>", and per
# tag "w:<bucket>", "wt", "wm" and "running".
STATS_SCHEMA = """
CREATE TABLE IF NOT EXISTS tag_names (tag TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tag_counts (tag TEXT, kind TEXT, n INTEGER NOT NULL,
    PRIMARY KEY (tag, kind)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS timeline (minute INTEGER, job TEXT, kind TEXT, n INTEGER NOT NULL,
    PRIMARY KEY (minute, job, kind)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failure_groups (job TEXT, type TEXT, failures INTEGER NOT NULL,
    dead INTEGER NOT NULL, latest_id TEXT NOT NULL, latest_message TEXT NOT NULL,
    latest_at REAL NOT NULL, PRIMARY KEY (job, type)) WITHOUT ROWID;
"""
STATS_TABLES = ("tag_names", "tag_counts", "timeline", "failure_groups")

# One statement serves sums and maxima: "rm" and "wm" keep the larger value, every other kind
# adds ("running" adds negative numbers too).
UPSERT_TAG = f"""INSERT INTO tag_counts (tag, kind, n) VALUES (?, ?, ?)
    ON CONFLICT (tag, kind) DO UPDATE SET
    n = CASE WHEN kind IN {MAX_KINDS!r} THEN MAX(n, excluded.n) ELSE n + excluded.n END"""
UPSERT_MINUTE = f"""INSERT INTO timeline (minute, job, kind, n) VALUES (?, ?, ?, ?)
    ON CONFLICT (minute, job, kind) DO UPDATE SET
    n = CASE WHEN kind = '{MAX_KIND}' THEN MAX(n, excluded.n) ELSE n + excluded.n END"""
# The latest failure is the one with the latest time; on a tie, the one recorded last.
UPDATE_FAILURE = """UPDATE failure_groups SET failures = failures + 1, dead = dead + ?,
    latest_id = CASE WHEN ? >= latest_at THEN ? ELSE latest_id END,
    latest_message = CASE WHEN ? >= latest_at THEN ? ELSE latest_message END,
    latest_at = MAX(latest_at, ?) WHERE job = ? AND type = ?"""
INSERT_FAILURE = """INSERT INTO failure_groups (job, type, failures, dead, latest_id,
    latest_message, latest_at) VALUES (?, ?, 1, ?, ?, ?, ?)"""

NAMES_PER_QUERY = 500  # bound parameters per IN (...) list


class _Tags(msgspec.Struct):
    tags: tuple[str, ...] = ()


_tags_decoder = msgspec.json.Decoder(_Tags)


def tags_of(envelope: bytes) -> tuple[str, ...]:
    """The tags of a stored envelope; none when the bytes are not one."""
    try:
        return _tags_decoder.decode(envelope).tags
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ()


def _add(counters: dict[tuple[object, ...], int], key: tuple[object, ...], n: int) -> None:
    if key[-1] in MAX_KINDS:
        counters[key] = max(counters.get(key, 0), n)
    else:
        counters[key] = counters.get(key, 0) + n


def _histogram_counters(samples: list[float], prefix: str = "r") -> list[tuple[str, int]]:
    """A histogram's counters for these samples (seconds): per "<prefix>:<bucket>", and
    "<prefix>t" and "<prefix>m" in whole microseconds, each sample rounded as the Lua scripts
    round it. `prefix` is "r" (run time) or "w" (wait time)."""
    clamped = [s if s > 0.0 else 0.0 for s in samples]
    buckets = Counter(map(bisect_left, repeat(BUCKET_BOUNDS), clamped))
    us = [int(s * 1e6 + 0.5) for s in clamped]
    return [
        *((f"{prefix}:{b}", n) for b, n in buckets.items()),
        (prefix + "t", sum(us)),
        (prefix + "m", max(us)),
    ]


class Tally:
    """One broker call's changes to the per-tag, per-minute and failure-group numbers. Its
    methods only note what happened (they run once per job); SQLiteStats.write adds it up and
    writes one upsert per distinct key. A call has one `now`, so one minute."""

    __slots__ = ("events", "failures", "left", "minute", "now", "runs", "waits")

    def __init__(self, now: float) -> None:
        self.now, self.minute = now, minute_of(now)
        self.events: list[tuple[str, Sequence[str], str]] = []  # (job, tags, kind)
        self.runs: list[tuple[str, Sequence[str], float]] = []  # (job, tags, seconds)
        self.waits: list[tuple[Sequence[str], float]] = []  # (tags, seconds): jobs started
        self.left: list[Sequence[str]] = []  # tags of jobs that left running
        self.failures: list[tuple[str, str, str, str, bool]] = []

    def start(self, tags: Sequence[str], wait_s: float) -> None:
        """A job started running (claimed) after waiting `wait_s` queued."""
        self.waits.append((tags, wait_s))

    def leave(self, tags: Sequence[str]) -> None:
        """A running job left running: any outcome, a retry, a release or a lost lease. Every
        path out of running calls it once, with the tags the job was claimed with."""
        self.left.append(tags)

    def outcome(self, job: str, tags: Sequence[str], state: str) -> None:
        """A job ended in final `state`."""
        self.events.append((job, tags, state))

    def retry(self, job: str, tags: Sequence[str]) -> None:
        """A failed attempt that will be retried."""
        self.events.append((job, tags, "retry"))

    def run(self, job: str, tags: Sequence[str], seconds: float) -> None:
        """An attempt that ran for `seconds` and ended now (succeeded or failed)."""
        self.runs.append((job, tags, seconds))

    @classmethod
    def of_acks(
        cls, now: float, claims: Sequence[Claim], runs: Sequence[tuple[str, str, float]]
    ) -> Tally:
        """Successes: each claim with its (job, "run", seconds) sample, in the same order."""
        tally = cls(now)
        for claim, (job, _, seconds) in zip(claims, runs, strict=True):
            tally.runs.append((job, claim.envelope.tags, seconds))
            tally.events.append((job, claim.envelope.tags, "succeeded"))
            tally.left.append(claim.envelope.tags)
        return tally

    def failure(self, job: str, job_id: str, error_type: str, message: str, dead: bool) -> None:
        self.failures.append((job, error_type, job_id, message[:FAILURE_MESSAGE_CHARS], dead))

    def counters(self) -> tuple[dict[tuple[object, ...], int], dict[tuple[object, ...], int]]:
        """(minute, job, kind) -> n and (tag, kind) -> n; "rm" holds a maximum, the rest sums.
        The tags' keys are in the order the tags were first seen (the cap admits them so)."""
        minutes: dict[tuple[object, ...], int] = {}
        tags: dict[tuple[object, ...], int] = {}
        by_job: dict[str, list[float]] = {}
        by_tag: dict[str, list[float]] = {}
        for job, job_tags, seconds in self.runs:
            by_job.setdefault(job, []).append(seconds)
            for tag in job_tags:
                if tag:
                    by_tag.setdefault(tag, []).append(seconds)
        for job, samples in by_job.items():
            for kind, n in _histogram_counters(samples):
                minutes[(self.minute, job, kind)] = n
        for tag, samples in by_tag.items():
            for kind, n in _histogram_counters(samples):
                tags[(tag, kind)] = n
        waits: dict[str, list[float]] = {}
        for job_tags, seconds in self.waits:
            for tag in job_tags:
                if tag:
                    waits.setdefault(tag, []).append(seconds)
        for tag, samples in waits.items():
            for kind, n in _histogram_counters(samples, "w"):
                tags[(tag, kind)] = n
        running: Counter[str] = Counter()
        for job_tags, _ in self.waits:
            running.update(tag for tag in job_tags if tag)
        for job_tags in self.left:
            running.subtract(tag for tag in job_tags if tag)
        tags.update({(tag, RUNNING_KIND): n for tag, n in running.items() if n})
        events = self.events
        for (job, kind), n in Counter((job, kind) for job, _, kind in events).items():
            if kind in TIMELINE_KINDS or kind == "retry":
                minutes[(self.minute, job, kind)] = n
        tags.update(Counter((tag, kind) for _, job_tags, kind in events for tag in job_tags if tag))
        tags.update(
            Counter(
                (tag, "j:" + job)
                for job, job_tags, kind in events
                if kind != "retry"
                for tag in job_tags
                if tag
            )
        )
        return minutes, tags


class SQLiteStats:
    """The broker's writer and reader of these tables. It remembers the last minute it pruned the
    timeline at, so pruning costs one DELETE per minute per process, not one per write."""

    def __init__(self) -> None:
        self._pruned_minute: int | None = None

    def write(self, db: sqlite3.Connection, tally: Tally) -> None:
        """Inside the caller's transaction: the statements for everything `tally` noted."""
        if not (tally.events or tally.runs or tally.failures or tally.waits or tally.left):
            return
        minutes, tags = tally.counters()
        if tags:
            self._write_tags(db, tags)
        if minutes:
            db.executemany(UPSERT_MINUTE, [(*key, n) for key, n in minutes.items()])
            if tally.minute != self._pruned_minute:
                db.execute(
                    "DELETE FROM timeline WHERE minute < ?",
                    (tally.minute - TIMELINE_KEEP_MINUTES,),
                )
                self._pruned_minute = tally.minute
        for job, error_type, job_id, message, dead in tally.failures:
            self._write_failure(db, job, error_type, job_id, message, dead, tally.now)

    @staticmethod
    def _write_tags(db: sqlite3.Connection, counters: dict[tuple[object, ...], int]) -> None:
        """Tags past MAX_TAGS are counted under tag "" (admitted in the order first seen)."""
        names = list(dict.fromkeys(str(tag) for tag, _ in counters))
        known: set[str] = set()
        for start in range(0, len(names), NAMES_PER_QUERY):
            chunk = names[start : start + NAMES_PER_QUERY]
            marks = ",".join("?" * len(chunk))
            known.update(
                row[0]
                for row in db.execute(f"SELECT tag FROM tag_names WHERE tag IN ({marks})", chunk)
            )
        new = [name for name in names if name not in known]
        if new:
            room = max(0, MAX_TAGS - db.execute("SELECT COUNT(*) FROM tag_names").fetchone()[0])
            db.executemany("INSERT INTO tag_names (tag) VALUES (?)", [(t,) for t in new[:room]])
            past_cap = set(new[room:])
            if past_cap:
                merged: dict[tuple[object, ...], int] = {}
                for (tag, kind), n in counters.items():
                    _add(merged, ("" if tag in past_cap else tag, kind), n)
                counters = merged
        db.executemany(UPSERT_TAG, [(*key, n) for key, n in counters.items()])

    @staticmethod
    def _write_failure(
        db: sqlite3.Connection,
        job: str,
        error_type: str,
        job_id: str,
        message: str,
        dead: bool,
        now: float,
    ) -> None:
        """One UPDATE when the group exists (the usual case); a new group past
        MAX_FAILURE_GROUPS is counted in the group ("", "")."""
        values = (int(dead), now, job_id, now, message, now)
        if db.execute(UPDATE_FAILURE, (*values, job, error_type)).rowcount:
            return
        if db.execute("SELECT COUNT(*) FROM failure_groups").fetchone()[0] >= MAX_FAILURE_GROUPS:
            job, error_type = "", ""
            if db.execute(UPDATE_FAILURE, (*values, job, error_type)).rowcount:
                return
        db.execute(INSERT_FAILURE, (job, error_type, int(dead), job_id, message, now))

    # -- reading ----------------------------------------------------------------------------------
    @staticmethod
    def read_tags(db: sqlite3.Connection, stats: StatsBuilder) -> None:
        for tag, kind, n in db.execute("SELECT tag, kind, n FROM tag_counts"):
            stats.tag(tag, kind, n)

    @staticmethod
    def timeline(db: sqlite3.Connection, since: float, now: float) -> list[TimelinePoint]:
        minutes = timeline_minutes(since, now)
        if not minutes:
            return []
        rows: Iterable[tuple[int, str, str, int]] = db.execute(
            "SELECT minute, job, kind, n FROM timeline WHERE minute BETWEEN ? AND ?",
            (minutes[0], minutes[-1]),
        ).fetchall()
        return timeline_points(rows)

    @staticmethod
    def failure_groups(db: sqlite3.Connection, limit: int) -> list[FailureGroup]:
        rows = db.execute(
            "SELECT job, type, failures, dead, latest_id, latest_message, latest_at "
            "FROM failure_groups ORDER BY failures DESC, job, type LIMIT ?",
            (max(0, limit),),
        ).fetchall()
        return [FailureGroup(*row) for row in rows]
