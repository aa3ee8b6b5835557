"""The worker: claim -> check -> run -> record. Claims in batches up to its free slots, runs sync
jobs in threads and async jobs on its event loop, acknowledges successes in batches, renews
leases by heartbeat, stops overdue and cancelled jobs, and hands jobs back on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from backroom.app import App, Context
from backroom.brokers.base import Claim, Failure, WorkerInfo
from backroom.envelope import JSON, Envelope, encode_json
from backroom.errors import BackroomError, InvalidPayload, SourceNotAllowed, UnknownJob
from backroom.jobs import JobSpec

logger = logging.getLogger("backroom.worker")
T = TypeVar("T")

EXIT_OK = 0
EXIT_RECYCLE = 3  # a child asks its supervisor for a fresh process (stuck thread, limits)
HOUSEKEEPING_S = 0.5
WORKER_TTL_S = 15.0


class JobTimeout(TimeoutError):
    """A job ran past its timeout."""


class _Rejected(Exception):
    def __init__(self, reason: str, error: BaseException) -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


@dataclass
class _Running:
    claim: Claim
    context: Context | None = None
    task: asyncio.Task[None] | None = None
    thread_future: Future[Any] | None = None
    cancel_deadline: float | None = None  # monotonic: when a cancelled sync job is abandoned
    outcome_recorded: bool = False
    started: float = field(default_factory=time.monotonic)


class Worker:
    """One worker process's engine (what `backroom worker --in-process` runs).

    `concurrency` jobs run at once; `lease` seconds is how long a claim stays ours without a
    heartbeat; `burst` returns once nothing is queued, retrying or running here; `scheduler`
    also fires the app's cron schedules."""

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
        max_jobs: int | None = None,
        max_memory_mb: float | None = None,
        child: bool = False,
        worker_id: str | None = None,
    ) -> None:
        if concurrency < 1:
            raise BackroomError(f"concurrency must be at least 1, got {concurrency}")
        if lease <= 0:
            raise BackroomError(f"lease must be a positive number of seconds, got {lease}")
        self.app = app
        self.broker = app.broker
        self.queues = list(queues or app.registry.queues() or ["default"])
        self.concurrency = concurrency
        self.lease = lease
        self.burst = burst
        self.scheduler = scheduler
        self.grace = grace
        self.cancel_grace = cancel_grace
        self.max_jobs = max_jobs
        self.max_memory_mb = max_memory_mb
        self.child = child
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(2).hex()}"
        self.started_at = time.time()
        self.jobs_done = 0
        self.exit_code = EXIT_OK
        self._running: dict[str, _Running] = {}
        self._acks: list[tuple[Claim, JSON]] = []
        self._stopping = False
        self._stop_now = False
        self._recycle = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._jobs_pool = ThreadPoolExecutor(concurrency, thread_name_prefix="backroom-job")
        self._io = ThreadPoolExecutor(1, thread_name_prefix="backroom-broker")
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="backroom-wait")

    # -- control ---------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped (SIGTERM/SIGINT, or idle in burst mode). Returns the exit code."""
        try:
            return asyncio.run(self._main())
        finally:
            self._jobs_pool.shutdown(wait=False, cancel_futures=True)
            self._io.shutdown(wait=False)
            self._waiter.shutdown(wait=False)

    def stop(self, immediately: bool = False) -> None:
        """Stop claiming; running jobs get `grace` seconds (none when `immediately`). Safe to
        call from any thread or a signal handler."""
        if self._stopping:
            immediately = True
        self._stopping = True
        self._stop_now = self._stop_now or immediately
        if self._loop is not None and self._changed is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._changed.set)

    # -- the loop --------------------------------------------------------------------------------
    async def _main(self) -> int:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._install_signals()
        await self._call(self.broker.register_worker, self._info(), WORKER_TTL_S)
        background = [
            asyncio.create_task(self._heartbeat(), name="heartbeat"),
            asyncio.create_task(self._housekeeping(), name="housekeeping"),
        ]
        watcher: asyncio.Future[None] | None = None
        logger.info("worker %s serving queues %s, concurrency %d", self.id,
                    ",".join(self.queues), self.concurrency)  # fmt: skip
        try:
            while not self._stopping:
                await self._flush()
                free = self.concurrency - len(self._running)
                claims: list[Claim] = []
                if free > 0 and not self._recycle:
                    claims = await self._call(
                        self.broker.claim, self.queues, self.id, self.lease, free
                    )
                    for claim in claims:
                        self._start(claim)
                if claims and len(claims) == free:
                    await asyncio.sleep(0)  # let the new jobs start before claiming again
                    continue
                if self._limits_reached():
                    break
                if not self._running:
                    if self._recycle:
                        break
                    if self.burst and not claims and await self._call(self._nothing_left):
                        break
                self._changed.clear()
                if watcher is None or watcher.done():
                    watcher = self._loop.run_in_executor(
                        self._waiter, self.broker.wait_for_work, self.queues, 1.0
                    )
                if self._acks:
                    continue
                await _first(self._changed.wait(), watcher, timeout=1.0)
        finally:
            await self._shutdown()
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self._flush()
            await self._call(self.broker.unregister_worker, self.id)
        return EXIT_RECYCLE if self._recycle else self.exit_code

    def _start(self, claim: Claim) -> None:
        entry = _Running(claim)
        self._running[claim.id] = entry
        entry.task = asyncio.create_task(self._execute(entry), name=f"job {claim.id}")

    async def _execute(self, entry: _Running) -> None:
        claim = entry.claim
        envelope = claim.envelope
        try:
            try:
                spec, arguments = self._check(envelope)
            except _Rejected as rejected:
                await self._call(self.broker.reject, claim, rejected.reason)
                logger.warning("rejected job %s (%s): %s", claim.id, envelope.job, rejected.reason)
                self._notify(self.app.reject_hooks, envelope, rejected.error)
                return
            context = Context(self.app, claim, spec)
            entry.context = context
            call_args = (context,) if spec.takes_context else ()
            try:
                result = await self._invoke(entry, spec, call_args, arguments)
                encode_json(result)
            except asyncio.CancelledError:
                if not context.cancelled:
                    raise  # shutdown: the job was handed back to the queue
                await self._finish_cancelled(entry)
                return
            except BaseException as exc:  # the job's own failure, whatever it raised
                if context.cancelled:
                    await self._finish_cancelled(entry)
                elif not entry.outcome_recorded:
                    await self._fail(entry, spec, exc)
                return
            if entry.outcome_recorded:
                return
            if context.cancelled:  # it saw ctx.cancelled and returned early
                await self._finish_cancelled(entry)
                return
            if envelope.then:
                await self._call(self._enqueue_then, envelope, result)
            self._acks.append((claim, result))
            self.jobs_done += 1
        finally:
            self._running.pop(claim.id, None)
            if self._changed is not None:
                self._changed.set()

    async def _invoke(
        self, entry: _Running, spec: JobSpec, call_args: tuple[Any, ...], arguments: dict[str, Any]
    ) -> Any:
        timeout = entry.claim.envelope.timeout or spec.timeout
        if spec.is_async:
            coroutine = spec.function(*call_args, **arguments)
            try:
                return await asyncio.wait_for(coroutine, timeout) if timeout else await coroutine
            except TimeoutError:
                raise JobTimeout(f"job exceeded its timeout of {timeout:g} s") from None
        assert self._loop is not None
        future = self._jobs_pool.submit(spec.function, *call_args, **arguments)
        entry.thread_future = future
        wrapped = asyncio.wrap_future(future, loop=self._loop)
        if not timeout:
            return await asyncio.shield(wrapped)
        try:
            return await asyncio.wait_for(asyncio.shield(wrapped), timeout)
        except TimeoutError:
            # A thread cannot be killed: the outcome is recorded now, and a child process asks
            # its supervisor for a fresh process once its other jobs are done.
            self._abandon(entry, "timeout")
            raise JobTimeout(f"job exceeded its timeout of {timeout:g} s") from None

    def _check(self, envelope: Envelope) -> tuple[JobSpec, dict[str, Any]]:
        """The worker-side checks of an envelope that got past (or around) a producer."""
        try:
            spec = self.app.registry.get(envelope.job)
        except UnknownJob as exc:
            reason = f"unknown job: {envelope.job!r} is not registered by this app"
            raise _Rejected(reason, exc) from None
        keys = self.app.keys
        if keys:
            source_keys = keys.get(envelope.source)
            if not envelope.signature:
                error = BackroomError(f"envelope from {envelope.source!r} is not signed")
                raise _Rejected(f"bad signature: {error}", error)
            if not source_keys or not envelope.signature_valid(source_keys):
                error = BackroomError(
                    f"signature does not match a key of source {envelope.source!r}"
                )
                raise _Rejected(f"bad signature: {error}", error)
        try:
            spec.check_source(envelope.source)
        except SourceNotAllowed as exc:
            allowed = ", ".join(exc.allowed)
            reason = f"source not allowed: {exc.source!r} may not schedule it (allowed: {allowed})"
            raise _Rejected(reason, exc) from None
        try:
            return spec, spec.arguments(envelope.payload)
        except InvalidPayload as exc:
            where = f"field {exc.field!r} " if exc.field else ""
            raise _Rejected(f"invalid payload: {where}{exc.problem}", exc) from None

    async def _fail(self, entry: _Running, spec: JobSpec, exc: BaseException) -> None:
        claim = entry.claim
        entry.outcome_recorded = True
        attempt = claim.envelope.attempt
        failure = Failure(
            type=type(exc).__name__,
            message=str(exc),
            traceback="".join(traceback.format_exception(exc)),
        )
        retry_at = None
        if attempt <= claim.envelope.max_retries:
            retry_at = time.time() + spec.backoff_s(attempt)
        ok = await self._call(self.broker.nack, claim, failure, retry_at)
        if not ok:
            logger.warning("job %s (%s) lost its lease; its failure was not recorded",
                           claim.id, claim.envelope.job)  # fmt: skip
            return
        if retry_at is None:
            logger.error("job %s (%s) is dead after %d attempts: %s: %s", claim.id,
                         claim.envelope.job, attempt, failure.type, failure.message)  # fmt: skip
        else:
            logger.warning("job %s (%s) failed attempt %d (%s: %s); retrying in %.1f s", claim.id,
                           claim.envelope.job, attempt, failure.type, failure.message,
                           retry_at - time.time())  # fmt: skip
        self._notify(self.app.failure_hooks, claim.envelope, exc)
        if retry_at is None:
            self._notify(self.app.dead_hooks, claim.envelope, exc)

    async def _finish_cancelled(self, entry: _Running) -> None:
        if entry.outcome_recorded:
            return
        entry.outcome_recorded = True
        record = await self._call(self.broker.get, entry.claim.id)
        reason = (record.reason if record and record.reason else None) or "cancelled"
        await self._call(self.broker.finish_cancelled, entry.claim, reason)

    def _abandon(self, entry: _Running, why: str) -> None:
        logger.error("job %s (%s) is stuck in a thread (%s); it is abandoned%s", entry.claim.id,
                     entry.claim.envelope.job, why,
                     " and this process will be replaced" if self.child else "")  # fmt: skip
        if self.child:
            self._recycle = True

    def _enqueue_then(self, envelope: Envelope, result: JSON) -> None:
        """The follow-up job, enqueued before the ack with a key tied to this job, so a crash in
        between re-runs the job but never doubles the follow-up."""
        assert envelope.then is not None
        follow = self.app.envelope(
            envelope.then, {"result": result}, source=f"job:{envelope.job}",
            unique_key=f"then:{envelope.id}", unique_for=7 * 86400.0, tags=envelope.tags,
        )  # fmt: skip
        self.broker.enqueue([follow])

    def _notify(self, hooks: Sequence[Callable[[Envelope, BaseException], None]],
                envelope: Envelope, error: BaseException) -> None:  # fmt: skip
        """Hooks observe: one that raises is logged and skipped, never changes an outcome."""
        redacted = envelope.__class__(**{
            **{f: getattr(envelope, f) for f in envelope.__struct_fields__},
            "payload": self.app.redact(envelope.payload),
        })  # fmt: skip
        for hook in hooks:
            try:
                hook(redacted, error)
            except Exception:
                logger.exception("error hook %r raised; ignored", hook)

    async def _flush(self) -> None:
        """Record the buffered successes in one broker call."""
        if not self._acks:
            return
        outcomes, self._acks = self._acks, []
        done = await self._call(self.broker.ack, outcomes)
        for (claim, _), ok in zip(outcomes, done, strict=True):
            if not ok:
                logger.warning("job %s (%s) finished after losing its lease; another worker "
                               "owns it now, this result was not recorded",
                               claim.id, claim.envelope.job)  # fmt: skip

    # -- background duties -----------------------------------------------------------------------
    async def _heartbeat(self) -> None:
        """Every second: notice cancel requests and stuck cancelled jobs; every lease/3: renew
        the leases of running jobs and the worker's own registration."""
        renew_every = max(0.05, self.lease / 3)
        last_renew = time.monotonic()
        last_register = time.monotonic()
        while True:
            await asyncio.sleep(min(1.0, renew_every))
            running = list(self._running.values())
            ids = [entry.claim.id for entry in running]
            if ids:
                for job_id in await self._call(self.broker.cancel_requested, ids):
                    self._request_cancel(job_id)
            now = time.monotonic()
            for entry in running:
                if entry.cancel_deadline is not None and now > entry.cancel_deadline:
                    entry.cancel_deadline = None
                    self._abandon(entry, "did not stop after being cancelled")
                    await self._finish_cancelled(entry)
                    if entry.task is not None:
                        entry.task.cancel()
            if now - last_renew >= renew_every and running:
                last_renew = now
                claims = [e.claim for e in running if not e.outcome_recorded]
                kept = await self._call(self.broker.extend, claims, self.lease)
                for claim in claims:
                    if claim.id not in kept and claim.id in self._running:
                        logger.warning("job %s (%s) lost its lease", claim.id, claim.envelope.job)
            if now - last_register >= WORKER_TTL_S / 3:
                last_register = now
                await self._call(self.broker.register_worker, self._info(), WORKER_TTL_S)

    def _request_cancel(self, job_id: str) -> None:
        entry = self._running.get(job_id)
        if entry is None or entry.context is None or entry.context.cancelled:
            return
        entry.context._cancelled.set()
        logger.info("job %s (%s) was asked to cancel", job_id, entry.claim.envelope.job)
        if entry.thread_future is None and entry.task is not None:
            entry.task.cancel()  # an async job gets task cancellation
        else:
            entry.cancel_deadline = time.monotonic() + self.cancel_grace

    async def _housekeeping(self) -> None:
        """Move due jobs to their queues and recover expired leases; fire schedules."""
        ticker = None
        if self.scheduler:
            from backroom.scheduler import Scheduler

            ticker = Scheduler(self.app)
        while True:
            moved = await self._call(self.broker.promote_due)
            recovered = await self._call(self.broker.sweep_expired)
            if recovered:
                logger.warning("recovered %d job(s) whose worker stopped renewing its lease",
                               len(recovered))  # fmt: skip
            if ticker is not None:
                moved += await self._call(ticker.tick)
            if (moved or recovered) and self._changed is not None:
                self._changed.set()
            await asyncio.sleep(HOUSEKEEPING_S)

    # -- shutdown --------------------------------------------------------------------------------
    async def _shutdown(self) -> None:
        """Let running jobs finish within the grace period, then hand the rest back at once."""
        if self._running and not self._stop_now:
            logger.info("stopping: waiting up to %g s for %d running job(s)", self.grace,
                        len(self._running))  # fmt: skip
            deadline = time.monotonic() + self.grace
            while self._running and not self._stop_now and time.monotonic() < deadline:
                assert self._changed is not None
                self._changed.clear()
                await self._flush()
                await _first(self._changed.wait(), timeout=min(1.0, deadline - time.monotonic()))
        await self._flush()
        leftover = [e for e in self._running.values() if not e.outcome_recorded]
        if leftover:
            handed = await self._call(self.broker.release, [e.claim for e in leftover])
            logger.warning("handed %d unfinished job(s) back to the queue", handed)
            for entry in leftover:
                entry.outcome_recorded = True
                if entry.task is not None:
                    entry.task.cancel()
            await asyncio.gather(
                *(e.task for e in leftover if e.task is not None), return_exceptions=True
            )

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        assert self._loop is not None
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                self._loop.add_signal_handler(sig, self.stop)

    # -- helpers ---------------------------------------------------------------------------------
    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        """A broker call on the broker thread, so the event loop never blocks on I/O."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._io, function, *args)

    def _nothing_left(self) -> bool:
        stats = self.broker.stats()
        if any(stats.queues.get(queue, 0) for queue in self.queues):
            return False
        # running elsewhere counts too: a dead worker's job comes back when its lease expires
        return not any(
            s.counts.get("retrying", 0) or s.counts.get("running", 0) for s in stats.jobs.values()
        )

    def _limits_reached(self) -> bool:
        if self.max_jobs is not None and self.jobs_done >= self.max_jobs:
            self._recycle = True
        if self.max_memory_mb is not None and _rss_mb() > self.max_memory_mb:
            logger.warning("worker %s uses more than %g MB; finishing and recycling", self.id,
                           self.max_memory_mb)  # fmt: skip
            self._recycle = True
        return self._recycle and not self._running

    def _info(self) -> WorkerInfo:
        return WorkerInfo(
            id=self.id, host=socket.gethostname(), pid=os.getpid(), queues=tuple(self.queues),
            concurrency=self.concurrency, started_at=self.started_at, seen_at=time.time(),
            current=tuple(self._running),
        )  # fmt: skip


async def _first(*awaitables: Any, timeout: float) -> None:
    """Wait until the first of these completes, or timeout; the rest keep going."""
    futures = [asyncio.ensure_future(a) for a in awaitables]
    _, pending = await asyncio.wait(futures, timeout=max(0.0, timeout),
                                    return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    for future in pending:
        if isinstance(future, asyncio.Task):  # our own waits; executor futures run on
            future.cancel()


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
