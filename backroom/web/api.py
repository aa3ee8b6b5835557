"""The dashboard's JSON HTTP API (DESIGN.md's table). Reads are paginated, indexed broker reads,
never a scan of all jobs; writes go through the App's checks, as the source the caller's token
maps to. Bad input gets a 4xx JSON error naming the problem, never a 500."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.routing import Route

from backroom.app import App
from backroom.brokers.base import JobQuery, JobRecord
from backroom.envelope import State
from backroom.errors import (
    BackroomError,
    BrokerError,
    InvalidPayload,
    PayloadTooLarge,
    SourceNotAllowed,
    UnknownJob,
)
from backroom.reporting import (
    activity,
    failure_groups,
    schedule_views,
    stats_summary,
    tag_report,
)
from backroom.web.checks import (
    BODY_SLACK,
    BULK_STATES,
    ENQUEUE_FIELDS,
    MAX_TEXT,
    ApiError,
    JSONResponse,
    enqueue_options,
    job_query,
    object_body,
    read_json,
    short,
    text_field,
)

logger = logging.getLogger("backroom.web")

VIEW_CACHE_S = 5.0
BULK_BATCH = 500
BULK_MAX = 5000  # jobs one bulk request changes; "more": true says to call again

T = TypeVar("T")


class Api:
    """The endpoints, bound to one App. Handlers that touch the broker run in a thread pool (the
    Broker API is synchronous); async handlers only read request bodies."""

    def __init__(self, app: App, cache_s: float = VIEW_CACHE_S) -> None:
        self.app, self.cache_s = app, cache_s
        self._cache_lock = threading.Lock()
        self._cache: dict[str, tuple[float, Any]] = {}

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        """The per-tag and per-minute views read up to a few thousand of the broker's counters;
        several open dashboards share one read per `cache_s` seconds."""
        now = time.monotonic()
        with self._cache_lock:
            hit = self._cache.get(key)
        if hit is not None and now - hit[0] < self.cache_s:
            return cast(T, hit[1])
        value = compute()
        with self._cache_lock:
            self._cache[key] = (now, value)
        return value

    def routes(self) -> list[Route]:
        return [
            Route("/api/jobs", self.list_jobs, methods=["GET"]),
            Route("/api/jobs", self.enqueue, methods=["POST"]),
            Route("/api/jobs/{id}", self.get_job, methods=["GET"]),
            Route("/api/jobs/{id}/cancel", self.cancel, methods=["POST"]),
            Route("/api/jobs/{id}/retry", self.retry, methods=["POST"]),
            Route("/api/bulk/retry", self.bulk_retry, methods=["POST"]),
            Route("/api/bulk/delete", self.bulk_delete, methods=["POST"]),
            Route("/api/stats", self.stats, methods=["GET"]),
            Route("/api/activity", self.activity, methods=["GET"]),
            Route("/api/failures", self.failures, methods=["GET"]),
            Route("/api/workers", self.workers, methods=["GET"]),
            Route("/api/schedules", self.schedules, methods=["GET"]),
            Route("/api/queues", self.queues, methods=["GET"]),
            Route("/api/queues/{name}/pause", self.pause, methods=["POST"]),
            Route("/api/queues/{name}/resume", self.resume, methods=["POST"]),
            Route("/api/registry", self.registry, methods=["GET"]),
            Route("/api/whoami", self.whoami, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
        ]

    # -- views of jobs ------------------------------------------------------------------------
    def view(self, record: JobRecord, *, full: bool) -> dict[str, Any]:
        """App.describe (payload redacted) plus the redacted result. The list view leaves out
        the traceback and the result, so a page of 1000 jobs stays small."""
        data = self.app.describe(record)
        data["registered"] = record.job in self.app.registry
        if full:
            data["result"] = self.app.redact(data["result"])
        else:
            del data["result"]
            if data["error"] is not None:
                data["error"] = {k: v for k, v in data["error"].items() if k != "traceback"}
        return data

    def _record(self, job_id: str) -> JobRecord:
        if not job_id or len(job_id) > MAX_TEXT:
            raise ApiError(400, "invalid_id", "a job id is 1 to 200 characters", field="id")
        record = self.app.broker.get(job_id)
        if record is None:
            raise ApiError(
                404,
                "job_not_found",
                f"no job with id {job_id!r} (it never existed, or its record expired)",
                id=job_id,
            )
        return record

    # -- reading ------------------------------------------------------------------------------
    def list_jobs(self, request: Request) -> JSONResponse:
        """Newest first. `next` is the cursor (`before=`) of the following page, or null."""
        query = job_query(request.query_params)
        if query.before is not None and self.app.broker.get(query.before) is None:
            raise ApiError(
                400,
                "invalid_query",
                f"before={query.before!r} names no job; pass the `next` value of the previous page",
                field="before",
            )
        records = self.app.broker.jobs(query)
        following = records[-1].id if len(records) == query.limit else None
        return JSONResponse(
            {
                "jobs": [self.view(r, full=False) for r in records],
                "next": following,
                "now": time.time(),
            }
        )

    def get_job(self, request: Request) -> JSONResponse:
        record = self._record(request.path_params["id"])
        return JSONResponse({**self.view(record, full=True), "now": time.time()})

    def stats(self, request: Request) -> JSONResponse:
        """stats_summary (per job name, queues, paused, schedules) plus tag_report (per tag)."""
        summary = stats_summary(self.app)
        if request.query_params.get("tags", "1") != "0":
            summary.update(self.cached("tags", lambda: tag_report(self.app)))
        summary["now"] = time.time()
        return JSONResponse(summary)

    def activity(self, request: Request) -> JSONResponse:
        """Per job name and minute over the last hour (see reporting.activity)."""
        return JSONResponse(self.cached("activity", lambda: activity(self.app)))

    def failures(self, request: Request) -> JSONResponse:
        return JSONResponse(failure_groups(self.app))

    def workers(self, request: Request) -> JSONResponse:
        """Live workers with the jobs each runs now (one get_many for all of them)."""
        workers = self.app.broker.workers()
        ids = [job_id for w in workers for job_id in w.current]
        records = {r.id: r for r in self.app.broker.get_many(ids) if r is not None}
        now = time.time()
        result = []
        for w in workers:
            current = []
            for job_id in w.current:
                r = records.get(job_id)
                current.append(
                    {
                        "id": job_id,
                        "job": r.job if r else None,
                        "tags": list(r.envelope.tags) if r else [],
                        "progress": r.progress if r else None,
                        "progress_message": r.progress_message if r else None,
                        "started_at": r.started_at if r else None,
                    }
                )
            result.append(
                {
                    "id": w.id,
                    "host": w.host,
                    "pid": w.pid,
                    "queues": list(w.queues),
                    "concurrency": w.concurrency,
                    "started_at": w.started_at,
                    "seen_at": w.seen_at,
                    "current": current,
                }
            )
        return JSONResponse({"workers": result, "now": now})

    def schedules(self, request: Request) -> JSONResponse:
        now = time.time()
        return JSONResponse({"schedules": schedule_views(self.app, now), "now": now})

    def queues(self, request: Request) -> JSONResponse:
        stats = self.app.broker.stats()
        paused = self.app.broker.paused()
        names = sorted(set(self.app.registry.queues()) | set(stats.queues) | paused)
        jobs_by_queue: dict[str, list[str]] = {}
        for spec in self.app.registry:
            jobs_by_queue.setdefault(spec.queue, []).append(spec.name)
        return JSONResponse(
            {
                "queues": [
                    {
                        "name": q,
                        "depth": stats.queues.get(q, 0),
                        "paused": q in paused,
                        "jobs": jobs_by_queue.get(q, []),
                    }
                    for q in names
                ]
            }
        )

    def registry(self, request: Request) -> JSONResponse:
        return JSONResponse({"jobs": [spec.describe() for spec in self.app.registry]})

    def whoami(self, request: Request) -> JSONResponse:
        """The source this caller enqueues as (the dashboard shows it)."""
        return JSONResponse({"source": request.state.source})

    def healthz(self, request: Request) -> JSONResponse:
        try:
            self.app.broker.paused()  # one cheap read: the broker answers
        except BackroomError as exc:
            # public and unauthenticated: the details (a broker URL may hold a password) go to
            # the log, not to the caller
            logger.warning("healthz: the broker did not answer: %s", exc)
            return JSONResponse({"status": "error", "broker": "not answering"}, status_code=503)
        return JSONResponse({"status": "ok"})

    # -- writing ------------------------------------------------------------------------------
    async def enqueue(self, request: Request) -> JSONResponse:
        body = await read_json(request, self.app.max_payload_bytes + BODY_SLACK)
        source: str = request.state.source
        return await run_in_threadpool(self._enqueue, body, source)

    def _enqueue(self, body: Any, source: str) -> JSONResponse:
        body = object_body(
            body, ENQUEUE_FIELDS, '{"job": "send_email", "payload": {...}}', "is not accepted"
        )
        if "job" not in body:
            raise ApiError(
                422,
                "missing_field",
                "field 'job' is required: the name of the job to run (see GET /api/registry)",
                field="job",
            )
        job = text_field(body["job"], "job")
        payload = body.get("payload", {})
        if payload is None:
            payload = {}
        if not isinstance(payload, dict):
            raise ApiError(
                422,
                "invalid_payload",
                f"field 'payload' must be a JSON object, got {short(payload)}",
                field="payload",
                job=job,
            )
        options = enqueue_options(body)
        try:
            envelope = self.app.envelope(job, payload, source=source, **options)
        except UnknownJob as exc:
            raise ApiError(422, "unknown_job", str(exc), job=job, known=exc.known) from None
        except SourceNotAllowed as exc:
            raise ApiError(
                403, "source_not_allowed", str(exc), job=job, source=exc.source, allowed=exc.allowed
            ) from None
        except InvalidPayload as exc:
            field = f"payload.{exc.field}" if exc.field else "payload"
            raise ApiError(422, "invalid_payload", str(exc), field=field, job=job) from None
        except PayloadTooLarge as exc:
            raise ApiError(413, "payload_too_large", str(exc), job=job) from None
        except BackroomError as exc:
            raise ApiError(422, "invalid_request", str(exc), job=job) from None
        [job_id] = self.app.broker.enqueue([envelope])
        created = job_id == envelope.id
        return JSONResponse(
            {
                "id": job_id,
                "job": job,
                "source": source,
                "created": created,
                "state": "scheduled" if envelope.eta else "queued",
            }
            if created
            else {"id": job_id, "job": job, "source": source, "created": False},
            status_code=201 if created else 200,
        )

    def cancel(self, request: Request) -> JSONResponse:
        record = self._record(request.path_params["id"])
        source = request.state.source
        if self.app.broker.cancel(record.id, reason=f"cancelled by {source}"):
            after = self.app.broker.get(record.id)
            state = str(after.state) if after else "cancelled"
            return JSONResponse(
                {"id": record.id, "cancelled": True, "state": state, "stopping": state == "running"}
            )
        raise ApiError(
            409,
            "not_cancellable",
            f"job {record.id} is {record.state}; only "
            "scheduled, queued, retrying or running jobs can be cancelled",
            id=record.id,
            state=str(record.state),
        )

    def retry(self, request: Request) -> JSONResponse:
        record = self._record(request.path_params["id"])
        if self.app.broker.retry(record.id):
            return JSONResponse({"id": record.id, "retried": True, "state": "queued"})
        raise ApiError(
            409,
            "not_retryable",
            f"job {record.id} is {record.state}; only dead, "
            "rejected or cancelled jobs can be retried",
            id=record.id,
            state=str(record.state),
        )

    async def bulk_retry(self, request: Request) -> JSONResponse:
        body = await read_json(request, BODY_SLACK, allow_empty=True)
        return await run_in_threadpool(self._bulk, "retry", body)

    async def bulk_delete(self, request: Request) -> JSONResponse:
        body = await read_json(request, BODY_SLACK, allow_empty=True)
        return await run_in_threadpool(self._bulk, "delete", body)

    def _bulk(self, action: str, body: Any) -> JSONResponse:
        """Retry or delete the jobs matching a filter {"state": "dead", "job": ..., "tag": ...}
        in pages of BULK_BATCH, at most BULK_MAX per request (`more` says to call again)."""
        body = {} if body is None else body
        body = object_body(
            body,
            ("state", "job", "tag"),
            '{"state": "dead", "job": "send_email"}',
            "is not a filter",
        )
        state = body.get("state", "dead")
        if state not in BULK_STATES[action]:
            raise ApiError(
                422,
                "invalid_field",
                f"bulk {action} takes state {', '.join(BULK_STATES[action])}; got {short(state)}",
                field="state",
            )
        job = text_field(body["job"], "job") if body.get("job") is not None else None
        tag = text_field(body["tag"], "tag") if body.get("tag") is not None else None
        query = JobQuery(state=State(state), job=job, tag=tag, limit=BULK_BATCH)
        done, more = 0, False
        while True:
            # Each changed job leaves the filter, so the next page is again the newest ones.
            ids = [record.id for record in self.app.broker.jobs(query)]
            if action == "retry":
                changed = sum(1 for job_id in ids if self.app.broker.retry(job_id))
            else:
                changed = self.app.broker.delete(ids) if ids else 0
            done += changed
            if len(ids) < BULK_BATCH or changed == 0:
                break
            if done >= BULK_MAX:
                more = True
                break
        key = "retried" if action == "retry" else "deleted"
        return JSONResponse({key: done, "state": state, "job": job, "tag": tag, "more": more})

    def pause(self, request: Request) -> JSONResponse:
        name = text_field(request.path_params["name"], "name", where="path")
        self.app.broker.pause(name)
        return JSONResponse({"queue": name, "paused": True})

    def resume(self, request: Request) -> JSONResponse:
        name = text_field(request.path_params["name"], "name", where="path")
        self.app.broker.resume(name)
        return JSONResponse({"queue": name, "paused": False})


def broker_unavailable(exc: BrokerError) -> ApiError:
    """A 503 that leaves the broker's own message (which may name its URL) to the log."""
    return ApiError(503, "broker_unavailable", "the broker did not answer; see the dashboard's log")
