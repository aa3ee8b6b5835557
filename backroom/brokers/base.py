"""The Broker contract: where envelopes wait and outcomes are kept, plus the records it returns.
A broker stores; it never imports app code, runs jobs or decides policy (backoff, checks)."""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from backroom.envelope import JSON, Envelope, State

# -- records ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """A job reserved by one worker. `envelope.attempt` is this run's number (1 = first run).
    `attempt_id` is new on every claim: ack/nack/extend with a stale one return False.
    `broken` is set (why) when the stored bytes are not an envelope: `envelope` then holds only
    the id (and the job name where the broker knows it), and the worker rejects the job, so its
    on_reject hooks hear of it like of any other rejection."""

    envelope: Envelope
    lease_until: float
    attempt_id: str
    broken: str | None = None

    @property
    def id(self) -> str:
        return self.envelope.id


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one attempt failed: exception type name, message and formatted traceback."""

    type: str
    message: str
    traceback: str = ""


@dataclass(frozen=True, slots=True)
class JobRecord:
    """Everything the broker knows about one job."""

    id: str
    state: State
    envelope: Envelope
    attempts: int = 0
    created_at: float = 0.0
    queued_at: float | None = None  # when it last became runnable (eta reached, or enqueued)
    started_at: float | None = None  # start of the latest attempt
    finished_at: float | None = None
    progress: float | None = None
    progress_message: str | None = None
    result: JSON = None
    error: Failure | None = None  # the latest attempt's failure, if any
    reason: str | None = None  # why it was rejected or cancelled ("expired", "cancelled by api")
    worker_id: str | None = None
    cancel_requested: bool = False

    @property
    def job(self) -> str:
        return self.envelope.job


@dataclass(frozen=True, slots=True)
class JobQuery:
    """A page of jobs, newest first. `before` is an id: only jobs created before it (the cursor
    for the next page). Every combination is served by an index, never a scan of all jobs."""

    state: State | None = None
    job: str | None = None
    tag: str | None = None
    limit: int = 50
    before: str | None = None


@dataclass(frozen=True, slots=True)
class Histogram:
    """A fixed-bucket latency histogram (see BUCKET_BOUNDS): bounded memory however many samples."""

    buckets: Mapping[int, int] = field(default_factory=dict)  # bucket index -> count
    count: int = 0
    total: float = 0.0
    max: float = 0.0

    def quantile(self, q: float) -> float | None:
        """The q-quantile in seconds (upper bound of its bucket, capped at max); None if empty."""
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(BUCKET_BOUNDS[min(index, len(BUCKET_BOUNDS) - 1)], self.max)
        return self.max


@dataclass(frozen=True, slots=True)
class JobStats:
    """Per job name: counts by state, run and wait time, retries, lease recoveries, rejections.
    Counts of final states are totals since the last purge; the others are current. `by_queue`
    splits the counts by the queue the jobs were on."""

    job: str
    counts: Mapping[str, int] = field(default_factory=dict)
    run_time: Histogram = field(default_factory=Histogram)
    wait_time: Histogram = field(default_factory=Histogram)
    retries: int = 0
    recoveries: int = 0
    rejections: Mapping[str, int] = field(default_factory=dict)  # reason -> count
    by_queue: Mapping[str, Mapping[str, int]] = field(default_factory=dict)  # queue -> counts


@dataclass(frozen=True, slots=True)
class TagStats:
    """Per tag: what happened to the jobs carrying it since the last purge. `counts` are final
    outcomes as they were recorded (succeeded, dead, rejected, cancelled: events, so a job
    retried by hand and then succeeding counts once dead and once succeeded), `retries` failed
    attempts that were retried, `jobs` finished jobs per job name, `run_time` every attempt that
    ran to an outcome (as JobStats.run_time), `wait_time` the time each claimed attempt waited
    queued (as JobStats.wait_time, sampled at claim), `running` the jobs running now (current,
    not a total: +1 at claim, -1 whenever a running job leaves running)."""

    tag: str
    counts: Mapping[str, int] = field(default_factory=dict)
    retries: int = 0
    jobs: Mapping[str, int] = field(default_factory=dict)
    run_time: Histogram = field(default_factory=Histogram)
    wait_time: Histogram = field(default_factory=Histogram)
    running: int = 0


@dataclass(frozen=True, slots=True)
class Stats:
    """`tags` and `other_tags` are only read when asked for: stats(tags=True)."""

    jobs: Mapping[str, JobStats] = field(default_factory=dict)
    queues: Mapping[str, int] = field(default_factory=dict)  # queue -> queued depth
    tags: Mapping[str, TagStats] = field(default_factory=dict)  # at most MAX_TAGS of them
    other_tags: TagStats | None = None  # tags past MAX_TAGS, summed together (tag "")


@dataclass(frozen=True, slots=True)
class TimelinePoint:
    """One job name in one minute (`at`: the minute's start, Unix seconds): outcomes recorded in
    that minute, and the run time of the attempts that ended in it."""

    job: str
    at: float
    succeeded: int = 0
    dead: int = 0
    retries: int = 0  # failed attempts that were retried
    rejected: int = 0
    run_time: Histogram = field(default_factory=Histogram)

    @property
    def finished(self) -> int:
        return self.succeeded + self.dead

    @property
    def failures(self) -> int:
        """Failed attempts: the ones that ended their job dead, and the ones retried."""
        return self.dead + self.retries


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Failed attempts of one job name with one exception type since the last purge, and the
    latest of them (its traceback is on that job's record, while the record is kept). Groups
    past MAX_FAILURE_GROUPS are summed in one group with job and type ""."""

    job: str
    type: str
    failures: int  # failed attempts
    dead: int  # ... of which were the job's last (it ended dead)
    latest_id: str
    latest_message: str  # at most FAILURE_MESSAGE_CHARS characters
    latest_at: float


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """What a live worker reports with each heartbeat."""

    id: str
    host: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    started_at: float
    seen_at: float
    current: tuple[str, ...] = ()  # ids of the jobs it runs now


class StatsBuilder:
    """Collects a backend's stored counters into a Stats record, so every broker assembles
    them the same way: feed it the rows it keeps, then call build()."""

    def __init__(self) -> None:
        self._jobs: dict[str, dict[str, Any]] = {}
        self._queues: dict[str, int] = {}
        self._tags: dict[str, dict[str, int]] = {}

    def _entry(self, job: str) -> dict[str, Any]:
        return self._jobs.setdefault(job, {
            "counts": {}, "run": {}, "wait": {}, "timing": {}, "retries": 0, "recoveries": 0,
            "rejections": {},
        })  # fmt: skip

    def count(self, job: str, queue: str, state: str, n: int) -> None:
        """n jobs of `job` in `state` on `queue` (queued ones add to the queue's depth)."""
        entry = self._entry(job)
        entry["counts"][state] = entry["counts"].get(state, 0) + n
        by_queue = entry.setdefault("by_queue", {}).setdefault(queue, {})
        by_queue[state] = by_queue.get(state, 0) + n
        if state == "queued":
            self._queues[queue] = self._queues.get(queue, 0) + n

    def bucket(self, job: str, kind: str, index: int, n: int) -> None:
        """Histogram bucket `index` of `kind` ("run" or "wait") holds n samples."""
        self._entry(job)[kind][index] = n

    def timing(self, job: str, kind: str, count: int, total: float, maximum: float) -> None:
        self._entry(job)["timing"][kind] = (count, total, maximum)

    def event(self, job: str, kind: str, n: int) -> None:
        """ "retry", "recovery" or "reject:<reason category>" happened n times."""
        entry = self._entry(job)
        if kind == "retry":
            entry["retries"] = n
        elif kind == "recovery":
            entry["recoveries"] = n
        elif kind.startswith("reject:"):
            entry["rejections"][kind.removeprefix("reject:")] = n

    def tag(self, tag: str, kind: str, n: int) -> None:
        """One stored per-tag counter (see TALLY_KINDS); tag "" holds the tags past the cap."""
        self._tags.setdefault(tag, {})[kind] = n

    def build(self) -> Stats:
        def histogram(entry: dict[str, Any], kind: str) -> Histogram:
            count, total, maximum = entry["timing"].get(kind, (0, 0.0, 0.0))
            return Histogram(buckets=entry[kind], count=count, total=total, max=maximum)

        return Stats(
            jobs={
                job: JobStats(
                    job=job,
                    counts={k: v for k, v in e["counts"].items() if v},
                    run_time=histogram(e, "run"),
                    wait_time=histogram(e, "wait"),
                    retries=e["retries"],
                    recoveries=e["recoveries"],
                    rejections=e["rejections"],
                    by_queue={
                        queue: {state: n for state, n in states.items() if n}
                        for queue, states in sorted(e.get("by_queue", {}).items())
                        if any(states.values())
                    },
                )
                for job, e in sorted(self._jobs.items())
            },
            queues={q: n for q, n in self._queues.items() if n},
            tags={tag: tag_stats(tag, kinds) for tag, kinds in sorted(self._tags.items()) if tag},
            other_tags=tag_stats("", self._tags[""]) if "" in self._tags else None,
        )


# -- per tag and per minute: counters stored as (kind -> n) ---------------------------------------
# Both backends keep per-tag and per-minute numbers as integer counters named by kind: the
# outcomes ("succeeded", "dead", "rejected", "cancelled", "retry"), the run-time histogram
# ("r:<bucket>" -> samples, whose sum is the count; "rt" total and "rm" max in whole
# microseconds, so Redis' HINCRBY serves them), and per tag "j:<job name>" -> finished jobs of
# that name, the wait-time histogram sampled at claim ("w:<bucket>", "wt", "wm", as the run
# time's) and "running" (+1 at claim, -1 when a running job leaves running: a current count).

OUTCOME_KINDS = ("succeeded", "dead", "rejected", "cancelled")
TIMELINE_KINDS = ("succeeded", "dead", "rejected")  # the outcomes the timeline counts (+ retry)
MAX_KIND = "rm"  # the run time's maximum: kept as a maximum instead of a sum
MAX_KINDS = (MAX_KIND, "wm")  # every kind that keeps a maximum (per tag, the wait time's too)
RUNNING_KIND = "running"


def micros(seconds: float) -> int:
    return int(max(seconds, 0.0) * 1e6 + 0.5)


def histogram_of(kinds: Mapping[str, int], prefix: str = "r") -> Histogram:
    """The histogram kept in counters "<prefix>:<bucket>", "<prefix>t" and "<prefix>m" ("r": run
    time, "w": wait time)."""
    head = prefix + ":"
    buckets = {
        int(kind[len(head) :]): n for kind, n in kinds.items() if kind.startswith(head) and n
    }
    return Histogram(
        buckets=buckets,
        count=sum(buckets.values()),
        total=kinds.get(prefix + "t", 0) / 1e6,
        max=kinds.get(prefix + "m", 0) / 1e6,
    )


def tag_stats(tag: str, kinds: Mapping[str, int]) -> TagStats:
    return TagStats(
        tag=tag,
        counts={kind: kinds[kind] for kind in OUTCOME_KINDS if kinds.get(kind)},
        retries=kinds.get("retry", 0),
        jobs={kind[2:]: n for kind, n in sorted(kinds.items()) if kind.startswith("j:") and n},
        run_time=histogram_of(kinds),
        wait_time=histogram_of(kinds, "w"),
        running=kinds.get(RUNNING_KIND, 0),
    )


def timeline_points(rows: Iterable[tuple[int, str, str, int]]) -> list[TimelinePoint]:
    """(minute number, job, kind, n) counters as points, oldest minute first, then by job."""
    grouped: dict[tuple[int, str], dict[str, int]] = {}
    for minute, job, kind, n in rows:
        kinds = grouped.setdefault((minute, job), {})
        kinds[kind] = kinds.get(kind, 0) + n
    return [
        TimelinePoint(
            job=job,
            at=float(minute * TIMELINE_STEP_S),
            succeeded=kinds.get("succeeded", 0),
            dead=kinds.get("dead", 0),
            retries=kinds.get("retry", 0),
            rejected=kinds.get("rejected", 0),
            run_time=histogram_of(kinds),
        )
        for (minute, job), kinds in sorted(grouped.items())
    ]


def minute_of(at: float) -> int:
    return math.floor(at / TIMELINE_STEP_S)


def timeline_minutes(since: float, now: float) -> range:
    """The minute numbers timeline(since, now) covers: from since's minute, but no further back
    than TIMELINE_KEEP_S, to now's minute."""
    last = minute_of(now)
    return range(max(minute_of(since), last - TIMELINE_KEEP_MINUTES), last + 1)


# -- bounds on what the broker keeps -----------------------------------------------------------

MAX_TAGS = 500  # distinct tags with numbers of their own; later ones are summed in other_tags
TIMELINE_STEP_S = 60  # the timeline's bucket: one minute
TIMELINE_KEEP_S = 2 * 3600  # minutes older than this are dropped
TIMELINE_KEEP_MINUTES = TIMELINE_KEEP_S // TIMELINE_STEP_S
MAX_FAILURE_GROUPS = 1000  # (job, exception type) groups; later ones are summed in one
FAILURE_MESSAGE_CHARS = 1000  # of the latest message kept per failure group

# -- histogram buckets: 50 microseconds to about a day, each bound 1.25x the one before -------

BUCKET_BOUNDS: tuple[float, ...] = tuple(5e-5 * 1.25**i for i in range(96))


def bucket_of(seconds: float) -> int:
    return bisect.bisect_left(BUCKET_BOUNDS, max(seconds, 0.0))


def merge_sample(hist: dict[int, int], seconds: float) -> None:
    index = bucket_of(seconds)
    hist[index] = hist.get(index, 0) + 1


def reason_category(reason: str) -> str:
    """Rejections are counted by category: a reason reads "category: detail" ("unknown job:
    no job named 'x'"), and stats keep the part before the colon, so counters stay bounded."""
    return reason.split(":", 1)[0].strip()[:80]


def finite(value: float) -> float:
    return value if math.isfinite(value) else 0.0


Outcome = tuple[Claim, JSON] | tuple[Claim, JSON, float | None]


def started_of(outcome: Outcome) -> float | None:
    """An ack outcome's start time, if the worker gave one."""
    return outcome[2] if len(outcome) > 2 else None


# -- the contract ----------------------------------------------------------------------------


class Broker(ABC):
    """Where envelopes wait and outcomes are kept. Each method is one atomic step (a SQLite
    transaction, a Lua script, a lock hold): a crash never leaves half a change. `now` is a
    parameter wherever time matters, so tests move time instead of sleeping; None means now."""

    url: str

    # -- producing ------------------------------------------------------------------------------
    @abstractmethod
    def enqueue(self, envelopes: Sequence[Envelope], now: float | None = None) -> list[str]:
        """Store envelopes, all or none. An envelope with `eta` in the future is `scheduled`,
        else `queued`. An envelope whose `unique_key` is held by a live job is not stored: its
        place in the returned list holds that job's id. Returns ids in order."""

    # -- consuming ------------------------------------------------------------------------------
    @abstractmethod
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
        """Reserve up to `limit` queued jobs: queues in the order given, within a queue higher
        priority first, then oldest first; paused queues are skipped. Each becomes `running`
        with a lease until now + lease_s and attempts + 1. A queued job whose `expires` has
        passed is not returned: it ends `cancelled` with reason "expired".

        `offer`: when fewer than `limit` were there, the worker offers to take the rest as it
        comes, until its next claim; a broker that can hands such jobs, claimed for it, to its
        `wait_for_work` (Redis does; others ignore it). Their lease may be shorter than
        `lease_s`: the worker renews it (`extend`) once it has them."""

    @abstractmethod
    def wait_for_work(
        self, queues: Sequence[str], timeout_s: float, worker_id: str | None = None
    ) -> list[Claim]:
        """Block until a job may be claimable from `queues`, or timeout. May return early;
        never busy-spins. Callers claim afterwards. Returns the jobs handed to `worker_id`
        under its offer (already claimed for it: see `claim`), if any."""

    def withdraw(self, worker_id: str) -> list[Claim]:
        """A stopping worker takes back its offer; returns the jobs handed to it that it has
        not received, for it to release."""
        return []

    @abstractmethod
    def extend(self, claims: Sequence[Claim], lease_s: float, now: float | None = None) -> set[str]:
        """Renew leases (the heartbeat). Returns the ids still leased to these claims."""

    @abstractmethod
    def cancel_requested(self, job_ids: Sequence[str]) -> set[str]:
        """Of these running jobs, the ids someone asked to cancel."""

    @abstractmethod
    def ack(self, outcomes: Sequence[Outcome], now: float | None = None) -> list[bool]:
        """Record successes (claim, result[, started_at]) in one step: `succeeded`, result
        kept. `started_at` (wall clock) is when the job really started, when that was after its
        claim (a worker that claims ahead); its run time counts from there. For each: False
        when the lease was lost (nothing written)."""

    @abstractmethod
    def nack(
        self, claim: Claim, failure: Failure, retry_at: float | None, now: float | None = None
    ) -> bool:
        """Record a failed attempt: `retrying` until retry_at, or `dead` when retry_at is None.
        False when the lease was lost (nothing written)."""

    @abstractmethod
    def reject(self, claim: Claim, reason: str, now: float | None = None) -> bool:
        """A check failed in the worker: `rejected` with the reason; never retried."""

    @abstractmethod
    def finish_cancelled(self, claim: Claim, reason: str, now: float | None = None) -> bool:
        """A running job stopped because it was cancelled: `cancelled` with the reason."""

    @abstractmethod
    def release(self, claims: Sequence[Claim], now: float | None = None) -> int:
        """Hand running jobs back (graceful shutdown): `queued` again at once, the attempt not
        counted. Returns how many were still ours."""

    @abstractmethod
    def progress(
        self, claim: Claim, fraction: float, message: str | None, now: float | None = None
    ) -> bool:
        """Record a running job's progress (0..1) and message. False when the lease was lost."""

    # -- control --------------------------------------------------------------------------------
    @abstractmethod
    def cancel(self, job_id: str, reason: str = "cancelled", now: float | None = None) -> bool:
        """Scheduled/queued/retrying -> `cancelled` at once (it never runs); running -> marked
        so its worker stops it. True if it will not run or was told to stop; False if it had
        already finished or does not exist."""

    @abstractmethod
    def retry(self, job_id: str, now: float | None = None) -> bool:
        """A dead, rejected or cancelled job -> `queued` again with its attempts reset."""

    @abstractmethod
    def delete(self, job_ids: Sequence[str]) -> int:
        """Forget finished jobs (final states only). Returns how many were deleted."""

    @abstractmethod
    def pause(self, queue: str) -> None:
        """Stop reservation from `queue` on every worker; enqueue keeps working."""

    @abstractmethod
    def resume(self, queue: str) -> None: ...

    @abstractmethod
    def paused(self) -> set[str]: ...

    # -- time -----------------------------------------------------------------------------------
    @abstractmethod
    def promote_due(self, now: float | None = None, limit: int = 1000) -> int:
        """Scheduled/retrying jobs whose eta <= now -> `queued`. Returns how many moved."""

    @abstractmethod
    def sweep_expired(self, now: float | None = None, limit: int = 1000) -> list[str]:
        """Running jobs whose lease ran out -> `queued` again (counted as a recovery), or `dead`
        when that attempt was their last. Returns the ids recovered."""

    @abstractmethod
    def fire_once(self, schedule: str, tick: float) -> bool:
        """True for exactly one caller per (schedule, tick), however many race."""

    @abstractmethod
    def last_fired(self, schedule: str) -> float | None:
        """The latest tick fire_once granted for this schedule."""

    @abstractmethod
    def prune(self, finished_before: float, states: Sequence[State], limit: int = 1000) -> int:
        """Forget jobs in these final states that finished before the given time."""

    # -- reading --------------------------------------------------------------------------------
    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def get_many(self, job_ids: Sequence[str]) -> list[JobRecord | None]: ...

    @abstractmethod
    def jobs(self, query: JobQuery) -> list[JobRecord]:
        """Newest first, served by an index."""

    @abstractmethod
    def wait_finished(self, job_id: str, timeout_s: float) -> JobRecord | None:
        """Block until the job is in a final state (returns its record) or timeout (returns its
        current record). None if there is no such job."""

    @abstractmethod
    def stats(self, tags: bool = False) -> Stats:
        """Counters per job name (and per queue), queue depths; with `tags`, per-tag numbers
        too. Read from stored counters, never from the jobs: the cost is bounded by the number
        of job names, queues and tags (at most MAX_TAGS)."""

    @abstractmethod
    def timeline(self, since: float, now: float | None = None) -> list[TimelinePoint]:
        """Per job name and minute from since's minute to now's, oldest first: at most the last
        TIMELINE_KEEP_S (older minutes are dropped as new ones are written). Minutes with
        nothing recorded are left out."""

    @abstractmethod
    def failure_groups(self, limit: int = 100) -> list[FailureGroup]:
        """Failed attempts grouped by (job name, exception type), the most failures first."""

    # -- workers --------------------------------------------------------------------------------
    @abstractmethod
    def register_worker(self, info: WorkerInfo, ttl_s: float) -> None:
        """Heartbeat: the worker is live until seen_at + ttl_s."""

    @abstractmethod
    def unregister_worker(self, worker_id: str) -> None: ...

    @abstractmethod
    def workers(self, now: float | None = None) -> list[WorkerInfo]:
        """Workers whose heartbeat has not expired."""

    # -- housekeeping ---------------------------------------------------------------------------
    @abstractmethod
    def purge(self) -> None:
        """Drop everything: jobs, counters, schedules, pauses (tests, resets)."""

    @abstractmethod
    def close(self) -> None: ...
