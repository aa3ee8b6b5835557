"""Checking what an HTTP request sent: query filters, the enqueue body, JSON bodies read with a
size cap. Every refusal is an ApiError: a 4xx status, a stable code, and a message naming the
field and what would be accepted."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from backroom.brokers.base import JobQuery
from backroom.envelope import State

MAX_TEXT = 200  # job names, tags, queue names, ids, unique keys in a request
MAX_TAGS = 50
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
BODY_SLACK = 64 * 1024  # a request body may exceed the payload limit by this much (other fields)
STATES = [str(s) for s in State]
JOB_FILTERS = ("state", "job", "tag", "limit", "before")
TEN_YEARS_S = 10 * 365 * 86400.0
ENQUEUE_FIELDS = (
    "job",
    "payload",
    "tags",
    "delay",
    "queue",
    "priority",
    "unique_key",
    "unique_for",
    "expires",
)
BULK_STATES = {
    "retry": ("dead", "rejected", "cancelled"),
    "delete": ("dead", "rejected", "cancelled", "succeeded"),
}
_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """A request the API refuses: HTTP status, a stable code, a message saying what to fix, and
    fields a program may read (`field`, `job`, `source` ...)."""

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class JSONResponse(Response):
    """JSON via msgspec (NaN and infinities become null); never cached."""

    media_type = "application/json"

    def __init__(self, content: Any, status_code: int = 200) -> None:
        super().__init__(
            _encoder.encode(content), status_code=status_code, headers={"cache-control": "no-store"}
        )


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


# -- checking input ----------------------------------------------------------------------------


def text_field(value: Any, field: str, *, where: str = "field") -> str:
    if not isinstance(value, str) or not value:
        raise ApiError(
            422 if where == "field" else 400,
            f"invalid_{where}",
            f"{where} {field!r} must be a non-empty string",
            field=field,
        )
    if len(value) > MAX_TEXT:
        raise ApiError(
            422 if where == "field" else 400,
            f"invalid_{where}",
            f"{where} {field!r} is longer than {MAX_TEXT} characters",
            field=field,
        )
    return value


def _number(value: Any, field: str, *, positive: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or (isinstance(value, float) and not math.isfinite(value))
    ):
        raise ApiError(
            422,
            "invalid_field",
            f"field {field!r} must be a number of seconds, got {short(value)}",
            field=field,
        )
    if value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ApiError(
            422, "invalid_field", f"field {field!r} must be {bound}, got {value}", field=field
        )
    if value > TEN_YEARS_S:
        raise ApiError(422, "invalid_field", f"field {field!r} is more than ten years", field=field)
    return float(value)


def short(value: Any) -> str:
    text = repr(value)
    return (text[:57] + "...") if len(text) > 60 else text


def object_body(body: Any, allowed: Sequence[str], example: str, refusal: str) -> dict[str, Any]:
    """A request body that must be a JSON object with only the `allowed` fields: a 400 when it
    is not an object (showing `example`), a 422 naming the first unknown field."""
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", f"the body must be a JSON object such as {example}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        name = unknown[0][:MAX_TEXT]
        raise ApiError(
            422, "invalid_field", f"field {name!r} {refusal}; use {', '.join(allowed)}", field=name
        )
    return body


def job_query(params: Mapping[str, str]) -> JobQuery:
    """?state=&job=&tag=&limit=&before= -> JobQuery; unknown or bad parameters are a 400 that
    names them (a typo like ?status=dead must not silently list every job)."""
    unknown = sorted(set(params) - set(JOB_FILTERS))
    if unknown:
        raise ApiError(
            400,
            "invalid_query",
            f"unknown query parameter {unknown[0]!r}; filter with {', '.join(JOB_FILTERS)}",
            field=unknown[0],
        )
    state = params.get("state") or None
    if state is not None and state not in STATES:
        raise ApiError(
            400,
            "invalid_query",
            f"state {state[:MAX_TEXT]!r} is not a job state; use one of {', '.join(STATES)}",
            field="state",
        )
    raw_limit = params.get("limit") or str(DEFAULT_LIMIT)
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = -1
    if not 1 <= limit <= MAX_LIMIT:
        raise ApiError(
            400,
            "invalid_query",
            f"limit must be a whole number from 1 to {MAX_LIMIT}, got {raw_limit[:40]!r}",
            field="limit",
        )
    job = params.get("job") or None
    tag = params.get("tag") or None
    before = params.get("before") or None
    for name, value in (("job", job), ("tag", tag), ("before", before)):
        if value is not None:
            text_field(value, name, where="query")
    return JobQuery(
        state=State(state) if state else None, job=job, tag=tag, limit=limit, before=before
    )


def enqueue_options(body: Mapping[str, Any]) -> dict[str, Any]:
    """The enqueue keywords of a POST /api/jobs body, checked; App.envelope checks the rest."""
    options: dict[str, Any] = {}
    tags = body.get("tags")
    if tags is not None:
        if not isinstance(tags, list) or len(tags) > MAX_TAGS:
            raise ApiError(
                422,
                "invalid_field",
                f"field 'tags' must be a list of at most {MAX_TAGS} strings",
                field="tags",
            )
        options["tags"] = [text_field(tag, f"tags.{i}") for i, tag in enumerate(tags)]
    if body.get("delay") is not None:
        options["delay"] = _number(body["delay"], "delay")
    if body.get("expires") is not None:
        options["expires"] = _number(body["expires"], "expires", positive=True)
    if body.get("queue") is not None:
        options["queue"] = text_field(body["queue"], "queue")
    if body.get("unique_key") is not None:
        options["unique_key"] = text_field(body["unique_key"], "unique_key")
    if body.get("unique_for") is not None:
        value = body["unique_for"]
        if value not in ("start", "finish"):
            value = _number(value, "unique_for", positive=True)
        options["unique_for"] = value
    priority = body.get("priority")
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > 2**31:
            raise ApiError(
                422,
                "invalid_field",
                "field 'priority' must be a whole number "
                f"(higher runs earlier), got {short(priority)}",
                field="priority",
            )
        options["priority"] = priority
    return options


async def read_json(request: Request, limit: int, *, allow_empty: bool = False) -> Any:
    """The request body as JSON: Content-Type application/json, at most `limit` bytes (read in
    chunks, so an endless body is cut off), strict JSON (no NaN, no lone surrogates)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(
            413, "body_too_large", f"the body is {declared} bytes, over the limit of {limit} bytes"
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, "body_too_large", f"the body is over the limit of {limit} bytes")
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip() and allow_empty:
        return None
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the body as JSON with the header Content-Type: application/json",
        )
    if not raw.strip():
        raise ApiError(400, "malformed_json", "the body is empty; send a JSON object")
    try:
        return msgspec.json.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "malformed_json", "the body is nested too deeply") from None
    except UnicodeError:  # a string of bytes that are not UTF-8
        raise ApiError(400, "malformed_json", "the body is not valid UTF-8 text") from None
