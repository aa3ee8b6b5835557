"""The SQLite broker's per-tag, per-minute and per-failure-type numbers: their tables, the Tally
that gathers one transaction's changes and writes them as one upsert per distinct key, and the
reads. Used by sqlite.py only, inside its transactions; never reads the jobs table."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

import msgspec

from backroom.brokers.base import (
    FAILURE_MESSAGE_CHARS,
    MAX_FAILURE_GROUPS,
    MAX_KIND,
    MAX_TAGS,
    TIMELINE_KEEP_MINUTES,
    TIMELINE_KINDS,
    FailureGroup,
    StatsBuilder,
    TimelinePoint,
    bucket_of,
    micros,
    minute_of,
    timeline_minutes,
    timeline_points,
)

# Tables: tag_names (the tags with numbers of their own, at most MAX_TAGS), tag_counts (tag,
# kind -> n; tag "" sums the tags past the cap), timeline (minute number, job, kind -> n; the
# last TIMELINE_KEEP_MINUTES minutes), failure_groups (job, exception type -> counts and the
# latest). Kinds are base.py's: outcomes, "retry", "r:<bucket>", "rt", "rm", "j:<job>".
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

# One statement serves sums and the maximum: "rm" keeps the larger value, every other kind adds.
UPSERT_TAG = f"""INSERT INTO tag_counts (tag, kind, n) VALUES (?, ?, ?)
    ON CONFLICT (tag, kind) DO UPDATE SET
    n = CASE WHEN kind = '{MAX_KIND}' THEN MAX(n, excluded.n) ELSE n + excluded.n END"""
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
    if key[-1] == MAX_KIND:
        counters[key] = max(counters.get(key, 0), n)
    else:
        counters[key] = counters.get(key, 0) + n


class Tally:
    """One transaction's changes to the per-tag, per-minute and failure-group numbers, gathered
    in memory; SQLiteStats.write turns them into one upsert per distinct key."""

    __slots__ = ("failures", "latest_minute", "minutes", "tags")

    def __init__(self) -> None:
        self.tags: dict[tuple[object, ...], int] = {}  # (tag, kind) -> n
        self.minutes: dict[tuple[object, ...], int] = {}  # (minute, job, kind) -> n
        self.failures: list[tuple[str, str, str, str, bool, float]] = []
        self.latest_minute: int | None = None

    def _minute(self, now: float) -> int:
        minute = minute_of(now)
        if self.latest_minute is None or minute > self.latest_minute:
            self.latest_minute = minute
        return minute

    def outcome(self, job: str, tags: Sequence[str], state: str, now: float) -> None:
        """A job ended in final `state`."""
        if state in TIMELINE_KINDS:
            _add(self.minutes, (self._minute(now), job, state), 1)
        for tag in tags:
            if tag:
                _add(self.tags, (tag, state), 1)
                _add(self.tags, (tag, "j:" + job), 1)

    def retry(self, job: str, tags: Sequence[str], now: float) -> None:
        """A failed attempt that will be retried."""
        _add(self.minutes, (self._minute(now), job, "retry"), 1)
        for tag in tags:
            if tag:
                _add(self.tags, (tag, "retry"), 1)

    def run(self, job: str, tags: Sequence[str], seconds: float, now: float) -> None:
        """An attempt that ran for `seconds` and ended now (succeeded or failed)."""
        bucket, us = f"r:{bucket_of(seconds)}", micros(seconds)
        minute = self._minute(now)
        for counters, key in ((self.minutes, (minute, job)),
                              *((self.tags, (tag,)) for tag in tags if tag)):  # fmt: skip
            _add(counters, (*key, bucket), 1)
            _add(counters, (*key, "rt"), us)
            _add(counters, (*key, MAX_KIND), us)

    def failure(
        self, job: str, job_id: str, error_type: str, message: str, dead: bool, now: float
    ) -> None:
        self.failures.append((job, error_type, job_id, message[:FAILURE_MESSAGE_CHARS], dead, now))


class SQLiteStats:
    """The broker's writer and reader of these tables. It remembers the last minute it pruned the
    timeline at, so pruning costs one DELETE per minute per process, not one per write."""

    def __init__(self) -> None:
        self._pruned_minute: int | None = None

    def write(self, db: sqlite3.Connection, tally: Tally) -> None:
        """Inside the caller's transaction: the statements for everything `tally` gathered."""
        if tally.tags:
            self._write_tags(db, tally.tags)
        if tally.minutes:
            db.executemany(UPSERT_MINUTE, [(*key, n) for key, n in tally.minutes.items()])
        if tally.latest_minute is not None and tally.latest_minute != self._pruned_minute:
            db.execute(
                "DELETE FROM timeline WHERE minute < ?",
                (tally.latest_minute - TIMELINE_KEEP_MINUTES,),
            )
            self._pruned_minute = tally.latest_minute
        for job, error_type, job_id, message, dead, now in tally.failures:
            self._write_failure(db, job, error_type, job_id, message, dead, now)

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
