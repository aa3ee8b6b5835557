"""The OpenAPI 3.1 description of the HTTP API, served at /api/openapi.json. Written out by hand
from one table, so it says what each endpoint really takes and returns; the enqueue body lists
the registered jobs, and each job's payload schema is in GET /api/registry."""

from __future__ import annotations

from typing import Any

from backroom.envelope import State

ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {
        "error": {"type": "string", "description": "a stable code, e.g. invalid_payload"},
        "message": {"type": "string", "description": "what was wrong and how to fix it"},
        "field": {"type": "string", "description": "the offending field, where there is one"},
    },
}
JOB = {
    "type": "object",
    "description": "A job as App.describe shows it; secret-looking payload fields are redacted.",
    "properties": {
        "id": {"type": "string"},
        "job": {"type": "string"},
        "state": {"enum": [str(s) for s in State]},
        "source": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "queue": {"type": "string"},
        "priority": {"type": "integer"},
        "payload": {"type": "object"},
        "attempts": {"type": "integer"},
        "max_retries": {"type": "integer"},
        "progress": {"type": ["number", "null"]},
        "progress_message": {"type": ["string", "null"]},
        "created_at": {"type": "number"},
        "queued_at": {"type": ["number", "null"]},
        "started_at": {"type": ["number", "null"]},
        "finished_at": {"type": ["number", "null"]},
        "wait_time": {"type": ["number", "null"]},
        "run_time": {"type": ["number", "null"]},
        "result": {"description": "only in GET /api/jobs/{id}"},
        "error": {
            "type": ["object", "null"],
            "properties": {
                "type": {"type": "string"},
                "message": {"type": "string"},
                "traceback": {"type": "string", "description": "only in GET /api/jobs/{id}"},
            },
        },
        "reason": {"type": ["string", "null"]},
        "worker_id": {"type": ["string", "null"]},
        "registered": {"type": "boolean"},
    },
}
FILTER = {
    "type": "object",
    "properties": {
        "state": {"type": "string", "default": "dead"},
        "job": {"type": "string"},
        "tag": {"type": "string"},
    },
    "additionalProperties": False,
}


def _query(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


def _path(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _op(
    summary: str,
    ok: dict[str, Any] | None = None,
    *,
    status: str = "200",
    errors: tuple[int, ...] = (),
    **extra: Any,
) -> dict[str, Any]:
    responses: dict[str, Any] = {
        status: {
            "description": "OK",
            "content": {"application/json": {"schema": ok or {"type": "object"}}},
        },
        "401": {
            "description": "a token is configured and none (or a wrong one) was sent",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        },
    }
    for code in errors:
        responses[str(code)] = {
            "description": "refused; the body names the problem",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
    return {"summary": summary, "responses": responses, **extra}


def openapi(job_names: list[str]) -> dict[str, Any]:
    """The document; `job_names` fills the enqueue body's `job` enum."""
    job_ref = {"$ref": "#/components/schemas/Job"}
    enqueue_body = {
        "type": "object",
        "required": ["job"],
        "additionalProperties": False,
        "properties": {
            "job": {"enum": job_names, "description": "see GET /api/registry"},
            "payload": {"type": "object", "description": "checked against the job's schema"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 50},
            "delay": {"type": "number", "minimum": 0, "description": "seconds"},
            "expires": {"type": "number", "exclusiveMinimum": 0, "description": "seconds"},
            "queue": {"type": "string"},
            "priority": {"type": "integer"},
            "unique_key": {"type": "string"},
            "unique_for": {"oneOf": [{"enum": ["start", "finish"]}, {"type": "number"}]},
        },
    }
    control = (404, 409)
    body: dict[str, Any] = {
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Filter"}}},
        }
    }
    paths: dict[str, Any] = {
        "/api/jobs": {
            "get": _op(
                "Recent jobs, newest first; `next` is the cursor for the following page",
                {
                    "type": "object",
                    "properties": {
                        "jobs": {"type": "array", "items": job_ref},
                        "next": {"type": ["string", "null"]},
                    },
                },
                errors=(400,),
                parameters=[
                    _query("state", "a job state", {"enum": [str(s) for s in State]}),
                    _query("job", "a job name", {"type": "string"}),
                    _query("tag", "a tag", {"type": "string"}),
                    _query(
                        "limit",
                        "page size",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                    ),
                    _query("before", "cursor: the previous page's `next`", {"type": "string"}),
                ],
            ),
            "post": _op(
                "Enqueue a job as the source the caller's token maps to",
                {
                    "type": "object",
                    "properties": {"id": {"type": "string"}, "created": {"type": "boolean"}},
                },
                status="201",
                errors=(400, 403, 413, 415, 422),
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": enqueue_body}},
                },
            ),
        },
        "/api/jobs/{id}": {
            "get": _op(
                "One job, with its traceback and result",
                job_ref,
                errors=(404,),
                parameters=[_path("id")],
            )
        },
        "/api/jobs/{id}/cancel": {
            "post": _op(
                "Cancel a job (a running one is told to stop)",
                errors=control,
                parameters=[_path("id")],
            )
        },
        "/api/jobs/{id}/retry": {
            "post": _op(
                "Queue a dead, rejected or cancelled job again",
                errors=control,
                parameters=[_path("id")],
            )
        },
        "/api/bulk/retry": {
            "post": _op(
                "Retry every job matching the filter (default: dead); "
                "at most 5000 per call, `more` says to call again",
                errors=(400, 415, 422),
                **body,
            )
        },
        "/api/bulk/delete": {
            "post": _op(
                "Delete every finished job matching the filter", errors=(400, 415, 422), **body
            )
        },
        "/api/stats": {
            "get": _op(
                "Per job name: counts by state, p50/p95/max run and wait time, retries, lease "
                "recoveries, rejections, failure rate, throughput (jobs finished per minute over "
                "the last 5 minutes); throughput of all jobs; per tag: outcomes, retries, run and "
                "wait time, running now, failure rate; queues, paused, schedules",
                parameters=[_query("tags", "0 leaves the per-tag part out", {"enum": ["0", "1"]})],
            )
        },
        "/api/activity": {
            "get": _op(
                "Per job name and minute over the last hour: succeeded, failed, p95 run time"
            )
        },
        "/api/failures": {
            "get": _op(
                "Failed attempts grouped by job name and exception type, with the latest traceback"
            )
        },
        "/api/workers": {"get": _op("Live workers with their current jobs")},
        "/api/schedules": {"get": _op("Cron schedules with their last and next run")},
        "/api/queues": {"get": _op("Queues: depth and whether paused")},
        "/api/queues/{name}/pause": {
            "post": _op("Stop reservation from a queue on every worker", parameters=[_path("name")])
        },
        "/api/queues/{name}/resume": {
            "post": _op("Resume reservation from a queue", parameters=[_path("name")])
        },
        "/api/registry": {
            "get": _op("Every job: queue, sources, retries, timeout, tags and payload JSON Schema")
        },
        "/api/whoami": {"get": _op("The source this caller's token enqueues as")},
        "/healthz": {
            "get": {
                "summary": "Liveness: 200 while the broker answers, else 503",
                "security": [],
                "responses": {"200": {"description": "OK"}, "503": {"description": "down"}},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus exposition (labels: job, queue, state)",
                "responses": {"200": {"description": "text/plain; version=0.0.4"}},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "backroom HTTP API",
            "version": "1",
            "description": "Every /api call needs `Authorization: Bearer <token>` when tokens "
            "are configured; a token maps to the source it enqueues as. State-changing requests "
            "without a bearer token must come from the dashboard's own origin.",
        },
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR, "Job": JOB, "Filter": FILTER},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
