"""The worker: claim -> check -> run -> record. Claims in batches (a little ahead of its free
slots), runs sync jobs in threads and async jobs on its event loop, acknowledges successes in
batches, renews leases by heartbeat, stops overdue and cancelled jobs, and hands jobs back on
shutdown.

A sync job costs no asyncio task or future: a job thread that finishes one takes the next
claimed sync job itself (its slot passes on), and hands its outcome to the event loop through a
deque with at most one wake-up per batch."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from queue import SimpleQueue
from typing import Any, NamedTuple, TypeVar

from backroom.app import App, Context
from backroom.brokers.base import Claim, WorkerInfo
from backroom.envelope import JSON, Envelope, encode_json
from backroom.errors import BackroomError, BadEnvelope, JobTimeout, WorkerCrashed
from backroom.jobs import JobSpec
from backroom.recording import Recorder, Rejected, log_fields
from backroom.supervisor import (
    BEAT_S,
    EXIT_RECYCLE,
    STOP_NOW_SIGNAL,
    ChildChannel,
    orphans_from_environment,
)

logger = logging.getLogger("backroom.worker")
T = TypeVar("T")

EXIT_OK = 0
HOUSEKEEPING_S = 0.5
WATCHDOG_S = 0.05  # how often sync jobs' timeouts are checked
PREFETCH_WINDOW_S = 0.05  # claim ahead about this much work (by the recent mean run time)
PREFETCH_MAX = 256
PREFETCH_MAX_WAIT_S = 1.0  # a job claimed ahead that waited this long goes back to the queue
WAIT_S = 1.0  # the waiter thread's longest wait for work before it looks again
GATHER_S = 0.002  # while jobs claimed ahead keep the threads busy, outcomes gather this long
GATHER_MAX = 64  # ... or until this many wait: one wake-up and one ack per batch
WORKER_TTL_S = 15.0
BROKER_RETRY_MAX_S = 5.0

__all__ = ["EXIT_OK", "EXIT_RECYCLE", "JobTimeout", "Worker", "WorkerCrashed"]


class _JobThreads:
    """Daemon threads for calls that may block for long (the waiter's wait for work). Unlike
    ThreadPoolExecutor's they never hold up the process's exit; a thread is added whenever none
    is idle. (Sync jobs run on the worker's own job threads, see Worker._job_thread, and the
    first job an idle worker gets on the waiter's, see Worker._run_own.)"""

    def __init__(self) -> None:
        self._work: SimpleQueue[tuple[Future[Any], Callable[..., Any], Any]] = SimpleQueue()
        self._idle = threading.Semaphore(0)
        self._count = 0

    def submit(
        self, function: Callable[..., T], *args: Any, then: Callable[[T], Any] | None = None
    ) -> Future[T]:
        """Run function(*args) on a thread; `then` gets its result on that same thread once the
        future holds it."""
        future: Future[T] = Future()
        self._work.put((future, function, (args, then)))
        if not self._idle.acquire(blocking=False):
            self._count += 1
            threading.Thread(target=self._serve, name=f"backroom-job-{self._count}",
                             daemon=True).start()  # fmt: skip
        return future

    def _serve(self) -> None:
        while True:
            future, function, (args, then) = self._work.get()
            if future.set_running_or_notify_cancel():
                try:
                    result = function(*args)
                except BaseException as exc:  # the job's failure, whatever it raised
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                    if then is not None:
                        then(result)
            del future, function, args, then
            self._idle.release()


@dataclass(eq=False)
class _Running:
    """A job this worker holds: claimed and checked, waiting for a slot, then running."""

    claim: Claim
    spec: JobSpec
    arguments: dict[str, Any]
    context: Context
    timeout: float | None = None
    task: asyncio.Task[None] | None = None  # async jobs: the worker's task that runs it
    job: asyncio.Future[Any] | None = None  # async jobs: the job's own task
    started: float | None = None  # monotonic, once it started
    started_at: float | None = None  # wall clock, once it started (the run time counts from it)
    deadline: float | None = None  # monotonic: when a sync job's timeout runs out
    cancel_deadline: float | None = None  # monotonic: when a cancelled job is stopped hard
    finished: bool = False  # its function returned or raised
    abandoned: bool = False  # written off: its thread runs on, holding no slot
    thread: int | None = None  # sync jobs: the ident of the thread that runs it
    on_waiter: bool = False  # sync jobs: it runs on the waiter's thread, not a job thread
    claimed: float = field(default_factory=time.monotonic)
    outcome_recorded: bool = False
    acked: bool = False  # its success waits in the ack batch


_OK, _FAILED = True, False


class _Waited(NamedTuple):
    """What one wait of the waiter thread yields, for the loop, then for the thread itself."""

    rejected: list[tuple[Claim, Rejected]]  # for the loop to record
    handed: Sequence[Claim] = ()  # handed over to a busy worker: for the loop to take in
    own: _Running | None = None  # the sync job the thread then runs itself
    received: Sequence[Claim] = ()  # handed to an idle worker: their short lease is renewed then


class Worker:
    """One worker process's engine (what `backroom worker --in-process` runs).

    `concurrency` jobs run at once; `lease` seconds is how long a claim stays ours without a
    heartbeat; `burst` returns once nothing is queued, retrying or running; `scheduler` also
    fires the app's cron schedules; `timeout` is the default for jobs that set none. `grace` is
    how long running jobs get on stop before they are handed back; `cancel_grace` how long a
    cancelled job gets to stop before it is stopped hard. `child` is set in a supervisor's child:
    a job stuck past its timeout or cancel grace makes it exit with EXIT_RECYCLE (a thread
    cannot be killed; a process can), as do `max_jobs` and `max_memory_mb`."""

    def __init__(
        self,
        app: App,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 8,
        lease: float = 60.0,
        burst: bool = False,
        scheduler: bool = False,
        grace: float = 30.0,
        cancel_grace: float = 10.0,
        timeout: float | None = None,
        max_jobs: int | None = None,
        max_memory_mb: float | None = None,
        child: bool = False,
        worker_id: str | None = None,
        prefetch: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise BackroomError(f"concurrency must be at least 1, got {concurrency}")
        if prefetch is not None and prefetch < 0:
            raise BackroomError(f"prefetch must be 0 or more jobs, got {prefetch}")
        if lease <= 0:
            raise BackroomError(f"lease must be a positive number of seconds, got {lease}")
        if timeout is not None and timeout <= 0:
            raise BackroomError(f"timeout must be a positive number of seconds, got {timeout}")
        self.app = app
        self.broker = app.broker
        self.queues = list(queues or app.registry.queues() or ["default"])
        self.concurrency = concurrency
        self.lease = lease
        self.burst = burst
        self.scheduler = scheduler
        self.grace = grace
        self.cancel_grace = cancel_grace
        self.timeout = timeout
        self.max_jobs = max_jobs
        self.max_memory_mb = max_memory_mb
        self.child = child
        self.prefetch = prefetch  # jobs claimed beyond the free slots; None: adapts to run time
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"
        self.started_at = time.time()
        self.jobs_done = 0
        self.exit_code = EXIT_OK
        self._running: dict[str, _Running] = {}  # every job held: waiting for a slot or running
        self._acks: list[tuple[Claim, JSON, float | None]] = []
        self._lock = threading.Lock()  # guards _pending, _free and the thread counts
        self._pending: deque[_Running] = deque()  # claimed ahead, waiting for a slot
        self._free = concurrency  # slots
        self._outcomes: deque[tuple[_Running, bool, Any]] = deque()  # from job threads
        self._outcomes_told = False  # the loop was woken for the outcomes queued now
        self._jobs: SimpleQueue[_Running] = SimpleQueue()  # sync jobs for the job threads
        self._thread_count = 0
        self._thread_limit = concurrency  # grows by one for each thread written off
        self._mean_run = 0.0  # recent mean run time (s), which sizes the prefetch
        self._prefetch_paused = False  # after a hand-back, until the next job finishes
        self._watcher: asyncio.Future[_Waited] | None = None  # the waiter thread's wait
        self._waiter_claiming = False  # the waiter thread claimed: its result is not taken yet
        # the waiter waits without having looked (the worker was busy): work queued all along
        # wakes no one, so a worker that turns idle meanwhile claims from its loop
        self._waiter_blind = False
        self._loop_claiming = False  # the loop claims: the waiter does not
        self._tasks: set[asyncio.Task[Any]] = set()  # outcome recording off the fast path
        self._done: list[str] = []  # finished job ids not yet told to the supervisor
        self._stopping = False
        self._stop_now = False
        self._recycle = False
        self._abandoned = 0  # jobs written off in a thread or task that would not stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._recorder = Recorder(app, self.broker)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="backroom-broker")
        self._waiter = _JobThreads()  # daemon: a pending wait never holds up the exit
        self._channel = ChildChannel.from_environment() if child else None
        self._orphans = orphans_from_environment() if child else []

    # -- control ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped (SIGTERM/SIGINT, or idle in burst mode). Returns the exit code."""
        loop = asyncio.new_event_loop()
        try:
            code = loop.run_until_complete(self._main())
        finally:
            _close(loop)
            self._io.shutdown(wait=False)
        if self.child and self._abandoned:
            # a stuck job's thread may hold locks the interpreter's exit would wait on
            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        return code

    def stop(self, immediately: bool = False) -> None:
        """Stop claiming; running jobs get `grace` seconds, then are handed back to the queue. A
        second call (or `immediately`) hands them back at once. Safe from any thread."""
        self._begin_stop(immediately or self._stopping)

    def _begin_stop(self, immediately: bool = False) -> None:
        self._stopping = True
        self._stop_now = self._stop_now or immediately
        self._wake()

    def _wake(self) -> None:
        if self._loop is not None and self._changed is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._changed.set)

    # -- the loop --------------------------------------------------------------------------------
    async def _main(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._install_signals()
        if self._orphans:
            await self._call(self._recorder.settle_orphans, self._orphans)
        await self._call(self.broker.register_worker, self._info(), WORKER_TTL_S)
        if self._channel is not None:
            self._channel.send("hello", self.id)
        background = [
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
            asyncio.create_task(self._watch(), name="watch"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
        ]
        logger.info("worker %s serving queues %s, concurrency %d", self.id,
                    ",".join(self.queues), self.concurrency)  # fmt: skip
        try:
            await self._serve()
        finally:
            await self._shutdown()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._flush()
            with contextlib.suppress(Exception):
                await self._call(self.broker.unregister_worker, self.id)
        return EXIT_RECYCLE if self._recycle else self.exit_code

    async def _serve(self) -> None:
        assert self._loop is not None and self._changed is not None
        failing = 0.0  # seconds to back off after a broker error
        while not self._stopping:
            if 0 < len(self._outcomes) < GATHER_MAX and len(self._pending) > self._prefetch() // 2:
                await asyncio.sleep(GATHER_S)  # the threads are busy: let a batch gather
            self._changed.clear()  # before the work: a wake-up during it is not lost
            if self._watcher is not None and self._watcher.done():
                # first: what the waiter claimed counts before the loop claims. A wait that
                # ended may also have consumed a wake-up that came after the last claim (Redis
                # publishes only when a queue turns non-empty): the loop claims below
                self._take_waiter_claims(self._watcher)
                self._watcher = None
            try:
                self._take_outcomes()
                await self._flush()
                want = self._wanted()
                claims: list[Claim] = []
                # an idle worker leaves claiming to its waiter thread, which claims as soon as
                # work comes (no hop through the loop and the broker thread first), unless that
                # thread waits without having looked
                with self._lock:
                    self._loop_claiming = (
                        want > 0
                        and not self._waiter_claiming
                        and (bool(self._running) or not self._watcher or self._waiter_blind)
                    )
                if self._loop_claiming:
                    try:
                        claims = await self._call(self._claim, want)
                        if claims:
                            self._report_claims(claims)
                            for claim, rejected in self._admit(claims):
                                self._spawn(self._reject(claim, rejected))
                    finally:
                        self._loop_claiming = False
                self._dispatch()
                failing = 0.0
                if claims and len(claims) == want:
                    await asyncio.sleep(0)  # let the new jobs start before claiming again
                    continue
                if self._recycle and len(self._running) == len(self._pending):
                    break  # nothing runs; the jobs claimed ahead go back at shutdown
                if (
                    not self._running
                    and self.burst
                    and not claims
                    and await self._call(self._nothing_left)
                ):
                    break
            except Exception as exc:  # the broker is down or refuses: keep serving, back off
                failing = min(BROKER_RETRY_MAX_S, failing * 2 or 0.25)
                logger.error("broker call failed (%s: %s); retrying in %.2f s",
                             type(exc).__name__, exc, failing)  # fmt: skip
                await _first(self._changed.wait(), timeout=failing)
                continue
            watcher = self._watcher
            if watcher is None:
                self._watcher = watcher = asyncio.wrap_future(
                    self._waiter.submit(self._wait_and_claim, then=self._run_own)
                )
            if self._acks or self._done or self._outcomes:
                continue
            await _first(self._changed.wait(), watcher, timeout=1.0)

    def _claim(self, limit: int) -> list[Claim]:
        """Claim up to `limit`; finding fewer, offer to take the rest as it comes (a broker
        that can then hands jobs enqueued later, claimed already, to this worker's wait)."""
        return self.broker.claim(self.queues, self.id, self.lease, limit, offer=True)

    def _wait_and_claim(self) -> _Waited:
        """On the waiter thread: wait for work and, if the worker is idle then, claim, check
        and start the sync jobs on the job threads at once (no hop through the loop and the
        broker thread; a busy worker's loop claims). An idle worker claims before it waits
        too: a wake-up the last wait consumed may have come after the last claim. Returns the
        rejected jobs, which the loop records, jobs handed over for the loop to start, and the
        first sync job, which this thread runs itself (no hop to a job thread) once the loop
        has the rest."""
        started = self._claim_if_idle()
        if started is None:
            if self._waiter_blind and not self._running:
                self._wake()  # the loop may have looked before this wait began: look again
            try:
                handed = self.broker.wait_for_work(self.queues, WAIT_S, self.id)
            finally:
                self._waiter_blind = False
            if handed:
                return self._take_handed(handed)
            started = self._claim_if_idle()
        rejected, own = started or ([], None)
        return _Waited(rejected, own=own)

    def _take_handed(self, claims: list[Claim]) -> _Waited:
        """On the waiter thread: jobs the broker claimed for this worker's offer. An idle worker
        starts them at once; a busy one leaves them to the loop; a stopping one hands them
        back (its loop may be past taking them)."""
        with self._lock:
            stopping = self._stopping
            self._waiter_claiming = not stopping  # the loop, or the stop, takes them from here
            idle = not (self._running or stopping or self._loop_claiming)
        if stopping:
            with contextlib.suppress(Exception):
                self.broker.release(claims)
            return _Waited([])
        if not idle:
            # their lease is short until renewed (a worker that dies with an offer out strands
            # nothing for long): renewed here, as the loop may be held up (an async job that
            # blocks it), and nothing waits on this thread
            self._receive(claims)
            return _Waited([], handed=claims)
        rejected, own = self._start_from_waiter(claims)
        return _Waited(rejected, own=own, received=claims)

    def _claim_if_idle(self) -> tuple[list[tuple[Claim, Rejected]], _Running | None] | None:
        """None when it claimed nothing; `_waiter_blind` says whether it asked the broker."""
        with self._lock:
            self._waiter_blind = True
            if self._running or self._stopping or self._loop_claiming:
                return None
            room = self._room()
            self._waiter_claiming = room > 0
        if room <= 0:
            return None
        self._waiter_blind = False
        claims = self._claim(room)
        if not claims:
            self._waiter_claiming = False  # nothing for the loop (nor a stop) to wait for
            return None
        return self._start_from_waiter(claims)

    def _start_from_waiter(
        self, claims: list[Claim]
    ) -> tuple[list[tuple[Claim, Rejected]], _Running | None]:
        """On the waiter thread of an idle worker: take in what it got and start the sync jobs
        but the first on the job threads (async ones start on the loop). Returns the rejected,
        for the loop, and the first sync job, for this thread to run."""
        self._report_claims(claims)
        rejected = self._admit(claims)
        return rejected, self._dispatch(threads_only=True)

    def _run_own(self, waited: _Waited) -> None:
        """On the waiter thread, once the loop has what the wait yielded: run the job it kept,
        then those waiting for its slot, as a job thread would (the loop has started another
        wait meanwhile; this thread then serves the waits again)."""
        if waited.own is not None:
            self._run_chain(waited.own)

    def _receive(self, claims: Sequence[Claim]) -> None:
        with contextlib.suppress(Exception):  # unrenewed, they come back to the queue uncounted
            self.broker.extend(claims, self.lease)

    def _take_waiter_claims(self, watcher: asyncio.Future[_Waited]) -> None:
        """After a wait: record what it rejected, take in the jobs handed over that it left to
        the loop, start what waits (a failed wait only means "look again")."""
        self._waiter_claiming = False
        if watcher.cancelled() or watcher.exception() is not None:
            return
        rejected, handed, _own, received = watcher.result()
        if received:
            # handed to an idle worker (so nothing holds the loop up): the broker thread renews
            # their short lease now (the heartbeat from there on), not the waiter thread, which
            # starts the first of them meanwhile
            self._io.submit(self._receive, received)
        if handed:
            self._report_claims(handed)
            rejected = [*rejected, *self._admit(handed)]
        for claim, why in rejected:
            self._spawn(self._reject(claim, why))
        self._dispatch()

    def _wanted(self) -> int:
        """How many jobs to claim now: up to the free slots plus the prefetch, once the jobs
        claimed ahead are running low (a claim per few jobs, not one per job)."""
        room = self._room()
        if room <= 0 or len(self._pending) > self._prefetch() // 2:
            return 0
        return room

    def _room(self) -> int:
        """Free slots plus the prefetch, less what is held (within --max-jobs-per-child)."""
        if self._recycle:
            return 0
        room = self.concurrency + self._prefetch() - len(self._running)
        if self.max_jobs is not None:
            room = min(room, self.max_jobs - self.jobs_done - len(self._running))
        return room

    def _prefetch(self) -> int:
        if self._prefetch_paused:
            return 0
        if self.prefetch is not None:
            return self.prefetch
        if not self._mean_run:
            return 0  # until jobs here are known to be short: long ones would sit waiting
        return int(min(PREFETCH_MAX, self.concurrency * PREFETCH_WINDOW_S / self._mean_run))

    def _report_claims(self, claims: Sequence[Claim]) -> None:
        """Tell the supervisor what this child now holds, before any of it runs (a job's
        timeout deadline follows when it starts)."""
        if self._channel is not None:
            self._channel.send("claim", [[claim.id, claim.attempt_id, None] for claim in claims])

    def _admit(self, claims: Sequence[Claim]) -> list[tuple[Claim, Rejected]]:
        """Check claimed envelopes: the good ones wait for a slot; returns the others, for the
        loop to reject. Runs on the loop, or on the waiter thread while the worker is idle."""
        rejected: list[tuple[Claim, Rejected]] = []
        for claim in claims:
            envelope = claim.envelope
            if claim.broken is not None:  # the stored bytes are not an envelope
                problem = claim.broken.removeprefix("malformed envelope: ")
                rejected.append((claim, Rejected(claim.broken, BadEnvelope(problem))))
                continue
            try:
                spec, arguments = self._recorder.check(envelope)
            except Rejected as failed:
                rejected.append((claim, failed))
                continue
            entry = _Running(claim, spec, arguments, Context(self.app, claim, spec),
                             self._timeout_of(envelope))  # fmt: skip
            self._running[claim.id] = entry
            self._pending.append(entry)
        return rejected

    async def _reject(self, claim: Claim, rejected: Rejected) -> None:
        envelope = claim.envelope
        # a secret sent in the wrong type would otherwise be quoted in the reason
        reason = self.app.redactor.scrub(rejected.reason, envelope.payload) or ""
        await self._persist(self.broker.reject, claim, reason)
        logger.warning("rejected job %s (%s): %s", claim.id, envelope.job, reason,
                       extra=log_fields(envelope))  # fmt: skip
        hooks = [*self.app.reject_hooks, *self.app.failure_hooks]
        self._recorder.notify(hooks, envelope, rejected.error)
        self._count_done()
        self._done.append(claim.id)

    def _dispatch(self, threads_only: bool = False) -> _Running | None:
        """Start waiting jobs while slots are free: sync ones on the job threads, async ones as
        tasks on the loop. `threads_only` (from the waiter thread): sync ones alone, and the
        first is returned for the caller to run instead."""
        if self._stopping or self._recycle:
            return None  # the jobs claimed ahead go back at shutdown
        started: list[_Running] = []
        own = None
        with self._lock:
            if threads_only:
                started = [e for e in self._pending if not e.spec.is_async][: max(0, self._free)]
                for entry in started:
                    self._pending.remove(entry)
                self._free -= len(started)
                if started:
                    own = started.pop(0)
                    own.on_waiter = True
            while not threads_only and self._free > 0 and self._pending:
                started.append(self._pending.popleft())
                self._free -= 1
            spawn = min(len(started), self._thread_limit - self._thread_count)
            self._thread_count += max(0, spawn)
        for _ in range(spawn):
            threading.Thread(target=self._job_thread, name="backroom-job", daemon=True).start()
        for entry in started:
            if entry.spec.is_async:
                entry.task = asyncio.create_task(self._execute_async(entry), name=entry.claim.id)
            else:
                self._jobs.put(entry)
        return own

    # -- sync jobs: on the job threads -----------------------------------------------------------
    def _job_thread(self) -> None:
        while self._run_chain(self._jobs.get()):
            pass

    def _run_chain(self, entry: _Running | None) -> bool:
        """Run a sync job, then the sync jobs waiting for its slot (the slot passes on, no
        hop; they run on the same kind of thread, `on_waiter`). False once this thread must
        end: a job it ran was written off meanwhile (a job thread's place went to a new one;
        the waiter's thread never held one)."""
        while entry is not None:
            kind, value = self._run_sync(entry)
            if self.max_memory_mb is not None:  # after each job, as a leak shows up there
                self._check_memory()
            with self._lock:
                if entry.abandoned:  # written off while it ran: its slot went on without it
                    if not entry.on_waiter:
                        self._thread_count -= 1
                        self._thread_limit -= 1
                    return False
                after = None
                if (
                    self._pending
                    and not (self._stopping or self._recycle)
                    and not self._pending[0].spec.is_async
                ):
                    after = self._pending.popleft()  # the slot passes on, no hop
                    after.on_waiter = entry.on_waiter
                else:
                    self._free += 1
            self._outcomes.append((entry, kind, value))
            if not self._outcomes_told:
                self._outcomes_told = True
                self._wake()
            entry = after
        return True

    def _began(self, entry: _Running) -> None:
        entry.started = time.monotonic()
        entry.started_at = time.time()
        if entry.timeout:
            entry.deadline = entry.started + entry.timeout
        if self._channel is not None:  # before the job runs: if it crashes us, it is the culprit
            due = entry.started_at + entry.timeout if entry.timeout else None
            self._channel.send("start", [[entry.claim.id, due]])

    def _run_sync(self, entry: _Running) -> tuple[bool, Any]:
        entry.thread = threading.get_ident()
        self._began(entry)
        context = entry.context
        try:
            if entry.spec.takes_context:
                result = entry.spec.function(context, **entry.arguments)
            else:
                result = entry.spec.function(**entry.arguments)
            encode_json(result)
        except BaseException as exc:  # the job's own failure, whatever it raised
            entry.finished = True
            return _FAILED, exc
        entry.finished = True
        return _OK, result

    # -- async jobs: on the loop -----------------------------------------------------------------
    async def _execute_async(self, entry: _Running) -> None:
        self._began(entry)
        try:
            try:
                result = await self._invoke_async(entry)
                encode_json(result)
            except BaseException as exc:  # the job's own failure, whatever it raised
                ours = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and ours and ours.cancelling():
                    raise  # handed back at shutdown, or stopped hard: the outcome is recorded
                self._settle(entry, _FAILED, exc)
            else:
                self._settle(entry, _OK, result)
        finally:
            entry.finished = True
            if self.max_memory_mb is not None:
                self._check_memory()
            with self._lock:
                self._free += 1
            self._forget(entry)
            self._dispatch()

    async def _invoke_async(self, entry: _Running) -> Any:
        call_args = (entry.context,) if entry.spec.takes_context else ()
        job = asyncio.ensure_future(entry.spec.function(*call_args, **entry.arguments))
        job.add_done_callback(_consume)
        entry.job = job
        timeout = entry.timeout
        try:
            await asyncio.wait((job,), timeout=timeout)
        except asyncio.CancelledError:
            job.cancel()  # the job stops with us
            raise
        if job.done():
            return job.result()
        assert timeout is not None
        job.cancel()  # it gets the cancel grace to clean up, as on cancel
        await asyncio.wait((job,), timeout=self.cancel_grace)
        if not job.done():
            self._abandon(entry, f"ran past its timeout of {timeout:g} s")
        raise JobTimeout(f"job exceeded its timeout of {timeout:g} s")

    # -- outcomes --------------------------------------------------------------------------------
    def _take_outcomes(self) -> None:
        """The sync jobs' outcomes the threads handed over since last time."""
        self._outcomes_told = False  # before reading: a later outcome wakes the loop again
        while self._outcomes:
            entry, kind, value = self._outcomes.popleft()
            self._settle(entry, kind, value)
            self._forget(entry)

    def _settle(self, entry: _Running, kind: bool, value: Any) -> None:
        """A job's function returned (kind _OK, its result) or raised (the exception): record
        it, successes in the next ack batch."""
        self._prefetch_paused = False
        if entry.started is not None:
            ran = time.monotonic() - entry.started
            self._mean_run = ran if not self._mean_run else 0.9 * self._mean_run + 0.1 * ran
        if entry.outcome_recorded:  # timed out, handed back or stopped hard meanwhile
            return
        claim = entry.claim
        if entry.context.cancelled:  # it saw ctx.cancelled and returned (or raised) early
            self._spawn(self._finish_cancelled(entry), claim.id)
        elif kind is _FAILED:
            entry.outcome_recorded = True
            self._spawn(self._persist(self._recorder.record_failure, claim, value), claim.id)
        elif claim.envelope.then:
            entry.outcome_recorded = True
            self._spawn(self._then_and_ack(entry, value))
        else:
            entry.acked = entry.outcome_recorded = True
            self._acks.append((claim, value, entry.started_at))

    async def _then_and_ack(self, entry: _Running, result: JSON) -> None:
        await self._persist(self._recorder.enqueue_then, entry.claim.envelope, result)
        entry.acked = True
        self._acks.append((entry.claim, result, entry.started_at))
        self._wake()

    def _forget(self, entry: _Running, ran: bool = True) -> None:
        """The worker holds the job no more (`ran`: it counts as one of the jobs done)."""
        if self._running.get(entry.claim.id) is entry:
            del self._running[entry.claim.id]
            if ran:
                self._count_done()
            if self._changed is not None:
                self._changed.set()

    def _count_done(self) -> None:
        self.jobs_done += 1
        if self.max_jobs is not None and self.jobs_done >= self.max_jobs:
            self._recycle = True  # --max-jobs-per-child reached: finish, then be replaced

    def _spawn(self, work: Coroutine[Any, Any, Any], done_id: str | None = None) -> None:
        """Run an outcome's recording as a task (off the fast path); `done_id` is told to the
        supervisor once it is recorded."""

        async def run() -> None:
            try:
                await work
            finally:
                if done_id is not None:
                    self._done.append(done_id)
                self._wake()

        task = asyncio.create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _write_off(self, entry: _Running, why: str) -> bool:
        """Give up on a sync job that will not stop (past its timeout, or its cancel grace): it
        leaves the held jobs, its slot goes to a new thread. False if it has just finished."""
        with self._lock:
            if entry.finished or entry.abandoned:
                return False
            entry.abandoned = True
            self._free += 1
            if not entry.on_waiter:
                self._thread_limit += 1  # a job thread's place goes to a new one
        entry.outcome_recorded = True
        self._abandon(entry, why)
        self._forget(entry)
        self._dispatch()
        return True

    def _timeout_of(self, envelope: Envelope) -> float | None:
        if envelope.timeout:
            return envelope.timeout
        if envelope.job in self.app.registry:
            spec_timeout = self.app.registry.get(envelope.job).timeout
            if spec_timeout:
                return spec_timeout
        return self.timeout

    async def _finish_cancelled(self, entry: _Running) -> None:
        if entry.outcome_recorded:
            return
        entry.outcome_recorded = True
        await self._record_cancelled(entry.claim)

    async def _record_cancelled(self, claim: Claim) -> None:
        record = await self._call(self.broker.get, claim.id)
        reason = (record.reason if record and record.reason else None) or "cancelled"
        await self._persist(self.broker.finish_cancelled, claim, reason)

    def _abandon(self, entry: _Running, why: str) -> None:
        """Write off a job that will not stop: its outcome is recorded, its thread or task runs
        on. A child then stops (running jobs get the grace period) for a fresh process."""
        self._abandoned += 1
        logger.error("job %s (%s) %s and could not be stopped; it is abandoned%s", entry.claim.id,
                     entry.claim.envelope.job, why,
                     " and this process will be replaced" if self.child else "",
                     extra=log_fields(entry.claim.envelope))  # fmt: skip
        if self.child:
            self._recycle = True
            self._begin_stop()

    async def _flush(self) -> None:
        """Record the buffered successes in one broker call; tell the supervisor what is done."""
        if self._acks:
            outcomes, self._acks = self._acks, []
            try:
                done = await self._call(self.broker.ack, outcomes)
            except BaseException:
                self._acks = outcomes + self._acks  # kept for the next flush
                raise
            for (claim, _, _), ok in zip(outcomes, done, strict=True):
                if not ok:
                    logger.warning("job %s (%s) finished after losing its lease; another worker "
                                   "owns it now, this result was not recorded",
                                   claim.id, claim.envelope.job,
                                   extra=log_fields(claim.envelope))  # fmt: skip
            if self._channel is not None:
                self._done.extend(claim.id for claim, _, _ in outcomes)
        if self._done:
            if self._channel is not None:
                self._channel.send("done", self._done)
            self._done = []

    # -- background duties -----------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Every second: notice cancel requests and stop cancelled jobs that overstay their
        grace; every lease/3: renew the leases of running jobs and the worker's registration."""
        renew_every = max(0.05, self.lease / 3)
        last_renew = last_register = time.monotonic()
        registered: set[str] = set()
        while True:
            await asyncio.sleep(min(1.0, renew_every))
            try:
                running = list(self._running.values())
                ids = [entry.claim.id for entry in running if not entry.outcome_recorded]
                if ids:
                    for job_id in await self._call(self.broker.cancel_requested, ids):
                        self._request_cancel(job_id)
                now = time.monotonic()
                for entry in running:
                    if (
                        entry.cancel_deadline is not None
                        and now > entry.cancel_deadline
                        and not entry.outcome_recorded
                        and not entry.finished  # it has not stopped yet
                    ):
                        entry.cancel_deadline = None
                        why = f"ignored its cancel for {self.cancel_grace:g} s"
                        if entry.task is None:  # a sync job: its thread is written off
                            if self._write_off(entry, why):
                                self._spawn(self._record_cancelled(entry.claim), entry.claim.id)
                        else:
                            self._abandon(entry, why)
                            await self._finish_cancelled(entry)
                            entry.task.cancel()
                if now - last_renew >= renew_every and running:
                    last_renew = now
                    claims = [e.claim for e in running if not e.outcome_recorded]
                    kept = await self._call(self.broker.extend, claims, self.lease)
                    for claim in claims:
                        if claim.id not in kept and claim.id in self._running:
                            logger.warning("job %s (%s) lost its lease", claim.id,
                                           claim.envelope.job,
                                           extra=log_fields(claim.envelope))  # fmt: skip
                # registration shows the current jobs: renewed when they change (at most once a
                # second), and every third of its time to live
                current = set(self._running)
                if now - last_register >= WORKER_TTL_S / 3 or (
                    current != registered and now - last_register >= 1.0
                ):
                    last_register, registered = now, current
                    await self._call(self.broker.register_worker, self._info(), WORKER_TTL_S)
            except Exception as exc:
                logger.error("heartbeat failed (%s: %s); retrying", type(exc).__name__, exc)

    def _request_cancel(self, job_id: str) -> None:
        entry = self._running.get(job_id)
        if entry is None or entry.context.cancelled:
            return
        entry.context._cancelled = True
        with self._lock:
            waiting = entry in self._pending
            if waiting:
                self._pending.remove(entry)
        if waiting:  # claimed ahead, not started: it never runs
            self._forget(entry)
            self._spawn(self._finish_cancelled(entry), job_id)
            return
        logger.info("job %s (%s) was asked to cancel", job_id, entry.claim.envelope.job,
                    extra=log_fields(entry.claim.envelope))  # fmt: skip
        if isinstance(entry.job, asyncio.Task):
            entry.job.cancel()  # an async job gets task cancellation; a sync one sees the flag
        entry.cancel_deadline = time.monotonic() + self.cancel_grace

    async def _watchdog(self) -> None:
        """Sync jobs past their timeout: recorded as failed (JobTimeout) and written off, since
        a thread cannot be stopped (a supervised child is then replaced). Jobs claimed ahead
        that waited too long for a slot (the jobs before them were slower than the recent ones)
        go back to the queue for other workers."""
        while True:
            await asyncio.sleep(WATCHDOG_S)
            now = time.monotonic()
            if self._pending and now - self._pending[0].claimed > PREFETCH_MAX_WAIT_S:
                await self._hand_back_waiting()
            for entry in list(self._running.values()):
                if entry.deadline is None or now <= entry.deadline or entry.task is not None:
                    continue
                assert entry.timeout is not None
                stack = _stack_of(entry.thread)  # where it is stuck, before it moves on
                if self._write_off(entry, f"ran past its timeout of {entry.timeout:g} s"):
                    error = JobTimeout(f"job exceeded its timeout of {entry.timeout:g} s")
                    trace = f"{stack}{type(error).__name__}: {error}\n"
                    record = self._recorder.record_failure
                    self._spawn(self._persist(record, entry.claim, error, trace), entry.claim.id)

    async def _housekeeping(self) -> None:
        """Move due jobs to their queues and recover expired leases; fire schedules."""
        ticker = None
        if self.scheduler:
            from backroom.scheduler import Scheduler

            ticker = Scheduler(self.app)
        while True:
            try:
                moved = await self._call(self.broker.promote_due)
                recovered = await self._call(self.broker.sweep_expired)
                if recovered:
                    logger.warning("recovered %d job(s) whose worker stopped renewing its lease",
                                   len(recovered))  # fmt: skip
                    await self._call(self._recorder.lost_leases, recovered)
                if ticker is not None:
                    moved += await self._call(ticker.tick)
                if (moved or recovered) and self._changed is not None:
                    self._changed.set()
            except Exception as exc:
                logger.error("housekeeping failed (%s: %s); retrying", type(exc).__name__, exc)
            await asyncio.sleep(HOUSEKEEPING_S)

    async def _watch(self) -> None:
        """Each second, from the event loop (so silence means it froze): tell the supervisor
        this child lives, stop if the supervisor is gone, recycle past the memory limit."""
        parent = os.getppid()
        while True:
            await asyncio.sleep(BEAT_S)
            if self._channel is not None:
                self._channel.send("beat")
            if self.child and os.getppid() != parent and not self._stopping:
                logger.error("worker %s: its supervisor is gone; stopping", self.id)
                self._begin_stop()
            if self.max_memory_mb is not None:
                self._check_memory()

    def _check_memory(self) -> None:
        assert self.max_memory_mb is not None
        if not self._recycle and _rss_mb() > self.max_memory_mb:
            logger.warning("worker %s uses more than %g MB; finishing its jobs and recycling",
                           self.id, self.max_memory_mb)  # fmt: skip
            self._recycle = True
            self._wake()

    # -- shutdown --------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        """Hand back the jobs claimed ahead at once; let running jobs finish within the grace
        period, then hand the rest back at once."""
        assert self._changed is not None
        # burst and recycle end the loop without a stop: mark it, so the waiter thread (which
        # may outlive this worker, blocked in a wait) never claims again
        with self._lock:
            self._stopping = True
            claiming = self._waiter_claiming
        # no more jobs handed over; those handed but not received yet go back (received ones
        # are the waiter's: it takes them to the loop, or hands them back itself)
        unreceived = await self._persist(self.broker.withdraw, self.id)
        if unreceived:
            await self._persist(self.broker.release, unreceived)
        if self._watcher is not None and claiming:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._watcher), timeout=self.lease)
            if self._watcher.done():
                self._take_waiter_claims(self._watcher)  # they wait: handed back just below
        await self._hand_back_waiting()
        if self._running and not self._stop_now:
            logger.info("stopping: waiting up to %g s for %d running job(s)", self.grace,
                        len(self._running))  # fmt: skip
            deadline = time.monotonic() + self.grace
            while self._running and not self._stop_now and time.monotonic() < deadline:
                self._changed.clear()
                self._take_outcomes()
                with contextlib.suppress(Exception):
                    await self._flush()
                if not self._running or self._outcomes:
                    continue
                await _first(self._changed.wait(), timeout=min(1.0, deadline - time.monotonic()))
        self._take_outcomes()
        with contextlib.suppress(Exception):
            await self._flush()
        leftover = [e for e in self._running.values() if not e.outcome_recorded]
        if leftover:
            for entry in leftover:
                entry.outcome_recorded = True
            handed = await self._persist(self.broker.release, [e.claim for e in leftover])
            logger.warning("handed %d unfinished job(s) back to the queue", handed or 0)
        for entry in leftover:
            if entry.task is not None:
                entry.task.cancel()
        # the rest are recording their outcomes
        await asyncio.gather(
            *(e.task for e in self._running.values() if e.task is not None),
            *self._tasks,
            return_exceptions=True,
        )
        with contextlib.suppress(Exception):
            await self._flush()

    async def _hand_back_waiting(self) -> None:
        """Release the jobs claimed ahead that have not started (their attempt not counted), and
        claim ahead no more until new outcomes show jobs are short again."""
        with self._lock:
            waiting = list(self._pending)
            self._pending.clear()
        if not waiting:
            return
        self._mean_run, self._prefetch_paused = 0.0, True
        for entry in waiting:
            entry.outcome_recorded = True
            self._forget(entry, ran=False)
        await self._persist(self.broker.release, [e.claim for e in waiting])
        if self._channel is not None:
            self._done.extend(e.claim.id for e in waiting)

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        assert self._loop is not None
        if self.child:
            # the supervisor relays a terminal's Ctrl-C; SIGTERM never escalates here, since it
            # may reach the whole process group as well as the supervisor
            handlers = {signal.SIGTERM: self._begin_stop, signal.SIGINT: _ignore,
                        STOP_NOW_SIGNAL: lambda: self._begin_stop(immediately=True)}  # fmt: skip
        else:
            handlers = {signal.SIGTERM: self.stop, signal.SIGINT: self.stop}
        for sig, handler in handlers.items():
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(sig, handler)

    # -- helpers ---------------------------------------------------------------------------------
    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        """A broker call on the broker thread, so the event loop never blocks on I/O."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._io, function, *args)

    async def _persist(self, function: Callable[..., T], *args: Any) -> T | None:
        """An outcome's broker call, retried through broker outages for up to one lease (after
        that the lease is gone and another worker runs the job again). None if it never went."""
        deadline = time.monotonic() + self.lease
        delay = 0.1
        while True:
            try:
                return await self._call(function, *args)
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    logger.error("giving up on %s after broker errors (%s: %s)",
                                 getattr(function, "__name__", function), type(exc).__name__,
                                 exc)  # fmt: skip
                    return None
                logger.warning("broker call failed (%s: %s); retrying in %.1f s",
                               type(exc).__name__, exc, delay)  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, BROKER_RETRY_MAX_S)

    def _nothing_left(self) -> bool:
        stats = self.broker.stats()
        if any(stats.queues.get(queue, 0) for queue in self.queues):
            return False
        # running elsewhere counts too: a dead worker's job comes back when its lease expires
        return not any(
            s.counts.get("retrying", 0) or s.counts.get("running", 0) for s in stats.jobs.values()
        )

    def _info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.id, host=socket.gethostname(), pid=os.getpid(), queues=tuple(self.queues),
            concurrency=self.concurrency, started_at=self.started_at, seen_at=time.time(),
            current=tuple(i for i, e in list(self._running.items()) if e.started is not None),
        )  # fmt: skip


async def _first(*awaitables: Any, timeout: float) -> None:
    """Wait until the first of these completes, or timeout; the rest keep going."""
    futures = [asyncio.ensure_future(a) for a in awaitables]
    _, pending = await asyncio.wait(futures, timeout=max(0.0, timeout),
                                    return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    for future in pending:
        if isinstance(future, asyncio.Task):  # our own waits; executor futures run on
            future.cancel()


def _close(loop: asyncio.AbstractEventLoop) -> None:
    """Close the loop without waiting on tasks of abandoned jobs that ignore cancellation
    (asyncio.run would wait for them forever)."""
    try:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=1.0))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()


def _consume(job: asyncio.Future[Any]) -> None:
    """Mark a job's exception as seen (a job that timed out may fail later, unobserved)."""
    if not job.cancelled():
        job.exception()


def _stack_of(thread: int | None) -> str:
    """The stack of a running thread, as a traceback reads (most recent call last)."""
    frame = sys._current_frames().get(thread) if thread is not None else None
    if frame is None:
        return ""
    lines = traceback.format_stack(frame)
    return "Traceback (where the job was when its time ran out):\n" + "".join(lines)


def _ignore() -> None:
    return None


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
