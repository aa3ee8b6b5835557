"""The HTTP API of DESIGN.md, endpoint by endpoint, on memory:// and sqlite://: what each returns,
and that every bad request gets a 4xx JSON error naming the problem, never a 500."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

import backroom
from backroom.brokers.base import WorkerInfo
from backroom.envelope import Envelope, new_id
from tests.web.conftest import SECRET, TestClient


def enqueue(client: TestClient, job: str, payload: dict[str, Any], **extra: Any) -> str:
    response = client.post("/api/jobs", json={"job": job, "payload": payload, **extra})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["id"]
    return job_id


def error_of(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert body["error"] == code, body
    assert body["message"]
    return body


def logs(n: int) -> dict[str, str]:
    return {"server": f"edge-{n}", "day": "2026-11-21"}


# -- reading jobs ----------------------------------------------------------------------------


def test_jobs_are_listed_newest_first_with_filters(client: TestClient) -> None:
    first = enqueue(client, "process_logs", logs(1), tags=["edge-1"])
    second = enqueue(client, "send_email", {"to": "a@example.com"})
    third = enqueue(client, "process_logs", logs(2), tags=["edge-2"])
    listed = client.get("/api/jobs").json()
    assert [j["id"] for j in listed["jobs"]] == [third, second, first]
    assert listed["next"] is None
    by_job = client.get("/api/jobs", params={"job": "process_logs"}).json()["jobs"]
    assert [j["id"] for j in by_job] == [third, first]
    by_tag = client.get("/api/jobs", params={"tag": "edge-1"}).json()["jobs"]
    assert [j["id"] for j in by_tag] == [first]
    assert by_tag[0]["tags"] == ["logs", "edge-1"]
    queued = client.get("/api/jobs", params={"state": "queued", "job": "send_email"}).json()
    assert [j["id"] for j in queued["jobs"]] == [second]
    assert client.get("/api/jobs", params={"state": "dead"}).json()["jobs"] == []


def test_pages_follow_the_next_cursor_without_gaps_or_repeats(client: TestClient) -> None:
    ids = [enqueue(client, "process_logs", logs(n)) for n in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"before": cursor} if cursor else {})}
        page = client.get("/api/jobs", params=params).json()
        seen += [j["id"] for j in page["jobs"]]
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == ids[::-1]


def test_one_job_shows_state_attempts_timings_traceback_and_redacted_payload(
    app: backroom.App, client: TestClient
) -> None:
    ok = enqueue(client, "send_email", {"to": "a@example.com", "password": SECRET})
    dead = enqueue(client, "always_fails", {"message": "disk full"})
    app.run_worker(burst=True)
    job = client.get(f"/api/jobs/{ok}").json()
    assert job["state"] == "succeeded"
    assert job["payload"] == {"to": "a@example.com", "password": "[redacted]"}
    assert job["result"] == "sent to a@example.com"
    assert job["attempts"] == 1 and job["source"] == "api" and job["tags"] == ["email"]
    assert job["run_time"] is not None and job["started_at"] <= job["finished_at"]
    failed = client.get(f"/api/jobs/{dead}").json()
    assert failed["state"] == "dead"
    assert failed["error"]["type"] == "ValueError"
    assert failed["error"]["message"] == "disk full"
    assert "raise ValueError(message)" in failed["error"]["traceback"]
    # the list view stays small: no traceback, no result
    listed = client.get("/api/jobs", params={"state": "dead"}).json()["jobs"][0]
    assert "traceback" not in listed["error"] and "result" not in listed


def test_an_unknown_job_id_is_a_404_and_a_silly_one_a_400(client: TestClient) -> None:
    body = error_of(client.get("/api/jobs/nope"), 404, "job_not_found")
    assert "'nope'" in body["message"]
    error_of(client.post("/api/jobs/nope/cancel"), 404, "job_not_found")
    error_of(client.post("/api/jobs/nope/retry"), 404, "job_not_found")
    error_of(client.get("/api/jobs/" + "x" * 300), 400, "invalid_id")


@pytest.mark.parametrize(
    ("params", "field", "words"),
    [
        ({"state": "exploded"}, "state", "not a job state; use one of scheduled"),
        ({"limit": "0"}, "limit", "from 1 to 1000"),
        ({"limit": "5000"}, "limit", "from 1 to 1000"),
        ({"limit": "ten"}, "limit", "got 'ten'"),
        ({"status": "dead"}, "status", "unknown query parameter 'status'"),
        ({"before": "no-such-job"}, "before", "names no job"),
        ({"tag": "t" * 300}, "tag", "longer than 200"),
    ],
)
def test_a_bad_filter_is_a_400_naming_it(
    client: TestClient, params: dict[str, str], field: str, words: str
) -> None:
    body = error_of(client.get("/api/jobs", params=params), 400, "invalid_query")
    assert body["field"] == field
    assert words in body["message"]


# -- enqueue ---------------------------------------------------------------------------------


def test_enqueue_uses_the_apps_source_without_tokens_and_keeps_tags_and_delay(
    app: backroom.App, client: TestClient
) -> None:
    response = client.post(
        "/api/jobs",
        json={"job": "process_logs", "payload": logs(1), "tags": ["edge-1"], "delay": 60},
    )
    assert response.status_code == 201
    body = response.json()
    assert body["source"] == "api" and body["state"] == "scheduled" and body["created"]
    record = app.broker.get(body["id"])
    assert record is not None
    assert record.envelope.source == "api"
    assert record.envelope.tags == ("logs", "edge-1")
    assert str(record.state) == "scheduled"


def test_enqueue_with_a_held_unique_key_returns_the_existing_job(client: TestClient) -> None:
    body = {"job": "process_logs", "payload": logs(1), "unique_key": "logs:edge-1"}
    first = client.post("/api/jobs", json=body)
    again = client.post("/api/jobs", json=body)
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"] and again.json()["created"] is False


def test_enqueue_accepts_queue_priority_expires_and_unique_for(
    app: backroom.App, client: TestClient
) -> None:
    job_id = enqueue(
        client,
        "process_logs",
        logs(1),
        queue="high",
        priority=5,
        expires=30,
        unique_key="k",
        unique_for="start",
    )
    record = app.broker.get(job_id)
    assert record is not None
    assert (record.envelope.queue, record.envelope.priority) == ("high", 5)
    assert record.envelope.expires is not None and record.envelope.unique_for == "start"


@pytest.mark.parametrize(
    ("body", "status", "code", "field", "words"),
    [
        ([1, 2], 400, "invalid_body", None, "must be a JSON object"),
        ({"payload": {}}, 422, "missing_field", "job", "field 'job' is required"),
        ({"job": 7}, 422, "invalid_field", "job", "non-empty string"),
        (
            {"job": "process_log", "payload": {}},
            422,
            "unknown_job",
            None,
            "did you mean 'process_logs'",
        ),
        (
            {"job": "process_logs", "payload": logs(1), "colour": "red"},
            422,
            "invalid_field",
            "colour",
            "field 'colour' is not accepted",
        ),
        (
            {"job": "process_logs", "payload": [1]},
            422,
            "invalid_payload",
            "payload",
            "must be a JSON object",
        ),
        (
            {"job": "process_logs", "payload": {"server": "edge-1"}},
            422,
            "invalid_payload",
            "payload.day",
            "field 'day' is required but missing",
        ),
        (
            {"job": "process_logs", "payload": {"server": 7, "day": "x"}},
            422,
            "invalid_payload",
            "payload.server",
            "field 'server'",
        ),
        (
            {"job": "process_logs", "payload": {**logs(1), "extra": 1}},
            422,
            "invalid_payload",
            "payload.extra",
            "not a parameter of this job",
        ),
        (
            {"job": "send_invoices", "payload": {"month": "2026-11"}},
            403,
            "source_not_allowed",
            None,
            "source 'api' may not schedule 'send_invoices'; allowed sources: scheduler",
        ),
        (
            {"job": "process_logs", "payload": logs(1), "tags": "edge-1"},
            422,
            "invalid_field",
            "tags",
            "list of at most 50 strings",
        ),
        (
            {"job": "process_logs", "payload": logs(1), "tags": [""]},
            422,
            "invalid_field",
            "tags.0",
            "non-empty string",
        ),
        (
            {"job": "process_logs", "payload": logs(1), "delay": -1},
            422,
            "invalid_field",
            "delay",
            "must be >= 0",
        ),
        (
            {"job": "process_logs", "payload": logs(1), "delay": True},
            422,
            "invalid_field",
            "delay",
            "number of seconds",
        ),
        (
            {"job": "process_logs", "payload": logs(1), "delay": "soon"},
            422,
            "invalid_field",
            "delay",
            "number of seconds",
        ),
        (
            {"job": "process_logs", "payload": logs(1), "priority": 1.5},
            422,
            "invalid_field",
            "priority",
            "whole number",
        ),
        (
            {"job": "process_logs", "payload": logs(1), "expires": 0},
            422,
            "invalid_field",
            "expires",
            "must be > 0",
        ),
        (
            {"job": "process_logs", "payload": logs(1), "unique_for": "forever"},
            422,
            "invalid_field",
            "unique_for",
            "number of seconds",
        ),
        (
            {"job": "process_logs", "payload": logs(1), "unique_for": "start"},
            422,
            "invalid_request",
            None,
            "unique_for needs a unique_key",
        ),
    ],
)
def test_a_bad_enqueue_is_a_4xx_naming_the_problem(
    app: backroom.App,
    client: TestClient,
    body: Any,
    status: int,
    code: str,
    field: str | None,
    words: str,
) -> None:
    response = client.post("/api/jobs", json=body)
    error = error_of(response, status, code)
    assert words in error["message"]
    if field is not None:
        assert error["field"] == field
    assert app.broker.jobs(backroom.brokers.JobQuery()) == []  # nothing was enqueued


@pytest.mark.parametrize(
    ("content", "headers", "status", "code", "words"),
    [
        pytest.param(
            b'{"job": "process_logs", ', {}, 400, "malformed_json", "not valid JSON", id="truncated"
        ),
        pytest.param(b"", {}, 400, "malformed_json", "empty", id="empty"),
        pytest.param(b"\xff\xfe", {}, 400, "malformed_json", "not valid JSON", id="not-utf8"),
        pytest.param(
            b'{"job": "\\ud800"}', {}, 400, "malformed_json", "not valid JSON", id="lone-surrogate"
        ),
        pytest.param(b'{"job": NaN}', {}, 400, "malformed_json", "not valid JSON", id="nan"),
        pytest.param(b"[" * 5000 + b"]" * 5000, {}, 400, "malformed_json", "", id="deep"),
        pytest.param(b"[" * 1_200_000, {}, 413, "body_too_large", "limit", id="huge"),
        pytest.param(
            b'{"job": "process_logs"}',
            {"content-type": "text/plain"},
            415,
            "unsupported_media_type",
            "Content-Type: application/json",
            id="text",
        ),
        pytest.param(
            b"job=process_logs",
            {"content-type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
            "application/json",
            id="form",
        ),
    ],
)
def test_a_body_that_is_not_json_is_refused_clearly(
    client_for: Any, content: bytes, headers: dict[str, str], status: int, code: str, words: str
) -> None:
    client = client_for(tokens={})
    sent = {"content-type": "application/json", **headers}
    body = error_of(client.post("/api/jobs", content=content, headers=sent), status, code)
    assert words in body["message"]


def test_a_payload_over_the_apps_limit_is_a_413(app: backroom.App, client: TestClient) -> None:
    app.max_payload_bytes = 1000
    response = client.post("/api/jobs", json={"job": "send_email", "payload": {"to": "x" * 2000}})
    body = error_of(response, 413, "payload_too_large")
    assert "over the limit of 1000 bytes" in body["message"]


# -- control ---------------------------------------------------------------------------------


def test_cancel_a_queued_job_then_cancelling_again_is_a_409(
    app: backroom.App, client: TestClient
) -> None:
    job_id = enqueue(client, "process_logs", logs(1))
    response = client.post(f"/api/jobs/{job_id}/cancel")
    assert response.status_code == 200
    assert response.json() == {
        "id": job_id,
        "cancelled": True,
        "state": "cancelled",
        "stopping": False,
    }
    record = app.broker.get(job_id)
    assert record is not None and str(record.state) == "cancelled"
    assert record.reason == "cancelled by api"
    body = error_of(client.post(f"/api/jobs/{job_id}/cancel"), 409, "not_cancellable")
    assert "is cancelled" in body["message"]


def test_cancel_a_running_job_tells_its_worker_to_stop(
    app: backroom.App, client: TestClient
) -> None:
    job_id = enqueue(client, "process_logs", logs(1))
    app.broker.claim(["default"], worker_id="w1", lease_s=60, limit=1)
    body = client.post(f"/api/jobs/{job_id}/cancel").json()
    assert body["stopping"] is True and body["state"] == "running"
    assert app.broker.cancel_requested([job_id]) == {job_id}


def test_retry_a_dead_job_and_refuse_to_retry_a_succeeded_one(
    app: backroom.App, client: TestClient
) -> None:
    dead = enqueue(client, "always_fails", {"message": "boom"})
    ok = enqueue(client, "send_email", {"to": "a@example.com"})
    app.run_worker(burst=True)
    response = client.post(f"/api/jobs/{dead}/retry")
    assert response.status_code == 200 and response.json()["state"] == "queued"
    assert client.get(f"/api/jobs/{dead}").json()["state"] == "queued"
    body = error_of(client.post(f"/api/jobs/{ok}/retry"), 409, "not_retryable")
    assert "is succeeded" in body["message"]


def test_bulk_retry_and_delete_touch_only_the_dead_jobs_matching_the_filter(
    app: backroom.App, client: TestClient
) -> None:
    for n in range(4):
        enqueue(
            client, "always_fails", {"message": f"boom {n}"}, tags=["batch-a" if n < 3 else "b"]
        )
    enqueue(client, "send_email", {"to": "a@example.com"})
    app.run_worker(burst=True)
    response = client.post("/api/bulk/retry", json={"job": "always_fails", "tag": "batch-a"})
    assert response.json() == {
        "retried": 3,
        "state": "dead",
        "job": "always_fails",
        "tag": "batch-a",
        "more": False,
    }
    assert len(client.get("/api/jobs", params={"state": "queued"}).json()["jobs"]) == 3
    deleted = client.post("/api/bulk/delete", json={"state": "dead"}).json()
    assert deleted["deleted"] == 1
    assert client.get("/api/jobs", params={"state": "dead"}).json()["jobs"] == []
    assert len(client.get("/api/jobs", params={"state": "succeeded"}).json()["jobs"]) == 1
    # an empty body means "every dead job"
    empty = client.post(
        "/api/bulk/retry", content=b"", headers={"content-type": "application/json"}
    )
    assert empty.json()["retried"] == 0


@pytest.mark.parametrize(
    ("path", "body", "code", "field"),
    [
        ("/api/bulk/retry", {"state": "succeeded"}, "invalid_field", "state"),
        ("/api/bulk/delete", {"state": "running"}, "invalid_field", "state"),
        ("/api/bulk/retry", {"queue": "x"}, "invalid_field", "queue"),
        ("/api/bulk/delete", {"job": ""}, "invalid_field", "job"),
    ],
)
def test_a_bad_bulk_filter_is_a_422(
    client: TestClient, path: str, body: dict[str, Any], code: str, field: str
) -> None:
    assert error_of(client.post(path, json=body), 422, code)["field"] == field


# -- stats, activity, failures ----------------------------------------------------------------


def test_stats_match_what_the_jobs_really_did(app: backroom.App, client: TestClient) -> None:
    @app.job(tags=("timed",))
    def nap(ctx: backroom.Context, seconds: float) -> None:
        time.sleep(seconds)  # a job with a known run time

    for _ in range(4):
        enqueue(client, "nap", {"seconds": 0.1})
    for n in range(3):
        enqueue(client, "always_fails", {"message": f"boom {n}"})
    app.run_worker(burst=True, concurrency=4)
    stats = client.get("/api/stats").json()
    by_name = {row["job"]: row for row in stats["jobs"]}
    assert by_name["nap"]["counts"]["succeeded"] == 4
    # at least the known run time; above it one histogram bucket (x1.25) plus slack for a busy host
    assert 0.1 <= by_name["nap"]["run_time"]["p50"] <= 0.1 * 1.25 + 0.3
    assert by_name["always_fails"]["counts"]["dead"] == 3
    assert by_name["always_fails"]["failure_rate"] == 1.0
    assert set(by_name) >= {"process_logs", "send_email", "send_invoices"}
    tags = {row["tag"]: row for row in stats["tags"]}
    assert tags["timed"]["counts"]["succeeded"] == 4 and tags["timed"]["jobs"] == ["nap"]
    assert 0.1 <= tags["timed"]["run_time"]["p95"] <= 0.5
    assert tags["timed"]["wait_time"]["count"] == 4 and tags["timed"]["running"] == 0
    assert (stats["tags_kept"], stats["other_tags"]) == (1, None)
    assert stats["schedules"][0]["job"] == "send_invoices"
    assert "tags" not in client.get("/api/stats", params={"tags": "0"}).json()


def test_stats_give_jobs_finished_per_minute_over_the_last_minutes(
    app: backroom.App, client: TestClient
) -> None:
    long_ago = time.time() - 900  # a success 15 minutes ago is past the window
    app.enqueue("process_logs", logs(0), now=long_ago)
    [old] = app.broker.claim(["default"], worker_id="w", lease_s=60, limit=1, now=long_ago)
    app.broker.ack([(old, None)], now=long_ago + 1)
    for n in range(1, 4):
        enqueue(client, "process_logs", logs(n))
    enqueue(client, "always_fails", {"message": "boom"})
    app.run_worker(burst=True)
    stats = client.get("/api/stats").json()
    window = stats["throughput"]
    assert 240 <= window["window_s"] <= 300 and window["since"] % 60 == 0
    assert window["since"] + window["window_s"] == pytest.approx(stats["now"], abs=1)
    per_minute = pytest.approx(4 * 60 / window["window_s"], abs=1e-3)
    assert (window["finished"], window["per_minute"]) == (4, per_minute)
    by_name = {row["job"]: row["throughput"] for row in stats["jobs"]}
    per_minute = pytest.approx(3 * 60 / window["window_s"], abs=1e-3)
    assert by_name["process_logs"] == {"finished": 3, "per_minute": per_minute}
    assert by_name["always_fails"]["finished"] == 1  # a dead job finished too
    assert by_name["send_email"] == {"finished": 0, "per_minute": 0.0}


def test_activity_counts_successes_and_failures_in_the_current_minute(
    app: backroom.App, client: TestClient
) -> None:
    for n in range(3):
        enqueue(client, "process_logs", logs(n))
    enqueue(client, "always_fails", {"message": "boom"})
    app.run_worker(burst=True)
    data = client.get("/api/activity").json()
    series = {s["job"]: s for s in data["jobs"]}
    assert len(series["process_logs"]["succeeded"]) == 60
    assert sum(series["process_logs"]["succeeded"]) == 3
    assert sum(series["always_fails"]["failed"]) == 1
    assert series["process_logs"]["p95"][-1] is not None


def test_failures_are_grouped_by_job_and_exception_type(
    app: backroom.App, client: TestClient
) -> None:
    for n in range(3):
        enqueue(client, "always_fails", {"message": f"boom {n}"})
    app.run_worker(burst=True)
    data = client.get("/api/failures").json()
    [group] = data["groups"]
    assert (group["job"], group["type"], group["failures"], group["dead"]) == (
        "always_fails",
        "ValueError",
        3,
        3,
    )
    assert group["latest"]["message"].startswith("boom")
    assert "ValueError" in group["latest"]["traceback"]
    assert data["dead_total"] == {"always_fails": 3}


# -- workers, schedules, queues, registry, health ---------------------------------------------


def test_workers_show_their_current_jobs_with_progress(
    app: backroom.App, client: TestClient
) -> None:
    job_id = enqueue(client, "process_logs", logs(1))
    [claim] = app.broker.claim(["default"], worker_id="w1", lease_s=60, limit=1)
    app.broker.progress(claim, 0.25, "a quarter")
    now = time.time()
    app.broker.register_worker(
        WorkerInfo(
            id="w1",
            host="box",
            pid=42,
            queues=("default",),
            concurrency=4,
            started_at=now - 10,
            seen_at=now,
            current=(job_id,),
        ),
        ttl_s=60,
    )
    [worker] = client.get("/api/workers").json()["workers"]
    assert (worker["id"], worker["host"], worker["pid"]) == ("w1", "box", 42)
    [current] = worker["current"]
    assert current["job"] == "process_logs" and current["progress"] == 0.25
    running = client.get("/api/jobs", params={"state": "running"}).json()["jobs"]
    assert running[0]["progress_message"] == "a quarter" and running[0]["worker_id"] == "w1"


def test_schedule_payloads_are_redacted_wherever_schedules_are_listed(
    app: backroom.App, client: TestClient
) -> None:
    app.schedule("send_email", cron="*/5 * * * *", name="digest",
                 payload={"to": "ops@example.com", "password": SECRET})  # fmt: skip
    listed = client.get("/api/schedules").json()["schedules"]
    in_stats = client.get("/api/stats").json()["schedules"]
    for views in (listed, in_stats):
        [digest] = [v for v in views if v["name"] == "digest"]
        assert digest["payload"]["to"] == "ops@example.com"
        assert digest["payload"]["password"] != SECRET
    assert SECRET not in client.get("/api/stats").text


def test_schedules_show_their_next_run(client: TestClient) -> None:
    [schedule] = client.get("/api/schedules").json()["schedules"]
    assert schedule["name"] == "send_invoices" and schedule["cron"] == "0 6 1 * *"
    assert schedule["next_run"] > time.time() and schedule["last_run"] is None


def test_queues_show_depth_and_can_be_paused_and_resumed(
    app: backroom.App, client: TestClient
) -> None:
    enqueue(client, "send_email", {"to": "a@example.com"})
    queues = {q["name"]: q for q in client.get("/api/queues").json()["queues"]}
    assert queues["mail"]["depth"] == 1 and queues["mail"]["jobs"] == ["send_email"]
    assert client.post("/api/queues/mail/pause").json() == {"queue": "mail", "paused": True}
    assert app.broker.paused() == {"mail"}
    queues = {q["name"]: q for q in client.get("/api/queues").json()["queues"]}
    assert queues["mail"]["paused"] is True
    assert client.post("/api/queues/mail/resume").json() == {"queue": "mail", "paused": False}
    assert app.broker.paused() == set()


def test_the_registry_lists_every_job_with_its_payload_schema(client: TestClient) -> None:
    jobs = {j["name"]: j for j in client.get("/api/registry").json()["jobs"]}
    assert set(jobs) == {"process_logs", "send_email", "send_invoices", "always_fails", "upload"}
    assert jobs["send_invoices"]["sources"] == ["scheduler"]
    assert jobs["send_email"]["queue"] == "mail"
    schema = jobs["process_logs"]["payload_schema"]
    assert schema["required"] == ["server", "day"]
    assert schema["properties"]["day"]["type"] == "string"


def test_healthz_and_openapi(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    document = client.get("/api/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    for path in (
        "/api/jobs",
        "/api/jobs/{id}",
        "/api/jobs/{id}/cancel",
        "/api/jobs/{id}/retry",
        "/api/stats",
        "/api/workers",
        "/api/schedules",
        "/api/queues",
        "/api/queues/{name}/pause",
        "/api/queues/{name}/resume",
        "/api/registry",
        "/metrics",
        "/healthz",
        "/api/bulk/retry",
        "/api/bulk/delete",
    ):
        assert path in document["paths"], path
    enqueue_body = document["paths"]["/api/jobs"]["post"]["requestBody"]
    assert (
        "send_email"
        in enqueue_body["content"]["application/json"]["schema"]["properties"]["job"]["enum"]
    )


def test_unknown_api_paths_and_methods_get_json_errors(client: TestClient) -> None:
    error_of(client.get("/api/nothing-here"), 404, "not_found")
    error_of(client.delete("/api/jobs"), 405, "method_not_allowed")
    error_of(client.get("/api/queues/mail/pause"), 405, "method_not_allowed")


# -- secrets ---------------------------------------------------------------------------------


def test_a_secret_in_a_payload_never_appears_in_any_api_output(
    app: backroom.App, client: TestClient
) -> None:
    ok = enqueue(client, "send_email", {"to": "a@example.com", "password": SECRET})
    pending = enqueue(client, "send_email", {"to": "b@example.com", "password": SECRET})
    app.run_worker(burst=True, queues=["mail"])
    client.post(f"/api/jobs/{pending}/retry")  # harmless: a 409, still checked below
    smuggled = Envelope(
        id=new_id(),
        job="elsewhere",
        source="api",
        created_at=time.time(),
        payload={"nested": {"api_key": SECRET, "list": [{"token": SECRET}]}},
    )
    app.broker.enqueue([smuggled])
    outputs = [
        client.get(path).text
        for path in (
            "/api/jobs",
            "/api/jobs?limit=1000",
            f"/api/jobs/{ok}",
            f"/api/jobs/{pending}",
            f"/api/jobs/{smuggled.id}",
            "/api/stats",
            "/api/activity",
            "/api/failures",
            "/api/workers",
            "/api/schedules",
            "/api/queues",
            "/api/registry",
            "/metrics",
            "/api/openapi.json",
            "/",
        )
    ]
    for text in outputs:
        assert SECRET not in text
    detail = json.loads(client.get(f"/api/jobs/{smuggled.id}").text)
    assert detail["payload"] == {
        "nested": {"api_key": "[redacted]", "list": [{"token": "[redacted]"}]}
    }


def test_the_dashboard_can_be_mounted_inside_another_app(app: backroom.App) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    from backroom.web import create_app

    parent = Starlette(routes=[Mount("/jobs", app=create_app(app, tokens={"api": "tok"}))])
    with TestClient(parent) as client:
        page = client.get("/jobs", follow_redirects=True)
        assert page.status_code == 200 and 'src="static/dashboard.js"' in page.text
        assert client.get("/jobs/static/dashboard.css").status_code == 200
        assert client.get("/jobs/api/jobs").status_code == 401
        listed = client.get("/jobs/api/jobs", headers={"authorization": "Bearer tok"})
        assert listed.status_code == 200 and listed.json()["jobs"] == []
        assert client.get("/jobs/healthz").json() == {"status": "ok"}


def test_a_broker_that_does_not_answer_is_a_503_that_leaks_nothing(
    app: backroom.App, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from backroom.errors import BrokerError

    def down(*args: Any, **kwargs: Any) -> Any:
        raise BrokerError(f"cannot reach redis://:{SECRET}@db:6379/0")

    for method in ("jobs", "paused", "stats"):
        monkeypatch.setattr(app.broker, method, down)
    for response in (client.get("/api/jobs"), client.get("/api/stats"), client.get("/healthz")):
        assert response.status_code == 503
        assert SECRET not in response.text
    assert client.get("/api/jobs").json()["error"] == "broker_unavailable"
