"""The embedded SQLite broker (sqlite:///FILE, and memory:// on an in-memory database).
WAL mode; every method is one BEGIN IMMEDIATE transaction; every query is served by an index,
and counters are kept per state change so stats never scan the jobs table."""

from __future__ import annotations

import functools
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import msgspec

from backroom.brokers import sqlite_stats
from backroom.brokers.base import (
    Broker,
    Claim,
    Failure,
    FailureGroup,
    JobQuery,
    JobRecord,
    Outcome,
    Stats,
    StatsBuilder,
    TimelinePoint,
    WorkerInfo,
    bucket_of,
    reason_category,
    started_of,
)
from backroom.envelope import FINAL_STATES, Envelope, State, decode, encode_json
from backroom.errors import BadEnvelope, BrokerError, ConfigError

# Listing indexes leave running jobs out (jobs_lease finds them; at most a few per worker
# slot): a claim and an ack then each move one index entry fewer, and a job's name needs no
# index of its own (by name alone is one seek per state). Older files' jobs_state, jobs_name
# and jobs_name_state are dropped when a broker opens them.
# Tables: jobs (one row per job; seq orders FIFO and newest-first), tags (tag -> seq), uniques
# (unique_key -> holding job), counts (job, queue, state -> n), hist/timing/events (stats),
# paused (queue), schedules (name -> last tick fired), workers (heartbeats).
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    job TEXT NOT NULL,
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    due_at REAL,
    lease_until REAL,
    expires REAL,
    envelope BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_retries INTEGER NOT NULL DEFAULT 0,
    attempt_id TEXT,
    worker_id TEXT,
    unique_key TEXT,
    unique_for TEXT,
    created_at REAL NOT NULL,
    queued_at REAL,
    started_at REAL,
    finished_at REAL,
    progress REAL,
    progress_message TEXT,
    result BLOB,
    error BLOB,
    reason TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_ready ON jobs(queue, priority DESC, seq) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_due ON jobs(due_at) WHERE state IN ('scheduled', 'retrying');
CREATE INDEX IF NOT EXISTS jobs_expires ON jobs(expires)
    WHERE expires IS NOT NULL AND state IN ('scheduled', 'queued', 'retrying');
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(lease_until) WHERE state = 'running';
DROP INDEX IF EXISTS jobs_state;
DROP INDEX IF EXISTS jobs_name;
DROP INDEX IF EXISTS jobs_name_state;
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, seq) WHERE state != 'running';
CREATE INDEX IF NOT EXISTS jobs_by_name ON jobs(job, state, seq) WHERE state != 'running';
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs(state, finished_at) WHERE finished_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS tags (tag TEXT NOT NULL, seq INTEGER NOT NULL, PRIMARY KEY (tag, seq))
    WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS uniques (key TEXT PRIMARY KEY, job_id TEXT NOT NULL, until REAL)
    WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS uniques_until ON uniques(until) WHERE until IS NOT NULL;
CREATE TABLE IF NOT EXISTS counts (job TEXT, queue TEXT, state TEXT, n INTEGER NOT NULL,
    PRIMARY KEY (job, queue, state)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS hist (job TEXT, kind TEXT, bucket INTEGER, n INTEGER NOT NULL,
    PRIMARY KEY (job, kind, bucket)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS timing (job TEXT, kind TEXT, count INTEGER NOT NULL,
    total REAL NOT NULL, max REAL NOT NULL, PRIMARY KEY (job, kind)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (job TEXT, kind TEXT, n INTEGER NOT NULL,
    PRIMARY KEY (job, kind)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS paused (queue TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS schedules (name TEXT PRIMARY KEY, tick REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS workers (id TEXT PRIMARY KEY, info BLOB NOT NULL,
    expires_at REAL NOT NULL) WITHOUT ROWID;
"""

INSERT_JOB = """INSERT INTO jobs (id, job, queue, state, priority, due_at, expires, envelope,
    max_retries, unique_key, unique_for, created_at, queued_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
COUNT_SQL = (
    "INSERT INTO counts (job, queue, state, n) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (job, queue, state) DO UPDATE SET n = n + excluded.n"
)
SELECT_READY = """SELECT seq, id, job, queue, envelope, attempts, expires, queued_at, unique_key,
    unique_for FROM jobs WHERE state = 'queued' AND queue = ?
    ORDER BY priority DESC, seq LIMIT ?"""
START_RUN = """UPDATE jobs SET state = 'running', attempts = attempts + 1, lease_until = ?,
    worker_id = ?, attempt_id = ?, started_at = ?, cancel_requested = 0, progress = NULL,
    progress_message = NULL WHERE seq = ?"""
# A write that needs the lease: matches only while this claim still owns the running job.
OWNED = "id = ? AND attempt_id = ? AND state = 'running'"
RETURNS = "RETURNING job, queue, started_at, unique_key, unique_for"
ACK_CHUNK = 200  # outcomes per UPDATE (4 parameters each)
ACK_SIZES = (1, 2, 4, 8, 16, 32, 48, 64, 96, 128, 160, ACK_CHUNK)
# successes, set-based: a cancel asked for too late is cleared (it succeeded all the same)
ACK_SQL = """WITH v(id, ai, result, started) AS (VALUES {values})
UPDATE jobs SET state = 'succeeded', lease_until = NULL, result = v.result, finished_at = ?,
    progress = 1.0, reason = NULL, started_at = coalesce(v.started, jobs.started_at)
FROM v WHERE jobs.id = v.id AND jobs.attempt_id = v.ai AND jobs.state = 'running'
RETURNING jobs.id, jobs.job, jobs.queue, jobs.started_at, jobs.unique_key, jobs.unique_for"""
SELECT_OWNED = f"""SELECT seq, job, queue, cancel_requested, reason, unique_key, unique_for
    FROM jobs WHERE {OWNED}"""
REQUEUE_RELEASED = """UPDATE jobs SET state = 'queued', attempts = attempts - 1, lease_until = NULL,
    worker_id = NULL, attempt_id = NULL, queued_at = ? WHERE seq = ?"""
# The reason is kept so that the job ends with it even when its worker never reports back.
REQUEST_CANCEL = "UPDATE jobs SET cancel_requested = 1, reason = ? WHERE seq = ?"
SELECT_LEASE_EXPIRED = """SELECT seq, id, job, queue, attempts, max_retries, unique_key,
    unique_for, cancel_requested, reason, envelope FROM jobs
    WHERE state = 'running' AND lease_until < ? ORDER BY lease_until LIMIT ?"""
RECORD_COLUMNS = """id, state, envelope, attempts, created_at, queued_at, started_at,
    finished_at, progress, progress_message, result, error, reason, worker_id,
    cancel_requested, job, queue, seq"""

LIVE_STATES = ("scheduled", "queued", "running", "retrying")
DEFAULT_BUSY_TIMEOUT_MS = 30_000
# An idle worker looks at PRAGMA data_version at least this often (from 1 ms, growing): start
# latency from another process is about half of it plus a claim (a look costs ~10 us of CPU).
WATCH_MAX_S = 0.005
# A single enqueue touches six pages (row, id, ready, two listing indexes, counts): 2 KiB pages
# halve the log written per commit against 4 KiB (single enqueue +30%, batches -3%).
PAGE_SIZE = 2048
MAX_BUSY_RETRIES = 20

_failure_encoder = msgspec.json.Encoder()
_failure_decoder = msgspec.json.Decoder(dict[str, str])
_worker_decoder = msgspec.json.Decoder(dict[str, Any])


@functools.cache
def _ack_sql(size: int) -> str:
    return ACK_SQL.format(values=", ".join(["(?, ?, ?, ?)"] * size))


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def _attempt_token() -> str:
    return os.urandom(6).hex()


class _Transaction:
    """SQLiteBroker._tx: under the broker's lock, BEGIN IMMEDIATE (retried while the database
    is locked), then COMMIT, or ROLLBACK on any exception (an SQLite error surfaces as
    BrokerError); local waiters are woken after a commit. A class, not a @contextmanager
    generator: every broker call is one transaction, and the generator's machinery was a few
    microseconds of each single enqueue."""

    __slots__ = ("broker",)

    def __init__(self, broker: SQLiteBroker) -> None:
        self.broker = broker

    def __enter__(self) -> sqlite3.Connection:
        broker = self.broker
        broker._lock.acquire()
        try:
            broker._retry_busy(broker._begin)
        except BaseException as exc:
            broker._lock.release()
            if isinstance(exc, sqlite3.Error):
                raise broker._error(exc) from None
            raise
        return broker._db

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        broker = self.broker
        try:
            if exc is not None:
                broker._abort(exc)  # returns only to let `exc` go on as it is
                return
            try:
                broker._db.execute("COMMIT")
            except BaseException as error:
                broker._abort(error)
                raise
        finally:
            broker._lock.release()
        broker._committed()


class SQLiteBroker(Broker):
    """One connection per broker, guarded by a lock (SQLite serializes writers anyway). Safe to
    share between threads; several processes may open the same file."""

    def __init__(self, path: str, url: str | None = None) -> None:
        self.path = path
        self.url = url or f"sqlite:///{path}"
        self._lock = threading.RLock()
        self._local_change = threading.Condition(threading.Lock())
        self._claim_mark: tuple[int, int] | None = None
        self._version = 0  # bumped on local commits; wakes local waiters
        self._stats = sqlite_stats.SQLiteStats()  # per tag, per minute, per failure type
        try:
            if path != ":memory:":
                parent = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(parent):
                    raise ConfigError(
                        f"SQLite broker {self.url!r}: folder {parent!r} does not exist"
                    )
            self._db = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
            self._db.execute(f"PRAGMA busy_timeout = {DEFAULT_BUSY_TIMEOUT_MS}")
            # A new file gets PAGE_SIZE pages (an existing one keeps its own): every commit
            # writes each page it touched to the write-ahead log, and the checkpoint syncs them.
            self._db.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            if path != ":memory:":
                self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
            self._create_schema()
        except sqlite3.Error as exc:
            raise BrokerError(f"cannot open SQLite broker {self.url!r}: {exc}") from None

    @classmethod
    def from_url(cls, url: str) -> SQLiteBroker:
        parts = urlsplit(url)
        path = unquote(parts.path)
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(
                f"broker URL {url!r}: a SQLite URL has no host; use sqlite:///relative.db "
                "or sqlite:////absolute/path.db"
            )
        path = path[1:] if path.startswith("/") else path  # sqlite:///x.db -> x.db
        if not path:
            raise ConfigError(f"broker URL {url!r} names no file; use sqlite:///backroom.db")
        return cls(path, url=url)

    def _create_schema(self) -> None:
        with self._lock:
            # executescript commits on its own; each CREATE is idempotent.
            self._retry_busy(lambda: self._db.executescript(SCHEMA + sqlite_stats.STATS_SCHEMA))

    def _retry_busy(self, fn: Any) -> Any:
        """fn(), tried again with back-off while the database is locked or busy."""
        for attempt in range(MAX_BUSY_RETRIES):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(min(0.01 * 2**attempt, 1.0))
        return fn()

    # -- transactions ---------------------------------------------------------------------------
    def _tx(self) -> _Transaction:
        """One BEGIN IMMEDIATE transaction; `database is locked` is retried, never surfaced
        under normal contention. Local waiters are woken after a commit."""
        return _Transaction(self)

    def _begin(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def _abort(self, exc: BaseException) -> None:
        """Roll back after `exc`; raises it as BrokerError when it is an SQLite error."""
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):
            raise self._error(exc) from None

    def _committed(self) -> None:
        with self._local_change:
            self._version += 1
            self._local_change.notify_all()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise self._error(exc) from None

    def _error(self, exc: sqlite3.Error) -> BrokerError:
        text = str(exc)
        if "readonly" in text or "read-only" in text:
            return BrokerError(f"SQLite broker {self.url!r} is read-only: {text}")
        if "full" in text:
            return BrokerError(f"SQLite broker {self.url!r}: disk full ({text})")
        return BrokerError(f"SQLite broker {self.url!r}: {text}")

    # -- bookkeeping inside a transaction ---------------------------------------------------------
    @staticmethod
    def _count(db: sqlite3.Connection, deltas: Mapping[tuple[str, str, str], int]) -> None:
        rows = [(job, queue, state, n) for (job, queue, state), n in deltas.items() if n]
        if len(rows) == 1:  # the usual case (one enqueue): execute costs less than executemany
            db.execute(COUNT_SQL, rows[0])
        else:
            db.executemany(COUNT_SQL, rows)

    @staticmethod
    def _time(db: sqlite3.Connection, samples: Iterable[tuple[str, str, float]]) -> None:
        buckets: Counter[tuple[str, str, int]] = Counter()
        totals: dict[tuple[str, str], list[float]] = {}
        for job, kind, seconds in samples:
            seconds = max(seconds, 0.0)
            buckets[(job, kind, bucket_of(seconds))] += 1
            acc = totals.setdefault((job, kind), [0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += seconds
            acc[2] = max(acc[2], seconds)
        db.executemany(
            "INSERT INTO hist (job, kind, bucket, n) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (job, kind, bucket) DO UPDATE SET n = n + excluded.n",
            [(job, kind, b, n) for (job, kind, b), n in buckets.items()],
        )
        db.executemany(
            "INSERT INTO timing (job, kind, count, total, max) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (job, kind) DO UPDATE SET count = count + excluded.count, "
            "total = total + excluded.total, max = MAX(max, excluded.max)",
            [(job, kind, int(c), t, m) for (job, kind), (c, t, m) in totals.items()],
        )

    @staticmethod
    def _event(db: sqlite3.Connection, job: str, kind: str, n: int = 1) -> None:
        db.execute(
            "INSERT INTO events (job, kind, n) VALUES (?, ?, ?) "
            "ON CONFLICT (job, kind) DO UPDATE SET n = n + excluded.n",
            (job, kind, n),
        )

    @staticmethod
    def _stored_tags(db: sqlite3.Connection, seq: int) -> tuple[str, ...]:
        """The tags of a job whose envelope was not read (cancel, expiry, sweep: rare paths)."""
        row = db.execute("SELECT envelope FROM jobs WHERE seq = ?", (seq,)).fetchone()
        return () if row is None else sqlite_stats.tags_of(row[0])

    @staticmethod
    def _free_unique(
        db: sqlite3.Connection, job_id: str, key: str | None, mode: str | None, when: str
    ) -> None:
        """Release a unique key held by this job. `when` is "start" or "finish"; a key held for a
        number of seconds is only released by time."""
        if key is None:
            return
        held_until_finish = mode in (None, "finish")
        if (
            (when == "start" and mode == "start")
            or (when == "finish" and held_until_finish)
            or (when == "finish" and mode == "start")
        ):
            db.execute("DELETE FROM uniques WHERE key = ? AND job_id = ?", (key, job_id))

    # -- producing --------------------------------------------------------------------------------
    def enqueue(self, envelopes: Sequence[Envelope], now: float | None = None) -> list[str]:
        now = _now(now)
        ids: list[str] = []
        deltas: dict[tuple[str, str, str], int] = {}  # a Counter costs more than one enqueue's use
        with self._tx() as db:
            for env in envelopes:
                if env.unique_key is not None:
                    held = db.execute(
                        "SELECT job_id, until FROM uniques WHERE key = ?", (env.unique_key,)
                    ).fetchone()
                    if held is not None and (held[1] is None or held[1] > now):
                        ids.append(held[0])
                        continue
                    # held for N seconds after this enqueue (`now`): created_at is the
                    # producer's clock and may be absent (0.0) in envelopes from elsewhere
                    until = (
                        now + float(env.unique_for)
                        if isinstance(env.unique_for, int | float)
                        else None
                    )
                    db.execute(
                        "INSERT OR REPLACE INTO uniques (key, job_id, until) VALUES (?, ?, ?)",
                        (env.unique_key, env.id, until),
                    )
                scheduled = env.eta is not None and env.eta > now
                state = "scheduled" if scheduled else "queued"
                cursor = db.execute(
                    INSERT_JOB,
                    (
                        env.id,
                        env.job,
                        env.queue,
                        state,
                        env.priority,
                        env.eta if scheduled else None,
                        env.expires,
                        env.encode(),
                        env.max_retries,
                        env.unique_key,
                        None if env.unique_for is None else str(env.unique_for),
                        env.created_at or now,
                        None if scheduled else now,
                    ),
                )
                if env.tags:
                    db.executemany(
                        "INSERT OR IGNORE INTO tags (tag, seq) VALUES (?, ?)",
                        [(tag, cursor.lastrowid) for tag in env.tags],
                    )
                key = (env.job, env.queue, state)
                deltas[key] = deltas.get(key, 0) + 1
                ids.append(env.id)
            self._count(db, deltas)
        return ids

    # -- consuming --------------------------------------------------------------------------------
    def claim(
        self,
        queues: Sequence[str],
        worker_id: str,
        lease_s: float,
        limit: int,
        now: float | None = None,
        *,
        offer: bool = False,
    ) -> list[Claim]:
        now = _now(now)
        lease_until = now + lease_s
        claims: list[Claim] = []
        deltas: Counter[tuple[str, str, str]] = Counter()
        waits: list[tuple[str, str, float]] = []
        tally = sqlite_stats.Tally(now)
        with self._tx() as db:
            # what this connection has seen, so wait_for_work wakes for any commit after it
            seen_version = db.execute("PRAGMA data_version").fetchone()[0]
            paused = {row[0] for row in db.execute("SELECT queue FROM paused")}
            for queue in queues:
                if queue in paused:
                    continue
                while len(claims) < limit:
                    rows = db.execute(SELECT_READY, (queue, limit - len(claims))).fetchall()
                    if not rows:
                        break
                    for seq, job_id, job, q, raw, attempts, expires, queued_at, ukey, ufor in rows:
                        deltas[(job, q, "queued")] -= 1
                        if expires is not None and expires <= now:
                            self._finish_row(db, seq, "cancelled", now, reason="expired")
                            self._free_unique(db, job_id, ukey, ufor, "finish")
                            deltas[(job, q, "cancelled")] += 1
                            tally.outcome(job, sqlite_stats.tags_of(raw), "cancelled")
                            continue
                        broken = None
                        try:
                            env = decode(raw).with_attempt(attempts + 1)
                        except BadEnvelope as exc:  # the worker rejects it (and tells its hooks)
                            env = Envelope(id=job_id, job=job, source="?", queue=q,
                                           attempt=attempts + 1)  # fmt: skip
                            broken = str(exc)
                        token = _attempt_token()
                        db.execute(START_RUN, (lease_until, worker_id, token, now, seq))
                        self._free_unique(db, job_id, ukey, ufor, "start")
                        deltas[(job, q, "running")] += 1
                        wait_s = now - (queued_at or now)
                        waits.append((job, "wait", wait_s))
                        tally.start(env.tags, wait_s)
                        claims.append(Claim(env, lease_until, token, broken))
                if len(claims) >= limit:
                    break
            self._count(db, deltas)
            self._time(db, waits)
            self._stats.write(db, tally)
        with self._local_change:
            self._claim_mark = (seen_version, self._version)
        return claims

    @staticmethod
    def _finish_row(
        db: sqlite3.Connection, seq: int, state: str, now: float, reason: str | None = None
    ) -> None:
        db.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, reason = ?, lease_until = NULL, "
            "due_at = NULL WHERE seq = ?",
            (state, now, reason, seq),
        )

    def wait_for_work(
        self, queues: Sequence[str], timeout_s: float, worker_id: str | None = None
    ) -> list[Claim]:
        """SQLite has no cross-process notification: watch PRAGMA data_version (it changes when
        another connection commits) every few milliseconds, and wake at once on local commits."""
        deadline = time.monotonic() + timeout_s
        if self._claim_mark is not None:  # a commit since the last claim may be work: wake
            start, local = self._claim_mark
        else:
            with self._read() as db:
                start = db.execute("PRAGMA data_version").fetchone()[0]
            local = self._version
        interval = 0.001
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            with self._local_change:
                if self._version != local:
                    return []
                self._local_change.wait(min(interval, remaining))
                if self._version != local:
                    return []
            with self._read() as db:
                if db.execute("PRAGMA data_version").fetchone()[0] != start:
                    return []
            interval = min(interval * 1.5, WATCH_MAX_S)

    def extend(self, claims: Sequence[Claim], lease_s: float, now: float | None = None) -> set[str]:
        now = _now(now)
        kept: set[str] = set()
        with self._tx() as db:
            for claim in claims:
                cursor = db.execute(
                    f"UPDATE jobs SET lease_until = ? WHERE {OWNED}",
                    (now + lease_s, claim.id, claim.attempt_id),
                )
                if cursor.rowcount:
                    kept.add(claim.id)
        return kept

    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        if not job_ids:
            return set()
        marks = ",".join("?" * len(job_ids))
        with self._read() as db:
            rows = db.execute(
                f"SELECT id FROM jobs WHERE id IN ({marks}) AND state = 'running' "
                "AND cancel_requested = 1",
                list(job_ids),
            ).fetchall()
        return {row[0] for row in rows}

    def _end(
        self,
        db: sqlite3.Connection,
        claim: Claim,
        state: str,
        now: float,
        deltas: Counter[tuple[str, str, str]],
        runs: list[tuple[str, str, float]],
        **columns: Any,
    ) -> bool:
        """Move a job this claim owns from running to `state`, setting `columns`."""
        names = ", ".join(f"{name} = ?" for name in columns)
        row = db.execute(
            f"UPDATE jobs SET state = ?, lease_until = NULL, {names} WHERE {OWNED} {RETURNS}",
            (state, *columns.values(), claim.id, claim.attempt_id),
        ).fetchone()
        if row is None:
            return False
        job, queue, started_at, ukey, ufor = row
        deltas[(job, queue, "running")] -= 1
        deltas[(job, queue, state)] += 1
        runs.append((job, "run", now - (started_at or now)))
        if state in FINAL_STATES:
            self._free_unique(db, claim.id, ukey, ufor, "finish")
        return True

    def ack(self, outcomes: Sequence[Outcome], now: float | None = None) -> list[bool]:
        """One set-based UPDATE per chunk of outcomes (not one statement per job)."""
        now = _now(now)
        rows = [(o[0].id, o[0].attempt_id, encode_json(o[1]), started_of(o)) for o in outcomes]
        owned: dict[str, tuple[Any, ...]] = {}
        deltas: Counter[tuple[str, str, str]] = Counter()
        runs: list[tuple[str, str, float]] = []
        with self._tx() as db:
            for start in range(0, len(rows), ACK_CHUNK):
                chunk = rows[start : start + ACK_CHUNK]
                # a few statement sizes, padded with rows that match nothing: each size is
                # prepared once and cached, not once per batch length
                size = next(n for n in ACK_SIZES if n >= len(chunk))
                padded = [*(x for r in chunk for x in r), *(None,) * (4 * (size - len(chunk)))]
                for row in db.execute(_ack_sql(size), (*padded, now)):
                    owned[row[0]] = row
            done = [row[0] in owned for row in rows]
            for (job_id, *_), ok in zip(rows, done, strict=True):
                if not ok:
                    continue
                _, job, queue, started_at, ukey, ufor = owned[job_id]
                deltas[(job, queue, "running")] -= 1
                deltas[(job, queue, "succeeded")] += 1
                runs.append((job, "run", now - (started_at or now)))
                if ukey is not None:
                    self._free_unique(db, job_id, ukey, ufor, "finish")
            self._count(db, deltas)
            self._time(db, runs)
            # one (job, "run", seconds) per claim recorded, in order
            acked = [outcome[0] for outcome, ok in zip(outcomes, done, strict=True) if ok]
            self._stats.write(db, sqlite_stats.Tally.of_acks(now, acked, runs))
        return done

    def nack(
        self, claim: Claim, failure: Failure, retry_at: float | None, now: float | None = None
    ) -> bool:
        now = _now(now)
        error = _failure_encoder.encode(
            {"type": failure.type, "message": failure.message, "traceback": failure.traceback}
        )
        deltas: Counter[tuple[str, str, str]] = Counter()
        runs: list[tuple[str, str, float]] = []
        with self._tx() as db:
            owned = (
                None
                if retry_at is None
                else db.execute(SELECT_OWNED, (claim.id, claim.attempt_id)).fetchone()
            )
            if retry_at is None:
                ok = self._end(db, claim, "dead", now, deltas, runs, error=error, finished_at=now)
            elif owned is not None and owned[3]:  # told to stop: a retry would run it again
                ok = self._end(
                    db, claim, "cancelled", now, deltas, runs,
                    error=error, finished_at=now, reason=owned[4] or "cancelled",
                )  # fmt: skip
            else:
                ok = self._end(
                    db,
                    claim,
                    "retrying",
                    now,
                    deltas,
                    runs,
                    error=error,
                    due_at=retry_at,
                    worker_id=None,
                )
                if ok:
                    self._event(db, claim.envelope.job, "retry")
            if ok:
                self._count(db, deltas)
                self._time(db, runs)
                job, _, run_s = runs[-1]
                tags, tally = claim.envelope.tags, sqlite_stats.Tally(now)
                tally.run(job, tags, run_s)
                tally.leave(tags)
                if retry_at is None:
                    tally.outcome(job, tags, "dead")
                elif owned is not None and owned[3]:
                    tally.outcome(job, tags, "cancelled")
                else:
                    tally.retry(job, tags)
                tally.failure(job, claim.id, failure.type, failure.message, retry_at is None)
                self._stats.write(db, tally)
        return ok

    def reject(self, claim: Claim, reason: str, now: float | None = None) -> bool:
        now = _now(now)
        deltas: Counter[tuple[str, str, str]] = Counter()
        runs: list[tuple[str, str, float]] = []
        with self._tx() as db:
            ok = self._end(db, claim, "rejected", now, deltas, runs, reason=reason, finished_at=now)
            if ok:
                self._count(db, deltas)
                self._event(db, claim.envelope.job, f"reject:{reason_category(reason)}")
                tally = sqlite_stats.Tally(now)
                tally.outcome(runs[-1][0], claim.envelope.tags, "rejected")
                tally.leave(claim.envelope.tags)
                self._stats.write(db, tally)
        return ok

    def finish_cancelled(self, claim: Claim, reason: str, now: float | None = None) -> bool:
        now = _now(now)
        deltas: Counter[tuple[str, str, str]] = Counter()
        runs: list[tuple[str, str, float]] = []
        with self._tx() as db:
            ok = self._end(
                db, claim, "cancelled", now, deltas, runs, reason=reason, finished_at=now
            )
            if ok:
                self._count(db, deltas)
                tally = sqlite_stats.Tally(now)
                tally.outcome(runs[-1][0], claim.envelope.tags, "cancelled")
                tally.leave(claim.envelope.tags)
                self._stats.write(db, tally)
        return ok

    def release(self, claims: Sequence[Claim], now: float | None = None) -> int:
        now = _now(now)
        deltas: Counter[tuple[str, str, str]] = Counter()
        released = 0
        tally = sqlite_stats.Tally(now)
        with self._tx() as db:
            for claim in claims:
                row = db.execute(SELECT_OWNED, (claim.id, claim.attempt_id)).fetchone()
                if row is None:
                    continue
                seq, job, queue, cancel_wanted, reason, ukey, ufor = row
                released += 1
                deltas[(job, queue, "running")] -= 1
                tally.leave(claim.envelope.tags)
                if cancel_wanted:  # told to stop: it must not run again
                    self._finish_row(db, seq, "cancelled", now, reason=reason or "cancelled")
                    self._free_unique(db, claim.id, ukey, ufor, "finish")
                    deltas[(job, queue, "cancelled")] += 1
                    tally.outcome(job, claim.envelope.tags, "cancelled")
                else:
                    db.execute(REQUEUE_RELEASED, (now, seq))
                    deltas[(job, queue, "queued")] += 1
            self._count(db, deltas)
            self._stats.write(db, tally)
        return released

    def progress(
        self, claim: Claim, fraction: float, message: str | None, now: float | None = None
    ) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                f"UPDATE jobs SET progress = ?, progress_message = ? WHERE {OWNED}",
                (min(max(fraction, 0.0), 1.0), message, claim.id, claim.attempt_id),
            )
            return cursor.rowcount == 1

    # -- control ----------------------------------------------------------------------------------
    def cancel(self, job_id: str, reason: str = "cancelled", now: float | None = None) -> bool:
        now = _now(now)
        with self._tx() as db:
            row = db.execute(
                "SELECT seq, state, job, queue, unique_key, unique_for FROM jobs WHERE id = ?",
                (job_id,),
            ).fetchone()
            if row is None:
                return False
            seq, state, job, queue, ukey, ufor = row
            if state == "running":
                db.execute(REQUEST_CANCEL, (reason, seq))
                return True
            if state not in ("scheduled", "queued", "retrying"):
                return False
            self._finish_row(db, seq, "cancelled", now, reason=reason)
            self._free_unique(db, job_id, ukey, ufor, "finish")
            self._count(db, Counter({(job, queue, state): -1, (job, queue, "cancelled"): 1}))
            tally = sqlite_stats.Tally(now)
            tally.outcome(job, self._stored_tags(db, seq), "cancelled")
            self._stats.write(db, tally)
            return True

    def retry(self, job_id: str, now: float | None = None) -> bool:
        now = _now(now)
        with self._tx() as db:
            row = db.execute(
                "SELECT seq, job, queue, state FROM jobs WHERE id = ? "
                "AND state IN ('dead', 'rejected', 'cancelled')",
                (job_id,),
            ).fetchone()
            if row is None:
                return False
            seq, job, queue, old = row
            db.execute(
                "UPDATE jobs SET state = 'queued', attempts = 0, queued_at = ?, finished_at = NULL,"
                " reason = NULL, cancel_requested = 0, due_at = NULL WHERE seq = ?",
                (now, seq),
            )
            self._count(db, Counter({(job, queue, old): -1, (job, queue, "queued"): 1}))
            return True

    def delete(self, job_ids: Sequence[str]) -> int:
        if not job_ids:
            return 0
        marks = ",".join("?" * len(job_ids))
        with self._tx() as db:
            rows = db.execute(
                f"DELETE FROM jobs WHERE id IN ({marks}) AND state IN "
                "('succeeded', 'dead', 'cancelled', 'rejected') RETURNING seq, envelope",
                list(job_ids),
            ).fetchall()
            self._untag(db, rows)
        return len(rows)

    @staticmethod
    def _untag(db: sqlite3.Connection, rows: Iterable[tuple[int, bytes]]) -> None:
        """Forget the tag index entries of deleted jobs, by primary key (tag, seq)."""
        db.executemany(
            "DELETE FROM tags WHERE tag = ? AND seq = ?",
            [(tag, seq) for seq, raw in rows for tag in sqlite_stats.tags_of(raw)],
        )

    def pause(self, queue: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO paused (queue) VALUES (?)", (queue,))

    def resume(self, queue: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM paused WHERE queue = ?", (queue,))

    def paused(self) -> set[str]:
        with self._read() as db:
            return {row[0] for row in db.execute("SELECT queue FROM paused")}

    # -- time -------------------------------------------------------------------------------------
    def promote_due(self, now: float | None = None, limit: int = 1000) -> int:
        """Also ends jobs whose `expires` passed while they waited (paused queue, late eta) as
        cancelled "expired", and forgets lapsed unique keys, so neither lingers."""
        now = _now(now)
        with self._read() as db:  # cheap checks first: most ticks find nothing to do
            due = db.execute(
                "SELECT 1 FROM jobs WHERE state IN ('scheduled', 'retrying') AND due_at <= ? "
                "LIMIT 1",
                (now,),
            ).fetchone()
            expired = db.execute(
                "SELECT 1 FROM jobs WHERE expires IS NOT NULL AND expires <= ? "
                "AND state IN ('scheduled', 'queued', 'retrying') LIMIT 1",
                (now,),
            ).fetchone()
            lapsed = db.execute(
                "SELECT 1 FROM uniques WHERE until IS NOT NULL AND until < ? LIMIT 1", (now,)
            ).fetchone()
        if expired is not None or lapsed is not None:
            self._expire_waiting(now, limit)
        if due is None:
            return 0
        deltas: Counter[tuple[str, str, str]] = Counter()
        with self._tx() as db:
            rows = db.execute(
                "SELECT seq, job, queue, state FROM jobs WHERE state IN ('scheduled', 'retrying') "
                "AND due_at <= ? ORDER BY due_at LIMIT ?",
                (now, limit),
            ).fetchall()
            # queued_at = due_at: wait time counts from when the job became due
            db.executemany(
                "UPDATE jobs SET state = 'queued', queued_at = due_at, due_at = NULL WHERE seq = ?",
                [(row[0],) for row in rows],
            )
            for _, job, queue, old in rows:
                deltas[(job, queue, old)] -= 1
                deltas[(job, queue, "queued")] += 1
            self._count(db, deltas)
        return len(rows)

    def _expire_waiting(self, now: float, limit: int) -> None:
        deltas: Counter[tuple[str, str, str]] = Counter()
        tally = sqlite_stats.Tally(now)
        with self._tx() as db:
            rows = db.execute(
                "SELECT seq, id, job, queue, state, unique_key, unique_for FROM jobs "
                "WHERE expires IS NOT NULL AND expires <= ? "
                "AND state IN ('scheduled', 'queued', 'retrying') LIMIT ?",
                (now, limit),
            ).fetchall()
            for seq, job_id, job, queue, state, ukey, ufor in rows:
                self._finish_row(db, seq, "cancelled", now, reason="expired")
                self._free_unique(db, job_id, ukey, ufor, "finish")
                deltas[(job, queue, state)] -= 1
                deltas[(job, queue, "cancelled")] += 1
                tally.outcome(job, self._stored_tags(db, seq), "cancelled")
            self._count(db, deltas)
            self._stats.write(db, tally)
            db.execute("DELETE FROM uniques WHERE until IS NOT NULL AND until < ?", (now,))

    def sweep_expired(self, now: float | None = None, limit: int = 1000) -> list[str]:
        now = _now(now)
        with self._read() as db:
            if (
                db.execute(
                    "SELECT 1 FROM jobs WHERE state = 'running' AND lease_until < ? LIMIT 1", (now,)
                ).fetchone()
                is None
            ):
                return []
        recovered: list[str] = []
        deltas: Counter[tuple[str, str, str]] = Counter()
        tally = sqlite_stats.Tally(now)
        with self._tx() as db:
            rows = db.execute(SELECT_LEASE_EXPIRED, (now, limit)).fetchall()
            for row in rows:
                seq, job_id, job, queue, attempts, max_retries, ukey, ufor, cancel_wanted = row[:9]
                why, tags = row[9], sqlite_stats.tags_of(row[10])  # the tags it was claimed with
                deltas[(job, queue, "running")] -= 1
                tally.leave(tags)
                self._event(db, job, "recovery")
                if cancel_wanted:  # told to stop before its worker was lost: never run it again
                    self._finish_row(db, seq, "cancelled", now, reason=why or "cancelled")
                    self._free_unique(db, job_id, ukey, ufor, "finish")
                    deltas[(job, queue, "cancelled")] += 1
                    tally.outcome(job, tags, "cancelled")
                elif attempts > max_retries:
                    lost = {
                        "type": "LeaseExpired",
                        "message": f"the worker running attempt {attempts} stopped heart-"
                        "beating (killed or lost) and no retries were left",
                        "traceback": "",
                    }
                    error = _failure_encoder.encode(lost)
                    tally.outcome(job, tags, "dead")
                    tally.failure(job, job_id, lost["type"], lost["message"], True)
                    db.execute(
                        "UPDATE jobs SET state = 'dead', finished_at = ?, lease_until = NULL, "
                        "error = ? WHERE seq = ?",
                        (now, error, seq),
                    )
                    self._free_unique(db, job_id, ukey, ufor, "finish")
                    deltas[(job, queue, "dead")] += 1
                else:
                    db.execute(
                        "UPDATE jobs SET state = 'queued', lease_until = NULL, worker_id = NULL,"
                        " attempt_id = NULL, queued_at = ? WHERE seq = ?",
                        (now, seq),
                    )
                    deltas[(job, queue, "queued")] += 1
                recovered.append(job_id)
            self._count(db, deltas)
            self._stats.write(db, tally)
        return recovered

    def fire_once(self, schedule: str, tick: float) -> bool:
        with self._tx() as db:
            cursor = db.execute(
                "INSERT INTO schedules (name, tick) VALUES (?, ?) ON CONFLICT (name) "
                "DO UPDATE SET tick = excluded.tick WHERE excluded.tick > schedules.tick",
                (schedule, tick),
            )
            return cursor.rowcount == 1

    def last_fired(self, schedule: str) -> float | None:
        with self._read() as db:
            row = db.execute("SELECT tick FROM schedules WHERE name = ?", (schedule,)).fetchone()
        return None if row is None else float(row[0])

    def prune(self, finished_before: float, states: Sequence[State], limit: int = 1000) -> int:
        wanted = [str(State(s)) for s in states if State(s) in FINAL_STATES]
        if not wanted:
            return 0
        marks = ",".join("?" * len(wanted))
        with self._tx() as db:
            rows = db.execute(
                f"DELETE FROM jobs WHERE seq IN (SELECT seq FROM jobs WHERE state IN ({marks}) "
                "AND finished_at < ? LIMIT ?) RETURNING seq, envelope",
                (*wanted, finished_before, limit),
            ).fetchall()
            self._untag(db, rows)
        return len(rows)

    # -- reading ----------------------------------------------------------------------------------
    def get(self, job_id: str) -> JobRecord | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT {RECORD_COLUMNS} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return None if row is None else _record(row)

    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]:
        if not job_ids:
            return []
        marks = ",".join("?" * len(job_ids))
        with self._read() as db:
            rows = db.execute(
                f"SELECT {RECORD_COLUMNS} FROM jobs WHERE id IN ({marks})", list(job_ids)
            ).fetchall()
        found = {row[0]: _record(row) for row in rows}
        return [found.get(job_id) for job_id in job_ids]

    def jobs(self, query: JobQuery) -> list[JobRecord]:
        limit = max(0, min(query.limit, 1000))
        state = None if query.state is None else str(State(query.state))
        if query.tag is None and query.job is not None and state is None:
            # by name alone: one seek per state, newest first, merged
            parts, args = [], []
            for one in State:
                sql, part_args = _listing(str(one), query.job, query.before, limit)
                parts.append(f"SELECT * FROM ({sql})")
                args += part_args
            sql = f"{' UNION ALL '.join(parts)} ORDER BY seq DESC LIMIT ?"
            args.append(limit)
        elif query.tag is None and state is not None:
            sql, args = _listing(state, query.job, query.before, limit)
        else:
            sql, args = _tag_or_all_listing(query, state, limit)
        with self._read() as db:
            rows = db.execute(sql, args).fetchall()
        return [_record(row) for row in rows]

    def wait_finished(self, job_id: str, timeout_s: float) -> JobRecord | None:
        deadline = time.monotonic() + timeout_s
        interval = 0.002
        while True:
            record = self.get(job_id)
            if record is None or record.state in FINAL_STATES:
                return record
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return record
            with self._local_change:
                self._local_change.wait(min(interval, remaining))
            interval = min(interval * 1.5, 0.05)

    def stats(self, tags: bool = False) -> Stats:
        stats = StatsBuilder()
        with self._read() as db:
            counts = db.execute("SELECT job, queue, state, n FROM counts WHERE n != 0").fetchall()
            hist = db.execute("SELECT job, kind, bucket, n FROM hist").fetchall()
            timing = db.execute("SELECT job, kind, count, total, max FROM timing").fetchall()
            events = db.execute("SELECT job, kind, n FROM events").fetchall()
            if tags:
                self._stats.read_tags(db, stats)
        for job, queue, state, n in counts:
            stats.count(job, queue, state, n)
        for job, kind, bucket, n in hist:
            stats.bucket(job, kind, bucket, n)
        for job, kind, count, total, maximum in timing:
            stats.timing(job, kind, count, total, maximum)
        for job, kind, n in events:
            stats.event(job, kind, n)
        return stats.build()

    def timeline(self, since: float, now: float | None = None) -> list[TimelinePoint]:
        with self._read() as db:
            return self._stats.timeline(db, since, _now(now))

    def failure_groups(self, limit: int = 100) -> list[FailureGroup]:
        with self._read() as db:
            return self._stats.failure_groups(db, limit)

    # -- workers ----------------------------------------------------------------------------------
    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        body = msgspec.json.encode(msgspec.to_builtins(info))
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO workers (id, info, expires_at) VALUES (?, ?, ?)",
                (info.id, body, info.seen_at + ttl_s),
            )
            db.execute("DELETE FROM workers WHERE expires_at < ?", (info.seen_at - 3600,))

    def unregister_worker(self, worker_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM workers WHERE id = ?", (worker_id,))

    def workers(self, now: float | None = None) -> list[WorkerInfo]:
        now = _now(now)
        with self._read() as db:
            rows = db.execute(
                "SELECT info FROM workers WHERE expires_at > ? ORDER BY id", (now,)
            ).fetchall()
        result = []
        for (body,) in rows:
            data = _worker_decoder.decode(body)
            data["queues"] = tuple(data["queues"])
            data["current"] = tuple(data.get("current", ()))
            result.append(WorkerInfo(**data))
        return result

    # -- housekeeping -----------------------------------------------------------------------------
    def purge(self) -> None:
        with self._tx() as db:
            for table in (
                "jobs",
                "tags",
                "uniques",
                "counts",
                "hist",
                "timing",
                "events",
                "paused",
                "schedules",
                "workers",
                *sqlite_stats.STATS_TABLES,
            ):
                db.execute(f"DELETE FROM {table}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __repr__(self) -> str:
        return f"SQLiteBroker({self.url!r})"


def _record(row: Sequence[Any]) -> JobRecord:
    (
        job_id,
        state,
        raw,
        attempts,
        created_at,
        queued_at,
        started_at,
        finished_at,
        progress,
        progress_message,
        result,
        error,
        reason,
        worker_id,
        cancel_requested,
        job,
        queue,
        _seq,
    ) = row
    try:
        env = decode(raw)
    except BadEnvelope:
        env = Envelope(id=job_id, job=job, source="?", queue=queue)
    failure = None
    if error is not None:
        data = _failure_decoder.decode(error)
        failure = Failure(data.get("type", "?"), data.get("message", ""), data.get("traceback", ""))
    return JobRecord(
        id=job_id,
        state=State(state),
        envelope=env.with_attempt(attempts),
        attempts=attempts,
        created_at=created_at,
        queued_at=queued_at,
        started_at=started_at,
        finished_at=finished_at,
        progress=progress,
        progress_message=progress_message,
        result=None if result is None else msgspec.json.decode(result),
        error=failure,
        reason=reason,
        worker_id=worker_id,
        cancel_requested=bool(cancel_requested),
    )


SELECTED = ", ".join("jobs." + c.strip() for c in RECORD_COLUMNS.split(","))
BEFORE = "{} < (SELECT seq FROM jobs WHERE id = ?)"  # the page before a job id, by seq


def _listing(state: str, job: str | None, before: str | None, limit: int) -> tuple[str, list[Any]]:
    """One state's page, newest first, by the index that holds that state: running jobs are
    few (each holds a worker slot) and are sorted; any other state is walked in seq order."""
    # the state is a State value written into the SQL: a partial index is used only when the
    # query's own text implies the index's WHERE
    where, args = [f"jobs.state = '{State(state)}'"], []
    if state == "running":
        index = "jobs_lease"
    else:
        where.append("jobs.state != 'running'")
        index = "jobs_by_state" if job is None else "jobs_by_name"
    if job is not None:
        where.append("jobs.job = ?")
        args.append(job)
    if before is not None:
        where.append(BEFORE.format("jobs.seq"))
        args.append(before)
    sql = (
        f"SELECT {SELECTED} FROM jobs INDEXED BY {index} WHERE {' AND '.join(where)} "
        "ORDER BY jobs.seq DESC LIMIT ?"
    )
    return sql, [*args, limit]


def _tag_or_all_listing(query: JobQuery, state: str | None, limit: int) -> tuple[str, list[Any]]:
    """A tag's page walks the tags index (tag, seq) newest first and looks each job row up by
    primary key, so a popular tag costs one page, never a sort of all its jobs; no filter at
    all walks the primary key."""
    where: list[str] = []
    args: list[Any] = []
    source, order = "jobs", "jobs.seq"
    if query.tag is not None:
        source, order = "tags CROSS JOIN jobs ON jobs.seq = tags.seq", "tags.seq"
        where.append("tags.tag = ?")
        args.append(query.tag)
    if state is not None:
        where.append("jobs.state = ?")
        args.append(state)
    if query.job is not None:
        where.append("jobs.job = ?")
        args.append(query.job)
    if query.before is not None:
        where.append(BEFORE.format(order))
        args.append(query.before)
    sql = f"SELECT {SELECTED} FROM {source}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return f"{sql} ORDER BY {order} DESC LIMIT ?", [*args, limit]
