"""What the worker decides about a job, apart from running it: the checks an envelope must pass
in the worker, how a failed attempt is recorded (retry with backoff, or dead) and reported to
the error hooks, how a crashed predecessor's jobs are settled, and the follow-up job of a
success. It keeps no state of its own; the broker calls run on the caller's thread."""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from backroom.app import App
from backroom.brokers.base import Broker, Claim, Failure
from backroom.envelope import JSON, Envelope, State, new_id
from backroom.errors import (
    BackroomError,
    InvalidPayload,
    JobTimeout,
    LeaseExpired,
    PayloadTooLarge,
    SourceNotAllowed,
    UnknownJob,
    WorkerCrashed,
)
from backroom.jobs import MAX_BACKOFF_S, JobSpec
from backroom.security import BadSignature

logger = logging.getLogger("backroom.worker")


def log_fields(envelope: Envelope, **more: Any) -> dict[str, Any]:
    """The fields a log line about one job carries (`extra=`), for structured logs: its id,
    name, source and tags, never its payload."""
    return {"job_id": envelope.id, "job": envelope.job, "source": envelope.source,
            "tags": list(envelope.tags), **more}  # fmt: skip


class Rejected(Exception):
    """An envelope failed a worker-side check: `reason` reads "category: detail"."""

    def __init__(self, reason: str, error: BaseException) -> None:
        super().__init__(reason)
        self.reason, self.error = reason, error


class Recorder:
    def __init__(self, app: App, broker: Broker) -> None:
        self.app, self.broker = app, broker

    def check(self, envelope: Envelope) -> tuple[JobSpec, dict[str, Any]]:
        """The worker-side checks of an envelope that got past (or around) a producer."""
        try:
            spec = self.app.registry.get(envelope.job)
        except UnknownJob as exc:
            reason = f"unknown job: {envelope.job!r} is not registered by this app"
            raise Rejected(reason, exc) from None
        try:
            self.app.verify(envelope)
        except BadSignature as exc:
            raise Rejected(f"bad signature: {exc}", exc) from None
        except PayloadTooLarge as exc:
            raise Rejected(f"payload too large: {exc}", exc) from None
        try:
            spec.check_source(envelope.source)
        except SourceNotAllowed as exc:
            allowed = ", ".join(exc.allowed)
            reason = f"source not allowed: {exc.source!r} may not schedule it (allowed: {allowed})"
            raise Rejected(reason, exc) from None
        try:
            return spec, spec.arguments(envelope.payload)
        except InvalidPayload as exc:
            where = f"field {exc.field!r} " if exc.field else ""
            raise Rejected(f"invalid payload: {where}{exc.problem}", exc) from None

    def record_failure(self, claim: Claim, exc: BaseException, trace: str | None = None) -> None:
        """nack with the job's retry policy: `retrying` with backoff, or `dead` when the attempts
        are used up; then the hooks. Runs on the broker thread. `trace` stands in for the
        traceback of an exception that was never raised (a job written off past its timeout)."""
        envelope = claim.envelope
        attempt = envelope.attempt
        scrub = self.app.redactor.scrub  # a secret the job echoed stays out of logs and broker
        if trace is None:
            trace = "".join(traceback.format_exception(exc)) if exc.__traceback__ else ""
        failure = Failure(
            type=type(exc).__name__,
            message=scrub(str(exc), envelope.payload) or "",
            traceback=scrub(trace, envelope.payload) or "",
        )
        retry_at = None
        if attempt <= envelope.max_retries:
            retry_at = time.time() + self.backoff_s(envelope.job, attempt)
        if not self.broker.nack(claim, failure, retry_at):
            logger.warning("job %s (%s) lost its lease; its failure was not recorded",
                           claim.id, envelope.job, extra=log_fields(envelope))  # fmt: skip
            return
        if retry_at is None:
            logger.error("job %s (%s) is dead after %d attempts: %s: %s", claim.id, envelope.job,
                         attempt, failure.type, failure.message,
                         extra=log_fields(envelope, attempt=attempt))  # fmt: skip
        else:
            logger.warning("job %s (%s) failed attempt %d (%s: %s); retrying in %.1f s", claim.id,
                           envelope.job, attempt, failure.type, failure.message,
                           retry_at - time.time(),
                           extra=log_fields(envelope, attempt=attempt))  # fmt: skip
        dead = self.app.dead_hooks if retry_at is None else []
        self.notify([*self.app.failure_hooks, *dead], envelope, exc)

    def backoff_s(self, job: str, attempt: int) -> float:
        if job in self.app.registry:
            return self.app.registry.get(job).backoff_s(attempt)
        return min(MAX_BACKOFF_S, 2.0 ** (attempt - 1))

    def settle_orphans(self, orphans: Sequence[dict[str, Any]]) -> None:
        """Fail at once the jobs a dead predecessor held (its supervisor says which and why), or
        hand back the innocent ones; a claim that moved on since (lease expired, reclaimed) is
        left alone: its attempt id no longer matches. Runs on the broker thread."""
        records = self.broker.get_many([str(o["id"]) for o in orphans])
        released: list[Claim] = []
        for orphan, record in zip(orphans, records, strict=True):
            if record is None or record.state != State.RUNNING:
                continue
            claim = Claim(record.envelope, 0.0, str(orphan["attempt_id"]))
            if orphan.get("release"):
                released.append(claim)
            elif record.cancel_requested:
                self.broker.finish_cancelled(claim, record.reason or "cancelled")
            else:
                kind, message = orphan.get("error") or ("WorkerCrashed", "its worker process died")
                error = JobTimeout(message) if kind == "JobTimeout" else WorkerCrashed(message)
                self.record_failure(claim, error)
        if released:
            self.broker.release(released)

    def lost_leases(self, job_ids: Sequence[str]) -> None:
        """Hooks for the jobs a sweep took back from a worker that stopped renewing their
        leases: on_failure for each, on_dead as well for those whose last attempt it was. Runs
        on the broker thread, only when a sweep recovered something."""
        if not (self.app.failure_hooks or self.app.dead_hooks):
            return
        for record in self.broker.get_many(job_ids):
            if record is None or record.state == State.CANCELLED:
                continue
            error = LeaseExpired(
                f"the worker running attempt {record.attempts} of job {record.id} stopped "
                "renewing its lease (killed, frozen or cut off)"
            )
            envelope = record.envelope.with_attempt(record.attempts)  # the attempt it lost
            dead = self.app.dead_hooks if record.state == State.DEAD else []
            self.notify([*self.app.failure_hooks, *dead], envelope, error)

    def enqueue_then(self, envelope: Envelope, result: JSON) -> None:
        """The follow-up job, enqueued before the ack with a key tied to this job, so a crash in
        between re-runs the job but never doubles the follow-up. Its payload is
        {"result": result}, or the result itself when that is a JSON object and the follow-up
        takes no `result` argument. A follow-up that fails its checks (the result does not fit,
        the job is gone in this deploy) is stored all the same: a worker rejects it, with the
        reason, the hooks and the counts of any rejection; it is never silently dropped."""
        then = envelope.then
        assert then is not None
        payload: Any = {"result": result}
        spec = self.app.registry.get(then) if then in self.app.registry else None
        takes_result = spec is None or "result" in spec.model.model_fields
        if isinstance(result, dict) and not takes_result:
            payload = result
        options: dict[str, Any] = {
            "source": f"job:{envelope.job}", "unique_key": f"then:{envelope.id}",
            "unique_for": 7 * 86400.0, "tags": envelope.tags,
        }  # fmt: skip
        try:
            follow = self.app.envelope(then, payload, **options)
        except BackroomError as exc:
            logger.warning("follow-up %s of job %s (%s) fails its checks (%s); a worker will "
                           "reject it", then, envelope.id, envelope.job, exc,
                           extra=log_fields(envelope))  # fmt: skip
            follow = Envelope(
                id=new_id(), job=then, payload=payload, created_at=time.time(),
                queue=spec.queue if spec else envelope.queue, **options,
            )  # fmt: skip
            with contextlib.suppress(BackroomError):  # signed if a key covers its source
                follow = self.app.sign(follow)
        self.broker.enqueue([follow])

    def notify(self, hooks: Sequence[Callable[[Envelope, BaseException], None]],
                envelope: Envelope, error: BaseException) -> None:  # fmt: skip
        """Hooks observe: one that raises is logged and skipped, never changes an outcome. They
        get the envelope with its payload redacted (once for all of them)."""
        if not hooks:
            return
        redacted = msgspec.structs.replace(envelope, payload=self.app.redact(envelope.payload))
        for hook in hooks:
            try:
                hook(redacted, error)
            except Exception:
                logger.exception("error hook %r raised; ignored", hook)
